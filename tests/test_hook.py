"""The libvirt hook (hooks/qemu), run for real as libvirt runs it.

A fake mdserver (a small HTTP server on a Unix socket, owned by the test)
records what the hook sends; a fake syslog (a datagram socket) records what
it logs. The hook finds both through MDSERVER_CONFIG and MDSERVER_HOOK_SYSLOG;
its fallback socket (/run/mdserver/admin.sock, a live mdserver on a
hypervisor) is always replaced by one in the test's directory
(MDSERVER_HOOK_DEFAULT_SOCKET), so no hook run here can reach a real daemon.
"""

import json
import os
import socket
import subprocess
import threading
import time

import pytest

from helpers import need

pytestmark = pytest.mark.process

HOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hooks", "qemu")

# A domain XML with the bytes a naive client would mangle: LF and CRLF line
# ends, blank lines, trailing newlines, non-ASCII.
XML = (b"<domain type='kvm'>\n  <name>vm1</name>\r\n\n"
       b"  <uuid>ec242e85-6eab-43a9-8b73-ae498ed416a8</uuid>\n"
       b"  <description>caf\xc3\xa9 \xe2\x9c\x93</description>\n"
       b"  <devices><interface type='network'><mac address='52:54:00:12:34:56'/>"
       b"<source network='mds'/></interface></devices>\n</domain>\n\n")

ANSWER = {"name": "vm1", "uuid": "ec242e85-6eab-43a9-8b73-ae498ed416a8",
          "mac": "52:54:00:12:34:56", "ip": "10.122.0.2", "hostname": "vm1"}


def setup_module():
    need(os.access("/usr/bin/python3", os.X_OK), "the hook runs under /usr/bin/python3")


class FakeMdserver:
    """Stand-in for mdserver's admin socket: records each request, answers
    with `status` and `body` (or, with `answer=False`, reads the request and
    never answers)."""

    def __init__(self, path, status=200, body=None, answer=True):
        self.path, self.status, self.answer = path, status, answer
        self.body = json.dumps(ANSWER).encode() if body is None else body
        self.requests = []
        self.received = threading.Event()
        self.closing = threading.Event()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.closing.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn):
        with conn:
            conn.settimeout(5)
            data = b""
            try:
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip()
                           for k, _, v in (line.partition(":") for line in lines[1:])}
                length = int(headers.get("content-length", "0"))
                while len(body) < length:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    body += chunk
            except (OSError, ValueError):
                return
            self.requests.append({"method": method, "target": target,
                                  "headers": headers, "body": body})
            self.received.set()
            if not self.answer:
                self.closing.wait(10)
                return
            reason = "OK" if self.status == 200 else "Error"
            ctype = "application/json" if self.status == 200 else "text/plain"
            conn.sendall(f"HTTP/1.1 {self.status} {reason}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(self.body)}\r\n\r\n".encode() + self.body)

    def close(self):
        self.closing.set()
        self.sock.close()
        self.thread.join(2)


class FakeSyslog:
    """A datagram socket standing in for /dev/log."""

    def __init__(self, path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.3)

    def lines(self):
        out = []
        while True:
            try:
                out.append(self.sock.recv(65536).decode())
            except socket.timeout:
                return out

    def close(self):
        self.sock.close()


@pytest.fixture
def env(tmp_path):
    """Config whose admin_socket is in tmp_path, a fallback socket path there
    too, and a fake syslog."""
    sock = str(tmp_path / "admin.sock")
    conf = tmp_path / "mdserver.conf"
    conf.write_text(f"[mdserver]\nadmin_socket = {sock}\n")
    syslog = FakeSyslog(str(tmp_path / "log"))
    yield {"socket": sock, "config": str(conf), "syslog": syslog, "dir": tmp_path,
           "default": str(tmp_path / "default" / "admin.sock")}
    syslog.close()


def hook_env(env, extra_env=None):
    """The hook's environment: every path it may use is the test's own."""
    e = dict(os.environ, MDSERVER_CONFIG=env["config"],
             MDSERVER_HOOK_SYSLOG=env["syslog"].path,
             MDSERVER_HOOK_DEFAULT_SOCKET=env["default"])
    e.update(extra_env or {})
    return e


def run_hook(env, op, sub_op, stdin=XML, domain="vm1", extra_env=None):
    e = hook_env(env, extra_env)
    start = time.monotonic()
    proc = subprocess.run([HOOK, domain, op, sub_op, "-"], input=stdin,
                          capture_output=True, env=e, timeout=30)
    elapsed = time.monotonic() - start
    assert proc.stdout == b"", "the hook must never write to stdout"
    assert proc.returncode == 0
    return proc, elapsed


