"""Prometheus metrics: what is counted where, the worker's cheap counts, the multiprocess files, the scrape."""

import os
import shutil
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

from mdserver import __version__

# The label values a request is counted under: a few fixed classes, never
# a path or an instance name (a guest chooses its paths).
FACES = ("ec2", "openstack", "nocloud")
KINDS = ("meta-data", "user-data", "token", "listing", "password", "other")
# The enroller's counted libvirt events (mdserver.enroll pushes them).
ENROLL_EVENTS = ("defined", "undefined", "migrated", "resumed")
TOKEN_STAGES = ("issue", "check")

# Seconds between a worker's publications of its plain counts to its
# multiprocess file: a scrape sees a worker's requests at most this late.
PUBLISH_INTERVAL = 1.0
# Distinct paths whose class a worker remembers (guests choose paths: bounded).
MAX_REMEMBERED_PATHS = 1024
# Mmap files prometheus_client's multiprocess mode writes per process.
FILE_KINDS = ("counter", "histogram")
# Where the daemon keeps them: beside the admin socket, `admin.sock` -> `admin.metrics/`.
DIRECTORY_SUFFIX = ".metrics"

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0)
LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


# -- the pure part: which class a request is -------------------------------------

def _is_uuid(text: str) -> bool:
    return len(text) == 36 and text.count("-") == 4


def classify(path: str) -> Tuple[str, str]:
    """(face, kind) of a guest request, from its path alone (the method does
    not change it: a GET of the token path is still `token`). A listing is a
    face's root, a version, or a directory asked with its trailing `/` (as
    cloud-init's crawl asks them)."""
    parts = [p for p in path.split("/") if p]
    if parts and parts[0] == "openstack":
        rest = parts[1:]
        if len(rest) <= 1:
            return "openstack", "listing"
        if len(rest) > 2:
            return "openstack", "other"
        name = rest[1]
        if name == "user_data":
            return "openstack", "user-data"
        if name == "password":
            return "openstack", "password"
        return "openstack", "meta-data"
    if parts and parts[0] == "nocloud":
        rest = parts[1:]
        if rest and _is_uuid(rest[0]):
            rest = rest[1:]
        if not rest:
            return "nocloud", "listing"
        if len(rest) > 1:
            return "nocloud", "other"
        return "nocloud", "user-data" if rest[0] == "user-data" else "meta-data"
    if not parts:
        return "ec2", "listing"
    if len(parts) == 1:
        return "ec2", "other" if parts[0] == "instance-upload" else "listing"
    section = parts[1]
    if section == "api":
        return "ec2", "token" if parts[2:] == ["token"] else "other"
    if section == "user-data":
        return "ec2", "user-data" if len(parts) == 2 else "other"
    if section in ("meta-data", "dynamic"):
        return "ec2", "listing" if len(parts) == 2 or path.endswith("/") else "meta-data"
    return "ec2", "other"


# -- the multiprocess directory ----------------------------------------------------

def directory_for(admin_socket: str) -> str:
    """The daemon's private metrics directory, beside its admin socket (the run
    directory): it belongs to whoever owns that socket."""
    stem, ext = os.path.splitext(admin_socket)
    return (stem if ext == ".sock" else admin_socket) + DIRECTORY_SUFFIX


def prepare_directory(path: str) -> None:
    """Make `path` an empty directory of mode 0700 (a previous run's counts are
    not this run's: Prometheus sees a restart as a counter reset)."""
    remove_directory(path)
    os.mkdir(path, 0o700)
    os.chmod(path, 0o700)  # whatever the umask


def remove_directory(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def use_directory(path: str) -> None:
    """From here on, metrics this process makes count in its own files in
    `path` (prometheus_client's multiprocess mode), made 0600 beforehand (its
    own would take the umask's mode). Call before making any metric."""
    from prometheus_client import values
    from prometheus_client.mmap_dict import MmapedDict
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    pid = os.getpid()
    for kind in FILE_KINDS:
        final = os.path.join(path, f"{kind}_{pid}.db")
        if os.path.exists(final):
            continue
        # Made and initialised under another name, then renamed: a scrape
        # reading the directory never sees an empty file.
        temp = os.path.join(path, f".tmp-{kind}_{pid}")
        os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600))
        MmapedDict(temp).close()
        os.rename(temp, final)
    values.ValueClass = values.MultiProcessValue()


