"""Stock Debian 12 guests boot under qemu and are configured by mdserver, one per route.

Everything production has, in a network namespace of the test's own: the
bridge with 10.122.0.1/16 and 169.254.169.254/32, the mdserver daemon on
169.254.169.254:80 (access log on), its dnsmasq from the generated mds.conf,
a tap per guest. Each domain is registered once through the admin API with
its domain XML (what the libvirt hook sends), then qemu boots the image
(built offline by tests/guest/build_image.py, cloud-init's configuration
untouched) with the domain's MAC and what libvirt would give it for its
route (ROUTES below). cloud-init finds its data by its own detection
(ds-identify):

  aws          SMBIOS uuid and serial = the domain UUID, starting `ec2`;
               <mds:route>ec2</mds:route>    -> DataSourceEc2Local, init-local
  openstack    SMBIOS as nova sets it (manufacturer, product OpenStack Nova,
               serial and uuid = the UUID, family)
                                             -> DataSourceOpenStackLocal, init-local
  nocloud-net  SMBIOS serial ds=nocloud-net;s=http://169.254.169.254/nocloud/
                                             -> DataSourceNoCloudNet, init-network
  configdrive  the daemon's <seeds dir>/<uuid>.iso (label config-2) as an IDE
               (or virtio-scsi) CD-ROM, no SMBIOS hint
                                             -> DataSourceConfigDrive, init-local

At most two guests run at once (MDSERVER_GUEST_SLOTS): one starts as soon as
another has been checked. A guest is configured when its serial console
shows cloud-init's final message (or `cloud-init status` over SSH says done
or error); then one SSH session as the default user, with the key mdserver
served, gathers everything the tests check and the guest's cloud-init logs.
Each route is its own test; `-k configdrive` boots only that guest.

The run prints a report (per guest: boot to configured, the metadata
conversation's duration and its requests from mdserver's access log) and
writes it, request sequences included, to report.json in its directory (and
to MDSERVER_GUEST_REPORT if set).

Environment:
  MDSERVER_GUEST_IMAGE_DIR  use this built image (kernel, initrd, rootfs) as it is
  MDSERVER_GUEST_KEEP=1     keep the guests still up after the checks (the last
                            ones), until Enter
  MDSERVER_GUEST_ACCEL      kvm or tcg (default: kvm if it boots the kernel, else tcg)
  MDSERVER_GUEST_SLOTS      guests at once (default 2)
  MDSERVER_GUEST_CDROM      the config drive's bus: ide (default) or scsi (virtio-scsi)
  MDSERVER_GUEST_TIMEOUT    seconds from a guest's start to configured (default 600)
  MDSERVER_GUEST_REPORT     also write the report JSON here
  MDSERVER_ARTIFACTS        where to keep logs of a failed run (default ./guest-artifacts)
"""

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Dict, List, Optional
from xml.sax.saxutils import escape

import pytest

from helpers import mds_metadata, need, need_root, write_config
from daemon import Daemon
from mdserver import adminclient
from netns import Lab, exec_in, start_dnsmasq

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "guest"))
from build_image import build_image  # noqa: E402

pytestmark = pytest.mark.privileged

USER = "debian"  # Debian's default user, whom cloud-init gives the keys and password
METADATA_URL = "http://169.254.169.254"
NOCLOUD_SERIAL = f"ds=nocloud-net;s={METADATA_URL}/nocloud/"
NOVA_SMBIOS = {"manufacturer": "OpenStack Foundation", "product": "OpenStack Nova",
               "family": "Virtual Machine"}


@dataclasses.dataclass(frozen=True)
class Route:
    key: str  # the test's id and the report's
    name: str  # domain name
    uuid: str
    mac: str
    mds_route: str  # <mds:route>
    smbios: Dict[str, str]  # SMBIOS type 1 (system) beyond uuid: <sysinfo> and qemu -smbios
    datasource: str  # what result.json's datasource starts with
    stage: str  # the stage that found it: init-local, or init-network (after DHCP)
    cloud_id: str  # what `cloud-id` prints
    template: Optional[str]  # <mds:template>; None: the default template
    seed: bool = False  # boots with its <seeds dir>/<uuid>.iso as a CD-ROM


