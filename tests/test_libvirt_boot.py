"""Zero touch, end to end (issue 8): stock Debian 12 guests defined through a real
libvirtd with a plain domain XML, enrolled by mdserver-enroll, configured.

The libvirt lab (tests/libvirt_lab.py: private network and mount
namespaces) runs libvirtd as on a Debian host: QEMU as `libvirt-qemu`,
`dynamic_ownership = 1` (TCG). mdserver, its dnsmasq (DHCP on the lab's
bridge) and mdserver-enroll run in the lab's namespaces, as in
test_enroll.py. The guests boot the image tests/guest/build_image.py builds
(copied into the lab's directory: QEMU's user must reach it), each from a
qcow2 overlay, kernel and initrd from <os>, one interface on the lab's mds
network, a serial console to a file; nothing of mdserver's in their XML:

  A  machine pc (i440fx), the `openstack` route (the [libvirt] default), and
     the README's first-boot recipe: defined and started at once, as
     virt-install does, with only `--sysinfo 'smbios,system.product=OpenStack
     Nova'` added (<sysinfo> product + <smbios mode='sysinfo'/>)
                    -> DataSourceOpenStackLocal, cloud-id openstack
  B  machine q35, <mds:route>configdrive</mds:route> in its metadata: defined,
     started once enrolled (the enroller adds the seed CD-ROM on virtio-scsi)
                    -> DataSourceConfigDrive, cloud-id configdrive

The seeds directory and the state directory above it are 0711 and owned by
`nobody`, the image 0600 and owned by `nobody` (a daemon user that is
neither root nor libvirt-qemu): QEMU can read it only because libvirtd
chowns it at start (checked: the image's owner after `virsh start`, and
QEMU's uid). libvirt 9.0 does not give a read-only disk back at stop (its DAC
driver skips restoring read-only and shared images), so after `virsh
destroy` the image stays libvirt-qemu's, still 0600.

Timing note: with QEMU's user unable to open this host's /dev/kvm (0600
root) while libvirt's cached QEMU capabilities say `kvm`, libvirtd 9.0
re-probes QEMU's capabilities at every define (~5.5 s on an idle 2-core
host, both the user's `virsh define` and the enroller's own); the figures
printed here include that. test_enroll.py (QEMU as root) measures the
enroller itself.

Checks over SSH (from the lab's network namespace, test_guest_boot.py's
GATHER script): hostname, the served key, `cloud-init status` done without
errors, the datasource, `cloud-id`, instance-id = the domain UUID. Printed:
per guest, `virsh define` -> enrolled (the definition has its route) and
`virsh start` -> configured (cloud-init's final message on the console).
On failure the consoles and logs are copied to MDSERVER_ARTIFACTS
(default ./guest-artifacts).
"""

import json
import os
import pwd
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from daemon import ROOT, Daemon
from helpers import mds_metadata, need, need_root, write_config
from netns import start_dnsmasq
from test_enroll import HAVE_BINDING, World, route_of
from test_guest_boot import (TEMPLATE, BootLab, Guest, Route, build_image, check_facts,
                             configured, gathered, password_hash, start_gather, terminate)

try:
    from libvirt_lab import LibvirtLab, missing_prerequisites, rename_network
except ImportError:  # pragma: no cover
    LibvirtLab = None

pytestmark = pytest.mark.privileged

NETWORK_XML = os.path.join(ROOT, "etc", "libvirt", "mds-network.xml")
BOOT_TIMEOUT = float(os.environ.get("MDSERVER_GUEST_TIMEOUT", "900"))
ENROLL_TIMEOUT = 120.0  # a loaded 2-core TCG host (the 5 s bound: test_enroll.py)

# libvirt on a Debian host (libvirt-daemon-system's qemu.conf defaults), minus
# the security driver (no AppArmor in the lab): the DAC driver still runs.
DEBIAN_QEMU_CONF = """\
# mdserver test lab: QEMU as libvirt does it on Debian.
user = "libvirt-qemu"
group = "libvirt-qemu"
dynamic_ownership = 1
remember_owner = 1
security_driver = "none"
"""

A = Route("openstack", "mdt-zt-a", "3d0f6b52-7c1e-4a9b-8d2f-0a1b2c3d4e8a",
          "52:54:00:b8:00:0a", "openstack", {}, "DataSourceOpenStackLocal", "init-local",
          "openstack", None)
