"""InstanceView: the face-neutral facts of one instance that every face and seed image reads."""

import hashlib
import hmac
import ipaddress
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

from mdserver.config import Config
from mdserver.models import Instance

SEED_BYTES = 512  # what nova puts in random_seed


@dataclass(frozen=True)
class Site:
    """The per-host facts every instance shares, taken from the config once."""

    availability_zone: str
    region: str
    instance_type: str
    ami_id: str
    domain: Optional[str]
    network: str  # CIDR
    gateway: str
    use_dns: bool
    public_keys: Tuple[Tuple[str, str], ...]
    network_config: str = "dhcp"
    route: str = "openstack"
    vendor_data: Optional[str] = None

    @classmethod
    def from_config(cls, cfg: Config, vendor_data: Optional[str] = None) -> "Site":
        return cls(
            availability_zone=cfg.mdserver.availability_zone,
            region=cfg.mdserver.region,
            instance_type=cfg.mdserver.instance_type,
            ami_id=cfg.mdserver.ami_id,
            domain=cfg.dnsmasq.domain,
            network=str(cfg.dnsmasq.network),
            gateway=cfg.dnsmasq.gateway,
            use_dns=cfg.dnsmasq.use_dns,
            public_keys=cfg.public_keys,
            network_config=cfg.mdserver.network_config,
            route=cfg.libvirt.route,
            vendor_data=vendor_data,
        )


@dataclass(frozen=True)
class NetworkFacts:
    """The instance's one NIC as every network-config format describes it."""

    mode: str  # none | dhcp | static
    mac: str
    address: str
    prefix: int
    gateway: str
    dns: Tuple[str, ...]

    @property
    def netmask(self) -> str:
        return str(ipaddress.IPv4Network(f"0.0.0.0/{self.prefix}").netmask)


@dataclass(frozen=True)
class InstanceView:
    """What a guest may learn about itself. Faces read nothing else."""

    name: str
    uuid: str
    hostname: str  # short
    fqdn: str
    mac: str
    ipv4: str
    arch: str
    first_seen: float
    ec2_instance_id: str  # i-<17 hex of the UUID>: the EC2 face's instance-id
    public_keys: Tuple[Tuple[str, str], ...]  # (name, key): configured, then the instance's
    password: Optional[str]  # crypt hash
    password_blob: Optional[str]  # what the guest POSTed to /openstack/.../password
    network: NetworkFacts
    vendor_data: Optional[str]
    meta: Tuple[Tuple[str, str], ...]
    route: str
    random_seed: bytes
    site: Site
    render_userdata: Callable[[], str]  # raises TemplateError
    # What a face derives from the whole view and serves piece by piece (the
    # EC2 tree, flattened): made at the first request, kept with the view,
    # which is made again when its instance changes.
    derived: Dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def instance_id(self) -> str:
        """Every face but EC2 serves the domain UUID (OpenStack's `uuid` must be it)."""
        return self.uuid

    def user_data(self) -> str:
        """Rendered now (templates may change on disk); TemplateError if it fails."""
        return self.render_userdata()


def local_hostname(inst: Instance, site: Site) -> str:
    return f"{inst.hostname}.{site.domain}" if site.domain else inst.hostname


def all_keys(inst: Instance, site: Site) -> Tuple[Tuple[str, str], ...]:
    """Configured keys, then the instance's own, each with a name."""
    own = tuple((f"{inst.name}-{i}", k) for i, k in enumerate(inst.settings.ssh_keys))
    return site.public_keys + own


def network_facts(inst: Instance, site: Site) -> NetworkFacts:
    net = ipaddress.IPv4Network(site.network)
    return NetworkFacts(
        mode=inst.settings.network or site.network_config, mac=inst.mac, address=inst.ipv4,
        prefix=net.prefixlen, gateway=site.gateway,
        # mdserver's dnsmasq answers on the gateway only when use_dns is on.
        dns=(site.gateway,) if site.use_dns else ())


def make_view(inst: Instance, site: Site, password: Optional[str], random_seed: bytes,
              render_userdata: Callable[[], str]) -> InstanceView:
    return InstanceView(
        name=inst.name, uuid=inst.uuid, hostname=inst.hostname,
        fqdn=local_hostname(inst, site), mac=inst.mac, ipv4=inst.ipv4, arch=inst.arch,
        first_seen=inst.first_seen, ec2_instance_id=inst.instance_id,
        public_keys=all_keys(inst, site), password=password,
        password_blob=inst.password_blob, network=network_facts(inst, site),
        vendor_data=site.vendor_data, meta=inst.settings.meta,
        route=inst.settings.route or site.route, random_seed=random_seed, site=site,
        render_userdata=render_userdata)


def derived_seed(key: bytes) -> Callable[[Instance], bytes]:
    """A random seed fixed per instance (seed images must not change when
    nothing else did) and unguessable without the host's secret `key`."""
    def seed(inst: Instance) -> bytes:
        out = b""
        counter = 0
        while len(out) < SEED_BYTES:
            out += hmac.new(key, f"random-seed|{inst.uuid}|{counter}".encode(),
                            hashlib.sha512).digest()
            counter += 1
        return out[:SEED_BYTES]
    return seed
