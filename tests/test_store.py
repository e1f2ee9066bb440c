"""The instance database: durability, indexes, journal, compaction, corruption."""

import json
import os

import pytest

from conftest import make_instance
from mdserver import store as storemod
from mdserver.errors import NotFound, StoreCorrupt, StoreLocked
from mdserver.models import SCHEMA_VERSION
from mdserver.store import Store


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
    db.remove(a.uuid)
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
        db.remove("nope")


def test_files_are_not_world_readable_after_compaction(tmp_path, monkeypatch):
    monkeypatch.setattr(storemod, "MIN_COMPACT", 1)
    s = Store(str(tmp_path / "db.json"))
    s.put(make_instance(1))
    assert os.stat(s.path).st_mode & 0o007 == 0
    s.close()


def test_journal_is_not_world_readable(db):
    db.put(make_instance(1))
    assert os.stat(db.journal_path).st_mode & 0o007 == 0


def test_put_many_is_one_durable_batch(db):
    db.put_many([make_instance(n) for n in range(1, 51)])
    assert len(db) == 50
    with open(db.journal_path) as f:
        assert len(f.read().splitlines()) == 50
    db2 = reopen(db)
    assert len(db2) == 50
    db2.close()
