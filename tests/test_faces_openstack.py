"""The OpenStack face: listings, meta_data.json and the other files, exactly (golden files)."""

import base64
import json

import pytest

from helpers import make_instance
from golden import check
from mdserver.faces import openstack
from mdserver.models import InstanceSettings
from helpers import SITE, view_of

pytestmark = pytest.mark.unit

INST = make_instance(7, settings=InstanceSettings(
    ssh_keys=("ssh-ed25519 OWN me@vm",), meta=(("role", "web"), ("tier", "a: b\nc"))))


def body(view, path):
    reply = openstack.lookup(view, path)
    return None if reply is None else reply.body.decode()


def masked(text):
    """meta_data.json with its random seed checked and masked."""
    md = json.loads(text)
    if "random_seed" in md:
        assert len(base64.b64decode(md["random_seed"], validate=True)) > 0
        md["random_seed"] = "MASKED"
    return json.dumps(md, indent=1, sort_keys=True) + "\n"


def test_version_listing_exact():
    view = view_of(INST)
    expected = ("2012-08-10\n2013-04-04\n2013-10-17\n2015-10-15\n2016-06-30\n2016-10-06\n"
                "2017-02-22\n2018-08-27\n2020-10-14\nlatest")
    for path in ("", "/"):
        assert body(view, path) == expected


@pytest.mark.parametrize("version", openstack.ALL_VERSIONS)
def test_file_listings_golden(version):
    view = view_of(INST)
    listing = body(view, version)
    assert body(view, version + "/") == listing
    check(f"openstack_listing_{version}", listing + "\n")
    for name in listing.split("\n"):  # every listed file is served
        assert openstack.lookup(view, f"{version}/{name}") is not None, name


@pytest.mark.parametrize("version", ["2012-08-10", "2018-08-27", "latest"])
def test_meta_data_golden(version):
    check(f"openstack_meta_data_{version}.json",
          masked(body(view_of(INST), f"{version}/meta_data.json")))


def test_meta_data_facts():
    md = json.loads(body(view_of(INST), "latest/meta_data.json"))
    assert md["uuid"] == INST.uuid  # the instance-id cloud-init takes
    assert md["hostname"] == "vm7.example.net" and md["name"] == "vm7"
    assert md["public_keys"] == {"admin": "ssh-ed25519 AAAAC3Nza admin@host",
                                 "ops": "ssh-rsa AAAAB3Nza ops@host",
                                 "vm7-0": "ssh-ed25519 OWN me@vm"}
    assert md["keys"][2] == {"name": "vm7-0", "type": "ssh", "data": "ssh-ed25519 OWN me@vm"}
    assert md["meta"] == {"role": "web", "tier": "a: b\nc"}
    assert md["launch_index"] == 0 and md["devices"] == [] and md["availability_zone"] == "mds-1a"


def test_unknown_version_or_file_is_none():
    view = view_of(INST)
    for path in ("2011-01-01", "2011-01-01/meta_data.json", "latest/nope", "latest/meta_data.json/x",
                 "2012-08-10/vendor_data.json", "2013-10-17/network_data.json"):
        assert openstack.lookup(view, path) is None, path


def test_user_data_is_the_rendered_template_and_404_when_it_fails(caplog):
    assert body(view_of(INST), "latest/user_data") == "#cloud-config\nhostname: vm7\n"
    assert not openstack.lookup(view_of(INST), "latest/user_data").cacheable
    assert openstack.lookup(view_of(INST, userdata=None), "latest/user_data") is None
    assert "user-data left out" in caplog.text


def test_vendor_data():
    site = SITE.__class__(**{**SITE.__dict__, "vendor_data": "#cloud-config\nruncmd: [x]\n"})
    view = view_of(INST, site=site)
    assert json.loads(body(view, "latest/vendor_data.json")) == {
        "cloud-init": "#cloud-config\nruncmd: [x]\n"}
    assert json.loads(body(view, "latest/vendor_data2.json")) == {
        "static": {"cloud-init": "#cloud-config\nruncmd: [x]\n"}}
    plain = view_of(INST)
    assert json.loads(body(plain, "latest/vendor_data.json")) == {}
    assert json.loads(body(plain, "latest/vendor_data2.json")) == {}


@pytest.mark.parametrize("mode", ["dhcp", "static"])
def test_network_data_golden(mode):
    inst = make_instance(7, settings=InstanceSettings(network=mode))
    check(f"openstack_network_data_{mode}.json", body(view_of(inst), "latest/network_data.json")
          + "\n")


def test_network_none_has_no_network_data():
    view = view_of(make_instance(7, settings=InstanceSettings(network="none")))
    assert "network_data.json" not in body(view, "latest")
    assert openstack.lookup(view, "latest/network_data.json") is None


def test_password_get_is_empty_or_the_stored_blob():
    assert body(view_of(INST), "latest/password") == ""
    assert body(view_of(INST.updated(password_blob="c2VjcmV0")), "latest/password") == "c2VjcmV0"


def test_config_drive_files():
    files = dict(openstack.files(view_of(INST)))
    for version in openstack.ALL_VERSIONS:
        assert f"openstack/{version}/meta_data.json" in files
        assert f"openstack/{version}/user_data" in files
    assert "openstack/latest/network_data.json" in files
    assert not any(p.endswith("/password") for p in files)
    failing = dict(openstack.files(view_of(INST, userdata=None)))
    assert not any(p.endswith("/user_data") for p in failing)
    assert "openstack/latest/meta_data.json" in failing
