"""The suite's network: a host namespace with the metadata bridge, guests with their own address and MAC.

mdserver answers by source address and checks that the host's neighbour
entry for it holds the registered MAC, so every load source is a real
registered guest. The load guest (index 0) has a namespace of its own (wrk
runs there unchanged); the storm's guests share namespaces in groups, each
guest on its own veth with its own MAC and a /32 address, policy routing
(`ip rule from ADDR`) sending its traffic out of its own veth, and
arp_ignore=1 / arp_announce=2 so that only that veth answers ARP for the
address: the host's neighbour table then maps each address to its own MAC.

Every name starts with `mdb-<pid>-` (namespaces) or `mdb` (links); close()
deletes all of it, and a later run deletes what a killed run left (its pid
no longer alive).
"""

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

PREFIX = "mdb"
GATEWAY = "10.122.0.1"
NETWORK = "10.122.0.0/16"
METADATA = "169.254.169.254"
NGINX_ADDRESS = "169.254.169.250"   # the nginx reference, port 80
BARE_ADDRESS = "169.254.169.251"    # the bare RSGI callable reference, port 80
BRIDGE_MAC = "02:6d:64:62:00:01"    # fixed: a bridge would otherwise take its lowest port's
GROUP_SIZE = 50                     # storm guests per namespace
RULE_TABLE_BASE = 1000


@dataclass(frozen=True)
class Identity:
    """A guest as the database knows it: slot k of the instances."""
    index: int
    name: str
    uuid: str
    mac: str
    ip: str

    @property
    def instance_id(self) -> str:
        # mdserver's EC2 instance-id (models.Instance.instance_id)
        return "i-" + self.uuid.replace("-", "")[:17]


def identity(k: int) -> Identity:
    """Slot k (0-based) of the database: address 10.122.x.y from .0.2 on, a
    unique MAC, a UUID that does not start with `ec2` (no AWS route)."""
    n = k + 2  # .0.0 is the network, .0.1 the gateway
    return Identity(index=k, name=f"bench{k}", uuid=f"be{n:06x}-aaaa-4bbb-8ccc-{n:012x}",
                    mac=f"52:54:00:{n >> 16 & 0xff:02x}:{n >> 8 & 0xff:02x}:{n & 0xff:02x}",
                    ip=f"10.122.{n >> 8 & 0xff}.{n & 0xff}")


def ip(*args: str, netns: Optional[str] = None) -> str:
    cmd = ["ip"] + (["-n", netns] if netns else []) + list(args)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return r.stdout


def ip_batch(lines: Sequence[str], netns: Optional[str] = None) -> None:
    """Many `ip` commands in one process (500 guests are ~4,000 commands)."""
    if not lines:
        return
    with tempfile.NamedTemporaryFile("w", suffix=".ip", delete=False) as f:
        f.write("\n".join(lines) + "\n")
    try:
        ip("-batch", f.name, netns=netns)
    finally:
        os.unlink(f.name)


def sysctl(netns: str, **values: str) -> None:
    args = [f"{k.replace('__', '.')}={v}" for k, v in values.items()]
    subprocess.run(["ip", "netns", "exec", netns, "sysctl", "-q", "-w"] + args,
                   check=True, capture_output=True)


def exec_in(ns: str, cmd: List[str]) -> List[str]:
    return ["ip", "netns", "exec", ns] + cmd


