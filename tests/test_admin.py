"""Registration and administration against the real daemon: TCP upload, admin socket, mdserverctl."""

import json
import os
import subprocess
import sys

import pytest

from helpers import domain_xml, read_data, write_config
from daemon import ROOT, Daemon, request
from mdserver.store import Store

pytestmark = pytest.mark.process

# Guests on 127.77.0.0/16: allocated addresses are local, so the test can
# ask as the guest it just registered.
NET = "[dnsmasq]\nnet_address = 127.77.0.0\nnet_prefix = 16\ngateway = 127.77.0.1\n"
U1, M1 = "ec200001-aaaa-4bbb-8ccc-000000000001", "52:54:00:00:00:01"
U2, M2 = "ec200002-aaaa-4bbb-8ccc-000000000002", "52:54:00:00:00:02"


def libvirt_out_of_reach(tmp_path) -> str:
    """[libvirt] uri on a socket nothing listens on: `list` and `show` then
    say so in one line and show every state as unknown, and never ask the
    host's libvirt (test_ctl_list.py has the states from libvirt)."""
    return f"[libvirt]\nuri = qemu+unix:///system?socket={tmp_path}/no-libvirt.sock\n"


@pytest.fixture
def md(tmp_path):
    path = write_config(tmp_path, NET + libvirt_out_of_reach(tmp_path),
                        listen_address="127.0.0.1", port=0)
    d = Daemon(path).wait_ready()
    d.path, d.tmp = path, tmp_path
    yield d
    d.stop()


def upload(d, body, source="127.0.0.1"):
    return request(d.host, d.port, "POST", "/instance-upload", source=source,
                   headers={"Content-Type": "application/x-www-form-urlencoded"}, body=body)


def ctl(d, *args, stdin=None):
    return subprocess.run([sys.executable, "-m", "mdserver.ctl", "-c", d.path, *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=60, input=stdin)


def test_upload_from_the_host_registers_and_serves_at_once(md):
    status, headers, body = upload(md, domain_xml("vm1", U1, M1))
    assert status == 200 and headers["content-type"] == "application/json"
    record = json.loads(body)
    assert {k: record[k] for k in ("name", "uuid", "mac", "ip", "hostname")} == {
        "name": "vm1", "uuid": U1, "mac": M1, "ip": "127.77.0.2", "hostname": "vm1"}
    # the guest-facing worker sees it immediately
    status, _, iid = request(md.host, md.port, "GET", "/latest/meta-data/instance-id",
                             source="127.77.0.2")
    assert (status, iid) == (200, "i-" + U1.replace("-", "")[:17])


def test_real_dumpxml_upload(md):
    status, _, body = upload(md, read_data("web1.xml").decode())
    assert status == 200 and json.loads(body)["hostname"] == "www"


@pytest.mark.parametrize("source", ["127.0.0.5", "127.0.0.2", "127.77.0.9"])
def test_upload_from_anyone_else_is_forbidden(md, source):
    status, _, body = upload(md, domain_xml("vm1", U1, M1), source=source)
    assert status == 403 and body.count("\n") == 1
    assert json.loads(ctl(md, "list", "--json").stdout) == []


@pytest.mark.parametrize("xml, status, why", [
    ("<domain><uuid>" + U1 + "</uuid></domain>", 400, "missing <name>"),
    (domain_xml("vm1", U1, M1).replace("'mds'", "'other'"), 400, "no <interface> on network"),
    ("<!DOCTYPE x [<!ENTITY e SYSTEM 'file:///etc/passwd'>]><domain/>", 400, "DOCTYPE"),
    ("<domain", 400, "malformed XML"),
    ("<domain>" + " " * (2 * 1024 * 1024 + 10) + "</domain>", 413, "limit"),
])
def test_bad_uploads_change_nothing(md, xml, status, why):
    assert upload(md, domain_xml("keep", U2, M2))[0] == 200
    got, _, body = upload(md, xml)
    assert got == status and why in body
    assert [r["name"] for r in json.loads(ctl(md, "list", "--json").stdout)] == ["keep"]


def test_mdserverctl_lifecycle(md, tmp_path):
    xml_file = tmp_path / "vm2.xml"
    xml_file.write_text(domain_xml("vm2", U2, M2))
    r = ctl(md, "register", str(xml_file), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["ip"] == "127.77.0.2"
    assert ctl(md, "register", "-", stdin=domain_xml("vm1", U1, M1)).returncode == 0
    listed = ctl(md, "list")
    table = listed.stdout.splitlines()
    assert table[0].split() == ["NAME", "IP", "MAC", "UUID", "HOSTNAME", "ROUTE", "USERDATA",
                                "STATE"]
    assert [line.split()[0] for line in table[1:]] == ["vm1", "vm2"]
    assert [line.split()[-3:] for line in table[1:]] == [["openstack", "ok", "unknown"]] * 2
    assert listed.stderr.startswith("mdserverctl: libvirt: cannot connect to qemu+unix://")
    assert listed.stderr.count("\n") == 1
    shown = json.loads(ctl(md, "show", "127.77.0.2", "--json").stdout)
    assert shown["name"] == "vm2" and "password" in shown and "$" not in json.dumps(shown)
    assert "vm2" in ctl(md, "show", "vm2").stdout
    r = ctl(md, "remove", "vm2")
    assert r.returncode == 0 and "vm2" in r.stdout
    assert [x["name"] for x in json.loads(ctl(md, "list", "--json").stdout)] == ["vm1"]
    r = ctl(md, "remove", "vm2")
    assert r.returncode == 1 and "no instance" in r.stderr
    # freed address is quarantined: a new domain gets another one
    vm3 = domain_xml("vm3", "ec200003-aaaa-4bbb-8ccc-000000000003", "52:54:00:00:00:03")
    assert json.loads(ctl(md, "register", "-", "--json", stdin=vm3).stdout)[0]["ip"] \
        not in ("127.77.0.2", "")


def test_with_the_daemon_down_reads_work_and_writes_refuse(md):
    upload(md, domain_xml("vm1", U1, M1))
    md.stop()
    r = ctl(md, "list", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)[0]["name"] == "vm1"
    assert "not running" in r.stderr
    assert ctl(md, "show", "vm1", "--json").returncode == 0
    r = ctl(md, "remove", "vm1")
    assert r.returncode == 1 and "changes need the running daemon" in r.stderr


def test_prune_with_a_fake_virsh(md, tmp_path):
    # FAKE: a stand-in `virsh` on PATH that knows only vm1's UUID (the real
    # libvirtd is exercised in test_libvirt.py).
    fake = tmp_path / "bin" / "virsh"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\n[ \"$*\" = 'list --all --uuid' ] && echo {U1} && exit 0\n"
                    "exit 3\n")
    fake.chmod(0o755)
    upload(md, domain_xml("vm1", U1, M1))
    upload(md, domain_xml("vm2", U2, M2))
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "mdserver.ctl", "-c", md.path, *a],
                                    capture_output=True, text=True, cwd=ROOT, env=env)
    r = run("prune", "--json")
    assert [x["name"] for x in json.loads(r.stdout)] == ["vm2"]
    assert len(json.loads(ctl(md, "list", "--json").stdout)) == 2  # only listed
    r = run("prune", "--yes")
    assert r.returncode == 0 and "1 instance(s) removed" in r.stderr
    assert [x["name"] for x in json.loads(ctl(md, "list", "--json").stdout)] == ["vm1"]
    fake.write_text("#!/bin/sh\necho 'error: failed to connect' >&2\nexit 1\n")
    r = run("prune", "--yes")
    assert r.returncode == 1 and "failed to connect" in r.stderr
    assert len(json.loads(ctl(md, "list", "--json").stdout)) == 1


