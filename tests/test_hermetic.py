"""The hermetic check: each rule catches and lets through what it should; a violation fails the run."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

import hermetic
from daemon import Daemon
from helpers import need, need_root, wait_for, write_config

HERE = os.path.dirname(os.path.abspath(__file__))
SYSTEM_PYTHON = "/usr/bin/python3"
NOT_A_PID = 999_999_999      # above any pid_max: a session nothing descends from


# -- the rules, pure ---------------------------------------------------------

FIB_TRIE = """\
Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
     |-- 192.0.2.2
        /32 host LOCAL
     |-- 192.0.2.255
        /32 link BROADCAST
"""

IF_INET6 = """\
fe8000000000000000fc00fffe000001 04 40 20 80     eth0
00000000000000000000000000000001 01 80 10 80       lo
"""

# /proc/net/tcp6 (addresses as little-endian words): a listener on [::]:8080,
# one on 127.0.0.1:8080 (IPv4-mapped), an established socket on 8080.
TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1 0 100 0 0 10 0
   1: 0000000000000000FFFF00000100007F:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 222 1 0 100 0 0 10 0
   2: 0000000000000000FFFF00000100007F:1F90 0000000000000000FFFF00000100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 333 1 0 20 4 30 10 -1
"""


@pytest.mark.unit
def test_forbidden_prefixes():
    assert hermetic.forbidden_prefix("/run/mdserver/admin.sock", hermetic.FORBIDDEN) \
        == "/run/mdserver"
    assert hermetic.forbidden_prefix("/run/libvirt/virtqemud-sock", hermetic.FORBIDDEN) \
        == "/run/libvirt"
    assert hermetic.forbidden_prefix("/var/run/libvirt/virtproxyd-sock-ro",
                                     hermetic.FORBIDDEN) == "/var/run/libvirt"
    assert hermetic.forbidden_prefix("/dev/log", hermetic.FORBIDDEN) == "/dev/log"
    assert hermetic.forbidden_prefix("/run/mdserver2/admin.sock", hermetic.FORBIDDEN) is None
    assert hermetic.forbidden_prefix("/tmp/x/run/mdserver/admin.sock", hermetic.FORBIDDEN) \
        is None
    assert hermetic.top_dir("/run/mdserver") == "/run"


@pytest.mark.unit
def test_host_addresses_and_names():
    assert hermetic.parse_fib_trie(FIB_TRIE) == {"127.0.0.1", "192.0.2.2"}
    assert hermetic.parse_if_inet6(IF_INET6) == {"fe80::fc:ff:fe00:1", "::1"}
    assert hermetic.normal_ip("::ffff:127.0.0.1") == "127.0.0.1"
    assert hermetic.normal_ip("localhost") == "127.0.0.1"
    assert hermetic.normal_ip("") == "0.0.0.0"
    assert hermetic.normal_ip("fe80::1%eth0") == "fe80::1"
    assert hermetic.normal_ip("deb.debian.org") is None
    addrs = ["192.0.2.2"]
    for ip in ("127.0.0.1", "127.3.2.1", "::1", "0.0.0.0", "::", "192.0.2.2"):
        assert hermetic.is_host_address(ip, addrs), ip
    for ip in ("169.254.169.254", "10.122.0.1", "192.0.2.3", "2001:db8::1"):
        assert not hermetic.is_host_address(ip, addrs), ip


@pytest.mark.unit
def test_listeners_and_who_a_connect_reaches():
    listening = hermetic.parse_sockets(TCP6, 8080, listening_only=True)
    assert listening == [("::", 8080, 111), ("127.0.0.1", 8080, 222)]
    assert len(hermetic.parse_sockets(TCP6, 8080, listening_only=False)) == 3
    assert hermetic.parse_sockets(TCP6, 8081, listening_only=True) == []
    assert hermetic.serving(listening, "127.0.0.1") == [222]     # the exact bind wins
    assert hermetic.serving(listening, "127.0.0.2") == [111]     # else the wildcard
    assert hermetic.serving(listening, "0.0.0.0") == [111, 222]
    assert hermetic.serving([("127.0.0.1", 8080, 222)], "127.0.0.2") == []