AWS_UUID = "ec2b0001-5d1c-4f3e-9a8b-1c2d3e4f5a01"  # the AWS route: starts with ec2
NOVA_UUID = "3d0f6b52-7c1e-4a9b-8d2f-0a1b2c3d4e02"
ROUTES = [
    Route("aws", "mdt-aws", AWS_UUID, "52:54:00:b0:00:01", "ec2", {"serial": AWS_UUID},
          "DataSourceEc2Local", "init-local", "aws", None),
    Route("openstack", "mdt-openstack", NOVA_UUID, "52:54:00:b0:00:02", "openstack",
          {**NOVA_SMBIOS, "serial": NOVA_UUID}, "DataSourceOpenStackLocal", "init-local",
          "openstack", "openstack.yaml"),
    Route("nocloud-net", "mdt-nocloud", "3d0f6b52-7c1e-4a9b-8d2f-0a1b2c3d4e03",
          "52:54:00:b0:00:03", "nocloud-net", {"serial": NOCLOUD_SERIAL},
          "DataSourceNoCloudNet", "init-network", "nocloud", "nocloud-net.yaml"),
    Route("configdrive", "mdt-configdrive", "3d0f6b52-7c1e-4a9b-8d2f-0a1b2c3d4e04",
          "52:54:00:b0:00:04", "configdrive", {}, "DataSourceConfigDrive", "init-local",
          "configdrive", "configdrive.yaml", seed=True),
]
# The EC2 face's instance-id for an AWS-route guest; every other route's is the UUID.
EC2_INSTANCE_ID = re.compile(r"^i-[0-9a-f]{17}$")

TEMPLATE = """#cloud-config
password: '{{{{!mdserver_password}}}}'
chpasswd:
  expire: false
ssh_pwauth: true
write_files:
  - path: /var/tmp/mdserver-marker
    content: "{{{{name}}}} {which}"
"""
# The seed image's CD-ROM, on the bus MDSERVER_GUEST_CDROM names. The machine
# is i440fx (`pc`), whose IDE controller is built in. Debian's cloud kernel has
# ata_piix, virtio_scsi and sr_mod in its initramfs (ds-identify looks for the
# label from a systemd generator, before udev runs on the real root), but no
# AHCI driver at all: on q35 a SATA CD-ROM (libvirt's default bus for a cdrom
# there) stays invisible, and ds-identify disables cloud-init.
CDROM_XML = {  # what follows <source> in the <disk>, and a controller if one is needed
    "ide": "<target dev='hdc' bus='ide'/><readonly/></disk>",
    "scsi": "<target dev='sda' bus='scsi'/><readonly/></disk>"
            "<controller type='scsi' index='0' model='virtio-scsi'/>",
}


def cdrom_args(bus, path):
    """qemu's arguments for what CDROM_XML[bus] makes libvirt start."""
    drive = f"file={path},format=raw,media=cdrom,readonly=on"
    if bus == "ide":  # hdc: the secondary master
        return ["-drive", f"{drive},if=ide,index=2"]
    return ["-device", "virtio-scsi-pci,id=scsi0", "-drive", f"{drive},if=none,id=cd0",
            "-device", "scsi-cd,drive=cd0,bus=scsi0.0"]


CDROM_BUS = os.environ.get("MDSERVER_GUEST_CDROM", "ide")
BOOT_TIMEOUT = float(os.environ.get("MDSERVER_GUEST_TIMEOUT", "600"))
SLOTS = int(os.environ.get("MDSERVER_GUEST_SLOTS", "2"))
FINISHED = re.compile(r"Cloud-init v\. \S+ finished at ")
# `cloud-init status` over SSH, for a final message the console lacks: from
# this long after a guest's start, this often
SSH_POLL_FIRST_S, SSH_POLL_S = 150, 20
GATHER_TIMEOUT = 180
KVM_SILENT_S = 3
# cloud-init.log: which stage found the datasource
FOUND = re.compile(r"finish: ([\w-]+)/search-\S+: SUCCESS: found \w+ data from (\w+)")

