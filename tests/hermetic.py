"""The hermetic check: no test reaches the host's mdserver, libvirt or syslog, or a host port the run did not open."""

# Standard library only, imported lazily where it costs: child processes
# (the daemons, the hook under the system python3) load this file through
# tests/hermetic_site/sitecustomize.py at every start.

import json
import os
import sys
from typing import Any, Collection, Dict, Iterable, List, Optional, Sequence, Set, Tuple

# The session's facts (JSON); while it is set, every Python process of the
# session tree checks its connects (see install()).
ENV = "MDT_HERMETIC"
# The node id of the test running in the pytest process, set per test: a
# child names the test that started it.
ENV_TEST = "MDT_HERMETIC_TEST"
# "0" switches the check off (the dead libvirt URI stays: it is no check).
SWITCH = "MDSERVER_HERMETIC"
# Replaces FORBIDDEN (os.pathsep-separated) for the self-test, which must
# not create /run/mdserver to prove the rule.
ENV_FORBIDDEN = "MDT_HERMETIC_FORBIDDEN"

HERE = os.path.dirname(os.path.abspath(__file__))
SITE_DIR = os.path.join(HERE, "hermetic_site")

# Unix sockets of the host's mdserver, libvirt daemons (libvirtd, virtqemud,
# virtproxyd ... all under /run/libvirt) and syslog. The self-test replaces
# the list (the "forbidden" entry of the session facts).
FORBIDDEN = ("/run/mdserver", "/var/run/mdserver", "/run/libvirt", "/var/run/libvirt",
             "/dev/log", "/run/systemd/journal")

EVENTS = frozenset({"socket.connect", "socket.sendto", "socket.sendmsg"})

Address = Any   # what socket.connect() takes: a path, (host, port[, flow, scope]) ...
Listener = Tuple[str, int, int]   # (local address, port, socket inode)


# --------------------------------------------------------------------------
# the rules, pure


def forbidden_prefix(path: str, prefixes: Iterable[str]) -> Optional[str]:
    """The prefix of `prefixes` that `path` (absolute, normalised) lies under."""
    for prefix in prefixes:
        if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
            return prefix
    return None


def top_dir(path: str) -> str:
    """/run for /run/mdserver/admin.sock: the directory whose identity says
    whether a mount namespace sees the host's tree there."""
    parts = path.strip("/").split("/", 1)
    return "/" + parts[0]


def dir_identity(path: str) -> Optional[Tuple[int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def parse_fib_trie(text: str) -> Set[str]:
    """IPv4 addresses configured here: /proc/net/fib_trie's "/32 host LOCAL" leaves."""
    found, last = set(), ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("|--") or stripped.startswith("+--"):
            last = stripped[3:].split()[0]
        elif stripped == "/32 host LOCAL" and last:
            found.add(last)
    return found


def parse_if_inet6(text: str) -> Set[str]:
    """IPv6 addresses configured here (/proc/net/if_inet6: 32 hex digits first)."""
    import ipaddress
    found = set()
    for line in text.splitlines():
        fields = line.split()
        if fields and len(fields[0]) == 32:
            found.add(str(ipaddress.IPv6Address(bytes.fromhex(fields[0]))))
    return found


def host_addresses() -> List[str]:
    """Every address configured in this network namespace now."""
    found: Set[str] = set()
    for path, parse in (("/proc/net/fib_trie", parse_fib_trie),
                        ("/proc/net/if_inet6", parse_if_inet6)):
        try:
            with open(path) as f:
                found |= parse(f.read())
        except OSError:
            pass
    return sorted(found)


def normal_ip(host: str) -> Optional[str]:
    """`host` as a plain address (IPv4-mapped IPv6 unwrapped, zone dropped),
    "localhost" as 127.0.0.1; None for another name."""
    import ipaddress
    if host in ("", "localhost") or host.endswith(".localhost"):
        return "127.0.0.1" if host else "0.0.0.0"
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped or ip)


def is_host_address(ip: str, host_addrs: Collection[str]) -> bool:
    """Loopback, unspecified, or one of the host's own addresses."""
    import ipaddress
    addr = ipaddress.ip_address(ip)
    return addr.is_loopback or addr.is_unspecified or ip in host_addrs


def _hex_address(text: str) -> str:
    """An address of /proc/net/tcp (little-endian 32-bit words) as text."""
    import ipaddress
    raw = bytes.fromhex(text)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(words)
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped or ip)


