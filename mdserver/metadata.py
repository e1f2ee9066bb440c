"""The EC2 metadata tree of one instance as plain data, and its rendering as responses."""

import json
import time
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

from mdserver.config import Config
from mdserver.models import Instance

# The dated versions AWS lists at "/", oldest first; every one serves the same tree.
VERSIONS: Tuple[str, ...] = (
    "1.0", "2007-01-19", "2007-03-01", "2007-08-29", "2007-10-10", "2007-12-15",
    "2008-02-01", "2008-09-01", "2009-04-04", "2011-01-01", "2011-05-01", "2012-01-12",
    "2014-02-25", "2014-11-05", "2015-10-20", "2016-04-19", "2016-06-30", "2016-09-02",
    "2018-03-28", "2018-08-17", "2018-09-24", "2019-10-01", "2020-10-27", "2021-01-03",
    "2021-03-23", "2021-07-15", "2022-09-24", "2024-04-11",
)
LATEST = "latest"
KNOWN_VERSIONS = frozenset(VERSIONS + (LATEST,))
VERSION_LISTING = "\n".join(VERSIONS + (LATEST,))
IDENTITY_DOCUMENT_VERSION = "2017-09-30"


class Dir(dict):
    """A directory node. `labels` replaces a child's name in the listing
    (public-keys/ lists `0=name` but serves `0/`)."""

    def __init__(self, entries: Dict[str, "Node"], labels: Optional[Dict[str, str]] = None):
        super().__init__(entries)
        self.labels = labels or {}


Node = Union[str, Dir]


@dataclass(frozen=True)
class Site:
    """The per-host facts every instance's tree shares, taken from the config once."""

    availability_zone: str
    region: str
    instance_type: str
    ami_id: str
    domain: Optional[str]
    network: str
    public_keys: Tuple[Tuple[str, str], ...]

    @classmethod
    def from_config(cls, cfg: Config) -> "Site":
        return cls(
            availability_zone=cfg.mdserver.availability_zone,
            region=cfg.mdserver.region,
            instance_type=cfg.mdserver.instance_type,
            ami_id=cfg.mdserver.ami_id,
            domain=cfg.dnsmasq.domain,
            network=str(cfg.dnsmasq.network),
            public_keys=cfg.public_keys,
        )


def local_hostname(inst: Instance, site: Site) -> str:
    return f"{inst.hostname}.{site.domain}" if site.domain else inst.hostname


def all_keys(inst: Instance, site: Site) -> Tuple[Tuple[str, str], ...]:
    """Configured keys, then the instance's own, each with a name."""
    own = tuple((f"{inst.name}-{i}", k) for i, k in enumerate(inst.settings.ssh_keys))
    return site.public_keys + own


def _short(inst: Instance, width: int = 17) -> str:
    return inst.uuid.replace("-", "")[:width]


def identity_document(inst: Instance, site: Site) -> str:
    doc = {
        "accountId": "000000000000",
        "architecture": inst.arch,
        "availabilityZone": site.availability_zone,
        "billingProducts": None,
        "devpayProductCodes": None,
        "marketplaceProductCodes": None,
        "imageId": site.ami_id,
        "instanceId": inst.instance_id,
        "instanceType": site.instance_type,
        "kernelId": None,
        "pendingTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(inst.first_seen)),
        "privateIp": inst.ipv4,
        "ramdiskId": None,
        "region": site.region,
        "version": IDENTITY_DOCUMENT_VERSION,
    }
    return json.dumps(doc, indent=2)


def build_tree(inst: Instance, site: Site) -> Dir:
    """Everything under /<version>/ but user-data, for one instance."""
    fqdn = local_hostname(inst, site)
    mac_dir = Dir({
        "device-number": "0",
        "interface-id": f"eni-{_short(inst)}",
        "local-hostname": fqdn,
        "local-ipv4s": inst.ipv4,
        "mac": inst.mac,
        "owner-id": "000000000000",
        "security-group-ids": f"sg-{_short(inst)}",
        "security-groups": "default",
        "subnet-id": f"subnet-{_short(inst)}",
        "subnet-ipv4-cidr-block": site.network,
        "vpc-id": f"vpc-{_short(inst)}",
        "vpc-ipv4-cidr-block": site.network,
        "vpc-ipv4-cidr-blocks": site.network,
    })
    meta = {
        "ami-id": site.ami_id,
        "ami-launch-index": "0",
        "ami-manifest-path": "(unknown)",
        "block-device-mapping": Dir({"ami": "vda", "root": "/dev/vda"}),
        "hostname": fqdn,
        "instance-action": "none",
        "instance-id": inst.instance_id,
        "instance-type": site.instance_type,
        "local-hostname": fqdn,
        "local-ipv4": inst.ipv4,
        "mac": inst.mac,
        "network": Dir({"interfaces": Dir({"macs": Dir({inst.mac: mac_dir})})}),
        "placement": Dir({"availability-zone": site.availability_zone,
                          "region": site.region}),
        "public-hostname": fqdn,
        "reservation-id": f"r-{_short(inst)}",
        "security-groups": "default",
        "services": Dir({"domain": "amazonaws.com", "partition": "aws"}),
    }
    keys = all_keys(inst, site)
    if keys:  # AWS omits public-keys/ when there is no key: never list an empty dir
        meta["public-keys"] = Dir(
            {str(i): Dir({"openssh-key": key}) for i, (_, key) in enumerate(keys)},
            labels={str(i): f"{i}={name}" for i, (name, _) in enumerate(keys)})
    dynamic = Dir({"instance-identity": Dir({"document": identity_document(inst, site)})})
    return Dir({"dynamic": dynamic, "meta-data": Dir(meta), "user-data": ""})


def listing(node: Dir) -> str:
    """One name per line, sub-directories with `/`, no trailing newline."""
    return "\n".join(
        node.labels.get(name) or (name + "/" if isinstance(child, Dir) else name)
        for name, child in sorted(node.items()))


def flatten(tree: Dir) -> Dict[str, str]:
    """Every path below a version (no leading or trailing slash) -> response body.

    user-data is rendered per request, so its entry is listed but not served
    from here.
    """
    out: Dict[str, str] = {}

    def walk(node: Node, path: str) -> None:
        if isinstance(node, Dir):
            out[path] = listing(node)
            for name, child in node.items():
                walk(child, f"{path}/{name}" if path else name)
        else:
            out[path] = node

    walk(tree, "")
    del out["user-data"]
    return out
