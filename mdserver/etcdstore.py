"""The `etcd` InstanceStore: one registry shared by several hypervisors, mirrored into a local Store.

Keys under [store] prefix P (default /mdserver/); values are UTF-8:

    P instances/<uuid>   the record: Instance.to_dict() as JSON (with its `host`)
    P ips/<ipv4>         <uuid>: the claim on an address, fleet-wide
    P names/<name>       <uuid>: the claim on a domain name, fleet-wide
    P hosts/<host>       {"pid", "node", "since"} as JSON, on a lease the daemon
                         serving that [store] host keeps alive: one daemon per host

A record and its claims change in one transaction whose compares are the
record's mod_revision (its version) and, for each address or name it newly
takes, that nobody holds it. Reads are served from the cache (a writable local
Store that the guest-facing worker follows as a read-only replica), which a
watch of `P instances/` keeps current; when etcd is away the cache answers on
and writes fail with StoreUnavailable.
"""

import base64
import json
import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import (Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence,
                    Tuple)
from urllib.parse import urlsplit

import requests
from etcd3gw.client import Etcd3Client

from mdserver.config import StoreSection
from mdserver.errors import ConfigError, StoreConflict, StoreLocked, StoreUnavailable
from mdserver.models import Instance
from mdserver.store import Store
from mdserver.storeapi import Change, Listener, diff, per_host

log = logging.getLogger(__name__)

# A conflicting commit waits this long for the watch to show the winner, so
# that the caller's re-read sees it.
CONFLICT_WAIT = 2.0
# Reconnection attempts back off from 0.1 s to this.
BACKOFF_MAX = 2.0
# etcd's --max-txn-ops defaults to 128: an imported instance takes 3 ops.
IMPORT_BATCH = 40
# Records per range request of a full load (pages of one consistent read).
PAGE = 500
# A full load may move megabytes: its requests get more time than a commit's.
LOAD_TIMEOUT = 10.0
# A watch stream silent this long is reopened (from the revision it reached):
# the net under a connection that died without a FIN or RST.
STREAM_IDLE = 300.0
# A stream that lived this long (or brought events) was fine: reopen at once.
STREAM_HEALTHY = 2.0


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text or "")