# Run in the guest as root (sudo python3 -): everything the checks need, in
# one SSH session, and the logs kept as artifacts.
GATHER = r"""
import json, subprocess
def run(*cmd):
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       universal_newlines=True)
    return r.stdout
def read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError as e:
        return "<" + str(e) + ">"
print(json.dumps({
    "hostname": run("hostname").strip(),
    "addresses": run("ip", "-4", "-o", "addr", "show"),
    "status": run("cloud-init", "status", "--long"),
    "result": read("/run/cloud-init/result.json"),
    "status_json": read("/run/cloud-init/status.json"),
    "shadow": run("getent", "shadow", "@USER@").strip(),
    "marker": read("/var/tmp/mdserver-marker").strip(),
    "cloud_id": run("cloud-id").strip(),
    "instance_id": read("/var/lib/cloud/data/instance-id").strip(),
    "logs": {"cloud-init.log": read("/var/log/cloud-init.log"),
             "cloud-init-output.log": read("/var/log/cloud-init-output.log"),
             "ds-identify.log": read("/run/cloud-init/ds-identify.log")},
}))
""".replace("@USER@", USER)


def qemu_binary():
    return shutil.which("qemu-system-x86_64")


def password_hash():
    return subprocess.run(["openssl", "passwd", "-6", "-salt", "mdserverTest",
                           "guest-password"], capture_output=True, text=True,
                          check=True).stdout.strip()


def guest_domain_xml(route: Route, seed_path: str) -> str:
    """The domain XML libvirt would hold for this guest (what the hook
    sends): its <sysinfo> for the route, mdserver's <metadata>, the seed
    image as a CD-ROM on the config-drive route."""
    meta = {"route": route.mds_route}
    if route.template:
        meta["template"] = route.template
    entries = {"uuid": route.uuid, **route.smbios} if route.smbios else {}
    order = ("manufacturer", "product", "version", "serial", "uuid", "sku", "family")
    sysinfo = "".join(f"<entry name='{k}'>{escape(entries[k])}</entry>"
                      for k in order if k in entries)
    sysinfo = f"<sysinfo type='smbios'><system>{sysinfo}</system></sysinfo>" if sysinfo else ""
    smbios = "<smbios mode='sysinfo'/>" if sysinfo else ""
    cdrom = ""
    if route.seed:
        cdrom = (f"<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>"
                 f"<source file='{escape(seed_path)}'/>{CDROM_XML[CDROM_BUS]}")
    return f"""<domain type='qemu'>
  <name>{route.name}</name>
  <uuid>{route.uuid}</uuid>
  <metadata>{mds_metadata(**meta)}</metadata>
  <memory unit='MiB'>1024</memory>
  <vcpu>1</vcpu>
  {sysinfo}
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    {smbios}
  </os>
  <devices>
    <interface type='network'>
      <mac address='{route.mac}'/>
      <source network='mds'/>
      <model type='virtio'/>
    </interface>
    {cdrom}
  </devices>
</domain>
"""


def qemu_smbios(route: Route) -> List[str]:
    """-smbios type=1,... as libvirt makes it from the <sysinfo> above."""
    if not route.smbios:
        return []
    fields = {**route.smbios, "uuid": route.uuid}
    return ["-smbios", "type=1," + ",".join(f"{k}={v.replace(',', ',,')}"
                                            for k, v in fields.items())]


class Guest:
    def __init__(self, route: Route, record: dict, index: int):
        self.route, self.record, self.index = route, record, index
        self.name, self.uuid, self.mac = route.name, route.uuid, route.mac
        self.ip, self.hostname = record["ip"], record["hostname"]
        self.proc = None
        self.poll = None  # a running `cloud-init status` over SSH
        self.next_poll = 0.0
        self.started = self.configured = None
        self.facts: Optional[dict] = None
        self.error: Optional[str] = None
        self.requests: List[tuple] = []
        self.seed = None  # the seed image's path, on the config-drive route
        self.gather = None  # the SSH session gathering the facts
        self.gather_s: Optional[float] = None  # from configured to gathered

    @property
    def console(self):
        return f"{self.name}-console.log"


