"""Host-side use cases: register a domain, remove, list; keeps the registration sinks in step."""

import logging
import threading
import time
from typing import Callable, List, Optional, Protocol, Sequence

from mdserver import domainxml
from mdserver.config import Config
from mdserver.errors import BadRequest, Conflict
from mdserver.ipam import Pool
from mdserver.models import Instance, default_hostname
from mdserver.store import Store

log = logging.getLogger(__name__)


class Sink(Protocol):
    """Something outside the database that follows every instance (dnsmasq's
    host files, seed images): each call says whether it must be reloaded."""

    def put(self, inst: Instance) -> bool: ...

    def remove(self, uuid: str) -> bool: ...

    def sync(self, instances: Sequence[Instance]) -> bool: ...

    def reload(self) -> bool: ...


def no_check(inst: Instance) -> Optional[str]:
    return None


class Registry:
    """The only writer of the instance database (it runs in the main process)."""

    def __init__(self, cfg: Config, store: Store, sinks: Sequence[Sink],
                 clock: Callable[[], float] = time.time,
                 on_change: Callable[[], None] = lambda: None,
                 check: Callable[[Instance], Optional[str]] = no_check):
        self.cfg = cfg
        self.store = store
        self.sinks = list(sinks)
        self.clock = clock
        self.on_change = on_change  # tells the guest-facing worker to refresh
        # What is wrong with an instance's user-data (None: nothing), so a
        # failing template is seen at registration, before any guest asks.
        self.check = check
        dn = cfg.dnsmasq
        self.pool = Pool(dn.network, reserved=[dn.gateway, cfg.mdserver.listen_address])
        self.lease_len = dn.lease_len
        self._cursor = self.pool.first
        self._lock = threading.Lock()

    def sync(self) -> None:
        """Start-up: make every sink match the database."""
        instances = list(self.store)
        for sink in self.sinks:
            if sink.sync(instances):
                sink.reload()

    def _put(self, record: Instance, stale: Sequence[str] = ()) -> None:
        for sink in self.sinks:
            reload = any([sink.remove(u) for u in stale])
            if sink.put(record) or reload:
                sink.reload()

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
        dn = self.cfg.dnsmasq
        info = domainxml.parse(xml, dn.net_name, dn.interface)
        with self._lock:
            now = self.clock()
            # The same domain is found by UUID, else by MAC (a domain
            # re-created with its old MAC keeps its address).
            current = self.store.by_uuid(info.uuid) or self.store.by_mac(info.mac)
            stale = {i.uuid: i for i in (self.store.by_mac(info.mac),
                                         self.store.by_name(info.name))
                     if i is not None and i.uuid != info.uuid}
            if current is not None and self.pool.usable(current.ipv4):
                ip = current.ipv4
            else:
                ip, self._cursor = self.pool.find_free(self._cursor, self._taken(info.uuid, now))
            record = Instance(
                uuid=info.uuid, name=info.name, mac=info.mac, ipv4=ip,
                hostname=info.settings.hostname or default_hostname(info.name, info.uuid),
                first_seen=current.first_seen if current is not None else now,
                last_seen=now, arch=info.arch, settings=info.settings,
                password_blob=current.password_blob if current is not None
                and current.uuid == info.uuid else None,
                route_pending=pending)
            for old in stale.values():
                log.warning("%s (%s) replaces %s (%s), which had the same %s", info.name,
                            info.uuid, old.name, old.uuid,
                            "MAC" if old.mac == info.mac else "name")
            self.store.commit(put=[record], delete=list(stale), at=now)
            self._put(record, list(stale))
        self.on_change()
        verb = "updated" if current is not None else "registered"
        log.info("%s %s (%s) %s %s", verb, record.name, record.uuid, record.mac, record.ipv4)
        problem = self.check(record)
        if problem:
            log.error("%s (%s): user-data fails, guests will get none: %s", record.name,
                      record.uuid, problem)
        return record

    def remove(self, key: str) -> Instance:
        """Remove by name or UUID; its address stays out of use for a lease time."""
        with self._lock:
            inst = self.store.by_name(key) or self.store.by_uuid(key) or self.store.find(key)
            self.store.remove(inst.uuid, self.clock())
            for sink in self.sinks:
                sink.remove(inst.uuid)
                sink.reload()
        self.on_change()
        log.info("removed %s (%s) %s", inst.name, inst.uuid, inst.ipv4)
        return inst

    def _replace(self, inst: Instance, **changes) -> Instance:
        record = inst.updated(**changes)
        self.store.commit(put=[record], at=self.clock())
        self.on_change()
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
            "network": s.network,
            "first_seen": inst.first_seen, "last_seen": inst.last_seen,
            "template": s.template, "ssh_keys": len(s.ssh_keys),
            "meta": dict(s.meta), "password": s.password is not None,
            "guest_password": inst.password_blob is not None}