B = Route("configdrive", "mdt-zt-b", "3d0f6b52-7c1e-4a9b-8d2f-0a1b2c3d4e8b",
          "52:54:00:b8:00:0b", "configdrive", {}, "DataSourceConfigDrive", "init-local",
          "configdrive", None, seed=True)
MACHINE = {"openstack": "pc", "configdrive": "q35"}

# the README's first-boot flag: virt-install --sysinfo 'smbios,system.product=OpenStack Nova'
ONE_FLAG_SYSINFO = ("<sysinfo type='smbios'><system><entry name='product'>OpenStack Nova"
                    "</entry></system></sysinfo>")


def plain_guest_xml(r: Route, net: str, gdir: Path, first_boot_flag: bool) -> str:
    """What a user writes (or virt-install makes): nothing of mdserver's."""
    meta = f"<metadata>{mds_metadata(route=r.mds_route)}</metadata>" \
        if r.mds_route != "openstack" else ""
    return f"""<domain type='qemu'>
  <name>{r.name}</name>
  <uuid>{r.uuid}</uuid>
  {meta}
  <memory unit='MiB'>1024</memory>
  <vcpu>1</vcpu>
  {ONE_FLAG_SYSINFO if first_boot_flag else ""}
  <os>
    <type arch='x86_64' machine='{MACHINE[r.key]}'>hvm</type>
    <kernel>{gdir / 'vmlinuz'}</kernel>
    <initrd>{gdir / 'initrd.img'}</initrd>
    <cmdline>root=/dev/vda rw console=ttyS0</cmdline>
    {"<smbios mode='sysinfo'/>" if first_boot_flag else ""}
  </os>
  <features><acpi/><apic/></features>
  <on_reboot>destroy</on_reboot>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{gdir / (r.name + '.qcow2')}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='network'>
      <source network='{net}'/>
      <mac address='{r.mac}'/>
      <model type='virtio'/>
    </interface>
    <serial type='file'>
      <source path='{gdir / (r.name + '-console.log')}'/>
    </serial>
  </devices>
</domain>
"""


class Host:
    """What test_guest_boot's configured/start_gather/gathered need: the
    directory of the consoles and an ssh command in the lab's namespace."""
    ssh_cmd = BootLab.ssh_cmd

    def __init__(self, tmp: Path, netns: str):
        self.tmp = tmp
        self.lab = type("NS", (), {"host": netns})()


def qemu_uid(lab, name):
    pid = lab.run_in(["cat", f"/run/libvirt/qemu/{name}.pid"]).stdout.strip()
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                return int(line.split()[1])
    raise AssertionError("no Uid line")


def keep_artifacts(tmp_path, gdir, lab):
    dest = os.path.abspath(os.environ.get("MDSERVER_ARTIFACTS", "guest-artifacts"))
    os.makedirs(dest, exist_ok=True)
    for d in (tmp_path, gdir, lab.path("root/var/log/libvirt/qemu"), lab.tmpdir):
        for p in Path(d).iterdir():
            if p.is_file() and (p.suffix in (".log", ".json") or p.name.endswith(".xml")):
                shutil.copy(p, os.path.join(dest, "libvirt-boot-" + p.name))
    print(f"\nlibvirt boot test failed: consoles and logs are in {dest}", file=sys.stderr)


