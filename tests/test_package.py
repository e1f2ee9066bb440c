"""The Debian package under a real systemd: built from this tree, installed offline in a Debian 12 guest, started, checked, scored, removed and purged.

The .deb is built once per run (scripts/build-deb.sh from a copy of the
working tree, into a temporary directory; lintian errors fail it). The guest
is the image tests/guest/build_image.py builds and caches (a copy-on-write
overlay on it, never the image itself), booted under qemu (TCG here, 2 CPUs)
with systemd as its init, on a bridge in a network namespace of the test's
own; it has no route anywhere else. A NoCloud seed (label cidata) gives it a
static address and the test's SSH key. What the package needs beyond the
image is computed, not listed: apt on the host resolves the .deb and
libvirt-daemon-system against the image's own dpkg status (read from the
image with debugfs) and downloads exactly what is missing; all of it goes in
over SSH and `apt-get install` installs it offline.

The enroller is tested against the guest's own libvirtd (libvirt-daemon-system,
qemu:///system): it must report "connected" (without libvirt it would be
ready all the same, its status saying "waiting for libvirt").
Domains are not defined in the guest (that needs QEMU there); enrollment
itself is tests/test_enroll.py's, against a real libvirtd.

On failure the guest's journal, its serial console and the test's logs stay
in the directory the test prints (pytest's tmp_path).

Environment: MDSERVER_GUEST_ACCEL (tcg, the default, or kvm),
MDSERVER_GUEST_TIMEOUT (seconds to boot, default 600).
"""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from helpers import need, need_root
from mdserver import iso
from netns import Lab, exec_in

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(HERE, "guest"))
from build_image import build_image  # noqa: E402

pytestmark = pytest.mark.privileged

BUILD = os.path.join(ROOT, "scripts", "build-deb.sh")
FILES_LIST = os.path.join(ROOT, "packaging", "files.list")
USER = "debian"  # the image's default user: cloud-init gives it our key
GUEST_MAC = "52:54:00:c0:de:01"
GUEST_IP = "10.122.0.50"
# The daemon's default listen address, put on a dummy interface in the guest.
TEST_ADDRESS = "169.254.169.254"
# Beside the package: the guest's libvirtd, for the enroller.
EXTRA_PACKAGES = ("libvirt-daemon-system",)
BOOT_TIMEOUT = float(os.environ.get("MDSERVER_GUEST_TIMEOUT", "600"))
# systemd-analyze security: the bounds docs/SECURITY.md states (and README).
EXPOSURE_BOUNDS = {"mdserver.service": 2.0, "mdserver-dnsmasq.service": 3.0,
                   "mdserver-enroll.service": 0.7}
CAP_NET_BIND_SERVICE = 1 << 10
LOGFILE = "/var/log/mdserver/mdserver.log"
DOMAIN_XML = """<domain type='qemu'>
  <name>pkg-vm1</name>
  <uuid>ec2c0de1-0000-4000-8000-000000000001</uuid>
  <memory unit='MiB'>64</memory>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <interface type='network'>
      <mac address='52:54:00:c0:de:11'/>
      <source network='mds'/>
    </interface>
  </devices>
</domain>
"""


def files_list():
    """(kind, source, target, mode, owner) of packaging/files.list."""
    out = []
    with open(FILES_LIST) as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                out.append(tuple(line.split()))
    return out


# -- the package, once per run -------------------------------------------------

@pytest.fixture(scope="session")
def deb_package(tmp_path_factory):
    """scripts/build-deb.sh into a temporary directory: {deb, seconds, lintian}."""
    need_root()
    need(shutil.which("apt-get") is not None and shutil.which("dpkg") is not None,
         "needs Debian's apt-get and dpkg (the package is built with dpkg-buildpackage)")
    out = tmp_path_factory.mktemp("deb")
    t0 = time.monotonic()
    r = subprocess.run(["bash", BUILD, "--out", str(out)], capture_output=True, text=True,
                       timeout=1800)
    assert r.returncode == 0, f"build-deb.sh failed:\n{r.stdout[-2000:]}\n{r.stderr[-6000:]}"
    deb = r.stdout.strip().splitlines()[-1]
    assert os.path.isfile(deb), r.stdout
    lintian = (out / "lintian.log").read_text()
    return {"deb": deb, "seconds": round(time.monotonic() - t0, 1), "lintian": lintian}


