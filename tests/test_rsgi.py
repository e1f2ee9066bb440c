"""The guest listener's RSGI side, in process: environ, bodies, HEAD, 413/400/429, relays in threads, the GIL hand-over.

granian's RSGI scope and protocol objects are built by its Rust core and
cannot be made here: FakeScope and FakeProto stand in for them (the same
attributes and methods). The real server runs this code in every process
test (test_limits, test_daemon, test_identity...).
"""

import asyncio
import logging
import threading
from typing import Dict, List, Optional, Tuple

import pytest

from mdserver.bodies import DRAIN_MAX
from mdserver.fairness import FairQueue
from mdserver.rsgi import GuestListener, client_address, wsgi_environ

pytestmark = pytest.mark.unit


class FakeHeaders:
    """Stand-in for granian's RSGIHeaders: items() keeps repeated names."""

    def __init__(self, pairs: List[Tuple[str, str]]):
        self.pairs = pairs

    def items(self) -> List[Tuple[str, str]]:
        return list(self.pairs)

    def get(self, key: str, default=None):
        return next((v for k, v in self.pairs if k == key), default)

    def __contains__(self, key: str) -> bool:
        return any(k == key for k, _ in self.pairs)


class FakeScope:
    """Stand-in for granian's RSGI Scope (path already percent-decoded, as granian gives it)."""

    def __init__(self, method="GET", path="/", client="10.0.0.2:40000", headers=(),
                 query_string=""):
        self.proto, self.http_version, self.scheme = "http", "1.1", "http"
        self.method, self.path, self.client = method, path, client
        self.server, self.query_string = "169.254.169.254:80", query_string
        self.headers = FakeHeaders(list(headers))


class FakeProto:
    """Stand-in for granian's RSGIHTTPProtocol: a body in chunks (or one that
    never ends), and the one answer."""

    def __init__(self, chunks: List[bytes] = (), stall: bool = False):
        self.chunks, self.stall = list(chunks), stall
        self.answer: Optional[Tuple[int, List[Tuple[str, str]], bytes]] = None

    def __aiter__(self):
        return self._body()

    async def _body(self):
        for chunk in self.chunks:
            yield chunk
        if self.stall:
            await asyncio.sleep(3600)

    def response_bytes(self, status, headers, body):
        assert self.answer is None, "answered twice"
        self.answer = (status, list(headers), body)


def echo_app(seen: List[dict]):
    def app(environ, start_response):
        seen.append(dict(environ, body=environ["wsgi.input"].read(),
                         thread=threading.current_thread().name))
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"o", b"k"]
    return app


def serve(listener: GuestListener, scope: FakeScope, proto: FakeProto):
    asyncio.run(listener.__rsgi__(scope, proto))
    return proto.answer


def listener(app, **kw) -> GuestListener:
    return GuestListener(app, kw.pop("queue", FairQueue(256)), kw.pop("timeout", 5.0), 2, **kw)


@pytest.mark.parametrize("client, address", [
    ("10.0.0.2:40000", "10.0.0.2"), ("[fe80::1]:40000", "fe80::1"), ("::1", "::1"),
    ("[::ffff:127.0.0.1]:54698", "127.0.0.1"), ("[::ffff:a9fe:a9fe]:1", "::ffff:a9fe:a9fe"),
    ("169.254.169.254", "169.254.169.254")])
def test_client_address(client, address):
    assert client_address(client) == address


def test_environ_is_what_a_wsgi_server_gives():
    scope = FakeScope(path="/a b/é", query_string="x=1%202",
                      headers=[("x-test", "a"), ("x-test", "b"), ("content-type", "text/xml"),
                               ("transfer-encoding", "chunked"), ("host", "h")])
    env = wsgi_environ({"SERVER_PORT": "80"}, scope, "10.0.0.2", b"abc")
    assert env["PATH_INFO"] == "/a b/\u00c3\u00a9"  # PEP 3333: latin-1 of the UTF-8 bytes
    assert (env["QUERY_STRING"], env["REQUEST_METHOD"], env["REMOTE_ADDR"]) == \
        ("x=1%202", "GET", "10.0.0.2")
    assert env["HTTP_X_TEST"] == "a,b" and env["HTTP_HOST"] == "h"
    assert env["CONTENT_TYPE"] == "text/xml" and env["CONTENT_LENGTH"] == "3"
    assert "HTTP_TRANSFER_ENCODING" not in env  # the body arrived whole
    assert env["wsgi.input"].read() == b"abc" and env["SERVER_PORT"] == "80"


def test_a_get_is_answered_in_the_loop_thread():
    seen: List[dict] = []
    status, headers, body = serve(listener(echo_app(seen)), FakeScope(path="/latest/"), FakeProto())
    assert (status, body) == (200, b"ok") and ("Content-Type", "text/plain") in headers
    assert seen[0]["REMOTE_ADDR"] == "10.0.0.2" and not seen[0]["thread"].startswith("relay")