class BootLab:
    """The namespace, daemon, dnsmasq and qemu processes of one run; torn down by close()."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.lab = Lab()
        self.procs = []
        self.guests: List[Guest] = []
        self.failed = False
        self.report = None

    def ssh_cmd(self, guest, command):
        return exec_in(self.lab.host, [
            "ssh", "-i", str(self.tmp / "id_ed25519"), "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
            "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR", f"{USER}@{guest.ip}",
            command])

    def ssh(self, guest, command, timeout=60, check=True, input=None):
        r = subprocess.run(self.ssh_cmd(guest, command), capture_output=True, text=True,
                           timeout=timeout, input=input)
        if check and r.returncode != 0:
            raise AssertionError(f"ssh {guest.name} {command!r}: {r.returncode} {r.stderr}")
        return r.stdout

    def stop(self, guest):
        """Our qemu, by its PID; the overlay goes with the run's directory."""
        for p in (guest.poll, guest.gather, guest.proc):
            if p is not None:
                terminate(p)

    def close(self):
        for g in self.guests:
            self.stop(g)
        for p in reversed(self.procs):  # ours only, by PID
            if isinstance(p, Daemon):
                p.stop()
            else:
                terminate(p)
        self.lab.close()


def terminate(p):
    """SIGTERM one child of ours, SIGKILL after 10 s."""
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def accel(kernel, initrd, tmp):
    """kvm where it really boots a kernel here, else tcg (software). A
    /dev/kvm that boots nothing (broken nested virtualisation: qemu runs and
    the guest never prints) is given up on after KVM_SILENT_S without a byte
    on the console (earlyprintk: a working KVM prints within a second)."""
    wanted = os.environ.get("MDSERVER_GUEST_ACCEL")
    if wanted:
        return wanted
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    log = tmp / "kvm-probe.log"
    p = subprocess.Popen([qemu_binary(), "-accel", "kvm", "-m", "256", "-nodefaults",
                          "-display", "none", "-no-reboot", "-kernel", kernel,
                          "-initrd", initrd,
                          "-append", "console=ttyS0 earlyprintk=serial,ttyS0 panic=-1",
                          "-serial", f"file:{log}"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    started = time.monotonic()
    ok = False
    while time.monotonic() < started + 20 and p.poll() is None:
        text = log.read_text(errors="replace") if log.exists() else ""
        if "Run /init" in text:
            ok = True
            break
        if not text and time.monotonic() > started + KVM_SILENT_S:
            break
        time.sleep(0.2)
    if p.poll() is None:
        p.kill()
    p.wait()
    return "kvm" if ok else "tcg"


def selected_routes(request):
    """The routes whose tests this session runs (after -k / node-id selection)."""
    keys = {item.callspec.params["key"] for item in request.session.items
            if item.module is sys.modules[__name__] and hasattr(item, "callspec")
            and "key" in item.callspec.params}
    return [r for r in ROUTES if r.key in keys] or ROUTES


@pytest.fixture(scope="module")
def booted(tmp_path_factory, request):
    """Every selected route's guest booted, gathered over SSH and stopped;
    the facts stay on each Guest for the per-route tests."""
    need_root()
    for tool in ("qemu-system-x86_64", "qemu-img", "dnsmasq", "ssh", "ssh-keygen", "openssl"):
        need(shutil.which(tool) is not None, f"needs {tool}")
    t0 = time.monotonic()
    tmp = tmp_path_factory.mktemp("guest-boot")
    image_dir = os.environ.get("MDSERVER_GUEST_IMAGE_DIR")
    if image_dir:
        image = {"kernel": os.path.join(image_dir, "vmlinuz"),
                 "initrd": os.path.join(image_dir, "initrd.img"),
                 "rootfs": os.path.join(image_dir, "rootfs.raw"), "cached": True}
    else:
        image = build_image()
    image["seconds_here"] = time.monotonic() - t0
    b = BootLab(tmp)
    b.image = image
    try:
        boot_all(b, selected_routes(request))
        b.report["wall_s"] = round(time.monotonic() - t0, 1)
        write_report(b)
        yield b
    except BaseException:
        b.failed = True
        raise
    finally:
        try:
            if b.failed:
                keep_artifacts(b)
            if os.environ.get("MDSERVER_GUEST_KEEP") == "1":
                keep_guests(b)
        finally:
            b.close()


def keep_guests(b):
    print("\nGuests still up. From the host namespace:")
    for g in b.guests:
        if g.proc is not None and g.proc.poll() is None:
            print(f"  ip netns exec {b.lab.host} ssh -i {b.tmp}/id_ed25519 "
                  f"-o StrictHostKeyChecking=no {USER}@{g.ip}   # {g.route.key}")
    try:
        input("Press Enter to tear everything down. ")
    except EOFError:  # no terminal (pytest without -s, or stdin closed)
        pass


@pytest.fixture
def lab(booted, request):
    """The booted lab; a failing test marks the run failed (artifacts are kept)."""
    yield booted
    rep = getattr(request.node, "rep_call", None)
    if rep is None or rep.failed:
        booted.failed = True


def start_lab(b):
    """Keys, configuration, templates, the daemon; returns the admin socket path."""
    tmp = b.tmp
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mdserver-test",
                    "-f", str(tmp / "id_ed25519")], check=True)
    b.pubkey = (tmp / "id_ed25519.pub").read_text().strip()
    b.password = password_hash()
    conf = write_config(
        tmp, f"[public-keys]\ntest = {b.pubkey}\n"
             f"[dnsmasq]\ninterface = {b.lab.bridge}\nuse_dns = yes\n"
             "upstream_servers = 127.0.0.1\n",
        listen_address="169.254.169.254", port=80, access_log="yes",
        logfile=str(tmp / "mdserver.log"), password=b.password.replace("$", "$$"),
        default_template="base.yaml")
    (tmp / "userdata" / "base.yaml").write_text(TEMPLATE.format(which="base"))
    for r in ROUTES:
        if r.template:
            (tmp / "userdata" / r.template).write_text(TEMPLATE.format(which=r.key))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp / "notify.sock"))
    notify.settimeout(30)
    d = Daemon(conf, "169.254.169.254", 80, env={"NOTIFY_SOCKET": str(tmp / "notify.sock")},
               netns=b.lab.host)
    b.procs.append(d)
    try:
        assert notify.recv(256).startswith(b"READY=1\nSTATUS=serving"), d.output()
    finally:
        notify.close()
    return str(tmp / "admin.sock")


