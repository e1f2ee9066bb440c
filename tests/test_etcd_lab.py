"""The etcd lab (tests/etcd_lab.py): real etcd members in a namespace of their own.

Reached through the v3 JSON gateway from the pytest process (root
namespace, after attach(None)) and with etcdctl from another namespace, as
a "hypervisor" namespace of the multi-host tests reaches it; members
stopped, killed and restarted on their data dirs; nothing left behind.
"""

import os
import shutil
import subprocess
import sys

import pytest

from etcd_lab import CLIENT_PORT, EtcdHTTPError, EtcdLab, EtcdLabError
from helpers import need, need_root
from netns import ip

pytestmark = pytest.mark.privileged

HEALTH = """
import json, sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
with opener.open(sys.argv[1] + "/health", timeout=5) as r:
    print(json.load(r)["health"])
"""


@pytest.fixture(autouse=True)
def need_etcd():
    need_root()
    need(shutil.which("etcd") is not None, "needs etcd (apt-get install etcd-server)")


def leftovers(lab: EtcdLab) -> list:
    """The lab's namespace, links and temp dir, if any is still there."""
    found = [n for n in ip("netns", "list").split() if lab.tag in n]
    found += [n for n in ip("-o", "link").split() if lab.tag in n]
    if lab.tmpdir and os.path.exists(lab.tmpdir):
        found.append(lab.tmpdir)
    return found


def test_single_member_put_get_from_the_root_namespace():
    with EtcdLab(members=1) as lab:
        assert lab.netns == f"mdt-etcd-{lab.tag}" and lab.bridge.startswith("mdt")
        assert os.path.basename(lab.tmpdir).startswith("mdt-etcd-")
        assert lab.address.startswith("10.251.") and lab.address.endswith(".1")
        assert lab.endpoints == [f"http://{lab.address}:{CLIENT_PORT}"]
        with pytest.raises(EtcdLabError, match="attach"):
            lab.put("k", "v")

        mine = lab.attach(None)
        assert mine == lab.prefix + "11" and lab.attach(None) == mine
        # the only route the root namespace gained: the /24, directly connected
        routes = [r for r in ip("-4", "route", "show", "table", "all").splitlines()
                  if lab.prefix in r and not r.startswith(("local", "broadcast"))]
        assert [r.split()[0] for r in routes] == [lab.subnet], routes

        start = lab.revision()
        r1 = lab.put("mdt/a", "one")
        assert r1 == start + 1
        assert lab.get("mdt/a") == b"one"
        assert lab.get("mdt/missing") is None
        r2 = lab.put(b"mdt/a", b"two\x00")
        assert lab.get("mdt/a") == b"two\x00" and lab.revision() == r2
        assert lab.get("mdt/a", revision=r1) == b"one"
        lab.compact(r2)
        with pytest.raises(EtcdHTTPError, match="compacted") as e:
            lab.get("mdt/a", revision=r1)
        assert e.value.body["code"] == 11  # OutOfRange
    assert leftovers(lab) == []
    lab.close()  # idempotent


def test_reachable_from_another_namespace_and_torn_down():
    need(shutil.which("etcdctl") is not None, "needs etcdctl (apt-get install etcd-client)")
    lab = EtcdLab()
    other = f"mdt-etcdc-{os.urandom(3).hex()}"
    ip("netns", "add", other)
    try:
        ip("link", "set", "lo", "up", netns=other)
        lab.start()
        mine, theirs = lab.attach(None), lab.attach(other)
        assert mine != theirs and theirs.startswith(lab.prefix)
        assert ip("-4", "route", netns=other).split()[:3] == [lab.subnet, "dev",
                                                              f"mdtea2{lab.tag}"]
        assert len(ip("-4", "route", netns=other).splitlines()) == 1
        assert len(ip("-6", "route", netns=other).splitlines()) == 0

        r = lab.etcdctl("endpoint", "health", in_netns=other)
        assert "is healthy" in r.stdout + r.stderr
        lab.etcdctl("put", "mdt/from-other", "hello", in_netns=other)
        assert lab.get("mdt/from-other") == b"hello"
        out = subprocess.run(["ip", "netns", "exec", other, sys.executable, "-c", HEALTH,
                              lab.endpoints[0]], capture_output=True, text=True, timeout=20)
        assert out.stdout.strip() == "true", out.stderr

        lab.close()
        assert leftovers(lab) == []
        assert lab.tag not in ip("-o", "link", netns=other)  # its veth end went too
    finally:
        lab.close()
        subprocess.run(["ip", "netns", "del", other], capture_output=True)


def test_three_members_keep_writing_with_one_down_and_keep_data_over_a_full_stop():
    with EtcdLab(members=3) as lab:
        assert lab.endpoints == [f"http://{lab.address}:{CLIENT_PORT + i}" for i in range(3)]
        lab.attach(None)
        lab.put("mdt/k", "v1")

        lab.stop_member(0)              # the member call() would ask first
        assert lab.running() == [1, 2]
        lab.put("mdt/k", "v2")          # 2 of 3: a quorum
        assert lab.get("mdt/k") == b"v2"
        with pytest.raises(EtcdLabError):
            lab.get("mdt/k", endpoint=lab.endpoints[0])
        lab.start_member(0)             # rejoins on its data dir and catches up
        assert lab.get("mdt/k", endpoint=lab.endpoints[0]) == b"v2"

        lab.kill_member(2)              # maybe the leader: wait for the next
        lab.wait_ready()
        lab.put("mdt/k", "v3")
        lab.start_member(2)
        assert lab.get("mdt/k", endpoint=lab.endpoints[2]) == b"v3"
        before = lab.revision()

        lab.stop_all()                  # etcd unreachable
        assert lab.running() == []
        with pytest.raises(EtcdLabError, match="no etcd member"):
            lab.get("mdt/k")
        lab.start_all()
        assert lab.running() == [0, 1, 2]
        assert lab.get("mdt/k") == b"v3" and lab.revision() == before
        lab.put("mdt/k", "v4")
    assert leftovers(lab) == []


def test_torn_down_when_the_test_fails():
    with pytest.raises(RuntimeError, match="the test failed"):
        with EtcdLab() as lab:
            lab.attach(None)
            raise RuntimeError("the test failed")
    assert leftovers(lab) == []