@pytest.mark.unit
def test_descendants_follow_the_ppid_tree():
    ppids = {1: 0, 10: 1, 11: 10, 12: 11, 13: 1, 14: 12}
    assert hermetic.descendants(10, ppids) == {10, 11, 12, 14}
    assert hermetic.descendants(NOT_A_PID, ppids) == {NOT_A_PID}


@pytest.mark.unit
def test_unix_rule(tmp_path):
    forbidden = str(tmp_path / "run" / "mdserver")
    facts = hermetic.session_facts(str(tmp_path / "log"), os.getpid(), [forbidden])
    check = hermetic.Checker(facts).check_unix
    assert "under " + forbidden in check(forbidden + "/admin.sock")
    assert "under " + forbidden in check(forbidden.encode() + b"/admin.sock")
    assert check(str(tmp_path / "run" / "mdserver2.sock")) is None
    assert check("\0abstract/run/mdserver") is None
    # a mount namespace with a tree of its own there (the libvirt lab's /run)
    facts["forbidden"] = [[forbidden, [0, 0]]]
    assert hermetic.Checker(facts).check_unix(forbidden + "/admin.sock") is None


@pytest.mark.unit
def test_child_env_passes_the_check_on_and_takes_it_out():
    facts = {"log": "/x"}
    env = hermetic.child_env({"PYTHONPATH": "/a", "PATH": "/bin"}, facts)
    assert env["PYTHONPATH"] == hermetic.SITE_DIR + os.pathsep + "/a"
    assert json.loads(env[hermetic.ENV]) == facts
    assert hermetic.child_env(env, facts)["PYTHONPATH"] == env["PYTHONPATH"]   # once
    clean = hermetic.child_env({**env, hermetic.ENV_TEST: "t"}, None)
    assert clean == {"PYTHONPATH": "/a", "PATH": "/bin"}


@pytest.mark.unit
def test_the_session_runs_the_check():
    """On unless MDSERVER_HERMETIC=0; libvirt clients without a URI reach nothing."""
    if os.environ.get(hermetic.SWITCH) != "0":
        assert hermetic.ENV in os.environ
        assert os.environ["PYTHONPATH"].split(os.pathsep)[0] == hermetic.SITE_DIR
    uri = os.environ["LIBVIRT_DEFAULT_URI"]
    assert uri == os.environ["VIRSH_DEFAULT_CONNECT_URI"]
    path = uri.split("socket=", 1)[1]
    assert not os.path.exists(path) and not os.path.exists(os.path.dirname(path))
    extra = hermetic.hermetic_env({"PATH": "/bin"})
    assert extra["LIBVIRT_DEFAULT_URI"] == uri
    assert (hermetic.ENV in extra) == (hermetic.ENV in os.environ)


# -- the rules in child processes ----------------------------------------------

# argv[1]: JSON [[family, kind, address], ...]; connects (sendto for UDP)
# each, prints JSON [outcome, ...]. Runs with the check of its environment.
CLIENT = r"""
import json, socket, sys
out = []
for family, kind, address in json.loads(sys.argv[1]):
    s = socket.socket(getattr(socket, family), getattr(socket, kind))
    s.settimeout(2)
    try:
        if kind == "SOCK_DGRAM" and family != "AF_UNIX":
            s.sendto(b"x", tuple(address))
        else:
            s.connect(tuple(address) if isinstance(address, list) else address)
        out.append("ok")
    except OSError as e:
        out.append(type(e).__name__)
    finally:
        s.close()
print(json.dumps(out))
"""