def parse_sockets(text: str, port: int, listening_only: bool) -> List[Listener]:
    """The sockets of /proc/net/{tcp,tcp6,udp,udp6} bound to `port`:
    listening ones only (state 0A) for TCP, any bound one for UDP."""
    want = ":%04X" % port
    found = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or not fields[1].endswith(want):
            continue
        if listening_only and fields[3] != "0A":
            continue
        inode = int(fields[9])
        if inode:
            found.append((_hex_address(fields[1].split(":")[0]), port, inode))
    return found


def serving(listeners: Sequence[Listener], ip: str) -> List[int]:
    """Inodes of the sockets a connect to `ip` reaches: those bound to `ip`,
    else the wildcard ones (any of them for an unspecified destination)."""
    import ipaddress
    if ipaddress.ip_address(ip).is_unspecified:
        return [inode for _a, _p, inode in listeners]
    exact = [inode for a, _p, inode in listeners if a == ip]
    return exact or [inode for a, _p, inode in listeners
                     if ipaddress.ip_address(a).is_unspecified]


def descendants(root: int, ppids: Dict[int, int]) -> Set[int]:
    """`root` and every process below it in the ppid tree."""
    children: Dict[int, List[int]] = {}
    for pid, ppid in ppids.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = {root}, [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


# --------------------------------------------------------------------------
# the process table


def ppid_map() -> Dict[int, int]:
    ppids = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                data = f.read()
        except OSError:
            continue
        ppids[int(name)] = int(data[data.rindex(")") + 2:].split(" ", 2)[1])
    return ppids


def socket_holder(inode: int, pids: Iterable[int]) -> Optional[Tuple[int, str]]:
    """(pid, fd path) of one of `pids` that holds socket `inode`."""
    target = f"socket:[{inode}]"
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") == target:
                    return pid, f"{fd_dir}/{fd}"
            except OSError:
                continue
    return None


def netns() -> str:
    """This process's network namespace ("net:[inode]"), "" where /proc has none."""
    try:
        return os.readlink("/proc/self/ns/net")
    except OSError:
        return ""


def describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        text = " ".join(b" ".join(argv).decode(errors="replace").split())   # one line
        return f"pid {pid} ({text[:200]})"
    except OSError:
        return f"pid {pid}"


# --------------------------------------------------------------------------
# the check, per process


class Checker:
    """Checks one process's connects against the session's facts; reports,
    never raises (a daemon must behave as without it)."""

    def __init__(self, facts: Dict[str, Any]):
        self.log = str(facts["log"])
        self.session = int(facts["pid"])
        self.netns = str(facts["netns"])
        self.host_addrs = frozenset(facts["addrs"])
        self.forbidden: List[Tuple[str, Optional[Tuple[int, int]]]] = [
            (p, tuple(ident) if ident else None) for p, ident in facts["forbidden"]]
        # (proto, ip, port) -> (inode, fd path of a session process holding it)
        self._ours: Dict[Tuple[str, str, int], Tuple[int, str]] = {}
        self._reported: Set[str] = set()

    def on_event(self, event: str, args: Tuple[Any, ...]) -> None:
        if event not in EVENTS:
            return
        try:
            sock, address = args[0], args[1]
            if address is None:
                return
            reason = self.check(int(sock.family), int(sock.type), address)
        except Exception as e:      # a bug here: said (it fails the run), never raised
            reason = f"the hermetic check itself failed: {e!r}"
        if reason:
            try:
                self.report(event, args[1], reason)
            except Exception:   # the check must never break the process
                pass

    def check(self, family: int, kind: int, address: Address) -> Optional[str]:
        import socket
        if family == socket.AF_UNIX:
            return self.check_unix(address)
        if family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple):
            udp = kind & 0xf == socket.SOCK_DGRAM
            return self.check_inet(str(address[0]), int(address[1]), udp)
        return None

    def check_unix(self, address: Any) -> Optional[str]:
        if isinstance(address, (bytes, bytearray)):
            address = os.fsdecode(bytes(address))
        if not isinstance(address, str) or not address or address[0] == "\0":
            return None     # abstract namespace: no path
        path = os.path.abspath(address)
        for candidate in {path, os.path.realpath(path)}:
            for prefix, ident in self.forbidden:
                if forbidden_prefix(candidate, [prefix]) is None:
                    continue
                # A mount namespace with a /run of its own (the libvirt lab's)
                # does not see the host's sockets there.
                if ident is not None and dir_identity(top_dir(prefix)) != ident:
                    continue
                return f"Unix socket {address} is under {prefix} (the host's)"
        return None

    def check_inet(self, host: str, port: int, udp: bool) -> Optional[str]:
        ip = normal_ip(host)
        if ip is None:
            import socket
            if host != socket.gethostname():
                return None     # a name resolved elsewhere: not a literal host address
            ip = "0.0.0.0"      # this host, by its name
        if not is_host_address(ip, self.host_addrs):
            return None
        if netns() != self.netns:
            return None     # a namespace of the tests: its addresses are its own
        proto = "udp" if udp else "tcp"
        key = (proto, ip, port)
        known = self._ours.get(key)
        if known:
            # still held by the session's process that held it: the same listener
            try:
                if os.readlink(known[1]) == f"socket:[{known[0]}]":
                    return None
            except OSError:
                pass
            self._ours.pop(key, None)    # (another thread may have dropped it)
        inodes = serving(self._sockets(proto, port), ip)
        if not inodes:
            return None     # nothing there: the connect is refused, nothing reached
        ours = descendants(self.session, ppid_map())
        for inode in inodes:
            held = socket_holder(inode, sorted(ours))
            if held is None:
                owner = socket_holder(inode, [int(p) for p in os.listdir("/proc")
                                              if p.isdigit() and int(p) not in ours])
                who = describe(owner[0]) if owner else "a process not visible here"
                return (f"{proto} port {port} on {ip} is served by {who}, "
                        f"not by a process of this test session")
            self._ours[key] = (inode, held[1])
        return None

    @staticmethod
    def _sockets(proto: str, port: int) -> List[Listener]:
        found: List[Listener] = []
        for table in (proto, proto + "6"):
            try:
                with open(f"/proc/net/{table}") as f:
                    found += parse_sockets(f.read(), port, proto == "tcp")
            except OSError:
                pass
        return found

    def report(self, event: str, address: Address, reason: str) -> None:
        line = violation_line(event, address, reason, self.session)
        if line in self._reported:
            return
        self._reported.add(line)
        fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode(errors="replace") + b"\n")
        finally:
            os.close(fd)


