"""Hop limit: a container behind NAT inside a guest gets no token and no answer; the guest does.

Real daemon on 169.254.169.254:80 in a host namespace, the rule set that
`mdserverctl nft` prints (what mdserver.service loads) applied there; the
guest is a namespace on the bridge that forwards and masquerades for a
"container" namespace behind it, as Docker's default bridge does.
"""

import subprocess
import sys

import pytest

from daemon import ROOT, Daemon
from helpers import domain_xml, need, need_root, write_config
from mdserver import adminclient
from netns import Lab, exec_in, guest_requests, ip

pytestmark = pytest.mark.privileged

GUEST = ("nat-guest", "ec2b0001-aaaa-4bbb-8ccc-000000000001", "52:54:00:bb:00:01")
REQUESTS = [["PUT", "/latest/api/token"], ["GET", "/latest/meta-data/instance-id"],
            ["GET", "/openstack/latest/meta_data.json"]]
NAT = """table ip nat {
    chain post { type nat hook postrouting priority srcnat; oifname "eth0" masquerade; }
}
"""


def sh(ns, *cmd, stdin=None):
    subprocess.run(exec_in(ns, list(cmd)), input=stdin, text=True, check=True,
                   capture_output=True)


@pytest.mark.parametrize("hop_limit", [1, 2, 0])
def test_answers_do_not_cross_a_nat_inside_the_guest(tmp_path, hop_limit):
    need_root()
    need(subprocess.run(["which", "nft"], capture_output=True).returncode == 0,
         "needs nft (apt-get install nftables)")
    lab = Lab()
    d = None
    try:
        path = write_config(tmp_path, "[libvirt]\nroute = ec2\n",
                            listen_address="169.254.169.254", port=80, hop_limit=hop_limit)
        rules = subprocess.run([sys.executable, "-m", "mdserver.ctl", "-c", path, "nft"],
                               capture_output=True, text=True, check=True, cwd=ROOT).stdout
        sh(lab.host, "nft", "-f", "-", stdin=rules)
        d = Daemon(path, "169.254.169.254", 80, netns=lab.host).wait_ready(30)
        rec = adminclient.call(str(tmp_path / "admin.sock"), "POST", "/instance-upload",
                               domain_xml(*GUEST).encode())
        guest = lab.guest(1, GUEST[2], rec["ip"])
        # the container: a namespace behind the guest, masqueraded to its address
        container = f"mdt-c-{lab.tag}"
        lab._add_ns(container)
        ip("link", "add", "c0", "netns", guest, "type", "veth", "peer", "name", "eth0",
           "netns", container)
        ip("addr", "add", "10.200.0.1/24", "dev", "c0", netns=guest)
        ip("link", "set", "c0", "up", netns=guest)
        ip("addr", "add", "10.200.0.2/24", "dev", "eth0", netns=container)
        ip("link", "set", "eth0", "up", netns=container)
        ip("link", "set", "lo", "up", netns=container)
        ip("route", "add", "default", "via", "10.200.0.1", netns=container)
        sh(guest, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        sh(guest, "nft", "-f", "-", stdin=NAT)

        from_guest = guest_requests(guest, REQUESTS)
        assert [s for s, _ in from_guest] == [200, 200, 200], from_guest
        assert from_guest[1][1] == rec["instance_id"]
        from_container = guest_requests(container, REQUESTS, timeout=2.0)
        if hop_limit == 1:
            # the guest's forwarding drops every answer (TTL 1 -> 0): nothing arrives
            assert [s for s, _ in from_container] == [0, 0, 0], from_container
            assert all(rec["instance_id"] not in body for _, body in from_container)
        else:
            # 2: one hop allowed (hop_limit = 2 for containers); 0: the rule is off,
            # which is what the check prevents
            assert [s for s, _ in from_container] == [200, 200, 200], from_container
            assert from_container[1][1] == rec["instance_id"]
    finally:
        if d is not None:
            d.stop()
        lab.close()