def boot_all(b, routes):
    tmp = b.tmp
    admin = start_lab(b)
    seeds = tmp / "seeds"  # [seeds] dir's default: seeds/ beside db_file
    # register as the hook does: the domain XML through the admin socket
    for i, r in enumerate(routes):
        seed = seeds / f"{r.uuid}.iso"
        record = adminclient.call(admin, "POST", "/instance-upload",
                                  guest_domain_xml(r, str(seed)).encode())
        assert record["route"] == r.mds_route, record
        g = Guest(r, record, i)
        g.seed = seed if r.seed else None
        b.guests.append(g)
    for g in b.guests:
        if g.seed is not None:
            assert g.seed.is_file(), f"the daemon wrote no seed image {g.seed}"

    b.procs.append(start_dnsmasq(b.lab.host, tmp / "dnsmasq", tmp / "dnsmasq.log",
                                 "--log-dhcp"))
    img = b.image
    b.mode = accel(img["kernel"], img["initrd"], tmp)
    run_guests(b)
    for g in b.guests:
        g.requests = access_log(tmp / "mdserver.log", g.ip)
    b.report = make_report(b)


def start_guest(b, g):
    tmp, img = b.tmp, b.image
    overlay = tmp / f"{g.name}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", img["rootfs"],
                    "-F", "raw", str(overlay)], check=True)
    tap = f"mdtap{g.index}{b.lab.tag}"
    subprocess.run(["ip", "-n", b.lab.host, "tuntap", "add", "dev", tap, "mode", "tap"],
                   check=True)
    subprocess.run(["ip", "-n", b.lab.host, "link", "set", tap, "master", b.lab.bridge,
                    "up"], check=True)
    cmd = [qemu_binary(), "-name", g.name, "-machine", "pc", "-accel", b.mode,
           "-m", "1024", "-smp", "1", "-nodefaults", "-display", "none", "-no-user-config",
           "-kernel", img["kernel"], "-initrd", img["initrd"],
           "-append", "root=/dev/vda rw console=ttyS0",
           "-drive", f"file={overlay},if=virtio,format=qcow2",
           "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
           "-device", f"virtio-net-pci,netdev=n0,mac={g.mac}",
           "-uuid", g.uuid, *qemu_smbios(g.route),
           "-serial", f"file:{tmp / g.console}"]
    if g.seed is not None:
        cmd += cdrom_args(CDROM_BUS, g.seed)
    if b.mode == "tcg":
        cmd += ["-cpu", "max"]
    g.proc = subprocess.Popen(exec_in(b.lab.host, cmd), stdout=subprocess.DEVNULL,
                              stderr=open(tmp / f"{g.name}-qemu.log", "wb"))
    g.started = time.monotonic()
    g.next_poll = g.started + SSH_POLL_FIRST_S


