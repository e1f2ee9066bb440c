"""system-integration.sh into a temporary DESTDIR: exact file list, @BINDIR@
substitution, idempotence, uninstall and purge, nothing touched outside
DESTDIR, and the installed units checked by systemd-analyze."""

import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys

import pytest

from helpers import need

pytestmark = pytest.mark.process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "system-integration.sh")
PREFIX = "/opt/mdserver-test"

# Everything a --no-venv install stages (directories end in "/").
INSTALLED = [
    "etc/",
    "etc/libvirt/",
    "etc/libvirt/hooks/",
    "etc/libvirt/hooks/qemu.d/",
    "etc/libvirt/hooks/qemu.d/mdserver",
    "etc/mdserver/",
    "etc/mdserver/.install-manifest",
    "etc/mdserver/mdserver.conf",
    "etc/mdserver/userdata/",
    "etc/mdserver/userdata/example.yaml",
    "etc/systemd/",
    "etc/systemd/system/",
    "etc/systemd/system/mdserver-dnsmasq.service",
    "etc/systemd/system/mdserver-enroll.service",
    "etc/systemd/system/mdserver.service",
    "var/",
    "var/lib/",
    "var/lib/mdserver/",
]
MODES = {
    "etc/libvirt/hooks/qemu.d/mdserver": 0o755,
    "etc/mdserver/mdserver.conf": 0o640,
    "etc/mdserver/userdata/": 0o750,
    "etc/mdserver/userdata/example.yaml": 0o640,
    "etc/systemd/system/mdserver.service": 0o644,
    "etc/systemd/system/mdserver-dnsmasq.service": 0o644,
    "etc/systemd/system/mdserver-enroll.service": 0o644,
    "var/lib/mdserver/": 0o711,
}
# What the live system has at the places the script would write without
# DESTDIR: must be the same after every run.
LIVE_PATHS = ["/etc/mdserver", "/etc/systemd/system/mdserver.service",
              "/etc/systemd/system/mdserver-dnsmasq.service",
              "/etc/systemd/system/mdserver-enroll.service",
              "/etc/libvirt/hooks", "/var/lib/mdserver", PREFIX, "/opt/mdserver",
              "/etc/passwd", "/etc/group", "/etc/shadow"]
# systemd-analyze security --offline=true of systemd/mdserver-enroll.service
ENROLL_EXPOSURE = 0.7
# Commands that would change the live system: stubs that log and fail.
STUBS = ["useradd", "groupadd", "userdel", "groupdel", "usermod", "chown", "chgrp",
         "systemctl"]


def listing(dest):
    out = []
    for dirpath, dirnames, filenames in os.walk(dest):
        rel = os.path.relpath(dirpath, dest)
        for d in dirnames:
            out.append(os.path.normpath(os.path.join(rel, d)) + "/")
        for f in filenames:
            out.append(os.path.normpath(os.path.join(rel, f)))
    return sorted(out)


