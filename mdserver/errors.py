"""One exception type per failure, so callers map each to exactly one outcome."""


class MdserverError(Exception):
    """Base of every error mdserver raises on purpose."""


class ConfigError(MdserverError):
    """The configuration file is unreadable, has a bad value or contradicts itself."""

    def __init__(self, path: str, section: str, key: str, message: str):
        self.path, self.section, self.key = path, section, key
        where = f"[{section}] {key}" if key else f"[{section}]" if section else ""
        super().__init__(f"{path}: {where}: {message}" if where else f"{path}: {message}")


class NotFound(MdserverError):
    """No such instance, path or template."""


class UnknownGuest(NotFound):
    """The requesting address belongs to no registered instance."""


class Forbidden(MdserverError):
    """The caller may not do this (wrong source address, PUT on a dated path...)."""


class Unauthorized(MdserverError):
    """An IMDSv2 token is missing (when required), invalid or expired."""


class BadRequest(MdserverError):
    """The request itself is malformed (bad TTL header, bad body...)."""


class BadDomainXML(BadRequest):
    """A libvirt domain XML document cannot be used."""


class PayloadTooLarge(BadRequest):
    """A request body is over its documented limit."""


class Conflict(MdserverError):
    """The request would overwrite something that may be set only once."""


class PoolExhausted(MdserverError):
    """No free address is left in the configured network."""


class StoreCorrupt(MdserverError):
    """The instance database on disk cannot be read."""


class StoreFull(MdserverError):
    """The file system holding the instance database has no space left (ENOSPC,
    EDQUOT): nothing written, and the store goes on once space is freed."""


class StoreLocked(MdserverError):
    """Another process already holds the instance database for writing."""


class AdminSocketTaken(MdserverError):
    """Another mdserver holds or answers on the admin socket: this one does not start."""


class DaemonUnavailable(MdserverError):
    """Nothing (or nothing in time) answers on the admin socket."""


class TemplateError(MdserverError):
    """A user-data template failed to render or rendered to invalid cloud-config."""


class StoreConflict(MdserverError):
    """Someone else changed a record (or claimed its address or name) first: nothing written."""


class StoreUnavailable(MdserverError):
    """The shared store (etcd) cannot be reached: nothing written."""


class ForeignSender(Forbidden):
    """The request comes from an address whose neighbour entry is not the
    instance's MAC (another guest using that address). Logged, rate-limited,
    where it is detected."""

    logged = True


class GuestQueueFull(MdserverError):
    """One address has more requests waiting than any guest's cloud-init makes
    (hundreds of concurrent connections): refused with 429 and Retry-After."""

    def __init__(self, client: str, waiting: int):
        self.client, self.waiting = client, waiting
        super().__init__(f"{waiting} requests from {client} already waiting")
