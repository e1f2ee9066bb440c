"""Which instance records to remove because libvirt no longer has their domain (pure).

Used by `mdserverctl prune` and by mdserver-enroll when it (re)connects. Two
guards: nothing is removed when libvirt lists no domain at all (a libvirtd
still starting, or the wrong connection), and never more than MAX_FRACTION
of this host's records at once unless forced (`mdserverctl prune --yes`).
Only records of this host are ever considered (`this_host`): with a shared
registry, another host's instance is that host's to remove.
"""

from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence, Tuple

MAX_FRACTION = 0.10


def this_host(record: Mapping, host: Optional[str]) -> bool:
    """Whether `record` (an admin API instance record) belongs to this host's
    libvirt. `host` None: the registry is this host's alone."""
    return host is None or record.get("host", host) in (host, "")


def limit(total: int) -> int:
    """How many of `total` records one unforced prune may remove (at least one)."""
    return max(1, int(total * MAX_FRACTION))


@dataclass(frozen=True)
class Decision:
    gone: Tuple[Mapping, ...]        # this host's records libvirt no longer has
    remove: Tuple[Mapping, ...]      # those to remove now (all of gone, or none)
    refused: Optional[str] = None    # why `gone` is not removed, if it is not


def decide(records: Sequence[Mapping], libvirt_uuids: Iterable[str],
           host: Optional[str] = None, force: bool = False) -> Decision:
    """What to prune. `force` (an explicit `prune --yes`) overrides the
    fraction guard only, never the empty-libvirt one."""
    known = {u.lower() for u in libvirt_uuids}
    ours = [r for r in records if this_host(r, host)]
    gone = tuple(r for r in ours if str(r["uuid"]).lower() not in known)
    if not gone:
        return Decision(gone, ())
    if not known:
        return Decision(gone, (), "libvirt lists no domain at all (still starting, or "
                                  "another connection?): nothing removed")
    if not force and len(gone) > limit(len(ours)):
        return Decision(gone, (), f"{len(gone)} of {len(ours)} instances are unknown to "
                                  f"libvirt, more than {MAX_FRACTION:.0%} at once: nothing "
                                  "removed; check, then run `mdserverctl prune --yes`")
    return Decision(gone, gone)
