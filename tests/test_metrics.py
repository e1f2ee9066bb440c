"""Prometheus metrics: every counter moves as a real daemon (two workers) is driven; only host addresses serve them."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import timeit
import urllib.request
from typing import Dict, Iterator, Optional, Tuple

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from daemon import ROOT, Daemon, request
from helpers import domain_xml, make_instance, mds_metadata, need, need_root, write_config
from mdserver import adminclient, config, metrics
from mdserver.dnsmasq import DnsmasqFiles
from mdserver.errors import ConfigError
from mdserver.metrics import (EnrollCounts, EnrollReports, HostMetrics, Sources,
                              WorkerMetrics, classify, parse_enroll_report)

unit, process, privileged = pytest.mark.unit, pytest.mark.process, pytest.mark.privileged

DASHBOARD = os.path.join(ROOT, "docs", "grafana-mdserver.json")
NET = "[dnsmasq]\nnet_address = 127.77.0.0\nnet_prefix = 16\ngateway = 127.77.0.1\n"
METRICS_HOST = "127.0.0.3"  # the host-only listener; guests are served on 127.0.0.1
STRANGER = "127.0.0.9"      # no instance has this address
TTL = {"X-aws-ec2-metadata-token-ttl-seconds": "60"}
Sample = Tuple[str, Tuple[Tuple[str, str], ...]]


def parse(text: str) -> Dict[Sample, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Dict[Sample, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape_admin(admin: str) -> Dict[Sample, float]:
    status, body = adminclient.request(admin, "GET", "/metrics")
    assert status == 200, body
    return parse(body.decode())


# -- the pure part ------------------------------------------------------------------

@unit
@pytest.mark.parametrize("path, face, kind", [
    ("/", "ec2", "listing"),
    ("/latest", "ec2", "listing"),
    ("/2009-04-04/", "ec2", "listing"),
    ("/latest/meta-data", "ec2", "listing"),
    ("/latest/meta-data/", "ec2", "listing"),
    ("/latest/meta-data/public-keys/", "ec2", "listing"),
    ("/latest/meta-data/instance-id", "ec2", "meta-data"),
    ("/latest/dynamic/instance-identity/document", "ec2", "meta-data"),
    ("/latest/user-data", "ec2", "user-data"),
    ("/latest/api/token", "ec2", "token"),
    ("/instance-upload", "ec2", "other"),
    ("/latest/nope", "ec2", "other"),
    ("/openstack", "openstack", "listing"),
    ("/openstack/latest/", "openstack", "listing"),
    ("/openstack/latest/meta_data.json", "openstack", "meta-data"),
    ("/openstack/2018-08-27/network_data.json", "openstack", "meta-data"),
    ("/openstack/latest/user_data", "openstack", "user-data"),
    ("/openstack/latest/password", "openstack", "password"),
    ("/openstack/latest/a/b", "openstack", "other"),
    ("/nocloud/", "nocloud", "listing"),
    ("/nocloud/meta-data", "nocloud", "meta-data"),
    ("/nocloud/user-data", "nocloud", "user-data"),
    ("/nocloud/ec200001-aaaa-4bbb-8ccc-000000000001/user-data", "nocloud", "user-data"),
    ("/nocloud/a/b", "nocloud", "other"),
])
def test_a_request_is_classed_by_its_path(path, face, kind):
    assert classify(path) == (face, kind)
    assert face in metrics.FACES and kind in metrics.KINDS


@unit
def test_a_worker_counts_in_plain_integers_and_publishes_what_is_new():
    reg = CollectorRegistry()
    w = WorkerMetrics(registry=reg)
    for _ in range(3):
        w.count("/latest/meta-data/instance-id", 200)
    w.count("/latest/meta-data/nope", 404)
    w.event("unknown_guest")
    w.event("token_failure", "check")
    assert reg.get_sample_value("mdserver_requests_total", {
        "face": "ec2", "kind": "meta-data", "status": "200"}) is None  # not yet published
    w.publish()
    w.count("/latest/meta-data/instance-id", 200)
    w.publish()
    w.publish()  # nothing new: nothing added twice
    assert reg.get_sample_value("mdserver_requests_total", {
        "face": "ec2", "kind": "meta-data", "status": "200"}) == 4
    assert reg.get_sample_value("mdserver_requests_total", {
        "face": "ec2", "kind": "meta-data", "status": "404"}) == 1
    assert reg.get_sample_value("mdserver_unknown_guest_requests_total") == 1
    assert reg.get_sample_value("mdserver_imds_token_failures_total", {"stage": "check"}) == 1
    assert reg.get_sample_value("mdserver_imds_token_failures_total", {"stage": "issue"}) == 0


@unit
def test_the_paths_a_worker_remembers_are_bounded():
    w = WorkerMetrics(registry=CollectorRegistry())
    for n in range(metrics.MAX_REMEMBERED_PATHS + 500):
        w.count(f"/latest/meta-data/x{n}", 404)
    assert len(w._paths) == metrics.MAX_REMEMBERED_PATHS
    assert w._rows[("ec2", "meta-data")][404] == metrics.MAX_REMEMBERED_PATHS + 500


@unit
def test_the_hot_path_cost_of_counting(capsys):
    """The figure the docs quote: one request's metric work, against what
    prometheus_client's multiprocess counter costs per increment."""
    w = WorkerMetrics(registry=CollectorRegistry())
    path = "/latest/meta-data/instance-id"
    w.count(path, 200)
    n = 200_000
    plain = min(timeit.repeat(lambda: w.count(path, 200), number=n, repeat=3)) / n
    child = w.requests.labels("ec2", "meta-data", "200")
    locked = min(timeit.repeat(lambda: child.inc(), number=n, repeat=3)) / n
    with capsys.disabled():
        print(f"\ncount(): {plain * 1e9:.0f} ns per request; a prometheus_client counter's "
              f"inc() (in-process): {locked * 1e9:.0f} ns")
    assert plain < 5e-6  # far under a request's ~22 us at 45k req/s


