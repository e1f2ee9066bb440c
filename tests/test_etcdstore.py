"""The etcd InstanceStore against real etcd: hosts sharing a registry, claims, outages, compaction, migration."""

import base64
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List

import pytest

from etcd_lab import EtcdLab, make_certs, sign_cert
from helpers import make_instance, need, need_root, wait_for
from mdserver.config import StoreSection
from mdserver.errors import StoreConflict, StoreLocked, StoreUnavailable
from mdserver.etcdstore import EtcdStore
from mdserver.store import Store
from netns import ip

pytestmark = pytest.mark.privileged

LEASE_TTL = 3  # keep-alive every second: outages show within ~2 s
LOG = "mdserver.etcdstore"


class Stores:
    """EtcdStores of one test: a key prefix of their own, caches under tmp_path, closed at the end."""

    def __init__(self, lab: EtcdLab, tmp_path, prefix: str = "", **settings):
        self.lab, self.tmp = lab, tmp_path
        self.prefix = prefix or f"/t{os.urandom(3).hex()}/"
        self.settings = settings     # [store] keys of every store (TLS files, credentials)
        self.made: List[EtcdStore] = []

    def open(self, host: str, start: bool = True, cache_dir=None, **settings) -> EtcdStore:
        cache_dir = cache_dir or self.tmp / f"{host}-{len(self.made)}"
        st = StoreSection(backend="etcd", endpoints=tuple(self.lab.endpoints),
                          prefix=self.prefix, host=host, **{**self.settings, **settings})
        store = EtcdStore(st, Store(str(cache_dir / "cache.json"), host=host),
                          lease_ttl=LEASE_TTL)
        self.made.append(store)
        if start:
            store.start()
        return store

    def key(self, kind: str, name: str) -> str:
        return f"{self.prefix}{kind}/{name}"

    def close(self) -> None:
        for store in reversed(self.made):
            store.close()


@pytest.fixture(scope="module")
def lab() -> Iterator[EtcdLab]:
    need_root()
    need(shutil.which("etcd") is not None, "needs etcd (apt-get install etcd-server)")
    with EtcdLab(members=1) as lab:
        lab.attach(None)
        yield lab


@pytest.fixture
def stores(lab, tmp_path) -> Iterator[Stores]:
    made = Stores(lab, tmp_path)
    yield made
    made.close()


@contextmanager
def cut_off(lab: EtcdLab) -> Iterator[None]:
    """This process loses its path to etcd without a FIN or RST (etcd runs on):
    the lab's end of our veth goes down."""
    outer = ip("-o", "-4", "addr", "show", "to", lab.attached[None] + "/32").split()[1]
    inner = "mdtep" + outer[len("mdtea"):]
    ip("link", "set", inner, "down", netns=lab.netns)
    try:
        yield
    finally:
        ip("link", "set", inner, "up", netns=lab.netns)


def record_json(inst) -> str:
    return json.dumps(inst.to_dict())


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_commits_reach_the_other_host_through_the_watch(stores, lab):
    a, b = stores.open("a"), stores.open("b")
    seen_a: list = []
    seen_b: list = []
    a.subscribe(lambda changes: seen_a.append([(c.old, c.new) for c in changes]))
    b.subscribe(lambda changes: seen_b.append([(c.old, c.new) for c in changes]))
    rec = make_instance(1, host="a")
    a.commit(put=[rec], at=1.0)
    assert a.by_uuid(rec.uuid) == rec and a.version(rec.uuid) > 0     # its own write, at once
    took = wait_for(lambda: b.by_uuid(rec.uuid) == rec, 5, "b sees a's record")
    print(f"watch propagation a -> b: {took:.3f} s")
    assert b.version(rec.uuid) == a.version(rec.uuid)
    assert b.by_ip(rec.ipv4) == rec and b.by_name("vm1") == rec and b.find(rec.mac) == rec

    changed = rec.updated(last_seen=2.0)
    b.commit(put=[changed], at=2.0, expect={rec.uuid: b.version(rec.uuid)})
    wait_for(lambda: a.by_uuid(rec.uuid) == changed, 5, "a sees b's update")
    time.sleep(0.3)  # a's own write's watch event came back meanwhile: a no-op
    assert seen_a == seen_b == [[(None, rec)], [(rec, changed)]]
    assert json.loads(lab.get(stores.key("instances", rec.uuid))) == changed.to_dict()
    assert lab.get(stores.key("ips", rec.ipv4)) == lab.get(stores.key("names", "vm1")) \
        == rec.uuid.encode()
    status = a.status()
    assert status == {"backend": "etcd", "endpoints": lab.endpoints, "host": "a",
                      "prefix": stores.prefix, "connected": True,
                      "revision": a.version(rec.uuid), "cache_age": 0.0, "records": {"a": 1}}
    assert a.refresh() is False


