"""mdserver-enroll: gives every libvirt domain on mdserver's network its route and registers it.

A process of its own, never the guest-facing daemon: access to
qemu:///system is root-equivalent. It talks to libvirt through libvirt-python
(its default event loop, in a thread) and to mdserver through the admin
socket only.

- On (re)connect: every domain with an interface on [dnsmasq] net_name is
  enrolled, then records of domains libvirt no longer has are pruned (with
  the guards of mdserver.pruning).
- DEFINED: the domain is enrolled. UNDEFINED: its instance is removed, unless
  the domain just migrated away or an incoming migration failed
  (STOPPED/MIGRATED or STOPPED/FAILED seen shortly before); with a shared
  registry, mdserver refuses to remove another host's instance anyway.
- RESUMED/MIGRATED (running here after a migration, or again after a failed
  outgoing one): registered, which makes the record this host's.
- Registrations refused with 503 (a shared store away): every domain is
  registered again once mdserver reports its store connected.
- Enroll: policy [libvirt] enroll (none: register only; new: apply a route
  only to a domain mdserver has never registered; all: always). The route is
  the one the domain records or already shows (never switched), else
  [libvirt] route. The domain is registered first (a domain started right
  after its definition needs its address at once), then the changed
  definition is defined again (its DEFINED event then changes nothing) and
  registered again.

Event callbacks only queue work: a libvirt call inside a callback can
deadlock the event loop. One worker thread does the libvirt calls and admin
requests, in event order.
"""

import argparse
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from typing import Any, Dict, Optional, Set, Tuple
from urllib.parse import quote

from mdserver import __version__
from mdserver import adminclient, domainxml, logs, pruning, routes
from mdserver.domains import load_libvirt
from mdserver import config as configmod
from mdserver.errors import BadDomainXML, ConfigError, DaemonUnavailable, MdserverError
from mdserver.metrics import EnrollCounts
from mdserver.notify import sd_notify

log = logging.getLogger("mdserver.enroll")

EXIT_CONFIG = 2
BACKOFF_MAX = 30.0
ADMIN_RETRY = 5.0  # seconds between looks at an admin socket that did not answer
MIGRATION_MEMORY = 120.0  # seconds an outgoing migration protects an UNDEFINED


def _url(uuid: str) -> str:
    return "/instances/" + quote(uuid, safe="")