@unit
@pytest.mark.parametrize("listen, problem", [
    ("0.0.0.0:9169", "wildcard"),
    ("[::]:9169", "wildcard"),
    ("169.254.169.254:9169", "link-local"),
    ("127.0.0.1:9169", "metadata address"),
    ("127.77.0.1:9169", "guests' network"),
    ("127.77.3.4:9169", "guests' network"),
    ("localhost:9169", "not an IP address"),
    ("::1:9169", "brackets"),
    ("127.0.0.3", "HOST:PORT"),
    ("127.0.0.3:99999", "outside"),
])
def test_a_metrics_listener_guests_could_reach_is_refused(tmp_path, listen, problem):
    path = write_config(tmp_path, NET + f"[metrics]\nlisten = {listen}\n",
                        listen_address="127.0.0.1")
    with pytest.raises(ConfigError) as e:
        config.load(path)
    text = str(e.value)
    assert problem in text and "[metrics] listen" in text and "\n" not in text, text


@unit
@pytest.mark.parametrize("listen, expected", [
    ("", None), ("127.0.0.3:9169", ("127.0.0.3", 9169)), ("[::1]:0", ("::1", 0)),
    ("10.0.0.5:9169", ("10.0.0.5", 9169)),
])
def test_host_addresses_are_accepted(tmp_path, listen, expected):
    path = write_config(tmp_path, NET + f"[metrics]\nlisten = {listen}\n",
                        listen_address="127.0.0.1")
    assert config.load(path).metrics.listen == expected


@unit
@pytest.mark.parametrize("report, problem", [
    ([], "not a JSON object"),
    ({"events": {"defined": 1, "nasty{label}": 2}, "connected": True}, "events"),
    ({"events": {"defined": -1}, "connected": True}, "events.defined"),
    ({"events": {"defined": 1.5}, "connected": True}, "events.defined"),
    ({"events": {}, "connected": "yes"}, "connected"),
    ({"events": {}, "connected": True, "edits": True}, "edits"),
])
def test_an_enroller_report_makes_no_label_of_its_own(report, problem):
    with pytest.raises(ValueError) as e:
        parse_enroll_report(report)
    assert problem in str(e.value)