def violation_line(event: str, address: Address, reason: str, session: int) -> str:
    pid = os.getpid()
    test = os.environ.get(ENV_TEST, "")
    where = (f"test {test}" if pid == session else f"started during {test}") if test \
        else "outside any test"
    return f"{describe(pid)}, {where}: {event} {address!r}: {reason}"


def install(facts: Dict[str, Any]) -> Checker:
    checker = Checker(facts)
    sys.addaudithook(checker.on_event)
    return checker


def install_from_env() -> Optional[Checker]:
    """In a child process (sitecustomize): the session's check, if it runs one."""
    text = os.environ.get(ENV)
    return install(json.loads(text)) if text else None


# --------------------------------------------------------------------------
# the session (pytest plugin, registered by conftest.py)


def session_facts(log: str, pid: int,
                  forbidden: Sequence[str] = FORBIDDEN) -> Dict[str, Any]:
    """What every process of the session checks against, taken now."""
    return {"log": log, "pid": pid, "netns": netns(),
            "addrs": host_addresses(),
            "forbidden": [[p, dir_identity(top_dir(p))] for p in forbidden]}


def child_env(env: Dict[str, str], facts: Optional[Dict[str, Any]]) -> Dict[str, str]:
    """`env` with the check passed on (facts) or taken out (None)."""
    env = dict(env)
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
             if p and os.path.realpath(p) != os.path.realpath(SITE_DIR)]
    if facts is None:
        env.pop(ENV, None)
        env.pop(ENV_TEST, None)
    else:
        env[ENV] = json.dumps(facts)
        parts.insert(0, SITE_DIR)
    if parts:
        env["PYTHONPATH"] = os.pathsep.join(parts)
    else:
        env.pop("PYTHONPATH", None)
    return env


