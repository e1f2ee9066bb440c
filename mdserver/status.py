"""`mdserverctl status`: facts about the host in, one verdict per check out (pure).

The facts are gathered by mdserver.probes (sockets, /proc, ip, systemctl);
this module only judges them, so every verdict and every fix command is
tested without a host. A verdict is `ok`, `problem` (the exit status is 1,
and a fix command comes with it) or `unknown` (could not be told: no
failure).
"""

import json
from dataclasses import asdict, dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

OK, PROBLEM, UNKNOWN = "ok", "problem", "unknown"
CHECKS = ("daemon", "address", "dnsmasq", "enroller", "store")


@dataclass(frozen=True)
class Context:
    """What the checks know from the configuration and the host."""
    config: str                # the configuration file's path
    admin_socket: str
    listen_address: str        # [mdserver] listen_address
    interface: str             # [dnsmasq] interface: the bridge
    net_name: str              # [dnsmasq] net_name: the libvirt network
    gateway: str               # [dnsmasq] gateway
    dnsmasq_conf: str          # <base_dir>/mds.conf
    libvirt_uri: str
    systemd: bool              # systemctl answered: fixes are systemctl commands


@dataclass(frozen=True)
class DaemonFacts:
    answers: bool                       # the admin socket answered a request
    error: str = ""                     # why not, a sentence: "not running (...)"
    denied: bool = False                # ... because of the socket's permissions
    port: Optional[int] = None          # the port file's (written once guests are served)
    listener_error: Optional[str] = None  # GET / on the guest listener: None = 200


@dataclass(frozen=True)
class AddressFacts:
    error: str = ""                     # the addresses could not be listed
    interface_exists: bool = False
    on_interface: bool = False
    elsewhere: Tuple[str, ...] = ()     # other interfaces holding the address


@dataclass(frozen=True)
class DnsmasqFacts:
    pid: Optional[int] = None           # from its pid file
    pid_file: str = ""
    command: Optional[str] = None       # /proc/<pid>/comm; None: no such process
    conf_arg: Optional[str] = None      # its --conf-file (None: none given)
    conf: str = "missing"               # current | missing | differs | newer
    sockets: Optional[Tuple[Tuple[str, int], ...]] = None  # (udp|tcp, port); None: not visible
    hosts: int = 0                      # files in dhcp-hosts/


@dataclass(frozen=True)
class EnrollerFacts:
    error: str = ""                     # systemctl could not be asked (no systemd)
    load_state: str = ""                # LoadState (not-found: not installed)
    unit_file_state: str = ""           # UnitFileState (enabled, disabled ...)
    active_state: str = ""              # ActiveState
    status_text: str = ""               # StatusText: sd_notify STATUS= of mdserver-enroll


@dataclass(frozen=True)
class StoreFacts:
    status: Optional[Mapping] = None    # `GET /store` (or the file's, daemon down)
    source: str = "daemon"              # daemon | file
    error: str = ""


@dataclass(frozen=True)
class Facts:
    context: Context
    daemon: DaemonFacts
    address: AddressFacts
    dnsmasq: DnsmasqFacts
    enroller: EnrollerFacts
    store: StoreFacts


@dataclass(frozen=True)
class Verdict:
    check: str
    verdict: str          # ok | problem | unknown
    detail: str
    fix: Optional[str] = None


# -- the fix commands -----------------------------------------------------------

def _start_daemon(c: Context) -> str:
    if c.systemd:
        return "systemctl restart mdserver (its log: journalctl -u mdserver -e)"
    return f"mdserver {c.config}"


def _start_dnsmasq(c: Context) -> str:
    if c.systemd:
        return "systemctl restart mdserver-dnsmasq"
    return f"dnsmasq --conf-file={c.dnsmasq_conf}"


def _start_network(c: Context) -> str:
    return f"virsh net-start {c.net_name}"


def _add_address(c: Context) -> str:
    return f"ip address add {c.listen_address}/32 dev {c.interface}"


def _unspecified(address: str) -> bool:
    return address in ("0.0.0.0", "::")


# -- the checks -------------------------------------------------------------------

def check_daemon(c: Context, d: DaemonFacts, a: AddressFacts) -> Verdict:
    if not d.answers:
        if d.denied:
            return Verdict("daemon", PROBLEM, f"cannot use {c.admin_socket}: {d.error}",
                           "run as root or as a member of group mdserver "
                           "(sudo mdserverctl status)")
        return Verdict("daemon", PROBLEM, d.error, _start_daemon(c))
    where = f"{c.listen_address}:{d.port}"
    if d.port is None:
        if _address_missing(c, a):
            return Verdict("daemon", PROBLEM,
                           f"up (admin socket answers), not serving guests: waiting for "
                           f"{c.listen_address} (see address)", _address_fix(c, a))
        return Verdict("daemon", PROBLEM, "up (admin socket answers), not serving guests yet",
                       _start_daemon(c))
    if d.listener_error is not None:
        return Verdict("daemon", PROBLEM, f"up, but its guest listener {where} does not "
                                          f"answer: {d.listener_error}", _start_daemon(c))
    return Verdict("daemon", OK, f"up and ready: admin socket {c.admin_socket}, guests "
                                 f"served on {where}")