@pytest.mark.parametrize("what", ["address", "name"])
def test_concurrent_claims_one_wins_the_other_reads_it(stores, lab, what):
    a, b = stores.open("a"), stores.open("b")
    mine = make_instance(1, host="a")
    theirs = make_instance(2, host="b")
    theirs = theirs.updated(ipv4=mine.ipv4) if what == "address" else theirs.updated(name="vm1")
    ident = mine.ipv4 if what == "address" else "vm1"
    start = threading.Barrier(2)
    results = {}

    def claim(store, rec):
        start.wait()
        try:
            store.commit(put=[rec], at=1.0)
            results[store.host] = "won"
        except StoreConflict as e:
            results[store.host] = e

    threads = [threading.Thread(target=claim, args=args) for args in ((a, mine), (b, theirs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [h for h, r in results.items() if r == "won"]
    assert len(winners) == 1, results
    (winner, won), (loser, lost) = ((a, mine), (b, theirs)) if winners == ["a"] \
        else ((b, theirs), (a, mine))
    error = str(results[loser.host])
    assert error == f"{what} {ident} changed meanwhile: held by {won.name} ({won.uuid}) " \
        f"on host {winner.host}"
    # the loser reads the winner as soon as it is told
    lookup = loser.by_ip if what == "address" else loser.by_name
    assert lookup(ident) == won and loser.by_uuid(lost.uuid) is None
    assert lab.get(stores.key("instances", lost.uuid)) is None
    key = stores.key("ips", ident) if what == "address" else stores.key("names", ident)
    assert lab.get(key) == won.uuid.encode()


def test_a_stale_expected_version_writes_nothing(stores, lab):
    a, b = stores.open("a"), stores.open("b")
    rec = make_instance(1, host="a")
    a.commit(put=[rec])
    wait_for(lambda: b.by_uuid(rec.uuid) == rec, 5, "b sees the record")
    read = b.version(rec.uuid)
    newer = rec.updated(last_seen=2.0)
    a.commit(put=[newer], expect={rec.uuid: read})
    with pytest.raises(StoreConflict, match=f"^instance {rec.uuid} changed meanwhile$"):
        b.commit(put=[rec.updated(hostname="other")], expect={rec.uuid: read})
    assert b.by_uuid(rec.uuid) == newer and b.version(rec.uuid) == a.version(rec.uuid)
    with pytest.raises(StoreConflict):
        b.commit(delete=[rec.uuid], at=3.0, expect={rec.uuid: read})
    with pytest.raises(StoreConflict):  # "must not exist"
        b.commit(put=[newer.updated(hostname="x")], expect={rec.uuid: 0})
    assert json.loads(lab.get(stores.key("instances", rec.uuid))) == newer.to_dict()


def test_delete_and_rename_free_addresses_and_names(stores, lab):
    a, b = stores.open("a"), stores.open("b")
    rec = make_instance(1, host="a")
    a.commit(put=[rec])
    renamed = rec.updated(name="renamed", ipv4="10.122.9.9")
    a.commit(put=[renamed], expect={rec.uuid: a.version(rec.uuid)})
    assert lab.get(stores.key("names", "vm1")) is None
    assert lab.get(stores.key("ips", rec.ipv4)) is None
    # another host takes what the rename let go
    b.commit(put=[make_instance(2, host="b", ipv4=rec.ipv4, name="vm1")])

    a.commit(delete=[rec.uuid], at=3.0, expect={rec.uuid: a.version(rec.uuid)})
    assert a.by_uuid(rec.uuid) is None and a.version(rec.uuid) == 0
    assert a.freed("10.122.9.9") == (3.0, rec.uuid)
    assert lab.get(stores.key("names", "renamed")) is None
    assert lab.get(stores.key("ips", "10.122.9.9")) is None
    wait_for(lambda: b.by_uuid(rec.uuid) is None, 5, "b sees the delete")
    third = make_instance(3, host="b", name="renamed", ipv4="10.122.9.9")
    b.commit(put=[third])
    # one commit that deletes a record and gives its name to a new one
    fourth = make_instance(4, host="b", name="renamed", ipv4="10.122.9.10")
    b.commit(put=[fourth], delete=[third.uuid], at=4.0,
             expect={third.uuid: b.version(third.uuid)})
    assert lab.get(stores.key("names", "renamed")) == fourth.uuid.encode()
    assert lab.get(stores.key("ips", "10.122.9.9")) is None
    wait_for(lambda: a.by_name("renamed") == fourth, 5, "a sees the replacement")


def test_a_second_daemon_for_one_host_is_refused(stores):
    stores.open("a")
    node = socket.gethostname()
    with pytest.raises(StoreLocked, match=rf"^\[store\] host a is already served by another "
                       rf"mdserver \(pid {os.getpid()} on {node} since \d{{4}}-"):
        stores.open("a")


def test_a_host_taken_over_during_a_lapse_refuses_writes_until_free(stores, lab, caplog):
    caplog.set_level(logging.INFO, LOG)
    a = stores.open("a")
    held = lab.call("kv/range", {"key": _b64(stores.key("hosts", "a"))})["kvs"][0]
    lab.call("kv/lease/revoke", {"ID": held["lease"]})   # a's lease lapses...
    other = stores.open("a")                             # ...and another daemon takes host a
    wait_for(lambda: "locked" in a.status(), 5, "a notices")
    with pytest.raises(StoreLocked, match="already served by another mdserver"):
        a.commit(put=[make_instance(1, host="a")])
    assert "registrations refused until it stops" in caplog.text
    other.close()
    wait_for(lambda: "locked" not in a.status(), 5, "a takes its host back")
    a.commit(put=[make_instance(1, host="a")])


def test_etcd_stopped_reads_go_on_writes_fail_fast_and_catch_up_after(stores, lab, caplog):
    caplog.set_level(logging.INFO, LOG)
    a, b = stores.open("a"), stores.open("b")
    rec = make_instance(1, host="a")
    a.commit(put=[rec])
    wait_for(lambda: b.by_uuid(rec.uuid) == rec, 5, "b sees the record")
    b_cache = os.path.dirname(b._cache.path)
    lab.stop_all()
    try:
        took = wait_for(lambda: not a.status()["connected"], 5, "a notices")
        print(f"etcd stop noticed after {took:.3f} s")
        assert a.by_ip(rec.ipv4) == rec and a.find("vm1") == rec and len(a) == 1
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable, match=r"^etcd unreachable \(http://.*: connection "
                           r"refused\): nothing written$"):
            a.commit(put=[make_instance(2, host="a")])
        failed_in = time.monotonic() - t0
        print(f"commit with etcd stopped failed in {failed_in:.3f} s")
        assert failed_in < 1.5
        age = a.status()["cache_age"]
        time.sleep(0.2)
        assert a.status()["cache_age"] > age + 0.15
        assert caplog.text.count("etcd connection lost") == 2   # once per store
        assert "answering from the cache (1 records, as of revision" in caplog.text

        # b's daemon restarts meanwhile: it answers from its cache
        b.close()
        b = stores.open("b", cache_dir=Path(b_cache))
        assert b.by_uuid(rec.uuid) == rec and not b.status()["connected"]
        assert b.status()["cache_age"] > 0
        assert "serving 1 cached records; registrations fail until it answers" in caplog.text
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable):
            b.commit(put=[make_instance(3, host="b")])
        assert time.monotonic() - t0 < 1.5
    finally:
        lab.start_all()
    # another client writes as soon as etcd is back (before, or while, the stores reconnect)
    other = make_instance(4, host="c")
    lab.put(stores.key("instances", other.uuid), record_json(other))
    took = wait_for(lambda: a.by_uuid(other.uuid) == other and b.by_uuid(other.uuid) == other,
                    10, "both stores catch up")
    print(f"catch-up after etcd start: {took:.3f} s")
    assert "etcd back after" in caplog.text
    a.commit(put=[make_instance(2, host="a")])
    assert a.status()["connected"] and a.status()["cache_age"] == 0.0


def test_cut_off_while_others_write_and_compact(stores, lab, caplog):
    caplog.set_level(logging.INFO, LOG)
    a = stores.open("a")
    keep, gone = make_instance(1, host="a"), make_instance(2, host="b")
    a.commit(put=[keep, gone])
    changes: list = []
    a.subscribe(changes.extend)
    new = make_instance(3, host="b")
    with cut_off(lab):
        took = wait_for(lambda: not a.status()["connected"], 8, "a notices the silence")
        print(f"black-holed etcd noticed after {took:.3f} s")
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable, match="nothing written"):
            a.commit(put=[make_instance(5, host="a")])
        print(f"commit with etcd black-holed failed in {time.monotonic() - t0:.3f} s")
        assert time.monotonic() - t0 < 1.5
        # meanwhile, another host writes, and etcd compacts past a's revision
        lab.etcdctl("put", stores.key("instances", new.uuid), record_json(new))
        lab.etcdctl("del", stores.key("instances", gone.uuid))
        out = lab.etcdctl("get", stores.key("instances", new.uuid), "-w", "json").stdout
        revision = int(json.loads(out)["header"]["revision"])
        lab.etcdctl("compact", str(revision), "--physical")
        assert a.status()["revision"] < revision
    took = wait_for(lambda: a.by_uuid(new.uuid) == new and a.by_uuid(gone.uuid) is None, 10,
                    "a converges")
    print(f"catch-up after the path came back: {took:.3f} s")
    assert a.by_uuid(keep.uuid) == keep and a.status()["revision"] >= revision
    assert sorted((c.uuid, c.new is None) for c in changes) == sorted(
        [(new.uuid, False), (gone.uuid, True)])
    assert "(2 changes)" in caplog.text