def configured(b, g, now):
    """True once cloud-init has finished: its final message on the console,
    or (a fallback, late and rare: every SSH login costs a TCG guest seconds
    of CPU) `cloud-init status` over SSH saying done or error."""
    console = b.tmp / g.console
    if console.exists() and FINISHED.search(console.read_text(errors="replace")):
        return True
    if g.poll is not None and g.poll.poll() is None and now >= g.next_poll:
        # An SSH attempt that hangs (a loaded machine) means "not yet": end it
        # and ask again later, never fail the run for it.
        g.poll.kill()
        g.poll.wait()
        g.poll = None
    if g.poll is not None and g.poll.poll() is not None:
        out = g.poll.stdout.read()
        g.poll = None
        if "status: done" in out or "status: error" in out:
            return True
    if g.poll is None and now >= g.next_poll:
        g.next_poll = now + SSH_POLL_S
        g.poll = subprocess.Popen(b.ssh_cmd(g, "cloud-init status"), stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True)
    return False


def start_gather(b, g):
    """One SSH session, in the background: the facts, and the guest's
    cloud-init logs (kept beside the consoles)."""
    if g.poll is not None and g.poll.poll() is None:
        g.poll.kill()
        g.poll.wait()
    g.poll = None
    out = open(b.tmp / f"{g.name}-gather.json", "w+")
    g.gather = subprocess.Popen(b.ssh_cmd(g, "sudo python3 -"), stdin=subprocess.PIPE,
                                stdout=out, stderr=subprocess.PIPE, text=True)
    g.gather.stdin.write(GATHER)
    g.gather.stdin.close()
    g.gather_out = out
    g.gather_deadline = time.monotonic() + GATHER_TIMEOUT


def gathered(b, g):
    """None while the session runs; then True, with g.facts or g.error set."""
    if g.gather.poll() is None:
        if time.monotonic() < g.gather_deadline:
            return None
        g.gather.kill()
        g.gather.wait()
    g.gather_out.seek(0)
    text = g.gather_out.read()
    g.gather_out.close()
    try:
        facts = json.loads(text)
    except ValueError:
        failed = f"gathering over SSH failed ({g.gather.returncode}): " \
            f"{g.gather.stderr.read().strip()} {text[-500:]}"
        g.error = f"{g.error}; {failed}" if g.error else failed
        return True
    found = FOUND.search(facts["logs"]["cloud-init.log"])
    facts["found"] = list(found.groups()) if found else None
    for name, log in facts.pop("logs").items():
        (b.tmp / f"{g.name}-{name}").write_text(log)
    if g.error is None:
        g.facts = facts
    g.gather_s = time.monotonic() - g.configured if g.configured else None
    return True


