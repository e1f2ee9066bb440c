"""mdserverctl list and show: each instance's state from libvirt (its in-process test driver),
times as local ISO 8601, golden files for the table, --long, --json and show."""

import json
import os
import sys
import time

import pytest

from golden import check
from helpers import make_instance, write_config
from mdserver import ctl, domains, routes
from mdserver.store import Store
from mdserver.timefmt import for_people, local_iso

pytestmark = pytest.mark.unit

libvirt = pytest.importorskip("libvirt", reason="needs libvirt-python (mdserver[enroll])")

T0 = 1700000000.0  # 2023-11-14T22:13:20Z


def uuid(n: int) -> str:
    return f"5f0c7d4e-0000-4000-8000-{n:012x}"


def test_domain_xml(n: int) -> str:
    """A domain of libvirt's test driver with no route of mdserver's yet."""
    inst = make_instance(n)
    return f"""<domain type='test'>
  <name>{inst.name}</name>
  <uuid>{uuid(n)}</uuid>
  <memory unit='MiB'>64</memory>
  <os><type>hvm</type></os>
  <devices>
    <interface type='network'><mac address='{inst.mac}'/><source network='mds'/></interface>
  </devices>
</domain>
"""


test_domain_xml.__test__ = False  # a helper, not a test


def with_route(xml: str) -> str:
    return routes.plan(xml, "openstack").xml  # the edit mdserver-enroll makes


@pytest.fixture
def local_tz():
    """A fixed local time zone with a half-hour offset (no tzdata needed)."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "XYZ-01:30"
    time.tzset()
    yield
    if old is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = old
    time.tzset()


@pytest.fixture
def world(tmp_path, local_tz):
    """Six records of hv-a's registry and libvirt's test driver (in this
    process: state shared by every connection while one is open):
    vm1 defined, shut off            -> registered
    vm2 running, route defined since -> pending: next cold boot
    vm3 running with its route       -> registered
    vm4 libvirt no longer has it     -> not defined
    vm5 hv-b's, not here             -> other host
    vm6 hv-b's, running here now     -> registered (it just migrated in)"""
    conf = write_config(tmp_path, "[store]\nhost = hv-a\n[libvirt]\nuri = test:///default\n")
    store = Store(str(tmp_path / "db.json"), host="hv-a")
    for n in range(1, 7):
        store.put(make_instance(n, uuid=uuid(n), host="hv-b" if n >= 5 else "hv-a",
                                first_seen=T0 + n, last_seen=T0 + 3600 * n,
                                route_pending=n == 2))
    store.close()
    conn = libvirt.open("test:///default")
    made = []
    try:
        made.append(conn.defineXML(with_route(test_domain_xml(1))))
        vm2 = conn.defineXML(test_domain_xml(2))
        vm2.create()
        conn.defineXML(with_route(test_domain_xml(2)))  # a running domain: next cold boot
        made.append(vm2)
        for n in (3, 6):
            dom = conn.defineXML(with_route(test_domain_xml(n)))
            dom.create()
            made.append(dom)
        yield conf
    finally:
        for dom in made:
            if dom.isActive():
                dom.destroy()
            dom.undefine()
        conn.close()


def run(capsys, *args):
    code = ctl.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_shows_each_state(world, capsys):
    code, out, err = run(capsys, "-c", world, "list")
    assert code == 0
    check("ctl_list.txt", out)
    # the daemon is down here: read from the file, said once; libvirt answered
    assert err.count("\n") == 1 and "reading" in err
    code, out, _ = run(capsys, "-c", world, "list", "--long")
    check("ctl_list_long.txt", out)
    assert "2023-11-14T23:43:21+01:30" in out  # vm1's first_seen, local


def test_list_json_keeps_epoch_seconds_and_adds_the_state(world, capsys):
    code, out, _ = run(capsys, "-c", world, "list", "--json")
    records = json.loads(out)
    assert [(r["name"], r["state"]) for r in records] == [
        ("vm1", "registered"), ("vm2", "pending: next cold boot"), ("vm3", "registered"),
        ("vm4", "not defined"), ("vm5", "other host"), ("vm6", "registered")]
    assert records[0]["first_seen"] == T0 + 1 and records[0]["last_seen"] == T0 + 3600
    check("ctl_list.json", out)


def test_show_text_and_json(world, capsys):
    code, out, _ = run(capsys, "-c", world, "show", "vm2")
    assert code == 0
    check("ctl_show.txt", out)
    code, out, _ = run(capsys, "-c", world, "show", "vm2", "--json")
    record = json.loads(out)
    assert record["state"] == "pending: next cold boot" and record["last_seen"] == T0 + 7200
    check("ctl_show.json", out)
    code, out, _ = run(capsys, "-c", world, "show", "vm4")
    assert "state           not defined\n" in out


def test_libvirt_out_of_reach_one_line_and_every_state_unknown(world, tmp_path, capsys):
    dead = f"qemu+unix:///system?socket={tmp_path}/no-libvirt.sock"
    with open(world) as f:
        text = f.read()
    with open(world, "w") as f:
        f.write(text.replace("uri = test:///default", f"uri = {dead}"))
    code, out, err = run(capsys, "-c", world, "list")
    assert code == 0
    check("ctl_list_unknown.txt", out)
    lines = [line for line in err.splitlines() if line.startswith("mdserverctl: libvirt")]
    assert len(lines) == 1 and lines[0].startswith(f"mdserverctl: libvirt: cannot connect to "
                                                   f"{dead}: ")
    assert lines[0].endswith(": states unknown")
    code, out, err = run(capsys, "-c", world, "show", "vm1")
    assert code == 0 and "state           unknown\n" in out


def test_without_the_binding_states_are_unknown(world, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "libvirt", None)  # import fails
    code, out, err = run(capsys, "-c", world, "list")
    assert code == 0 and "Python binding is missing" in err
    assert [line.split()[-2:] for line in out.splitlines()[1:]] == \
        [["unknown", "hv-a"]] * 4 + [["unknown", "hv-b"]] * 2


# -- the pure parts ----------------------------------------------------------------------

def test_state_of():
    survey = {uuid(1): domains.Domain(active=False, pending=False),
              uuid(2): domains.Domain(active=True, pending=True)}
    mine, theirs = {"uuid": uuid(3), "host": "hv-a"}, {"uuid": uuid(3), "host": "hv-b"}
    assert domains.state_of({"uuid": uuid(1).upper(), "host": "hv-b"}, survey, "hv-a") == \
        "registered"
    assert domains.state_of({"uuid": uuid(2)}, survey, "hv-a") == "pending: next cold boot"
    assert domains.state_of(mine, survey, "hv-a") == "not defined"
    assert domains.state_of(theirs, survey, "hv-a") == "other host"
    assert domains.state_of(theirs, survey, None) == "not defined"  # a registry of its own
    assert domains.state_of(mine, None, "hv-a") == "unknown"


def test_local_iso(local_tz):
    assert local_iso(T0) == "2023-11-14T23:43:20+01:30"
    assert local_iso(T0 + 0.7) == "2023-11-14T23:43:20+01:30"  # seconds, not rounded up
    assert local_iso(None) == local_iso(0) == "-"
    os.environ["TZ"] = "UTC0"
    time.tzset()
    assert local_iso(T0) == "2023-11-14T22:13:20+00:00"  # the offset even at UTC
    assert for_people({"first_seen": T0, "name": "x", "last_seen": None}) == {
        "first_seen": "2023-11-14T22:13:20+00:00", "name": "x", "last_seen": None}
