"""Host-side use cases: register a domain, remove, list; keeps the registration sinks in step."""

import logging
import random
import threading
import time
import zlib
from typing import Callable, List, Optional, Protocol, Sequence, Set

from mdserver import domainxml, logs
from mdserver.config import Config
from mdserver.errors import BadRequest, Conflict, StoreConflict, StoreUnavailable
from mdserver.ipam import Pool
from mdserver.metrics import HostMetrics
from mdserver.models import Instance, default_hostname
from mdserver.storeapi import Change, InstanceStore

log = logging.getLogger(__name__)


class Sink(Protocol):
    """Something outside the database that follows every instance (dnsmasq's
    host files, seed images): each call says whether it must be reloaded."""

    def put(self, inst: Instance) -> bool: ...

    def remove(self, uuid: str) -> bool: ...

    def sync(self, instances: Sequence[Instance]) -> bool: ...

    def reload(self) -> bool: ...


def sink_name(sink: object) -> str:
    """A sink's label in metrics: its class's, or its `name` attribute."""
    return getattr(sink, "name", None) or type(sink).__name__


def no_check(inst: Instance) -> Optional[str]:
    return None


# A write another host's registration beat (an address or name claimed
# first) is re-planned on the fresher state this many times.
ATTEMPTS = 8

# Seconds between attempts to bring a failing sink (its directory read-only,
# full, gone) back in step when no change comes to try it: a domain defined
# while it failed and started later must find its files.
RETRY_INTERVAL = 30.0


