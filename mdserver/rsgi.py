"""The guest listener's RSGI side: bodies read without a thread, guests served in turn (fairness), the WSGI app called per request."""

import asyncio
import io
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Tuple

from mdserver import logs
from mdserver.bodies import DRAIN_MAX
from mdserver.errors import GuestQueueFull
from mdserver.fairness import FairQueue
from mdserver.looptick import LoopTick
from mdserver.metrics import PUBLISH_INTERVAL, WorkerMetrics, classify

log = logging.getLogger(__name__)

Headers = List[Tuple[str, str]]
Answer = Tuple[int, Headers, bytes]
# (method, path, client address, token header) -> an answer, or None for the app
Fast = Callable[[str, str, str, Optional[str]], Optional[Answer]]

# How long a refused address stays unlogged (one line per flood, not per request).
REFUSAL_LOG_INTERVAL = 10.0
# What a refused guest is told to wait (seconds): its queue drains in far less.
RETRY_AFTER = "1"
_TEXT = [("Content-Type", "text/plain")]
# While more than one guest is being served: every HANDOFF_EVERY answers,
# let granian's I/O thread take the GIL (see _hand_over_gil).
HANDOFF_EVERY = 4


def _hand_over_gil() -> None:
    """granian hands each request to Python from its I/O thread, which needs
    the GIL for that; the loop thread holds it while answers keep coming,
    so requests wait in granian, first come first served, and the turns
    below never see them. Releasing the GIL for a moment (a sleep of 0
    releases it and lets a waiting thread take it) moves what has arrived
    into the queue, where a guest's one request goes before a flood's many.
    Measured here (tests/test_fairness_guests.py, a flood of 64 connections
    from one guest): another guest's cloud-init crawl takes 3.5-4.8x its
    time alone without it, 2.2x handing over every 8 answers, 1.4-1.7x every
    4, no better every 1 or 2, for ~10% of the flood's throughput. Only
    while one address sends fairness.FLOOD_RUN requests in a row and
    another address is served too (FairQueue.contended): a guest alone
    never pays it, nor do guests that each ask one thing at a time (a
    500-guest boot storm spent 18% of each worker's time here when every
    shared moment paid it)."""
    time.sleep(0)


def client_address(client: str) -> str:
    """granian's `host:port` (`[v6]:port`) -> the address alone; an
    IPv4-mapped IPv6 address (a dual-stack listener) as the IPv4 one, which
    is what instances are registered with."""
    if client.startswith("["):
        host = client[1:client.find("]")]
    elif client.count(":") == 1:
        host = client.split(":", 1)[0]
    else:
        host = client
    if host[:7].lower() == "::ffff:" and "." in host:
        host = host[7:]
    return host


def _plain(status: int, text: str, extra: Optional[Headers] = None) -> Answer:
    return status, _TEXT + (extra or []), f"{text}\n".encode()


def wsgi_environ(base: Dict[str, Any], scope: Any, remote: str, body: bytes) -> dict:
    """The PEP 3333 environ granian's WSGI interface would build: PATH_INFO
    as latin-1 of its UTF-8 bytes, headers as HTTP_*, repeated ones joined."""
    environ = dict(base)
    environ["REQUEST_METHOD"] = scope.method
    environ["PATH_INFO"] = scope.path.encode("utf-8", "surrogateescape").decode("latin-1")
    environ["QUERY_STRING"] = scope.query_string
    environ["REMOTE_ADDR"] = remote
    environ["SERVER_PROTOCOL"] = "HTTP/" + scope.http_version
    for name, value in scope.headers.items():
        key = name.upper().replace("-", "_")
        if key in ("CONTENT_TYPE", "CONTENT_LENGTH", "TRANSFER_ENCODING"):
            if key != "TRANSFER_ENCODING":
                environ[key] = value
            continue
        key = "HTTP_" + key
        environ[key] = environ[key] + "," + value if key in environ else value
    if body or "CONTENT_LENGTH" in environ:
        environ["CONTENT_LENGTH"] = str(len(body))  # what arrived, chunked or not
    environ["wsgi.input"] = io.BytesIO(body)
    return environ


