"""The instance database: durability, indexes, journal, compaction, corruption."""

import json
import os

import pytest

from helpers import make_instance
from mdserver import store as storemod
from mdserver.errors import NotFound, StoreCorrupt, StoreLocked
from mdserver.models import SCHEMA_VERSION
from mdserver.store import Store

pytestmark = pytest.mark.unit


@pytest.fixture
def db(tmp_path):
    s = Store(str(tmp_path / "db.json"))
    yield s
    s.close()


def reopen(s: Store) -> Store:
    s.close()
    return Store(s.path)


def test_put_and_indexes(db):
    inst = make_instance(3)
    db.put(inst)
    assert db.by_uuid(inst.uuid) is inst
    assert db.by_mac(inst.mac.upper()) is inst
    assert db.by_ip(inst.ipv4) is inst
    assert db.by_name("vm3") is inst
    for key in ("vm3", inst.uuid, inst.mac, inst.ipv4):
        assert db.find(key) is inst
    with pytest.raises(NotFound):
        db.find("nope")


def test_update_moves_index_keys(db):
    inst = make_instance(3)
    db.put(inst)
    moved = inst.updated(ipv4="10.122.1.1", name="renamed")
    db.put(moved)
    assert db.by_ip(inst.ipv4) is None and db.by_name("vm3") is None
    assert db.by_ip("10.122.1.1") is moved and len(db) == 1


def test_survives_reopen_via_journal(db):
    a, b = make_instance(1), make_instance(2)
    db.put(a)
    db.put(b)
    db.remove(a.uuid, 1.0)
    db2 = reopen(db)
    try:
        assert [i.uuid for i in db2] == [b.uuid]
        assert db2.by_uuid(b.uuid) == b
    finally:
        db2.close()


def test_compaction_folds_journal_into_snapshot(tmp_path, monkeypatch):
    monkeypatch.setattr(storemod, "MIN_COMPACT", 5)
    s = Store(str(tmp_path / "db.json"))
    for n in range(1, 8):
        s.put(make_instance(n))
    with open(s.path) as f:
        snapshot = json.load(f)
    assert snapshot["schema"] == SCHEMA_VERSION
    assert len(snapshot["instances"]) == 5
    with open(s.journal_path) as f:
        assert len(f.read().splitlines()) == 2
    s2 = reopen(s)
    assert len(s2) == 7
    s2.close()


def test_torn_last_journal_line_is_dropped(db):
    db.put(make_instance(1))
    db.close()
    with open(db.journal_path, "ab") as f:
        f.write(b'{"op":"put","instance":{"uuid":')
    s = Store(db.path)
    try:
        assert len(s) == 1
        s.put(make_instance(2))  # and the file is usable again
    finally:
        s.close()
    s = Store(db.path)
    assert len(s) == 2
    s.close()


@pytest.mark.parametrize("content, why", [
    (b"{not json", "db.json"),
    (b'{"instances": []}', "no schema version"),
    (b'{"schema": 99, "instances": []}', "schema 99"),
    (b'{"schema": 1, "instances": [{"uuid": "x"}]}', "bad record"),
])
def test_corrupt_snapshot_is_refused_and_left_alone(tmp_path, content, why):
    path = tmp_path / "db.json"
    path.write_bytes(content)
    with pytest.raises(StoreCorrupt, match=why):
        Store(str(path))
    assert path.read_bytes() == content


def test_corrupt_journal_line_is_refused(db):
    db.put(make_instance(1))
    db.close()
    with open(db.journal_path, "ab") as f:
        f.write(b"garbage\n")
    with pytest.raises(StoreCorrupt, match=r"journal:2"):
        Store(db.path)


def test_one_writer_at_a_time(db):
    with pytest.raises(StoreLocked):
        Store(db.path)
    reader = Store(db.path, writable=False)
    with pytest.raises(StoreLocked):
        reader.put(make_instance(1))


def test_remove_unknown(db):
    with pytest.raises(NotFound):
        db.remove("nope", 1.0)


def test_files_are_not_world_readable_after_compaction(tmp_path, monkeypatch):
    monkeypatch.setattr(storemod, "MIN_COMPACT", 1)
    s = Store(str(tmp_path / "db.json"))
    s.put(make_instance(1))
    assert os.stat(s.path).st_mode & 0o007 == 0
    s.close()


def test_journal_is_not_world_readable(db):
    db.put(make_instance(1))
    assert os.stat(db.journal_path).st_mode & 0o007 == 0


def test_put_many_is_one_durable_transaction(db):
    db.put_many([make_instance(n) for n in range(1, 51)])
    assert len(db) == 50
    with open(db.journal_path) as f:
        assert len(f.read().splitlines()) == 1  # all or nothing
    db2 = reopen(db)
    assert len(db2) == 50
    db2.close()


