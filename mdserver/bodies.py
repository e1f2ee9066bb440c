"""Request bodies for both listeners: read within a deadline, finished (up to a bound) before the answer goes out."""

import ipaddress
import logging
import os
import socket
import stat
import threading
import time
from functools import partial
from typing import Any, Callable, Iterator, List, Optional, Tuple

from mdserver.domainxml import MAX_XML_BYTES

log = logging.getLogger(__name__)

# -- request bodies: read to the end (up to a bound) before the answer --------

# How much of a request body either listener reads and drops when the app did
# not read it all (a body over its route's limit, a route that takes none).
# Closing a connection with unread data makes the kernel reset it (TCP RST;
# ECONNRESET on a Unix socket), which destroys the answer in flight: reading
# the rest first lets the client read its 413. 4x the largest body any route
# accepts (a domain XML): room for a bloated dumpxml or a wrong but small file,
# a few milliseconds of one thread on a host bridge. Past it the sender is no
# mistaken client of ours, and reading on would let anyone keep us reading:
# the connection is closed (reset) instead.
DRAIN_MAX = 4 * MAX_XML_BYTES
DRAIN_CHUNK = 256 * 1024


def _content_length(environ: dict) -> Optional[int]:
    """The body's declared length; 0 without one (HTTP/1.1: no body), None
    when it is chunked or unreadable (then it ends where the stream does)."""
    value = environ.get("CONTENT_LENGTH")
    if not value:
        return None if environ.get("HTTP_TRANSFER_ENCODING") else 0
    try:
        return max(0, int(value))
    except ValueError:
        return None


class _Body:
    """wsgi.input that counts what was read and fails (TimeoutError) once
    `timeout` seconds have passed since the request came.

    With `cut` (granian): its input blocks until the client sends or leaves,
    and a read in flight cannot be abandoned (granian takes the body back
    after the app returns, holding the GIL: a read still running in another
    thread would stop the whole worker). So at the deadline expire() calls
    `cut`, which ends the connection's read side; the read returns short.
    Without it (the admin server) the socket times out each operation and
    reads go in pieces, the deadline checked between them."""

    def __init__(self, raw: Any, length: Optional[int], timeout: float,
                 cut: Optional[Callable[[], object]] = None):
        self.raw, self.length, self.timeout, self.cut = raw, length, timeout, cut
        self.deadline = time.monotonic() + timeout
        self.count = 0
        self.ended = False
        self._lock = threading.Lock()
        self._reading = False
        self._expired = False

    def complete(self) -> bool:
        return self.ended or (self.length is not None and self.count >= self.length)

    def read(self, size: Optional[int] = -1) -> bytes:
        want = self._wanted(size)
        if want == 0:
            return b""
        data = self._guarded(lambda: self.raw.read(want), want) if self.cut is not None \
            else self._pieces(want)
        self.count += len(data)
        self.ended = len(data) < want  # short only at the end of the body
        return data

    def readline(self, size: Optional[int] = -1) -> bytes:
        want = self._wanted(size)
        if want == 0:
            return b""
        line = self._guarded(lambda: self.raw.readline(want), 0) if self.cut is not None \
            else self._within(lambda: self.raw.readline(want))
        self.count += len(line)
        self.ended = not line
        return line

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.readline, b"")

    def expire(self) -> None:
        """The deadline (a timer thread): cut a read in flight; later reads fail."""
        with self._lock:
            self._expired = True
            reading = self._reading
        if reading and self.cut is not None:
            self.cut()

    def _wanted(self, size: Optional[int]) -> int:
        # Never past Content-Length: the admin server's socket would wait
        # there for bytes nobody sends.
        left = self.length - self.count if self.length is not None else None
        if size is None or size < 0:
            return left if left is not None else DRAIN_MAX + 1
        return size if left is None else min(size, left)

    def _late(self) -> TimeoutError:
        return TimeoutError(f"not received within {self.timeout:g} s")

    def _within(self, read: Callable[[], bytes]) -> bytes:
        if self._expired or time.monotonic() >= self.deadline:
            self._expired = True
            raise self._late()
        return read()

    def _pieces(self, want: int) -> bytes:
        read = getattr(self.raw, "read1", self.raw.read)  # read1: what one recv brings
        parts: List[bytes] = []
        got = 0
        while got < want:
            part = self._within(lambda: read(want - got))
            if not part:
                break
            parts.append(part)
            got += len(part)
        return b"".join(parts)

    def _guarded(self, read: Callable[[], bytes], want: int) -> bytes:
        with self._lock:
            if self._expired:
                raise self._late()
            self._reading = True
        try:
            data = read()
        finally:
            with self._lock:
                self._reading = False
        if self._expired and (len(data) < want or not data):
            raise self._late()  # what the cut left of the read
        return data


