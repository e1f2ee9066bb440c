"""A stock Debian 12 guest boots under qemu and is configured by mdserver.

Everything production has, in a network namespace of the test's own: the
bridge with 10.122.0.1/16 and 169.254.169.254/32, the mdserver daemon on
169.254.169.254:80, its dnsmasq from the generated mds.conf, a tap per
guest. Domains are registered through the admin API with their domain XML
(what the libvirt hook sends), then qemu boots the image (built offline by
tests/guest/build_image.py, cloud-init's configuration untouched) with the
domain's MAC and the AWS route: SMBIOS UUID and serial starting `ec2`.
cloud-init finds mdserver by its own detection.

Two guests boot at once; the second chooses its own template in its
<metadata>. Checks run over SSH with the key mdserver served.

Environment:
  MDSERVER_GUEST_IMAGE_DIR  use this built image (kernel, initrd, rootfs) as it is
  MDSERVER_GUEST_KEEP=1     keep the guests up after the checks, until Enter
  MDSERVER_GUEST_ACCEL      kvm or tcg (default: kvm if it boots the kernel, else tcg)
  MDSERVER_ARTIFACTS        where to keep logs of a failed run (default ./guest-artifacts)
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from helpers import domain_xml, mds_metadata, need, need_root, write_config
from daemon import Daemon
from mdserver import adminclient
from netns import Lab, exec_in, start_dnsmasq

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "guest"))
from build_image import build_image  # noqa: E402

pytestmark = pytest.mark.privileged

USER = "debian"  # Debian's default user, whom cloud-init gives the keys and password
GUESTS = [
    # name, uuid (the AWS route: starts with ec2), mac, template in <metadata>
    ("mdt-alpha", "ec2b0001-5d1c-4f3e-9a8b-1c2d3e4f5a01", "52:54:00:b0:00:01", None),
    ("mdt-beta", "ec2b0002-5d1c-4f3e-9a8b-1c2d3e4f5a02", "52:54:00:b0:00:02", "second.yaml"),
]
TEMPLATE = """#cloud-config
password: '{{{{!mdserver_password}}}}'
chpasswd:
  expire: false
ssh_pwauth: true
write_files:
  - path: /var/tmp/mdserver-marker
    content: "{{{{name}}}} {which}"
"""
BOOT_TIMEOUT = float(os.environ.get("MDSERVER_GUEST_TIMEOUT", "600"))


def qemu_binary():
    return shutil.which("qemu-system-x86_64")


def password_hash():
    return subprocess.run(["openssl", "passwd", "-6", "-salt", "mdserverTest",
                           "guest-password"], capture_output=True, text=True,
                          check=True).stdout.strip()


class Guest:
    def __init__(self, name, uuid, mac, template, record):
        self.name, self.uuid, self.mac, self.template = name, uuid, mac, template
        self.ip, self.hostname = record["ip"], record["hostname"]
        self.proc = None
        self.started = self.configured = None


class BootLab:
    """The namespace, daemon, dnsmasq and qemu processes of one run; torn down by close()."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.lab = Lab()
        self.procs = []
        self.guests = []

    def ssh(self, guest, command, timeout=60, check=True):
        r = subprocess.run(exec_in(self.lab.host, [
            "ssh", "-i", str(self.tmp / "id_ed25519"), "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
            "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR", f"{USER}@{guest.ip}",
            command]), capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"ssh {guest.name} {command!r}: {r.returncode} {r.stderr}")
        return r.stdout

    def close(self):
        for p in self.procs:  # ours only, by PID
            if isinstance(p, Daemon):
                p.stop()
            elif p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.lab.close()


