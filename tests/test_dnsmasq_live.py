"""Real dnsmasq from the generated mds.conf, real DHCP clients, in network namespaces.

The daemon runs in the host namespace (bridge with 10.122.0.1/16 and
169.254.169.254/32) and registers domains through its admin socket, as the
libvirt hook does; dnsmasq runs there from the generated configuration; each
guest is a namespace whose eth0 carries a registered MAC and asks busybox
udhcpc for an address, then busybox nslookup for names.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import time

import pytest

from helpers import domain_xml, need, need_root, write_config
from daemon import Daemon
from mdserver import adminclient
import netns
from netns import Lab, exec_in

pytestmark = pytest.mark.privileged

DOMAINS = {
    "alpha": ("ec2a0001-aaaa-4bbb-8ccc-000000000001", "52:54:00:aa:00:01"),
    "beta": ("ec2a0002-aaaa-4bbb-8ccc-000000000002", "52:54:00:aa:00:02"),
    "gamma": ("ec2a0003-aaaa-4bbb-8ccc-000000000003", "52:54:00:aa:00:03"),
}
DHCP_SCRIPT = """#!/bin/sh
if [ "$1" = bound ]; then
    ip addr add "$ip/$mask" dev "$interface"
    set -- $staticroutes
    while [ $# -ge 2 ]; do ip route add "$1" via "$2" dev "$interface"; shift 2; done
    echo "BOUND ip=$ip router=$router dns=$dns domain=$domain hostname=$hostname lease=$lease"
    echo "ROUTES $staticroutes"
fi
exit 0
"""


@pytest.fixture
def live(tmp_path):
    need_root()
    need(shutil.which("dnsmasq") is not None, "needs dnsmasq (apt-get install dnsmasq-base)")
    need(shutil.which("busybox") is not None, "needs busybox (udhcpc, nslookup)")
    lab = Lab()
    procs = []
    try:
        path = write_config(tmp_path, "[dnsmasq]\ndomain = mds.test\nuse_dns = yes\n"
                                      "lease_len = 600\nupstream_servers = 127.0.0.1\n",
                            listen_address="169.254.169.254", port=80)
        notify = str(tmp_path / "notify.sock")
        ready = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        ready.bind(notify)
        ready.settimeout(20)
        d = Daemon(path, "169.254.169.254", 80, env={"NOTIFY_SOCKET": notify}, netns=lab.host)
        procs.append(d)
        try:
            assert ready.recv(256).startswith(b"READY=1"), d.output()
        finally:
            ready.close()
        script = tmp_path / "udhcpc.sh"
        script.write_text(DHCP_SCRIPT)
        script.chmod(0o755)
        lab.tmp, lab.daemon, lab.script = tmp_path, d, str(script)
        lab.admin = str(tmp_path / "admin.sock")
        lab.base = tmp_path / "dnsmasq"
        yield lab
    finally:
        for p in getattr(lab, "dnsmasq", []):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(10)
        for d in procs:
            d.stop()
        lab.close()


def register(lab, name):
    uuid, mac = DOMAINS[name]
    return adminclient.call(lab.admin, "POST", "/instance-upload",
                            domain_xml(name, uuid, mac).encode())


def start_dnsmasq(lab):
    lab.dnsmasq_log = lab.tmp / "dnsmasq.log"
    lab.dnsmasq = [netns.start_dnsmasq(lab.host, lab.base, lab.dnsmasq_log, "--log-queries")]


def dhcp(lab, index, name):
    ns = lab.guest(index, DOMAINS[name][1])
    r = subprocess.run(exec_in(ns, ["busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-f", "-O", "staticroutes",
                                    "-t", "4", "-T", "1", "-s", lab.script]),
                       capture_output=True, text=True, timeout=30)
    m = re.search(r"^BOUND (.*)$", r.stdout, re.M)
    assert m, r.stdout + r.stderr
    lease = dict(kv.split("=", 1) for kv in m.group(1).split(" "))
    lease["routes"] = re.search(r"^ROUTES (.*)$", r.stdout, re.M).group(1)
    return ns, lease


def resolve(ns, name):
    r = subprocess.run(exec_in(ns, ["busybox", "nslookup", name, "10.122.0.1"]),
                       capture_output=True, text=True, timeout=20)
    found = re.findall(r"^Address: (\d+\.\d+\.\d+\.\d+)$", r.stdout, re.M)
    resolve.last = r.stdout + r.stderr
    return [a for a in found if a != "10.122.0.1"]


def test_dhcp_and_dns_follow_registrations(live):
    alpha, beta = register(live, "alpha"), register(live, "beta")
    assert alpha["ip"] != beta["ip"]
    start_dnsmasq(live)

    ns_a, lease = dhcp(live, 1, "alpha")
    assert lease["ip"] == alpha["ip"]  # exactly its registered address
    assert (lease["router"], lease["dns"], lease["domain"]) == ("10.122.0.1", "10.122.0.1",
                                                                 "mds.test")
    assert lease["lease"] == "600" and lease["hostname"] == "ip-" + alpha["ip"].replace(".", "-")
    assert lease["routes"] == "169.254.169.254/32 10.122.0.1 0.0.0.0/0 10.122.0.1"
    assert resolve(ns_a, "alpha") == [alpha["ip"]]
    assert resolve(ns_a, "beta.mds.test") == [beta["ip"]]
    # NoCloud's s=http://metadata/nocloud/ for guests using this resolver
    assert resolve(ns_a, "metadata") == ["169.254.169.254"], resolve.last

    # registered while dnsmasq runs: lease and name work without a restart
    gamma = register(live, "gamma")
    ns_g, lease = dhcp(live, 3, "gamma")
    assert lease["ip"] == gamma["ip"]
    assert resolve(ns_a, "gamma") == [gamma["ip"]]
    assert resolve(ns_g, "alpha.mds.test") == [alpha["ip"]]

    # a MAC nobody registered gets nothing
    stranger = live.guest(9, "52:54:00:ff:ff:09")
    r = subprocess.run(exec_in(stranger, ["busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-f",
                                          "-t", "2", "-T", "1", "-s", live.script]),
                       capture_output=True, text=True, timeout=30)
    assert "BOUND" not in r.stdout

    # the guest reaches its metadata from its leased address
    r = subprocess.run(exec_in(ns_g, ["busybox", "wget", "-q", "-O", "-",
                                      "http://169.254.169.254/latest/meta-data/local-ipv4"]),
                       capture_output=True, text=True, timeout=20)
    assert r.stdout == gamma["ip"], r.stderr

    # removal: the name stops resolving (dnsmasq was signalled)
    adminclient.call(live.admin, "DELETE", "/instances/alpha")
    deadline = time.monotonic() + 10
    while resolve(ns_g, "alpha"):
        assert time.monotonic() < deadline, live.dnsmasq_log.read_text()[-2500:]
        time.sleep(0.2)
    assert resolve(ns_g, "beta") == [beta["ip"]], resolve.last
    assert live.dnsmasq[0].poll() is None
    assert not os.path.exists(live.base / "dhcp-hosts" / DOMAINS["alpha"][0])