def test_a_watch_behind_a_compaction_reloads(stores, lab, caplog):
    caplog.set_level(logging.INFO, LOG)
    a = stores.open("a")
    rec = make_instance(1, host="a")
    a.commit(put=[rec])
    lab.compact(lab.revision())
    # As after a stall: the cache missed an event and the watch must resume
    # from history etcd no longer has.
    with a._lock:
        a._cache.commit(delete=[rec.uuid], at=1.0)
        a._revision = 1
    a._kick()
    wait_for(lambda: a.by_uuid(rec.uuid) == rec, 5, "a reloads")
    assert "etcd compacted past revision 1: reloaded, 1 changes" in caplog.text
    assert a.status()["connected"]


def test_three_members_one_stopped_is_invisible(tmp_path, caplog):
    need_root()
    need(shutil.which("etcd") is not None, "needs etcd (apt-get install etcd-server)")
    caplog.set_level(logging.DEBUG, LOG)
    with EtcdLab(members=3) as lab3:
        lab3.attach(None)
        stores = Stores(lab3, tmp_path)
        try:
            a, b = stores.open("a"), stores.open("b")
            first = make_instance(1, host="a")
            a.commit(put=[first])
            wait_for(lambda: b.by_uuid(first.uuid) == first, 5, "b sees the first record")
            lab3.stop_member(0)
            t0 = time.monotonic()
            second = make_instance(2, host="a")
            a.commit(put=[second])
            print(f"first commit after a member stopped: {time.monotonic() - t0:.3f} s")
            took = wait_for(lambda: b.by_uuid(second.uuid) == second, 5, "b follows")
            print(f"watch propagation after the failover: {took:.3f} s")
            third = make_instance(3, host="b")
            b.commit(put=[third])
            wait_for(lambda: a.by_uuid(third.uuid) == third, 5, "a follows")
            time.sleep(1.5)  # a keep-alive round of each store
            assert a.status()["connected"] and b.status()["connected"]
            loud = [r.getMessage() for r in caplog.records
                    if r.name == LOG and r.levelno >= logging.WARNING]
            assert loud == []
            assert any("watch on" in r.getMessage() for r in caplog.records
                       if r.levelno == logging.DEBUG)
        finally:
            stores.close()


