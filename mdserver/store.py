"""The instance database: a JSON snapshot plus an fsynced JSON-lines journal, indexed in memory."""

import fcntl
import json
import logging
import os
import threading
from typing import Dict, Iterator, List, Optional

from mdserver.errors import NotFound, StoreCorrupt, StoreLocked
from mdserver.fsutil import atomic_write, fsync_dir
from mdserver.models import SCHEMA_VERSION, Instance

log = logging.getLogger(__name__)

# The journal is folded into the snapshot once it holds this many entries or
# as many as the snapshot has records, whichever is larger: a registration
# then costs one fsynced line plus, amortised, a bounded share of a rewrite.
MIN_COMPACT = 1000


class Store:
    """All instances, keyed by UUID and indexed by MAC, IPv4 and name.

    Reads take no lock (they see one consistent dict per index); writes are
    serialised by one lock and are durable before they return.
    """

    def __init__(self, path: str, writable: bool = True):
        self.path = path
        self.journal_path = path + ".journal"
        self.writable = writable
        self._lock = threading.Lock()
        self._lockfile: Optional[int] = None
        self._by_uuid: Dict[str, Instance] = {}
        self._by_mac: Dict[str, Instance] = {}
        self._by_ip: Dict[str, Instance] = {}
        self._by_name: Dict[str, Instance] = {}
        self._journal_entries = 0
        self._journal = None
        if writable:
            self._take_lock()
        self._load()
        if writable:
            self._open_journal()

    # -- loading -------------------------------------------------------------

    def _take_lock(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLocked(f"{self.path} is in use by another process") from None
        self._lockfile = fd

    def _load(self) -> None:
        try:
            with open(self.path, "rb") as f:
                snapshot = json.load(f)
        except FileNotFoundError:
            snapshot = {"schema": SCHEMA_VERSION, "instances": []}
        except (OSError, ValueError) as e:
            raise StoreCorrupt(f"{self.path}: {e}") from None
        if not isinstance(snapshot, dict) or "schema" not in snapshot:
            raise StoreCorrupt(f"{self.path}: not an mdserver database (no schema version)")
        if snapshot["schema"] != SCHEMA_VERSION:
            raise StoreCorrupt(f"{self.path}: schema {snapshot['schema']} is not "
                               f"{SCHEMA_VERSION}")
        try:
            for record in snapshot["instances"]:
                self._index(Instance.from_dict(record))
        except (KeyError, TypeError, ValueError) as e:
            raise StoreCorrupt(f"{self.path}: bad record: {e!r}") from None
        self._replay()

    def _replay(self) -> None:
        try:
            with open(self.journal_path, "rb") as f:
                lines = f.read().split(b"\n")
        except FileNotFoundError:
            return
        # A crash mid-append leaves at most one torn last line (no newline):
        # that write never returned, so dropping it loses nothing promised.
        torn = lines.pop()
        if torn:
            log.warning("%s: dropping an incomplete last entry", self.journal_path)
        for number, line in enumerate(lines, 1):
            try:
                entry = json.loads(line)
                if entry["op"] == "put":
                    self._index(Instance.from_dict(entry["instance"]))
                elif entry["op"] == "del":
                    self._unindex(entry["uuid"])
                else:
                    raise ValueError(f"unknown op {entry['op']!r}")
            except (KeyError, TypeError, ValueError) as e:
                raise StoreCorrupt(f"{self.journal_path}:{number}: {e!r}") from None
        self._journal_entries = len(lines)
        if torn and self.writable:
            self._compact()

    # -- indexes (callers hold the lock, or are loading) ----------------------

    def _index(self, inst: Instance) -> None:
        self._unindex(inst.uuid)
        # MAC, IP and name are unique per host; the service resolves
        # conflicts before it writes, so the newest record simply wins here.
        for index, key in self._keys(inst):
            index[key] = inst
        self._by_uuid[inst.uuid] = inst

    def _unindex(self, uuid: str) -> None:
        old = self._by_uuid.pop(uuid, None)
        if old is None:
            return
        for index, key in self._keys(old):
            if index.get(key) is old:
                del index[key]

    def _keys(self, inst: Instance):
        return ((self._by_mac, inst.mac), (self._by_ip, inst.ipv4), (self._by_name, inst.name))

    # -- reads ---------------------------------------------------------------

    def by_ip(self, ip: str) -> Optional[Instance]:
        return self._by_ip.get(ip)

    def by_mac(self, mac: str) -> Optional[Instance]:
        return self._by_mac.get(mac.lower())

    def by_uuid(self, uuid: str) -> Optional[Instance]:
        return self._by_uuid.get(uuid.lower())

    def by_name(self, name: str) -> Optional[Instance]:
        return self._by_name.get(name)

    def find(self, key: str) -> Instance:
        """An instance by name, UUID, MAC or IPv4 address, or NotFound."""
        for lookup in (self.by_name, self.by_uuid, self.by_mac, self.by_ip):
            inst = lookup(key)
            if inst is not None:
                return inst
        raise NotFound(f"no instance {key!r}")

    def __iter__(self) -> Iterator[Instance]:
        return iter(list(self._by_uuid.values()))

    def __len__(self) -> int:
        return len(self._by_uuid)

    # -- writes --------------------------------------------------------------

    def put(self, inst: Instance) -> None:
        """Add or replace the record with this UUID, durably."""
        self.put_many([inst])

    def put_many(self, instances: List[Instance]) -> None:
        """Add or replace several records with one durable write (imports)."""
        with self._lock:
            self._append([{"op": "put", "instance": i.to_dict()} for i in instances])
            for inst in instances:
                self._index(inst)
            self._maybe_compact()

    def remove(self, uuid: str) -> Instance:
        """Delete the record with this UUID, durably; NotFound if there is none."""
        with self._lock:
            old = self._by_uuid.get(uuid)
            if old is None:
                raise NotFound(f"no instance {uuid!r}")
            self._append([{"op": "del", "uuid": uuid}])
            self._unindex(uuid)
            self._maybe_compact()
            return old

    def _append(self, entries: List[dict]) -> None:
        if self._journal is None:
            raise StoreLocked(f"{self.path} is open read-only")
        data = b"".join(json.dumps(e, separators=(",", ":"), sort_keys=True).encode() + b"\n"
                        for e in entries)
        created = self._journal.tell() == 0
        self._journal.write(data)
        self._journal.flush()
        os.fsync(self._journal.fileno())
        if created:
            fsync_dir(os.path.dirname(os.path.abspath(self.journal_path)))
        self._journal_entries += len(entries)

    def _maybe_compact(self) -> None:
        if self._journal_entries >= max(MIN_COMPACT, len(self._by_uuid)):
            self._compact()

    def _compact(self) -> None:
        """Fold the journal into a new snapshot; replaying the old journal
        over it is harmless, so a crash between the two steps loses nothing."""
        records: List[dict] = [i.to_dict() for i in self._by_uuid.values()]
        data = json.dumps({"schema": SCHEMA_VERSION, "instances": records},
                          separators=(",", ":"), sort_keys=True).encode()
        atomic_write(self.path, data, 0o640)
        atomic_write(self.journal_path, b"", 0o640)
        if self._journal is not None:
            self._journal.close()
            self._open_journal()
        self._journal_entries = 0

    def _open_journal(self) -> None:
        # Records may hold password hashes: not world-readable.
        fd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._journal = os.fdopen(fd, "ab")

    def close(self) -> None:
        with self._lock:
            if self._journal is not None:
                self._journal.close()
                self._journal = None
            if self._lockfile is not None:
                os.close(self._lockfile)
                self._lockfile = None