def test_transaction_removes_then_puts_atomically(db):
    old = make_instance(1)
    db.put(old)
    rekeyed = old.updated(uuid="ec2fffff-aaaa-4bbb-8ccc-000000000001")
    db.commit(put=[rekeyed], delete=[old.uuid], at=5.0)
    assert db.by_ip(old.ipv4) is rekeyed and db.by_uuid(old.uuid) is None
    assert db.freed(old.ipv4) is None  # taken again in the same transaction
    db2 = reopen(db)
    assert db2.by_ip(old.ipv4).uuid == rekeyed.uuid
    db2.close()


def test_freed_addresses_are_remembered_across_restarts(db):
    inst = make_instance(1)
    db.put(inst)
    db.remove(inst.uuid, 1234.5)
    assert db.freed(inst.ipv4) == (1234.5, inst.uuid)
    db2 = reopen(db)
    assert db2.freed(inst.ipv4) == (1234.5, inst.uuid)
    db2.close()


def test_read_only_replica_follows_the_writer(tmp_path, monkeypatch):
    monkeypatch.setattr(storemod, "MIN_COMPACT", 3)
    writer = Store(str(tmp_path / "db.json"))
    writer.put(make_instance(1))
    replica = Store(writer.path, writable=False)
    assert len(replica) == 1 and replica.refresh() is False
    writer.put(make_instance(2))
    assert replica.refresh() is True and replica.by_name("vm2") is not None
    writer.remove(make_instance(1).uuid, 9.0)
    for n in range(3, 9):  # through several compactions
        writer.put(make_instance(n))
    replica.refresh()
    assert sorted(i.name for i in replica) == sorted(i.name for i in writer)
    assert replica.freed(make_instance(1).ipv4) == (9.0, make_instance(1).uuid)
    writer.close()


def test_replica_catches_up_from_the_shared_revision_alone(tmp_path, monkeypatch):
    """catch_up() reads the writer's revision from shared memory and refreshes
    only when it moved: every commit is seen at the next call, through
    compactions, and a replica opened before any writer falls back to a stat."""
    monkeypatch.setattr(storemod, "MIN_COMPACT", 3)
    path = str(tmp_path / "db.json")
    early = Store(path, writable=False)  # no writer yet: no shared revision
    early.catch_up()
    writer = Store(path)
    replica = Store(path, writable=False)
    refreshes = []
    real = replica.refresh
    monkeypatch.setattr(replica, "refresh", lambda: refreshes.append(1) or real())
    for n in range(1, 10):  # through several compactions
        writer.put(make_instance(n))
        replica.catch_up()
        early.catch_up()
        assert replica.by_name(f"vm{n}") is not None and early.by_name(f"vm{n}") is not None
    assert len(refreshes) == 9
    for _ in range(5):
        replica.catch_up()  # nothing new: no refresh, not even a stat
    assert len(refreshes) == 9
    assert oct(os.stat(writer.revision_path).st_mode & 0o777) == "0o640"
    writer.close()
    replica.close()
    early.close()


def test_replica_ignores_a_line_still_being_written(tmp_path):
    writer = Store(str(tmp_path / "db.json"))
    writer.put(make_instance(1))
    replica = Store(writer.path, writable=False)
    with open(writer.journal_path, "rb") as f:
        line = f.read().replace(b"vm1", b"vm9").replace(b"ec200001", b"ec200009")
    with open(writer.journal_path, "ab") as f:
        f.write(line[:40])  # half a line, as if mid-write
    assert replica.refresh() is False and replica.by_name("vm9") is None
    with open(writer.journal_path, "ab") as f:
        f.write(line[40:])
    assert replica.refresh() is True and replica.by_name("vm9") is not None
    writer.close()


MD_SERVER_06_DB = [
    {"domain_name": "web1", "domain_uuid": "0b5f4a2e-3c1d-4e6f-9a8b-7c6d5e4f3a2b",
     "mds_mac": "52:54:00:AA:BB:01", "mds_ipv4": "10.122.5.7", "mds_ipv6": None,
     "first_seen": 1600000000.5, "last_update": 1600000100.0},
    {"domain_name": "DB Server_2", "domain_uuid": "1b5f4a2e-3c1d-4e6f-9a8b-7c6d5e4f3a2b",
     "mds_mac": "52:54:00:aa:bb:02", "mds_ipv4": "10.122.9.200", "mds_ipv6": None,
     "first_seen": 1600000200.0, "last_update": None},
]