def _address_missing(c: Context, a: AddressFacts) -> bool:
    return not _unspecified(c.listen_address) and not a.error and not a.on_interface


def _address_fix(c: Context, a: AddressFacts) -> str:
    if not a.interface_exists:
        return _start_network(c)
    if a.elsewhere:
        return (f"ip address del {c.listen_address}/32 dev {a.elsewhere[0]} && "
                + _add_address(c))
    return _add_address(c)


def check_address(c: Context, a: AddressFacts) -> Verdict:
    if _unspecified(c.listen_address):
        return Verdict("address", OK, f"listening on every address ({c.listen_address})")
    if a.error:
        return Verdict("address", UNKNOWN, f"cannot list the addresses: {a.error}")
    if a.on_interface:
        return Verdict("address", OK, f"{c.listen_address} on {c.interface}")
    if not a.interface_exists:
        return Verdict("address", PROBLEM, f"bridge {c.interface} does not exist (libvirt "
                                           f"network {c.net_name} not started?)",
                       _address_fix(c, a))
    if a.elsewhere:
        return Verdict("address", PROBLEM, f"{c.listen_address} is on "
                                           f"{', '.join(a.elsewhere)}, not on {c.interface}",
                       _address_fix(c, a))
    return Verdict("address", PROBLEM,
                   f"{c.listen_address} is not on {c.interface} (for good: <ip address="
                   f"'{c.listen_address}' prefix='32'/> in network {c.net_name}, "
                   f"virsh net-edit {c.net_name})", _address_fix(c, a))


def check_dnsmasq(c: Context, n: DnsmasqFacts, a: AddressFacts) -> Verdict:
    if n.conf == "missing":
        return Verdict("dnsmasq", PROBLEM, f"{c.dnsmasq_conf} missing: mdserver writes it "
                                           "when it starts", _start_daemon(c))
    if n.pid is None:
        return Verdict("dnsmasq", PROBLEM, f"not running (no pid in {n.pid_file})",
                       _start_dnsmasq(c))
    if n.command is None:
        return Verdict("dnsmasq", PROBLEM, f"not running (pid {n.pid} of {n.pid_file} is "
                                           "gone)", _start_dnsmasq(c))
    if n.command != "dnsmasq":
        return Verdict("dnsmasq", PROBLEM, f"not running (pid {n.pid} of {n.pid_file} is "
                                           f"{n.command!r} now)", _start_dnsmasq(c))
    if n.conf_arg != c.dnsmasq_conf:
        given = n.conf_arg or "no --conf-file"
        return Verdict("dnsmasq", PROBLEM, f"pid {n.pid} runs with {given}, not "
                                           f"{c.dnsmasq_conf}", _start_dnsmasq(c))
    if n.conf == "differs":
        # mdserver writes mds.conf when it starts: the configuration changed since
        return Verdict("dnsmasq", PROBLEM, f"{c.dnsmasq_conf} is not what {c.config} "
                                           "gives now (changed since mdserver started)",
                       "systemctl restart mdserver" if c.systemd else
                       f"restart mdserver, then dnsmasq --conf-file={c.dnsmasq_conf}")
    if n.conf == "newer":
        # dnsmasq reads its main file only when it starts (SIGHUP does not)
        return Verdict("dnsmasq", PROBLEM, f"pid {n.pid} started before {c.dnsmasq_conf} "
                                           "last changed: it serves the old settings",
                       _start_dnsmasq(c))
    serving = f"pid {n.pid}, {c.dnsmasq_conf}, {n.hosts} DHCP host(s)"
    if n.sockets is None:
        return Verdict("dnsmasq", OK, f"{serving} (its sockets are not visible to this "
                                      "user: not checked)")
    missing = [what for what, port in (("DHCP", 67), ("DNS", 53))
               if ("udp", port) not in n.sockets]
    if missing:
        # bind-dynamic: DNS on the gateway only once the bridge has it
        no_bridge = missing == ["DNS"] and not a.error and not a.interface_exists
        why = f"bridge {c.interface} missing" if no_bridge else "see its log"
        return Verdict("dnsmasq", PROBLEM, f"pid {n.pid} does not serve "
                                           f"{' and '.join(missing)} ({why})",
                       _start_network(c) if no_bridge else _start_dnsmasq(c))
    return Verdict("dnsmasq", OK, f"serving DHCP and DNS: {serving}")