def _prefix_end(prefix: bytes) -> bytes:
    """The range_end that selects every key starting with `prefix` (ends in '/')."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


def _reason(e: BaseException) -> str:
    """A short, credential-free cause of a failed request."""
    if isinstance(e, requests.exceptions.ConnectTimeout):
        return "connect timed out"
    if isinstance(e, requests.exceptions.ReadTimeout):
        return "no answer in time"
    text = str(e)
    verify = re.search(r"certificate verify failed: (.+?) \(_ssl", text)
    if verify:
        return f"server certificate not trusted ({verify.group(1)})"
    if isinstance(e, requests.exceptions.SSLError) and any(s in text for s in (
            "EOF occurred in violation of protocol", "CERTIFICATE_REQUIRED", "UNKNOWN_CA",
            "BAD_CERTIFICATE")):
        # The member ended the handshake (etcd 3.4 hangs up, newer TLS stacks
        # send an alert): what --client-cert-auth does to a client without a
        # certificate signed by its CA. requests would only say "SSLError".
        return "TLS handshake refused: client certificate missing or not trusted"
    for needle, short in (("CERTIFICATE_VERIFY_FAILED", "certificate verify failed"),
                          ("Remote end closed", "connection closed"),
                          ("IncompleteRead", "connection closed"),
                          ("timed out", "timed out")):
        if needle in text:
            return short
    errno = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    return errno.group(1).strip().lower() if errno else type(e).__name__


def _stream_socket(resp: requests.Response) -> Optional[socket.socket]:
    """The socket under a streaming response (urllib3 keeps it while streaming)."""
    sock = getattr(getattr(getattr(resp, "raw", None), "connection", None), "sock", None)
    return sock if isinstance(sock, socket.socket) else None


class _MemberDown(Exception):
    """This member cannot serve the request now (unreachable, no leader...): try another."""

    def __init__(self, reason: str, answered: bool = False):
        super().__init__(reason)
        self.answered = answered  # it is up, only between leaders or stopping


class _Unreachable(Exception):
    """No member served the request: (endpoint, reason) per attempt."""

    def __init__(self, reasons: Sequence[Tuple[str, str]], answered: bool = False):
        self.reasons = list(reasons)
        self.answered = answered  # some member is up (a leader election, most likely)
        super().__init__(", ".join(f"{url}: {why}" for url, why in self.reasons))

    @property
    def first(self) -> str:
        url, why = self.reasons[0] if self.reasons else ("etcd", "no attempt left")
        return f"{url}: {why}"


class _Refused(Exception):
    """A member answered with an error every member would give (permission, bad request)."""


class _StreamEnded(Exception):
    """The watch stream stopped (member gone, canceled, kicked)."""


class _Compacted(Exception):
    """The watch cannot start where the cache is: etcd compacted that history away."""


def _error_text(resp: requests.Response) -> Tuple[int, str]:
    """(gRPC code, message) of a gateway error answer."""
    try:
        body = resp.json()
    except ValueError:
        return 0, (resp.text or resp.reason or str(resp.status_code)).strip()[:200]
    if isinstance(body.get("error"), dict):  # the form a stream's error line takes
        body = body["error"]
    return int(body.get("code") or 0), str(body.get("message") or body.get("error") or body)


def _auth_problem(code: int, message: str) -> bool:
    """A token the member no longer accepts (expired, from before a restart): authenticate again."""
    return code == 16 or any(s in message for s in (
        "invalid auth token", "user name is empty", "revision of auth store is old"))


def _member_problem(status: int, code: int, message: str) -> bool:
    """An answer another member may not give (this one lost its leader, is stopping...)."""
    return status in (502, 503, 504) or code in (4, 14) or any(s in message for s in (
        "no leader", "request timed out", "leader changed", "not capable", "stopped"))


class _Member:
    """One endpoint: a client for requests and one for the watch stream (own connections)."""

    def __init__(self, url: str, st: StoreSection):
        self.url = url
        parts = urlsplit(url)
        self.rpc = self._client(parts.hostname or "", parts.port or 2379, parts.scheme, st)
        self.stream = self._client(parts.hostname or "", parts.port or 2379, parts.scheme, st)
        self.token: Optional[str] = None

    @staticmethod
    def _client(host: str, port: int, scheme: str, st: StoreSection) -> Etcd3Client:
        client = Etcd3Client(host=host, port=port, protocol=scheme, ca_cert=st.ca_file,
                             cert_key=st.key_file, cert_cert=st.cert_file, api_path="/v3/")
        # etcd is the cluster's own service: an http_proxy set for the
        # outside world must not carry (or see) its traffic.
        client.session.trust_env = False
        return client

    def set_token(self, token: Optional[str]) -> None:
        self.token = token
        for client in (self.rpc, self.stream):
            if token:
                client.session.headers["Authorization"] = token
            else:
                client.session.headers.pop("Authorization", None)


class _Cluster:
    """The endpoints, tried in order from the last one that answered; etcd auth per member."""

    def __init__(self, st: StoreSection, timeout: float):
        self.members = [_Member(url, st) for url in st.endpoints]
        self.username = st.username
        self.password: Optional[str] = None
        self.timeout = timeout
        self._current = 0

    def order(self) -> List[_Member]:
        i = self._current
        return self.members[i:] + self.members[:i]

    def _stick(self, member: _Member) -> None:
        self._current = self.members.index(member)

    def demote(self, member: _Member) -> None:
        """`member` just failed: the next call starts with the one after it."""
        if self.members[self._current] is member:
            self._current = (self._current + 1) % len(self.members)

    def _timeouts(self, read: float) -> Tuple[float, float]:
        # Connecting to a live member takes milliseconds: a black-holed one
        # must not eat the whole budget before the next member is tried.
        return (min(read, self.timeout / 2), read)

    def call(self, path: str, body: Dict[str, Any], timeout: Optional[float] = None,
             budget: Optional[float] = None,
             failed: Optional[List[str]] = None) -> Dict[str, Any]:
        """POST `body` to /v3/<path> of the first member that answers;
        _Unreachable if none does (within `budget` seconds in all, if given)."""
        read = timeout or self.timeout
        deadline = time.monotonic() + budget if budget else None
        while True:
            reasons: List[Tuple[str, str]] = []
            answered = False
            for member in self.order():
                limit = read
                if deadline is not None:
                    limit = min(read, deadline - time.monotonic())
                    if limit < 0.05:
                        break
                try:
                    answer = self._post(member, path, body, limit)
                except _MemberDown as e:
                    reasons.append((member.url, str(e)))
                    answered = answered or e.answered
                    if failed is not None:
                        failed.append(member.url)
                    log.debug("etcd %s: %s: %s", member.url, path, e)
                    self.demote(member)
                    continue
                self._stick(member)
                return answer
            # Members that answer but cannot serve are electing a leader:
            # another round is worth it while the budget lasts. Refusals
            # to connect are not.
            if not answered or deadline is None or deadline - time.monotonic() < 0.1:
                raise _Unreachable(reasons, answered)
            time.sleep(0.05)

    def _post(self, member: _Member, path: str, body: Dict[str, Any],
              read: float) -> Dict[str, Any]:
        for attempt in (1, 2):
            if self.username and member.token is None:
                self._authenticate(member, read)
            try:
                resp = member.rpc.session.post(member.rpc.get_url(path), json=body,
                                               timeout=self._timeouts(read))
            except requests.RequestException as e:
                raise _MemberDown(_reason(e)) from None
            if resp.status_code == 200:
                try:
                    return resp.json()
                except ValueError:
                    raise _MemberDown("answer is not JSON") from None
            code, message = _error_text(resp)
            if self.username and attempt == 1 and _auth_problem(code, message):
                member.set_token(None)
                continue
            if _member_problem(resp.status_code, code, message):
                raise _MemberDown(message, answered=True)
            raise _Refused(f"{member.url}: {message}")
        raise _Refused(f"{member.url}: authentication not accepted")

    def _authenticate(self, member: _Member, read: float) -> None:
        # The password is only ever in this request's body: never in a
        # message, a log line or an exception.
        try:
            resp = member.rpc.session.post(
                member.rpc.get_url("auth/authenticate"),
                json={"name": self.username, "password": self.password or ""},
                timeout=self._timeouts(read))
        except requests.RequestException as e:
            raise _MemberDown(_reason(e)) from None
        if resp.status_code != 200:
            code, message = _error_text(resp)
            if _member_problem(resp.status_code, code, message):
                raise _MemberDown(message, answered=True)
            raise _Refused(f"{member.url}: authentication as {self.username} failed: {message}")
        member.set_token(str(resp.json().get("token") or "") or None)

    def open_stream(self, body: Dict[str, Any]) -> Tuple[_Member, requests.Response]:
        """A watch stream from the first member that answers."""
        reasons: List[Tuple[str, str]] = []
        answered = False
        for member in self.order():
            try:
                if self.username and member.token is None:
                    self._authenticate(member, self.timeout)
                resp = member.stream.session.post(
                    member.stream.get_url("watch"), json=body, stream=True,
                    timeout=self._timeouts(max(self.timeout * 3, 3.0)),
                    # A member cut off from the others (no leader) then
                    # cancels the watch instead of going silent.
                    headers={"Grpc-Metadata-hasleader": "true"})
            except requests.RequestException as e:
                reasons.append((member.url, _reason(e)))
                continue
            except _MemberDown as e:
                reasons.append((member.url, str(e)))
                answered = answered or e.answered
                continue
            if resp.status_code != 200:
                code, message = _error_text(resp)
                resp.close()
                if _auth_problem(code, message):
                    member.set_token(None)
                reasons.append((member.url, message))
                answered = True
                continue
            sock = _stream_socket(resp)
            if sock is not None:
                # From here on, silence is normal: see STREAM_IDLE.
                sock.settimeout(STREAM_IDLE)
            self._stick(member)
            return member, resp
        raise _Unreachable(reasons, answered)


def _messages(resp: requests.Response) -> Iterator[Dict[str, Any]]:
    """The JSON objects of a gateway stream, one per line."""
    buf = bytearray()
    for chunk in resp.iter_content(chunk_size=None):
        buf += chunk
        while True:
            end = buf.find(b"\n")
            if end < 0:
                break
            line = bytes(buf[:end])
            del buf[:end + 1]
            if line.strip():
                yield json.loads(line)
    if bytes(buf).strip():
        yield json.loads(bytes(buf))


@dataclass
class _Check:
    """One compare of a commit, to tell which one failed."""

    what: str          # "record", "address" or "name"
    key: bytes
    ident: str         # the UUID, address or name
    expect: int = 0    # record: the mod_revision compared
    holder: str = ""   # claim: the UUID that releases it in this transaction ("": nobody)


@dataclass
class _Plan:
    compare: List[Dict[str, Any]] = field(default_factory=list)
    ops: Dict[bytes, Dict[str, Any]] = field(default_factory=dict)
    checks: List[_Check] = field(default_factory=list)

    def txn(self) -> Dict[str, Any]:
        failure = [{"request_range": {"key": _b64(c.key), "keys_only": c.what == "record"}}
                   for c in self.checks]
        return {"compare": self.compare, "success": list(self.ops.values()), "failure": failure}


def _put(key: bytes, value: bytes, lease: int = 0) -> Dict[str, Any]:
    req: Dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
    if lease:
        req["lease"] = str(lease)
    return {"request_put": req}


def _delete(key: bytes) -> Dict[str, Any]:
    return {"request_delete_range": {"key": _b64(key)}}


def _absent(key: bytes) -> Dict[str, Any]:
    return {"key": _b64(key), "result": "EQUAL", "target": "VERSION", "version": "0"}


def _at_revision(key: bytes, revision: int) -> Dict[str, Any]:
    if revision == 0:
        return _absent(key)
    return {"key": _b64(key), "result": "EQUAL", "target": "MOD", "mod_revision": str(revision)}


def _holds(key: bytes, value: str) -> Dict[str, Any]:
    return {"key": _b64(key), "result": "EQUAL", "target": "VALUE",
            "value": _b64(value.encode())}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


class EtcdStore:
    """The shared registry in etcd, read from `cache` (a writable local Store).

    start() connects; with etcd away it answers from the cache and keeps
    trying. Threads: the watch (applies every change to the cache, then tells
    the listeners) and the host lease's keep-alive.
    """

    def __init__(self, settings: StoreSection, cache: Store,
                 clock: Callable[[], float] = time.time, lease_ttl: int = 10,
                 request_timeout: float = 1.0):
        self.settings = settings
        self.host = settings.host
        self.prefix = settings.prefix
        self._cache = cache
        self._clock = clock
        self._ttl = lease_ttl
        self._timeout = request_timeout
        self._cluster = _Cluster(settings, request_timeout)
        self._password_read = False
        self._records_key = (self.prefix + "instances/").encode()
        self._host_key = (self.prefix + "hosts/" + self.host).encode()
        self._node = socket.gethostname()
        self._since = clock()
        # The cache, the versions and the listeners' calls move together
        # under this lock: listeners see changes in the order applied.
        self._lock = threading.RLock()
        self._advanced = threading.Condition(self._lock)
        self._listeners: List[Listener] = []
        self._versions: Dict[str, int] = {}     # uuid -> mod_revision of its record
        self._tombstones: Dict[str, int] = {}   # uuid -> revision that deleted it
        self._revision = 0                      # the cache holds every change up to here
        self._connected = False
        self._lost_at = time.monotonic()
        self._current_at = self._cache_mtime()  # clock() when the cache was last current
        self._lease: Optional[int] = None
        self._lease_lock = threading.Lock()
        self._locked_out: Optional[str] = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._stream: Optional[requests.Response] = None
        self._stream_member: Optional[_Member] = None
        self._stream_lock = threading.Lock()
        self._threads: List[threading.Thread] = []
        self._closed = False
        # Told the seconds from another host's registration (its record's
        # last_seen, that host's clock) to its arrival here: the watch's lag
        # (the daemon sets it to its metrics' histogram).
        self.on_watch_lag: Callable[[float], None] = lambda seconds: None

    # -- life cycle ------------------------------------------------------------

    def start(self) -> None:
        """Connect and follow etcd. StoreLocked if another live daemon serves
        this host; StoreUnavailable if etcd refuses us (credentials); an
        unreachable etcd is only logged (the cache answers meanwhile)."""
        self._read_password()
        try:
            changes = self._connect(starting=True)
        except _Unreachable as e:
            log.warning("etcd unreachable at %s: serving %d cached records; registrations "
                        "fail until it answers", ", ".join(f"{u} ({w})" for u, w in e.reasons),
                        len(self._cache))
        except _Refused as e:
            raise StoreUnavailable(f"etcd refused mdserver ({e})") from None
        else:
            log.info("etcd at %s: %d records as of revision %d (%d changed in the cache)",
                     ", ".join(self.settings.endpoints), len(self._cache), self._revision,
                     changes)
        for name, target in (("etcd-watch", self._watch_loop), ("etcd-lease", self._lease_loop)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        """Stop the threads, give the host up (revoke its lease), close the cache."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake.set()
        self._kick()
        for thread in self._threads:
            thread.join(timeout=LOAD_TIMEOUT)
        with self._lease_lock:
            lease, self._lease = self._lease, None
        if lease is not None:
            try:
                self._cluster.call("kv/lease/revoke", {"ID": str(lease)}, budget=self._timeout)
            except (_Unreachable, _Refused) as e:
                log.debug("etcd: host lease not revoked (it expires by itself): %s", e)
        with self._lock:
            self._cache.close()

    def _read_password(self) -> None:
        path = self.settings.password_file
        if self._password_read or not path:
            return
        try:
            with open(path, encoding="utf-8") as f:
                self._cluster.password = f.read().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(path, "store", "password_file",
                              f"cannot read it: {getattr(e, 'strerror', None) or e}") from None
        self._password_read = True

    def _cache_mtime(self) -> float:
        """When the cache last changed: the best guess of when it was current
        for a cache opened while etcd is away."""
        times = []
        for path in (self._cache.path, self._cache.journal_path):
            try:
                times.append(os.stat(path).st_mtime)
            except OSError:
                pass
        return max(times, default=self._clock())

    def _connect(self, starting: bool = False) -> int:
        """Hold the host, load everything into the cache; the number of changes."""
        self._ensure_lease(starting)
        changes = self._reload()
        with self._lock:
            self._connected = True
        return changes

    # -- reads: the cache ------------------------------------------------------

    def by_uuid(self, uuid: str) -> Optional[Instance]:
        return self._cache.by_uuid(uuid)

    def by_mac(self, mac: str) -> Optional[Instance]:
        return self._cache.by_mac(mac)

    def by_ip(self, ip: str) -> Optional[Instance]:
        return self._cache.by_ip(ip)

    def by_name(self, name: str) -> Optional[Instance]:
        return self._cache.by_name(name)

    def find(self, key: str) -> Instance:
        return self._cache.find(key)

    def freed(self, ip: str) -> Optional[Tuple[float, str]]:
        return self._cache.freed(ip)

    def version(self, uuid: str) -> int:
        """The etcd mod_revision of the record; 0 if there is none."""
        return self._versions.get(uuid.lower(), 0)

    def __iter__(self) -> Iterator[Instance]:
        return iter(self._cache)

    def __len__(self) -> int:
        return len(self._cache)

    def subscribe(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def refresh(self) -> bool:
        """Nothing to do: the watch keeps the cache current."""
        return False

    def status(self) -> Dict[str, object]:
        with self._lock:
            connected = self._connected
            age = 0.0 if connected else max(0.0, self._clock() - self._current_at)
            out: Dict[str, object] = {
                "backend": "etcd", "endpoints": list(self.settings.endpoints),
                "host": self.host, "prefix": self.prefix, "connected": connected,
                "revision": self._revision, "cache_age": round(age, 3),
                "records": per_host(self)}
            if self._locked_out:
                out["locked"] = self._locked_out
            return out

    # -- keys ------------------------------------------------------------------

    def _record_key(self, uuid: str) -> bytes:
        return self._records_key + uuid.encode()

    def _ip_key(self, ip: str) -> bytes:
        return (self.prefix + "ips/" + ip).encode()

    def _name_key(self, name: str) -> bytes:
        return (self.prefix + "names/" + name).encode()

    def _claims(self, inst: Optional[Instance]) -> Dict[bytes, Tuple[str, str]]:
        """The claim keys a record holds: key -> (kind, address or name)."""
        if inst is None:
            return {}
        out = {self._name_key(inst.name): ("name", inst.name)}
        if inst.ipv4:
            out[self._ip_key(inst.ipv4)] = ("address", inst.ipv4)
        return out

    def _parse(self, key: bytes, value: bytes) -> Optional[Tuple[str, Instance]]:
        """(uuid, record) of an instances/ key; None (logged) for anything unreadable."""
        uuid = key[len(self._records_key):].decode("utf-8", "replace")
        try:
            inst = Instance.from_dict(json.loads(value))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("etcd %s: not a record, ignored: %r", key.decode("utf-8", "replace"), e)
            return None
        if inst.uuid != uuid:
            log.warning("etcd %s: holds the record of %s, ignored",
                        key.decode("utf-8", "replace"), inst.uuid)
            return None
        return uuid, inst

    def _known(self, uuid: str) -> int:
        """The newest revision the cache reflects for this record (written or deleted)."""
        return max(self._versions.get(uuid, 0), self._tombstones.get(uuid, 0))

    # -- applying changes to the cache ----------------------------------------

    def _apply(self, changes: Sequence[Change], at: float) -> None:
        """Into the cache (one journal line), then to the listeners. Under the lock."""
        if not changes:
            return
        self._cache.commit(put=[c.new for c in changes if c.new is not None],
                           delete=[c.uuid for c in changes if c.new is None], at=at)
        for listener in list(self._listeners):
            try:
                listener(changes)
            except Exception:  # one listener's bug must not stop the watch or fail a commit
                log.exception("store listener %r failed", listener)

    def _load(self) -> Tuple[Dict[str, Tuple[Instance, int]], int]:
        """Every record in etcd with its mod_revision, and the revision it is all as of."""
        kvs, revision = self._range(self._records_key)
        records: Dict[str, Tuple[Instance, int]] = {}
        for kv in kvs:
            parsed = self._parse(_unb64(kv["key"]), _unb64(kv.get("value", "")))
            if parsed is not None:
                records[parsed[0]] = (parsed[1], int(kv["mod_revision"]))
        return records, revision

    def _range(self, prefix: bytes, revision: int = 0) -> Tuple[List[Dict[str, Any]], int]:
        """Every key-value under `prefix`, read in pages at one revision."""
        start, end = prefix, _prefix_end(prefix)
        out: List[Dict[str, Any]] = []
        while True:
            body: Dict[str, Any] = {"key": _b64(start), "range_end": _b64(end),
                                    "limit": str(PAGE)}
            if revision:
                body["revision"] = str(revision)
            answer = self._cluster.call("kv/range", body, timeout=LOAD_TIMEOUT)
            revision = revision or int(answer["header"]["revision"])
            kvs = answer.get("kvs") or []
            out += kvs
            if not answer.get("more") or not kvs:
                return out, revision
            start = _unb64(kvs[-1]["key"]) + b"\0"

    def _reload(self) -> int:
        """Make the cache what etcd holds (full load); the number of records changed."""
        records, revision = self._load()
        with self._lock:
            if self._stop.is_set():
                return 0
            current = {i.uuid: i for i in self._cache}
            target: Dict[str, Instance] = {}
            for uuid in set(current) | set(records):
                if self._known(uuid) > revision:
                    # A commit of ours landed after this read: it is newer.
                    if uuid in current:
                        target[uuid] = current[uuid]
                elif uuid in records:
                    target[uuid] = records[uuid][0]
            changes = diff(current, target)
            self._apply(changes, self._clock())
            versions = {u: rev for u, (_, rev) in records.items() if self._known(u) <= revision}
            versions.update((u, v) for u, v in self._versions.items() if v > revision)
            self._versions = versions
            self._tombstones = {u: r for u, r in self._tombstones.items() if r > revision}
            self._revision = revision
            self._advanced.notify_all()
            return len(changes)

    def _apply_events(self, events: Sequence[Dict[str, Any]]) -> int:
        """Watch events into the cache; the number of records changed."""
        with self._lock:
            if self._stop.is_set():
                return 0
            final: Dict[str, Tuple[Optional[Instance], int]] = {}
            top = self._revision
            for event in events:
                kv = event.get("kv") or {}
                rev = int(kv.get("mod_revision") or 0)
                top = max(top, rev)
                key = _unb64(kv.get("key", ""))
                uuid = key[len(self._records_key):].decode("utf-8", "replace")
                if not key.startswith(self._records_key) or rev <= self._known(uuid):
                    continue  # not a record, or a change this store made itself
                if event.get("type") == "DELETE":
                    final[uuid] = (None, rev)
                else:
                    parsed = self._parse(key, _unb64(kv.get("value", "")))
                    if parsed is not None:
                        final[uuid] = (parsed[1], rev)
            changes = [Change(self._cache.by_uuid(u), inst) for u, (inst, _) in final.items()]
            changes = [c for c in changes if c.old != c.new]
            now = self._clock()
            self._apply(changes, now)
            for c in changes:
                # A registration (last_seen moved); other edits keep an old last_seen.
                if c.new is not None and (c.old is None or c.new.last_seen != c.old.last_seen):
                    self.on_watch_lag(now - c.new.last_seen)
            for uuid, (inst, rev) in final.items():
                if inst is None:
                    self._versions.pop(uuid, None)
                    self._tombstones[uuid] = rev
                else:
                    self._versions[uuid] = rev
                    self._tombstones.pop(uuid, None)
            self._revision = top
            # No event older than the watch's revision can come any more.
            self._tombstones = {u: r for u, r in self._tombstones.items() if r > top}
            self._advanced.notify_all()
            return len(changes)

    def _committed(self, puts: Mapping[str, Instance], deletes: Sequence[str], at: float,
                   revision: int) -> None:
        """A write of ours that etcd accepted at `revision`: into the cache now
        (the caller reads its own write); its watch event is then a no-op."""
        with self._lock:
            if self._stop.is_set():
                return
            changes = [Change(self._cache.by_uuid(u), None) for u in deletes]
            changes += [Change(self._cache.by_uuid(u), inst) for u, inst in puts.items()]
            changes = [c for c in changes if c.old != c.new]
            self._apply(changes, at)
            for uuid in deletes:
                self._versions.pop(uuid, None)
                self._tombstones[uuid] = revision
            for uuid in puts:
                self._versions[uuid] = revision
                self._tombstones.pop(uuid, None)

    # -- writes ----------------------------------------------------------------

    def commit(self, put: Iterable[Instance] = (), delete: Iterable[str] = (),
               at: float = 0.0, expect: Optional[Mapping[str, int]] = None) -> None:
        """One etcd transaction: the records, and the claims on their addresses
        and names. StoreConflict (nothing written) when a record is not at its
        expected version or an address or name it takes is held; by then the
        cache shows what won. StoreUnavailable: etcd did not answer."""
        puts = {i.uuid: i for i in put}
        deletes = [u for u in dict.fromkeys(delete) if u not in puts]
        if self._locked_out:
            raise StoreLocked(f"{self._locked_out}: registrations refused until it stops")
        # One budget, connected or not: the libvirt hook has 1.5 s in all. A
        # member that stopped answering is left for the next one in it (and
        # comes last in later calls); refused connections cost nothing.
        budget = self._timeout
        # The lock keeps the watch from applying this very write before we do
        # (with its own clock for a delete's time); reads do not take it.
        with self._lock:
            plan = self._plan(puts, deletes, expect or {})
            try:
                answer = self._cluster.call("kv/txn", plan.txn(), budget=budget)
            except _Unreachable as e:
                raise StoreUnavailable(f"etcd unreachable ({e.first}): nothing written") from None
            except _Refused as e:
                raise StoreUnavailable(f"etcd refused the write ({e}): nothing written") \
                    from None
            if not self._connected:
                self._wake.set()  # it answers again: the watch need not wait out its backoff
            if answer.get("succeeded"):
                self._committed(puts, deletes, at, int(answer["header"]["revision"]))
                return
        raise StoreConflict(self._conflict(plan, answer))

    def _plan(self, puts: Mapping[str, Instance], deletes: Sequence[str],
              expect: Mapping[str, int]) -> _Plan:
        """The compares and operations of a commit, from what the cache shows."""
        plan = _Plan()
        old = {u: self._cache.by_uuid(u) for u in [*puts, *deletes]}
        held = {u: self._claims(old[u]) for u in old}
        wanted = {u: self._claims(puts.get(u)) for u in old}
        released = {k: u for u in old for k in held[u] if k not in wanted[u]}
        taken: Dict[bytes, str] = {}
        # An expected version of a record the commit does not write is checked too.
        for uuid in dict.fromkeys([*old, *expect]):
            version = expect.get(uuid, self.version(uuid))
            key = self._record_key(uuid)
            plan.compare.append(_at_revision(key, version))
            plan.checks.append(_Check("record", key, uuid, expect=version))
        for key in released:
            plan.ops[key] = _delete(key)
        for uuid in deletes:
            plan.ops[self._record_key(uuid)] = _delete(self._record_key(uuid))
        for uuid, inst in puts.items():
            plan.ops[self._record_key(uuid)] = _put(self._record_key(uuid),
                                                    json.dumps(inst.to_dict()).encode())
            for key, (kind, ident) in wanted[uuid].items():
                if key in taken:
                    raise StoreConflict(f"{kind} {ident} is taken twice in one commit "
                                        f"({taken[key]} and {uuid}): nothing written")
                taken[key] = uuid
                if key in held[uuid]:
                    continue  # kept: the record's compare covers it
                holder = released.get(key, "")
                # Taken from a record that lets it go in this same transaction
                # (deleted, renamed): that record's compare covers the rest.
                plan.compare.append(_holds(key, holder) if holder else _absent(key))
                plan.checks.append(_Check(kind, key, ident, holder=holder))
                plan.ops[key] = _put(key, uuid.encode())
        return plan

    def _conflict(self, plan: _Plan, answer: Dict[str, Any]) -> str:
        """What failed, once the cache shows it (bounded wait for the watch)."""
        found: List[Tuple[_Check, Optional[Dict[str, Any]]]] = []
        for check, response in zip(plan.checks, answer.get("responses") or []):
            kvs = (response.get("response_range") or {}).get("kvs") or []
            kv = kvs[0] if kvs else None
            if check.what == "record":
                if int((kv or {}).get("mod_revision") or 0) != check.expect:
                    found.append((check, kv))
            elif check.holder:
                if kv is None or _unb64(kv.get("value", "")).decode() != check.holder:
                    found.append((check, kv))
            elif kv is not None:
                found.append((check, kv))

        def shown() -> bool:
            for check, kv in found:
                rev = int((kv or {}).get("mod_revision") or 0)
                if check.what == "record" and kv is None:
                    if self._cache.by_uuid(check.ident) is not None:
                        return False
                elif kv is not None:
                    uuid = check.ident if check.what == "record" else \
                        _unb64(kv.get("value", "")).decode("utf-8", "replace")
                    if self._revision < rev and self._known(uuid) < rev:
                        return False
            return True

        with self._lock:
            self._advanced.wait_for(shown, timeout=CONFLICT_WAIT)
        lines = []
        for check, kv in found:
            if check.what == "record":
                lines.append(f"instance {check.ident} changed meanwhile")
                continue
            holder = _unb64(kv.get("value", "")).decode("utf-8", "replace") if kv else ""
            lines.append(f"{check.what} {check.ident} changed meanwhile"
                         + (f": held by {self._describe(holder)}" if holder else ""))
        return "; ".join(lines) or \
            f"the registry changed meanwhile (revision {answer['header']['revision']})"

    def _describe(self, uuid: str) -> str:
        inst = self._cache.by_uuid(uuid)
        return f"{inst.name} ({uuid}) on host {inst.host}" if inst else uuid

    # -- the watch -------------------------------------------------------------

    def _watch_loop(self) -> None:
        failures = 0
        compacted: Optional[int] = None
        while not self._stop.is_set():
            try:
                if not self._connected:
                    self._reconnect()
                    compacted = None
                elif compacted is not None:
                    changes = self._reload()
                    log.info("etcd compacted past revision %d: reloaded, %d changes to revision "
                             "%d", compacted, changes, self._revision)
                    compacted = None
                started = time.monotonic()
                healthy = self._follow()
                failures = 0 if healthy or time.monotonic() - started > STREAM_HEALTHY \
                    else failures + 1
            except _Compacted:
                compacted, failures = self._revision, 0
                continue
            except _Unreachable as e:
                if not e.answered:
                    self._set_lost(e.first)
                # else: up but between leaders; the lease's keep-alive tells
                # if that lasts
                failures += 1
            except _Refused as e:
                log.warning("etcd refused the watch: %s", e)
                failures += 1
            except Exception as e:
                # A bug or the cache's disk: start over from a full load.
                log.exception("etcd watch failed; starting over")
                self._set_lost(type(e).__name__, quiet=True)
                failures += 1
            if failures and not self._stop.is_set():
                self._wake.wait(min(BACKOFF_MAX, 0.1 * 2 ** (failures - 1)))
                self._wake.clear()

    def _reconnect(self) -> None:
        """After an outage (or a start without etcd): the whole registry again,
        which also covers anything compacted meanwhile."""
        changes = self._connect()
        log.info("etcd back after %.1f s: caught up to revision %d (%d changes)",
                 time.monotonic() - self._lost_at, self._revision, changes)

    def _set_lost(self, reason: str, quiet: bool = False) -> None:
        with self._lock:
            if not self._connected:
                return
            self._connected = False
            self._lost_at = time.monotonic()
            self._current_at = self._clock()
            if not quiet:
                log.warning("etcd connection lost (%s): answering from the cache (%d records, "
                            "as of revision %d)", reason, len(self._cache), self._revision)
        self._kick()

    def _follow(self) -> bool:
        """Apply the stream of changes after the cache's revision until it ends
        (_StreamEnded, _Compacted, _Unreachable); True if it ended after events."""
        body = {"create_request": {"key": _b64(self._records_key),
                                   "range_end": _b64(_prefix_end(self._records_key)),
                                   "start_revision": str(self._revision + 1)}}
        member, resp = self._cluster.open_stream(body)
        with self._stream_lock:
            self._stream, self._stream_member = resp, member
        got_events = False
        try:
            if self._stop.is_set() or not self._connected:
                raise _StreamEnded("stopping")  # kicked before it was registered
            for message in _messages(resp):
                if "error" in message:
                    raise _StreamEnded(_error_text_of(message["error"]))
                result = message.get("result") or {}
                if int(result.get("compact_revision") or 0) > 0:
                    raise _Compacted(self._revision)
                if result.get("canceled"):
                    reason = str(result.get("cancel_reason") or "canceled")
                    if "permission denied" in reason or "auth" in reason:
                        member.set_token(None)  # perhaps only an expired token
                    raise _StreamEnded(reason)
                if result.get("events"):
                    self._apply_events(result["events"])
                    got_events = True
            reason = "closed by the member"
        except (requests.RequestException, OSError, ValueError) as e:
            reason = _reason(e)
        except _StreamEnded as e:
            reason = str(e)
        finally:
            with self._stream_lock:
                self._stream, self._stream_member = None, None
            resp.close()
        if not self._stop.is_set() and self._connected:
            # Another member takes over at once; only this line tells.
            log.debug("etcd watch on %s ended: %s", member.url, reason)
            self._cluster.demote(member)
        return got_events

    def _kick(self, only: Optional[str] = None) -> None:
        """End the watch stream now (on `only`'s member, if given): a blocked
        read wakes up when its socket is shut down, not when it is closed."""
        with self._stream_lock:
            resp, member = self._stream, self._stream_member
        if resp is None or (only is not None and (member is None or member.url != only)):
            return
        sock = _stream_socket(resp)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # -- the host lease --------------------------------------------------------

    def _lease_loop(self) -> None:
        while not self._stop.wait(self._ttl / 3):
            if not self._connected:
                continue  # the watch reconnects, and takes the lease again then
            try:
                self._keepalive()
            except _Unreachable as e:
                self._set_lost(e.first)
            except _Refused as e:
                log.warning("etcd refused the host lease's keep-alive: %s", e)
            except StoreLocked:
                pass  # logged in _ensure_lease
            except Exception:
                log.exception("etcd host lease keep-alive failed")

    def _keepalive(self) -> None:
        with self._lease_lock:
            lease = self._lease
        if lease is None:
            self._ensure_lease()  # held by another daemon: try again each round
            return
        failed: List[str] = []
        # Budget: a leader election in a healthy cluster is not an outage.
        answer = self._cluster.call("lease/keepalive", {"ID": str(lease)}, failed=failed,
                                    budget=max(self._ttl / 3, self._timeout))
        for url in failed:
            self._kick(only=url)  # the watch is on a member that stopped answering
        if int((answer.get("result") or {}).get("TTL") or 0) <= 0:
            log.warning("etcd: the lease on [store] host %s expired; taking it again", self.host)
            with self._lease_lock:
                if self._lease == lease:
                    self._lease = None
            self._ensure_lease()

    def _ensure_lease(self, starting: bool = False) -> None:
        """Hold P hosts/<host> on a live lease of ours. Held by another live
        daemon: StoreLocked when starting, else every commit is refused."""
        with self._lease_lock:
            if self._lease is not None:
                answer = self._cluster.call("lease/keepalive", {"ID": str(self._lease)})
                if int((answer.get("result") or {}).get("TTL") or 0) > 0:
                    return
                self._lease = None
            granted = self._cluster.call("lease/grant", {"TTL": str(self._ttl), "ID": "0"})
            lease = int(granted["ID"])
            try:
                holder = self._take_host(lease)
            except BaseException:
                self._revoke(lease)
                raise
            if holder is None:
                self._lease = lease
                if self._locked_out:
                    log.warning("etcd: [store] host %s is ours again", self.host)
                self._locked_out = None
                return
            self._revoke(lease)
            message = f"[store] host {self.host} is already served by another mdserver ({holder})"
            if starting:
                raise StoreLocked(message)
            if self._locked_out != message:
                log.error("%s: registrations refused until it stops", message)
            self._locked_out = message

    def _take_host(self, lease: int) -> Optional[str]:
        """Put our host key on `lease` unless someone holds it; who does, if so."""
        value = json.dumps({"pid": os.getpid(), "node": self._node, "since": self._since})
        for _ in range(3):
            answer = self._cluster.call("kv/txn", {
                "compare": [_absent(self._host_key)],
                "success": [_put(self._host_key, value.encode(), lease)],
                "failure": [{"request_range": {"key": _b64(self._host_key)}}]})
            if answer.get("succeeded"):
                return None
            kvs = (answer["responses"][0].get("response_range") or {}).get("kvs") or []
            if not kvs:
                continue  # its lease ran out meanwhile
            try:
                info = json.loads(_unb64(kvs[0].get("value", "")))
                pid, node, since = int(info["pid"]), str(info["node"]), float(info["since"])
            except (ValueError, KeyError, TypeError):
                return "unreadable holder record"
            if node == self._node and pid != os.getpid() and not _pid_alive(pid):
                # Our own predecessor on this machine died without revoking:
                # no need to wait out its lease.
                log.info("etcd: [store] host %s was held by pid %d, which is gone: taking over",
                         self.host, pid)
                self._revoke(int(kvs[0].get("lease") or 0))
                continue
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
            return f"pid {pid} on {node} since {when}"
        return "it keeps changing hands"

    def _revoke(self, lease: int) -> None:
        if not lease:
            return
        try:
            self._cluster.call("kv/lease/revoke", {"ID": str(lease)}, budget=self._timeout)
        except (_Unreachable, _Refused) as e:
            log.debug("etcd: lease %x not revoked: %s", lease, e)

    # -- migration (mdserverctl store migrate) -------------------------------

    def _snapshot(self) -> Tuple[Dict[str, Instance], Dict[str, str], Dict[str, str]]:
        """Records by UUID, address claims and name claims, as etcd holds them now."""
        self._read_password()
        try:
            records, revision = self._load()
            ips, _ = self._range((self.prefix + "ips/").encode(), revision)
            names, _ = self._range((self.prefix + "names/").encode(), revision)
        except _Unreachable as e:
            raise StoreUnavailable(f"etcd unreachable ({e.first})") from None
        except _Refused as e:
            raise StoreUnavailable(f"etcd refused the read ({e})") from None

        def claims(kvs: List[Dict[str, Any]], sub: str) -> Dict[str, str]:
            skip = len((self.prefix + sub).encode())
            return {_unb64(kv["key"])[skip:].decode("utf-8", "replace"):
                    _unb64(kv.get("value", "")).decode("utf-8", "replace") for kv in kvs}
        return ({u: inst for u, (inst, _) in records.items()}, claims(ips, "ips/"),
                claims(names, "names/"))

    def conflicts(self, instances: Iterable[Instance]) -> List[str]:
        """One line per instance whose UUID (on another host), address or
        name etcd already gives to another record; also clashes among `instances`."""
        return self._conflicts(list(instances), *self._snapshot())

    def _conflicts(self, instances: List[Instance], records: Mapping[str, Instance],
                   ips: Mapping[str, str], names: Mapping[str, str]) -> List[str]:
        def who(uuid: str) -> str:
            inst = records.get(uuid)
            return f"{inst.name} ({uuid}) on host {inst.host}" if inst else f"{uuid} (no record)"

        lines = []
        mine_ip: Dict[str, Instance] = {}
        mine_name: Dict[str, Instance] = {}
        for inst in instances:
            there = records.get(inst.uuid)
            if there is not None and there.host != inst.host:
                lines.append(f"{inst.uuid}: registered as {there.name} on host {there.host}")
            for label, value, held, mine in ((inst.ipv4, inst.ipv4, ips, mine_ip),
                                             (f"name {inst.name}", inst.name, names, mine_name)):
                holder = held.get(value)
                if holder is not None and holder != inst.uuid:
                    lines.append(f"{label}: held by {who(holder)}")
                other = mine.setdefault(value, inst)
                if other is not inst:
                    lines.append(f"{label}: given to both {other.name} ({other.uuid}) and "
                                 f"{inst.name} ({inst.uuid}) among these records")
        return lines

    def import_records(self, instances: Iterable[Instance]) -> int:
        """Create the records (and their claims) etcd lacks, in transactions of
        IMPORT_BATCH instances; the number written. StoreConflict with the
        conflicts if there are any: nothing of a conflicting batch is written."""
        instances = list(instances)
        records, ips, names = self._snapshot()
        problems = self._conflicts(instances, records, ips, names)
        if problems:
            raise StoreConflict("; ".join(problems))
        todo = [i for i in instances if i.uuid not in records]  # the rest are there already
        written = 0
        for start in range(0, len(todo), IMPORT_BATCH):
            batch = todo[start:start + IMPORT_BATCH]
            plan = _Plan()
            for inst in batch:
                key = self._record_key(inst.uuid)
                plan.compare.append(_absent(key))
                plan.ops[key] = _put(key, json.dumps(inst.to_dict()).encode())
                for claim in self._claims(inst):
                    plan.compare.append(_absent(claim))
                    plan.ops[claim] = _put(claim, inst.uuid.encode())
            try:
                answer = self._cluster.call("kv/txn", {"compare": plan.compare,
                                                       "success": list(plan.ops.values()),
                                                       "failure": []}, timeout=LOAD_TIMEOUT)
            except _Unreachable as e:
                raise StoreUnavailable(f"etcd unreachable ({e.first}): {written} record(s) "
                                       "written before it went away") from None
            except _Refused as e:
                raise StoreUnavailable(f"etcd refused the write ({e}): {written} record(s) "
                                       "written before") from None
            if not answer.get("succeeded"):
                problems = self.conflicts(batch) or ["the registry changed meanwhile"]
                raise StoreConflict("; ".join(problems) + f" ({written} record(s) written "
                                    "before this batch, nothing of it)")
            self._committed({i.uuid: i for i in batch}, [], 0.0,
                            int(answer["header"]["revision"]))
            written += len(batch)
        return written


def _error_text_of(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error.get("error") or error)
    return str(error)

