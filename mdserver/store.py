"""The local instance store: a JSON snapshot plus an fsynced JSON-lines journal, indexed in memory."""

import errno
import fcntl
import json
import logging
import os
import threading
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

from mdserver import legacy
from mdserver.errors import NotFound, StoreConflict, StoreCorrupt, StoreFull, StoreLocked
from mdserver.fsutil import atomic_write, fsync_dir, make_dir
from mdserver.models import SCHEMA_VERSION, Instance
from mdserver.sharedrev import SharedRevision
from mdserver.storeapi import Change, Listener, per_host

log = logging.getLogger(__name__)

# The journal is folded into the snapshot once it holds this many entries or
# as many as the snapshot has records, whichever is larger: a registration
# then costs one fsynced line plus, amortised, a bounded share of a rewrite.
MIN_COMPACT = 1000

# A full file system (or a user's quota) is the one write failure the admin
# fixes by freeing space: StoreFull, and the store goes on once they have.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class _Index:
    """Instances by UUID, MAC, IPv4 and name, and the addresses freed lately."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.by_uuid: Dict[str, Instance] = {}
        self.by_mac: Dict[str, Instance] = {}
        self.by_ip: Dict[str, Instance] = {}
        self.by_name: Dict[str, Instance] = {}
        # ip -> (time freed, UUID that had it): allocation keeps these out of
        # use for a lease time.
        self.freed: Dict[str, Tuple[float, str]] = {}
        # uuid -> revision of the transaction that last wrote it (its version)
        self.versions: Dict[str, int] = {}
        self.rev = 0

    def record(self, d: Union[Instance, Mapping[str, Any]]) -> Instance:
        # Records written before schema 3 name no host: they are this store's.
        inst = d if isinstance(d, Instance) else Instance.from_dict(d)
        return inst if inst.host else inst.updated(host=self.host)

    def _keys(self, inst: Instance):
        return ((self.by_mac, inst.mac), (self.by_ip, inst.ipv4), (self.by_name, inst.name))

    def put(self, inst: Instance) -> None:
        self._unindex(inst.uuid)
        # MAC, IP and name are unique per host; the registry resolves
        # conflicts before it writes, so the newest record simply wins here.
        for index, key in self._keys(inst):
            index[key] = inst
        self.by_uuid[inst.uuid] = inst
        self.versions[inst.uuid] = self.rev
        self.freed.pop(inst.ipv4, None)

    def delete(self, uuid: str, at: float) -> None:
        old = self._unindex(uuid)
        if old is not None:
            self.freed[old.ipv4] = (at, uuid)

    def _unindex(self, uuid: str) -> Optional[Instance]:
        old = self.by_uuid.pop(uuid, None)
        self.versions.pop(uuid, None)
        if old is not None:
            for index, key in self._keys(old):
                if index.get(key) is old:
                    del index[key]
        return old

    def apply(self, entry: dict) -> None:
        """One journal line: a transaction, removals first."""
        at = float(entry.get("at", 0.0))
        self.rev = int(entry.get("rev", self.rev + 1))
        for uuid in entry.get("del", ()):
            self.delete(uuid, at)
        for record in entry.get("put", ()):
            self.put(self.record(record))


def _from_v1(snapshot: dict) -> dict:
    # Schema 2 added optional fields (settings meta/network/route, the
    # password blob) whose absence means "not set": the records read as
    # they are. Journal lines carry no version and read the same way.
    return dict(snapshot, schema=2)


def _from_v2(snapshot: dict, host: str) -> dict:
    # Schema 3 names each record's host: a local store's records are all its
    # own host's (its `host`, [store] host).
    return dict(snapshot, schema=3,
                instances=[dict(r, host=r.get("host") or host) for r in snapshot["instances"]])


# schema -> converter to the next schema; a database written by an earlier
# mdserver is upgraded in memory and written in the new form at the next
# compaction.
CONVERTERS = {1: lambda snapshot, host: _from_v1(snapshot), 2: _from_v2}


def upgrade(snapshot: dict, path: str, host: str = "") -> dict:
    """`snapshot` in SCHEMA_VERSION's layout, or StoreCorrupt for an unknown schema."""
    while snapshot["schema"] != SCHEMA_VERSION:
        convert = CONVERTERS.get(snapshot["schema"])
        if convert is None:
            raise StoreCorrupt(f"{path}: schema {snapshot['schema']!r} is not one this "
                               f"mdserver reads (1..{SCHEMA_VERSION})")
        try:
            snapshot = convert(snapshot, host)
        except (KeyError, TypeError, AttributeError) as e:
            raise StoreCorrupt(f"{path}: bad record: {e!r}") from None
    return snapshot