class Enroller:
    def __init__(self, cfg: configmod.Config, libvirt: Any):
        self.cfg = cfg
        self.libvirt = libvirt
        self.stop = threading.Event()
        self.lost = threading.Event()
        self.work: "queue.Queue[Optional[Tuple[str, Any]]]" = queue.Queue()
        self.conn: Any = None
        self.migrated: Dict[str, float] = {}
        self.reported: Set[Tuple[str, str]] = set()  # (uuid, problem) logged once
        self.admin_down = False  # mdserver did not answer: sync again once it does
        self.store_down = False  # its shared store did not (503): the same
        # Its metrics, pushed to the daemon (POST /metrics/enroll) whenever
        # they changed: the enroller has no listener of its own (its unit
        # allows no network), and the daemon is what Prometheus scrapes.
        self.counts = EnrollCounts()
        self.push_metrics = True

    # -- admin socket ----------------------------------------------------------

    def _admin(self, method: str, url: str, body: Optional[bytes] = None) -> Tuple[int, Any]:
        status, data = adminclient.request(self.cfg.mdserver.admin_socket, method, url, body)
        if self.admin_down:
            self.admin_down = False
            log.info("mdserver answers again: enrolling every domain")
            self.work.put(("sync", None))
        if status == 200:
            return status, json.loads(data)
        return status, data.decode(errors="replace").strip()

    def known(self, uuid: str) -> bool:
        status, data = self._admin("GET", _url(uuid))
        if status == 200:
            return True
        if status == 404:
            return False
        raise MdserverError(f"GET {_url(uuid)}: {data or status}")

    def _once(self, uuid: str, message: str, level: int = logging.WARNING) -> None:
        if (uuid, message) not in self.reported:
            self.reported.add((uuid, message))
            log.log(level, "%s", message)

    # -- enrollment --------------------------------------------------------------

    def enroll(self, conn: Any, dom: Any) -> None:
        lv = self.libvirt
        uuid = dom.UUIDString().lower()
        name = dom.name()
        xml = dom.XMLDesc(lv.VIR_DOMAIN_XML_INACTIVE)
        dn = self.cfg.dnsmasq
        try:
            domainxml.parse(xml.encode(), dn.net_name, dn.interface)
        except BadDomainXML as e:
            if not str(e).startswith("no <interface>"):  # not ours: silently
                self._once(uuid, f"{name}: not enrolled: {e}")
            return
        policy = self.cfg.libvirt.enroll
        wanted = policy == "all" or (policy == "new" and not self.known(uuid))
        # Registered first: a domain started right after its definition (as
        # virt-install does) asks for its address within seconds, before the
        # edit below is done.
        if not self._register(dom, uuid, name, xml):
            return
        if not wanted:
            return
        if not dom.isPersistent():  # defineXML would make it persistent: not ours to decide
            self._once(uuid, f"{name}: transient domain (virsh create): registered, "
                             "its route is not applied", logging.INFO)
            return
        edited = self._apply_route(conn, dom, uuid, name, xml)
        if edited != xml:
            self._register(dom, uuid, name, edited)  # its recorded route, its seed image

    def _register(self, dom: Any, uuid: str, name: str, xml: str) -> bool:
        live = dom.XMLDesc(0) if dom.isActive() else None
        url = "/instance-upload?pending=1" if routes.pending(live, xml) else "/instance-upload"
        status, data = self._admin("POST", url, xml.encode())
        if status == 503 and not self.store_down:
            self.store_down = True
            log.warning("%s: not registered: %s; every domain is registered again once "
                        "mdserver's store answers", name, data)
        if status != 200:
            self._once(uuid, f"{name}: not registered: {data}")
            return False
        log.debug("%s: registered (%s)", name, data.get("ip", "?") if isinstance(data, dict)
                  else "?")
        return True

    def _apply_route(self, conn: Any, dom: Any, uuid: str, name: str, xml: str) -> str:
        route = (routes.recorded_route(xml) or routes.existing_route(xml)
                 or self.cfg.libvirt.route)
        try:
            plan = routes.plan(xml, route,
                               seed_path=os.path.join(self.cfg.seeds.dir, uuid + ".iso"))
        except (BadDomainXML, ValueError) as e:
            self._once(uuid, f"{name}: route {route}: left alone: {e}")
            return xml
        for problem in plan.problems:
            self._once(uuid, f"{name}: route {route}: {problem}")
        if not plan.changed:
            return xml
        conn.defineXML(plan.xml)
        self.counts.edited()
        for change in plan.changes:
            log.info("%s: route %s: %s", name, route, change,
                     extra=logs.fields(instance=name, uuid=uuid, event="route-applied"))
        return dom.XMLDesc(self.libvirt.VIR_DOMAIN_XML_INACTIVE)

    def remove(self, uuid: str) -> None:
        if time.monotonic() - self.migrated.pop(uuid, -1e9) < MIGRATION_MEMORY:
            log.info("%s: undefined after migrating away: record kept", uuid)
            return
        status, data = self._admin("DELETE", _url(uuid))
        if status == 200:
            name = data.get("name", "") if isinstance(data, dict) else ""
            log.info("%s: undefined: instance %s removed", uuid, name,
                     extra=logs.fields(instance=name or None, uuid=uuid, event="removed"))
        elif status != 404:
            log.warning("%s: undefined, but not removed: %s", uuid, data)

    def sync(self, conn: Any) -> None:
        """Enroll every domain, then prune records of domains libvirt no longer has."""
        domains = conn.listAllDomains(0)
        for dom in domains:
            self._guarded(self.enroll, conn, dom)
        uuids = {d.UUIDString().lower() for d in domains}
        status, records = self._admin("GET", "/instances")
        if status != 200:
            log.warning("cannot list instances: %s", records)
            return
        decision = pruning.decide(records, uuids, self.cfg.store.host)
        if decision.refused:
            log.warning("prune: %s", decision.refused)
        for r in decision.remove:
            status, data = self._admin("DELETE", _url(r["uuid"]))
            if status == 200:
                log.info("%s (%s): unknown to libvirt: instance removed", r.get("name"),
                         r["uuid"])
        log.info("%d domain(s) seen, %d record(s) pruned", len(domains), len(decision.remove))

    def _guarded(self, fn, *args) -> None:
        try:
            fn(*args)
        except self.libvirt.libvirtError as e:
            log.warning("libvirt: %s", e)
        except DaemonUnavailable as e:
            if not self.admin_down:
                self.admin_down = True
                log.warning("%s: every domain is enrolled again once it answers", e)
        except MdserverError as e:
            log.warning("%s", e)

    # -- worker and events -----------------------------------------------------

    def worker(self) -> None:
        while True:
            try:
                item = self.work.get(timeout=ADMIN_RETRY)
            except queue.Empty:
                if self.admin_down and self.conn is not None:
                    self._guarded(self._admin, "GET", "/instances")  # answers: sync queued
                elif self.store_down and self.conn is not None:
                    self._guarded(self._store_back)
                self._push()
                continue
            if item is None:
                self._push()
                return
            kind, arg = item
            conn = self.conn
            if kind == "sync" and conn is not None:
                self._guarded(self.sync, conn)
            elif kind == "defined" and conn is not None:
                self._guarded(self._enroll_uuid, conn, arg)
            elif kind == "migrated":
                self.migrated[arg] = time.monotonic()
            elif kind == "undefined":
                self._guarded(self.remove, arg)
            self._push()

    def _push(self) -> None:
        """The counts to the daemon, if they changed since it last took them.
        A daemon that does not answer gets them with a later push."""
        report = self.counts.unsent() if self.push_metrics else None
        if report is None:
            return
        try:
            status, data = adminclient.request(self.cfg.mdserver.admin_socket, "POST",
                                               "/metrics/enroll", json.dumps(report).encode())
        except (MdserverError, OSError):
            return
        if status == 200:
            self.counts.sent(report)
        elif status in (404, 405):  # a daemon from before metrics
            self.push_metrics = False
            log.info("mdserver takes no enroller metrics (%d): not sent", status)

    def _store_back(self) -> None:
        status, data = self._admin("GET", "/store")
        if status == 200 and isinstance(data, dict) and data.get("connected", True):
            self.store_down = False
            self.reported.clear()
            log.info("mdserver's store answers again: registering every domain")
            self.work.put(("sync", None))

    def _enroll_uuid(self, conn: Any, uuid: str) -> None:
        try:
            dom = conn.lookupByUUIDString(uuid)
        except self.libvirt.libvirtError:
            return  # gone again already: its UNDEFINED follows
        self.enroll(conn, dom)

    def _lifecycle(self, conn, dom, event, detail, opaque) -> None:
        # In the event-loop thread: queue only, no libvirt call (UUIDString is local).
        lv = self.libvirt
        uuid = dom.UUIDString().lower()
        if event == lv.VIR_DOMAIN_EVENT_DEFINED:
            self.counts.event("defined")
            self.work.put(("defined", uuid))
        elif event == lv.VIR_DOMAIN_EVENT_UNDEFINED:
            self.counts.event("undefined")
            self.work.put(("undefined", uuid))
        elif event == lv.VIR_DOMAIN_EVENT_STOPPED and detail in (
                lv.VIR_DOMAIN_EVENT_STOPPED_MIGRATED, lv.VIR_DOMAIN_EVENT_STOPPED_FAILED):
            # Gone to another host, or an incoming migration that failed: the
            # record is (again) the other host's, whose enroller keeps it.
            self.counts.event("migrated")
            self.work.put(("migrated", uuid))
        elif event == lv.VIR_DOMAIN_EVENT_RESUMED and \
                detail == lv.VIR_DOMAIN_EVENT_RESUMED_MIGRATED:
            # Running here after a migration (in, or a failed one out): its
            # record is this host's; the registration says so.
            self.counts.event("resumed")
            self.work.put(("defined", uuid))

    def _closed(self, conn, reason, opaque) -> None:
        self.lost.set()

    # -- connection ------------------------------------------------------------

    def run(self) -> int:
        lv = self.libvirt
        uri = self.cfg.libvirt.uri
        worker = threading.Thread(target=self.worker, name="enroll-worker", daemon=True)
        worker.start()
        backoff, waiting = 1.0, False
        while not self.stop.is_set():
            try:
                conn = lv.open(uri)
            except lv.libvirtError as e:
                if not waiting:
                    log.warning("waiting for libvirt at %s: %s", uri,
                                e.get_error_message() or e)
                    # Ready all the same: it is doing its job, which is to
                    # wait. Held back, `systemctl start` on a host whose
                    # libvirtd is down would hang until TimeoutStartSec and
                    # fail into a restart loop; `mdserverctl status` shows
                    # the wait as a problem, with its fix.
                    sd_notify("READY=1\nSTATUS=waiting for libvirt")
                    waiting = True
                self.stop.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            waiting, backoff = False, 1.0
            self.lost.clear()
            try:
                conn.registerCloseCallback(self._closed, None)
                conn.setKeepAlive(5, 3)
                cb = conn.domainEventRegisterAny(None, lv.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                                 self._lifecycle, None)
            except lv.libvirtError as e:
                log.warning("libvirt at %s: %s", uri, e.get_error_message() or e)
                self._close(conn)
                self.stop.wait(backoff)
                continue
            self.conn = conn
            self.counts.connected = True
            log.info("connected to libvirt at %s", uri)
            sd_notify(f"READY=1\nSTATUS=connected to {uri}")
            self.work.put(("sync", None))
            while not self.stop.is_set() and not self.lost.is_set():
                self.stop.wait(0.5)
            self.conn = None
            self.counts.connected = False
            self.work.put(("push", None))  # the worker tells the daemon now
            if self.lost.is_set():
                log.warning("lost the connection to libvirt at %s", uri)
                sd_notify("STATUS=waiting for libvirt")
            else:
                try:
                    conn.domainEventDeregisterAny(cb)
                except lv.libvirtError:
                    pass
            self._close(conn)
            self.stop.wait(1.0)
        self.work.put(None)
        worker.join(10)
        return 0

    def _close(self, conn: Any) -> None:
        try:
            conn.unregisterCloseCallback()
        except self.libvirt.libvirtError:
            pass
        try:
            conn.close()
        except self.libvirt.libvirtError:
            pass