def run_guests(b):
    """Boot the guests, at most SLOTS at once. A configured guest is
    gathered (in the background); then, if another waits for its slot, it is
    stopped and the next one starts at once."""
    waiting = list(b.guests)
    running: List[Guest] = []
    while waiting or running:
        while waiting and len(running) < SLOTS:
            g = waiting.pop(0)
            start_guest(b, g)
            running.append(g)
        now = time.monotonic()
        for g in list(running):
            if g.gather is not None:
                if not gathered(b, g):
                    continue
            elif g.proc.poll() is not None:
                g.error = f"qemu exited with {g.proc.returncode}"
            elif configured(b, g, now):
                g.configured = time.monotonic()
                start_gather(b, g)
                continue
            elif now - g.started > BOOT_TIMEOUT:
                g.error = f"not configured in {BOOT_TIMEOUT:.0f} s"
                start_gather(b, g)  # what cloud-init logged, if SSH works at all
                continue
            else:
                continue
            running.remove(g)
            if waiting or g.error:
                b.stop(g)
            if waiting:
                start_guest(b, waiting[0])
                running.append(waiting.pop(0))
        time.sleep(0.25)


def access_log(path, ip):
    """(time, method, path, status, token?) of every request `ip` made, in order."""
    out = []
    for line in path.read_text().splitlines():
        # the line's own words, then (after a space) its key=value fields
        m = re.match(r"^(\S+ \S+) INFO mdserver\.access: (\S+) (\S+) (\S+) (\S+) "
                     r"token=(\w+)( |$)", line)
        if m and m.group(2) == ip:
            t = time.mktime(time.strptime(m.group(1).split(",")[0], "%Y-%m-%d %H:%M:%S")) \
                + int(m.group(1).split(",")[1]) / 1000
            out.append((t, m.group(3), m.group(4), m.group(5), m.group(6) == "yes"))
    return out


def make_report(b):
    guests = {}
    for g in b.guests:
        reqs = g.requests
        entry = {"route": g.route.key, "uuid": g.uuid,
                 "boot_to_configured_s": round(g.configured - g.started, 1)
                 if g.configured else None,
                 "metadata_conversation_s": round(reqs[-1][0] - reqs[0][0], 2)
                 if reqs else None,
                 "requests": len(reqs),
                 "gather_s": round(g.gather_s, 1) if g.gather_s else None}
        if g.facts:
            result = json.loads(g.facts["result"]).get("v1", {}) \
                if g.facts["result"].startswith("{") else {}
            entry.update(datasource=result.get("datasource"), found=g.facts["found"],
                         cloud_id=g.facts["cloud_id"],
                         instance_id=g.facts["instance_id"],
                         cloud_init_stages_s=stage_seconds(g.facts["status_json"]))
        if g.error:
            entry["error"] = g.error
        entry["sequence"] = [f"{m} {p} {s}" for _, m, p, s, _ in reqs]
        guests[g.route.key] = entry
    img = b.image
    return {"accel": b.mode, "slots": SLOTS, "image_seconds": round(img["seconds_here"], 1),
            "image_cached": img.get("cached"), "guests": guests}


def stage_seconds(status_json):
    """cloud-init's own stage durations (guest clock), from /run/cloud-init/status.json."""
    try:
        v1 = json.loads(status_json)["v1"]
    except (ValueError, KeyError, TypeError):
        return None
    out = {}
    for stage in ("init-local", "init", "modules-config", "modules-final"):
        s = v1.get(stage) or {}
        if s.get("start") and s.get("finished"):
            out[stage] = round(s["finished"] - s["start"], 1)
    return out


def write_report(b):
    report = b.report
    summary = {**report, "guests": {k: {n: v for n, v in e.items() if n != "sequence"}
                                    for k, e in report["guests"].items()}}
    print("\nguest boot:", json.dumps(summary))
    for key, e in report["guests"].items():
        print(f"requests of {key}: " + (", ".join(e["sequence"]) or "none"))
    text = json.dumps(report, indent=1) + "\n"
    (b.tmp / "report.json").write_text(text)
    if os.environ.get("MDSERVER_GUEST_REPORT"):
        with open(os.environ["MDSERVER_GUEST_REPORT"], "w") as f:
            f.write(text)