@pytest.fixture
def world(tmp_path, request):
    need_root()
    need(LibvirtLab is not None and not missing_prerequisites(),
         f"needs libvirt and qemu: {LibvirtLab and missing_prerequisites()}")
    need(HAVE_BINDING, "needs libvirt's Python binding (pip install libvirt-python; "
                       "apt-get install libvirt-dev pkg-config to build it)")
    for tool in ("qemu-img", "ssh", "ssh-keygen", "openssl", "dnsmasq"):
        need(shutil.which(tool) is not None, f"needs {tool}")
    t0 = time.monotonic()
    image = build_image()
    print(f"\nimage: {time.monotonic() - t0:.1f} s (cached: {image.get('cached')})")
    nobody = pwd.getpwnam("nobody")
    with LibvirtLab(qemu_conf=DEBIAN_QEMU_CONF) as lab:
        # Everything QEMU opens lives under the lab's directory (0755), not
        # under pytest's tmp (0700) or root's cache: libvirt chowns files,
        # never their directories.
        gdir = Path(lab.path("guests"))
        gdir.mkdir(mode=0o755)
        os.chmod(gdir, 0o755)
        for key, dest in (("kernel", "vmlinuz"), ("initrd", "initrd.img"),
                          ("rootfs", "rootfs.raw")):
            subprocess.run(["cp", "--sparse=always", "--reflink=auto", image[key],
                            str(gdir / dest)], check=True)
        state = Path(lab.path("state"))  # the daemon's state dir: 0711, nobody's
        seeds = state / "seeds"
        seeds.mkdir(parents=True)
        for d in (state, seeds):
            os.chown(d, nobody.pw_uid, nobody.pw_gid)
            os.chmod(d, 0o711)
        net, br = lab.name("net"), lab.name("br", 15)
        lab.define_network(rename_network(open(NETWORK_XML).read(), net, br))
        w = World(lab, tmp_path, net)
        w.gdir, w.seeds, w.nobody, w.br = gdir, seeds, nobody, br
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mdserver-test",
                        "-f", str(gdir / "id_ed25519")], check=True)
        pubkey = (gdir / "id_ed25519.pub").read_text().strip()
        w.password = password_hash()
        write_config(tmp_path, f"[public-keys]\ntest = {pubkey}\n"
                               f"[dnsmasq]\nnet_name = {net}\ninterface = {br}\n"
                               "use_dns = yes\nupstream_servers = 127.0.0.1\n"
                               f"[libvirt]\nuri = {lab.uri}\n"
                               f"[seeds]\ndir = {seeds}\n",
                     listen_address="169.254.169.254", port=80, access_log="yes",
                     logfile=str(tmp_path / "mdserver.log"),
                     password=w.password.replace("$", "$$"), default_template="base.yaml")
        (tmp_path / "userdata" / "base.yaml").write_text(TEMPLATE.format(which="base"))
        procs = []
        try:
            md = Daemon(w.conf, "169.254.169.254", 80, netns=lab.netns)
            procs.append(md)
            deadline = time.monotonic() + 30
            while not (os.path.exists(w.admin)
                       and os.path.exists(tmp_path / "dnsmasq" / "mds.conf")):
                assert md.proc.poll() is None and time.monotonic() < deadline, md.output()
                time.sleep(0.1)
            procs.append(start_dnsmasq(lab.netns, tmp_path / "dnsmasq",
                                       tmp_path / "dnsmasq.log", "--log-dhcp"))
            w.start_enroller()
            yield w
        finally:
            rep = getattr(request.node, "rep_call", None)
            failed = rep is None or rep.failed
            rc = w.stop_enroller()
            for p in reversed(procs):
                if isinstance(p, Daemon):
                    p.stop()
                else:
                    terminate(p)
            w.notify.sock.close()
            if failed:
                keep_artifacts(tmp_path, gdir, lab)
        assert rc == 0, w.output()


