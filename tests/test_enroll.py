"""mdserver-enroll against a real libvirtd (tests/libvirt_lab.py) and a real mdserver.

The lab's libvirtd lives in private network and mount namespaces; the
enroller runs inside them (lab.ns_prefix()) with the lab's socket URI as
[libvirt] uri, and talks to the mdserver daemon of the test through its admin
socket in the test's temp directory. Domains are defined, never started: the
enroller acts on definitions.
"""

import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest

from daemon import ROOT, Daemon
from helpers import Notify, mds_metadata, need, need_root, write_config
from mdserver import adminclient
from mdserver.domainxml import NAMESPACE

pytestmark = pytest.mark.privileged

try:
    from libvirt_lab import LibvirtLab, missing_prerequisites, rename_network
except ImportError:  # pragma: no cover
    LibvirtLab = None

try:
    import libvirt  # noqa: F401  (the enroller's binding)
    HAVE_BINDING = True
except ImportError:
    HAVE_BINDING = False

NETWORK_XML = os.path.join(ROOT, "etc", "libvirt", "mds-network.xml")
DEADLINE = 5.0  # seconds from `virsh define` to enrolled and registered


def plain_domain(name: str, uuid: str, mac: str, network: str, metadata: str = "") -> str:
    """What a user writes: no SMBIOS, no CD-ROM, one interface."""
    meta = f"  <metadata>{metadata}</metadata>\n" if metadata else ""
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
{meta}  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <boot dev='hd'/>
  </os>
  <devices>
    <interface type='network'>
      <source network='{network}'/>
      <mac address='{mac}'/>
      <model type='virtio'/>
    </interface>
  </devices>