def keep_artifacts(b):
    dest = os.path.abspath(os.environ.get("MDSERVER_ARTIFACTS", "guest-artifacts"))
    os.makedirs(dest, exist_ok=True)
    for g in b.guests:  # a guest still up whose logs were not gathered
        if g.proc is not None and g.proc.poll() is None and \
                not (b.tmp / f"{g.name}-cloud-init.log").exists():
            try:
                log = b.ssh(g, "sudo cat /var/log/cloud-init.log", timeout=20, check=False)
                (b.tmp / f"{g.name}-cloud-init.log").write_text(log)
            except (subprocess.TimeoutExpired, OSError):
                pass
    for path in b.tmp.iterdir():
        if path.suffix == ".log" or path.name in ("report.json", "mdserver.conf.stderr"):
            shutil.copy(path, dest)
    print(f"\nguest boot test failed: console logs, mdserver.log, dnsmasq.log and the "
          f"guests' cloud-init logs are in {dest}", file=sys.stderr)


# -- the checks, one test per route --------------------------------------------

def guest_of(lab, key) -> Guest:
    for g in lab.guests:
        if g.route.key == key:
            return g
    pytest.skip(f"route {key} not booted in this session")


@pytest.mark.parametrize("key", [r.key for r in ROUTES])
def test_stock_guest_is_configured(lab, key):
    g = guest_of(lab, key)
    r = g.route
    check_facts(g, lab.tmp, lab.password, f"{g.name} {r.key if r.template else 'base'}")
    f = g.facts
    if r.mds_route == "ec2":
        assert EC2_INSTANCE_ID.match(f["instance_id"]), f["instance_id"]
        assert f["instance_id"] == g.record["instance_id"]
    else:
        assert f["instance_id"] == g.uuid == g.record["instance_id"]
    check_requests(r, [(m, p, s, tok) for _, m, p, s, tok in g.requests])


def check_facts(g, tmp, password, marker):
    """What a configured guest must show over SSH (gathered as USER with the
    key mdserver served, then sudo): its name, address, cloud-init done with
    its route's datasource and no error, the password, the template's marker."""
    r = g.route
    assert g.error is None, f"{g.name}: {g.error} (console: {tmp / g.console})"
    f = g.facts
    assert f["hostname"] == g.hostname, (f["hostname"], g.hostname)
    assert f"inet {g.ip}/16" in f["addresses"], f["addresses"]
    assert "status: done" in f["status"], f["status"]
    result = json.loads(f["result"])["v1"]
    assert result["errors"] == [], result
    assert result["datasource"].startswith(r.datasource), result
    assert f["found"] == [r.stage, r.datasource], f["found"]
    assert f["shadow"].split(":")[1] == password
    assert f["marker"] == marker
    assert f["cloud_id"] == r.cloud_id, f["cloud_id"]


def check_requests(route, seen):
    """What each route's datasource asked mdserver (22.4.2), from the access log."""
    calls = [(m, p, s) for m, p, s, _ in seen]
    if route.key == "aws":
        assert calls[0] == ("PUT", "/latest/api/token", "200"), calls[:3]
        assert all(tok for *_, tok in seen[1:]) and len(seen) > 20
        assert all(s == "200" for _, _, s in calls), [c for c in calls if c[2] != "200"]
    elif route.key == "openstack":
        # the probe, the version listing, the dated files, then the EC2 crawl
        assert calls[:2] == [("GET", "/openstack", "200")] * 2, calls[:3]
        assert any(p.startswith("/openstack/") and p.endswith("/meta_data.json")
                   for _, p, _ in calls), calls
        assert all(s == "200" for _, _, s in calls), [c for c in calls if c[2] != "200"]
    elif route.key == "nocloud-net":
        assert [p for _, p, _ in calls[:3]] == \
            ["/nocloud/meta-data", "/nocloud/user-data", "/nocloud/vendor-data"], calls
        assert all(s == "200" for _, _, s in calls), calls
    elif route.key == "configdrive":
        # everything comes from the CD-ROM: no metadata request at all
        assert calls == [], calls
