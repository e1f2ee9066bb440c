"""Three hypervisors on one etcd registry: real etcd, real daemons, real dnsmasq, real guests.

Each host is a network namespace with its bridge (10.122.0.1, the metadata
address), its dnsmasq and its mdserver ([store] backend = etcd); all three
reach one etcd (tests/etcd_lab.py) over veths. Guests are namespaces on a
host's bridge; "live migration" is the destination's registration (what its
libvirt hook does at the incoming start) and the guest's namespace moving to
the destination's bridge with its MAC and address (no libvirt here: the
libvirt side of migration is tests/test_enroll.py's).
"""

import concurrent.futures
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from daemon import ROOT, Daemon
from etcd_lab import EtcdLab
from helpers import domain_xml, need, need_root, wait_for, write_config
from hermetic import hermetic_env
from mdserver import adminclient
import netns
from netns import Lab, exec_in

pytestmark = pytest.mark.privileged

HOSTS = ("hv-a", "hv-b", "hv-c")
# The EC2 route: the instance-id the records show is the one the guests fetch here.
NET = "[libvirt]\nroute = ec2\n[dnsmasq]\nnet_prefix = 23\ndomain = mds.test\nuse_dns = yes\n" \
      "lease_len = 600\nupstream_servers = 127.0.0.1\n"
# Changes made elsewhere reach a host that was cut off from etcd within this
# (the watch retries within 2 s, then etcd replays what it missed).
CATCH_UP = 15.0
HOOK = os.path.join(ROOT, "hooks", "qemu")
FETCH = ("import sys, urllib.request\n"
         "print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())")


def uuid_of(host: int, n: int) -> str:
    return f"ec2{host:05d}-aaaa-4bbb-8ccc-{n:012d}"


def mac_of(host: int, n: int) -> str:
    return f"52:54:{host:02x}:00:{n // 256:02x}:{n % 256:02x}"


class Host:
    def __init__(self, name, etcd, tmp):
        self.name, self.tmp = name, tmp
        tmp.mkdir()
        self.lab = Lab(gateway="10.122.0.1/16")
        self.etcd_address = etcd.attach(self.lab.host)
        self.config = write_config(
            tmp, NET + "[store]\nbackend = etcd\n"
                       f"endpoints = {','.join(etcd.endpoints)}\nhost = {name}\n",
            listen_address="169.254.169.254", port=80)
        self.admin = str(tmp / "admin.sock")
        self.daemon = None
        self.dnsmasq = None

    def start(self):
        self.daemon = Daemon(self.config, "169.254.169.254", 80, netns=self.lab.host)
        self.daemon.wait_ready(30)
        if self.dnsmasq is None:
            self.dnsmasq = netns.start_dnsmasq(self.lab.host, self.tmp / "dnsmasq",
                                               self.tmp / "dnsmasq.log")
        return self

    def call(self, method, url, body=None):
        return adminclient.request(self.admin, method, url, body)

    def register(self, name, uuid, mac):
        return self.call("POST", "/instance-upload", domain_xml(name, uuid, mac).encode())

    def registered(self, name, uuid, mac):
        """register(), which must succeed: the record."""
        status, data = self.register(name, uuid, mac)
        assert status == 200, data
        return json.loads(data)

    def records(self):
        status, data = self.call("GET", "/instances")
        assert status == 200, data
        return json.loads(data)

    def connected(self):
        """Whether the daemon's store reports its etcd watch up."""
        status, data = self.call("GET", "/store")
        assert status == 200, data
        return json.loads(data)["connected"]

    def dhcp_file(self, uuid):
        return self.tmp / "dnsmasq" / "dhcp-hosts" / uuid

    def close(self):
        if self.daemon is not None:
            self.daemon.stop()
        if self.dnsmasq is not None and self.dnsmasq.poll() is None:
            self.dnsmasq.send_signal(signal.SIGTERM)
            self.dnsmasq.wait(10)
        self.lab.close()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    need_root()
    need(shutil.which("etcd") is not None, "needs etcd (apt-get install etcd-server)")
    need(shutil.which("dnsmasq") is not None, "needs dnsmasq (apt-get install dnsmasq-base)")
    need(shutil.which("busybox") is not None, "needs busybox (nslookup)")
    tmp = tmp_path_factory.mktemp("fleet")
    etcd = EtcdLab(members=1)
    hosts = []
    try:
        etcd.start()
        etcd.attach(None)
        hosts.extend(Host(n, etcd, tmp / n) for n in HOSTS)
        for h in hosts:
            h.start()
        yield etcd, hosts
    finally:
        for h in hosts:
            h.close()
        etcd.close()


