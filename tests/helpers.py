"""Helpers the test modules import: configs in temp dirs, instances, views, domain XML, privileged-test gating."""

import getpass
import os
import re
import shutil
import socket
import time
from typing import Callable, Optional

import pytest

from mdserver.errors import TemplateError
from mdserver.models import Instance, InstanceSettings
from mdserver.view import InstanceView, Site, make_view

# .ci/run sets this: a test that needs root or namespaces then fails instead
# of skipping, so CI always runs it.
REQUIRE_PRIVILEGED = os.environ.get("MDSERVER_REQUIRE_PRIVILEGED") == "1"


def need(condition: bool, reason: str) -> None:
    """Skip (or, under MDSERVER_REQUIRE_PRIVILEGED=1, fail) unless `condition`."""
    if condition:
        return
    if REQUIRE_PRIVILEGED:
        pytest.fail(f"required in CI but unavailable: {reason}")
    pytest.skip(reason)


def need_root() -> None:
    need(os.geteuid() == 0 and shutil.which("ip") is not None,
         "needs root and iproute2 for network namespaces")


def write_config(directory, body: str = "", **mdserver_keys) -> str:
    """A config file in `directory` whose state lives there too."""
    lines = ["[mdserver]", f"db_file = {directory}/db.json",
             f"userdata_dir = {directory}/userdata", f"admin_socket = {directory}/admin.sock"]
    lines += [f"{k} = {v}" for k, v in mdserver_keys.items()]
    # dnsmasq files in the test's directory too (added to a [dnsmasq] the body has)
    dnsmasq = f"[dnsmasq]\nbase_dir = {directory}/dnsmasq\nuser = {getpass.getuser()}\n"
    body = body.replace("[dnsmasq]\n", dnsmasq) if "[dnsmasq]\n" in body \
        else body + "\n" + dnsmasq
    # mdserverctl list/show ask libvirt for each instance's state: never the
    # host's libvirt (tests/hermetic.py's dead socket, unless the test names one).
    if not re.search(r"^\[libvirt\][^\[]*^uri\s*=", body, re.M):
        dead = os.environ.get("LIBVIRT_DEFAULT_URI") or \
            f"qemu+unix:///system?socket={directory}/no-libvirt/libvirt-sock"
        body = body.replace("[libvirt]\n", f"[libvirt]\nuri = {dead}\n") \
            if "[libvirt]\n" in body else body + f"\n[libvirt]\nuri = {dead}\n"
    path = os.path.join(str(directory), "mdserver.conf")
    os.makedirs(os.path.join(str(directory), "userdata"), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n" + body)
    return path


def make_instance(n: int = 1, ipv4: str = "", **changes) -> Instance:
    fields = dict(
        uuid=f"ec2{n:05x}-aaaa-4bbb-8ccc-{n:012x}",
        name=f"vm{n}",
        mac=f"52:54:00:00:{n >> 8 & 0xff:02x}:{n & 0xff:02x}",
        ipv4=ipv4 or f"10.122.{n >> 8 & 0xff}.{n & 0xff}",
        hostname=f"vm{n}",
        first_seen=1700000000.0,
        last_seen=1700000000.0,
        settings=InstanceSettings(),
    )
    fields.update(changes)
    return Instance(**fields)


DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def read_data(name: str) -> bytes:
    with open(os.path.join(DATA_DIR, name), "rb") as f:
        return f.read()


def domain_xml(name: str, uuid: str, mac: str, network: str = "mds", metadata: str = "",
               devices: str = "") -> str:
    """A small libvirt domain (TCG, no disk) with one interface on `network`,
    SMBIOS serial and UUID equal to the domain UUID (the AWS route)."""
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  {f"<metadata>{metadata}</metadata>" if metadata else ""}
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <sysinfo type='smbios'>
    <system>
      <entry name='serial'>{uuid}</entry>
      <entry name='uuid'>{uuid}</entry>
    </system>
  </sysinfo>
  <os>
    <type arch='x86_64'>hvm</type>
    <smbios mode='sysinfo'/>
  </os>
  <devices>
    <interface type='network'>
      <mac address='{mac}'/>
      <source network='{network}'/>
      <model type='virtio'/>
    </interface>
    {devices}
  </devices>
</domain>
"""


def mds_metadata(**elements) -> str:
    """mdserver's own <metadata> block; ssh_key may be a list."""
    inner = ""
    for tag, value in elements.items():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            inner += f"<mds:{tag.replace('_', '-')}>{v}</mds:{tag.replace('_', '-')}>"
    return f"<mds:instance xmlns:mds='urn:mdserver:1'>{inner}</mds:instance>"


# -- views for face tests: a fixed site, an InstanceView of a test instance ----

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


class Notify:
    """A systemd notify socket of the test's own."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(30)
        self.path = path

    def next(self) -> str:
        return self.sock.recv(512).decode()


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> float:
    """Seconds until `condition` holds; fails after `timeout`."""
    t0 = time.monotonic()
    while not condition():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.01)
    return time.monotonic() - t0