</domain>
"""


def uuid_mac(n: int):
    return f"5e1f{n:04x}-aaaa-4bbb-8ccc-{n:012x}", f"52:54:00:e0:00:{n:02x}"


class World:
    def __init__(self, lab, tmp, net):
        self.lab, self.tmp, self.net = lab, tmp, net
        self.conf = str(tmp / "mdserver.conf")
        self.admin = str(tmp / "admin.sock")
        self.enroller = None
        self.log_path = str(tmp / "enroll.log")
        self.notify = Notify(str(tmp / "notify.sock"))
        self.n = 0

    def start_enroller(self):
        self.log = open(self.log_path, "ab")
        self.enroller = subprocess.Popen(
            self.lab.ns_prefix() + [sys.executable, "-m", "mdserver.enroll", self.conf],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
            env={**os.environ, "NOTIFY_SOCKET": self.notify.path})
        assert self.notify.next().startswith("READY=1"), self.output()

    def stop_enroller(self) -> int:
        p = self.enroller
        if p is None:
            return 0
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)  # our own child's session only
                p.wait()
        self.log.close()
        self.enroller = None
        return p.returncode

    def output(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def record(self, uuid):
        status, data = adminclient.request(self.admin, "GET", f"/instances/{uuid}")
        assert status in (200, 404), (status, data)
        return json.loads(data) if status == 200 else None

    def define(self, xml: str) -> float:
        """virsh define; returns the monotonic time just before it."""
        name = ET.fromstring(xml).findtext("name")
        path = self.tmp / f"{name}-{time.monotonic_ns()}.xml"
        path.write_text(xml)
        t = time.monotonic()
        self.lab.virsh("define", str(path))
        if name not in self.lab.domains:
            self.lab.domains.append(name)
        return t

    def inactive(self, name: str) -> str:
        return self.lab.domain_xml(name, inactive=True)

    def wait(self, what, cond, timeout=DEADLINE):
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"not {what} within {timeout} s:\n" + self.output())
            time.sleep(0.05)
        return time.monotonic()

    def new_domain(self, metadata: str = "", network: str = ""):
        self.n += 1
        uuid, mac = uuid_mac(self.n)
        name = self.lab.name("vm")
        return name, uuid, plain_domain(name, uuid, mac, network or self.net, metadata)

    def barrier(self):
        """Define a plain domain and wait until it is registered: the enroller
        handles events in order, so everything defined before is handled too."""
        name, uuid, xml = self.new_domain()
        self.define(xml)
        self.wait("barrier registered", lambda: self.record(uuid) is not None, 20)
        return name, uuid


def route_of(xml: str):
    root = ET.fromstring(xml)
    el = root.find(f"metadata/{{{NAMESPACE}}}instance/{{{NAMESPACE}}}route")
    return el.text if el is not None else None


def enrolled(xml: str) -> bool:
    return route_of(xml) == "openstack" and "OpenStack Nova" in xml \
        and "<smbios mode='sysinfo'/>" in xml


@pytest.fixture
def world(tmp_path):
    need_root()
    need(LibvirtLab is not None and not missing_prerequisites(),
         f"needs libvirt and qemu: {LibvirtLab and missing_prerequisites()}")
    need(HAVE_BINDING, "needs libvirt's Python binding (pip install libvirt-python; "
                       "apt-get install libvirt-dev pkg-config to build it)")
    with LibvirtLab() as lab:
        net, br = lab.name("net"), lab.name("br", 15)
        lab.define_network(rename_network(open(NETWORK_XML).read(), net, br))
        w = World(lab, tmp_path, net)

        def configure(enroll="new"):
            write_config(tmp_path, f"[dnsmasq]\nnet_name = {net}\ninterface = {br}\n"
                                   f"[libvirt]\nuri = {lab.uri}\nenroll = {enroll}\n",
                         listen_address="169.254.169.254", port=80,
                         logfile=str(tmp_path / "mdserver.log"))
        w.configure = configure
        configure()
        daemons = []

        def start_mdserver():
            md = Daemon(w.conf, "169.254.169.254", 80, netns=lab.netns)
            daemons.append(md)
            deadline = time.monotonic() + 20
            while not os.path.exists(w.admin):
                assert md.proc.poll() is None and time.monotonic() < deadline, md.output()
                time.sleep(0.05)
            return md
        w.start_mdserver = start_mdserver
        try:
            w.md = start_mdserver()
            yield w
        finally:
            rc = w.stop_enroller()
            for md in daemons:
                md.stop()
            w.notify.sock.close()
        assert rc == 0, w.output()


def test_define_enrolls_and_registers_redefine_keeps_it_undefine_removes(world):
    w = world
    w.start_enroller()
    name, uuid, xml = w.new_domain()
    t0 = w.define(xml)
    t1 = w.wait("registered", lambda: w.record(uuid) is not None)
    t2 = w.wait("enrolled", lambda: enrolled(w.inactive(name)))
    print(f"virsh define -> registered {t1 - t0:.2f} s, enrolled definition seen "
          f"{t2 - t0:.2f} s")
    assert t1 - t0 < DEADLINE
    rec = w.record(uuid)
    assert rec["route"].startswith("openstack"), rec
    enrolled_xml = w.inactive(name)
    # The DEFINED event its own edit caused changed nothing (no loop).
    w.barrier()
    assert w.inactive(name) == enrolled_xml
    assert w.output().count(f"{name}: route openstack:") >= 1
    changes = w.output().count(f"{name}: route openstack:")

    # enroll = new: a domain mdserver has registered is changed only by
    # `route --apply` or enroll = all; re-defined by hand, it stays as the
    # admin wrote it, and stays registered with its route.
    w.define(xml)
    w.barrier()
    assert not enrolled(w.inactive(name))
    rec = w.record(uuid)
    assert rec is not None and rec["route"].startswith("openstack"), rec
    assert w.output().count(f"{name}: route openstack:") == changes

    t0 = time.monotonic()
    w.lab.virsh("undefine", name)
    w.lab.domains.remove(name)
    t1 = w.wait("removed", lambda: w.record(uuid) is None)
    print(f"virsh undefine -> removed {t1 - t0:.2f} s")


def test_enroll_all_applies_the_route_again_after_a_hand_redefine(world):
    w = world
    w.configure(enroll="all")
    w.start_enroller()
    name, uuid, xml = w.new_domain()
    w.define(xml)
    w.wait("enrolled", lambda: enrolled(w.inactive(name)) and w.record(uuid) is not None)
    w.define(xml)
    w.wait("enrolled again", lambda: enrolled(w.inactive(name)))
    first = w.inactive(name)
    w.barrier()
    assert w.inactive(name) == first  # idempotent: its own DEFINED changes nothing


def test_other_network_and_route_none_are_never_edited(world):
    w = world
    other, other_br = w.lab.name("net"), w.lab.name("br", 15)
    w.lab.define_network(rename_network(open(NETWORK_XML).read(), other, other_br),
                         start=False)
    w.start_enroller()
    foreign, foreign_uuid, foreign_xml = w.new_domain(network=other)
    w.define(foreign_xml)
    optout, optout_uuid, optout_xml = w.new_domain(metadata=mds_metadata(route="none"))
    w.define(optout_xml)
    before = {n: w.inactive(n) for n in (foreign, optout)}
    w.barrier()
    time.sleep(0.5)
    assert {n: w.inactive(n) for n in (foreign, optout)} == before
    assert w.record(foreign_uuid) is None
    rec = w.record(optout_uuid)
    assert rec is not None and rec["route"].startswith("none"), rec
    # and again when the enroller connects (the start-up pass)
    assert w.stop_enroller() == 0
    w.start_enroller()
    w.barrier()
    assert {n: w.inactive(n) for n in (foreign, optout)} == before
    assert w.record(foreign_uuid) is None


def test_startup_pass_enrolls_existing_domains_and_prunes_gone_ones(world):
    w = world
    name, uuid, xml = w.new_domain()
    w.define(xml)                     # before the enroller runs: no event seen
    keep, keep_uuid, keep_xml = w.new_domain()
    w.define(keep_xml)
    for _ in range(8):                # records whose domains libvirt has
        n, u, x = w.new_domain()
        w.define(x)
        adminclient.call(w.admin, "POST", "/instance-upload", x.encode())
    ghost, ghost_uuid, ghost_xml = w.new_domain()   # libvirt never had it
    adminclient.call(w.admin, "POST", "/instance-upload", ghost_xml.encode())
    w.start_enroller()
    w.wait("enrolled at start-up", lambda: enrolled(w.inactive(name)), 20)
    w.wait("ghost pruned", lambda: w.record(ghost_uuid) is None, 20)
    assert w.record(uuid) is not None and w.record(keep_uuid) is not None


def test_libvirtd_restart_is_survived(world):
    w = world
    w.start_enroller()
    w.barrier()
    w.lab.restart_libvirtd(down=2.5)
    name, uuid, xml = w.new_domain()
    w.wait("reconnected", lambda: w.output().count("connected to libvirt at") >= 2, 40)
    t0 = w.define(xml)
    t1 = w.wait("enrolled after the restart",
                lambda: enrolled(w.inactive(name)) and w.record(uuid) is not None)
    print(f"after the restart: virsh define -> enrolled and registered {t1 - t0:.2f} s")
    out = w.output()
    assert out.count("lost the connection to libvirt") == 1, out
    assert out.count("waiting for libvirt") <= 1, out   # one line per state change
    assert w.enroller.poll() is None


def test_mdserver_down_then_back_gets_every_domain_enrolled(world):
    w = world
    w.start_enroller()
    w.barrier()
    w.md.stop()
    name, uuid, xml = w.new_domain()
    w.define(xml)
    # enroll = new needs mdserver to tell whether it knows the domain: left
    # alone until mdserver answers again (looked at every 5 s)
    w.wait("DEFINED handled", lambda: "every domain is enrolled again" in w.output(), 20)
    assert not enrolled(w.inactive(name))
    w.md = w.start_mdserver()
    w.wait("enrolled and registered once mdserver is back",
           lambda: w.record(uuid) is not None and enrolled(w.inactive(name)), 20)
    assert w.output().count("every domain is enrolled again once it answers") == 1


def test_config_error_is_one_line_and_exit_2(tmp_path):
    conf = tmp_path / "bad.conf"
    conf.write_text("[libvirt]\nenroll = sometimes\n")
    r = subprocess.run([sys.executable, "-m", "mdserver.enroll", str(conf)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("mdserver-enroll: ") and "enroll" in r.stderr


# -- the enroller's event logic with a stand-in libvirt (no daemon) -------------

class FakeLibvirt:
    VIR_DOMAIN_EVENT_DEFINED, VIR_DOMAIN_EVENT_UNDEFINED, VIR_DOMAIN_EVENT_STOPPED = 0, 1, 5
    VIR_DOMAIN_EVENT_STOPPED_MIGRATED, VIR_DOMAIN_EVENT_STOPPED_FAILED = 3, 5
    VIR_DOMAIN_EVENT_RESUMED, VIR_DOMAIN_EVENT_RESUMED_MIGRATED = 4, 1
    VIR_DOMAIN_XML_INACTIVE = 2

    class libvirtError(Exception):
        pass


class FakeDom:
    def __init__(self, uuid):
        self.uuid = uuid

    def UUIDString(self):
        return self.uuid.upper()


def offline_enroller(tmp_path):
    """An Enroller on the stand-in libvirt whose admin requests are recorded
    (and answered 200) instead of sent."""
    from mdserver import config, enroll
    e = enroll.Enroller(config.load(write_config(tmp_path)), FakeLibvirt)
    calls = []
    e._admin = lambda method, url, body=None: calls.append((method, url)) or (200, {})
    return e, calls


def test_undefined_after_an_outgoing_migration_keeps_the_record(tmp_path):
    e, calls = offline_enroller(tmp_path)
    lv = FakeLibvirt
    moved, gone = uuid_mac(1)[0], uuid_mac(2)[0]
    e._lifecycle(None, FakeDom(moved), lv.VIR_DOMAIN_EVENT_STOPPED,
                 lv.VIR_DOMAIN_EVENT_STOPPED_MIGRATED, None)
    e._lifecycle(None, FakeDom(moved), lv.VIR_DOMAIN_EVENT_UNDEFINED, 0, None)
    e._lifecycle(None, FakeDom(gone), lv.VIR_DOMAIN_EVENT_STOPPED, 0, None)
    e._lifecycle(None, FakeDom(gone), lv.VIR_DOMAIN_EVENT_UNDEFINED, 0, None)
    e.work.put(None)
    e.worker()
    assert calls == [("DELETE", f"/instances/{gone}")]


def test_waits_for_an_absent_libvirtd_quietly_and_stops_cleanly(tmp_path):
    need(HAVE_BINDING, "needs libvirt's Python binding (pip install libvirt-python)")
    conf = write_config(tmp_path, "[libvirt]\nuri = qemu+unix:///system?socket="
                                  f"{tmp_path}/no-libvirt.sock\n")
    notify = Notify(str(tmp_path / "notify.sock"))
    log = open(tmp_path / "enroll.log", "wb")
    p = subprocess.Popen([sys.executable, "-m", "mdserver.enroll", conf], cwd=ROOT,
                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                         env={**os.environ, "NOTIFY_SOCKET": notify.path})
    try:
        # ready (systemctl start returns), saying what it waits for
        assert notify.next() == "READY=1\nSTATUS=waiting for libvirt"
        time.sleep(4)  # retries at 1, 2 (then 4) s: one log line for the state
        with open(f"/proc/{p.pid}/stat") as f:
            cpu_ticks = sum(int(x) for x in f.read().rsplit(")", 1)[1].split()[11:13])
        p.send_signal(signal.SIGINT)
        assert p.wait(15) == 0
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        log.close()
        notify.sock.close()
    out = (tmp_path / "enroll.log").read_text()
    assert out.count("waiting for libvirt") == 1, out
    assert cpu_ticks < 200, cpu_ticks  # no busy loop (start-up included)


def test_a_transient_domain_is_registered_but_never_made_persistent(world):
    w = world
    name, uuid, xml = w.new_domain()
    path = w.tmp / "transient.xml"
    path.write_text(xml)
    w.lab.virsh("create", str(path))          # running, no persistent definition
    w.lab.domains.append(name)
    before = w.lab.domain_xml(name)
    w.start_enroller()                        # the start-up pass sees it
    w.wait("registered", lambda: w.record(uuid) is not None, 20)
    assert w.lab.virsh("dominfo", name).count("Persistent:     no") == 1
    assert w.lab.domain_xml(name) == before


def test_enroll_none_registers_without_editing(world):
    w = world
    w.configure(enroll="none")
    w.start_enroller()
    name, uuid, xml = w.new_domain()
    w.define(xml)
    before = w.inactive(name)
    w.wait("registered", lambda: w.record(uuid) is not None)
    w.barrier()
    assert w.inactive(name) == before and not enrolled(before)


def test_mdserverctl_route_shows_then_applies_what_the_enroller_would(world):
    w = world
    w.configure(enroll="none")  # no enroller edits: the command does it
    name, uuid, xml = w.new_domain()
    w.define(xml)

    def ctl(*args):
        return subprocess.run(w.lab.ns_prefix() + [sys.executable, "-m", "mdserver.ctl", "-c",
                                                    w.conf, "route", *args],
                              capture_output=True, text=True, cwd=ROOT, timeout=60)
    shown = ctl(name, "--diff")
    assert shown.returncode == 0, shown.stderr
    assert "+      <entry name='product'>OpenStack Nova</entry>" in shown.stdout
    assert "equivalent: " in shown.stderr and "system.product=OpenStack Nova" in shown.stderr
    assert not enrolled(w.inactive(name))  # showing changes nothing
    applied = ctl(uuid, "--apply")
    assert applied.returncode == 0, applied.stderr
    assert enrolled(w.inactive(name))
    assert w.record(uuid)["route"] == "openstack"  # and registered
    again = ctl(name, "--apply")  # idempotent
    assert again.returncode == 0 and "0 change(s)" in again.stderr, again.stderr
    missing = ctl("mdt-no-such-domain")
    assert missing.returncode == 1 and "libvirt has no domain" in missing.stderr


def test_a_running_domain_shows_its_route_pending_until_its_next_cold_boot(world):
    w = world
    w.configure(enroll="none")  # the command makes the change, on a running domain
    uuid, mac = uuid_mac(90)
    name = w.lab.name("vm")
    w.lab.start_domain(name, uuid, mac, w.net)  # running, no route of ours
    live = w.lab.domain_xml(name)

    def ctl(*args):
        return subprocess.run(w.lab.ns_prefix() + [sys.executable, "-m", "mdserver.ctl", "-c",
                                                    w.conf, *args],
                              capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert ctl("route", name, "--apply").returncode == 0
    assert w.record(uuid)["route"] == "openstack (pending: next cold boot)"
    assert "openstack (pending: next cold boot)" in ctl("show", uuid).stdout
    assert w.lab.domain_xml(name) == live  # the running guest is untouched
    # A cold boot: the hook registers what starts (here its POST, by hand:
    # the lab has no hook installed), and the pending mark goes.
    w.lab.virsh("destroy", name)
    w.lab.virsh("start", name)
    adminclient.call(w.admin, "POST", "/instance-upload", w.lab.domain_xml(name).encode())
    assert w.record(uuid)["route"] == "openstack"


def test_a_failed_migration_keeps_the_record_and_a_resumed_guest_is_registered(tmp_path):
    """Destination: the failed incoming domain goes away (STOPPED/FAILED, then
    UNDEFINED): its record is the source's again, not removed. Source (or
    destination after success): RESUMED/MIGRATED registers the domain, which
    makes the record this host's."""
    e, calls = offline_enroller(tmp_path)
    lv = FakeLibvirt
    failed, resumed = uuid_mac(1)[0], uuid_mac(2)[0]
    e._lifecycle(None, FakeDom(failed), lv.VIR_DOMAIN_EVENT_STOPPED,
                 lv.VIR_DOMAIN_EVENT_STOPPED_FAILED, None)
    e._lifecycle(None, FakeDom(failed), lv.VIR_DOMAIN_EVENT_UNDEFINED, 0, None)
    e._lifecycle(None, FakeDom(resumed), lv.VIR_DOMAIN_EVENT_RESUMED,
                 lv.VIR_DOMAIN_EVENT_RESUMED_MIGRATED, None)
    e._lifecycle(None, FakeDom(resumed), lv.VIR_DOMAIN_EVENT_RESUMED, 0, None)  # unpaused
    enrolled = []
    e._enroll_uuid = lambda conn, uuid: enrolled.append(uuid)
    e.conn = object()
    e.work.put(None)
    e.worker()
    assert calls == [] and enrolled == [resumed]
