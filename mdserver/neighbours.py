"""Which MAC the host's neighbour table holds for a guest address: the check that a sender is who its address claims.

The table is mirrored in memory: read once from /proc/net/arp, then kept
current by the kernel's neighbour notifications (rtnetlink group
RTMGRP_NEIGH). Each check first takes the notifications already queued on
that socket (one non-blocking recv, no request to the kernel), so it sees
every change the kernel made before the request arrived: the ARP that
changed an entry precedes the TCP handshake that carried the request.
"""

import ctypes
import errno
import ipaddress
import logging
import select
import socket
import struct
import threading
import time
from typing import Callable, Dict, Iterator, Optional, Protocol, Tuple

from mdserver import logs
from mdserver.looptick import LoopTick

log = logging.getLogger(__name__)

# /proc/self/net, not /proc/net: the unit's ProcSubset=pid hides the latter.
ARP_TABLE = "/proc/self/net/arp"
ATF_COM = 0x2  # /proc/net/arp flag: the entry holds a resolved hardware address

RTMGRP_NEIGH = 0x4
RTM_NEWNEIGH, RTM_DELNEIGH = 28, 29
NDA_DST, NDA_LLADDR = 1, 2
# Entry states with a usable hardware address (INCOMPLETE and FAILED have none).
NUD_VALID = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80
NLMSG = struct.Struct("=LHHLL")
NDMSG = struct.Struct("=BBHiHBB")
RTATTR = struct.Struct("=HH")
RCVBUF = 1 << 20
# One log line per address and this many seconds (a spoofer may send
# thousands of requests a second).
LOG_EVERY = 10.0


def parse_arp(text: str) -> Dict[str, str]:
    """IPv4 address -> MAC of the complete entries of /proc/net/arp's text."""
    out: Dict[str, str] = {}
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 6:
            continue
        try:
            flags = int(fields[2], 16)
        except ValueError:
            continue
        if flags & ATF_COM:
            out[fields[0]] = fields[3].lower()
    return out


def read_arp(path: str = ARP_TABLE) -> Dict[str, str]:
    with open(path) as f:
        return parse_arp(f.read())


def _align(n: int) -> int:
    return (n + 3) & ~3


def parse_neigh(data: bytes) -> Iterator[Tuple[str, Optional[str]]]:
    """(IPv4 address, MAC or None for "no usable entry") per IPv4 neighbour
    message in one netlink datagram."""
    offset = 0
    while offset + NLMSG.size <= len(data):
        length, kind = NLMSG.unpack_from(data, offset)[:2]
        if length < NLMSG.size or offset + length > len(data):
            return
        body = data[offset + NLMSG.size:offset + length]
        offset += _align(length)
        if kind not in (RTM_NEWNEIGH, RTM_DELNEIGH) or len(body) < NDMSG.size:
            continue
        family, _, _, _, state, _, _ = NDMSG.unpack_from(body)
        if family != socket.AF_INET:
            continue
        attrs: Dict[int, bytes] = {}
        at = NDMSG.size
        while at + RTATTR.size <= len(body):
            alen, atype = RTATTR.unpack_from(body, at)
            if alen < RTATTR.size:
                break
            attrs[atype] = body[at + RTATTR.size:at + alen]
            at += _align(alen)
        dst = attrs.get(NDA_DST)
        if dst is None or len(dst) != 4:
            continue
        ip = socket.inet_ntoa(dst)
        lladdr = attrs.get(NDA_LLADDR)
        if kind == RTM_DELNEIGH or not state & NUD_VALID or not lladdr or len(lladdr) != 6:
            yield ip, None
        else:
            yield ip, ":".join(f"{b:02x}" for b in lladdr)


class Neighbours(Protocol):
    def lookup(self, ip: str) -> Optional[str]: ...


class _PollFd(ctypes.Structure):
    _fields_ = [("fd", ctypes.c_int), ("events", ctypes.c_short), ("revents", ctypes.c_short)]