def test_plain_domains_enrolled_started_and_configured(world):
    w = world
    lab, gdir = w.lab, w.gdir
    host = Host(gdir, lab.netns)
    for r in (A, B):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b",
                        str(gdir / "rootfs.raw"), "-F", "raw",
                        str(gdir / f"{r.name}.qcow2")], check=True)
    times = {}
    steps = []  # (seconds since A's define, what): when each thing happened

    def mark(what):
        steps.append((round(time.monotonic() - t_def_a, 2), what))

    # Watched from another thread while this one runs virsh (a define can take
    # seconds here): when each definition has its route, and each record exists.
    enrolled_at, registered_at = {}, {}
    stop = threading.Event()

    def watch():
        while not stop.is_set() and (len(enrolled_at) < 2 or len(registered_at) < 2):
            for r in (A, B):
                if r.key not in registered_at and w.record(r.uuid) is not None:
                    registered_at[r.key] = time.monotonic()
                    mark(f"{r.name} registered")
                if r.key not in enrolled_at:
                    xml = lab.virsh("dumpxml", "--inactive", r.name, check=False)
                    if xml and route_of(xml) == r.mds_route and \
                            (not r.seed or "device='cdrom'" in xml):
                        enrolled_at[r.key] = time.monotonic()
                        mark(f"{r.name} enrolled")
            time.sleep(0.05)
    watcher = threading.Thread(target=watch, daemon=True)
    t_def_a = time.monotonic()
    watcher.start()
    try:
        # A: the first-boot recipe, define and start at once (virt-install)
        t_def_a = w.define(plain_guest_xml(A, w.net, gdir, first_boot_flag=True))
        mark("A defined")
        t_start_a = time.monotonic()
        lab.virsh("start", A.name)
        mark("A started")
        # What A's first boot got: the user's one flag only, unless the enroller
        # was faster than `virsh start` (then this run did not exercise the recipe).
        live_a = lab.domain_xml(A.name)
        flag_only = "<entry name='serial'>" not in live_a and route_of(live_a) is None
        # B: plain, q35, route configdrive; started once enrolled
        t_def_b = w.define(plain_guest_xml(B, w.net, gdir, first_boot_flag=False))
        mark("B defined")
        watcher.join(ENROLL_TIMEOUT)
        assert not watcher.is_alive(), \
            f"not enrolled and registered within {ENROLL_TIMEOUT} s: {steps}\n{w.output()}"
    finally:
        stop.set()
        watcher.join(30)
    for label, r, t in (("A", A, t_def_a), ("B", B, t_def_b)):
        times[label] = {"define_to_registered_s": round(registered_at[r.key] - t, 2),
                        "define_to_enrolled_s": round(enrolled_at[r.key] - t, 2)}
    times["A"]["first_boot_with_the_one_flag_only"] = flag_only
    xml_b = w.inactive(B.name)
    assert "virtio-scsi" in xml_b and "bus='scsi'" in xml_b, xml_b
    rec_a, rec_b = w.record(A.uuid), w.record(B.uuid)
    assert rec_a and rec_a["route"].startswith("openstack"), rec_a
    assert rec_b and rec_b["route"].startswith("configdrive"), rec_b

    # the seed image as the daemon's user left it: QEMU's user cannot read it
    image = w.seeds / f"{B.uuid}.iso"
    os.chown(image, w.nobody.pw_uid, w.nobody.pw_gid)
    st = os.stat(image)
    assert (st.st_mode & 0o777, st.st_uid) == (0o600, w.nobody.pw_uid)
    qemu_ids = lab.qemu_user_ids()
    assert qemu_ids[0] not in (0, w.nobody.pw_uid)

    t_start_b = time.monotonic()
    lab.virsh("start", B.name)
    mark("B started")
    assert os.stat(image).st_uid == qemu_ids[0], "libvirtd did not chown the seed image"
    for r in (A, B):
        assert qemu_uid(lab, r.name) == qemu_ids[0], f"{r.name}: QEMU does not run as libvirt-qemu"

    guests = {}
    for i, (r, rec, t) in enumerate(((A, rec_a, t_start_a), (B, rec_b, t_start_b))):
        g = Guest(r, rec, i)
        g.started, g.next_poll = t, t + 150
        guests[r.key] = g
    pending = dict(guests)
    gathering = {}
    while pending or gathering:
        now = time.monotonic()
        for k, g in list(pending.items()):
            if configured(host, g, now):
                g.configured = time.monotonic()
                start_gather(host, g)
                gathering[k] = pending.pop(k)
            elif now - g.started > BOOT_TIMEOUT:
                g.error = f"not configured in {BOOT_TIMEOUT:.0f} s"
                start_gather(host, g)
                gathering[k] = pending.pop(k)
        for k, g in list(gathering.items()):
            if gathered(host, g):
                gathering.pop(k)
        time.sleep(0.5)

    for key, g in guests.items():
        label = "A" if g.route is A else "B"
        times[label]["start_to_configured_s"] = \
            round(g.configured - g.started, 1) if g.configured else None
    print("\nlibvirt boot:", json.dumps(times))
    print("steps (s after A's define):", steps)

    for g in guests.values():
        check_facts(g, gdir, w.password, f"{g.name} base")
        assert g.facts["instance_id"] == g.uuid, g.facts["instance_id"]

    # Stopped, the image stays 0600. libvirt 9.0 does NOT give a read-only
    # disk back (security_dac.c skips restoring read-only and shared images:
    # another domain may still use them), so it stays libvirt-qemu's; the
    # daemon, unable to read it, writes a new one when it changes.
    lab.virsh("destroy", B.name)
    st = os.stat(image)
    print(f"seed image after virsh destroy: mode {st.st_mode & 0o777:o}, uid {st.st_uid} "
          f"(nobody {w.nobody.pw_uid}, libvirt-qemu {qemu_ids[0]})")
    assert st.st_mode & 0o777 == 0o600
    assert st.st_uid in (w.nobody.pw_uid, qemu_ids[0])
