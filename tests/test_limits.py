"""Bodies over their limit get their 413 (not a reset), on the guest port and the admin
socket; a body past the drain bound is cut off; a body that never comes ends in bounded time."""

import http.client
import json
import socket
import time
from typing import Callable, Dict, Tuple

import pytest

from daemon import Daemon, request
from helpers import domain_xml, make_instance, write_config
from mdserver.domainxml import MAX_XML_BYTES
from mdserver.faces.openstack import PASSWORD_MAX
from mdserver.bodies import DRAIN_MAX
from mdserver.store import Store

pytestmark = pytest.mark.process

MiB = 1024 * 1024
G1, G2 = "127.0.0.5", "127.0.0.6"
NET = "[dnsmasq]\nnet_address = 127.77.0.0\nnet_prefix = 16\ngateway = 127.77.0.1\n"
ROUNDS = 20

Connect = Callable[[], socket.socket]
Answer = Tuple[int, Dict[str, str], bytes]


@pytest.fixture(scope="module")
def md(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("limits")
    path = write_config(tmp, NET, listen_address="127.0.0.1", port=0, header_timeout=1)
    store = Store(str(tmp / "db.json"))
    store.put(make_instance(1, ipv4=G1))
    store.put(make_instance(2, ipv4=G2))
    store.close()
    d = Daemon(path).wait_ready()
    d.admin = str(tmp / "admin.sock")
    yield d
    alive = d.proc.poll() is None
    d.stop()
    assert alive, d.output()


def tcp(d, source: str = "127.0.0.1") -> Connect:
    return lambda: socket.create_connection((d.host, d.port), timeout=15,
                                            source_address=(source, 0))


def unix(d) -> Connect:
    def connect() -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(15)
        s.connect(d.admin)
        return s
    return connect


def head(method: str, path: str, length: int, extra: str = "") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {length}\r\n{extra}\r\n").encode()


def parse(data: bytes) -> Answer:
    top, _, body = data.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in
               (line.split(":", 1) for line in lines[1:])}
    assert int(headers["content-length"]) == len(body), data[:300]
    return int(lines[0].split()[1]), headers, body


