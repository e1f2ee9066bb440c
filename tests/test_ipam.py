"""Address pool: never network, broadcast, gateway or metadata address; wraps; exhausts."""

import ipaddress

import pytest

from mdserver.errors import PoolExhausted
from mdserver.ipam import Pool

pytestmark = pytest.mark.unit


def net(text):
    return ipaddress.IPv4Network(text)


def test_skips_reserved_and_edges():
    pool = Pool(net("10.0.0.0/29"), reserved=["10.0.0.1", "169.254.169.254", "fe80::1"])
    got, cursor, taken = [], pool.first, set()
    while True:
        try:
            ip, cursor = pool.find_free(cursor, taken.__contains__)
        except PoolExhausted:
            break
        got.append(ip)
        taken.add(ip)
    assert got == ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"]


def test_metadata_address_inside_network_is_reserved():
    pool = Pool(net("169.254.169.248/29"), reserved=["169.254.169.249", "169.254.169.254"])
    assert not pool.usable("169.254.169.254") and not pool.usable("169.254.169.249")
    assert not pool.usable("169.254.169.248") and not pool.usable("169.254.169.255")
    assert pool.usable("169.254.169.250")


def test_cursor_wraps_round():
    pool = Pool(net("10.0.0.0/29"), reserved=["10.0.0.1"])
    ip, cursor = pool.find_free(int(ipaddress.IPv4Address("10.0.0.6")), {"10.0.0.6"}.__contains__)
    assert ip == "10.0.0.2"


def test_exhausted():
    pool = Pool(net("10.0.0.0/30"), reserved=["10.0.0.1"])
    with pytest.raises(PoolExhausted, match="10.0.0.0/30"):
        pool.find_free(pool.first, {"10.0.0.2"}.__contains__)


def test_cost_does_not_grow_with_allocations():
    pool = Pool(net("10.122.0.0/16"), reserved=["10.122.0.1"])
    taken, cursor, probes = set(), pool.first, []

    def counting(ip):
        probes[-1] += 1
        return ip in taken
    for _ in range(10_000):
        probes.append(0)
        ip, cursor = pool.find_free(cursor, counting)
        taken.add(ip)
    assert max(probes[-100:]) <= 2  # the 10,000th costs what the 1st did