def accel(kernel, initrd, tmp):
    """kvm where it really boots a kernel here, else tcg (software)."""
    wanted = os.environ.get("MDSERVER_GUEST_ACCEL")
    if wanted:
        return wanted
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    log = tmp / "kvm-probe.log"
    p = subprocess.Popen([qemu_binary(), "-accel", "kvm", "-m", "256", "-nodefaults",
                          "-display", "none", "-no-reboot", "-kernel", kernel,
                          "-initrd", initrd, "-append", "console=ttyS0 panic=-1",
                          "-serial", f"file:{log}"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    ok = False
    while time.monotonic() < deadline and p.poll() is None:
        if log.exists() and "Run /init" in log.read_text(errors="replace"):
            ok = True
            break
        time.sleep(0.2)
    if p.poll() is None:
        p.kill()
    p.wait()
    return "kvm" if ok else "tcg"


@pytest.fixture
def boot(tmp_path, request):
    need_root()
    for tool in ("qemu-system-x86_64", "qemu-img", "dnsmasq", "ssh", "ssh-keygen", "openssl"):
        need(shutil.which(tool) is not None, f"needs {tool}")
    image_dir = os.environ.get("MDSERVER_GUEST_IMAGE_DIR")
    t0 = time.monotonic()
    if image_dir:
        image = {"kernel": os.path.join(image_dir, "vmlinuz"),
                 "initrd": os.path.join(image_dir, "initrd.img"),
                 "rootfs": os.path.join(image_dir, "rootfs.raw"), "cached": True}
    else:
        image = build_image()
    image["seconds_here"] = time.monotonic() - t0
    b = BootLab(tmp_path)
    b.image = image
    try:
        yield b
    finally:
        failed = getattr(request.node, "rep_call", None) is None or request.node.rep_call.failed
        if failed:
            keep_artifacts(b, tmp_path)
        if os.environ.get("MDSERVER_GUEST_KEEP") == "1":
            print("\nGuests are up. From the host namespace:")
            for g in b.guests:
                print(f"  ip netns exec {b.lab.host} ssh -i {tmp_path}/id_ed25519 "
                      f"-o StrictHostKeyChecking=no {USER}@{g.ip}")
            input("Press Enter to tear everything down. ")
        b.close()


def keep_artifacts(b, tmp_path):
    dest = os.path.abspath(os.environ.get("MDSERVER_ARTIFACTS", "guest-artifacts"))
    os.makedirs(dest, exist_ok=True)
    for g in b.guests:
        try:
            log = b.ssh(g, "sudo cat /var/log/cloud-init.log", timeout=20, check=False)
            (tmp_path / f"{g.name}-cloud-init.log").write_text(log)
        except (subprocess.TimeoutExpired, OSError):
            pass
    for path in tmp_path.iterdir():
        if path.suffix in (".log",) or path.name.endswith("console.log"):
            shutil.copy(path, dest)
    print(f"\nguest boot test failed: console logs, mdserver.log, dnsmasq.log and the "
          f"guests' cloud-init.log are in {dest}", file=sys.stderr)


def access_log(path, ip):
    """(time, method, path, status, token?) of every request `ip` made, in order."""
    out = []
    for line in path.read_text().splitlines():
        m = re.match(r"^(\S+ \S+) INFO mdserver\.access: (\S+) (\S+) (\S+) (\d+) token=(\w+)$",
                     line)
        if m and m.group(2) == ip:
            t = time.mktime(time.strptime(m.group(1).split(",")[0], "%Y-%m-%d %H:%M:%S")) \
                + int(m.group(1).split(",")[1]) / 1000
            out.append((t, m.group(3), m.group(4), m.group(5), m.group(6) == "yes"))
    return out


def test_two_stock_guests_boot_and_are_configured(boot):
    b, tmp = boot, boot.tmp
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mdserver-test",
                    "-f", str(tmp / "id_ed25519")], check=True)
    pubkey = (tmp / "id_ed25519.pub").read_text().strip()
    pw = password_hash()
    conf = write_config(
        tmp, f"[public-keys]\ntest = {pubkey}\n"
             f"[dnsmasq]\ninterface = {b.lab.bridge}\nuse_dns = yes\n"
             "upstream_servers = 127.0.0.1\n",
        listen_address="169.254.169.254", port=80, access_log="yes",
        logfile=str(tmp / "mdserver.log"), password=pw.replace("$", "$$"),
        default_template="base.yaml")
    (tmp / "userdata" / "base.yaml").write_text(TEMPLATE.format(which="base"))
    (tmp / "userdata" / "second.yaml").write_text(TEMPLATE.format(which="second"))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp / "notify.sock"))
    notify.settimeout(30)
    d = Daemon(conf, "169.254.169.254", 80, env={"NOTIFY_SOCKET": str(tmp / "notify.sock")},
               netns=b.lab.host)
    b.procs.append(d)
    assert notify.recv(256).startswith(b"READY=1\nSTATUS=serving"), d.output()
    notify.close()

    # register as the hook does: the domain XML through the admin socket
    admin = str(tmp / "admin.sock")
    for name, uuid, mac, template in GUESTS:
        meta = mds_metadata(template=template) if template else ""
        record = adminclient.call(admin, "POST", "/instance-upload",
                                  domain_xml(name, uuid, mac, metadata=meta).encode())
        b.guests.append(Guest(name, uuid, mac, template, record))

    b.procs.append(start_dnsmasq(b.lab.host, tmp / "dnsmasq", tmp / "dnsmasq.log",
                                 "--log-dhcp"))

    img = b.image
    mode = accel(img["kernel"], img["initrd"], tmp)
    for i, g in enumerate(b.guests):
        overlay = tmp / f"{g.name}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", img["rootfs"],
                        "-F", "raw", str(overlay)], check=True)
        tap = f"mdtap{i}{b.lab.tag}"
        subprocess.run(["ip", "-n", b.lab.host, "tuntap", "add", "dev", tap, "mode", "tap"],
                       check=True)
        subprocess.run(["ip", "-n", b.lab.host, "link", "set", tap, "master", b.lab.bridge,
                        "up"], check=True)
        cmd = [qemu_binary(), "-name", g.name, "-accel", mode, "-m", "1024", "-smp", "1",
               "-nodefaults", "-display", "none", "-no-user-config",
               "-kernel", img["kernel"], "-initrd", img["initrd"],
               "-append", "root=/dev/vda rw console=ttyS0",
               "-drive", f"file={overlay},if=virtio,format=qcow2",
               "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
               "-device", f"virtio-net-pci,netdev=n0,mac={g.mac}",
               "-uuid", g.uuid, "-smbios", f"type=1,uuid={g.uuid},serial={g.uuid}",
               "-serial", f"file:{tmp}/{g.name}-console.log"]
        if mode == "tcg":
            cmd += ["-cpu", "max"]
        g.proc = subprocess.Popen(exec_in(b.lab.host, cmd), stdout=subprocess.DEVNULL,
                                  stderr=open(tmp / f"{g.name}-qemu.log", "wb"))
        b.procs.append(g.proc)
        g.started = time.monotonic()

    # configured = reachable over SSH with the served key, and cloud-init done
    pending = list(b.guests)
    deadline = time.monotonic() + BOOT_TIMEOUT
    while pending:
        assert time.monotonic() < deadline, f"not configured in {BOOT_TIMEOUT:.0f} s: " \
                                            f"{[g.name for g in pending]}"
        for g in list(pending):
            assert g.proc.poll() is None, f"qemu for {g.name} exited"
            out = b.ssh(g, "cloud-init status", timeout=30, check=False)
            if "status: done" in out or "status: error" in out:
                g.configured = time.monotonic()
                pending.remove(g)
        time.sleep(3)

    for g in b.guests:
        assert b.ssh(g, "hostname").strip() == g.hostname
        assert f"inet {g.ip}/16" in b.ssh(g, "ip -4 -o addr show")
        status = b.ssh(g, "cloud-init status --long")
        assert "status: done" in status, status
        result = json.loads(b.ssh(g, "sudo cat /run/cloud-init/result.json"))["v1"]
        assert result["errors"] == [], result
        assert result["datasource"].startswith("DataSourceEc2"), result
        assert b.ssh(g, f"sudo getent shadow {USER}").split(":")[1] == pw
        which = "second" if g.template else "base"
        assert b.ssh(g, "cat /var/tmp/mdserver-marker").strip() == f"{g.name} {which}"
        assert "aws" in b.ssh(g, "cloud-id").strip()

        seen = access_log(tmp / "mdserver.log", g.ip)
        assert seen[0][1:4] == ("PUT", "/latest/api/token", "200"), seen[:3]
        assert all(tok for *_, tok in seen[1:]) and len(seen) > 20
        assert all(s == "200" for _, _, _, s, _ in seen), [x for x in seen if x[3] != "200"]
        g.conversation = seen[-1][0] - seen[0][0]
        g.requests = len(seen)

    report = {"accel": mode, "image_seconds": round(img["seconds_here"], 1),
              "image_cached": img.get("cached"),
              "guests": {g.name: {"boot_to_configured_s": round(g.configured - g.started, 1),
                                  "metadata_conversation_s": round(g.conversation, 2),
                                  "requests": g.requests} for g in b.guests}}
    print("\nguest boot:", json.dumps(report))
    (tmp / "report.json").write_text(json.dumps(report))