def _record_hook(d: Dict[str, Any]) -> Any:
    """json's object_hook: an instance record becomes an Instance as soon as
    it is parsed. Parsed whole first, 10,000 records' dicts took ~15 MB per
    process (every process holds every record), and once freed they left
    the heap fragmented: measured 40.8 MB for a 10,000-instance store, less
    than half that converted as parsed."""
    if "uuid" in d and "first_seen" in d:
        return Instance.from_dict(d)
    return d


def _parse(data: bytes) -> Any:
    """A journal line or a current-schema snapshot, records as Instances."""
    return json.loads(data, object_hook=_record_hook)


def _encode(entry: dict) -> bytes:
    return json.dumps(entry, separators=(",", ":"), sort_keys=True).encode() + b"\n"


class Store:
    """The `local` InstanceStore: all instances, keyed by UUID and indexed by
    MAC, IPv4 and name.

    One process writes (it holds an flock); others may open the same files
    read-only and follow the writer with refresh(). Writes are durable before
    they return; a transaction is one journal line, so it is all or nothing.
    A record's version is the number of the transaction that last wrote it.
    """

    def __init__(self, path: str, writable: bool = True, freed_retention: float = 86400.0,
                 host: str = ""):
        self.path = path
        self.host = host
        self._listeners: List[Listener] = []
        self.journal_path = path + ".journal"
        self.writable = writable
        self.freed_retention = freed_retention
        self._lock = threading.RLock()
        self._lockfile: Optional[int] = None
        # The writer's journal, unbuffered: a failed append must leave no
        # bytes behind in a buffer that a later flush would add to the file.
        self._journal: Optional[int] = None
        self._journal_ino: Optional[int] = None
        # Journal bytes up to the end of the last complete, acknowledged line
        # (the writer: the file's size, unless an append was cut off).
        self._offset = 0
        self._entries = 0
        # An append failed and its bytes could not be cut off yet: the next
        # append cuts them first, so it never glues onto a torn line.
        self._torn = False
        # A compaction failed (the journal still holds everything): logged
        # once, tried again at the next commit, logged again once it works.
        self._compact_failing = False
        self._idx = _Index(host)
        # The writer's revision, shared with the replicas (catch_up).
        self.revision_path = path + ".rev"
        self._shared: Optional[SharedRevision] = None
        if writable:
            self._take_lock()
        try:
            self._reload()
            if writable and self._journal is None:
                self._open_journal()
            if writable:
                self._shared = SharedRevision.create(self.revision_path, self._idx.rev)
        except BaseException:
            self.close()  # a refused database keeps no lock (nor its file system busy)
            raise

    # -- loading and following -------------------------------------------------

    def _take_lock(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        make_dir(directory)
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLocked(f"{self.path} is in use by another process") from None
        self._lockfile = fd

    def _read_snapshot(self, idx: _Index) -> None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return
        except OSError as e:
            raise StoreCorrupt(f"{self.path}: {e}") from None
        try:
            snapshot = _parse(data)
        except (ValueError, KeyError, TypeError, AttributeError):
            snapshot = None  # told below, by the plain parse and the checks after it
        if not (isinstance(snapshot, dict) and snapshot.get("schema") == SCHEMA_VERSION):
            # An earlier schema or md_server's list (converted from the records
            # as parsed, once, at an upgrade), or a bad file.
            try:
                snapshot = json.loads(data)
            except ValueError as e:
                raise StoreCorrupt(f"{self.path}: {e}") from None
        del data
        if isinstance(snapshot, list):
            snapshot = self._import_legacy(snapshot)
        if not isinstance(snapshot, dict) or "schema" not in snapshot:
            raise StoreCorrupt(f"{self.path}: not an mdserver database (no schema version)")
        snapshot = upgrade(snapshot, self.path, self.host)
        try:
            idx.rev = int(snapshot.get("rev", 1))
            for record in snapshot["instances"]:
                idx.put(idx.record(record))
            for ip, (at, uuid) in snapshot.get("freed", {}).items():
                idx.freed[ip] = (float(at), uuid)
        except (KeyError, TypeError, ValueError) as e:
            raise StoreCorrupt(f"{self.path}: bad record: {e!r}") from None

    def _import_legacy(self, records: list) -> dict:
        """An md_server 0.6 database: convert it (writer only), keeping a backup."""
        if not self.writable:
            raise StoreCorrupt(f"{self.path}: md_server 0.6 database; start mdserver "
                               "once to convert it")
        try:
            instances = legacy.convert(records)
        except ValueError as e:
            raise StoreCorrupt(f"{self.path}: md_server 0.6 database: {e}") from None
        backup = self.path + ".md_server-0.6.bak"
        with open(self.path, "rb") as f:
            atomic_write(backup, f.read(), 0o640)
        snapshot = {"schema": SCHEMA_VERSION, "instances": [i.to_dict() for i in instances],
                    "freed": {}}
        atomic_write(self.path, json.dumps(snapshot).encode(), 0o640)
        log.warning("%s: converted %d md_server 0.6 records (backup: %s)", self.path,
                    len(instances), backup)
        return snapshot

    def _reload(self) -> None:
        """Snapshot plus journal, from scratch. The journal is opened before
        the snapshot is read: a writer that compacts writes the snapshot
        before it replaces the journal, so this never misses an entry."""
        idx = _Index(self.host)
        try:
            jf = open(self.journal_path, "rb")
        except FileNotFoundError:
            jf = None
        try:
            self._read_snapshot(idx)
            self._journal_ino = os.fstat(jf.fileno()).st_ino if jf else None
            data = jf.read() if jf else b""
        finally:
            if jf:
                jf.close()
        self._offset, self._entries = 0, 0
        torn = self._replay(idx, data)
        self._idx = idx
        if torn and self.writable:
            # A crash mid-append left at most one torn last line; that write
            # never returned, so dropping it loses nothing promised. Cut off,
            # not compacted away: truncating needs no space, so a full disk
            # does not keep the daemon from starting.
            log.warning("%s: dropping an incomplete last entry", self.journal_path)
            os.truncate(self.journal_path, self._offset)

    def _replay(self, idx: _Index, data: bytes) -> bool:
        """Apply complete lines of `data` (journal bytes from self._offset);
        True if an incomplete line is left at the end."""
        end = data.rfind(b"\n") + 1
        for number, line in enumerate(data[:end].splitlines(), self._entries + 1):
            try:
                idx.apply(_parse(line))
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise StoreCorrupt(f"{self.journal_path}:{number}: {e!r}") from None
            self._entries = number
        self._offset += end
        return end < len(data)

    def refresh(self) -> bool:
        """Read-only replica: catch up with the writer. True if anything changed."""
        with self._lock:
            try:
                st = os.stat(self.journal_path)
            except FileNotFoundError:
                st = None
            if (st.st_ino if st else None) != self._journal_ino:
                self._reload()  # compacted (or created) meanwhile
                return True
            if st is None or st.st_size == self._offset:
                return False
            if st.st_size < self._offset:
                # The writer cut off a line whose fsync failed after this
                # replica had read it: start again from what is on disk.
                self._reload()
                return True
            before = self._entries
            with open(self.journal_path, "rb") as f:
                f.seek(self._offset)
                self._replay(self._idx, f.read())
            return self._entries != before

    def catch_up(self) -> None:
        """Read-only replica, before each guest request: refresh if the
        writer's revision moved. A read of shared memory, so every request
        sees every write acknowledged before it, in every worker, for the
        price of a comparison (a stat when the writer has not started yet)."""
        shared = self._shared
        if shared is None:
            shared = self._shared = SharedRevision.open(self.revision_path)
            if shared is None:
                self.refresh()
                return
        if shared.get() != self._idx.rev:
            self.refresh()

    # -- reads -----------------------------------------------------------------

    def by_ip(self, ip: str) -> Optional[Instance]:
        return self._idx.by_ip.get(ip)

    def by_mac(self, mac: str) -> Optional[Instance]:
        return self._idx.by_mac.get(mac.lower())

    def by_uuid(self, uuid: str) -> Optional[Instance]:
        return self._idx.by_uuid.get(uuid.lower())

    def by_name(self, name: str) -> Optional[Instance]:
        return self._idx.by_name.get(name)

    def find(self, key: str) -> Instance:
        """An instance by name, UUID, MAC or IPv4 address, or NotFound."""
        for lookup in (self.by_name, self.by_uuid, self.by_mac, self.by_ip):
            inst = lookup(key)
            if inst is not None:
                return inst
        raise NotFound(f"no instance {key!r}")

    def freed(self, ip: str) -> Optional[Tuple[float, str]]:
        """(when, by which UUID) `ip` was last freed, if it is still remembered."""
        return self._idx.freed.get(ip)

    def version(self, uuid: str) -> int:
        """The revision that last wrote this record; 0 if there is none."""
        return self._idx.versions.get(uuid.lower(), 0)

    def __iter__(self) -> Iterator[Instance]:
        return iter(list(self._idx.by_uuid.values()))

    def __len__(self) -> int:
        return len(self._idx.by_uuid)

    # -- writes ----------------------------------------------------------------

    def put(self, inst: Instance) -> None:
        """Add or replace the record with this UUID, durably."""
        self.commit(put=[inst])

    def put_many(self, instances: Iterable[Instance]) -> None:
        """Add or replace several records in one durable write (imports)."""
        self.commit(put=list(instances))

    def remove(self, uuid: str, at: float) -> Instance:
        """Delete the record with this UUID, durably, remembering when its
        address was freed; NotFound if there is none."""
        with self._lock:
            old = self.by_uuid(uuid)
            if old is None:
                raise NotFound(f"no instance {uuid!r}")
            self.commit(delete=[uuid], at=at)
            return old

    def commit(self, put: Iterable[Instance] = (), delete: Iterable[str] = (),
               at: float = 0.0, expect: Optional[Mapping[str, int]] = None) -> None:
        """One transaction (removals, then puts) as one durable journal line;
        StoreConflict (nothing written) if a record's version is not `expect`'s."""
        put, delete = list(put), list(delete)
        with self._lock:
            if self._journal is None:
                raise StoreLocked(f"{self.path} is open read-only")
            for uuid, version in (expect or {}).items():
                if self.version(uuid) != version:
                    raise StoreConflict(f"instance {uuid} changed meanwhile")
            before = {u: self._idx.by_uuid.get(u) for u in delete + [i.uuid for i in put]}
            entry = {"at": at, "del": delete, "put": [i.to_dict() for i in put],
                     "rev": self._idx.rev + 1}
            data = _encode(entry)
            # Written (durably) before it is applied: a failed write leaves
            # the indexes as they were.
            self._append(self._journal, data)
            self._idx.rev += 1
            for uuid in delete:
                self._idx.delete(uuid, at)
            for inst in put:
                self._idx.put(inst)
            self._offset += len(data)
            self._entries += 1
            if self._shared is not None:
                self._shared.set(self._idx.rev)
            if self._entries >= max(MIN_COMPACT, len(self)):
                self._try_compact()
            changes = [Change(old, self._idx.by_uuid.get(u)) for u, old in before.items()
                       if old is not self._idx.by_uuid.get(u)]
            # In the writer's lock: listeners see changes in commit order.
            for listener in self._listeners:
                listener(changes)

    def _append(self, fd: int, data: bytes) -> None:
        """One journal line, durable; or StoreFull (or the OSError) with the
        journal cut back to its last complete line, so nothing of it is left."""
        try:
            if self._torn:
                os.ftruncate(fd, self._offset)
                self._torn = False
            view = memoryview(data)
            while view:  # a write may be short (the disk filled up midway)
                view = view[os.write(fd, view):]
            os.fsync(fd)
            if self._offset == 0:  # created (or emptied by a compaction) just now
                fsync_dir(os.path.dirname(os.path.abspath(self.journal_path)))
        except OSError as e:
            self._cut(fd)
            if e.errno in NO_SPACE:
                raise StoreFull(f"{self.journal_path}: {e.strerror}: nothing written "
                                "(free space there; no restart needed)") from None
            raise

    def _cut(self, fd: int) -> None:
        # O_APPEND: the next line goes where this cut leaves the end.
        try:
            os.ftruncate(fd, self._offset)
        except OSError:
            self._torn = True  # the next append tries again, before it writes

    def _try_compact(self) -> None:
        """Compact; if that fails, the journal (already durable) keeps every
        record and the next commit tries again: the commit itself succeeded."""
        try:
            self._compact()
        except OSError as e:
            if not self._compact_failing:
                log.error("%s: cannot compact the journal (%s); it keeps every record, "
                          "compaction is tried again at each write", self.path,
                          e.strerror or e)
                self._compact_failing = True
            return
        if self._compact_failing:
            log.info("%s: compacted again", self.path)
            self._compact_failing = False

    def subscribe(self, listener: Listener) -> None:
        """The change feed: this store's writer is its only source of changes."""
        self._listeners.append(listener)

    def status(self) -> Dict[str, object]:
        return {"backend": "local", "path": self.path, "host": self.host,
                "revision": self._idx.rev, "cache_age": 0.0,
                "records": per_host(self)}

    def _compact(self) -> None:
        """Fold the journal into a new snapshot, then start an empty journal.
        Replaying the old journal over the new snapshot is harmless, so a
        crash between the two steps loses nothing."""
        idx = self._idx
        newest = max((at for at, _ in idx.freed.values()), default=0.0)
        freed = {ip: v for ip, v in idx.freed.items() if v[0] >= newest - self.freed_retention}
        snapshot = {"schema": SCHEMA_VERSION, "rev": idx.rev,
                    "instances": [i.to_dict() for i in idx.by_uuid.values()],
                    "freed": {ip: list(v) for ip, v in freed.items()}}
        atomic_write(self.path, json.dumps(snapshot, separators=(",", ":"),
                                           sort_keys=True).encode(), 0o640)
        # Pruned in memory only once the snapshot holds the result, so a
        # failed compaction changes nothing.
        idx.freed = freed
        atomic_write(self.journal_path, b"", 0o640)
        old = self._journal
        self._open_journal()
        if old is not None:
            os.close(old)
        self._offset, self._entries = 0, 0
        self._torn = False  # a new, empty file

    def _open_journal(self) -> None:
        # Records may hold password hashes: not world-readable.
        fd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._journal = fd
        st = os.fstat(fd)
        self._journal_ino = st.st_ino
        self._offset = st.st_size

    def close(self) -> None:
        with self._lock:
            if self._shared is not None:
                self._shared.close()
                self._shared = None
            if self._journal is not None:
                os.close(self._journal)
                self._journal = None
            if self._lockfile is not None:
                os.close(self._lockfile)
                self._lockfile = None