# -- the guest -----------------------------------------------------------------

class PackageGuest:
    """One qemu guest in a namespace of the test's own; close() ends both."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.lab = None
        self.proc = None
        self.failed = False
        self.facts = {}
        self.times = {}
        self.key = str(tmp / "id_ed25519")

    def ssh_cmd(self, command):
        return exec_in(self.lab.host, [
            "ssh", "-i", self.key, "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
            "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR", "-o", "ServerAliveInterval=15",
            f"{USER}@{GUEST_IP}", command])

    def run(self, command, timeout=120, input=None):
        """`command` as root in the guest: CompletedProcess."""
        return subprocess.run(self.ssh_cmd("sudo sh -c " + shlex.quote(command)),
                              capture_output=True, text=True, timeout=timeout, input=input)

    def root(self, command, timeout=120, input=None):
        """`command` as root in the guest: its stdout; fails on a non-zero status."""
        r = self.run(command, timeout, input)
        assert r.returncode == 0, f"guest: {command!r} -> {r.returncode}\n{r.stdout}\n{r.stderr}"
        return r.stdout

    def show(self, unit, *props):
        out = self.root(f"systemctl show -p {','.join(props)} {unit}")
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def keep_artifacts(self):
        """The guest's journal and package state beside its console log."""
        if self.proc is not None and self.proc.poll() is None:
            for name, cmd in (("journal.txt", "journalctl -b --no-pager -o short-monotonic"),
                              ("units.txt", "systemctl --no-pager --all list-units 'mdserver*'"
                                            " 'libvirt*'; systemctl --no-pager status"
                                            " 'mdserver*'"),
                              ("dpkg.log", "cat /var/log/dpkg.log")):
                try:
                    (self.tmp / name).write_text(self.run(cmd, timeout=60).stdout)
                except (subprocess.TimeoutExpired, OSError):
                    pass
        print(f"\npackage test: the guest's journal, serial console (console.log) and the "
              f"build and install logs are in {self.tmp}", file=sys.stderr)

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # our qemu, by its PID
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.lab is not None:
            self.lab.close()


def accel():
    # TCG unless told: this machine's /dev/kvm opens but boots nothing.
    return os.environ.get("MDSERVER_GUEST_ACCEL") or "tcg"


def image_status(rootfs, dest):
    """The image's dpkg status file, read with debugfs (read-only)."""
    r = subprocess.run(["debugfs", "-R", "cat /var/lib/dpkg/status", rootfs],
                       capture_output=True, timeout=120)
    assert r.returncode == 0 and b"Package: " in r.stdout, r.stderr.decode(errors="replace")
    dest.write_bytes(r.stdout)


def stage_packages(deb, status, stage, log):
    """Download into `stage` what the .deb and EXTRA_PACKAGES need beyond
    the packages `status` lists (apt resolves against the guest's status);
    the .deb goes there too."""
    (stage / "partial").mkdir(parents=True)
    cmd = ["apt-get", "install", "--download-only", "-y", "-q", "--no-install-recommends",
           "-o", f"Dir::State::status={status}", "-o", f"Dir::Cache::archives={stage}",
           "-o", "Debug::NoLocking=1", "-o", "APT::Sandbox::User=root", deb, *EXTRA_PACKAGES]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if r.returncode != 0:
        # Lists older than the archive (a version gone): once more, updated.
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=600)
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    log.write_text(r.stdout + r.stderr)
    assert r.returncode == 0, f"apt-get --download-only failed:\n{r.stdout[-2000:]}{r.stderr}"
    shutil.rmtree(stage / "partial")
    shutil.copy(deb, stage)
    return sorted(p.name for p in stage.iterdir() if p.suffix == ".deb")