def exchange(connect: Connect, data: bytes) -> Answer:
    """What a plain client does: send the whole request, then read the answer (to
    the end of the connection if the server closes it, else to its Content-Length).
    A reset on either side raises (ConnectionResetError, BrokenPipeError)."""
    with connect() as s:
        s.sendall(data)
        received = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return parse(received)
            received += chunk
            if b"\r\n\r\n" in received and b"connection: close" not in received.lower() \
                    and received.startswith(b"HTTP/1.1"):
                top, _, body = received.partition(b"\r\n\r\n")
                length = [int(line.split(b":", 1)[1]) for line in top.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")]
                if length and len(body) >= length[0]:
                    return parse(received)


def over_limit(connect: Connect, method: str, path: str, size: int, closes: bool,
               limit: int) -> None:
    for _ in range(ROUNDS):
        status, headers, body = exchange(connect, head(method, path, size) + b"x" * size)
        assert status == 413
        assert body == f"body of {size} bytes is over the {limit}-byte limit\n".encode()
        if closes:
            assert headers["connection"] == "close"


@pytest.mark.parametrize("size", [MAX_XML_BYTES + MiB, 6 * MiB])
def test_upload_over_the_limit_gets_its_413_on_the_admin_socket(md, size):
    assert size <= DRAIN_MAX
    t0 = time.monotonic()
    over_limit(unix(md), "POST", "/instance-upload", size, closes=False, limit=MAX_XML_BYTES)
    print(f"admin socket, {size} bytes: {(time.monotonic() - t0) / ROUNDS * 1000:.1f} ms each")


@pytest.mark.parametrize("size", [MAX_XML_BYTES + MiB, 6 * MiB])
def test_upload_over_the_limit_gets_its_413_on_the_guest_port(md, size):
    t0 = time.monotonic()
    over_limit(tcp(md), "POST", "/instance-upload", size, closes=True, limit=MAX_XML_BYTES)
    print(f"guest port, {size} bytes: {(time.monotonic() - t0) / ROUNDS * 1000:.1f} ms each")


@pytest.mark.parametrize("size", [PASSWORD_MAX + MiB, 6 * MiB])
def test_guest_password_over_the_limit_gets_its_413(md, size):
    over_limit(tcp(md, G1), "POST", "/openstack/latest/password", size, closes=True,
               limit=PASSWORD_MAX)


def test_token_put_with_a_big_body_gets_its_token(md):
    """A route that reads no body: the server reads it before answering."""
    for _ in range(ROUNDS):
        status, headers, token = exchange(
            tcp(md, G1), head("PUT", "/latest/api/token", 6 * MiB,
                              "X-aws-ec2-metadata-token-ttl-seconds: 60\r\n") + b"x" * 6 * MiB)
        assert status == 200 and len(token) > 20


@pytest.mark.parametrize("transport", ["admin socket", "guest port"])
def test_body_past_the_drain_bound_is_cut_off(md, transport):
    size = 64 * MiB  # far past DRAIN_MAX: not read, the connection closed on it
    assert size > 4 * DRAIN_MAX
    connect = unix(md) if transport == "admin socket" else tcp(md)
    with connect() as s:
        with pytest.raises(OSError):  # EPIPE or ECONNRESET once the server has closed
            s.sendall(head("POST", "/instance-upload", size) + b"x" * size)
            while s.recv(65536):
                pass
            raise ConnectionAbortedError("the server read it all")  # not expected
    # and the daemon carries on
    assert request(md.host, md.port, "GET", "/latest/meta-data/instance-id", source=G1)[0] == 200


def test_normal_bodies_still_work(md):
    xml = domain_xml("vm9", "ec200009-aaaa-4bbb-8ccc-000000000009", "52:54:00:00:00:09").encode()
    status, _, body = exchange(unix(md), head("POST", "/instance-upload", len(xml)) + xml)
    assert status == 200 and json.loads(body)["name"] == "vm9"
    # a body read in full keeps a guest's connection open for the next request
    conn = http.client.HTTPConnection(md.host, md.port, timeout=10, source_address=(G1, 0))
    try:
        conn.request("PUT", "/latest/api/token", body=b"ignored",
                     headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
        resp = conn.getresponse()
        token = resp.read().decode()
        assert resp.status == 200 and resp.getheader("connection") != "close"
        first = conn.sock
        conn.request("GET", "/latest/meta-data/instance-id",
                     headers={"X-aws-ec2-metadata-token": token})
        resp = conn.getresponse()
        assert (resp.status, resp.read().decode()) == (200, make_instance(1).instance_id)
        assert conn.sock is first  # the same connection
    finally:
        conn.close()


def ends_within(s: socket.socket, seconds: float) -> bytes:
    """What the server sends until it closes; fails if it has not closed within `seconds`."""
    s.settimeout(seconds)
    received = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return received
        if not chunk:
            return received
        received += chunk
    raise AssertionError(f"still open after {seconds} s: {received[:100]!r}")


def test_a_body_that_never_comes_ends_in_bounded_time(md):
    """Content-Length 100, 10 bytes sent, then silence: header_timeout (1 s here)
    bounds the wait on both servers, and meanwhile others are served, even with
    more such clients than the guest port has app threads (2)."""
    partial = head("POST", "/openstack/latest/password", 100) + b"x" * 10
    token = head("PUT", "/latest/api/token", 100,
                 "X-aws-ec2-metadata-token-ttl-seconds: 60\r\n") + b"x" * 10
    upload = head("POST", "/instance-upload", 100) + b"<domain>"
    stalled = []
    try:
        t0 = time.monotonic()
        for data in (partial, partial, partial, token):
            s = tcp(md, G1)()
            s.sendall(data)
            stalled.append(s)
        admin = unix(md)()
        admin.sendall(upload)
        stalled.append(admin)
        time.sleep(0.2)
        # the admin socket answers at once; another guest as soon as an app
        # thread is free again (at the latest when the stalled ones are cut)
        with unix(md)() as s:
            s.sendall(b"GET /instances HTTP/1.1\r\nHost: x\r\n\r\n")
            assert ends_within(s, 5).startswith(b"HTTP/1.0 200 ")
        assert time.monotonic() - t0 < 1.0
        assert get_instance_id(md, G2) == make_instance(2).instance_id
        assert time.monotonic() - t0 < 3.0
        answers = [ends_within(s, 5) for s in stalled]
        waited = time.monotonic() - t0
        assert waited < 4, waited
        # the guest's (answered or cut off) and the admin's 400 with its one line
        assert all(a == b"" or a.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 200 ")) for a in answers[:4])
        assert answers[4].startswith(b"HTTP/1.0 400 ") and b"request body incomplete" in answers[4]
        print(f"stalled bodies ended after {waited:.2f} s (header_timeout 1 s)")
    finally:
        for s in stalled:
            s.close()
    assert get_instance_id(md, G1) == make_instance(1).instance_id


def get_instance_id(md, source: str) -> str:
    status, _, body = request(md.host, md.port, "GET", "/latest/meta-data/instance-id",
                              source=source, timeout=5)
    assert status == 200
    return body
