"""Views for face tests: a fixed site and an InstanceView of a test instance."""

from typing import Optional

from mdserver.errors import TemplateError
from mdserver.view import InstanceView, Site, make_view

SITE = Site(availability_zone="mds-1a", region="mds-1", instance_type="m1.small",
            ami_id="ami-00000000", domain="example.net", network="10.122.0.0/16",
            gateway="10.122.0.1", use_dns=True,
            public_keys=(("admin", "ssh-ed25519 AAAAC3Nza admin@host"),
                         ("ops", "ssh-rsa AAAAB3Nza ops@host")))
USERDATA = "#cloud-config\nhostname: vm7\n"
SEED = bytes(range(64))


def view_of(inst, site: Site = SITE, userdata: Optional[str] = USERDATA,
            password: Optional[str] = None) -> InstanceView:
    """`userdata` None: the template fails (TemplateError)."""
    def render() -> str:
        if userdata is None:
            raise TemplateError("t.yaml: NameError: name 'nope' is not defined")
        return userdata
    return make_view(inst, site, password, SEED, render)