def seed_image(pubkey):
    """A NoCloud seed: the test's key for the default user, a static address."""
    meta = "instance-id: mdt-package\nlocal-hostname: mdt-package\n"
    user = ("#cloud-config\n"
            f"ssh_authorized_keys:\n  - {pubkey}\n"
            # nothing of cloud-init's own that needs a network or time
            "package_update: false\npackage_upgrade: false\n"
            # sudo resolves its own host name
            "manage_etc_hosts: localhost\n")
    net = ("version: 1\nconfig:\n"
           "  - type: physical\n    name: lan0\n"
           f"    mac_address: '{GUEST_MAC}'\n"
           f"    subnets:\n      - type: static\n        address: {GUEST_IP}/16\n")
    return iso.build_iso("cidata", [("meta-data", meta.encode()), ("user-data", user.encode()),
                                    ("network-config", net.encode())])


def wait_for_ssh(g, deadline):
    while True:
        assert g.proc.poll() is None, f"qemu exited with {g.proc.returncode}"
        try:
            r = subprocess.run(g.ssh_cmd("systemctl is-system-running --wait"),
                               capture_output=True, text=True, timeout=120)
            if r.stdout.strip() in ("running", "degraded"):
                return r.stdout.strip()
        except subprocess.TimeoutExpired:
            pass
        assert time.monotonic() < deadline, f"no SSH into the guest within {BOOT_TIMEOUT:.0f} s"
        time.sleep(5)


@pytest.fixture(scope="module")
def guest(deb_package, tmp_path_factory):
    """The guest booted, the package and its dependencies installed in it."""
    need_root()
    for tool in ("qemu-system-x86_64", "qemu-img", "ssh", "scp", "ssh-keygen", "debugfs"):
        need(shutil.which(tool) is not None, f"needs {tool}")
    tmp = tmp_path_factory.mktemp("package")
    g = PackageGuest(tmp)
    t0 = time.monotonic()
    try:
        image = build_image()
        g.times["image_s"] = round(time.monotonic() - t0, 1)

        t = time.monotonic()
        image_status(image["rootfs"], tmp / "image-status")
        stage = tmp / "stage"
        g.facts["staged"] = stage_packages(deb_package["deb"], tmp / "image-status", stage,
                                           tmp / "stage.log")
        g.times["stage_s"] = round(time.monotonic() - t, 1)

        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mdserver-test",
                        "-f", g.key], check=True)
        (tmp / "seed.iso").write_bytes(seed_image((tmp / "id_ed25519.pub").read_text().strip()))
        overlay = tmp / "overlay.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", image["rootfs"],
                        "-F", "raw", str(overlay)], check=True)
        g.lab = Lab()
        tap = f"mdtap{g.lab.tag}"
        subprocess.run(["ip", "-n", g.lab.host, "tuntap", "add", "dev", tap, "mode", "tap"],
                       check=True)
        subprocess.run(["ip", "-n", g.lab.host, "link", "set", tap, "master", g.lab.bridge,
                        "up"], check=True)
        mode = accel()
        cmd = [shutil.which("qemu-system-x86_64"), "-name", "mdt-package", "-machine", "pc",
               "-accel", mode, "-m", "2048", "-smp", "2", "-nodefaults", "-display", "none",
               "-no-user-config", "-kernel", image["kernel"], "-initrd", image["initrd"],
               "-append", "root=/dev/vda rw console=ttyS0",
               "-drive", f"file={overlay},if=virtio,format=qcow2",
               "-drive", f"file={tmp / 'seed.iso'},format=raw,media=cdrom,readonly=on,"
                         "if=ide,index=2",
               "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
               "-device", f"virtio-net-pci,netdev=n0,mac={GUEST_MAC}",
               "-serial", f"file:{tmp / 'console.log'}"]
        if mode == "tcg":
            cmd += ["-cpu", "max"]
        t = time.monotonic()
        g.proc = subprocess.Popen(exec_in(g.lab.host, cmd), stdout=subprocess.DEVNULL,
                                  stderr=open(tmp / "qemu.log", "wb"))
        g.facts["system_state"] = wait_for_ssh(g, t + BOOT_TIMEOUT)
        g.times["boot_s"] = round(time.monotonic() - t, 1)

        t = time.monotonic()
        g.root("rm -rf /var/tmp/stage && install -d -o debian /var/tmp/stage")
        r = subprocess.run(exec_in(g.lab.host, [
            "scp", "-q", "-i", g.key, "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
            "-o", "LogLevel=ERROR", *[str(stage / n) for n in g.facts["staged"]],
            f"{USER}@{GUEST_IP}:/var/tmp/stage/"]), capture_output=True, text=True,
            timeout=600)
        assert r.returncode == 0, r.stderr
        r = g.run("DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends"
                  " /var/tmp/stage/*.deb", timeout=1200)
        (tmp / "install.log").write_text(r.stdout + r.stderr)
        assert r.returncode == 0, f"apt-get install in the guest failed:\n{r.stdout[-3000:]}" \
                                  f"\n{r.stderr[-2000:]}"
        g.times["install_s"] = round(time.monotonic() - t, 1)
        # What installing did to the units, before any test starts them.
        g.facts["enabled"] = g.run("systemctl is-enabled mdserver.service "
                                   "mdserver-enroll.service").stdout.split()
        g.facts["active"] = g.run("systemctl is-active mdserver.service mdserver-enroll.service"
                                  " mdserver-dnsmasq.service").stdout.split()
        yield g
    except BaseException:
        g.failed = True
        raise
    finally:
        try:
            g.times["total_s"] = round(time.monotonic() - t0, 1)
            report = {"build_s": deb_package["seconds"], **g.times,
                      "staged": len(g.facts.get("staged", [])),
                      "exposure": g.facts.get("exposure")}
            print("\npackage test:", json.dumps(report))
            (tmp / "report.json").write_text(json.dumps(report, indent=1) + "\n")
            if g.failed:
                g.keep_artifacts()
        finally:
            g.close()