def _queue_probe(fd: int) -> Callable[[], bool]:
    """A function telling whether `fd` has something to read (or an error),
    asked before every request: poll(2) with a zero timeout, called while
    holding the GIL. Python's own poll and recv release it around the
    system call, and at a hot GET's rate granian's I/O thread takes it
    each time and the loop waits to get it back (measured: the identity
    check cost a quarter of the throughput; a recv raising
    BlockingIOError at every request, a fifth by itself). A zero-timeout
    poll never blocks, so holding the GIL over it costs nothing."""
    try:
        libc_poll = ctypes.PyDLL(None).poll
    except (OSError, AttributeError):  # no libc symbols to call: Python's poll
        probe = select.poll()
        probe.register(fd, select.POLLIN)
        return lambda: bool(probe.poll(0))
    libc_poll.argtypes = [ctypes.POINTER(_PollFd), ctypes.c_ulong, ctypes.c_int]
    libc_poll.restype = ctypes.c_int
    pfd = _PollFd(fd, select.POLLIN, 0)
    ref = ctypes.byref(pfd)
    return lambda: libc_poll(ref, 1, 0) > 0


class KernelNeighbours:
    """This network namespace's IPv4 neighbour table, kept current by notifications."""

    def __init__(self, read: Callable[[], Dict[str, str]] = read_arp,
                 tick: Optional[LoopTick] = None):
        self._read = read
        # The event loop's turn: one look at the socket covers all of it.
        self._tick = tick or LoopTick()
        self._lock = threading.Lock()
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                             socket.NETLINK_ROUTE)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        sock.bind((0, RTMGRP_NEIGH))
        self._sock = sock
        self._pending = _queue_probe(sock.fileno())
        # Subscribed first, then read: a change in between is in the queue.
        self._table = read()

    def lookup(self, ip: str) -> Optional[str]:
        with self._lock:
            if not self._tick.covers():
                self._tick.checking()
                self._drain()
            return self._table.get(ip)

    def _drain(self) -> None:
        while self._pending():
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                # Notifications were dropped (a burst larger than the buffer):
                # start again from the whole table.
                log.warning("neighbour notifications overflowed: table read again")
                self._table = self._read()
                continue
            for ip, mac in parse_neigh(data):
                if mac is None:
                    self._table.pop(ip, None)
                else:
                    self._table[ip] = mac

    def close(self) -> None:
        self._sock.close()


class IdentityCheck:
    """Is the TCP peer at `ip` the instance with `mac`? Only for addresses in
    `network` (the guests' bridge network) and not loopback; others (the
    demo, a host address) are not checked: they have no guest's neighbour entry."""

    def __init__(self, network: ipaddress.IPv4Network, neighbours: Neighbours,
                 clock: Callable[[], float] = time.monotonic):
        self.network = network
        self.neighbours = neighbours
        self._clock = clock
        self._logged: Dict[str, float] = {}
        # ip -> checked(ip): parsing an address costs more than the rest of
        # a hot GET's identity check. Bounded (the addresses are the guests').
        self._checked: Dict[str, bool] = {}

    def checked(self, ip: str) -> bool:
        known = self._checked.get(ip)
        if known is None:
            if len(self._checked) >= 65536:
                self._checked = {}
            known = self._checked[ip] = self._check(ip)
        return known

    def _check(self, ip: str) -> bool:
        try:
            address = ipaddress.IPv4Address(ip)
        except ValueError:
            return False  # IPv6: guests are not served by IPv6 address today
        # Loopback has no neighbours: a guest network on 127.x is a test's or a demo's.
        return address in self.network and not address.is_loopback

    def matches(self, ip: str, mac: str) -> bool:
        """True if the neighbour table maps `ip` to `mac` (or `ip` is not checked)."""
        if not self.checked(ip):
            return True
        seen = self.neighbours.lookup(ip)
        if seen == mac.lower():
            return True
        now = self._clock()
        if now - self._logged.get(ip, -1e9) >= LOG_EVERY:
            if len(self._logged) > 4096:
                self._logged = {k: v for k, v in self._logged.items() if now - v < LOG_EVERY}
            self._logged[ip] = now
            log.warning("request from %s refused: the neighbour table has %s for it, the "
                        "instance with that address has %s (another guest using its "
                        "address?); next line for %s in %.0f s at the earliest", ip,
                        seen or "no entry", mac.lower(), ip, LOG_EVERY,
                        extra=logs.fields(ip=ip, mac=mac.lower(), event="refused-identity"))
        return False


def kernel_identity_check(network: ipaddress.IPv4Network,
                          tick: Optional[LoopTick] = None) -> IdentityCheck:
    return IdentityCheck(network, KernelNeighbours(tick=tick))