def test_username_and_password_file(tmp_path, caplog):
    need_root()
    need(shutil.which("etcd") is not None, "needs etcd (apt-get install etcd-server)")
    caplog.set_level(logging.DEBUG, LOG)
    secret = "s3cret-pw-" + os.urandom(4).hex()
    with EtcdLab(members=1) as lab1:
        lab1.attach(None)
        for path, body in (("auth/user/add", {"name": "root", "password": secret}),
                           ("auth/role/add", {"name": "root"}),
                           ("auth/user/grant", {"user": "root", "role": "root"}),
                           ("auth/enable", {})):
            lab1.call(path, body)
        good, bad = tmp_path / "good", tmp_path / "bad"
        good.write_text(secret + "\n")
        bad.write_text("wrong-" + secret)
        stores = Stores(lab1, tmp_path)
        try:
            with pytest.raises(StoreUnavailable, match="authentication as root failed") as e:
                stores.open("a", username="root", password_file=str(bad))
            assert secret not in str(e.value)
            a = stores.open("b", username="root", password_file=str(good))
            c = stores.open("c", username="root", password_file=str(good))
            rec = make_instance(1, host="b")
            a.commit(put=[rec])
            wait_for(lambda: c.by_uuid(rec.uuid) == rec, 5, "the watch works with a token")
            for member in a._cluster.members:   # as after a member restart: tokens void
                member.set_token("void.1")
            a.commit(put=[rec.updated(last_seen=5.0)], expect={rec.uuid: a.version(rec.uuid)})
        finally:
            stores.close()
        assert secret not in caplog.text