@pytest.fixture
def pkg(guest, request):
    """The guest; a failing test keeps the artifacts."""
    yield guest
    rep = getattr(request.node, "rep_call", None)
    if rep is None or rep.failed:
        guest.failed = True


# -- the checks, in order: install, start, reload, scores, errors, removal ------

# Run in the guest as root: modes, owners and link targets of the installed
# files, the user, the shadow entry.
STAT = r"""
import json, os, pwd, grp, spwd, stat, sys
out = {}
for path in sys.argv[1:]:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        out[path] = None
        continue
    out[path] = {"mode": "%04o" % stat.S_IMODE(st.st_mode),
                 "owner": pwd.getpwuid(st.st_uid).pw_name + ":" + grp.getgrgid(st.st_gid).gr_name,
                 "link": os.readlink(path) if stat.S_ISLNK(st.st_mode) else None,
                 "dir": stat.S_ISDIR(st.st_mode)}
try:
    pw = pwd.getpwnam("mdserver")
    sp = spwd.getspnam("mdserver")
    out["user"] = {"uid": pw.pw_uid, "home": pw.pw_dir, "shell": pw.pw_shell,
                   "password": sp.sp_pwdp, "expire": sp.sp_expire}
except KeyError:
    out["user"] = None
print(json.dumps(out))
"""


def stat_paths(g, paths):
    return json.loads(g.root("python3 - " + " ".join(map(shlex.quote, paths)), input=STAT))


