"""Host-side use cases: register a domain, remove, list; keeps dnsmasq's files in step."""

import logging
import threading
import time
from typing import Callable, List

from mdserver import domainxml
from mdserver.config import Config
from mdserver.dnsmasq import DnsmasqFiles
from mdserver.ipam import Pool
from mdserver.models import Instance, default_hostname
from mdserver.store import Store

log = logging.getLogger(__name__)


class Registry:
    """The only writer of the instance database (it runs in the main process)."""

    def __init__(self, cfg: Config, store: Store, files: DnsmasqFiles,
                 clock: Callable[[], float] = time.time,
                 on_change: Callable[[], None] = lambda: None):
        self.cfg = cfg
        self.store = store
        self.files = files
        self.clock = clock
        self.on_change = on_change  # tells the guest-facing worker to refresh
        dn = cfg.dnsmasq
        self.pool = Pool(dn.network, reserved=[dn.gateway, cfg.mdserver.listen_address])
        self.lease_len = dn.lease_len
        self._cursor = self.pool.first
        self._lock = threading.Lock()

    def sync_dnsmasq(self) -> None:
        """Start-up: make dnsmasq's files match the database."""
        if self.files.sync(self.store):
            self.files.reload()

    def _taken(self, uuid: str, now: float) -> Callable[[str], bool]:
        def taken(ip: str) -> bool:
            if self.store.by_ip(ip) is not None:
                return True
            freed = self.store.freed(ip)
            # Quarantine: a lease handed out for this address may still be live.
            return freed is not None and freed[1] != uuid and now - freed[0] < self.lease_len
        return taken

    def register(self, xml: bytes) -> Instance:
        """Parse, allocate (or keep) an address, store, update dnsmasq. All or nothing."""
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
                last_seen=now, arch=info.arch, settings=info.settings)
            for old in stale.values():
                log.warning("%s (%s) replaces %s (%s), which had the same %s", info.name,
                            info.uuid, old.name, old.uuid,
                            "MAC" if old.mac == info.mac else "name")
            self.store.commit(put=[record], delete=list(stale), at=now)
            reload = any(self.files.remove(u) for u in stale)
            reload |= self.files.put(record)
        if reload:
            self.files.reload()
        self.on_change()
        verb = "updated" if current is not None else "registered"
        log.info("%s %s (%s) %s %s", verb, record.name, record.uuid, record.mac, record.ipv4)
        return record

    def remove(self, key: str) -> Instance:
        """Remove by name or UUID; its address stays out of use for a lease time."""
        with self._lock:
            inst = self.store.by_name(key) or self.store.by_uuid(key) or self.store.find(key)
            self.store.remove(inst.uuid, self.clock())
            self.files.remove(inst.uuid)
        self.files.reload()
        self.on_change()
        log.info("removed %s (%s) %s", inst.name, inst.uuid, inst.ipv4)
        return inst

    def find(self, key: str) -> Instance:
        return self.store.find(key)

    def list(self) -> List[Instance]:
        return sorted(self.store, key=lambda i: (i.name, i.uuid))


def record_json(inst: Instance) -> dict:
    """What the admin API returns for an instance (no secrets)."""
    return {"name": inst.name, "uuid": inst.uuid, "mac": inst.mac, "ip": inst.ipv4,
            "hostname": inst.hostname, "instance_id": inst.instance_id,
            "first_seen": inst.first_seen, "last_seen": inst.last_seen,
            "template": inst.settings.template, "ssh_keys": len(inst.settings.ssh_keys),
            "password": inst.settings.password is not None}
