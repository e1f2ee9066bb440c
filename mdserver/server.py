"""The guest listener: granian wiring, its port, waiting for the address, readiness, the worker's start."""

import errno
import gc
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from functools import partial
from typing import TYPE_CHECKING, Callable, Optional

from mdserver import logs
from mdserver.adminclient import port_file
from mdserver.adminserver import AdminClaim, claim_admin, close_admin, serve_admin
from mdserver.bodies import finished_bodies
from mdserver.config import Config, MdserverSection
from mdserver.fairness import FairQueue
from mdserver.fsutil import atomic_write
from mdserver.metricslistener import MetricsServer, Scrape, close_metrics, serve_metrics
from mdserver.notify import sd_notify
from mdserver.rsgi import GuestListener
from mdserver.signals import on_signals

if TYPE_CHECKING:
    from mdserver.wiring import GuestApp

log = logging.getLogger(__name__)

# Route granian's own loggers into ours instead of its stdout handlers (its
# level follows ours; its access log stays off: see access_log).
GRANIAN_LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "loggers": {
        "_granian": {"handlers": [], "propagate": True},
        "granian.access": {"handlers": [], "propagate": False, "level": "CRITICAL"},
    },
}

# What each worker process builds: the guest app, its replica's catch-up
# and its fast path (wiring.build_guest_app).
Build = Callable[[Config], "GuestApp"]
# Told (host, port) once guests are served there.
OnListening = Callable[[str, int], None]


def _worker_app(cfg: Config, build: Build) -> GuestListener:
    """Runs in each worker process: its logging, then the app. The replica
    catches up with the store before every answer (no signal needed: a
    write is visible to every worker once it is acknowledged)."""
    handler = logs.setup(cfg.mdserver.loglevel, cfg.mdserver.logfile, cfg.mdserver.log_format)
    guest = build(cfg)
    on_signals({signal.SIGHUP: handler.reopen if handler is not None else (lambda: None)})
    # granian bounds the wait for headers (header_timeout) but not for a
    # body: the listener gives the body the same time.
    md = cfg.mdserver
    return GuestListener(guest.app, FairQueue(md.guest_queue), md.header_timeout, md.threads,
                         fast=guest.fast, catch_up=guest.catch_up, tick=guest.tick,
                         metrics=guest.metrics)


def default_workers(cpus: Optional[int] = None) -> int:
    """`workers = 0`: half the CPUs this process may use, 1 to 4. Measured on
    2 cores that also run the load (docs/BENCHMARKS.md): one worker served
    a guest's keep-alive load 1.3x and a 500-guest boot storm 1.9x faster
    than two; a second worker nearly doubles what a flood gets, and takes
    the CPU another guest's crawl needs. On a hypervisor the guests need
    the cores more than the metadata service does."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0))
    return max(1, min(4, cpus // 2))


def address_is_local(host: str) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, 0))
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:
                return False
            raise
    return True


def reserve_port(host: str) -> socket.socket:
    """A free port on `host`, held for the daemon's lifetime (for `port = 0`).

    granian binds in its worker, per worker, with SO_REUSEPORT, and cannot
    be handed a socket or asked which port it got. So the main process binds
    port 0 itself with SO_REUSEPORT and keeps that socket bound but not
    listening: the worker joins the same port, the kernel hands connections
    only to listening sockets, and any other program binding the port gets
    EADDRINUSE (a reuseport group admits only the same user). No window in
    which the port is free, as there would be with "find a free port, close
    it, pass the number on".
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host, 0))
    except OSError:
        s.close()
        raise
    return s


class _LogFile:
    """Our log file handler of the moment, for SIGHUP (logrotate): granian's
    constructor reconfigures logging, after which ours is set up again."""

    def __init__(self, md: MdserverSection):
        self.md = md
        self.handler: Optional[logs.ReopenableFileHandler] = None
        self.setup()

    def setup(self) -> None:
        self.handler = logs.setup(self.md.loglevel, self.md.logfile, self.md.log_format)

    def reopen(self) -> None:
        if self.handler is not None:
            self.handler.reopen()