def test_import_records_and_conflicts(stores, lab):
    b = stores.open("b")
    theirs = make_instance(500, host="b")
    b.commit(put=[theirs])
    migrate = stores.open("a", start=False)   # as `mdserverctl store migrate` uses it
    mine = [make_instance(n, host="a") for n in range(1, 91)]
    clash_ip = make_instance(91, host="a", ipv4=theirs.ipv4)
    clash_name = make_instance(92, host="a", name=theirs.name)
    clash_uuid = theirs.updated(host="a")
    held = f"{theirs.name} ({theirs.uuid}) on host b"
    assert migrate.conflicts(mine + [clash_ip, clash_name]) == [
        f"{theirs.ipv4}: held by {held}", f"name {theirs.name}: held by {held}"]
    assert migrate.conflicts([clash_uuid, mine[0], mine[0].updated(uuid="u2")]) == [
        f"{theirs.uuid}: registered as {theirs.name} on host b",
        f"{mine[0].ipv4}: given to both vm1 ({mine[0].uuid}) and vm1 (u2) among these records",
        f"name vm1: given to both vm1 ({mine[0].uuid}) and vm1 (u2) among these records"]
    with pytest.raises(StoreConflict, match=f"{theirs.ipv4}: held by"):
        migrate.import_records(mine + [clash_ip])
    assert lab.get(stores.key("instances", mine[0].uuid)) is None
    assert migrate.import_records(mine) == 90             # three transactions
    assert migrate.import_records(mine) == 0              # there already
    assert migrate.conflicts(mine) == []
    assert lab.get(stores.key("ips", mine[41].ipv4)) == mine[41].uuid.encode()
    assert lab.get(stores.key("names", mine[89].name)) == mine[89].uuid.encode()
    wait_for(lambda: len(b) == 91, 5, "b sees the imported records")
    assert b.by_uuid(mine[89].uuid) == mine[89] and b.status()["records"] == {"a": 90, "b": 1}