def call_wsgi(app: Callable, environ: dict) -> Answer:
    """Run the WSGI app to the end: status, headers, the whole body."""
    started: List[Any] = []

    def start_response(status: str, headers: Headers, exc_info: Any = None) -> Callable:
        started[:] = [status, headers]
        return lambda data: None

    result = app(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    status, headers = started
    return int(status[:3]), headers, body


class GuestListener:
    """RSGI application around the guest-facing WSGI app (callable, as
    granian's loaders expect; RSGI's entry point is __rsgi__).

    A request body is read here, asynchronously, within `body_timeout` and
    up to DRAIN_MAX (so a body over a route's limit is read whole and the
    client reads its 413), before the request queues for its turn: waiting
    costs no thread, and a slow sender holds nothing but its own connection.
    `catch_up` brings the worker's replica up to date before each answer;
    `fast` answers the hot GETs without the app (mdserver.fastpath) when it
    can. The app runs in the loop's thread (its work is CPU only) except POSTs,
    which are relayed to the main process over the admin socket and wait for
    it: those run in `relay_threads` threads. `metrics` counts every answer
    (plain integers in the loop's thread) and is published to its
    multiprocess file every PUBLISH_INTERVAL seconds by the loop.
    """

    def __init__(self, app: Callable, queue: FairQueue, body_timeout: float,
                 relay_threads: int, fast: Optional[Fast] = None,
                 catch_up: Callable[[], None] = lambda: None,
                 tick: Optional[LoopTick] = None,
                 clock: Callable[[], float] = time.monotonic,
                 handoff_every: int = HANDOFF_EVERY, handoff: Callable[[], None] = _hand_over_gil,
                 metrics: Optional[WorkerMetrics] = None):
        self.app, self.queue, self.body_timeout, self.fast = app, queue, body_timeout, fast
        self.metrics = metrics
        self.catch_up = catch_up
        self.tick = tick
        self.handoff_every, self.handoff = handoff_every, handoff
        self._answered = 0
        self.relays = ThreadPoolExecutor(relay_threads, thread_name_prefix="relay")
        self.clock = clock
        self._refusals: Dict[str, float] = {}
        self._base: Dict[str, Any] = {}

    def __call__(self, scope: Any, proto: Any) -> Any:
        return self.__rsgi__(scope, proto)

    def __rsgi_init__(self, loop: Any) -> None:
        if self.tick is not None:
            self.tick.attach(loop)
        if self.metrics is not None:
            loop.call_later(PUBLISH_INTERVAL, self._publish_every, loop)

    def __rsgi_del__(self, loop: Any) -> None:
        self.relays.shutdown(wait=False)
        self._publish()

    def _publish_every(self, loop: Any) -> None:
        self._publish()
        loop.call_later(PUBLISH_INTERVAL, self._publish_every, loop)

    def _publish(self) -> None:
        if self.metrics is None:
            return
        try:
            self.metrics.publish()
        except Exception:  # counts are not worth a worker: said once, then off
            log.exception("metrics: cannot publish this worker's counts; counting stops")
            self.metrics = None

    async def __rsgi__(self, scope: Any, proto: Any) -> None:
        if scope.proto != "http":
            return
        try:
            status, headers, body = await self._answer(scope, proto)
        except Exception:  # the daemon never crashes on a request
            log.exception("%s %s: unexpected error", scope.method, scope.path)
            status, headers, body = _plain(500, "internal error")
        if scope.method == "HEAD":
            body = b""
        proto.response_bytes(status, headers, body)
        if self.metrics is not None:
            self.metrics.count(scope.path, status)
        self._answered += 1
        if self._answered % self.handoff_every == 0 and self.queue.contended():
            self.handoff()

    async def _answer(self, scope: Any, proto: Any) -> Answer:
        remote = client_address(scope.client)
        body = b""
        if _has_body(scope.headers):
            try:
                body = await asyncio.wait_for(_read_body(proto), self.body_timeout)
            except asyncio.TimeoutError:
                log.info("400 %s %s from %s: body not received within %g s",
                         scope.method, scope.path, remote, self.body_timeout,
                         extra=_request_fields(scope, remote, 400))
                return _plain(400, f"request body not received within {self.body_timeout:g} s",
                              [("Connection", "close")])
            except _TooLarge:
                log.info("413 %s %s from %s: body over %d bytes", scope.method, scope.path,
                         remote, DRAIN_MAX, extra=_request_fields(scope, remote, 413))
                return _plain(413, f"body is over the {DRAIN_MAX}-byte limit",
                              [("Connection", "close")])
        try:
            await self.queue.turn(remote)
        except GuestQueueFull as e:
            self._log_refusal(remote, e, scope)
            return _plain(429, str(e), [("Retry-After", RETRY_AFTER)])
        # Every write acknowledged before this request, in every worker.
        self.catch_up()
        if self.fast is not None and not body:
            answer = self.fast(scope.method, scope.path, remote,
                               scope.headers.get("x-aws-ec2-metadata-token"))
            if answer is not None:
                return answer
        environ = wsgi_environ(self._base_for(scope), scope, remote, body)
        if scope.method == "POST":
            loop = asyncio.get_running_loop()
            status, headers, data = await loop.run_in_executor(self.relays, call_wsgi, self.app,
                                                               environ)
        else:
            status, headers, data = call_wsgi(self.app, environ)
        if body and status >= 400:
            # A refused body ends its connection (a client that sends what it
            # should not is not one to keep talking to); an accepted one, or
            # a token PUT with a stray body, keeps it.
            headers = headers + [("Connection", "close")]
        return status, headers, data

    def _base_for(self, scope: Any) -> Dict[str, Any]:
        """The environ keys that are the same for every request to one listener."""
        base = self._base.get(scope.server)
        if base is None:
            host, _, port = scope.server.rpartition(":")
            base = self._base[scope.server] = {
                "SCRIPT_NAME": "", "SERVER_NAME": host.strip("[]"), "SERVER_PORT": port,
                "SERVER_SOFTWARE": "mdserver", "wsgi.version": (1, 0),
                "wsgi.url_scheme": scope.scheme, "wsgi.errors": sys.stderr,
                "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False,
                "wsgi.input_terminated": True,
            }
        return base

    def _log_refusal(self, remote: str, error: GuestQueueFull, scope: Any) -> None:
        now = self.clock()
        if now - self._refusals.get(remote, -REFUSAL_LOG_INTERVAL) >= REFUSAL_LOG_INTERVAL:
            self._refusals[remote] = now
            log.warning("429 from %s: %s (further refusals unlogged for %g s)", remote, error,
                        REFUSAL_LOG_INTERVAL, extra=_request_fields(scope, remote, 429))
            if len(self._refusals) > 1024:  # bounded: forget the oldest
                del self._refusals[min(self._refusals, key=self._refusals.__getitem__)]


def _request_fields(scope: Any, remote: str, status: int) -> dict:
    face, kind = classify(scope.path)
    return logs.fields(ip=remote, face=face, kind=kind, method=scope.method, path=scope.path,
                       status=status)


class _TooLarge(Exception):
    pass


def _has_body(headers: Any) -> bool:
    length = headers.get("content-length")
    return bool(length and length.strip() not in ("", "0")) or "transfer-encoding" in headers


async def _read_body(proto: Any) -> bytes:
    parts: List[bytes] = []
    size = 0
    async for chunk in proto:
        size += len(chunk)
        if size > DRAIN_MAX:
            raise _TooLarge()
        parts.append(chunk)
    return b"".join(parts)
