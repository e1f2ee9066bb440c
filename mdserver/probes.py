"""The facts `mdserverctl status` judges (mdserver.status), gathered from this host.

The I/O edge of the status check: the admin socket, the port file and the
guest listener, `ip address`, dnsmasq's pid file and /proc, `systemctl
show`, the store. Each probe turns every failure into a fact; none raises.
"""

import http.client
import ipaddress
import json
import os
import subprocess
from typing import Callable, Dict, List, Optional, Set, Tuple

from mdserver import adminclient, dnsmasq
from mdserver.config import Config
from mdserver.errors import MdserverError
from mdserver.status import (AddressFacts, Context, DaemonFacts, DnsmasqFacts, EnrollerFacts,
                             Facts, StoreFacts)
from mdserver.stores import open_replica, replica_path

Run = Callable[..., subprocess.CompletedProcess]
TIMEOUT = 5.0
ENROLL_UNIT = "mdserver-enroll.service"
# A mds.conf written this long after dnsmasq's start counts as newer than it
# (/proc/stat's boot time has whole seconds).
START_SLACK = 2.0


def _run(run: Run, argv: List[str]) -> Tuple[Optional[str], str]:
    """(standard output, "") or (None, why not in one line)."""
    try:
        out = run(argv, capture_output=True, text=True, timeout=10)
    except FileNotFoundError:
        return None, f"{argv[0]} not found"
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{argv[0]}: {e}"
    if out.returncode != 0:
        lines = (out.stderr or "").strip().splitlines()
        return None, lines[0] if lines else f"{argv[0]} exited with {out.returncode}"
    return out.stdout, ""


# -- daemon ------------------------------------------------------------------------

def daemon(cfg: Config) -> Tuple[DaemonFacts, StoreFacts]:
    """The daemon's facts, and the store's status as the daemon gives it
    (GET /store: the request that shows it answers)."""
    md = cfg.mdserver
    path = md.admin_socket
    try:
        status, body = adminclient.request(path, "GET", "/store", timeout=TIMEOUT)
    except MdserverError as e:
        exists = os.path.exists(path)
        denied = exists and not os.access(path, os.R_OK | os.W_OK)
        reason = ("permission denied" if denied else str(e) if exists
                  else f"not running (no admin socket {path})")
        return DaemonFacts(answers=False, error=reason, denied=denied), StoreFacts()
    if status == 200:
        store = StoreFacts(status=json.loads(body), source="daemon")
    else:
        store = StoreFacts(error=f"GET /store: {body.decode(errors='replace').strip()}")
    port = _reported_port(adminclient.port_file(path))
    listener = None if port is None else _listener_error(md.listen_address, port)
    return DaemonFacts(answers=True, port=port, listener_error=listener), store


