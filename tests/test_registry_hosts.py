"""Several hosts on one registry: ownership, DHCP only for this host, conflicts, outages.

The shared store here is a FAKE for speed (two hosts' views of one local
Store); tests/test_multihost.py runs the same rules on real etcd.
"""

import pytest

from helpers import domain_xml, write_config
from mdserver import config
from mdserver.dnsmasq import DnsmasqFiles
from mdserver.errors import Conflict, StoreConflict, StoreUnavailable
from mdserver.registry import Registry
from mdserver.store import Store

pytestmark = pytest.mark.unit

U1, M1 = "ec200001-aaaa-4bbb-8ccc-000000000001", "52:54:00:00:00:01"
U2, M2 = "ec200002-aaaa-4bbb-8ccc-000000000002", "52:54:00:00:00:02"


class HostView:
    """FAKE shared store: host `host`'s view of one Store, with failures on demand."""

    def __init__(self, store, host):
        self._store, self.host = store, host
        self.down = False
        self.conflicts = 0  # the next N commits fail as if another host won

    def __getattr__(self, name):
        return getattr(self._store, name)

    def __iter__(self):
        return iter(self._store)

    def __len__(self):
        return len(self._store)

    def commit(self, *args, **kwargs):
        if self.down:
            raise StoreUnavailable("etcd unreachable: nothing written")
        if self.conflicts:
            self.conflicts -= 1
            raise StoreConflict("address claimed meanwhile")
        return self._store.commit(*args, **kwargs)


class Fleet:
    def __init__(self, tmp_path):
        self.store = Store(str(tmp_path / "shared.json"))
        self.hosts = {}
        for name in ("a", "b"):
            d = tmp_path / name
            d.mkdir()
            cfg = config.load(write_config(d, "[store]\nbackend = etcd\n"
                                              "endpoints = http://127.0.0.1:1\n"
                                              f"host = {name}\n[dnsmasq]\n"))
            view = HostView(self.store, name)
            files = DnsmasqFiles(cfg, kill=lambda pid, sig: None, host=name)
            registry = Registry(cfg, view, [files])
            registry.sync()
            self.hosts[name] = (view, files, registry)

    def register(self, host, name, uuid, mac):
        return self.hosts[host][2].register(domain_xml(name, uuid, mac).encode())

    def has_dhcp(self, host, uuid):
        import os
        return os.path.exists(self.hosts[host][1].path("dhcp-hosts", uuid))

    def has_dns(self, host, uuid):
        import os
        return os.path.exists(self.hosts[host][1].path("hosts", uuid))


@pytest.fixture
def fleet(tmp_path):
    f = Fleet(tmp_path)
    yield f
    f.store.close()


def test_dhcp_on_the_owner_dns_everywhere(fleet):
    rec = fleet.register("a", "web", U1, M1)
    assert rec.host == "a"
    assert fleet.has_dhcp("a", U1) and not fleet.has_dhcp("b", U1)
    assert fleet.has_dns("a", U1) and fleet.has_dns("b", U1)


def test_a_migration_moves_ownership_and_keeps_identity(fleet):
    before = fleet.register("a", "web", U1, M1)
    after = fleet.register("b", "web", U1, M1)  # the destination's hook at its start
    assert after.host == "b"
    assert (after.ipv4, after.instance_id, after.name, after.first_seen) == (
        before.ipv4, before.instance_id, before.name, before.first_seen)
    # the source forgets the DHCP entry (its dnsmasq gets SIGHUP), the destination has it
    assert not fleet.has_dhcp("a", U1) and fleet.has_dhcp("b", U1)
    assert fleet.has_dns("a", U1)


def test_another_hosts_instance_is_not_removed_by_default(fleet):
    fleet.register("a", "web", U1, M1)
    with pytest.raises(Conflict, match="belongs to host a"):
        fleet.hosts["b"][2].remove(U1)
    assert fleet.store.by_uuid(U1) is not None
    fleet.hosts["b"][2].remove(U1, any_host=True)
    assert fleet.store.by_uuid(U1) is None and not fleet.has_dns("a", U1)


def test_a_name_or_mac_held_on_another_host_is_refused(fleet):
    fleet.register("a", "web", U1, M1)
    with pytest.raises(Conflict, match="name is held by web .* on host a"):
        fleet.register("b", "web", U2, M2)
    with pytest.raises(Conflict, match="MAC is held"):
        fleet.register("b", "db", U2, M1)
    assert [i.uuid for i in fleet.store] == [U1]


def test_a_lost_race_is_replanned(fleet):
    fleet.hosts["b"][0].conflicts = 3
    assert fleet.register("b", "web", U1, M1).host == "b"


def test_unchanged_reregistration_succeeds_while_the_store_is_away(fleet):
    first = fleet.register("a", "web", U1, M1)
    fleet.hosts["a"][0].down = True
    assert fleet.register("a", "web", U1, M1) == first  # every VM start runs the hook
    with pytest.raises(StoreUnavailable):
        fleet.register("a", "db", U2, M2)  # a new one needs the store
    with pytest.raises(StoreUnavailable):
        fleet.hosts["a"][2].remove(U1)
    assert fleet.store.by_uuid(U1) == first


def test_hosts_start_allocating_at_different_places(fleet):
    import ipaddress
    import zlib
    first = int(ipaddress.IPv4Address("10.122.0.1"))  # pool.first; .1 is the gateway
    size = 2 ** 16 - 2
    a = fleet.register("a", "one", U1, M1)
    b = fleet.register("b", "two", U2, M2)
    for rec, host in ((a, "a"), (b, "b")):
        offset = int(ipaddress.IPv4Address(rec.ipv4)) - first
        assert offset in (zlib.crc32(host.encode()) % size, zlib.crc32(host.encode()) % size + 1)
    assert abs(int(ipaddress.IPv4Address(a.ipv4)) - int(ipaddress.IPv4Address(b.ipv4))) > 100
