"""mdserverctl and the daemon's command line, run as real commands."""

import subprocess
import sys

import pytest
import yaml

from helpers import make_instance, write_config
from daemon import ROOT, Daemon, request
from mdserver.store import Store

pytestmark = pytest.mark.process


def ctl(*args):
    return subprocess.run([sys.executable, "-c",
                           "import sys; from mdserver.ctl import main; "
                           "sys.exit(main(sys.argv[1:]))", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def setup(tmp_path, **md):
    path = write_config(tmp_path, "[public-keys]\nadmin = ssh-ed25519 AAAAC3Nza admin@host\n",
                        **md)
    store = Store(str(tmp_path / "db.json"))
    store.put(make_instance(1, ipv4="127.0.0.5"))
    store.close()
    return path


def test_userdata_preview_by_name_and_ip(tmp_path):
    path = setup(tmp_path)
    for key in ("vm1", "127.0.0.5", make_instance(1).uuid, make_instance(1).mac):
        r = ctl("-c", path, "userdata", key)
        assert r.returncode == 0, r.stderr
        assert yaml.safe_load(r.stdout)["hostname"] == "vm1"
        assert "built-in" in r.stderr


def test_userdata_reports_invalid_yaml_with_line(tmp_path):
    path = setup(tmp_path)
    (tmp_path / "userdata" / "vm1.yaml").write_text("#cloud-config\na: 1\nb: [\n")
    r = ctl("-c", path, "userdata", "vm1")
    assert r.returncode == 1 and r.stdout == ""
    assert "vm1.yaml" in r.stderr and "line 4" in r.stderr


def test_userdata_unknown_instance(tmp_path):
    r = ctl("-c", setup(tmp_path), "userdata", "nope")
    assert r.returncode == 1 and "no instance 'nope'" in r.stderr


def test_userdata_works_while_the_daemon_runs(tmp_path):
    path = setup(tmp_path, listen_address="127.0.0.1", port=0)
    d = Daemon(path).wait_ready()
    try:
        r = ctl("-c", path, "userdata", "vm1")
        assert r.returncode == 0, r.stderr
        served = request("127.0.0.1", d.port, "GET", "/latest/user-data", source="127.0.0.5")[2]
        assert served == r.stdout
    finally:
        d.stop()


def test_daemon_demo_mode(tmp_path):
    """The demo as quickstart.sh runs it, but on any free port instead of 8169
    (test_demo.py checks that default)."""
    state = tmp_path / "demo"
    d = Daemon(str(tmp_path / "demo-run"), "127.0.0.1", args=["--demo", str(state), "--port", "0"],
               port_file=str(state / "admin.port"))
    try:
        d.wait_ready()
        out = d.output()
        assert "instance 'demo' is 127.0.0.1" in out
        assert f"curl http://127.0.0.1:{d.port}/latest/meta-data/" in out
        status, _, body = request("127.0.0.1", d.port, "GET", "/latest/meta-data/local-ipv4")
        assert (status, body) == (200, "127.0.0.1")
    finally:
        d.stop()
    assert (state / "db.json.journal").exists()


def run_cli(*args):
    return subprocess.run([sys.executable, "-c",
                           "import sys; from mdserver.cli import daemon_main; "
                           "from mdserver.ctl import main as ctl_main; "
                           f"sys.exit({args[0]}(sys.argv[1:]))", *args[1:]],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_check_config_ok_and_bad(tmp_path):
    good = tmp_path / "good.conf"
    good.write_text("[mdserver]\nport = 8080\ndebug = yes\n")
    r = run_cli("ctl_main", "check-config", str(good))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{good}: OK"
    assert r.stderr.count("\n") == 1 and "[mdserver] debug" in r.stderr  # one warning
    bad = tmp_path / "bad.conf"
    bad.write_text("[dnsmasq]\ngateway = 192.168.1.1\n")
    r = run_cli("ctl_main", "check-config", str(bad))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0
    assert f"{bad}: [dnsmasq] gateway: 192.168.1.1 is not a host address" in r.stderr


def test_daemon_refuses_bad_config_with_exit_2(tmp_path):
    bad = tmp_path / "bad.conf"
    # Every path in the test's directory: should the value ever be accepted,
    # the daemon must not reach the host's /run/mdserver or /var/lib/mdserver.
    bad.write_text("[mdserver]\nport = 70000\ndb_file = db.json\nadmin_socket = admin.sock\n"
                   "listen_address = 127.0.0.1\n[dnsmasq]\nbase_dir = dnsmasq\n")
    r = run_cli("daemon_main", str(bad))
    assert r.returncode == 2
    assert r.stderr.strip() == f"mdserver: {bad}: [mdserver] port: 70000 is outside 0..65535"