# -- a worker's counts ----------------------------------------------------------------

class WorkerMetrics:
    """What one guest worker counts: requests by face, kind and status, and
    the rarer events (unknown guests, refused identities, tokens).

    Counting is plain dict arithmetic (a request costs no lock and no file
    write); publish() adds what was counted since its last call to the
    prometheus_client counters, which in the daemon are the worker's
    multiprocess file. count() and publish() run in the worker's event-loop
    thread only; event() may come from a relay thread and takes a lock."""

    def __init__(self, registry: Any = None):
        from prometheus_client import Counter
        self._rows: Dict[Tuple[str, str], Dict[int, int]] = {}
        self._published: Dict[Tuple[Tuple[str, str], int], int] = {}
        self._paths: Dict[str, Dict[int, int]] = {}
        self._events: Dict[Tuple[str, str], int] = {}
        self._events_published: Dict[Tuple[str, str], int] = {}
        self._lock = threading.Lock()
        self.requests = Counter("mdserver_requests", "Guest requests answered, by face, kind "
                                "and HTTP status", ["face", "kind", "status"], registry=registry)
        self.unknown_guest = Counter("mdserver_unknown_guest_requests", "Guest requests from "
                                     "an address no instance holds", registry=registry)
        self.refused_identity = Counter(
            "mdserver_refused_identity_requests", "Guest requests refused because the "
            "neighbour table does not give the instance's MAC for the address",
            registry=registry)
        self.tokens_issued = Counter("mdserver_imds_tokens_issued", "IMDSv2 tokens issued",
                                     registry=registry)
        self.token_failures = Counter(
            "mdserver_imds_token_failures", "IMDSv2 token failures: issue (a token PUT "
            "refused) or check (a request's token missing, invalid or expired)", ["stage"],
            registry=registry)
        for stage in TOKEN_STAGES:
            self.token_failures.labels(stage)  # shown at 0 before the first

    def count(self, path: str, status: int) -> None:
        """One answered guest request (the hot path: two dict look-ups)."""
        row = self._paths.get(path)
        if row is None:
            row = self._row(path)
        row[status] = row.get(status, 0) + 1

    def _row(self, path: str) -> Dict[int, int]:
        key = classify(path)
        row = self._rows.get(key)
        if row is None:
            row = self._rows[key] = {}
        if len(self._paths) < MAX_REMEMBERED_PATHS:
            self._paths[path] = row
        return row

    def event(self, name: str, label: str = "") -> None:
        """unknown_guest, refused_identity, token_issued, token_failure (label: its stage)."""
        with self._lock:
            self._events[(name, label)] = self._events.get((name, label), 0) + 1

    def publish(self) -> None:
        for key, row in self._rows.items():
            for status, n in list(row.items()):
                done = self._published.get((key, status), 0)
                if n > done:
                    self.requests.labels(key[0], key[1], str(status)).inc(n - done)
                    self._published[(key, status)] = n
        with self._lock:
            events = dict(self._events)
        for (name, label), n in events.items():
            done = self._events_published.get((name, label), 0)
            if n > done:
                self._event_counter(name, label).inc(n - done)
                self._events_published[(name, label)] = n

    def _event_counter(self, name: str, label: str) -> Any:
        if name == "token_failure":
            return self.token_failures.labels(label)
        return {"unknown_guest": self.unknown_guest, "refused_identity": self.refused_identity,
                "token_issued": self.tokens_issued}[name]


# -- the main process's -------------------------------------------------------------

