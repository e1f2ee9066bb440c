"""Request bodies on the admin socket: read within a deadline, finished (up to a bound) before the answer goes out."""

import logging
import time
from typing import Any, Callable, Iterator, List, Optional, Tuple

from mdserver.domainxml import MAX_XML_BYTES

log = logging.getLogger(__name__)

# -- request bodies: read to the end (up to a bound) before the answer --------

# How much of a request body a listener reads and drops when the app did
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
    `timeout` seconds have passed since the request came. The server's
    socket times out each operation, so reads go in pieces and the deadline
    is checked between them."""

    def __init__(self, raw: Any, length: Optional[int], timeout: float):
        self.raw, self.length, self.timeout = raw, length, timeout
        self.deadline = time.monotonic() + timeout
        self.count = 0
        self.ended = False

    def complete(self) -> bool:
        return self.ended or (self.length is not None and self.count >= self.length)

    def read(self, size: Optional[int] = -1) -> bytes:
        want = self._wanted(size)
        if want == 0:
            return b""
        data = self._pieces(want)
        self.count += len(data)
        self.ended = len(data) < want  # short only at the end of the body
        return data

    def readline(self, size: Optional[int] = -1) -> bytes:
        want = self._wanted(size)
        if want == 0:
            return b""
        line = self._within(lambda: self.raw.readline(want))
        self.count += len(line)
        self.ended = not line
        return line

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.readline, b"")

    def _wanted(self, size: Optional[int]) -> int:
        # Never past Content-Length: the socket would wait there for bytes
        # nobody sends.
        left = self.length - self.count if self.length is not None else None
        if size is None or size < 0:
            return left if left is not None else DRAIN_MAX + 1
        return size if left is None else min(size, left)

    def _within(self, read: Callable[[], bytes]) -> bytes:
        if time.monotonic() >= self.deadline:
            raise TimeoutError(f"not received within {self.timeout:g} s")
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


def finished_bodies(app: Callable, timeout: float) -> Callable:
    """WSGI middleware for the admin server (wsgiref): a request body
    arrives within `timeout` seconds or its read fails (TimeoutError, which
    read_body turns into a 400); what the app left of it is read before the
    answer goes out (see DRAIN_MAX). The guest listener reads bodies itself
    (mdserver.rsgi)."""

    def guarded(environ: dict, start_response: Callable) -> Any:
        length = _content_length(environ)
        if length == 0:
            return app(environ, start_response)  # no body: nothing to guard
        body = _Body(environ["wsgi.input"], length, timeout)
        environ["wsgi.input"] = body
        return _answer(app, environ, start_response, body)

    return guarded


def _answer(app: Callable, environ: dict, start_response: Callable, body: _Body) -> Any:
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
        # The server closes after each request: the rest is read first, so
        # that the close is clean (a reset would destroy the answer in flight).
        _drain(body, environ)
    start_response(status, headers, exc_info)
    return result