def test_installed_as_the_file_list_says(pkg, deb_package):
    print(f"\n{os.path.basename(deb_package['deb'])}: built in {deb_package['seconds']} s; "
          f"lintian:\n{deb_package['lintian']}")
    assert not re.search(r"^E: ", deb_package["lintian"], re.M)
    status = pkg.root("dpkg-query -W -f='${Status} ${Version}' mdserver")
    assert status.startswith("install ok installed ")
    # Enabled, not started: the configuration and the network come first.
    assert pkg.facts["enabled"] == ["enabled", "enabled"], pkg.facts["enabled"]
    assert pkg.facts["active"] == ["inactive"] * 3, pkg.facts["active"]
    entries = files_list()
    targets = [e[2] if e[0] != "unit" else "/lib/systemd/system/" + e[2] for e in entries]
    facts = stat_paths(pkg, targets + ["/usr/libexec/mdserver/qemu", "/usr/sbin/mdserver",
                                       "/usr/sbin/mdserverctl", "/usr/sbin/mdserver-enroll"])
    for (kind, src, target, mode, owner), path in zip(entries, targets):
        got = facts[path]
        assert got is not None, f"{path} not installed"
        if kind == "hook":
            # A link to the package's copy: removed with the package.
            assert got["link"] == "/usr/libexec/mdserver/" + os.path.basename(src), got
            assert facts["/usr/libexec/mdserver/qemu"]["mode"] == mode
            continue
        assert (got["mode"], got["owner"]) == (mode, owner), (path, got)
        if kind == "unit":
            text = pkg.root(f"cat {path}")
            with open(os.path.join(ROOT, src)) as f:
                assert text == f.read().replace("@BINDIR@", "/usr/sbin"), path
    for name in ("mdserver", "mdserverctl", "mdserver-enroll"):
        assert facts[f"/usr/sbin/{name}"]["link"] == f"../lib/mdserver/bin/{name}"
    user = facts["user"]
    assert user is not None and user["uid"] < 1000, user
    assert (user["home"], user["shell"]) == ("/var/lib/mdserver", "/usr/sbin/nologin"), user
    pkg.root("mdserverctl check-config /etc/mdserver/mdserver.conf")
    version = pkg.root("mdserver-enroll --version").strip()
    assert version.startswith("mdserver-enroll "), version
    assert pkg.root("mdserver-enroll --version").split()[-1] == status.split()[-1]
    if os.path.exists(os.path.join(ROOT, "mdserver", "manpages.py")):
        shipped = pkg.root("dpkg -L mdserver").split()
        for page in ("mdserver.8.gz", "mdserverctl.8.gz", "mdserver-enroll.8.gz"):
            assert f"/usr/share/man/man8/{page}" in shipped
        assert "/usr/share/bash-completion/completions/mdserverctl" in shipped


def unit_processes(g, unit):
    """[(pid, Uid line, CapEff, CapBnd, CapAmb)] of every process in the unit's cgroup."""
    cgroup = g.show(unit, "ControlGroup")["ControlGroup"]
    assert cgroup, unit
    out = g.root(f"for p in $(cat /sys/fs/cgroup{cgroup}/cgroup.procs); do "
                 "echo $p $(grep -E '^(Uid|CapEff|CapBnd|CapAmb):' /proc/$p/status "
                 "| tr '\\t' ' ' | tr '\\n' ' '); done")
    procs = []
    for line in out.splitlines():
        pid, _, text = line.partition(" ")
        uid = re.search(r"Uid: (\d+) (\d+) (\d+) (\d+)", text).groups()
        caps = {k: int(re.search(rf"{k}: ([0-9a-f]+)", text).group(1), 16)
                for k in ("CapEff", "CapBnd", "CapAmb")}
        procs.append((int(pid), tuple(int(u) for u in uid), caps))
    return procs