def guest_get(host, index, mac, ip, path="/latest/meta-data/instance-id"):
    ns = host.lab.guest(index, mac, ip)
    try:
        r = subprocess.run(exec_in(ns, [sys.executable, "-c", FETCH,
                                        "http://169.254.169.254" + path]),
                           capture_output=True, text=True, timeout=20)
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        host.lab.namespaces.remove(ns)
    return r.returncode, r.stdout.strip(), r.stderr


def resolve(host, name):
    ns = host.lab.guest(99, "52:54:00:99:99:99", "10.122.1.250")
    try:
        r = subprocess.run(exec_in(ns, ["busybox", "nslookup", name, "10.122.0.1"]),
                           capture_output=True, text=True, timeout=20)
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        host.lab.namespaces.remove(ns)
    return [a for a in re.findall(r"^Address: (\d+\.\d+\.\d+\.\d+)$", r.stdout, re.M)
            if a != "10.122.0.1"]


def test_concurrent_registrations_on_three_hosts(fleet):
    """3 x 100 at once, plus 10 names every host wants: 310 records, no
    address or name twice, each host the owner of what it won."""
    etcd, hosts = fleet
    jobs = [(h, f"{h.name}-vm{n}", uuid_of(i, n), mac_of(i, n))
            for i, h in enumerate(hosts) for n in range(100)]
    jobs += [(h, f"shared{n}", uuid_of(i, 1000 + n), mac_of(i, 1000 + n))
             for i, h in enumerate(hosts) for n in range(10)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=48) as pool:
        results = list(pool.map(lambda j: (j, j[0].register(*j[1:])), jobs))
    ok = [(j, r) for j, r in results if r[0] == 200]
    refused = [(j, r) for j, r in results if r[0] != 200]
    unexpected = [(j[1], r) for j, r in refused if not j[1].startswith("shared")]
    assert len(ok) == 310, unexpected or [r for _, r in refused][:5]
    assert all(r[0] == 409 and b"held by" in r[1] for _, r in refused), refused[:5]
    assert len(refused) == 20  # each shared name: one winner, two refusals
    for h in hosts:  # every cache has every record
        wait_for(lambda: len(h.records()) == 310, CATCH_UP, f"{h.name} sees 310 records")
    records = hosts[2].records()
    assert len({r["ip"] for r in records}) == 310
    assert len({r["name"] for r in records}) == 310
    net = ipaddress.IPv4Network("10.122.0.0/23")
    assert all(ipaddress.IPv4Address(r["ip"]) in net for r in records)
    for (h, name, uuid, mac), r in ok:
        assert next(x for x in records if x["uuid"] == uuid)["host"] == h.name
    # each host hands out DHCP only for its own
    for h in hosts:
        own = {r["uuid"] for r in records if r["host"] == h.name}
        assert set(os.listdir(h.tmp / "dnsmasq" / "dhcp-hosts")) == own
        assert len(os.listdir(h.tmp / "dnsmasq" / "hosts")) == 310
    # the admin's view: a HOST column once instances belong to several hosts
    listing = subprocess.run([sys.executable, "-m", "mdserver.ctl", "-c", hosts[0].config,
                              "list"], capture_output=True, text=True, cwd=ROOT).stdout
    lines = listing.splitlines()
    assert lines[0].split()[-1] == "HOST" and len(lines) == 311
    assert sum(line.split()[-1] == "hv-b" for line in lines[1:]) == \
        sum(r["host"] == "hv-b" for r in records)