def hermetic_env(env: Dict[str, str]) -> Dict[str, str]:
    """For a test helper that builds a child's environment from scratch (or
    sets PYTHONPATH): `env` with the session's check and dead libvirt URI
    added (only the URI when the check is off)."""
    text = os.environ.get(ENV)
    out = child_env(env, json.loads(text)) if text else dict(env)
    for key in (ENV_TEST, "LIBVIRT_DEFAULT_URI", "VIRSH_DEFAULT_CONNECT_URI"):
        if key in os.environ:
            out.setdefault(key, os.environ[key])
    return out


_state: Dict[str, Any] = {}


def pytest_configure(config) -> None:
    import tempfile
    tmp = tempfile.mkdtemp(prefix="mdt-hermetic-")
    _state["tmp"] = tmp
    # A client without an explicit URI (virsh, libvirt-python, mdserverctl's
    # virsh) reaches no libvirtd at all: a socket path nothing listens on.
    dead = f"qemu+unix:///system?socket={tmp}/no-libvirt/libvirt-sock"
    os.environ["LIBVIRT_DEFAULT_URI"] = os.environ["VIRSH_DEFAULT_CONNECT_URI"] = dead
    if os.environ.get(SWITCH) == "0":
        _set_environ(child_env(dict(os.environ), None))
        return
    override = os.environ.get(ENV_FORBIDDEN)
    facts = session_facts(os.path.join(tmp, "violations"), os.getpid(),
                          override.split(os.pathsep) if override else FORBIDDEN)
    _set_environ(child_env(dict(os.environ), facts))
    _state["log"] = facts["log"]
    install(facts)


def _set_environ(env: Dict[str, str]) -> None:
    """os.environ becomes `env` (what every child of the session inherits)."""
    for key in set(os.environ) - set(env):
        del os.environ[key]
    os.environ.update(env)


def pytest_runtest_logstart(nodeid: str, location: Any) -> None:
    os.environ[ENV_TEST] = nodeid


def pytest_runtest_logfinish(nodeid: str, location: Any) -> None:
    os.environ.pop(ENV_TEST, None)


def violations(log: str) -> List[str]:
    try:
        with open(log, errors="replace") as f:
            return [line.rstrip("\n") for line in f if line.strip()]
    except FileNotFoundError:
        return []


def pytest_sessionfinish(session, exitstatus) -> None:
    """Like the HOST_PATHS tripwire: a violation fails the run."""
    import pytest
    found = violations(_state["log"]) if "log" in _state else []
    if found:
        _state["found"] = found
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter) -> None:
    found = _state.pop("found", [])
    if found:
        terminalreporter.section("hermetic check (tests/hermetic.py)", red=True)
        terminalreporter.write_line(f"ERROR: {len(found)} connect(s) to what the tests did "
                                    "not start (this fails the run):", red=True)
        for line in found:
            terminalreporter.write_line("  " + line)


def pytest_unconfigure(config) -> None:
    import shutil
    found = _state.pop("found", [])
    if found:   # no terminal summary was written (say -p no:terminal)
        print("ERROR: hermetic check:\n  " + "\n  ".join(found), file=sys.stderr)
    if "tmp" in _state:
        shutil.rmtree(_state.pop("tmp"), ignore_errors=True)
