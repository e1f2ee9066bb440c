"""Registration: allocation, stability, quarantine, conflicts, all-or-nothing."""

import os

import pytest

from helpers import domain_xml, mds_metadata, write_config
from mdserver import config
from mdserver.dnsmasq import DnsmasqFiles
from mdserver.errors import BadDomainXML, NotFound, PoolExhausted
from mdserver.registry import Registry
from mdserver.store import Store

pytestmark = pytest.mark.unit

U1, M1 = "ec200001-aaaa-4bbb-8ccc-000000000001", "52:54:00:00:00:01"
U2, M2 = "ec200002-aaaa-4bbb-8ccc-000000000002", "52:54:00:00:00:02"
U3, M3 = "ec200003-aaaa-4bbb-8ccc-000000000003", "52:54:00:00:00:03"


class Clock:
    def __init__(self):
        self.t = 1_000_000.0

    def __call__(self):
        return self.t


class World:
    """A registry on a real store and real files; dnsmasq signals recorded."""

    def __init__(self, tmp_path, dn=""):
        self.cfg = config.load(write_config(tmp_path, "[dnsmasq]\nlease_len = 600\n" + dn))
        self.clock = Clock()
        self.signals = []
        self.changes = 0
        self.open()

    def open(self):
        self.store = Store(self.cfg.mdserver.db_file, freed_retention=600)
        self.files = DnsmasqFiles(self.cfg, kill=lambda pid, sig: self.signals.append(sig))
        self.registry = Registry(self.cfg, self.store, [self.files], clock=self.clock,
                                 on_change=self.changed)
        self.registry.sync()
        with open(self.files.path("dnsmasq.pid"), "w") as f:
            f.write("1\n")

    def changed(self):
        self.changes += 1

    def restart(self):
        self.store.close()
        self.open()

    def register(self, name, uuid, mac, **md):
        meta = mds_metadata(**md) if md else ""
        return self.registry.register(domain_xml(name, uuid, mac, metadata=meta).encode())

    def dhcp_file(self, uuid):
        with open(self.files.path("dhcp-hosts", uuid)) as f:
            return f.read()


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    yield w
    w.store.close()


def test_register_allocates_and_writes_dnsmasq_files(world):
    inst = world.register("Web Server 1", U1, M1, hostname="www", template="web.yaml")
    assert (inst.ipv4, inst.hostname, inst.settings.template) == ("10.122.0.2", "www",
                                                                  "web.yaml")
    assert world.dhcp_file(U1) == f"{M1},id:*,10.122.0.2,ip-10-122-0-2,600\n"
    assert world.signals == [] and world.changes == 1  # new file: no SIGHUP needed
    assert world.register("Db_2", U2, M2).hostname == "db-2"


def test_reupload_keeps_address_and_first_seen(world):
    first = world.register("vm1", U1, M1)
    world.clock.t += 50
    again = world.register("vm1", U1, M1)
    assert again.ipv4 == first.ipv4 and again.first_seen == first.first_seen
    assert again.last_seen == first.last_seen + 50
    assert world.signals == []  # nothing dnsmasq sees changed


def test_address_stable_across_restarts(world):
    a = world.register("vm1", U1, M1)
    b = world.register("vm2", U2, M2)
    world.restart()
    assert world.register("vm2", U2, M2).ipv4 == b.ipv4
    assert world.register("vm1", U1, M1).ipv4 == a.ipv4
    assert world.register("vm3", U3, M3).ipv4 not in (a.ipv4, b.ipv4)


def test_changed_mac_and_name_update_record_and_dnsmasq(world):
    a = world.register("vm1", U1, M1)
    moved = world.register("renamed", U1, M3)
    assert (moved.ipv4, moved.mac, moved.name) == (a.ipv4, M3, "renamed")
    assert world.store.by_mac(M1) is None and world.store.by_name("vm1") is None
    assert world.dhcp_file(U1).startswith(M3)
    assert world.signals  # dnsmasq told to forget the old entry


def test_recreated_domain_with_same_mac_keeps_address(world):
    a = world.register("vm1", U1, M1)
    b = world.register("vm1", U2, M1)  # undefined and defined again: new UUID
    assert b.ipv4 == a.ipv4 and world.store.by_uuid(U1) is None and len(world.store) == 1
    assert not os.path.exists(world.files.path("dhcp-hosts", U1))


def test_same_name_new_domain_replaces_old(world):
    a = world.register("vm1", U1, M1)
    b = world.register("vm1", U2, M2)
    assert b.ipv4 != a.ipv4 and world.store.by_uuid(U1) is None
    assert world.store.by_name("vm1").uuid == U2