@pytest.mark.parametrize("op", ["prepare", "migrate", "restore"])
def test_registering_ops_send_the_xml_unchanged(env, op):
    server = FakeMdserver(env["socket"])
    try:
        proc, elapsed = run_hook(env, op, "begin")
    finally:
        server.close()
    assert len(server.requests) == 1
    req = server.requests[0]
    assert (req["method"], req["target"]) == ("POST", "/instance-upload")
    assert req["headers"]["content-type"] == "application/xml"
    assert req["body"] == XML
    assert proc.stderr == b""
    logged = env["syslog"].lines()
    assert len(logged) == 1 and logged[0].startswith("<30>")   # daemon.info
    assert "mdserver-hook[" in logged[0] and "ip=10.122.0.2" in logged[0]
    assert elapsed < 2.0


@pytest.mark.parametrize("op,sub_op", [
    ("start", "begin"), ("started", "begin"), ("release", "end"), ("stopped", "end"),
    ("prepare", "end"), ("migrate", "end"), ("restore", "end"), ("reconnect", "begin"),
    ("attach", "begin"), ("prepare", "begin-ish"),
])
def test_other_ops_send_nothing(env, op, sub_op):
    server = FakeMdserver(env["socket"])
    try:
        proc, _ = run_hook(env, op, sub_op)
    finally:
        server.close()
    assert server.requests == []
    assert proc.stderr == b"" and env["syslog"].lines() == []


def test_large_binary_body_is_sent_as_is(env):
    body = XML[:-len(b"</domain>\n\n")] + b"".join(
        b"  <!-- %d \r\n\x00\xff -->\n" % i for i in range(20000)) + b"</domain>\n"
    server = FakeMdserver(env["socket"])
    try:
        run_hook(env, "prepare", "begin", stdin=body)
    finally:
        server.close()
    assert server.requests[0]["body"] == body


def test_refusal_is_logged_in_one_line(env):
    server = FakeMdserver(env["socket"], status=400, body=b"bad domain XML: no <uuid>\n")
    try:
        proc, _ = run_hook(env, "prepare", "begin")
    finally:
        server.close()
    logged = env["syslog"].lines()
    assert len(logged) == 1
    assert logged[0].startswith("<27>")   # daemon.err
    assert "400 bad domain XML: no <uuid>" in logged[0] and "vm1" in logged[0]
    assert proc.stderr == b""


def test_stderr_when_there_is_no_syslog(env):
    proc, _ = run_hook(env, "prepare", "begin",
                       extra_env={"MDSERVER_HOOK_SYSLOG": str(env["dir"] / "no-such-log")})
    lines = proc.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mdserver-hook: ")
    assert "not registered" in lines[0]


def _one_failure_line(env, proc):
    logged = env["syslog"].lines()
    assert proc.stderr == b""
    assert len(logged) == 1, logged
    assert logged[0].startswith("<27>") and "not registered" in logged[0]
    return logged[0]


def test_absent_mdserver(env):
    proc, elapsed = run_hook(env, "prepare", "begin")
    line = _one_failure_line(env, proc)
    assert "no socket" in line
    assert elapsed < 2.0


def test_stale_socket_file(env):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(env["socket"])
    s.close()                      # the file stays, nobody listens
    proc, elapsed = run_hook(env, "migrate", "begin")
    assert "nobody listens" in _one_failure_line(env, proc)
    assert elapsed < 2.0


def test_mdserver_that_never_answers(env):
    server = FakeMdserver(env["socket"], answer=False)
    try:
        proc, elapsed = run_hook(env, "prepare", "begin")
        assert server.received.is_set()
    finally:
        server.close()
    assert "no answer" in _one_failure_line(env, proc)
    assert elapsed < 2.0


def test_listener_that_never_accepts(env):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(env["socket"])
    s.listen(8)                    # queued by the kernel, never accepted
    try:
        proc, elapsed = run_hook(env, "prepare", "begin")
    finally:
        s.close()
    assert "no answer" in _one_failure_line(env, proc)
    assert elapsed < 2.0


def test_listener_with_a_full_backlog(env):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(env["socket"])
    s.listen(0)
    fillers = []
    try:
        while True:                # fill the queue: the next connect gets EAGAIN
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.setblocking(False)
            try:
                c.connect(env["socket"])
            except BlockingIOError:
                c.close()
                break
            fillers.append(c)
            assert len(fillers) < 100
        proc, elapsed = run_hook(env, "restore", "begin")
    finally:
        for c in fillers:
            c.close()
        s.close()
    assert "accepts no connection" in _one_failure_line(env, proc)
    assert elapsed < 2.0