def remove_stale() -> List[str]:
    """Namespaces of earlier runs whose process is gone (a run killed by
    SIGKILL cannot clean up): deleted, and returned."""
    gone = []
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(rf"{PREFIX}-(\d+)-[0-9a-f]+-\w+", name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            gone.append(name)
    return gone


class Lab:
    """The host namespace (bridge with 10.122.0.1/16, the metadata address and
    the references' addresses), the load guest, and `storm` grouped guests
    (slots 1..storm)."""

    def __init__(self, storm: int):
        self.tag = os.urandom(3).hex()
        self.stem = f"{PREFIX}-{os.getpid()}-{self.tag}"
        self.namespaces: List[str] = []
        self.host = self._add_ns("h")
        self.bridge = f"{PREFIX}br{self.tag}"
        self.load: Identity = identity(0)
        self.load_ns = ""
        self.storm: List[Identity] = [identity(k) for k in range(1, storm + 1)]
        self.storm_ns: Dict[int, str] = {}  # guest index -> its group's namespace
        try:
            self._host()
            self._load_guest()
            self._storm_guests()
        except BaseException:
            self.close()
            raise

    def _add_ns(self, suffix: str) -> str:
        name = f"{self.stem}-{suffix}"
        ip("netns", "add", name)
        self.namespaces.append(name)
        return name

    def _host(self) -> None:
        # No IPv6 on the hundreds of ports: their router solicitations and
        # DAD would be noise on the bridge during the storm.
        sysctl(self.host, net__ipv6__conf__all__disable_ipv6="1",
               net__ipv6__conf__default__disable_ipv6="1")
        ip_batch([
            "link set lo up",
            f"link add {self.bridge} address {BRIDGE_MAC} type bridge",
            f"addr add {GATEWAY}/16 dev {self.bridge}",
            f"addr add {METADATA}/32 dev {self.bridge}",
            f"addr add {NGINX_ADDRESS}/32 dev {self.bridge}",
            f"addr add {BARE_ADDRESS}/32 dev {self.bridge}",
            f"link set {self.bridge} up",
        ], netns=self.host)

    def _load_guest(self) -> None:
        g = self.load
        ns = self.load_ns = self._add_ns("g0")
        outer = f"{PREFIX}l{self.tag}"
        ip("link", "add", outer, "netns", self.host, "type", "veth", "peer", "name", "eth0",
           "netns", ns)
        ip("link", "set", outer, "master", self.bridge, "up", netns=self.host)
        ip_batch(["link set lo up", f"link set eth0 address {g.mac}", "link set eth0 up",
                  f"addr add {g.ip}/16 dev eth0", f"route add default via {GATEWAY}"], netns=ns)

    def _storm_guests(self) -> None:
        root, host = [], []
        per_group: Dict[str, List[str]] = {}
        for pos, g in enumerate(self.storm):
            group = pos // GROUP_SIZE
            if pos % GROUP_SIZE == 0:
                ns = self._add_ns(f"s{group}")
                # before the links exist: `default` is what new links get
                sysctl(ns, net__ipv4__conf__all__arp_ignore="1",
                       net__ipv4__conf__all__arp_announce="2",
                       net__ipv4__conf__all__rp_filter="0",
                       net__ipv4__conf__default__rp_filter="0",
                       net__ipv6__conf__all__disable_ipv6="1",
                       net__ipv6__conf__default__disable_ipv6="1")
                per_group[ns] = ["link set lo up"]
            ns = self.namespaces[-1]
            self.storm_ns[g.index] = ns
            outer, inner, table = f"{PREFIX}o{g.index}{self.tag}", f"e{g.index}", \
                RULE_TABLE_BASE + g.index
            root.append(f"link add {outer} netns {self.host} type veth peer name {inner} "
                        f"netns {ns}")
            host.append(f"link set {outer} master {self.bridge} up")
            per_group[ns] += [
                f"link set {inner} address {g.mac}", f"link set {inner} up",
                f"addr add {g.ip}/32 dev {inner}",
                f"route add {NETWORK} dev {inner} src {g.ip} table {table}",
                f"route add default via {GATEWAY} dev {inner} onlink table {table}",
                f"rule add from {g.ip} table {table}",
            ]
        ip_batch(root)
        ip_batch(host, netns=self.host)
        for ns, lines in per_group.items():
            ip_batch(lines, netns=ns)

    def groups(self, guests: Sequence[Identity]) -> Dict[str, List[Identity]]:
        """`guests` by the namespace they live in."""
        out: Dict[str, List[Identity]] = {}
        for g in guests:
            out.setdefault(self.storm_ns[g.index], []).append(g)
        return out

    def close(self) -> None:
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.namespaces.clear()
