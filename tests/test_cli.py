"""mdserverctl and the daemon's command line, run as real commands."""

import os
import shutil
import subprocess
import sys

import pytest
import yaml

from helpers import DATA_DIR, make_instance, need, read_data, write_config
from daemon import ROOT, Daemon, request
from mdserver import routes
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


# -- mdserverctl route --xml (the transformation itself: test_routes.py) --------

def _golden(name):
    with open(os.path.join(ROOT, "tests", "golden", name)) as f:
        return f.read()


def test_route_xml_prints_the_domain_with_its_route(tmp_path):
    path = write_config(tmp_path)
    data = os.path.join(DATA_DIR, "route_q35.xml")
    r = ctl("-c", path, "route", "--xml", data, "--route", "openstack")
    assert r.returncode == 0, r.stderr
    assert r.stdout == _golden("route_q35_openstack.xml")
    lines = r.stderr.splitlines()
    assert lines[0] == "# web2: route openstack in place, 7 change(s)"
    assert "change: added <sysinfo> entry product=OpenStack Nova" in lines
    assert any(line.startswith("equivalent: virt-install ... --sysinfo 'smbios,") for line in lines)
    # the default: the route the domain shows, else [libvirt] route
    path = write_config(tmp_path, "[libvirt]\nroute = nocloud-net\n")
    r = ctl("-c", path, "route", "--xml", data)
    assert (r.returncode, r.stdout) == (0, _golden("route_q35_nocloud-net.xml")), r.stderr
    shown = tmp_path / "shown.xml"
    shown.write_text(_golden("route_q35_openstack.xml"))
    r = ctl("-c", path, "route", "--xml", str(shown))
    assert (r.returncode, r.stdout) == (0, shown.read_text()), r.stderr
    assert r.stderr == "# web2: route openstack in place, 0 change(s)\n"


def test_route_xml_seed_image_and_switching(tmp_path):
    path = write_config(tmp_path)
    shown = tmp_path / "shown.xml"
    shown.write_text(_golden("route_q35_openstack.xml"))
    r = ctl("-c", path, "route", "--xml", str(shown), "--route", "configdrive")
    assert (r.returncode, r.stdout) == (1, shown.read_text())
    assert "problem: the domain already shows route openstack" in r.stderr
    r = ctl("-c", path, "route", "--xml", str(shown), "--route", "configdrive", "--force",
            "--diff")
    assert r.returncode == 0, r.stderr
    seed = f"{tmp_path}/seeds/5f0c7d4e-3b1a-4c8e-9d2f-6a7b8c9d0e1f.iso"
    assert f"+      <source file='{seed}' startupPolicy='optional'/>" in r.stdout
    assert "-      <entry name='product'>OpenStack Nova</entry>" in r.stdout
    assert "problem: route switched from openstack to configdrive" in r.stderr


def test_route_xml_problems_exit_1(tmp_path):
    path = write_config(tmp_path)
    data = os.path.join(DATA_DIR, "route_q35.xml")
    r = ctl("-c", path, "route", "--xml", data, "--route", "ec2")
    assert r.returncode == 1
    assert r.stdout == read_data("route_q35.xml").decode()
    assert "route ec2 NOT in place" in r.stderr and "problem: route ec2 needs" in r.stderr
    # a domain name asks libvirt: here its in-process test driver, never the host's
    (tmp_path / "lv").mkdir()
    lv = write_config(tmp_path / "lv", "[libvirt]\nuri = test:///default\n")
    r = ctl("-c", lv, "route", "web2")
    assert r.returncode == 1 and ("libvirt has no domain 'web2' (test:///default)" in r.stderr
                                  or "Python binding is missing" in r.stderr), r.stderr
    (tmp_path / "bad.xml").write_text("<domain><name>x</name></domain>")
    r = ctl("-c", path, "route", "--xml", str(tmp_path / "bad.xml"))
    assert r.returncode == 1 and "missing <uuid>" in r.stderr


def test_route_outputs_survive_libvirts_parser(tmp_path):
    """Every golden output is accepted by libvirt's own domain parser (the
    test driver, inside virsh: no daemon) and, as libvirt writes it back
    (its quoting, its order, addresses filled in), needs no further change."""
    need(shutil.which("virsh") is not None, "needs virsh (libvirt-clients)")
    env = dict(os.environ, HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / "config"),
               XDG_CACHE_HOME=str(tmp_path / "cache"), XDG_RUNTIME_DIR=str(tmp_path / "run"))
    for name in ("q35", "pc", "sysinfo"):
        for route in ("openstack", "ec2", "nocloud-net", "configdrive", "nocloud"):
            text = _golden(f"route_{name}_{route}.xml")
            facts = routes.domain_facts(text)
            path = tmp_path / "domain.xml"
            path.write_text(text)
            r = subprocess.run(["virsh", "-q", "-c", "test:///default",
                                f"define {path}; dumpxml --inactive {facts.uuid}"],
                               capture_output=True, text=True, env=env, timeout=60)
            assert r.returncode == 0, f"{name} {route}: {r.stderr}"
            dumped = r.stdout[r.stdout.index("<domain"):]
            plan = routes.plan(dumped, route, f"/var/lib/mdserver/seeds/{facts.uuid}.iso")
            assert not plan.changed, f"{name} {route}: {plan.changes}"
            assert routes.existing_route(dumped) == routes.existing_route(text)


def test_version_of_each_command():
    from mdserver import __version__
    r = run_cli("daemon_main", "--version")
    assert (r.returncode, r.stdout) == (0, f"mdserver {__version__}\n"), r.stderr
    r = run_cli("ctl_main", "--version")
    assert (r.returncode, r.stdout) == (0, f"mdserverctl {__version__}\n"), r.stderr