def test_head_keeps_the_headers_and_drops_the_body():
    status, headers, body = serve(listener(echo_app([])), FakeScope(method="HEAD"), FakeProto())
    assert (status, body) == (200, b"") and ("Content-Length", "2") in headers


def test_a_post_is_answered_in_a_relay_thread_with_its_body():
    seen: List[dict] = []
    scope = FakeScope(method="POST", headers=[("content-length", "6")])
    answer = serve(listener(echo_app(seen)), scope, FakeProto([b"abc", b"def"]))
    assert answer[0] == 200
    assert seen[0]["body"] == b"abcdef" and seen[0]["thread"].startswith("relay")


def test_a_body_past_the_drain_bound_gets_413_without_the_app(caplog):
    seen: List[dict] = []
    chunk = b"x" * (1024 * 1024)
    scope = FakeScope(method="POST", headers=[("content-length", str(DRAIN_MAX + len(chunk)))])
    with caplog.at_level(logging.INFO, logger="mdserver.rsgi"):
        status, headers, body = serve(listener(echo_app(seen)), scope,
                                      FakeProto([chunk] * (DRAIN_MAX // len(chunk) + 1)))
    assert status == 413 and ("Connection", "close") in headers and not seen
    assert body == f"body is over the {DRAIN_MAX}-byte limit\n".encode()
    assert len([r for r in caplog.records if "413" in r.getMessage()]) == 1


def test_a_body_that_never_ends_gets_400_in_bounded_time():
    scope = FakeScope(method="PUT", headers=[("content-length", "100")])
    status, headers, body = serve(listener(echo_app([]), timeout=0.2), scope,
                                  FakeProto([b"x" * 10], stall=True))
    assert status == 400 and b"not received within 0.2 s" in body
    assert ("Connection", "close") in headers


def test_a_refused_body_closes_and_an_accepted_one_does_not():
    def refuse(environ, start_response):
        start_response("413 Payload Too Large", [("Content-Type", "text/plain")])
        return [b"too big\n"]
    scope = FakeScope(method="PUT", headers=[("content-length", "3")])
    assert ("Connection", "close") in serve(listener(refuse), scope, FakeProto([b"abc"]))[1]
    assert ("Connection", "close") not in serve(listener(echo_app([])), scope,
                                                FakeProto([b"abc"]))[1]


def test_an_escaping_exception_is_a_500_line_not_a_crash(caplog):
    def broken(environ, start_response):
        raise RuntimeError("boom")
    with caplog.at_level(logging.ERROR, logger="mdserver.rsgi"):
        assert serve(listener(broken), FakeScope(), FakeProto())[::2] == (500, b"internal error\n")
    assert "boom" in caplog.text


def test_past_the_queue_bound_429_with_retry_after_logged_once(caplog):
    now = [0.0]
    gl = listener(echo_app([]), queue=FairQueue(16), clock=lambda: now[0])

    async def flood() -> List[Tuple[int, List[Tuple[str, str]], bytes]]:
        protos = [FakeProto() for _ in range(40)]
        await asyncio.gather(*(gl.__rsgi__(FakeScope(), p) for p in protos))
        return [p.answer for p in protos]

    with caplog.at_level(logging.WARNING, logger="mdserver.rsgi"):
        answers = asyncio.run(flood())
    refused = [a for a in answers if a[0] == 429]
    assert len(refused) == 40 - 16 and all(("Retry-After", "1") in a[1] for a in refused)
    assert sum(a[0] == 200 for a in answers) == 16
    assert len([r for r in caplog.records if "429 from 10.0.0.2" in r.getMessage()]) == 1


def test_the_gil_is_handed_over_only_while_a_flood_shares_the_queue():
    def handoffs_for(clients: List[str]) -> int:
        handoffs: List[int] = []
        gl = listener(echo_app([]), handoff_every=2, handoff=lambda: handoffs.append(1))

        async def requests() -> None:
            for c in clients:
                await gl.__rsgi__(FakeScope(client=c + ":1"), FakeProto())
        asyncio.run(requests())
        return len(handoffs)

    assert handoffs_for(["10.0.0.2"] * 10) == 0  # a guest alone never pays it
    # nor guests that each ask one thing at a time (a boot storm)
    assert handoffs_for(["10.0.0.2", "10.0.0.3", "10.0.0.4"] * 4) == 0
    # a flood (FLOOD_RUN in a row) beside another guest: every 2nd answer from
    # the flood's 4th request on
    assert handoffs_for(["10.0.0.3"] + ["10.0.0.2"] * 9) == 3
