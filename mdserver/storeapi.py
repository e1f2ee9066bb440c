"""The instance store seam: reads, one atomic commit with expected versions, a change feed."""

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, Mapping, Optional, Protocol, Sequence, Tuple

from mdserver.models import Instance


@dataclass(frozen=True)
class Change:
    """One record as it was and as it is now (None: absent)."""

    old: Optional[Instance]
    new: Optional[Instance]

    @property
    def uuid(self) -> str:
        inst = self.new or self.old
        assert inst is not None
        return inst.uuid


Listener = Callable[[Sequence[Change]], None]


class InstanceStore(Protocol):
    """What the registry, the metadata service, the server and mdserverctl use.

    Reads never leave the process (a backend that lives elsewhere answers
    them from a local cache). `commit` is all or nothing: `expect` maps a
    UUID to the version the caller read (0: the record must not exist); if
    any differs, StoreConflict is raised and nothing is written, and by then
    the reads reflect the conflicting write, so the caller may re-read and
    retry. StoreUnavailable: the backend cannot be reached (nothing written).
    """

    host: str  # this hypervisor's name: the owner of what it registers

    def by_uuid(self, uuid: str) -> Optional[Instance]: ...

    def by_mac(self, mac: str) -> Optional[Instance]: ...

    def by_ip(self, ip: str) -> Optional[Instance]: ...

    def by_name(self, name: str) -> Optional[Instance]: ...

    def find(self, key: str) -> Instance: ...

    def freed(self, ip: str) -> Optional[Tuple[float, str]]: ...

    def version(self, uuid: str) -> int: ...

    def __iter__(self) -> Iterator[Instance]: ...

    def __len__(self) -> int: ...

    def commit(self, put: Iterable[Instance] = (), delete: Iterable[str] = (),
               at: float = 0.0, expect: Optional[Mapping[str, int]] = None) -> None: ...

    def subscribe(self, listener: Listener) -> None:
        """Call `listener` with every change, whoever made it (in the writer)."""

    def refresh(self) -> bool:
        """Catch up now (a read-only replica); True if anything changed."""

    def status(self) -> Dict[str, object]:
        """Backend, revision, cache age, records per host: for `mdserverctl store status`."""

    def close(self) -> None: ...


def diff(before: Mapping[str, Instance], after: Mapping[str, Instance]) -> Sequence[Change]:
    """The changes that turn `before` into `after` (both by UUID)."""
    out = [Change(before.get(u), after.get(u)) for u in set(before) | set(after)
           if before.get(u) != after.get(u)]
    return sorted(out, key=lambda c: c.uuid)


def per_host(instances: Iterable[Instance]) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for inst in instances:
        counts[inst.host] = counts.get(inst.host, 0) + 1
    return dict(sorted(counts.items()))