class Registry:
    """This host's writer of the instance store (it runs in the main process).

    The sinks follow the store's change feed, so they see this host's writes
    and, with a shared store, every other host's."""

    def __init__(self, cfg: Config, store: InstanceStore, sinks: Sequence[Sink],
                 clock: Callable[[], float] = time.time,
                 on_change: Callable[[], None] = lambda: None,
                 check: Callable[[Instance], Optional[str]] = no_check,
                 retry_interval: float = RETRY_INTERVAL,
                 metrics: Optional[HostMetrics] = None):
        self.cfg = cfg
        self.metrics = metrics
        self.store = store
        self.host = store.host
        self.sinks = list(sinks)
        self.clock = clock
        self.on_change = on_change  # after each change has reached the sinks
        # What is wrong with an instance's user-data (None: nothing), so a
        # failing template is seen at registration, before any guest asks.
        self.check = check
        dn = cfg.dnsmasq
        self.pool = Pool(dn.network, reserved=[dn.gateway, cfg.mdserver.listen_address])
        self.lease_len = dn.lease_len
        # Hosts sharing a store start their searches at different places, so
        # concurrent registrations on several hosts rarely want one address.
        shared = cfg.store.backend != "local"
        self._cursor = self.pool.first + (zlib.crc32(self.host.encode()) % max(1, self.pool.size)
                                          if shared else 0)
        self._lock = threading.Lock()
        # Held while sinks are written, and guards _failing and _retrier.
        self._sink_lock = threading.Lock()
        # Indexes in self.sinks of the sinks that missed a change: out of
        # step until a full sync() of theirs succeeds.
        self._failing: Set[int] = set()
        self.retry_interval = retry_interval
        self._retrier: Optional[threading.Thread] = None
        self._stop = threading.Event()
        store.subscribe(self._changed)

    def sync(self) -> None:
        """Start-up: make every sink match the store. A sink that cannot
        write is reported and retried; the daemon serves meanwhile."""
        instances = list(self.store)
        with self._sink_lock:
            for n in range(len(self.sinks)):
                self._resync(n, instances)

    def retry(self) -> None:
        """Re-sync every failing sink with all records (the periodic catch-up)."""
        with self._sink_lock:
            if self._failing:
                instances = list(self.store)
                for n in sorted(self._failing):
                    self._resync(n, instances)

    def close(self) -> None:
        """Stop the retries (a daemon thread: a process may also just exit)."""
        self._stop.set()

    def _changed(self, changes: Sequence[Change]) -> None:
        """The store's change feed (this host's writes and, shared, any host's).

        The record is stored whatever a sink does: a sink that fails is
        reported once, and brought back in step with every record (it missed
        changes, so not only this one) at the next change or retry."""
        with self._sink_lock:
            for n, sink in enumerate(self.sinks):
                if n in self._failing:
                    self._resync(n, list(self.store))
                    continue
                try:
                    reload = [sink.put(c.new) if c.new is not None else sink.remove(c.uuid)
                              for c in changes]
                    if any(reload):
                        sink.reload()
                except Exception as e:
                    self._failed(n, e)
        self.on_change()

    def _resync(self, n: int, instances: Sequence[Instance]) -> None:
        """sink n made to match `instances`. Under _sink_lock."""
        sink = self.sinks[n]
        try:
            if sink.sync(instances):
                sink.reload()
        except Exception as e:
            self._failed(n, e)
            return
        if n in self._failing:
            self._failing.discard(n)
            log.info("%s: writing again", type(sink).__name__)

    def _failed(self, n: int, e: Exception) -> None:
        """One line when sink n starts failing, none while it goes on (each
        failed attempt is counted). Under _sink_lock."""
        if self.metrics is not None:
            self.metrics.sink_error(sink_name(self.sinks[n]))
        if n in self._failing:
            return
        self._failing.add(n)
        # A bug in a sink (not an OSError) gets its traceback.
        log.error("%s: %s; instances are still registered, its files catch up once it "
                  "can write again", type(self.sinks[n]).__name__, e,
                  exc_info=not isinstance(e, OSError))
        if self._retrier is None:
            self._retrier = threading.Thread(target=self._retry_loop, daemon=True,
                                             name="sink-retry")
            self._retrier.start()

    def _retry_loop(self) -> None:
        """While a sink fails, retry it every retry_interval seconds; ends once none fails."""
        while not self._stop.wait(self.retry_interval):
            self.retry()
            with self._sink_lock:
                if not self._failing:
                    self._retrier = None
                    return

    def _taken(self, uuid: str, now: float) -> Callable[[str], bool]:
        def taken(ip: str) -> bool:
            if self.store.by_ip(ip) is not None:
                return True
            freed = self.store.freed(ip)
            # Quarantine: a lease handed out for this address may still be live.
            return freed is not None and freed[1] != uuid and now - freed[0] < self.lease_len
        return taken

    def register(self, xml: bytes, pending: bool = False) -> Instance:
        """Parse, allocate (or keep) an address, store, update the sinks. All or nothing.

        `pending`: `xml` is the definition of a running domain that the guest
        sees only at its next cold boot (the enroller or `mdserverctl route
        --apply` changed it); a registration without it (the hook's, at a
        start) means the guest runs what was registered."""
        started = time.monotonic()
        try:
            record, current = self._register_all(xml, pending)
        except Exception:
            if self.metrics is not None:
                self.metrics.registered("error")
            raise
        if current is None:
            verb, result = "registered", "registered"
        elif current.host != record.host:
            verb, result = f"moved from host {current.host} and updated", "updated"
        else:
            verb, result = "updated", "updated"
        if self.metrics is not None:
            self.metrics.registered(result, time.monotonic() - started)
        log.info("%s %s (%s) %s %s", verb, record.name, record.uuid, record.mac, record.ipv4,
                 extra=logs.fields(instance=record.name, uuid=record.uuid, ip=record.ipv4,
                                   mac=record.mac, event=result))
        problem = self.check(record)
        if problem:
            log.error("%s (%s): user-data fails, guests will get none: %s", record.name,
                      record.uuid, problem,
                      extra=logs.fields(instance=record.name, uuid=record.uuid,
                                        event="template-error"))
        return record

    def _register_all(self, xml: bytes, pending: bool):
        """Parse and store, re-planned after lost races: (record, the one it replaced)."""
        dn = self.cfg.dnsmasq
        info = domainxml.parse(xml, dn.net_name, dn.interface)
        for attempt in range(ATTEMPTS):
            try:
                with self._lock:
                    record, current = self._register(info, pending)
                break
            except StoreConflict as e:
                # The store now shows the other writer's change: plan again,
                # searching from a random place: two hosts whose searches met
                # would otherwise keep wanting each other's next address
                # (seen: one registration losing 8 races in a row).
                if attempt == ATTEMPTS - 1:
                    raise
                with self._lock:
                    self._cursor = self.pool.first + random.randrange(max(1, self.pool.size))
                log.info("%s (%s): %s; planning again", info.name, info.uuid, e)
        return record, current

    def _register(self, info: domainxml.DomainInfo, pending: bool):
        """One attempt: (the record written, the one it replaces)."""
        store = self.store
        now = self.clock()
        # The same domain is found by UUID, else by MAC (a domain re-created
        # with its old MAC keeps its address).
        current = store.by_uuid(info.uuid) or store.by_mac(info.mac)
        stale = {i.uuid: i for i in (store.by_mac(info.mac), store.by_name(info.name))
                 if i is not None and i.uuid != info.uuid}
        for old in stale.values():
            what = "MAC" if old.mac == info.mac else "name"
            if old.host != self.host:
                raise Conflict(f"{info.name} ({info.uuid}): its {what} is held by "
                               f"{old.name} ({old.uuid}) on host {old.host}")
            log.warning("%s (%s) replaces %s (%s), which had the same %s", info.name,
                        info.uuid, old.name, old.uuid, what)
        if current is not None and self.pool.usable(current.ipv4):
            ip = current.ipv4
        else:
            ip, self._cursor = self.pool.find_free(self._cursor, self._taken(info.uuid, now))
        same = current is not None and current.uuid == info.uuid
        record = Instance(
            uuid=info.uuid, name=info.name, mac=info.mac, ipv4=ip,
            hostname=info.settings.hostname or default_hostname(info.name, info.uuid),
            first_seen=current.first_seen if current is not None else now,
            last_seen=now, arch=info.arch, settings=info.settings,
            password_blob=current.password_blob if same and current is not None else None,
            route_pending=pending, host=self.host)
        expect = {u: store.version(u) for u in [info.uuid, *stale]}
        try:
            store.commit(put=[record], delete=list(stale), at=now, expect=expect)
        except StoreUnavailable:
            # Every VM start runs the hook: a known domain that changed in
            # nothing but last_seen is still registered while a shared store
            # is away.
            if same and current is not None and record == current.updated(last_seen=now):
                log.info("%s (%s): unchanged; last_seen not updated (%s)", info.name,
                         info.uuid, "store unavailable")
                return current, current
            raise
        return record, current

    def remove(self, key: str, any_host: bool = False) -> Instance:
        """Remove by name or UUID; its address stays out of use for a lease
        time. Another host's instance only with `any_host` (its own host's
        libvirt decides when it is gone)."""
        started = time.monotonic()
        try:
            inst = self._remove(key, any_host)
        except Exception:
            if self.metrics is not None:
                self.metrics.removed("error")
            raise
        if self.metrics is not None:
            self.metrics.removed("removed", time.monotonic() - started)
        log.info("removed %s (%s) %s", inst.name, inst.uuid, inst.ipv4,
                 extra=logs.fields(instance=inst.name, uuid=inst.uuid, ip=inst.ipv4,
                                   mac=inst.mac, event="removed"))
        return inst

    def _remove(self, key: str, any_host: bool) -> Instance:
        with self._lock:
            inst = self.store.by_name(key) or self.store.by_uuid(key) or self.store.find(key)
            if inst.host != self.host and not any_host:
                raise Conflict(f"{inst.name} ({inst.uuid}) belongs to host {inst.host}: "
                               "it is removed there (or with --any-host)")
            self.store.commit(delete=[inst.uuid], at=self.clock(),
                              expect={inst.uuid: self.store.version(inst.uuid)})
        return inst

    def _replace(self, inst: Instance, **changes) -> Instance:
        record = inst.updated(**changes)
        self.store.commit(put=[record], at=self.clock(),
                          expect={inst.uuid: self.store.version(inst.uuid)})
        return record

    def set_password_blob(self, key: str, blob: bytes) -> Instance:
        """What the guest POSTed to /openstack/<v>/password; once, as nova
        (a second POST is a Conflict until the admin clears it)."""
        try:
            text = blob.decode("ascii").strip()
        except UnicodeDecodeError:
            raise BadRequest("the password must be ASCII (base64 of the encrypted "
                             "password)") from None
        if not text:
            raise BadRequest("empty password")
        with self._lock:
            inst = self.store.find(key)
            if inst.password_blob:
                raise Conflict("a password is already stored for this instance")
            record = self._replace(inst, password_blob=text)
        log.info("%s (%s): the guest stored its encrypted password", inst.name, inst.uuid)
        return record

    def clear_password_blob(self, key: str) -> Instance:
        with self._lock:
            return self._replace(self.store.find(key), password_blob=None)

    def find(self, key: str) -> Instance:
        return self.store.find(key)

    def list(self) -> List[Instance]:
        return sorted(self.store, key=lambda i: (i.name, i.uuid))

    def describe(self, inst: Instance) -> dict:
        return describe(inst, self.cfg.libvirt.route, self.check(inst))


def describe(inst: Instance, default_route: str, problem: Optional[str]) -> dict:
    """record_json and whether its user-data renders (`problem`: why not)."""
    return dict(record_json(inst, default_route),
                userdata="ok" if problem is None else f"error: {problem}")


def record_json(inst: Instance, default_route: str = "") -> dict:
    """What the admin API returns for an instance (no secrets)."""
    s = inst.settings
    route = s.route or default_route
    return {"name": inst.name, "uuid": inst.uuid, "mac": inst.mac, "ip": inst.ipv4,
            "hostname": inst.hostname,
            # what the guest's cloud-init sees: only the EC2 face serves i-...
            "instance_id": inst.instance_id if route == "ec2" else inst.uuid,
            "route": f"{route} (pending: next cold boot)" if inst.route_pending else route,
            "host": inst.host,
            "network": s.network,
            "first_seen": inst.first_seen, "last_seen": inst.last_seen,
            "template": s.template, "ssh_keys": len(s.ssh_keys),
            "meta": dict(s.meta), "password": s.password is not None,
            "guest_password": inst.password_blob is not None}