def test_md_server_06_database_is_converted_keeping_addresses(tmp_path):
    path = tmp_path / "db_file.json"
    original = json.dumps(MD_SERVER_06_DB, indent=4).encode()
    path.write_bytes(original)
    with pytest.raises(StoreCorrupt, match="0.6"):
        Store(str(path), writable=False)  # a reader never converts
    s = Store(str(path))
    assert (tmp_path / "db_file.json.md_server-0.6.bak").read_bytes() == original
    web = s.by_name("web1")
    assert (web.ipv4, web.mac, web.hostname, web.first_seen) == (
        "10.122.5.7", "52:54:00:aa:bb:01", "web1", 1600000000.5)
    db2 = s.by_ip("10.122.9.200")
    assert db2.name == "DB Server_2" and db2.hostname == "db-server-2"
    s.close()
    s = Store(str(path))  # converted once: now a normal database
    assert len(s) == 2 and json.loads(path.read_text())["schema"] == SCHEMA_VERSION
    s.close()


def test_bad_md_server_06_record_is_refused_untouched(tmp_path):
    path = tmp_path / "db_file.json"
    path.write_text(json.dumps([{"domain_name": "x"}]))
    with pytest.raises(StoreCorrupt, match="record 1"):
        Store(str(path))
    assert json.loads(path.read_text()) == [{"domain_name": "x"}]


def test_database_written_by_schema_1_loads_unchanged(tmp_path):
    """A copy of a database issue 3's mdserver wrote (snapshot + journal)."""
    import shutil
    data = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "schema1")
    for name in ("db_file.json", "db_file.json.journal"):
        shutil.copy(os.path.join(data, name), tmp_path / name)
    s = Store(str(tmp_path / "db_file.json"))
    assert sorted(i.name for i in s) == ["db 1", "web1"]
    web = s.by_name("web1")
    assert (web.ipv4, web.hostname, web.settings.template, web.settings.password) == (
        "10.122.0.2", "web1", "web.yaml", "$6$salt$hash")
    assert web.settings.hostname == "www" and web.settings.ssh_keys == (
        "ssh-ed25519 AAAAC3NzaOWN me@laptop",)
    assert (web.settings.meta, web.settings.network, web.settings.route,
            web.password_blob) == ((), None, None, None)
    assert web.instance_id == "i-ec2aaaaa000040008"  # unchanged: no re-provisioning
    assert s.by_name("db 1").last_seen == 1700000500.0  # from the journal
    assert s.freed("10.122.0.4") == (1700000400.0, "6b3c2a10-7e4f-4c8d-9a61-2f0e8d7c6b5b")
    s._compact()  # written back in the new layout, same content
    s.close()
    assert json.loads((tmp_path / "db_file.json").read_text())["schema"] == SCHEMA_VERSION
    again = Store(str(tmp_path / "db_file.json"), writable=False)
    assert again.by_name("web1") == web


# -- the InstanceStore protocol (mdserver.storeapi) ----------------------------

def test_versions_and_expected_versions(tmp_path):
    from mdserver.errors import StoreConflict
    s = Store(str(tmp_path / "db.json"), host="a")
    one, two = make_instance(1), make_instance(2)
    assert s.version(one.uuid) == 0
    s.commit(put=[one], expect={one.uuid: 0})
    v1 = s.version(one.uuid)
    assert v1 > 0
    with pytest.raises(StoreConflict):
        s.commit(put=[one.updated(name="x"), two], expect={one.uuid: v1 + 1})
    assert s.by_uuid(one.uuid) == one and s.by_uuid(two.uuid) is None  # nothing written
    s.commit(put=[one.updated(name="x")], expect={one.uuid: v1})
    assert s.version(one.uuid) > v1
    v = s.version(one.uuid)
    s.close()
    again = Store(str(tmp_path / "db.json"), writable=False, host="a")
    assert again.version(one.uuid) == v  # the journal keeps revisions


def test_change_feed(tmp_path):
    s = Store(str(tmp_path / "db.json"), host="a")
    seen = []
    s.subscribe(seen.append)
    one = make_instance(1)
    s.commit(put=[one])
    s.commit(put=[one.updated(name="x")])
    s.commit(delete=[one.uuid], at=5.0)
    assert [[(c.old, c.new) for c in batch] for batch in seen] == [
        [(None, one)], [(one, one.updated(name="x"))], [(one.updated(name="x"), None)]]
    assert s.status()["records"] == {} and s.status()["backend"] == "local"


def test_records_without_a_host_are_the_stores_own(tmp_path):
    """Schema 2 named no host: a local store's records are its host's."""
    record = make_instance(1).to_dict()
    del record["host"]
    (tmp_path / "db.json").write_text(json.dumps({"schema": 2, "instances": [record],
                                                  "freed": {}}))
    s = Store(str(tmp_path / "db.json"), host="hv1")
    assert s.by_uuid(record["uuid"]).host == "hv1"
    assert s.status()["records"] == {"hv1": 1}
    s._compact()
    s.close()
    snapshot = json.loads((tmp_path / "db.json").read_text())
    assert snapshot["schema"] == SCHEMA_VERSION and snapshot["instances"][0]["host"] == "hv1"