def test_stdin_never_closed(env, tmp_path):
    """libvirt always closes stdin; if something does not, the bound holds."""
    server = FakeMdserver(env["socket"])
    e = hook_env(env)
    r, w = os.pipe()
    try:
        os.write(w, XML)
        start = time.monotonic()
        proc = subprocess.run([HOOK, "vm1", "prepare", "begin", "-"], stdin=r,
                              capture_output=True, env=e, timeout=30)
        elapsed = time.monotonic() - start
    finally:
        os.close(r)
        os.close(w)
        server.close()
    assert proc.returncode == 0 and proc.stdout == b""
    assert elapsed < 2.0
    assert server.requests == []
    assert "stdin" in _one_failure_line(env, proc)


@pytest.mark.parametrize("text", [
    "[mdserver\nadmin_socket = x\n",                       # no section header
    "[mdserver]\nadmin_socket = ${nowhere:key}\n",         # bad interpolation
    "[mdserver]\nadmin_socket = a\nadmin_socket = b\n",    # duplicate key
    b"[mdserver]\nadmin_socket = \xff\xfe\n",              # not UTF-8
])
def test_broken_config_falls_back_to_the_default(env, text):
    path = env["dir"] / "broken.conf"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    proc, elapsed = run_hook(env, "prepare", "begin",
                             extra_env={"MDSERVER_CONFIG": str(path)})
    line = _one_failure_line(env, proc)
    assert "broken.conf" in line and env["default"] in line
    assert elapsed < 2.0


def test_config_read_as_mdserver_reads_it(env):
    """Interpolation, `$$`, includes (later files win) and relative paths."""
    d = env["dir"]
    (d / "conf.d").mkdir()
    (d / "conf.d" / "10-socket.conf").write_text(
        "[paths]\nrun = sock$$dir\n[mdserver]\nadmin_socket = ${paths:run}/admin.sock\n")
    (d / "sock$dir").mkdir()
    (d / "mdserver.conf").write_text(
        "[mdserver]\nadmin_socket = /nowhere/admin.sock\n"
        "[_include_]\ndirectories = conf.d\n")
    server = FakeMdserver(str(d / "sock$dir" / "admin.sock"))
    try:
        run_hook(env, "prepare", "begin")
    finally:
        server.close()
    assert [r["body"] for r in server.requests] == [XML]


def test_missing_config_means_default_socket(env):
    proc, _ = run_hook(env, "prepare", "begin",
                       extra_env={"MDSERVER_CONFIG": str(env["dir"] / "absent.conf")})
    line = _one_failure_line(env, proc)
    assert env["default"] in line and "configuration" not in line


def test_the_fallback_socket_is_used(env):
    """With no configuration the hook registers on the fallback socket."""
    os.makedirs(os.path.dirname(env["default"]))
    server = FakeMdserver(env["default"])
    try:
        run_hook(env, "prepare", "begin",
                 extra_env={"MDSERVER_CONFIG": str(env["dir"] / "absent.conf")})
    finally:
        server.close()
    assert [r["body"] for r in server.requests] == [XML]


def test_builtin_fallback_is_mdservers_default_socket(tmp_path):
    """Without the test override the fallback is /run/mdserver/admin.sock, the
    daemon's own default. Asked of the hook's code under the system python3;
    nothing connects anywhere."""
    from mdserver import config
    empty = tmp_path / "empty.conf"
    empty.write_text("")
    default = config.load(str(empty)).mdserver.admin_socket
    probe = ("import importlib.machinery, importlib.util, sys\n"
             "loader = importlib.machinery.SourceFileLoader('hook', sys.argv[1])\n"
             "hook = importlib.util.module_from_spec(importlib.util.spec_from_loader('hook', loader))\n"
             "loader.exec_module(hook)\n"
             "print(hook.socket_path([]))\n")
    e = {k: v for k, v in os.environ.items() if not k.startswith("MDSERVER_")}
    e["MDSERVER_CONFIG"] = str(tmp_path / "absent.conf")
    out = subprocess.run(["/usr/bin/python3", "-c", probe, HOOK], env=e, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == default == "/run/mdserver/admin.sock"


def test_empty_stdin_is_reported(env):
    server = FakeMdserver(env["socket"])
    try:
        proc, _ = run_hook(env, "prepare", "begin", stdin=b"")
    finally:
        server.close()
    assert server.requests == []
    assert "no domain XML" in _one_failure_line(env, proc)


def test_oversized_xml_is_not_sent(env):
    big = b"<domain>" + b"x" * (16 * 1024 * 1024) + b"</domain>\n"
    server = FakeMdserver(env["socket"])
    try:
        proc, elapsed = run_hook(env, "prepare", "begin", stdin=big)
        _, quiet = run_hook(env, "start", "begin", stdin=big)
    finally:
        server.close()
    assert server.requests == []
    assert "more than" in _one_failure_line(env, proc)
    assert elapsed < 2.0 and quiet < 2.0
