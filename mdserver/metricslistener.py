"""The host-only metrics listener ([metrics] listen): GET /metrics over TCP, in a thread of the main process."""

import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Tuple

log = logging.getLogger(__name__)

# (body, content type) of one scrape: mdserver.metrics.Exposition.
Scrape = Callable[[], Tuple[bytes, str]]
# Linux's IP_FREEBIND / IPV6_FREEBIND (not every Python names them): bind an
# address the host does not have yet, as the guest listener does for its own.
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
IPV6_FREEBIND = 78
IO_TIMEOUT = 10.0


class _Handler(BaseHTTPRequestHandler):
    server: "MetricsServer"
    protocol_version = "HTTP/1.0"  # one scrape per connection: no idle connections to keep
    server_version = "mdserver"
    sys_version = ""

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(IO_TIMEOUT)

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _answer(self, send_body: bool) -> None:
        if self.path.split("?", 1)[0] != "/metrics":
            status, ctype, body = 404, "text/plain", b"Not Found\n"
        else:
            try:
                body, ctype = self.server.scrape()
                status = 200
            except Exception:
                log.exception("metrics: scrape failed")
                status, ctype, body = 500, "text/plain", b"internal error\n"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # a scrape is not an event
        pass


class MetricsServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: Tuple[str, int], scrape: Scrape):
        self.scrape = scrape
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler, bind_and_activate=False)
        try:
            if self.address_family == socket.AF_INET6:
                self.socket.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
            else:
                self.socket.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
            self.server_bind()
            self.server_activate()
        except BaseException:
            self.server_close()
            raise

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("metrics: a scrape from %s dropped", client_address)


def serve_metrics(address: Tuple[str, int], scrape: Scrape) -> MetricsServer:
    """Listen on `address` only (OSError if it cannot), answer in a thread."""
    server = MetricsServer(address, scrape)
    host, port = str(server.server_address[0]), int(server.server_address[1])
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    log.info("metrics on http://%s/metrics", shown)
    threading.Thread(target=server.serve_forever, daemon=True, name="metrics").start()
    return server


def close_metrics(server: MetricsServer) -> None:
    server.shutdown()
    server.server_close()