def _event_loop(libvirt: Any) -> None:
    while True:
        libvirt.virEventRunDefaultImpl()


def parser() -> argparse.ArgumentParser:
    """The command line (also the source of its man page and completion)."""
    p = argparse.ArgumentParser(
        prog="mdserver-enroll",
        description="Give libvirt domains on mdserver's network their route and register "
                    "them (a process apart from the mdserver daemon).")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("config", nargs="?", default=configmod.DEFAULT_PATH,
                   help=f"configuration file (default {configmod.DEFAULT_PATH})")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        cfg = configmod.load(args.config)
    except ConfigError as e:
        print(f"mdserver-enroll: {e}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        libvirt = load_libvirt()
    except MdserverError as e:
        print(f"mdserver-enroll: {e}", file=sys.stderr)
        return EXIT_CONFIG
    # Its own log goes to stderr (the journal): [mdserver] logfile is the daemon's.
    logs.setup(cfg.mdserver.loglevel, None, cfg.mdserver.log_format)
    for warning in cfg.warnings:
        log.warning("%s", warning)
    libvirt.registerErrorHandler(lambda ctx, err: None, None)  # no stderr noise
    libvirt.virEventRegisterDefaultImpl()
    threading.Thread(target=_event_loop, args=(libvirt,), name="libvirt-events",
                     daemon=True).start()
    enroller = Enroller(cfg, libvirt)

    def _stop(signum, frame) -> None:
        enroller.stop.set()
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    log.info("mdserver-enroll: libvirt %s, network %s, enroll = %s, route = %s",
             cfg.libvirt.uri, cfg.dnsmasq.net_name, cfg.libvirt.enroll, cfg.libvirt.route)
    return enroller.run()


if __name__ == "__main__":
    sys.exit(main())
