"""What libvirt says of the domains behind instance records: the state `mdserverctl list` shows.

`state_of` is pure; `survey` asks libvirt (libvirt-python, [libvirt] uri,
as `mdserverctl route` does) and is the only part that does I/O.
"""

import importlib
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

from mdserver import pruning, routes
from mdserver.errors import BadDomainXML, MdserverError

REGISTERED = "registered"
PENDING = "pending: next cold boot"   # the definition's route is not the running guest's
NOT_DEFINED = "not defined"           # libvirt no longer has the domain (`mdserverctl prune`)
OTHER_HOST = "other host"             # a shared registry: another hypervisor's domain
UNKNOWN = "unknown"                   # libvirt could not be asked
STATES = (REGISTERED, PENDING, NOT_DEFINED, OTHER_HOST, UNKNOWN)


@dataclass(frozen=True)
class Domain:
    active: bool
    pending: bool  # running with another route than its definition's (routes.pending)


Survey = Mapping[str, Domain]  # lower-case UUID -> what libvirt says


def state_of(record: Mapping, survey: Optional[Survey], host: Optional[str]) -> str:
    """The state of an admin API instance record; `survey` None: libvirt
    could not be asked. A domain libvirt has here is judged whoever's record
    it is (it may just have migrated in); one it lacks is "not defined" only
    if it is this host's to have (pruning.this_host)."""
    if survey is None:
        return UNKNOWN
    domain = survey.get(str(record.get("uuid", "")).lower())
    if domain is not None:
        return PENDING if domain.pending else REGISTERED
    return NOT_DEFINED if pruning.this_host(record, host) else OTHER_HOST


def load_libvirt() -> Any:
    """libvirt's Python binding, or MdserverError saying how to get it."""
    try:
        return importlib.import_module("libvirt")
    except ImportError:
        raise MdserverError("libvirt's Python binding is missing (install python3-libvirt "
                            "or pip install 'mdserver[enroll]')") from None


def open_libvirt(uri: str) -> Tuple[Any, Any]:
    """(the binding, a connection to `uri`); MdserverError in one line if not."""
    libvirt = load_libvirt()
    libvirt.registerErrorHandler(lambda ctx, err: None, None)  # errors are raised here
    try:
        return libvirt, libvirt.open(uri)
    except libvirt.libvirtError as e:
        raise MdserverError(f"cannot connect to {uri}: {_message(e)}") from None


def _message(error: Any) -> str:
    """libvirt's message, first line only."""
    text = str(error.get_error_message() or error).strip()
    return text.splitlines()[0] if text else "unknown error"


def survey(uri: str, uuids: Optional[Iterable[str]] = None) -> Dict[str, Domain]:
    """Every domain of `uri` (or only those of `uuids` it has), by lower-case
    UUID. A running domain's live and inactive XML are compared for its
    pending route; one that goes away meanwhile is left out."""
    libvirt, conn = open_libvirt(uri)
    try:
        if uuids is None:
            doms = conn.listAllDomains(0)
        else:
            doms = []
            for uuid in uuids:
                try:
                    doms.append(conn.lookupByUUIDString(uuid))
                except libvirt.libvirtError as e:
                    if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                        raise MdserverError(f"libvirt ({uri}): {_message(e)}") from None
        out: Dict[str, Domain] = {}
        for dom in doms:
            try:
                uuid = dom.UUIDString().lower()
                active = bool(dom.isActive())
                live = dom.XMLDesc(0) if active else None
                definition = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) if active else ""
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    continue  # undefined meanwhile
                raise MdserverError(f"libvirt ({uri}): {_message(e)}") from None
            try:
                pending = active and routes.pending(live, definition)
            except (BadDomainXML, ValueError):
                pending = False  # not a document mdserver could have edited
            out[uuid] = Domain(active, pending)
        return out
    finally:
        try:
            conn.close()
        except libvirt.libvirtError:
            pass
