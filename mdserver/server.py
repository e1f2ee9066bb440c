"""The listeners: the admin socket in the main process, guests under granian; signals, readiness."""

import errno
import logging
import multiprocessing
import os
import signal
import socket
import socketserver
import threading
import time
from functools import partial
from socketserver import ThreadingMixIn
from typing import Callable, Dict, Tuple
from wsgiref.simple_server import WSGIRequestHandler

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
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(message.encode())
    except OSError as e:  # systemd gone or a stale variable: not worth dying for
        log.warning("cannot notify %s: %s", address, e.strerror)
        return False
    return True


def on_signals(actions: Dict[int, Callable[[], None]]) -> None:
    """Run actions[signum] on each of those signals, in a thread of its own.

    The signals are blocked in the calling thread and so in every thread
    started after it (and in child processes); one thread takes them with
    sigwait(). A Python-level handler is not enough here: the kernel may
    deliver a signal to a native server thread while the main thread sits in
    a blocking wait, and the handler would then not run until something else
    wakes it.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, set(actions))

    def loop():
        while True:
            signum = signal.sigwait(set(actions))
            try:
                actions[signum]()
            except Exception:  # one failed action must not end the loop
                log.exception("handling signal %d failed", signum)

    threading.Thread(target=loop, daemon=True, name="signals").start()


def _worker_app(cfg: Config, build: Callable[[Config], Tuple[Callable, Callable[[], bool]]]):
    """Runs in the worker process: its logging, then the app. SIGUSR1 from
    the main process means "the database changed": refresh the replica."""
    handler = logs.setup(cfg.mdserver.loglevel, cfg.mdserver.logfile)
    app, refresh = build(cfg)
    on_signals({signal.SIGHUP: handler.reopen if handler is not None else (lambda: None),
                signal.SIGUSR1: refresh})
    return app


def notify_workers() -> None:
    """Main process: tell the guest-facing worker the database changed."""
    for child in multiprocessing.active_children():
        os.kill(child.pid, signal.SIGUSR1)


class _AdminHandler(WSGIRequestHandler):
    def log_message(self, fmt: str, *args) -> None:  # errors are logged by the app
        pass


class _AdminServer(ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False

    def __init__(self, path: str, app: Callable):
        self.app = app
        super().__init__(path, _AdminHandler)

    def get_app(self) -> Callable:
        return self.app

    def get_request(self):
        # wsgiref expects an (address, port) peer; a Unix socket has none.
        sock, _ = self.socket.accept()
        return sock, ("unix", 0)

    def server_bind(self) -> None:
        # Mode 0660 from the start (no window with a wider mode): the daemon's
        # own user and group only (the hook runs as root).
        old = os.umask(0o117)
        try:
            socketserver.UnixStreamServer.server_bind(self)
        finally:
            os.umask(old)
        self.server_name, self.server_port = "localhost", 0
        self.setup_environ()

    def setup_environ(self) -> None:
        self.base_environ = {"SERVER_NAME": "localhost", "SERVER_PORT": "0",
                             "GATEWAY_INTERFACE": "CGI/1.1", "SCRIPT_NAME": "",
                             "REMOTE_HOST": ""}


def serve_admin(app: Callable, path: str) -> _AdminServer:
    """The admin app on a Unix socket, in a thread; a stale socket file is replaced."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    server = _AdminServer(path, app)
    threading.Thread(target=server.serve_forever, daemon=True, name="admin").start()
    return server


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
        sd_notify(f"READY=1\nSTATUS=serving on {host}:{port}")
        return
    log.error("not listening on %s:%d after %.0f s", host, port, timeout)


def run(cfg: Config, admin: Callable,
        build: Callable[[Config], Tuple[Callable, Callable[[], bool]]]) -> int:
    """Serve until SIGTERM/SIGINT: `admin` on the admin socket here, in the
    main process; the guest listener in a granian worker, whose app and
    replica-refresh function `build(cfg)` makes there."""
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
        # logrotate: reopen here and in the worker (which logs for the app);
        # never granian's default of respawning the worker.
        if file_handler is not None:
            file_handler.reopen()
        for child in multiprocessing.active_children():
            os.kill(child.pid, signal.SIGHUP)

    # First, so that every later thread, and the worker process, has both
    # blocked: the worker takes SIGUSR1 itself, and must not die of one that
    # arrives before it is ready for it.
    on_signals({signal.SIGHUP: reopen_everywhere, signal.SIGUSR1: lambda: None})
    admin_server = serve_admin(admin, md.admin_socket)
    try:
        if not _wait_for_address(md.listen_address):
            return 0
        return _serve(server, cfg, build)
    finally:
        admin_server.shutdown()
        admin_server.server_close()
        try:
            os.unlink(md.admin_socket)
        except FileNotFoundError:
            pass


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


def _serve(server, cfg: Config, build) -> int:
    md = cfg.mdserver

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