def test_units_start_as_their_files_say(pkg):
    # The test address on a dummy interface; the log to a file (for reload).
    pkg.root(f"ip link add mdt0 type dummy && ip addr add {TEST_ADDRESS}/32 dev mdt0 && "
             "ip link set mdt0 up")
    pkg.root(f"sed -i 's|^# logfile =$|logfile = {LOGFILE}|' /etc/mdserver/mdserver.conf && "
             f"grep -qx 'logfile = {LOGFILE}' /etc/mdserver/mdserver.conf")
    t = time.monotonic()
    pkg.root("systemctl start mdserver.service mdserver-enroll.service", timeout=300)
    pkg.times["start_s"] = round(time.monotonic() - t, 1)

    # Readiness (Type=notify) as systemd saw it.
    md = pkg.show("mdserver.service", "ActiveState", "SubState", "StatusText", "MainPID",
                  "NRestarts")
    assert (md["ActiveState"], md["SubState"]) == ("active", "running"), md
    assert md["StatusText"] == f"serving on {TEST_ADDRESS}:80", md
    enroll = pkg.show("mdserver-enroll.service", "ActiveState", "SubState", "StatusText")
    assert (enroll["ActiveState"], enroll["SubState"]) == ("active", "running"), enroll
    assert enroll["StatusText"] == "connected to qemu:///system", enroll

    # mdserver: user mdserver in every process, with CAP_NET_BIND_SERVICE at
    # most (the ambient set gives it to the main process).
    uid = int(pkg.root("id -u mdserver"))
    procs = unit_processes(pkg, "mdserver.service")
    assert int(md["MainPID"]) in [p for p, _, _ in procs], procs
    for pid, uids, caps in procs:
        assert uids == (uid,) * 4, (pid, uids)
        assert caps["CapBnd"] == CAP_NET_BIND_SERVICE, (pid, caps)
        assert caps["CapEff"] & ~CAP_NET_BIND_SERVICE == 0, (pid, caps)
    main = [c for p, _, c in procs if p == int(md["MainPID"])][0]
    assert main["CapEff"] == main["CapAmb"] == CAP_NET_BIND_SERVICE, main
    # The enroller: root with no capability at all.
    for pid, uids, caps in unit_processes(pkg, "mdserver-enroll.service"):
        assert uids == (0,) * 4 and caps == {"CapEff": 0, "CapBnd": 0, "CapAmb": 0}, \
            (pid, uids, caps)

    # It answers on the test address: registration through the admin
    # socket, then the metadata port (this address is no guest of its: 404).
    pkg.root("cat > /var/tmp/pkg-vm1.xml", input=DOMAIN_XML)
    [record] = json.loads(pkg.root("mdserverctl register --json /var/tmp/pkg-vm1.xml"))
    assert record["name"] == "pkg-vm1" and record["ip"].startswith("10.122."), record
    answer = pkg.root("python3 - <<'EOF'\n"
                      "import urllib.request, urllib.error\n"
                      "try:\n"
                      f"    r = urllib.request.urlopen('http://{TEST_ADDRESS}/latest/meta-data/',"
                      " timeout=30)\n"
                      "    print(r.status, r.read().decode())\n"
                      "except urllib.error.HTTPError as e:\n"
                      "    print(e.code, e.read().decode())\n"
                      "EOF")
    assert answer.split()[0] == "404", answer
    assert "pkg-vm1" in pkg.root("mdserverctl list")
    # Its dnsmasq, started once mdserver was ready, as root dropping to mdserver.
    dnsmasq = pkg.show("mdserver-dnsmasq.service", "ActiveState", "SubState", "MainPID")
    assert (dnsmasq["ActiveState"], dnsmasq["SubState"]) == ("active", "running"), dnsmasq
    assert pkg.root(f"stat -c %U /proc/{dnsmasq['MainPID']}").strip() == "mdserver"


def test_reload_reopens_the_log(pkg):
    pkg.root(f"test -s {LOGFILE} && mv {LOGFILE} {LOGFILE}.1")
    pkg.root("systemctl reload mdserver.service")
    # A reopened file, and the next line goes there, not to the moved one.
    deadline = time.monotonic() + 30
    while pkg.run(f"test -e {LOGFILE}").returncode != 0:
        assert time.monotonic() < deadline, "no new log file after reload"
        time.sleep(1)
    pkg.root("mdserverctl remove pkg-vm1")
    deadline = time.monotonic() + 30
    while "pkg-vm1" not in pkg.root(f"cat {LOGFILE}"):
        assert time.monotonic() < deadline, pkg.root(f"cat {LOGFILE}")
        time.sleep(1)
    assert "removed" in pkg.root(f"cat {LOGFILE}")
    assert "pkg-vm1" not in pkg.root(f"grep -i remove {LOGFILE}.1 || true")
    assert pkg.show("mdserver.service", "ActiveState")["ActiveState"] == "active"
    assert pkg.root(f"stat -c '%a %U' {LOGFILE}").split() == ["640", "mdserver"]


def test_exposure_scores_as_documented(pkg):
    scores = {}
    for unit, bound in EXPOSURE_BOUNDS.items():
        out = pkg.root(f"systemd-analyze security --no-pager {unit}", timeout=180)
        m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out)
        assert m, out
        scores[unit] = float(m.group(1))
    pkg.facts["exposure"] = scores
    print("\nsystemd-analyze security under systemd in the guest:", scores)
    for unit, bound in EXPOSURE_BOUNDS.items():
        assert scores[unit] <= bound, (unit, scores[unit], bound)