def _announce(host: str, port: int, report: str, on_listening: Optional[OnListening],
              timeout: float = 60.0) -> None:
    """Once a connection succeeds (the worker opens its listener only after
    its app is built, so this means "serving"): the log line, `on_listening`,
    the port file, READY=1 with the address (from the main process, which is
    what NotifyAccess=main accepts). Whoever sees the last two sees the rest."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=1).close()
        except OSError:
            time.sleep(0.02)
            continue
        log.info("listening on %s:%d", host, port)
        if on_listening is not None:
            on_listening(host, port)
        try:
            atomic_write(report, f"{port}\n".encode())
        except OSError as e:  # a report nobody may read is no reason to stop serving
            log.warning("cannot write %s: %s", report, e.strerror)
        sd_notify(f"READY=1\nSTATUS=serving on {host}:{port}")
        return
    log.error("not listening on %s:%d after %.0f s", host, port, timeout)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def run(cfg: Config, admin: Callable, build: Build,
        on_listening: Optional[OnListening] = None, claim: Optional[AdminClaim] = None,
        scrape: Optional[Scrape] = None) -> int:
    """Serve until SIGTERM/SIGINT: `admin` on the admin socket here, in the
    main process; the guest listener in a granian worker, whose app and
    replica-refresh function `build(cfg)` makes there. `on_listening(host,
    port)` is called once guests are served (port 0 resolved). `claim`: the
    admin socket, claimed by the caller before it changed anything (else
    claimed here, AdminSocketTaken if another mdserver has it). `scrape`:
    the metrics, served on [metrics] listen if set (OSError if it cannot
    listen there)."""
    md = cfg.mdserver
    own = claim is None
    claim = claim_admin(md.admin_socket) if claim is None else claim
    try:
        return _run(cfg, admin, build, on_listening, claim, scrape)
    finally:
        if own:
            claim.release()


def _run(cfg: Config, admin: Callable, build: Build, on_listening: Optional[OnListening],
         claim: AdminClaim, scrape: Optional[Scrape]) -> int:
    md = cfg.mdserver
    log_file = _LogFile(md)

    def reopen_everywhere() -> None:
        # logrotate: reopen here and in the worker (which logs for the app);
        # never granian's default of respawning the worker.
        log_file.reopen()
        for child in multiprocessing.active_children():
            if child.pid is not None:
                os.kill(child.pid, signal.SIGHUP)

    # First, so that every later thread, and the worker processes, have it
    # blocked: a worker takes SIGHUP itself, and must not die of one that
    # arrives before it is ready for it.
    on_signals({signal.SIGHUP: reopen_everywhere})
    report = port_file(md.admin_socket)
    _remove(report)  # a stale one would name a port nobody serves
    # The admin server closes after each request: no Connection header (wsgiref refuses it).
    admin_app = finished_bodies(admin, md.header_timeout)
    admin_server = serve_admin(admin_app, claim, io_timeout=md.header_timeout)
    metrics_server: Optional[MetricsServer] = None
    try:
        if cfg.metrics.listen is not None and scrape is not None:
            metrics_server = serve_metrics(cfg.metrics.listen, scrape)
        if not _wait_for_address(md.listen_address):
            return 0
        if md.port != 0:
            return _serve(cfg, md.port, build, log_file, report, on_listening)
        with reserve_port(md.listen_address) as held:
            return _serve(cfg, held.getsockname()[1], build, log_file, report, on_listening)
    finally:
        if metrics_server is not None:
            close_metrics(metrics_server)
        close_admin(admin_server)
        _remove(report)


def _wait_for_address(host: str) -> bool:
    """At boot the bridge carrying the metadata address may not exist yet:
    registration (admin socket) already works; the guest listener waits for
    the address. False if told to stop meanwhile."""
    if address_is_local(host):
        return True
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    log.warning("%s is not on this host yet (is the libvirt network up?); "
                "registration works, guests are served once it appears", host)
    sd_notify(f"READY=1\nSTATUS=waiting for {host}")
    try:
        while not stop.wait(0.5):
            if address_is_local(host):
                log.info("%s appeared", host)
                return True
        sd_notify("STOPPING=1")
        return False
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _serve(cfg: Config, port: int, build: Build, log_file: _LogFile, report: str,
           on_listening: Optional[OnListening]) -> int:
    from granian.constants import HTTPModes, Interfaces
    from granian.http import HTTP1Settings
    from granian.log import LogLevels
    from granian.server import Server

    md = cfg.mdserver
    server = Server(
        "mdserver", address=md.listen_address, port=port, interface=Interfaces.RSGI,
        http=HTTPModes.http1, workers=md.workers or default_workers(), blocking_threads=1,
        backpressure=md.max_connections, backlog=md.backlog,
        http1_settings=HTTP1Settings(header_read_timeout=md.header_timeout * 1000),
        websockets=False, log_dictconfig=GRANIAN_LOGGING, log_level=LogLevels(md.loglevel),
        log_access=False, respawn_failed_workers=True, workers_kill_timeout=10,
    )
    log_file.setup()  # granian's constructor reconfigured logging: ours again

    def on_stop(*_: object) -> None:
        sd_notify("STOPPING=1")
        server.signal_handler_interrupt()

    def on_startup() -> None:
        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        threading.Thread(target=_announce, args=(md.listen_address, port, report, on_listening),
                         daemon=True, name="readiness").start()

    server.on_startup(on_startup)
    # The workers are forked from here and share what this process holds
    # (the store's replica above all: wiring.guest_builder) until one of
    # them writes to it. Frozen, it is outside every collection, so no
    # worker's garbage collector writes to those pages by walking them.
    gc.collect()
    gc.freeze()
    server.serve(target_loader=partial(_worker_app, cfg, build), wrap_loader=False)
    return 0
