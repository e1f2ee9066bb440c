"""The identity check's pure parts: the neighbour tables' formats, the rate-limited refusal."""

import ipaddress
import logging
import socket
import struct

import pytest

from mdserver.neighbours import (LOG_EVERY, NDMSG, NLMSG, RTATTR, RTM_DELNEIGH, RTM_NEWNEIGH,
                                 IdentityCheck, parse_arp, parse_neigh)

pytestmark = pytest.mark.unit

ARP = """IP address       HW type     Flags       HW address            Mask     Device
10.122.0.5       0x1         0x2         52:54:00:AA:00:01     *        br-mds
10.122.0.6       0x1         0x0         00:00:00:00:00:00     *        br-mds
10.122.0.7       0x1         0x6         52:54:00:aa:00:03     *        br-mds
garbage
"""
NET = ipaddress.IPv4Network("10.122.0.0/16")


def test_parse_arp_keeps_complete_entries_lower_case():
    assert parse_arp(ARP) == {"10.122.0.5": "52:54:00:aa:00:01",
                              "10.122.0.7": "52:54:00:aa:00:03"}


def neigh(kind, ip, mac=None, state=0x04, family=socket.AF_INET):
    """One rtnetlink neighbour message as the kernel lays it out."""
    attrs = b""
    for atype, value in ((1, socket.inet_aton(ip)),
                         (2, bytes.fromhex(mac.replace(":", "")) if mac else None)):
        if value is not None:
            a = RTATTR.pack(RTATTR.size + len(value), atype) + value
            attrs += a + b"\0" * (-len(a) % 4)
    body = NDMSG.pack(family, 0, 0, 3, state, 0, 1) + attrs
    return NLMSG.pack(NLMSG.size + len(body), kind, 0, 0, 0) + body


def test_parse_neighbour_notifications():
    data = (neigh(RTM_NEWNEIGH, "10.122.0.5", "52:54:00:AA:00:01")
            + neigh(RTM_NEWNEIGH, "10.122.0.6", None, state=0x01)        # incomplete
            + neigh(RTM_NEWNEIGH, "10.122.0.7", "52:54:00:aa:00:07", state=0x20)  # failed
            + neigh(RTM_DELNEIGH, "10.122.0.8", "52:54:00:aa:00:08")
            + neigh(RTM_NEWNEIGH, "10.122.0.9", "52:54:00:aa:00:09", family=socket.AF_INET6)
            + struct.pack("=LHHLL", 16, 3, 0, 0, 0))                    # NLMSG_DONE
    assert list(parse_neigh(data)) == [
        ("10.122.0.5", "52:54:00:aa:00:01"), ("10.122.0.6", None), ("10.122.0.7", None),
        ("10.122.0.8", None)]
    assert list(parse_neigh(data[:-20])) == list(parse_neigh(data))[:4]  # truncated: stops


class Table:
    def __init__(self, entries):
        self.entries = entries

    def lookup(self, ip):
        return self.entries.get(ip)


def test_match_mismatch_missing_and_unchecked_addresses(caplog):
    check = IdentityCheck(NET, Table(parse_arp(ARP)))
    assert check.matches("10.122.0.5", "52:54:00:AA:00:01")
    assert not check.matches("10.122.0.5", "52:54:00:aa:00:99")  # another MAC holds it
    assert not check.matches("10.122.0.6", "52:54:00:aa:00:02")  # no usable entry
    assert check.matches("127.0.0.1", "52:54:00:de:30:01")       # loopback/demo: not checked
    assert check.matches("::1", "52:54:00:de:30:01")
    on_loopback = IdentityCheck(ipaddress.IPv4Network("127.77.0.0/16"), Table({}))
    assert on_loopback.matches("127.77.0.2", "52:54:00:00:00:01")  # no neighbours there
    refusals = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(refusals) == 2 and "10.122.0.5" in refusals[0].getMessage()


def test_refusals_are_logged_once_per_address_and_interval(caplog):
    now = [0.0]
    check = IdentityCheck(NET, Table(parse_arp(ARP)), clock=lambda: now[0])
    for _ in range(1000):  # a spoofer's flood
        assert not check.matches("10.122.0.7", "52:54:00:aa:00:01")
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    now[0] += LOG_EVERY
    assert not check.matches("10.122.0.7", "52:54:00:aa:00:01")
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2