def own_session(tmp_path, pid=None, forbidden=hermetic.FORBIDDEN):
    """Facts of a session of the test's own (not the run's: its violations
    must not fail the run), with its log."""
    return hermetic.session_facts(str(tmp_path / "violations"),
                                  os.getpid() if pid is None else pid, forbidden)


def run_client(facts, targets, python=sys.executable):
    env = hermetic.child_env(os.environ, facts)
    r = subprocess.run([python, "-c", CLIENT, json.dumps(targets)], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def logged(facts):
    return hermetic.violations(facts["log"])


@pytest.mark.process
@pytest.mark.parametrize("python", [sys.executable, SYSTEM_PYTHON])
def test_unix_socket_under_a_forbidden_prefix_is_logged_and_still_works(tmp_path, python):
    need(os.access(python, os.X_OK), f"needs {python} (the hook's interpreter)")
    forbidden = tmp_path / "run" / "mdserver"
    forbidden.mkdir(parents=True)
    listeners = []
    for path in (forbidden / "admin.sock", tmp_path / "admin.sock"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(path))
        s.listen(1)
        listeners.append(s)
    facts = own_session(tmp_path, forbidden=[str(forbidden)])
    try:
        out = run_client(facts, [["AF_UNIX", "SOCK_STREAM", str(forbidden / "admin.sock")],
                                 ["AF_UNIX", "SOCK_STREAM", str(tmp_path / "admin.sock")]],
                         python)
    finally:
        for s in listeners:
            s.close()
    assert out == ["ok", "ok"]      # reported, not refused: a daemon behaves as without it
    lines = logged(facts)
    assert len(lines) == 1, lines
    assert f"{forbidden}/admin.sock" in lines[0] and f"under {forbidden}" in lines[0]
    assert "socket.connect" in lines[0] and "pid " in lines[0]


# A server that leaves the test's process tree: double-forked in a session of
# its own (reparented to init or a subreaper above pytest). It writes
# "pid tcp-port udp-port" to argv[1] and serves until SIGTERM.
ORPHAN = r"""
import os, socket, sys, time
if os.fork():
    os._exit(0)
tcp = socket.socket(); tcp.bind(("127.0.0.1", 0)); tcp.listen(4)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); udp.bind(("127.0.0.1", 0))
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(f"{os.getpid()} {tcp.getsockname()[1]} {udp.getsockname()[1]}\n")
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(120)
"""


@pytest.fixture
def orphan(tmp_path):
    """(pid, tcp port, udp port) of a server that is no descendant of the test."""
    info = tmp_path / "orphan"
    env = hermetic.child_env(os.environ, None)      # no check in it: it connects nowhere
    subprocess.run([sys.executable, "-c", ORPHAN, str(info)], env=env, check=True,
                   start_new_session=True, timeout=30)
    wait_for(info.exists, 10, "the orphan server reports its ports")
    pid, tcp, udp = map(int, info.read_text().split())
    try:
        yield pid, tcp, udp
    finally:    # by its PID only: the test started it
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: gone(pid), 10, "the orphan server stops")


def gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] in "ZX"    # a zombie its reaper has yet to reap
    except FileNotFoundError:
        return True


@pytest.mark.process
def test_a_host_port_served_outside_the_session_is_logged(tmp_path, orphan):
    pid, tcp, udp = orphan
    assert pid not in hermetic.descendants(os.getpid(), hermetic.ppid_map())
    facts = own_session(tmp_path)
    out = run_client(facts, [["AF_INET", "SOCK_STREAM", ["127.0.0.1", tcp]],
                             ["AF_INET", "SOCK_STREAM", ["127.0.0.1", tcp]],
                             ["AF_INET6", "SOCK_STREAM", ["::ffff:127.0.0.1", tcp]],
                             ["AF_INET", "SOCK_DGRAM", ["127.0.0.1", udp]]])
    assert out == ["ok", "ok", "ok", "ok"]
    lines = logged(facts)
    assert len(lines) == 3, lines      # once per address and port, not per connect
    assert all(f"served by pid {pid} " in line for line in lines), lines
    assert any(f"tcp port {tcp} on 127.0.0.1" in line for line in lines)
    assert any(f"udp port {udp} on 127.0.0.1" in line and "socket.sendto" in line
               for line in lines)