def test_addresses_survive_a_daemon_restart(md):
    ip = json.loads(upload(md, domain_xml("vm1", U1, M1))[2])["ip"]
    md.stop()
    d = Daemon(md.path).wait_ready()
    try:
        assert json.loads(upload(d, domain_xml("vm1", U1, M1))[2])["ip"] == ip
    finally:
        d.stop()


def test_md_server_06_database_converted_on_first_start(tmp_path):
    legacy = [{"domain_name": "old1", "domain_uuid": U1, "mds_mac": M1,
               "mds_ipv4": "127.77.3.4", "mds_ipv6": None, "first_seen": 1.0,
               "last_update": 2.0}]
    path = write_config(tmp_path, NET, listen_address="127.0.0.1", port=0)
    (tmp_path / "db.json").write_text(json.dumps(legacy))
    d = Daemon(path).wait_ready()
    try:
        assert request("127.0.0.1", d.port, "GET", "/latest/meta-data/local-ipv4",
                       source="127.77.3.4")[2] == "127.77.3.4"
        assert "converted 1 md_server 0.6 records" in d.output()
        assert json.loads((tmp_path / "db.json.md_server-0.6.bak").read_text()) == legacy
        # and its dnsmasq entry was written at start
        assert (tmp_path / "dnsmasq" / "dhcp-hosts" / U1).read_text().startswith(M1)
    finally:
        d.stop()
    assert len(Store(str(tmp_path / "db.json"), writable=False)) == 1


def test_names_with_odd_characters(md):
    odd = "web server #1 (test)"
    assert upload(md, domain_xml(odd, U1, M1))[0] == 200
    r = ctl(md, "show", odd, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["name"] == odd
    assert ctl(md, "remove", odd).returncode == 0
    assert json.loads(ctl(md, "list", "--json").stdout) == []


def test_a_failing_template_is_seen_at_registration_and_in_list_and_show(md):
    (md.tmp / "userdata" / "vm1").write_text("#cloud-config\nkey: {{no_such_name}}\n")
    r = ctl(md, "register", "-", "--json", stdin=domain_xml("vm1", U1, M1))
    assert r.returncode == 0  # registered all the same: the VM must start
    assert json.loads(r.stdout)[0]["userdata"].startswith("error: ")
    assert "vm1 (%s): user-data fails" % U1 in md.output()
    ctl(md, "register", "-", stdin=domain_xml("vm2", U2, M2))
    rows = [line.split() for line in ctl(md, "list").stdout.splitlines()[1:]]
    assert [(r[0], r[-2]) for r in rows] == [("vm1", "ERROR"), ("vm2", "ok")]
    assert "no_such_name" in ctl(md, "show", "vm1").stdout
    md.stop()  # read from the database, the same verdict
    shown = json.loads(ctl(md, "show", "vm1", "--json").stdout)
    assert shown["userdata"].startswith("error: ") and "no_such_name" in shown["userdata"]
