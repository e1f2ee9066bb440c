"""Identity bound to the MAC: a guest that takes another guest's address gets none of its data.

Real daemon on 169.254.169.254:80 in a host namespace with its bridge; guests
are namespaces on the bridge with their own MACs. The spoofer uses guest A's
address with its own MAC: the host's neighbour table then maps A's address to
the spoofer's MAC, and mdserver refuses. After A re-announces itself
(gratuitous ARP, as a guest's network stack does when its link comes up),
A is answered again.
"""

import subprocess
import time

import pytest

from daemon import Daemon
from helpers import domain_xml, need_root, write_config
from mdserver import adminclient
from netns import Lab, exec_in, guest_requests as fetch

pytestmark = pytest.mark.privileged

A = ("guest-a", "ec2a0001-aaaa-4bbb-8ccc-00000000000a", "52:54:00:aa:00:0a")
B = ("guest-b", "ec2a0002-aaaa-4bbb-8ccc-00000000000b", "52:54:00:aa:00:0b")
SPOOF_MAC = "52:54:00:66:66:66"
# After A re-announces itself, it is answered again within this (the check
# sees the neighbour table's change as soon as the kernel makes it).
RECOVERY = 3.0
PATHS = ["/latest/meta-data/instance-id", "/openstack/latest/meta_data.json",
         "/nocloud/meta-data", "/latest/user-data"]


@pytest.fixture(params=["yes", "no"], ids=["check_mac", "no_check"])
def lab(request, tmp_path):
    need_root()
    lab = Lab()
    d = None
    try:
        path = write_config(tmp_path, "[libvirt]\nroute = ec2\n",
                            listen_address="169.254.169.254", port=80,
                            check_mac=request.param)
        d = Daemon(path, "169.254.169.254", 80, netns=lab.host).wait_ready(30)
        admin = str(tmp_path / "admin.sock")
        lab.records = {}
        for name, uuid, mac in (A, B):
            lab.records[name] = adminclient.call(admin, "POST", "/instance-upload",
                                                 domain_xml(name, uuid, mac).encode())
        lab.check, lab.daemon = request.param == "yes", d
        yield lab
    finally:
        if d is not None:
            d.stop()
        lab.close()


def test_a_guest_using_anothers_address_gets_none_of_its_data(lab):
    a = lab.records["guest-a"]
    ns_a = lab.guest(1, A[2], a["ip"])
    ns_b = lab.guest(2, B[2], lab.records["guest-b"]["ip"])
    assert fetch(ns_a, [["GET", PATHS[0]]]) == [[200, a["instance_id"]]]
    assert fetch(ns_b, [["GET", PATHS[0]]])[0][0] == 200

    spoofer = lab.guest(3, SPOOF_MAC, a["ip"])
    got = fetch(spoofer, [["GET", p] for p in PATHS] + [["PUT", "/latest/api/token"]])
    if not lab.check:
        # what the check prevents: without it the spoofer is guest A
        assert got[0] == [200, a["instance_id"]]
        return
    assert [status for status, _ in got] == [403] * len(got), got
    assert all(a["instance_id"] not in body and a["uuid"] not in body for _, body in got)
    assert "not the interface of the instance" in got[0][1]
    # a flood from the spoofer is logged once, not per request
    fetch(spoofer, [["GET", PATHS[0]]] * 20)
    refusals = [line for line in lab.daemon.output().splitlines()
                if "refused: the neighbour table has" in line]
    assert len(refusals) == 1, refusals
    # B, whose address nobody took, was never affected
    assert fetch(ns_b, [["GET", PATHS[0]]])[0][0] == 200

    subprocess.run(["ip", "netns", "del", spoofer], check=True)
    lab.namespaces.remove(spoofer)
    subprocess.run(exec_in(ns_a, ["busybox", "arping", "-U", "-c", "1", "-I", "eth0",
                                  "-s", a["ip"], a["ip"]]), capture_output=True, timeout=10)
    t0 = time.monotonic()
    while True:
        got = fetch(ns_a, [["GET", PATHS[0]]])
        if got == [[200, a["instance_id"]]]:
            break
        assert time.monotonic() - t0 < RECOVERY, got
        time.sleep(0.1)
    print(f"guest A answered again {time.monotonic() - t0:.2f} s after re-announcing")
