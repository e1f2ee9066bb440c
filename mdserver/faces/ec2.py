"""The EC2 face: the meta-data tree of one instance, its versions, listings and identity document."""

import json
import time
from typing import Any, Dict, List, Optional, Tuple, Union

from mdserver.faces import BINARY, Reply, text
from mdserver.view import InstanceView

NAME = "ec2"

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


def _short(view: InstanceView, width: int = 17) -> str:
    return view.uuid.replace("-", "")[:width]


def identity_document(view: InstanceView) -> str:
    doc = {
        "accountId": "000000000000",
        "architecture": view.arch,
        "availabilityZone": view.site.availability_zone,
        "billingProducts": None,
        "devpayProductCodes": None,
        "marketplaceProductCodes": None,
        "imageId": view.site.ami_id,
        "instanceId": view.ec2_instance_id,
        "instanceType": view.site.instance_type,
        "kernelId": None,
        "pendingTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(view.first_seen)),
        "privateIp": view.ipv4,
        "ramdiskId": None,
        "region": view.site.region,
        "version": IDENTITY_DOCUMENT_VERSION,
    }
    return json.dumps(doc, indent=2)


def build_tree(view: InstanceView) -> Dir:
    """Everything under /<version>/ but user-data, for one instance."""
    site, fqdn = view.site, view.fqdn
    mac_dir = Dir({
        "device-number": "0",
        "interface-id": f"eni-{_short(view)}",
        "local-hostname": fqdn,
        "local-ipv4s": view.ipv4,
        "mac": view.mac,
        "owner-id": "000000000000",
        "security-group-ids": f"sg-{_short(view)}",
        "security-groups": "default",
        "subnet-id": f"subnet-{_short(view)}",
        "subnet-ipv4-cidr-block": site.network,
        "vpc-id": f"vpc-{_short(view)}",
        "vpc-ipv4-cidr-block": site.network,
        "vpc-ipv4-cidr-blocks": site.network,
    })
    meta: Dict[str, Node] = {
        "ami-id": site.ami_id,
        "ami-launch-index": "0",
        "ami-manifest-path": "(unknown)",
        "block-device-mapping": Dir({"ami": "vda", "root": "/dev/vda"}),
        "hostname": fqdn,
        "instance-action": "none",
        "instance-id": view.ec2_instance_id,
        "instance-type": site.instance_type,
        "local-hostname": fqdn,
        "local-ipv4": view.ipv4,
        "mac": view.mac,
        "network": Dir({"interfaces": Dir({"macs": Dir({view.mac: mac_dir})})}),
        "placement": Dir({"availability-zone": site.availability_zone,
                          "region": site.region}),
        "public-hostname": fqdn,
        "reservation-id": f"r-{_short(view)}",
        "security-groups": "default",
        "services": Dir({"domain": "amazonaws.com", "partition": "aws"}),
    }
    keys = view.public_keys
    if keys:  # AWS omits public-keys/ when there is no key: never list an empty dir
        meta["public-keys"] = Dir(
            {str(i): Dir({"openssh-key": key}) for i, (_, key) in enumerate(keys)},
            labels={str(i): f"{i}={one_line(name)}" for i, (name, _) in enumerate(keys)})
    dynamic = Dir({"instance-identity": Dir({"document": identity_document(view)})})
    return Dir({"dynamic": dynamic, "meta-data": Dir(meta), "user-data": ""})


def one_line(name: str) -> str:
    """`name` as one listing line. cloud-init splits a listing with
    str.splitlines(), and a domain name (in its keys' names) may hold \\r,
    \\x85, \\u2028 or, from older libvirt, \\n: each would make the rest of
    the name an entry of its own, one that is not there (404)."""
    return " ".join(name.splitlines())


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


def lookup(view: InstanceView, path: str) -> Optional[Reply]:
    """GET /<version>/<path...>; `path` is "latest/meta-data/..." ("" lists versions)."""
    if not path:
        return text(VERSION_LISTING)
    version, _, rest = path.partition("/")
    if version not in KNOWN_VERSIONS:
        return None
    rest = rest.strip("/")
    if rest == "user-data":
        # A failing template is a 500 here, as before: the EC2 datasource
        # retries it, and guests on this route were configured that way.
        return Reply(view.user_data().encode(), BINARY, cacheable=False)
    flat = view.derived.get(NAME)
    if flat is None:
        # Once per instance, not once per path: a crawl asks for ~45 of them.
        flat = view.derived[NAME] = flatten(build_tree(view))
    body = flat.get(rest)
    return None if body is None else text(body)


def _nested(node: Node) -> Any:
    if isinstance(node, Dir):
        return {name: _nested(child) for name, child in sorted(node.items())}
    return node


def files(view: InstanceView) -> List[Tuple[str, bytes]]:
    """What a config drive carries of EC2: the meta-data tree as one JSON document."""
    meta = _nested(build_tree(view)["meta-data"])
    return [("ec2/latest/meta-data.json", json.dumps(meta, indent=1).encode())]
