"""The admin API's listener: a threaded WSGI server on a Unix socket (mode 0660) in the main process."""

import os
import socket
import socketserver
import threading
from socketserver import ThreadingMixIn
from typing import Any, Callable, Tuple
from wsgiref.simple_server import WSGIRequestHandler


class _AdminHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # errors are logged by the app
        pass


class AdminServer(ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False
    # A host rebooting starts its VMs at once, each hook connecting here: a
    # full backlog fails a Unix connect at once (EAGAIN), not after a wait.
    request_queue_size = 512

    def __init__(self, path: str, app: Callable):
        self.app = app
        super().__init__(path, _AdminHandler)

    def get_app(self) -> Callable:
        return self.app

    def get_request(self) -> Tuple[socket.socket, Tuple[str, int]]:
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


def serve_admin(app: Callable, path: str) -> AdminServer:
    """The admin app on a Unix socket, in a thread; a stale socket file is replaced."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    server = AdminServer(path, app)
    threading.Thread(target=server.serve_forever, daemon=True, name="admin").start()
    return server


def close_admin(server: AdminServer, path: str) -> None:
    """Stop serving and remove the socket file."""
    server.shutdown()
    server.server_close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