def _reported_port(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _listener_error(address: str, port: int) -> Optional[str]:
    """None if `GET /` (the EC2 version listing, for anyone) answers 200."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(address, address)
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        resp.read()
        return None if resp.status == 200 else f"GET / answered {resp.status}"
    except (OSError, http.client.HTTPException) as e:
        return str(e) or type(e).__name__
    finally:
        conn.close()


# -- address -------------------------------------------------------------------------

def address(cfg: Config, run: Run = subprocess.run) -> AddressFacts:
    """Where [mdserver] listen_address is (`ip -j address show`)."""
    out, why = _run(run, ["ip", "-j", "address", "show"])
    if out is None:
        return AddressFacts(error=why)
    try:
        links = json.loads(out)
        wanted = ipaddress.ip_address(cfg.mdserver.listen_address)
        holders = [link["ifname"] for link in links
                   for a in link.get("addr_info", ())
                   if ipaddress.ip_address(a["local"]) == wanted]
        names = {link["ifname"] for link in links}
    except (ValueError, KeyError, TypeError) as e:
        return AddressFacts(error=f"ip -j address show: unexpected output ({e})")
    bridge = cfg.dnsmasq.interface
    return AddressFacts(interface_exists=bridge in names, on_interface=bridge in holders,
                        elsewhere=tuple(h for h in holders if h != bridge))


# -- dnsmasq ---------------------------------------------------------------------------

def dnsmasq_facts(cfg: Config, proc: str = "/proc") -> DnsmasqFacts:
    base = cfg.dnsmasq.base_dir
    pid_path = os.path.join(base, dnsmasq.PID_NAME)
    conf_path = os.path.join(base, dnsmasq.CONF_NAME)
    pid = _pid(pid_path)
    command: Optional[str] = None
    conf_arg: Optional[str] = None
    started: Optional[float] = None
    sockets: Optional[Tuple[Tuple[str, int], ...]] = None
    if pid is not None:
        comm = _read(os.path.join(proc, str(pid), "comm"))
        command = comm.strip() if comm is not None else None
        if command == "dnsmasq":
            conf_arg = _conf_arg(os.path.join(proc, str(pid)))
            started = _start_time(proc, pid)
            sockets = _sockets(os.path.join(proc, str(pid)))
    return DnsmasqFacts(pid=pid, pid_file=pid_path, command=command,
                        conf_arg=os.path.normpath(conf_arg) if conf_arg else None,
                        conf=_conf_state(cfg, conf_path, started), sockets=sockets,
                        hosts=_count(os.path.join(base, dnsmasq.DHCP_DIR)))


def _read(path: str) -> Optional[str]:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _pid(path: str) -> Optional[int]:
    text = _read(path)
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:
        return None


def _conf_arg(proc_pid: str) -> Optional[str]:
    try:
        with open(os.path.join(proc_pid, "cmdline"), "rb") as f:
            args = f.read().decode(errors="replace").split("\0")
    except OSError:
        return None
    for i, arg in enumerate(args):
        for flag in ("--conf-file=", "-C"):
            if arg.startswith(flag) and len(arg) > len(flag):
                return arg[len(flag):]
        if arg in ("--conf-file", "-C") and i + 1 < len(args):
            return args[i + 1]
    return None


def _start_time(proc: str, pid: int) -> Optional[float]:
    """When `pid` started, in epoch seconds (/proc/<pid>/stat and /proc/stat's btime)."""
    stat, boot = _read(os.path.join(proc, str(pid), "stat")), _read(os.path.join(proc, "stat"))
    if stat is None or boot is None:
        return None
    try:
        ticks = int(stat[stat.rindex(")") + 2:].split()[19])  # field 22, starttime
        btime = next(int(line.split()[1]) for line in boot.splitlines()
                     if line.startswith("btime "))
    except (ValueError, IndexError, StopIteration):
        return None
    return btime + ticks / os.sysconf("SC_CLK_TCK")


def _conf_state(cfg: Config, path: str, started: Optional[float]) -> str:
    """missing | differs (not what the configuration renders: it changed
    since mdserver wrote the file) | newer (written after dnsmasq started)
    | current. Comment lines are left out of the comparison (the first names
    the configuration file as the daemon was given it)."""
    text = _read(path)
    if text is None:
        return "missing"

    def body(t: str) -> List[str]:
        return [line for line in t.splitlines() if not line.startswith("#")]
    if body(text) != body(dnsmasq.render_conf(cfg)):
        return "differs"
    try:
        mtime = os.stat(path).st_mtime
    except OSError:
        return "missing"
    if started is not None and mtime > started + START_SLACK:
        return "newer"
    return "current"


def _sockets(proc_pid: str) -> Optional[Tuple[Tuple[str, int], ...]]:
    """The (udp|tcp, port) of the UDP sockets and listening TCP sockets the
    process holds; None when its descriptors cannot be seen (another user's)."""
    inodes: Set[str] = set()
    try:
        for fd in os.listdir(os.path.join(proc_pid, "fd")):
            try:
                target = os.readlink(os.path.join(proc_pid, "fd", fd))
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return None
    found: Set[Tuple[str, int]] = set()
    for table in ("udp", "udp6", "tcp", "tcp6"):
        text = _read(os.path.join(proc_pid, "net", table))
        for line in (text or "").splitlines()[1:]:
            fields = line.split()
            if len(fields) < 10 or fields[9] not in inodes:
                continue
            if table.startswith("tcp") and fields[3] != "0A":  # LISTEN
                continue
            try:
                found.add((table[:3], int(fields[1].rsplit(":", 1)[1], 16)))
            except (ValueError, IndexError):
                continue
    return tuple(sorted(found))


def _count(directory: str) -> int:
    try:
        return sum(1 for name in os.listdir(directory) if not name.startswith("."))
    except OSError:
        return 0


# -- enroller --------------------------------------------------------------------------

def enroller(run: Run = subprocess.run) -> EnrollerFacts:
    """mdserver-enroll's unit as systemd sees it; `error` when systemd cannot
    be asked (no systemctl, not booted with systemd)."""
    out, why = _run(run, ["systemctl", "show", "-p",
                          "LoadState,UnitFileState,ActiveState,StatusText", ENROLL_UNIT])
    if out is None:
        return EnrollerFacts(error=why)
    props: Dict[str, str] = {}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            props[key] = value
    return EnrollerFacts(load_state=props.get("LoadState", ""),
                         unit_file_state=props.get("UnitFileState", ""),
                         active_state=props.get("ActiveState", ""),
                         status_text=props.get("StatusText", ""))


# -- store --------------------------------------------------------------------------------

def store_from_file(cfg: Config) -> StoreFacts:
    """The store's status from its file, read-only (the daemon is down), as
    `mdserverctl store status` shows it then."""
    try:
        replica = open_replica(cfg)
    except (MdserverError, OSError) as e:
        return StoreFacts(error=f"{replica_path(cfg)}: {e}", source="file")
    try:
        status = dict(replica.status(), backend=cfg.store.backend)
    finally:
        replica.close()
    if cfg.store.backend == "etcd":
        status["endpoints"] = list(cfg.store.endpoints)
    return StoreFacts(status=status, source="file")


# -- all of them ----------------------------------------------------------------------------

def gather(cfg: Config, run: Run = subprocess.run, proc: str = "/proc") -> Facts:
    daemon_facts, store_facts = daemon(cfg)
    if not daemon_facts.answers:
        store_facts = store_from_file(cfg)
    enroller_facts = enroller(run)
    dn = cfg.dnsmasq
    context = Context(
        config=cfg.path, admin_socket=cfg.mdserver.admin_socket,
        listen_address=cfg.mdserver.listen_address, interface=dn.interface,
        net_name=dn.net_name, gateway=dn.gateway,
        dnsmasq_conf=os.path.normpath(os.path.join(dn.base_dir, dnsmasq.CONF_NAME)),
        libvirt_uri=cfg.libvirt.uri, systemd=not enroller_facts.error)
    return Facts(context, daemon_facts, address(cfg, run), dnsmasq_facts(cfg, proc),
                 enroller_facts, store_facts)
