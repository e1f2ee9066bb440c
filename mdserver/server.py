"""Runs the guest listener under granian: signals, log reopening and systemd readiness."""

import logging
import multiprocessing
import os
import signal
import socket
import threading
from functools import partial
from typing import Callable

from mdserver import logs
from mdserver.config import Config

log = logging.getLogger(__name__)

# Route granian's own loggers into ours instead of its stdout handlers.
GRANIAN_LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "loggers": {
        "_granian": {"handlers": [], "propagate": True, "level": "WARNING"},
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


def _worker_app(cfg: Config, ready_fd: int, build: Callable[[Config], Callable]):
    """Runs in the worker process: logging, the app, then a byte on `ready_fd`."""
    handler = logs.setup(cfg.mdserver.loglevel, cfg.mdserver.logfile)
    on_sighup(handler.reopen if handler is not None else (lambda: None))
    app = build(cfg)
    os.write(ready_fd, b"R")
    return app


def _relay_readiness(read_fd: int, address: str) -> None:
    """Main process: tell systemd READY=1 each time a worker has its app up
    (NotifyAccess=main accepts only the main PID)."""
    while os.read(read_fd, 1):
        log.info("listening on %s", address)
        sd_notify("READY=1")


def run(cfg: Config, build: Callable[[Config], Callable]) -> int:
    """Serve until SIGTERM/SIGINT. `build(cfg)` makes the WSGI app in the worker."""
    from granian.constants import Interfaces
    from granian.log import LogLevels
    from granian.server import Server

    md = cfg.mdserver
    server = Server(
        "mdserver", address=md.listen_address, port=md.port, interface=Interfaces.WSGI,
        workers=1, blocking_threads=md.threads, backlog=md.backlog, websockets=False,
        log_dictconfig=GRANIAN_LOGGING, log_level=LogLevels(md.loglevel), log_access=False,
        respawn_failed_workers=True,
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
    read_fd, write_fd = os.pipe()
    address = f"{md.listen_address}:{md.port}"
    threading.Thread(target=_relay_readiness, args=(read_fd, address), daemon=True,
                     name="readiness").start()

    def on_stop(*_):
        sd_notify("STOPPING=1")
        server.signal_handler_interrupt()

    def install_handlers():
        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)

    server.on_startup(install_handlers)
    server.serve(target_loader=partial(_worker_app, cfg, write_fd, build), wrap_loader=False)
    return 0
