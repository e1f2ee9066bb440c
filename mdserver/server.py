"""Runs the guest listener under granian: signals, log reopening and systemd readiness."""

import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from functools import partial
from typing import Callable

from mdserver import logs
from mdserver.config import Config

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


def sd_notify(message: str, environ=os.environ) -> bool:
    """Send `message` to systemd's notify socket, if there is one (Type=notify)."""
    address = environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.connect(address)
        s.sendall(message.encode())
    return True


def on_sighup(action: Callable[[], None]) -> None:
    """Run `action` on every SIGHUP, in a thread of its own.

    SIGHUP is blocked in the calling thread and so in every thread started
    after it; one thread takes it with sigwait(). A Python-level handler is
    not enough here: the kernel may deliver the signal to a native server
    thread while the main thread sits in a blocking wait, and the handler
    would then not run until something else wakes it.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})

    def loop():
        while True:
            signal.sigwait({signal.SIGHUP})
            try:
                action()
            except Exception:  # a failed reopen must not end the loop
                log.exception("SIGHUP handling failed")

    threading.Thread(target=loop, daemon=True, name="sighup").start()


def _worker_app(cfg: Config, build: Callable[[Config], Callable]):
    """Runs in the worker process: its logging, then the app."""
    handler = logs.setup(cfg.mdserver.loglevel, cfg.mdserver.logfile)
    on_sighup(handler.reopen if handler is not None else (lambda: None))
    return build(cfg)


def _notify_when_listening(host: str, port: int, timeout: float = 60.0) -> None:
    """READY=1 once a connection succeeds: the worker opens its listener only
    after its app is built, so this means "serving". Sent from the main
    process, which is what NotifyAccess=main accepts."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=1).close()
        except OSError:
            time.sleep(0.02)
            continue
        log.info("listening on %s:%d", host, port)
        sd_notify("READY=1")
        return
    log.error("not listening on %s:%d after %.0f s", host, port, timeout)


def run(cfg: Config, build: Callable[[Config], Callable]) -> int:
    """Serve until SIGTERM/SIGINT. `build(cfg)` makes the WSGI app in the worker."""
    from granian.constants import HTTPModes, Interfaces
    from granian.http import HTTP1Settings
    from granian.log import LogLevels
    from granian.server import Server

    md = cfg.mdserver
    server = Server(
        "mdserver", address=md.listen_address, port=md.port, interface=Interfaces.WSGI,
        http=HTTPModes.http1, workers=1, blocking_threads=md.threads,
        backpressure=md.max_connections, backlog=md.backlog,
        http1_settings=HTTP1Settings(header_read_timeout=md.header_timeout * 1000),
        websockets=False, log_dictconfig=GRANIAN_LOGGING, log_level=LogLevels(md.loglevel),
        log_access=False, respawn_failed_workers=True, workers_kill_timeout=10,
    )
    # granian's constructor reconfigures logging; put ours back.
    file_handler = logs.setup(md.loglevel, md.logfile)

    def reopen_everywhere():
        # logrotate: reopen here and in the worker (which owns the app's
        # logging); never granian's default of respawning the worker.
        if file_handler is not None:
            file_handler.reopen()
        for child in multiprocessing.active_children():
            os.kill(child.pid, signal.SIGHUP)

    on_sighup(reopen_everywhere)  # first, so every later thread blocks SIGHUP

    def on_stop(*_):
        sd_notify("STOPPING=1")
        server.signal_handler_interrupt()

    def on_startup():
        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        threading.Thread(target=_notify_when_listening, args=(md.listen_address, md.port),
                         daemon=True, name="readiness").start()

    server.on_startup(on_startup)
    server.serve(target_loader=partial(_worker_app, cfg, build), wrap_loader=False)
    return 0