@unit
def test_a_refused_dnsmasq_signal_is_counted_as_a_failure(tmp_path):
    """The only path a root test cannot drive for real (root may signal any
    process): the signal function is the seam."""
    cfg = config.load(write_config(tmp_path, NET))
    reg = CollectorRegistry()
    counts = HostMetrics(registry=reg)

    def refuse(pid: int, sig: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    files = DnsmasqFiles(cfg, kill=refuse, metrics=counts)
    files.sync([])
    with open(os.path.join(cfg.dnsmasq.base_dir, "dnsmasq.pid"), "w") as f:
        f.write(f"{os.getpid()}\n")
    assert files.reload() is False and files.reload() is False
    assert reg.get_sample_value("mdserver_dnsmasq_reload_failures_total") == 2
    assert reg.get_sample_value("mdserver_dnsmasq_reloads_total") == 0


def every_exported_sample_name() -> set:
    """Every sample name the daemon can export (etcd's and the enroller's included)."""
    reg = CollectorRegistry(auto_describe=False)
    w, h = WorkerMetrics(registry=reg), HostMetrics(registry=reg)
    w.count("/", 200)
    w.publish()
    h.sink_error("dnsmasq")

    class EtcdStatus:
        def status(self):
            return {"backend": "etcd", "connected": True, "cache_age": 0.0, "revision": 7,
                    "records": {"hv1": 1}}

    enroll = EnrollReports()
    enroll.receive(parse_enroll_report(EnrollCounts().report()))
    body, _ = metrics.render(None, [Sources(EtcdStatus(), enroll, 2)], registry=reg)
    return {name for name, _ in parse(body.decode())}


@unit
def test_the_grafana_dashboard_names_only_exported_metrics():
    with open(DASHBOARD) as f:
        board = json.load(f)
    exprs = []

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                exprs.append(node["expr"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(board)
    assert len(exprs) >= 12
    exported = every_exported_sample_name()
    used = set()
    for expr in exprs:
        names = set(re.findall(r"\bmdserver_[a-z0-9_]+", expr))
        assert names, expr
        used |= names
    assert sorted(used - exported) == []
    # and the board shows every family the daemon exports
    families = {re.sub(r"_(total|bucket|count|sum|created)$", "", n) for n in exported}
    shown = {re.sub(r"_(total|bucket|count|sum)$", "", n) for n in used}
    assert sorted(families - shown - {"mdserver_info"}) == []


# -- a real daemon, two workers ------------------------------------------------------

class Md:
    def __init__(self, d: Daemon, tmp):
        self.d, self.tmp = d, tmp
        self.admin = str(tmp / "admin.sock")
        self.dnsmasq: Optional[subprocess.Popen] = None

    def metrics_port(self) -> int:
        found = re.search(rf"metrics on http://{re.escape(METRICS_HOST)}:(\d+)/metrics",
                          self.d.output())
        assert found, self.d.output()
        return int(found.group(1))

    def register(self, name: str, n: int, **settings) -> dict:
        uuid = f"ec2b{n:04x}-aaaa-4bbb-8ccc-{n:012x}"
        mac = f"52:54:00:bb:00:{n:02x}"
        xml = domain_xml(name, uuid, mac, metadata=mds_metadata(**settings) if settings else "")
        return adminclient.call(self.admin, "POST", "/instance-upload", xml.encode())

    def get(self, source: str, path: str, method: str = "GET", headers=None) -> int:
        return request(self.d.host, self.d.port, method, path, source=source,
                       headers=headers)[0]


def start_dnsmasq(base_dir: str) -> Optional[subprocess.Popen]:
    """A real dnsmasq that serves nothing (no DNS port, no DHCP range) and
    writes its pid where mdserver looks: what the daemon signals."""
    binary = shutil.which("dnsmasq") or ("/usr/sbin/dnsmasq" if os.path.exists(
        "/usr/sbin/dnsmasq") else None)
    if binary is None:
        return None
    pid_file = os.path.join(base_dir, "dnsmasq.pid")
    p = subprocess.Popen([binary, "--keep-in-foreground", "--port=0", "--conf-file=/dev/null",
                          f"--pid-file={pid_file}", f"--addn-hosts={base_dir}/hosts",
                          "--user=" + os.environ.get("USER", "root")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    deadline = time.monotonic() + 10
    while not os.path.exists(pid_file):
        assert p.poll() is None and time.monotonic() < deadline, "dnsmasq did not start"
        time.sleep(0.05)
    return p


@pytest.fixture(scope="module")
def md(tmp_path_factory) -> Iterator[Md]:
    tmp = tmp_path_factory.mktemp("metrics")
    path = write_config(tmp, NET + f"[metrics]\nlisten = {METRICS_HOST}:0\n",
                        listen_address="127.0.0.1", port=0, workers=2)
    m = Md(Daemon(path).wait_ready(), tmp)
    try:
        m.dnsmasq = start_dnsmasq(str(tmp / "dnsmasq"))
        yield m
    finally:
        if m.dnsmasq is not None:
            m.dnsmasq.send_signal(signal.SIGTERM)  # our own child, by its handle
            m.dnsmasq.wait(10)
        alive = m.d.proc.poll() is None
        m.d.stop()
        assert alive, m.d.output()


def wait_until(what: str, check, timeout: float = 5.0):
    """Workers publish every PUBLISH_INTERVAL: poll the scrape until it shows."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@process
def test_requests_by_face_kind_and_status_summed_over_both_workers(md):
    vm = md.register("req-vm", 1)
    before = scrape_admin(md.admin)
    asked = [("/latest/meta-data/instance-id", 200), ("/latest/meta-data/", 200),
             ("/openstack/latest/meta_data.json", 200), ("/nocloud/user-data", 200),
             ("/latest/meta-data/nope", 404)]
    rounds = 12  # a new connection each: the kernel spreads them over the workers
    for _ in range(rounds):
        for path, status in asked:
            assert md.get(vm["ip"], path) == status, path
    want = {("ec2", "meta-data", "200"): rounds, ("ec2", "listing", "200"): rounds,
            ("openstack", "meta-data", "200"): rounds, ("nocloud", "user-data", "200"): rounds,
            ("ec2", "meta-data", "404"): rounds}

    def moved():
        now = scrape_admin(md.admin)
        got = {k: value(now, "mdserver_requests_total", face=k[0], kind=k[1], status=k[2])
               - value(before, "mdserver_requests_total", face=k[0], kind=k[1], status=k[2])
               for k in want}
        return now if got == want else None
    wait_until("every request counted once", moved)
    # Both workers counted some of them, each in its own file; the scrape is their sum.
    directory = metrics.directory_for(md.admin)
    assert stat_mode(directory) == 0o700
    files = [f for f in os.listdir(directory) if f.startswith("counter_")]
    assert all(stat_mode(os.path.join(directory, f)) == 0o600 for f in files)
    workers = worker_pids(md.d)
    per_worker = {}
    from prometheus_client.multiprocess import MultiProcessCollector
    for pid in workers:
        name = os.path.join(directory, f"counter_{pid}.db")
        total = 0.0
        for family in MultiProcessCollector.merge([name]):
            for s in family.samples:
                if s.name == "mdserver_requests_total":
                    total += s.value
        per_worker[pid] = total
    assert len(workers) == 2 and all(n > 0 for n in per_worker.values()), per_worker


def stat_mode(path: str) -> int:
    return os.stat(path).st_mode & 0o777


def worker_pids(d: Daemon) -> set:
    with open(f"/proc/{d.proc.pid}/task/{d.proc.pid}/children") as f:
        return {int(p) for p in f.read().split()}


@process
def test_unknown_guests_and_tokens(md):
    vm = md.register("tok-vm", 2)
    before = scrape_admin(md.admin)
    assert md.get(STRANGER, "/latest/meta-data/instance-id") == 404
    assert md.get(STRANGER, "/openstack/latest/meta_data.json") == 404
    status, _, token = request(md.d.host, md.d.port, "PUT", "/latest/api/token",
                               source=vm["ip"], headers=TTL)
    assert status == 200
    assert md.get(vm["ip"], "/latest/meta-data/instance-id",
                  headers={"X-aws-ec2-metadata-token": token}) == 200
    assert md.get(vm["ip"], "/latest/api/token", "PUT",
                  headers={**TTL, "X-Forwarded-For": "10.0.0.1"}) == 403
    assert md.get(vm["ip"], "/2009-04-04/api/token", "PUT", headers=TTL) == 403
    assert md.get(vm["ip"], "/latest/meta-data/instance-id",
                  headers={"X-aws-ec2-metadata-token": "1.forged"}) == 401
    want = {("mdserver_unknown_guest_requests_total", ()): 2,
            ("mdserver_imds_tokens_issued_total", ()): 1,
            ("mdserver_imds_token_failures_total", (("stage", "issue"),)): 2,
            ("mdserver_imds_token_failures_total", (("stage", "check"),)): 1}

    def moved():
        now = scrape_admin(md.admin)
        return all(now.get(k, 0) - before.get(k, 0) == n for k, n in want.items())
    wait_until("unknown guests and tokens counted", moved)
    now = scrape_admin(md.admin)
    assert value(now, "mdserver_requests_total", face="ec2", kind="token", status="200") >= 1


@process
def test_registrations_removals_seeds_store_and_dnsmasq(md):
    before = scrape_admin(md.admin)
    a = md.register("reg-a", 3)
    md.register("reg-b", 4, route="configdrive")  # a seed image
    md.register("reg-a", 3, hostname="renamed")   # an update: dnsmasq re-reads its files
    status, _ = adminclient.request(md.admin, "POST", "/instance-upload", b"<domain>")
    assert status == 400
    adminclient.call(md.admin, "DELETE", f"/instances/{a['uuid']}")
    assert adminclient.request(md.admin, "DELETE", "/instances/no-such-vm")[0] == 404
    now = scrape_admin(md.admin)

    def delta(name, **labels):
        return value(now, name, **labels) - value(before, name, **labels)
    assert delta("mdserver_registrations_total", result="registered") == 2
    assert delta("mdserver_registrations_total", result="updated") == 1
    assert delta("mdserver_registrations_total", result="error") == 1
    assert delta("mdserver_registration_duration_seconds_count") == 3
    assert delta("mdserver_registration_duration_seconds_sum") > 0
    assert delta("mdserver_registration_duration_seconds_bucket", le="+Inf") == 3
    assert delta("mdserver_removals_total", result="removed") == 1
    assert delta("mdserver_removals_total", result="error") == 1
    assert delta("mdserver_removal_duration_seconds_count") == 1
    assert delta("mdserver_seed_images_written_total") == 1
    records = adminclient.call(md.admin, "GET", "/instances")
    host = records[0]["host"]
    assert value(now, "mdserver_store_instances", host=host) == len(records)
    assert value(now, "mdserver_store_connected") == 1
    assert value(now, "mdserver_workers") == 2
    if md.dnsmasq is not None:  # the update and the removal each signalled it
        assert delta("mdserver_dnsmasq_reloads_total") == 2
        assert delta("mdserver_dnsmasq_reload_failures_total") == 0
        assert md.dnsmasq.poll() is None  # a real dnsmasq took both SIGHUPs


@process
def test_the_enrollers_pushed_counts(md):
    """The enroller's report as it sends it (EnrollCounts), through the admin
    socket; what it counts is driven in test_the_enroller_counts_its_events."""
    counts = EnrollCounts()
    counts.event("defined")
    counts.event("defined")
    counts.event("undefined")
    counts.edited()
    counts.connected = True
    status, _ = adminclient.request(md.admin, "POST", "/metrics/enroll",
                                    json.dumps(counts.report()).encode())
    assert status == 200
    now = scrape_admin(md.admin)
    assert value(now, "mdserver_enroll_events_total", event="defined") == 2
    assert value(now, "mdserver_enroll_events_total", event="undefined") == 1
    assert value(now, "mdserver_enroll_events_total", event="migrated") == 0
    assert value(now, "mdserver_enroll_edits_total") == 1
    assert value(now, "mdserver_enroll_connected") == 1
    assert time.time() - value(now, "mdserver_enroll_last_report_timestamp_seconds") < 60
    bad = adminclient.request(md.admin, "POST", "/metrics/enroll", b'{"events": {"x{": 1}}')
    assert bad[0] == 400


@process
def test_the_guest_port_never_serves_metrics(md):
    vm = md.register("port-vm", 5)
    for source in (vm["ip"], "127.0.0.1", STRANGER):
        status, _, body = request(md.d.host, md.d.port, "GET", "/metrics", source=source)
        assert status == 404 and "mdserver_" not in body, (source, status)


@process
def test_the_metrics_listener_answers_only_on_its_host_address(md):
    port = md.metrics_port()
    with urllib.request.urlopen(f"http://{METRICS_HOST}:{port}/metrics", timeout=5) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        body = r.read().decode()
    names = {name for name, _ in parse(body)}
    assert {"mdserver_info", "mdserver_store_instances",
            "mdserver_registrations_total"} <= names
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://{METRICS_HOST}:{port}/other", timeout=5)
    assert e.value.code == 404
    # The same port on the guest-facing address, and on another loopback address: nobody.
    for host in ("127.0.0.1", "127.0.0.4"):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((host, port), timeout=2).close()


@process
def test_metrics_dir_is_private_and_gone_at_exit(tmp_path):
    path = write_config(tmp_path, NET, listen_address="127.0.0.1", port=0, workers=1)
    directory = metrics.directory_for(str(tmp_path / "admin.sock"))
    os.makedirs(directory)
    with open(os.path.join(directory, "counter_1.db"), "wb") as f:
        f.write(b"stale from an earlier run")
    d = Daemon(path).wait_ready()
    try:
        assert stat_mode(directory) == 0o700
        assert "counter_1.db" not in os.listdir(directory)  # emptied at start
        assert scrape_admin(str(tmp_path / "admin.sock"))
    finally:
        assert d.stop() == 0, d.output()
    assert not os.path.exists(directory)


# -- the enroller and etcd, driven for real where this machine can ----------------------

@process  # its push tries the (absent) admin socket: a socket, so not `unit`
def test_the_enroller_counts_its_events(tmp_path):
    """The enroller's event handler with libvirt's event constants
    (test_enroll's stand-in: no libvirtd here); its pushes go to a daemon
    that is not there, which costs nothing and is tried again later."""
    from test_enroll import FakeDom, FakeLibvirt, offline_enroller, uuid_mac
    e, calls = offline_enroller(tmp_path)
    lv = FakeLibvirt
    for n, (event, detail) in enumerate([
            (lv.VIR_DOMAIN_EVENT_DEFINED, 0), (lv.VIR_DOMAIN_EVENT_UNDEFINED, 0),
            (lv.VIR_DOMAIN_EVENT_STOPPED, lv.VIR_DOMAIN_EVENT_STOPPED_MIGRATED),
            (lv.VIR_DOMAIN_EVENT_RESUMED, lv.VIR_DOMAIN_EVENT_RESUMED_MIGRATED),
            (lv.VIR_DOMAIN_EVENT_RESUMED, 0)]):  # unpaused: not counted
        e._lifecycle(None, FakeDom(uuid_mac(n + 1)[0]), event, detail, None)
    report = e.counts.report()
    assert report["events"] == {"defined": 1, "undefined": 1, "migrated": 1, "resumed": 1}
    assert e.counts.unsent() == report
    e._push()  # no daemon: kept for the next push
    assert e.counts.unsent() == report


@privileged
def test_refused_identities_are_counted(tmp_path):
    """A guest using another's address, on a real bridge (tests/netns.py)."""
    need_root()
    from netns import Lab, guest_requests as fetch
    lab = Lab()
    d = None
    try:
        path = write_config(tmp_path, "[libvirt]\nroute = ec2\n",
                            listen_address="169.254.169.254", port=80, check_mac="yes")
        d = Daemon(path, "169.254.169.254", 80, netns=lab.host).wait_ready(30)
        admin = str(tmp_path / "admin.sock")
        a = adminclient.call(admin, "POST", "/instance-upload", domain_xml(
            "guest-a", "ec2a0001-aaaa-4bbb-8ccc-00000000000a", "52:54:00:aa:00:0a").encode())
        before = scrape_admin(admin)
        spoofer = lab.guest(3, "52:54:00:66:66:66", a["ip"])
        got = fetch(spoofer, [["GET", "/latest/meta-data/instance-id"]] * 3
                    + [["PUT", "/latest/api/token"]])
        assert [s for s, _ in got] == [403] * 4, got

        def moved():
            now = scrape_admin(admin)
            return value(now, "mdserver_refused_identity_requests_total") - value(
                before, "mdserver_refused_identity_requests_total") == 4 and now
        now = wait_until("refused identities counted", moved)
        assert value(now, "mdserver_imds_token_failures_total", stage="issue") - value(
            before, "mdserver_imds_token_failures_total", stage="issue") == 1
    finally:
        if d is not None:
            d.stop()
        lab.close()


@privileged
def test_etcd_watch_lag_and_cache_age(tmp_path):
    """Two hosts on one real etcd: a registration on one shows in the other's
    watch-lag histogram; with etcd gone, the cache ages."""
    need_root()
    need(shutil.which("etcd") is not None, "needs etcd (apt-get install etcd-server)")
    from etcd_lab import EtcdLab
    with EtcdLab(members=1) as etcd:
        etcd.attach(None)
        daemons = []
        try:
            for host in ("hv1", "hv2"):
                sub = tmp_path / host
                sub.mkdir()
                path = write_config(sub, NET + f"[store]\nbackend = etcd\nendpoints = "
                                    f"{etcd.client_url(0)}\nhost = {host}\n",
                                    listen_address="127.0.0.1", port=0, workers=1)
                daemons.append((Daemon(path).wait_ready(30), str(sub / "admin.sock")))
            (_, admin1), (_, admin2) = daemons
            before = scrape_admin(admin2)
            adminclient.call(admin1, "POST", "/instance-upload",
                             domain_xml("lag-vm", "ec2c0001-aaaa-4bbb-8ccc-000000000001",
                                        "52:54:00:cc:00:01").encode())

            def arrived():
                now = scrape_admin(admin2)
                return value(now, "mdserver_etcd_watch_lag_seconds_count") - value(
                    before, "mdserver_etcd_watch_lag_seconds_count") == 1 and now
            now = wait_until("hv1's registration seen by hv2's watch", arrived)
            assert value(now, "mdserver_etcd_watch_lag_seconds_sum") - value(
                before, "mdserver_etcd_watch_lag_seconds_sum") < 5
            assert value(now, "mdserver_store_instances", host="hv1") == 1
            assert value(now, "mdserver_etcd_cache_age_seconds") == 0
            assert value(now, "mdserver_store_connected") == 1
            etcd.stop_all()

            def aged():
                now = scrape_admin(admin2)
                return value(now, "mdserver_store_connected") == 0 and value(
                    now, "mdserver_etcd_cache_age_seconds") > 0 and now
            wait_until("hv2's cache ageing without etcd", aged, timeout=30)
        finally:
            for d, _ in daemons:
                d.stop()