class HostMetrics:
    """What the main process counts: registrations, removals, the sinks, etcd's watch."""

    def __init__(self, registry: Any = None):
        from prometheus_client import Counter, Histogram
        self.registrations = Counter(
            "mdserver_registrations", "Registrations by result: registered (new), updated, "
            "error (refused or failed)", ["result"], registry=registry)
        self.registration_seconds = Histogram(
            "mdserver_registration_duration_seconds", "Time to register an instance (parse, "
            "store, sinks), successful ones", buckets=LATENCY_BUCKETS, registry=registry)
        self.removals = Counter("mdserver_removals", "Removals by result: removed, error",
                                ["result"], registry=registry)
        self.removal_seconds = Histogram(
            "mdserver_removal_duration_seconds", "Time to remove an instance, successful ones",
            buckets=LATENCY_BUCKETS, registry=registry)
        self.dnsmasq_reloads = Counter("mdserver_dnsmasq_reloads", "SIGHUPs sent to dnsmasq",
                                       registry=registry)
        self.dnsmasq_reload_failures = Counter(
            "mdserver_dnsmasq_reload_failures", "dnsmasq runs but refused the signal",
            registry=registry)
        self.seed_images = Counter("mdserver_seed_images_written", "Seed images written",
                                   registry=registry)
        self.sink_errors = Counter(
            "mdserver_sink_errors", "Failed writes of a registration sink (dnsmasq files, "
            "seed images)", ["sink"], registry=registry)
        self.watch_lag = Histogram(
            "mdserver_etcd_watch_lag_seconds", "etcd backend: from another host's "
            "registration (its clock) to its arrival in this host's cache",
            buckets=LAG_BUCKETS, registry=registry)
        for result in ("registered", "updated", "error"):
            self.registrations.labels(result)
        for result in ("removed", "error"):
            self.removals.labels(result)

    def registered(self, result: str, seconds: Optional[float] = None) -> None:
        self.registrations.labels(result).inc()
        if seconds is not None:
            self.registration_seconds.observe(seconds)

    def removed(self, result: str, seconds: Optional[float] = None) -> None:
        self.removals.labels(result).inc()
        if seconds is not None:
            self.removal_seconds.observe(seconds)

    def dnsmasq_reload(self, ok: bool) -> None:
        (self.dnsmasq_reloads if ok else self.dnsmasq_reload_failures).inc()

    def seed_written(self) -> None:
        self.seed_images.inc()

    def sink_error(self, sink: str) -> None:
        self.sink_errors.labels(sink).inc()

    def watch_lagged(self, seconds: float) -> None:
        self.watch_lag.observe(max(0.0, seconds))


# -- the enroller's counts, pushed to the daemon ------------------------------------

class EnrollCounts:
    """The enroller's own counts (libvirt events, definitions it edited, whether
    it holds a libvirt connection). It has no listener of its own: it pushes
    them to the daemon's admin socket (POST /metrics/enroll), which already is
    its only peer, and the daemon exports them with its own."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self._lock = threading.Lock()
        self.events: Dict[str, int] = {e: 0 for e in ENROLL_EVENTS}
        self.edits = 0
        self.connected = False
        self.started = clock()
        self._sent: Optional[Dict[str, Any]] = None

    def event(self, name: str) -> None:
        with self._lock:
            self.events[name] += 1

    def edited(self) -> None:
        with self._lock:
            self.edits += 1

    def report(self) -> Dict[str, Any]:
        with self._lock:
            return {"pid": os.getpid(), "started": self.started, "connected": self.connected,
                    "events": dict(self.events), "edits": self.edits}

    def unsent(self) -> Optional[Dict[str, Any]]:
        """The report if it changed since the last one marked sent, else None."""
        report = self.report()
        return None if report == self._sent else report

    def sent(self, report: Dict[str, Any]) -> None:
        self._sent = report


def parse_enroll_report(data: Any) -> Dict[str, Any]:
    """An enroller's pushed report, checked (ValueError): only the known event
    names, whole non-negative numbers, so nothing a pusher sends makes a label."""
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    events = data.get("events")
    if not isinstance(events, dict) or set(events) - set(ENROLL_EVENTS):
        raise ValueError(f"events: an object with keys among {', '.join(ENROLL_EVENTS)}")
    out: Dict[str, Any] = {"events": {}}
    for name in ENROLL_EVENTS:
        out["events"][name] = _count(events.get(name, 0), f"events.{name}")
    out["edits"] = _count(data.get("edits", 0), "edits")
    out["pid"] = _count(data.get("pid", 0), "pid")
    if not isinstance(data.get("connected"), bool):
        raise ValueError("connected: true or false")
    out["connected"] = data["connected"]
    started = data.get("started", 0)
    if not isinstance(started, (int, float)) or isinstance(started, bool):
        raise ValueError("started: a time in seconds")
    out["started"] = float(started)
    return out


def _count(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2 ** 53:
        raise ValueError(f"{what}: a whole number >= 0")
    return value


class EnrollReports:
    """The daemon's copy of the enroller's last report."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self._clock = clock
        self._lock = threading.Lock()
        self.last: Optional[Dict[str, Any]] = None
        self.received = 0.0

    def receive(self, report: Dict[str, Any]) -> None:
        with self._lock:
            self.last, self.received = report, self._clock()

    def snapshot(self) -> Tuple[Optional[Dict[str, Any]], float]:
        with self._lock:
            return self.last, self.received