@pytest.mark.process
def test_ports_of_the_session_and_free_ports_are_allowed(tmp_path):
    facts = own_session(tmp_path)
    mine = socket.socket()              # the test's own listener (the session itself)
    mine.bind(("127.0.0.1", 0))
    mine.listen(4)
    free = socket.socket()              # bound, never listening: a refused connect
    free.bind(("127.0.0.1", 0))
    # a listener of a child of the test (a daemon it started)
    child = subprocess.Popen([sys.executable, "-c",
                              "import socket, sys, time\n"
                              "s = socket.socket(socket.AF_INET6); s.bind(('::', 0)); s.listen(4)\n"
                              "print(s.getsockname()[1], flush=True); time.sleep(60)"],
                             stdout=subprocess.PIPE, text=True,
                             env=hermetic.child_env(os.environ, None))
    try:
        child_port = int(child.stdout.readline())
        out = run_client(facts, [["AF_INET", "SOCK_STREAM", ["127.0.0.1", mine.getsockname()[1]]],
                                 ["AF_INET", "SOCK_STREAM", ["127.0.0.1", child_port]],
                                 ["AF_INET6", "SOCK_STREAM", ["::1", child_port]],
                                 ["AF_INET", "SOCK_STREAM", ["127.0.0.1", free.getsockname()[1]]]])
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
        mine.close()
        free.close()
    assert out == ["ok", "ok", "ok", "ConnectionRefusedError"]
    assert logged(facts) == []


@pytest.mark.privileged
def test_a_namespace_of_the_tests_owns_its_loopback(tmp_path):
    """The same self-served listener is a violation for a session it does not
    descend from in the session's namespace, and none in a namespace of its own."""
    need_root()
    need(shutil.which("unshare") is not None, "needs unshare (util-linux)")
    script = ("import socket\n"
              "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(1)\n"
              "socket.create_connection(s.getsockname(), timeout=2).close()\n"
              "print('ok')\n")
    own_netns = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"']
    results = {}
    for where, prefix in (("here", []), ("own-netns", own_netns)):
        (tmp_path / where).mkdir()
        facts = own_session(tmp_path / where, pid=NOT_A_PID)
        r = subprocess.run([*prefix, sys.executable, "-c", script],
                           env=hermetic.child_env(os.environ, facts),
                           capture_output=True, text=True, timeout=30)
        assert r.stdout.strip() == "ok", r.stderr
        results[where] = logged(facts)
    assert len(results["here"]) == 1, results
    assert "not by a process of this test session" in results["here"][0], results
    assert results["own-netns"] == []


# -- the session ---------------------------------------------------------------

INNER_TEST = """
import socket

def test_reaches_the_forbidden_socket():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect({path!r})
    finally:
        s.close()
"""


def run_inner_pytest(tmp_path, target, **env_extra):
    """A pytest of its own (with only the hermetic plugin) on one test that
    connects to `target`, a Unix socket; its exit status and output."""
    forbidden = tmp_path / "forbidden"
    (tmp_path / "test_inner.py").write_text(INNER_TEST.format(path=str(target)))
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    env = hermetic.child_env(os.environ, None)      # the run's check stays out of it
    env.update(PYTHONPATH=HERE, MDT_HERMETIC_FORBIDDEN=str(forbidden), MDSERVER_HERMETIC="1")
    env.update(env_extra)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "hermetic",
                        "-p", "no:cacheprovider", "-c", str(tmp_path / "pytest.ini"),
                        "--rootdir", str(tmp_path), str(tmp_path / "test_inner.py")],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    return r.returncode, r.stdout + r.stderr