# -- TLS and etcd's own users ---------------------------------------------------


def need_etcd_tls() -> None:
    need_root()
    need(shutil.which("etcd") is not None, "needs etcd (apt-get install etcd-server)")
    need(shutil.which("openssl") is not None, "needs openssl (apt-get install openssl)")


@pytest.fixture(scope="module")
def tls_lab() -> Iterator[EtcdLab]:
    """Three members: https for clients and peers, client certificates required."""
    need_etcd_tls()
    with EtcdLab(members=3, tls=True) as lab:
        lab.attach(None)
        yield lab


def tls_files(lab: EtcdLab) -> dict:
    return {"ca_file": lab.ca_file, "cert_file": lab.client_cert, "key_file": lab.client_key}


def on_the_watch(stores: List[EtcdStore], caplog) -> None:
    """The changes came through each store's watch stream (open now), not
    through the full reload a store does after losing etcd (INFO logged)."""
    assert all(s._stream_member is not None for s in stores)
    assert [r.getMessage() for r in caplog.records
            if r.name == LOG and ("connection lost" in r.getMessage()
                                  or "etcd back after" in r.getMessage())] == []


def one_line_refusal(lab: EtcdLab, cause: str) -> str:
    """The pattern of a commit's StoreUnavailable when no member lets us in."""
    return (rf"^etcd unreachable \(https://{re.escape(lab.address)}:\d+: {cause}\): "
            r"nothing written$")


def test_tls_commits_and_the_watch_with_a_member_stopped(tls_lab, tmp_path, caplog):
    caplog.set_level(logging.INFO, LOG)
    stores = Stores(tls_lab, tmp_path, **tls_files(tls_lab))
    try:
        a, b = stores.open("a"), stores.open("b")
        rec = make_instance(1, host="a")
        a.commit(put=[rec])
        took = wait_for(lambda: b.by_uuid(rec.uuid) == rec, 5, "b sees a's record over TLS")
        print(f"watch propagation over TLS: {took:.3f} s")
        on_the_watch([a, b], caplog)
        # the member both watches are on (the first) goes: the others serve both
        assert {s._stream_member.url for s in (a, b)} == {tls_lab.endpoints[0]}
        tls_lab.stop_member(0)
        changed = rec.updated(last_seen=2.0)
        b.commit(put=[changed], at=2.0, expect={rec.uuid: b.version(rec.uuid)})
        took = wait_for(lambda: a.by_uuid(rec.uuid) == changed, 5, "a follows after the stop")
        print(f"watch propagation over TLS after a member stopped: {took:.3f} s")
        on_the_watch([a, b], caplog)
        assert a.status()["connected"] and b.status()["connected"]
        # the lab's own helpers speak TLS too: its JSON calls and etcdctl
        assert json.loads(tls_lab.get(stores.key("instances", rec.uuid))) == changed.to_dict()
        out = tls_lab.etcdctl("get", "--print-value-only", stores.key("names", "vm1")).stdout
        assert out.strip() == rec.uuid
        t0 = time.monotonic()
        for store in (a, b):
            store.close()
        closing = time.monotonic() - t0
        print(f"two stores closed over TLS in {closing:.3f} s")
        assert closing < 2  # the kick ends a watch on a TLS socket too (else a 10 s join)
        assert tls_lab.get(stores.key("hosts", "a")) is None   # the lease was revoked
    finally:
        stores.close()
        if 0 not in tls_lab.running():   # the next tests want all three
            tls_lab.start_member(0)


@pytest.fixture(scope="module")
def other_ca(tls_lab, tmp_path_factory) -> dict:
    """A second CA with a server and a client certificate of its own, for the same address."""
    return make_certs(str(tmp_path_factory.mktemp("other-ca")), tls_lab.address,
                      label="another CA")


@pytest.mark.parametrize("case", ["no client certificate", "client certificate of another CA",
                                  "server checked against another CA"])