# -- the scrape ------------------------------------------------------------------------

class Sources:
    """Gauges read when scraped: the store's size and health, the enroller's
    last report, the daemon's version and worker count."""

    def __init__(self, store: Any, enroll: EnrollReports, workers: int):
        self.store = store
        self.enroll = enroll
        self.workers = workers

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        info = GaugeMetricFamily("mdserver_info", "This daemon's version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield GaugeMetricFamily("mdserver_workers", "Guest worker processes",
                                value=self.workers)
        status = self.store.status()
        instances = GaugeMetricFamily("mdserver_store_instances", "Instances in the store, by "
                                      "the host that owns them", labels=["host"])
        for host, n in sorted(dict(status.get("records") or {}).items()):
            instances.add_metric([str(host)], n)
        yield instances
        backend = status.get("backend", "local")
        yield GaugeMetricFamily("mdserver_store_connected", "1 if the store answers (a local "
                                "store always does)", value=1 if status.get("connected", True)
                                else 0)
        if backend == "etcd":
            yield GaugeMetricFamily(
                "mdserver_etcd_cache_age_seconds", "etcd backend: how old this host's copy "
                "is (0 while the watch is connected)", value=float(status.get("cache_age", 0)))
            yield GaugeMetricFamily("mdserver_etcd_revision", "etcd backend: the revision "
                                    "this host's copy holds",
                                    value=float(status.get("revision", 0)))
        report, received = self.enroll.snapshot()
        if report is not None:
            events = CounterMetricFamily("mdserver_enroll_events", "libvirt events the "
                                         "enroller handled, by event", labels=["event"])
            for name in ENROLL_EVENTS:
                events.add_metric([name], report["events"][name])
            yield events
            yield CounterMetricFamily("mdserver_enroll_edits", "Domain definitions the "
                                      "enroller changed (a route applied)",
                                      value=report["edits"])
            yield GaugeMetricFamily("mdserver_enroll_connected", "1 if the enroller holds a "
                                    "libvirt connection", value=1 if report["connected"] else 0)
            yield GaugeMetricFamily("mdserver_enroll_last_report_timestamp_seconds", "When "
                                    "the enroller last reported", value=received)


def render(directory: Optional[str], extra: Iterable[Any] = (),
           registry: Any = None) -> Tuple[bytes, str]:
    """(body, content type) of a scrape: every process's multiprocess files in
    `directory` summed, plus `extra` collectors (or `registry` as it is)."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector
    if registry is None:
        registry = CollectorRegistry(auto_describe=False)
        if directory is not None:
            MultiProcessCollector(registry, path=directory)
    for collector in extra:
        registry.register(collector)
    return generate_latest(registry), CONTENT_TYPE_LATEST


class Exposition:
    """The daemon's scrape: one callable for the admin socket's /metrics and the
    metrics listener."""

    def __init__(self, directory: str, sources: Sources):
        self.directory = directory
        self.sources = sources

    def __call__(self) -> Tuple[bytes, str]:
        return render(self.directory, [self.sources])


def metric_names(text: str) -> List[str]:
    """The metric names of a scrape, in the order they first appear."""
    seen: Dict[str, None] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            seen.setdefault(line.split("{", 1)[0].split(" ", 1)[0], None)
    return list(seen)


def samples(text: str) -> Mapping[str, float]:
    """`name{labels}` -> value of a scrape (labels as written), for tests and tools."""
    out: Dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out