def _same_ip(a: str, b: str) -> bool:
    def norm(text: str) -> object:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
        mapped = getattr(ip, "ipv4_mapped", None)
        return mapped or ip
    try:
        return norm(a) == norm(b)
    except ValueError:
        return False


def cut_connections(peer: str, local_ip: str, local_port: int) -> int:
    """Shut the read side of this process's TCP connections from `peer` to
    (local_ip, local_port); how many. A read blocked on one of them ends
    (end of file); what the server writes still goes out.

    granian's environ names the peer's address but not its port, so every
    connection of that peer to the listener is cut: a peer whose body is
    late loses its other connections here too (idle ones, which clients
    reopen, or, rarely, one being answered at that moment)."""
    cut = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            fd = int(name)
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            with socket.socket(fileno=os.dup(fd)) as s:
                if s.family not in (socket.AF_INET, socket.AF_INET6) \
                        or s.type != socket.SOCK_STREAM:
                    continue
                here, there = s.getsockname(), s.getpeername()  # ENOTCONN: a listener
                if here[1] == local_port and _same_ip(here[0], local_ip) \
                        and _same_ip(there[0], peer):
                    s.shutdown(socket.SHUT_RD)
                    cut += 1
        except (OSError, ValueError):  # gone meanwhile, not connected, not a number
            continue
    return cut


def _cut_request(environ: dict) -> None:
    count = cut_connections(environ.get("REMOTE_ADDR", ""), environ.get("SERVER_NAME", ""),
                            int(environ.get("SERVER_PORT") or 0))
    log.debug("%s %s from %s: body late, %d connection(s) cut", environ.get("REQUEST_METHOD"),
              environ.get("PATH_INFO"), environ.get("REMOTE_ADDR"), count)


def _drain(body: _Body, environ: dict) -> None:
    """Read and drop what the app left of the body, up to DRAIN_MAX, so the
    close that follows is clean; past the bound or the deadline, give up."""
    if body.count == 0 and environ.get("HTTP_EXPECT", "").lower() == "100-continue":
        return  # the client waits for a go-ahead and sends nothing after a final answer
    if body.length is not None and body.length > DRAIN_MAX:
        return
    try:
        while not body.complete() and body.count <= DRAIN_MAX:
            body.read(DRAIN_CHUNK)
    except OSError as e:
        # The request's one log line (if it was a bad one) is the app's.
        log.debug("%s %s: rest of the body dropped: %s", environ.get("REQUEST_METHOD"),
                  environ.get("PATH_INFO"), e)


def _no_write(data: bytes) -> None:
    raise NotImplementedError("write() is not supported: return the body instead")


def finished_bodies(app: Callable, timeout: float, cut: bool, close_header: bool) -> Callable:
    """WSGI middleware: a request body arrives within `timeout` seconds or
    its read fails (TimeoutError, which read_body turns into a 400); what the
    app left of it is read before the answer goes out (see DRAIN_MAX).

    `cut`: the server's input has no timeout of its own (granian): at the
    deadline the connection is cut (cut_connections). `close_header`: say
    Connection: close; a server that closes after each request anyway (the
    admin one, wsgiref) must not be given that hop-by-hop header."""

    def guarded(environ: dict, start_response: Callable) -> Any:
        length = _content_length(environ)
        if length == 0:
            return app(environ, start_response)  # no body: nothing to guard
        body = _Body(environ["wsgi.input"], length, timeout,
                     partial(_cut_request, environ) if cut else None)
        environ["wsgi.input"] = body
        if not cut:
            return _answer(app, environ, start_response, body, close_header)
        watchdog = threading.Timer(timeout, body.expire)
        watchdog.daemon = True
        watchdog.start()
        try:
            return _answer(app, environ, start_response, body, close_header)
        finally:
            watchdog.cancel()

    return guarded


def _answer(app: Callable, environ: dict, start_response: Callable, body: _Body,
            close_header: bool) -> Any:
    """The app's answer, held back until the body is finished."""
    started: List[Any] = []

    def hold(status: str, headers: List[Tuple[str, str]], exc_info: Any = None) -> Callable:
        started[:] = [status, list(headers), exc_info]
        return _no_write

    result = app(environ, hold)
    if not started:  # Bottle always starts its answer before returning it
        raise RuntimeError("the application returned without start_response")
    status, headers, exc_info = started
    if not body.complete():
        _drain(body, environ)
        # Kept open only when the rest was read and the answer is a success
        # (a token PUT with a stray body); a refused body ends the connection.
        if close_header and (not body.complete() or not status.startswith(("1", "2", "3"))):
            headers.append(("Connection", "close"))
    start_response(status, headers, exc_info)
    return result