def test_configuration_error_is_one_line_and_no_restart_loop(pkg):
    conf = "/etc/mdserver/mdserver.conf"
    pkg.root("systemctl stop mdserver.service")
    pkg.root(f"cp {conf} /var/tmp/mdserver.conf.good && "
             f"sed -i 's|^\\[mdserver\\]$|[mdserver]\\nbogus_key = 1|' {conf}")
    since = pkg.root("date +%s.%N").strip()
    r = pkg.run("systemctl start mdserver.service", timeout=120)
    assert r.returncode != 0
    time.sleep(8)  # RestartSec=2: a loop would have restarted by now
    state = pkg.show("mdserver.service", "ActiveState", "Result", "ExecMainStatus", "NRestarts")
    assert state == {"ActiveState": "failed", "Result": "exit-code", "ExecMainStatus": "2",
                     "NRestarts": "0"}, state
    # What the unit's processes logged (ExecStartPre's and ExecStopPost's
    # too), not systemd's own lines about it; by name as well, in case a
    # process that exits at once is logged without its unit.
    entries = [json.loads(line) for line in pkg.root(
        f"journalctl --since @{since} --no-pager -o json").splitlines()]
    names = {"mdserver", "mdserverctl", "nft", "sh"}
    ours = [e for e in entries if e.get("_PID") != "1" and (
        e.get("_SYSTEMD_UNIT") == "mdserver.service" or e.get("SYSLOG_IDENTIFIER") in names
        or e.get("_COMM") in names)]
    print("\nconfiguration error in the journal:",
          [{k: e.get(k) for k in ("_PID", "_SYSTEMD_UNIT", "SYSLOG_IDENTIFIER", "_TRANSPORT",
                                  "MESSAGE")} for e in ours])
    assert [e["MESSAGE"] for e in ours] == \
        [f"mdserver: {conf}: [mdserver] bogus_key: unknown key"], \
        [(e.get("SYSLOG_IDENTIFIER"), e.get("_COMM"), e.get("MESSAGE")) for e in entries]
    pkg.root(f"cp /var/tmp/mdserver.conf.good {conf} && systemctl reset-failed mdserver.service"
             " && systemctl start mdserver.service", timeout=300)
    assert pkg.show("mdserver.service", "ActiveState")["ActiveState"] == "active"


def test_remove_keeps_data_and_configuration_purge_removes_them(pkg):
    kept = ["/etc/mdserver/mdserver.conf", "/etc/mdserver/userdata/example.yaml",
            "/var/lib/mdserver", f"{LOGFILE}"]
    gone = ["/usr/lib/mdserver", "/usr/sbin/mdserver", "/usr/libexec/mdserver",
            "/etc/libvirt/hooks/qemu.d/mdserver", "/lib/systemd/system/mdserver.service"]
    assert all(stat_paths(pkg, kept).values())
    pkg.root("DEBIAN_FRONTEND=noninteractive apt-get remove -y mdserver", timeout=600)
    facts = stat_paths(pkg, kept + gone)
    assert [p for p in kept if facts[p] is None] == []
    assert [p for p in gone if facts[p] is not None] == []
    assert facts["user"] is not None
    assert pkg.run("pgrep -u mdserver").stdout == ""
    assert pkg.run("systemctl is-active mdserver.service").stdout.strip() not in (
        "active", "activating", "reloading")

    pkg.root("DEBIAN_FRONTEND=noninteractive apt-get purge -y mdserver", timeout=600)
    facts = stat_paths(pkg, ["/etc/mdserver", "/var/lib/mdserver", "/var/log/mdserver"])
    assert [p for p, v in facts.items() if p.startswith("/") and v is not None] == []
    # The user stays, locked and expired.
    user = facts["user"]
    assert user is not None and user["password"].startswith("!") and user["expire"] == 1, user
    assert pkg.run("dpkg-query -W -f='${Status}' mdserver").stdout.startswith(
        "unknown ok not-installed") or pkg.run("dpkg-query -W mdserver").returncode != 0