def snapshot(dest):
    """path -> (mode, mtime, content hash) of everything under dest."""
    snap = {}
    for path in listing(dest):
        full = os.path.join(dest, path)
        st = os.lstat(full)
        digest = ""
        if stat.S_ISREG(st.st_mode):
            with open(full, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
        snap[path] = (st.st_mode, st.st_mtime_ns, digest)
    return snap


def live_state():
    state = {}
    for p in LIVE_PATHS:
        try:
            st = os.lstat(p)
            state[p] = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            state[p] = None
    return state


@pytest.fixture
def stubs(tmp_path):
    """A PATH whose privileged commands only log that they were called."""
    bindir = tmp_path / "stubs"
    bindir.mkdir()
    log = tmp_path / "stub-calls.log"
    for name in STUBS:
        p = bindir / name
        p.write_text(f"#!/bin/sh\necho \"{name} $*\" >> '{log}'\nexit 1\n")
        p.chmod(0o755)
    return {"path": f"{bindir}:{os.environ['PATH']}", "log": log}


def run(args, stubs=None, env=None, check=True):
    e = dict(os.environ)
    e.pop("DESTDIR", None)
    e.pop("MDSERVER_SKIP_VENV", None)
    if stubs:
        e["PATH"] = stubs["path"]
    e.update(env or {})
    proc = subprocess.run(["bash", SCRIPT] + args, capture_output=True, text=True,
                          env=e, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def stub_calls(stubs):
    return stubs["log"].read_text() if stubs["log"].exists() else ""


@pytest.fixture
def dest(tmp_path):
    d = tmp_path / "dest"
    d.mkdir()
    return str(d)


def test_destdir_install_file_list_and_uninstall(dest, stubs):
    live = live_state()
    proc = run(["--destdir", dest, "--prefix", PREFIX, "--no-venv"], stubs)
    assert listing(dest) == INSTALLED
    for path, mode in MODES.items():
        assert stat.S_IMODE(os.stat(os.path.join(dest, path)).st_mode) == mode, path
    # Same content as the source tree; units with @BINDIR@ replaced.
    for src, path in [("hooks/qemu", "etc/libvirt/hooks/qemu.d/mdserver"),
                      ("etc/mdserver/mdserver.conf", "etc/mdserver/mdserver.conf"),
                      ("etc/mdserver/userdata/example.yaml",
                       "etc/mdserver/userdata/example.yaml")]:
        with open(os.path.join(ROOT, src), "rb") as a, open(os.path.join(dest, path), "rb") as b:
            assert a.read() == b.read(), path
    for unit in ("mdserver.service", "mdserver-dnsmasq.service", "mdserver-enroll.service"):
        with open(os.path.join(ROOT, "systemd", unit)) as f:
            source = f.read()
        with open(os.path.join(dest, "etc/systemd/system", unit)) as f:
            text = f.read()
        assert not re.search(r"@[A-Z]+@", text), unit
        assert text == source.replace("@BINDIR@", PREFIX + "/bin")
    with open(os.path.join(dest, "etc/systemd/system/mdserver.service")) as f:
        assert f"\nExecStart={PREFIX}/bin/mdserver /etc/mdserver/mdserver.conf\n" in f.read()
    # What it could not do under DESTDIR is written down, not done.
    with open(os.path.join(dest, "etc/mdserver/.install-manifest")) as f:
        manifest = f.read()
    assert "pending useradd --system" in manifest
    assert "pending chown mdserver:mdserver /var/lib/mdserver" in manifest
    assert "pending chown root:mdserver /etc/mdserver/mdserver.conf" in manifest
    assert "useradd --system" in proc.stdout

    # Twice: nothing changes, not even a time stamp.
    before = snapshot(dest)
    proc = run(["--destdir", dest, "--prefix", PREFIX, "--no-venv"], stubs)
    assert "nothing changed" in proc.stdout
    assert snapshot(dest) == before

    # Uninstall keeps the configuration and the state (and says so in a
    # manifest of just those, for a later --purge).
    run(["--destdir", dest, "--uninstall"], stubs)
    assert listing(dest) == ["etc/", "etc/mdserver/", "etc/mdserver/.install-manifest",
                             "etc/mdserver/mdserver.conf", "var/", "var/lib/",
                             "var/lib/mdserver/"]
    # Installing again over what was kept, then purging, leaves nothing.
    run(["--destdir", dest, "--prefix", PREFIX, "--no-venv"], stubs)
    assert listing(dest) == INSTALLED
    run(["--destdir", dest, "--purge"], stubs)
    assert listing(dest) == []

    assert stub_calls(stubs) == ""
    assert live_state() == live


def test_destdir_from_the_environment(dest, stubs):
    run(["--no-venv"], stubs, env={"DESTDIR": dest})
    assert listing(dest) == INSTALLED
    with open(os.path.join(dest, "etc/systemd/system/mdserver.service")) as f:
        assert "\nExecStart=/opt/mdserver/bin/mdserver " in f.read()
    run(["--purge"], stubs, env={"DESTDIR": dest})
    assert listing(dest) == []
    assert stub_calls(stubs) == ""


def test_existing_config_is_kept_and_the_default_goes_beside_it(dest, stubs):
    conf = os.path.join(dest, "etc/mdserver/mdserver.conf")
    os.makedirs(os.path.dirname(conf))
    with open(conf, "w") as f:
        f.write("[mdserver]\nport = 8080\n")
    run(["--destdir", dest, "--no-venv"], stubs, env={"MDSERVER_SKIP_VENV": "1"})
    with open(conf) as f:
        assert f.read() == "[mdserver]\nport = 8080\n"
    with open(os.path.join(ROOT, "etc/mdserver/mdserver.conf")) as a, open(conf + ".dist") as b:
        assert a.read() == b.read()
    before = snapshot(dest)
    run(["--destdir", dest, "--no-venv"], stubs)
    assert snapshot(dest) == before
    run(["--destdir", dest, "--uninstall"], stubs)
    # The directories were there before: they stay, and so does the config.
    assert listing(dest) == ["etc/", "etc/mdserver/", "etc/mdserver/.install-manifest",
                             "etc/mdserver/mdserver.conf", "var/", "var/lib/",
                             "var/lib/mdserver/"]
    run(["--destdir", dest, "--purge"], stubs)
    assert listing(dest) == ["etc/", "etc/mdserver/"]


def test_errors_are_one_clear_line(dest, tmp_path, stubs):
    proc = run(["--bogus"], stubs, check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "system-integration.sh: unknown argument: --bogus (see --help)"]
    proc = run(["--destdir", dest, "--uninstall"], stubs, check=False)
    assert proc.returncode != 0 and "nothing to uninstall" in proc.stderr
    proc = run(["--destdir", dest, "--prefix", "relative/dir"], stubs, check=False)
    assert proc.returncode != 0 and "absolute" in proc.stderr
    # No venv module (Debian without python3-venv): the package is named.
    fake = tmp_path / "python3-without-venv"
    fake.write_text("#!/bin/sh\ncase \"$*\" in *ensurepip*) exit 1;; esac\n"
                    f"exec {sys.executable} \"$@\"\n")
    fake.chmod(0o755)
    proc = run(["--destdir", dest, "--prefix", PREFIX, "--python", str(fake)], stubs,
               check=False)
    assert proc.returncode != 0
    assert "python3-venv" in proc.stderr.strip().splitlines()[-1]
    assert run(["--help"]).stdout.startswith("Usage: system-integration.sh")
    assert stub_calls(stubs) == ""


def _overall_exposure(unit_path):
    proc = subprocess.run(["systemd-analyze", "security", "--offline=true", unit_path],
                          capture_output=True, text=True, timeout=120)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", proc.stdout + proc.stderr)
    assert m, proc.stdout + proc.stderr
    return float(m.group(1))


def test_mdserver_unit_exposure(dest, stubs):
    need(shutil.which("systemd-analyze"), "needs systemd-analyze (Debian package systemd)")
    run(["--destdir", dest, "--no-venv"], stubs)
    exposure = _overall_exposure(os.path.join(dest, "etc/systemd/system/mdserver.service"))
    print(f"mdserver.service: overall exposure {exposure}")
    assert exposure <= 2.0
    # dnsmasq runs as root until it drops to mdserver: no bound, but it
    # must stay well away from the unconfined 9.6.
    exposure = _overall_exposure(os.path.join(dest, "etc/systemd/system/mdserver-dnsmasq.service"))
    print(f"mdserver-dnsmasq.service: overall exposure {exposure}")
    assert exposure <= 3.0


def test_enroll_unit_exposure(dest, stubs):
    # Root (libvirtd grants qemu:///system to uid 0) with no capability, no
    # network, nothing writable: what remains is "runs as root".
    need(shutil.which("systemd-analyze"), "needs systemd-analyze (Debian package systemd)")
    run(["--destdir", dest, "--no-venv"], stubs)
    exposure = _overall_exposure(os.path.join(dest, "etc/systemd/system/mdserver-enroll.service"))
    print(f"mdserver-enroll.service: overall exposure {exposure}")
    assert exposure <= ENROLL_EXPOSURE


def test_units_verify(dest, tmp_path, stubs):
    need(shutil.which("systemd-analyze"), "needs systemd-analyze (Debian package systemd)")
    need(os.access("/usr/sbin/dnsmasq", os.X_OK), "needs /usr/sbin/dnsmasq (Debian package dnsmasq-base)")
    # verify checks that ExecStart= exists: point @BINDIR@ at a stand-in.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "mdserver").write_text("#!/bin/sh\n")
    (bindir / "mdserver").chmod(0o755)
    (bindir / "mdserver-enroll").write_text("#!/bin/sh\n")
    (bindir / "mdserver-enroll").chmod(0o755)
    run(["--destdir", dest, "--no-venv", "--bindir", str(bindir)], stubs)
    units = [os.path.join(dest, "etc/systemd/system", u)
             for u in ("mdserver.service", "mdserver-dnsmasq.service",
                       "mdserver-enroll.service")]
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no"] + units,
                          capture_output=True, text=True, timeout=120)
    # Any complaint (an unknown or misspelt option too) is printed: want none.
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


def test_venv_install(dest, tmp_path, stubs):
    """The real thing once: venv + pip from this tree, staged and relocated."""
    python = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else "python3"
    need(subprocess.run([python, "-c", "import venv, ensurepip"]).returncode == 0,
         "needs python3-venv")
    prefix = "/opt/mdserver-venv-test"
    proc = run(["--destdir", dest, "--prefix", prefix], stubs)
    venv = dest + prefix
    assert os.access(venv + "/bin/mdserver", os.X_OK)
    assert os.access(venv + "/bin/mdserverctl", os.X_OK)
    assert os.access(venv + "/bin/mdserver-enroll", os.X_OK)
    with open(venv + "/bin/mdserver") as f:
        assert f.readline().startswith(f"#!{prefix}/bin/python")
    # No staged path left in the scripts or pyvenv.cfg.
    for name in os.listdir(venv + "/bin"):
        p = os.path.join(venv, "bin", name)
        if os.path.isfile(p) and not os.path.islink(p):
            with open(p, "rb") as f:
                assert dest.encode() not in f.read(), name
    with open(venv + "/pyvenv.cfg") as f:
        assert dest not in f.read()
    # The staged interpreter works (and finds mdserver and its dependencies).
    check = subprocess.run([venv + "/bin/python", "-c",
                            "import mdserver, bottle, granian, yaml, xmltodict"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    staged = listing(dest)
    assert f"{prefix[1:]}/bin/mdserver" in staged
    assert [p for p in staged if not p.startswith(prefix[1:] + "/")] == \
        sorted(INSTALLED + ["opt/"])
    # Again: the source did not change, so pip is not run and nothing changes.
    before = snapshot(dest)
    proc = run(["--destdir", dest, "--prefix", prefix], stubs)
    assert "nothing changed" in proc.stdout
    assert snapshot(dest) == before
    run(["--destdir", dest, "--purge"], stubs)
    assert listing(dest) == []
    assert stub_calls(stubs) == ""
