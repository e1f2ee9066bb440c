"""The admin API's listener: a threaded WSGI server on a Unix socket (mode 0660) in the main
process, and the claim that makes its daemon the socket's only owner."""

import errno
import fcntl
import logging
import os
import socket
import socketserver
import struct
import sys
import threading
from socketserver import ThreadingMixIn
from typing import Any, Callable, Optional, Tuple
from wsgiref.simple_server import WSGIRequestHandler

from mdserver.errors import AdminSocketTaken
from mdserver.fsutil import make_dir

log = logging.getLogger(__name__)


class AdminClaim:
    """This daemon's right to its admin socket: an flock on `<socket>.lock`,
    held (and the socket file ours to replace) until release()."""

    def __init__(self, path: str, fd: int):
        self.path = path
        self._fd: Optional[int] = fd

    def release(self) -> None:
        # The lock file stays: removing it would let a newcomer lock a new
        # inode while another process still holds the old one.
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def claim_admin(path: str) -> AdminClaim:
    """The admin socket at `path` for this process, or AdminSocketTaken.

    Changes nothing but the lock file: the socket file itself is replaced
    only later, by serve_admin. The lock comes first so that of two daemons
    starting at once exactly one gets past the probe; the probe catches an
    owner that holds no lock (an mdserver from before the lock, another
    program)."""
    make_dir(os.path.dirname(path))
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _taken(path, _listener(path), _pid_in(fd)) from None
        answering = _listener(path)
        if answering is not None:
            raise _taken(path, answering, None)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # for the message a newcomer prints
    except BaseException:
        os.close(fd)
        raise
    return AdminClaim(path, fd)


def _taken(path: str, answering: Optional[int], holder: Optional[int]) -> AdminSocketTaken:
    """The one line a refused daemon logs; `answering` is the listener's pid
    (0: unknown), None when nothing answers yet (the holder is starting)."""
    if answering is not None:
        pid = answering or holder
        who = f" (pid {pid})" if pid else ""
        return AdminSocketTaken(f"{path}: another mdserver answers on this admin socket{who}: "
                                "not started")
    who = f" (pid {holder})" if holder else ""
    return AdminSocketTaken(f"{path}: another mdserver{who} is starting on this admin socket: "
                            "not started")


def _listener(path: str) -> Optional[int]:
    """The pid of whatever accepts connections on `path` (0 if unknown), or
    None if nothing does (no file, or a file nobody listens on: stale)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2.0)
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        except BlockingIOError:  # EAGAIN: a listener whose backlog is full is alive
            return 0
        except OSError as e:
            if e.errno == errno.EAGAIN:
                return 0
            raise
        return _peer_pid(s)


def _peer_pid(s: socket.socket) -> int:
    """The pid that called listen() on the peer (Linux SO_PEERCRED; 0 if unavailable)."""
    try:
        creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return 0
    return struct.unpack("3i", creds)[0]


def _pid_in(fd: int) -> Optional[int]:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or "x")
    except (OSError, ValueError, UnicodeDecodeError):
        return None


class _AdminHandler(WSGIRequestHandler):
    server: "AdminServer"

    def setup(self) -> None:
        super().setup()
        # A client that stops mid-request (headers or body) costs a thread
        # until the socket times out, not for ever.
        self.connection.settimeout(self.server.io_timeout)

    def log_message(self, format: str, *args: Any) -> None:  # errors are logged by the app
        pass


class AdminServer(ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False
    # A host rebooting starts its VMs at once, each hook connecting here: a
    # full backlog fails a Unix connect at once (EAGAIN), not after a wait.
    request_queue_size = 512

    def __init__(self, path: str, app: Callable, io_timeout: float = 10.0):
        self.app = app
        self.path = path
        self.io_timeout = io_timeout
        super().__init__(path, _AdminHandler)

    def get_app(self) -> Callable:
        return self.app

    def get_request(self) -> Tuple[socket.socket, Tuple[str, int]]:
        # wsgiref expects an (address, port) peer; a Unix socket has none.
        sock, _ = self.socket.accept()
        return sock, ("unix", 0)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver's default prints a traceback to stderr; a client that
        # timed out or went away is one line, anything else a logged bug.
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            log.info("admin socket: request dropped: %s", error)
        else:
            log.exception("admin socket: request failed")

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


def serve_admin(app: Callable, claim: AdminClaim, io_timeout: float = 10.0) -> AdminServer:
    """The admin app on the claimed socket, in a thread. A socket file left
    there is stale (claim_admin found nobody answering) and is replaced."""
    try:
        os.unlink(claim.path)
    except FileNotFoundError:
        pass
    server = AdminServer(claim.path, app, io_timeout)
    threading.Thread(target=server.serve_forever, daemon=True, name="admin").start()
    return server


def close_admin(server: AdminServer) -> None:
    """Stop serving and remove the socket file (the claim is released by its owner)."""
    server.shutdown()
    server.server_close()
    try:
        os.unlink(server.path)
    except FileNotFoundError:
        pass