def check_enroller(c: Context, e: EnrollerFacts) -> Verdict:
    if not c.systemd or e.error:
        return Verdict("enroller", UNKNOWN, "cannot ask systemd for mdserver-enroll"
                       + (f" ({e.error})" if e.error else ""))
    if e.load_state == "not-found":
        return Verdict("enroller", OK, "not in use (mdserver-enroll.service not installed): "
                                       "the libvirt hook registers domains as they start")
    state, text = e.active_state, e.status_text
    if state == "inactive" and e.unit_file_state != "enabled":
        return Verdict("enroller", OK, "not in use (mdserver-enroll.service "
                                       f"{e.unit_file_state or 'not enabled'}): the libvirt "
                                       "hook registers domains as they start")
    if state == "failed":
        return Verdict("enroller", PROBLEM, "mdserver-enroll failed",
                       "systemctl restart mdserver-enroll "
                       "(its log: journalctl -u mdserver-enroll -e)")
    if state == "inactive":
        return Verdict("enroller", PROBLEM, "mdserver-enroll is enabled but not running",
                       "systemctl start mdserver-enroll")
    if text.startswith("connected to"):
        return Verdict("enroller", OK, text)
    if text.startswith("waiting for libvirt"):
        return Verdict("enroller", PROBLEM, f"{text} at {c.libvirt_uri}",
                       "systemctl start libvirtd (virtqemud with libvirt's modular daemons)")
    return Verdict("enroller", UNKNOWN, f"mdserver-enroll {state or '?'}"
                   + (f": {text}" if text else ""))


def _records(status: Mapping) -> int:
    per_host = status.get("records")
    if isinstance(per_host, Mapping):
        return sum(int(v) for v in per_host.values())
    return 0


def check_store(c: Context, s: StoreFacts) -> Verdict:
    if s.status is None:
        return Verdict("store", PROBLEM, f"cannot be read: {s.error}", _start_daemon(c))
    st = s.status
    backend = st.get("backend", "?")
    figures = f"revision {st.get('revision', '?')}, {_records(st)} record(s)"
    if backend == "local":
        origin = " (read from the file: the daemon is down)" if s.source == "file" else ""
        return Verdict("store", OK, f"local {st.get('path', '?')}, {figures}{origin}")
    endpoints = ",".join(str(e) for e in st.get("endpoints", ()) or ()) or "?"
    if s.source == "file":
        return Verdict("store", UNKNOWN, f"etcd {endpoints}: not asked (the daemon is down; "
                                         f"its cache: {figures})")
    if st.get("locked"):
        return Verdict("store", PROBLEM, f"etcd {endpoints}: {st['locked']}",
                       f"stop the other mdserver, or give this one another [store] host "
                       f"in {c.config}")
    if not st.get("connected", False):
        return Verdict("store", PROBLEM,
                       f"etcd {endpoints} does not answer (for {st.get('cache_age', '?')} s): "
                       "guests are served from the cache, registrations wait",
                       f"etcdctl --endpoints={endpoints} endpoint health (then start the "
                       "members that are down)")
    return Verdict("store", OK, f"etcd {endpoints}, connected, {figures}")


def judge(f: Facts) -> List[Verdict]:
    """One verdict per check, in CHECKS order."""
    c = f.context
    return [check_daemon(c, f.daemon, f.address), check_address(c, f.address),
            check_dnsmasq(c, f.dnsmasq, f.address), check_enroller(c, f.enroller),
            check_store(c, f.store)]


def healthy(verdicts: Sequence[Verdict]) -> bool:
    return all(v.verdict != PROBLEM for v in verdicts)


def render_text(verdicts: Sequence[Verdict]) -> str:
    """One line per check (`verdict  check  detail`), each fix on the line after it."""
    width = max(len(name) for name in CHECKS)
    lines = []
    for v in verdicts:
        lines.append(f"{v.verdict:<7}  {v.check:<{width}}  {v.detail}")
        if v.fix:
            lines.append(f"{'':<7}  {'':<{width}}  fix: {v.fix}")
    return "\n".join(lines) + "\n"


def render_json(verdicts: Sequence[Verdict]) -> str:
    """`{"ok": bool, "checks": [{check, verdict, detail, fix}]}`: fix null when none."""
    body: Dict[str, object] = {"ok": healthy(verdicts),
                               "checks": [asdict(v) for v in verdicts]}
    return json.dumps(body, indent=1) + "\n"