@pytest.mark.process
def test_a_violation_fails_the_run(tmp_path):
    forbidden = tmp_path / "forbidden"
    forbidden.mkdir()
    listeners = []
    for path in (forbidden / "admin.sock", tmp_path / "other.sock"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(path))
        s.listen(4)
        listeners.append(s)
    try:
        status, out = run_inner_pytest(tmp_path, forbidden / "admin.sock")
        assert status == pytest.ExitCode.TESTS_FAILED, out
        assert "1 passed" in out and "hermetic check" in out, out
        assert "ERROR: 1 connect(s) to what the tests did not start" in out, out
        assert "test test_inner.py::test_reaches_the_forbidden_socket" in out, out
        status, out = run_inner_pytest(tmp_path, tmp_path / "other.sock")
        assert status == pytest.ExitCode.OK, out
        status, out = run_inner_pytest(tmp_path, forbidden / "admin.sock",
                                       MDSERVER_HERMETIC="0")
        assert status == pytest.ExitCode.OK and "hermetic" not in out, out
    finally:
        for s in listeners:
            s.close()


# -- who gets the check ----------------------------------------------------------

PROBE = ("import json, sys\n"
         "print(json.dumps(['_mdt_hermetic' in sys.modules, 'shadowed' in sys.modules]))\n")


@pytest.mark.process
@pytest.mark.parametrize("python", [sys.executable, SYSTEM_PYTHON])
def test_child_pythons_get_the_check_and_the_sitecustomize_it_shadows(tmp_path, python):
    need(os.access(python, os.X_OK), f"needs {python} (the hook's interpreter)")
    need(hermetic.ENV in os.environ, "the check is switched off (MDSERVER_HERMETIC=0)")
    shadowed = tmp_path / "site"
    shadowed.mkdir()
    (shadowed / "sitecustomize.py").write_text("import sys\nsys.modules['shadowed'] = sys\n")
    env = dict(os.environ, PYTHONPATH=os.environ["PYTHONPATH"] + os.pathsep + str(shadowed))
    r = subprocess.run([python, "-c", PROBE], env=env, capture_output=True, text=True,
                       timeout=30)
    assert json.loads(r.stdout) == [True, True], r.stderr
    # and without the session's variables: nothing of the check, the shadowed one still runs
    r = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, timeout=30,
                       env=dict(hermetic.child_env(os.environ, None),
                                PYTHONPATH=hermetic.SITE_DIR + os.pathsep + str(shadowed)))
    assert json.loads(r.stdout) == [False, True], r.stderr


@pytest.mark.process
def test_a_daemon_started_by_a_test_inherits_the_check(tmp_path):
    need(hermetic.ENV in os.environ, "the check is switched off (MDSERVER_HERMETIC=0)")
    d = Daemon(write_config(tmp_path, listen_address="127.0.0.1", port=0))
    try:
        d.wait_ready()
        with open(f"/proc/{d.proc.pid}/environ", "rb") as f:
            env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
    finally:
        d.stop()
    assert env[hermetic.ENV.encode()] == os.environ[hermetic.ENV].encode()
    assert env[b"PYTHONPATH"].split(os.pathsep.encode())[0] == hermetic.SITE_DIR.encode()
    assert env[hermetic.ENV_TEST.encode()].endswith(b"test_a_daemon_started_by_a_test_"
                                                   b"inherits_the_check")


@pytest.mark.process
def test_virsh_without_a_uri_reaches_no_libvirtd():
    need(shutil.which("virsh") is not None, "needs virsh (libvirt-clients)")
    t0 = time.monotonic()
    r = subprocess.run(["virsh", "-q", "list"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    path = os.environ["LIBVIRT_DEFAULT_URI"].split("socket=", 1)[1]
    assert path in r.stderr, r.stderr
    assert time.monotonic() - t0 < 30
