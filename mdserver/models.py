"""Plain records: an instance and its per-instance settings, with their DB form."""

import re
import sys
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping, Optional, Tuple

# Version of the on-disk record layout; bump it with a converter in store.py.
# 2: settings gained meta, network and route; records gained password_blob
#    and route_pending.
# 3: records gained host (the hypervisor that owns them; a shared store
#    holds several).
SCHEMA_VERSION = 3

# How a guest finds its data (<mds:route>, [libvirt] route).
ROUTES = ("openstack", "ec2", "nocloud-net", "configdrive", "nocloud", "none")
# Routes whose data travels on a seed image, and that image's format.
SEED_ROUTES = ("configdrive", "nocloud")
NETWORK_MODES = ("none", "dhcp", "static")


@dataclass(frozen=True)
class InstanceSettings:
    """What the domain's own <metadata> asks of mdserver (all optional)."""

    template: Optional[str] = None
    hostname: Optional[str] = None
    ssh_keys: Tuple[str, ...] = ()
    password: Optional[str] = None
    # <mds:meta key="k">v</mds:meta>, in document order.
    meta: Tuple[Tuple[str, str], ...] = ()
    network: Optional[str] = None  # one of NETWORK_MODES; None: [mdserver] network_config
    route: Optional[str] = None  # one of ROUTES; None: [libvirt] route

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "InstanceSettings":
        return cls(
            template=d.get("template"),
            hostname=d.get("hostname"),
            ssh_keys=tuple(d.get("ssh_keys") or ()),
            password=d.get("password"),
            meta=tuple((str(k), str(v)) for k, v in d.get("meta") or ()),
            network=d.get("network"),
            route=d.get("route"),
        )


NO_SETTINGS = InstanceSettings()


def _shared_settings(d: Optional[Mapping[str, Any]]) -> InstanceSettings:
    settings = InstanceSettings.from_dict(d) if d else NO_SETTINGS
    return NO_SETTINGS if settings == NO_SETTINGS else settings


@dataclass(frozen=True)
class Instance:
    """One registered libvirt domain, keyed by its UUID."""

    uuid: str
    name: str
    mac: str
    ipv4: str
    hostname: str
    first_seen: float
    last_seen: float
    arch: str = "x86_64"
    settings: InstanceSettings = field(default_factory=InstanceSettings)
    # What the guest POSTed to /openstack/<v>/password (cloudbase-init: an
    # admin password encrypted with the instance's key), once.
    password_blob: Optional[str] = None
    # The definition was given its route while the domain ran: the guest sees
    # it at its next cold boot (the hook's registration at that start clears it).
    route_pending: bool = False
    # The hypervisor ([store] host) whose libvirt runs the domain: only it
    # hands out the address by DHCP, writes the seed image, removes the record.
    host: str = ""

    @property
    def instance_id(self) -> str:
        """The EC2 face's instance-id. Stable per domain: cloud-init re-runs
        first-boot setup when it changes (the other faces serve the UUID)."""
        return "i-" + self.uuid.replace("-", "")[:17]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["settings"]["ssh_keys"] = list(self.settings.ssh_keys)
        d["settings"]["meta"] = [list(kv) for kv in self.settings.meta]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Instance":
        # Every process keeps every record (10,000 on a big host): values
        # most records share (arch, host, empty settings, a hostname equal
        # to the name) are kept once, not once per record as parsed.
        name = d["name"]
        hostname = d["hostname"]
        settings = d.get("settings")
        return cls(
            uuid=d["uuid"],
            name=name,
            mac=d["mac"],
            ipv4=d["ipv4"],
            hostname=name if hostname == name else hostname,
            first_seen=float(d["first_seen"]),
            last_seen=float(d["last_seen"]),
            arch=sys.intern(str(d.get("arch", "x86_64"))),
            settings=_shared_settings(settings),
            password_blob=d.get("password_blob"),
            route_pending=bool(d.get("route_pending", False)),
            host=sys.intern(str(d.get("host", ""))),
        )

    def updated(self, **changes: Any) -> "Instance":
        return replace(self, **changes)


def default_hostname(name: str, uuid: str) -> str:
    """A valid host name from a libvirt domain name (which may hold almost
    anything): lower case, runs of other characters as one '-', at most 63."""
    label = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:63].strip("-")
    return label or "i-" + uuid.replace("-", "")[:12]