def test_names_resolve_on_every_host_and_guests_are_served_by_their_host(fleet):
    etcd, hosts = fleet
    a, b, _ = hosts
    rec = a.registered("dns-one", uuid_of(0, 2000), mac_of(0, 2000))
    ip = rec["ip"]
    wait_for(lambda: resolve(b, "dns-one.mds.test") == [ip], CATCH_UP,
             "host B's dnsmasq resolves a name registered on host A")
    rc, out, err = guest_get(a, 1, mac_of(0, 2000), ip)
    assert rc == 0 and out == rec["instance_id"], err


def test_live_migration_keeps_identity_and_moves_service(fleet):
    etcd, hosts = fleet
    a, b, _ = hosts
    uuid, mac = uuid_of(0, 3000), mac_of(0, 3000)
    assert a.register("mover", uuid, mac)[0] == 200
    before = next(r for r in a.records() if r["uuid"] == uuid)
    assert a.dhcp_file(uuid).exists() and not b.dhcp_file(uuid).exists()
    # the destination's hook at the incoming start
    status, data = b.register("mover", uuid, mac)
    assert status == 200, data
    after = next(r for r in b.records() if r["uuid"] == uuid)
    assert after["host"] == "hv-b"
    assert (after["ip"], after["instance_id"], after["name"]) == (
        before["ip"], before["instance_id"], before["name"])
    assert b.dhcp_file(uuid).exists()
    wait_for(lambda: not a.dhcp_file(uuid).exists(), CATCH_UP,
             "the source drops the DHCP entry")
    # the guest, now on B's bridge, is answered by B
    rc, out, err = guest_get(b, 2, mac, after["ip"])
    assert rc == 0 and out == before["instance_id"], err
    # the source's removal logic never deletes the destination's record
    status, data = a.call("DELETE", "/instances/" + uuid)
    assert status == 409 and b"belongs to host hv-b" in data
    assert any(r["uuid"] == uuid for r in b.records())


def _partition(etcd, host, up):
    outer = next(link for ns, link in etcd._links if ns == host.lab.host)
    netns.ip("link", "set", outer, "up" if up else "down", netns=host.lab.host)


def test_a_host_cut_off_from_etcd_answers_from_its_cache_and_catches_up(fleet):
    etcd, hosts = fleet
    a, b, _ = hosts
    uuid, mac = uuid_of(0, 4000), mac_of(0, 4000)
    ip = a.registered("steady", uuid, mac)["ip"]
    _partition(etcd, a, up=False)
    try:
        wait_for(lambda: not a.connected(), 15,
                 "host A notices the outage")
        rc, out, err = guest_get(a, 3, mac, ip)
        assert rc == 0 and out.startswith("i-"), err  # guests: from the cache
        # every VM start runs the hook: an unchanged domain still registers
        t0 = time.monotonic()
        assert a.register("steady", uuid, mac)[0] == 200
        status, data = a.register("newcomer", uuid_of(0, 4001), mac_of(0, 4001))
        assert status == 503 and b"etcd" in data, data
        assert a.call("DELETE", "/instances/" + uuid)[0] == 503
        assert time.monotonic() - t0 < 4.5  # three calls, each failing fast
        hook = _run_hook(a, "hook-new", uuid_of(0, 4002), mac_of(0, 4002))
        assert hook < 1.8, f"the hook took {hook:.2f} s"
        # meanwhile, another host registers
        assert b.register("while-away", uuid_of(1, 4003), mac_of(1, 4003))[0] == 200
    finally:
        _partition(etcd, a, up=True)
    took = wait_for(lambda: any(r["name"] == "while-away" for r in a.records()), CATCH_UP,
                    "host A's cache catches up")
    print(f"caught up {took:.1f} s after the link came back")
    assert a.register("newcomer", uuid_of(0, 4001), mac_of(0, 4001))[0] == 200
    assert resolve(a, "while-away.mds.test") != []