def test_tls_refused_without_the_right_certificates(tls_lab, other_ca, tmp_path, caplog, case):
    caplog.set_level(logging.WARNING, LOG)
    files, cause = {
        "no client certificate": (
            {"ca_file": tls_lab.ca_file},
            "TLS handshake refused: client certificate missing or not trusted"),
        "client certificate of another CA": (
            {"ca_file": tls_lab.ca_file, "cert_file": other_ca["client_cert"],
             "key_file": other_ca["client_key"]},
            "TLS handshake refused: client certificate missing or not trusted"),
        "server checked against another CA": (
            {**tls_files(tls_lab), "ca_file": other_ca["ca"]},
            r"server certificate not trusted \(unable to get local issuer certificate\)"),
    }[case]
    stores = Stores(tls_lab, tmp_path, **files)
    try:
        # Not a refusal of these credentials as a wrong password is: etcd
        # counts as unreachable, the cache answers, the log says why.
        t0 = time.monotonic()
        a = stores.open("a")
        assert time.monotonic() - t0 < 1.5
        assert not a.status()["connected"]
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and re.search(cause, warnings[0]), warnings
        rec = make_instance(1, host="a")
        with pytest.raises(StoreUnavailable, match=one_line_refusal(tls_lab, cause)):
            a.commit(put=[rec])
        assert a.by_uuid(rec.uuid) is None
        assert tls_lab.get(stores.key("instances", rec.uuid)) is None
        assert tls_lab.get(stores.key("hosts", "a")) is None
    finally:
        stores.close()


AUTH_USER = "mdserver"
AUTH_PREFIX = "/mdt-auth/"
# Distinctive, so that a leak into a message or a log line cannot go unnoticed.
AUTH_PASSWORD = "pw-" + os.urandom(8).hex()


@pytest.fixture(scope="module")
def auth_lab() -> Iterator[EtcdLab]:
    """etcd users on (AUTH_USER may use AUTH_PREFIX only), over TLS as a fleet would run it."""
    need_etcd_tls()
    with EtcdLab(members=1, tls=True) as lab:
        lab.attach(None)
        lab.enable_auth(AUTH_USER, AUTH_PASSWORD, prefix=AUTH_PREFIX)
        yield lab


def password_file(path: Path, password: str) -> str:
    path.write_text(password + "\n")
    path.chmod(0o600)
    return str(path)


def auth_stores(lab: EtcdLab, tmp_path: Path, prefix: str = "", **settings) -> Stores:
    return Stores(lab, tmp_path, prefix=prefix or f"{AUTH_PREFIX}t{os.urandom(3).hex()}/",
                  **{**tls_files(lab), "username": AUTH_USER,
                     "password_file": password_file(tmp_path / "etcd-password", AUTH_PASSWORD),
                     **settings})


def log_everything(caplog) -> None:
    """mdserver's records and, under them, urllib3's: a refused start logs
    nothing of its own, so the requests are what the log holds then."""
    caplog.set_level(logging.DEBUG, "mdserver")
    caplog.set_level(logging.DEBUG, "urllib3")


def no_password_in_logs(caplog) -> None:
    assert caplog.records   # something was logged: the check is not void
    leaked = [r.getMessage() for r in caplog.records
              if AUTH_PASSWORD in r.getMessage() or AUTH_PASSWORD in str(r.exc_info)]
    assert leaked == []