def test_freed_address_is_quarantined_for_a_lease_time(world):
    a = world.register("vm1", U1, M1)
    world.registry.remove("vm1")
    world.clock.t += 599
    b = world.register("vm2", U2, M2)
    assert b.ipv4 != a.ipv4
    world.clock.t += 1
    world.restart()  # the quarantine is on disk, and has now run out
    world.registry._cursor = world.registry.pool.first
    assert world.register("vm3", U3, M3).ipv4 == a.ipv4


def test_remove_frees_and_updates_dnsmasq(world):
    world.register("vm1", U1, M1)
    removed = world.registry.remove(U1)
    assert removed.name == "vm1" and len(world.store) == 0
    assert not os.path.exists(world.files.path("hosts", U1)) and world.signals
    with pytest.raises(NotFound):
        world.registry.remove("vm1")


def test_pool_exhausted_writes_nothing(tmp_path):
    w = World(tmp_path, "net_address = 10.9.0.0\nnet_prefix = 30\ngateway = 10.9.0.1\n")
    try:
        w.register("vm1", U1, M1)
        journal = open(w.store.journal_path, "rb").read()
        with pytest.raises(PoolExhausted):
            w.register("vm2", U2, M2)
        assert open(w.store.journal_path, "rb").read() == journal
        assert w.store.by_uuid(U2) is None
        assert os.listdir(w.files.path("dhcp-hosts")) == [U1]
    finally:
        w.store.close()


def test_bad_xml_stores_nothing(world):
    with pytest.raises(BadDomainXML):
        world.registry.register(b"<domain><name>x</name></domain>")
    assert len(world.store) == 0 and os.listdir(world.files.path("dhcp-hosts")) == []


class RecordingSink:
    """A registration sink that records what the registry told it."""

    def __init__(self, reload_on_put=False):
        self.calls = []
        self.reload_on_put = reload_on_put

    def put(self, inst):
        self.calls.append(("put", inst.uuid))
        return self.reload_on_put

    def remove(self, uuid):
        self.calls.append(("remove", uuid))
        return True

    def sync(self, instances):
        self.calls.append(("sync", sorted(i.uuid for i in instances)))
        return False

    def reload(self):
        self.calls.append(("reload",))
        return True


def test_every_sink_follows_registrations(tmp_path):
    cfg = config.load(write_config(tmp_path))
    store = Store(cfg.mdserver.db_file)
    a, b = RecordingSink(), RecordingSink(reload_on_put=True)
    try:
        registry = Registry(cfg, store, [a, b])
        registry.sync()
        registry.register(domain_xml("vm1", U1, M1).encode())
        # vm2 takes vm1's name: vm1 is removed from every sink, vm2 put
        registry.register(domain_xml("vm1", U2, M2).encode())
        registry.remove(U2)
    finally:
        store.close()
    assert a.calls == [("sync", []), ("put", U1), ("remove", U1), ("put", U2), ("reload",),
                       ("remove", U2), ("reload",)]
    assert b.calls == [("sync", []), ("put", U1), ("reload",), ("remove", U1), ("put", U2),
                       ("reload",), ("remove", U2), ("reload",)]


def test_failing_template_is_reported_at_registration(tmp_path, caplog):
    cfg = config.load(write_config(tmp_path))
    store = Store(cfg.mdserver.db_file)
    problems = {U1: "t.yaml: NameError: name 'x' is not defined"}
    try:
        registry = Registry(cfg, store, [], check=lambda inst: problems.get(inst.uuid))
        with caplog.at_level("ERROR", logger="mdserver.registry"):
            inst = registry.register(domain_xml("vm1", U1, M1).encode())
            registry.register(domain_xml("vm2", U2, M2).encode())
        assert store.by_uuid(U1) == inst  # registered all the same: the VM must start
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert errors == [f"vm1 ({U1}): user-data fails, guests will get none: {problems[U1]}"]
        assert registry.describe(inst)["userdata"] == f"error: {problems[U1]}"
        assert registry.describe(store.by_uuid(U2))["userdata"] == "ok"
        assert registry.describe(inst)["instance_id"] == U1  # default route openstack
    finally:
        store.close()


def test_a_pending_route_is_marked_until_a_plain_registration(world):
    xml = domain_xml("vm1", U1, M1).encode()
    inst = world.registry.register(xml, pending=True)
    assert inst.route_pending
    assert world.registry.describe(inst)["route"] == "openstack (pending: next cold boot)"
    world.restart()  # kept in the database
    assert world.store.by_uuid(U1).route_pending
    assert world.registry.describe(world.registry.register(xml))["route"] == "openstack"