def _run_hook(host, name, uuid, mac):
    env = hermetic_env({"PATH": os.environ["PATH"], "MDSERVER_CONFIG": host.config,
                        "MDSERVER_HOOK_SYSLOG": str(host.tmp / "no-syslog"),
                        "MDSERVER_HOOK_DEFAULT_SOCKET": str(host.tmp / "no.sock")})
    t0 = time.monotonic()
    r = subprocess.run(["/usr/bin/python3", HOOK, name, "prepare", "begin", "-"],
                       input=domain_xml(name, uuid, mac).encode(), env=env,
                       capture_output=True, timeout=10)
    took = time.monotonic() - t0
    assert r.returncode == 0 and r.stdout == b"", r
    return took


def test_etcd_down_everywhere_then_back(fleet):
    etcd, hosts = fleet
    a, b, c = hosts
    uuid, mac = uuid_of(2, 5000), mac_of(2, 5000)
    ip = c.registered("survivor", uuid, mac)["ip"]
    etcd.stop_all()
    try:
        wait_for(lambda: not c.connected(), 15,
                 "host C notices")
        rc, out, _ = guest_get(c, 4, mac, ip)
        assert rc == 0 and out.startswith("i-")
        assert c.register("survivor", uuid, mac)[0] == 200
        assert c.register("late", uuid_of(2, 5001), mac_of(2, 5001))[0] == 503
    finally:
        etcd.start_all()
    for h in hosts:
        wait_for(h.connected, CATCH_UP,
                 f"{h.name} reconnects")
    assert c.register("late", uuid_of(2, 5001), mac_of(2, 5001))[0] == 200
    wait_for(lambda: any(r["name"] == "late" for r in a.records()), CATCH_UP,
             "every cache sees a registration made after the outage")


def test_a_second_daemon_for_the_same_host_name_refuses_to_start(fleet, tmp_path):
    etcd, hosts = fleet
    config = write_config(tmp_path, NET + "[store]\nbackend = etcd\n"
                                          f"endpoints = {','.join(etcd.endpoints)}\n"
                                          "host = hv-a\n", port=0,
                          listen_address="127.0.0.1")
    d = Daemon(config, netns=hosts[0].lab.host)
    try:
        assert d.proc.wait(30) == 1
    finally:
        d.stop()
    out = d.output().strip().splitlines()
    assert any("already served by another mdserver" in line for line in out), out


def test_kill_9_during_registrations_loses_nothing_acknowledged(fleet):
    etcd, hosts = fleet
    _, b, _ = hosts
    jobs = [(f"crash{n}", uuid_of(1, 6000 + n), mac_of(1, 6000 + n)) for n in range(80)]
    acked = []

    def one(job):
        status, _ = b.register(*job)
        if status == 200:
            acked.append(job[1])

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(one, j) for j in jobs]
        # Killed once some are acknowledged, not after a fixed time: how
        # fast registrations go depends on the machine and the code.
        deadline = time.monotonic() + 30
        while len(acked) < 5 and time.monotonic() < deadline:
            time.sleep(0.005)
        os.killpg(b.daemon.proc.pid, signal.SIGKILL)
        b.daemon.proc.wait()
        concurrent.futures.wait(futures)
    assert 0 < len(acked) < len(jobs), "the kill must land mid-way"
    b.daemon.log.close()
    b.start()  # same host name: the dead daemon's lease is not in the way
    records = b.records()
    uuids = {r["uuid"] for r in records}
    assert set(acked) <= uuids
    assert len({r["ip"] for r in records}) == len(records)
    # the registrations that never got an answer can simply be made again
    for job in jobs:
        assert b.register(*job)[0] == 200
    assert len({r["ip"] for r in b.records()}) == len(b.records())