def test_auth_a_user_commits_and_watches_in_its_prefix_only(auth_lab, tmp_path, caplog):
    log_everything(caplog)
    stores = auth_stores(auth_lab, tmp_path)
    try:
        a, b = stores.open("a"), stores.open("b")
        rec = make_instance(1, host="a")
        a.commit(put=[rec])
        took = wait_for(lambda: b.by_uuid(rec.uuid) == rec, 5, "b's watch, as the user")
        print(f"watch propagation with etcd auth over TLS: {took:.3f} s")
        b.commit(put=[rec.updated(last_seen=2.0)], at=2.0, expect={rec.uuid: b.version(rec.uuid)})
        wait_for(lambda: a.by_uuid(rec.uuid) == rec.updated(last_seen=2.0), 5, "a follows")
        on_the_watch([a, b], caplog)
        # written as the user, read back by the lab as root
        assert json.loads(auth_lab.get(stores.key("instances", rec.uuid)))["last_seen"] == 2.0
        # the role is a real limit: outside its prefix the same user is refused
        (tmp_path / "outside").mkdir()
        outside = auth_stores(auth_lab, tmp_path / "outside", prefix="/mdt-elsewhere/")
        try:
            with pytest.raises(StoreUnavailable, match=r"^etcd refused mdserver \(https://\S+: "
                               r"etcdserver: permission denied\)$"):
                outside.open("c")
        finally:
            outside.close()
        assert a.status()["connected"] and b.status()["connected"]
    finally:
        stores.close()
    no_password_in_logs(caplog)


def test_auth_tokens_void_after_a_restart_are_renewed(auth_lab, tmp_path, caplog):
    """The member restarts and knows no token: the stores (and the lab, as
    root) log in again, and the watch goes on as the user."""
    log_everything(caplog)
    stores = auth_stores(auth_lab, tmp_path)
    try:
        a, b = stores.open("a"), stores.open("b")
        first = make_instance(1, host="a")
        a.commit(put=[first])
        wait_for(lambda: b.by_uuid(first.uuid) == first, 5, "b sees the first record")
        tokens = {m.token for s in (a, b) for m in s._cluster.members}
        auth_lab.stop_member(0)
        auth_lab.start_member(0)
        # the only member went away: both stores noticed, and come back
        took = wait_for(lambda: a.status()["connected"] and b.status()["connected"], 10,
                        "both stores back")
        print(f"back after a restart with etcd auth: {took:.3f} s")
        renewed = {m.token for s in (a, b) for m in s._cluster.members}
        assert None not in renewed and not renewed & tokens
        back = caplog.text.count("etcd back after")
        second = make_instance(2, host="b")
        b.commit(put=[second])
        wait_for(lambda: a.by_uuid(second.uuid) == second, 5, "a's watch, on its new token")
        assert a._stream_member is not None and caplog.text.count("etcd back after") == back
        assert auth_lab.get(stores.key("instances", second.uuid)) is not None   # root, again
    finally:
        stores.close()
    no_password_in_logs(caplog)


def test_auth_a_wrong_password_stops_start(auth_lab, tmp_path, caplog):
    log_everything(caplog)
    stores = auth_stores(auth_lab, tmp_path, password_file=password_file(
        tmp_path / "wrong", "wrong-" + AUTH_PASSWORD))
    try:
        with pytest.raises(StoreUnavailable) as e:
            stores.open("a")
        message = str(e.value)
        assert re.fullmatch(rf"etcd refused mdserver \(https://\S+: authentication as "
                            rf"{AUTH_USER} failed: etcdserver: authentication failed, invalid "
                            r"user ID or password\)", message), message
        assert AUTH_PASSWORD not in message    # nor the wrong one, which contains it
        assert auth_lab.get(stores.key("hosts", "a")) is None
    finally:
        stores.close()
    no_password_in_logs(caplog)


def test_auth_over_a_client_certificate_with_a_cn_is_refused(auth_lab, tmp_path, caplog):
    """etcd 3.4 refuses every JSON-gateway request over a client certificate
    that has a CN once its users are on: a fleet with both needs CN-less
    client certificates. mdserver says so at start, in etcd's words."""
    log_everything(caplog)
    cert, key = sign_cert(auth_lab.tls_dir, f"cn-{os.urandom(3).hex()}", "/CN=mdserver")
    stores = auth_stores(auth_lab, tmp_path, cert_file=cert, key_file=key)
    try:
        with pytest.raises(StoreUnavailable, match=r"^etcd refused mdserver \(https://\S+: "
                           r"authentication as mdserver failed: CommonName of client sending "
                           r"a request against gateway will be ignored and not used as "
                           r"expected\)$"):
            stores.open("a")
    finally:
        stores.close()
    no_password_in_logs(caplog)
