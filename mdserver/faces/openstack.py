"""The OpenStack face (/openstack, and openstack/ on a config drive): nova's metadata format."""

import base64
import json
from typing import Any, Dict, List, Optional, Tuple

from mdserver import netconfig
from mdserver.faces import JSON, Reply, text, user_data_or_none
from mdserver.view import InstanceView

NAME = "openstack"
# nova's dated versions; cloud-init knows up to 2018-08-27 and takes the
# newest it knows, else "latest".
VERSIONS: Tuple[str, ...] = (
    "2012-08-10", "2013-04-04", "2013-10-17", "2015-10-15", "2016-06-30",
    "2016-10-06", "2017-02-22", "2018-08-27", "2020-10-14",
)
LATEST = "latest"
ALL_VERSIONS = VERSIONS + (LATEST,)
VERSION_LISTING = "\n".join(ALL_VERSIONS)
# The version from which nova serves each file (a version serves what it and
# every earlier one added).
GRIZZLY, HAVANA, LIBERTY, NEWTON_TWO = "2013-04-04", "2013-10-17", "2015-10-15", "2016-10-06"
PROJECT_ID = "0" * 32  # one project: this host
PASSWORD_MAX = 256  # nova's limit for what a guest may POST


def _since(version: str, first: str) -> bool:
    if version == LATEST:
        return True
    return ALL_VERSIONS.index(version) >= ALL_VERSIONS.index(first)


def takes_password(version: str) -> bool:
    """Whether POST <version>/password stores one (nova: from 2013-04-04)."""
    return version in ALL_VERSIONS and _since(version, GRIZZLY)


def meta_data(view: InstanceView, version: str) -> Dict[str, Any]:
    md: Dict[str, Any] = {
        "uuid": view.uuid,
        "meta": dict(view.meta),
        "hostname": view.fqdn,
        "name": view.name,
        "launch_index": 0,
        "availability_zone": view.site.availability_zone,
    }
    if view.public_keys:
        md["public_keys"] = dict(view.public_keys)
        md["keys"] = [{"name": name, "type": "ssh", "data": key}
                      for name, key in view.public_keys]
    if _since(version, GRIZZLY):
        md["random_seed"] = base64.b64encode(view.random_seed).decode()
    if _since(version, LIBERTY):
        md["project_id"] = PROJECT_ID
    if _since(version, "2016-06-30"):
        md["devices"] = []
    return md


def vendor_data(view: InstanceView) -> Dict[str, Any]:
    # cloud-init uses only the "cloud-init" member of the object.
    return {"cloud-init": view.vendor_data} if view.vendor_data else {}


def _json(obj: Any) -> Reply:
    return text(json.dumps(obj, indent=1, sort_keys=True), JSON)


def _file_names(view: InstanceView, version: str) -> List[str]:
    names = ["meta_data.json", "user_data"]
    if _since(version, GRIZZLY):
        names.append("password")
    if _since(version, HAVANA):
        names.append("vendor_data.json")
    if _since(version, LIBERTY) and netconfig.network_data(view.network) is not None:
        names.append("network_data.json")
    if _since(version, NEWTON_TWO):
        names.append("vendor_data2.json")
    return names


def _file(view: InstanceView, version: str, name: str) -> Optional[Reply]:
    if name == "meta_data.json":
        return _json(meta_data(view, version))
    if name == "user_data":
        # Never a 5xx here: cloud-init 22.4 would drop the whole datasource
        # (keys and hostname too). No user-data is the lesser harm.
        body = user_data_or_none(view, NAME)
        return None if body is None else text(body, cacheable=False)
    if name == "password":
        return text(view.password_blob or "")
    if name == "vendor_data.json":
        return _json(vendor_data(view))
    if name == "vendor_data2.json":
        return _json({"static": vendor_data(view)} if view.vendor_data else {})
    if name == "network_data.json":
        data = netconfig.network_data(view.network)
        return None if data is None else _json(data)
    return None


def lookup(view: InstanceView, path: str) -> Optional[Reply]:
    """GET /openstack/<path>: "" lists versions, "<v>" lists files, "<v>/<file>"."""
    if not path.strip("/"):
        return text(VERSION_LISTING)
    version, _, name = path.partition("/")
    if version not in ALL_VERSIONS:
        return None
    name = name.strip("/")
    if not name:
        return text("\n".join(_file_names(view, version)))
    if name not in _file_names(view, version):
        return None
    return _file(view, version, name)


def files(view: InstanceView) -> List[Tuple[str, bytes]]:
    """openstack/<every version>/ as a config drive carries it (no password:
    a drive cannot take a POST)."""
    # One template run for every version: one content, one error line.
    user_data = user_data_or_none(view, NAME)
    out = []
    for version in ALL_VERSIONS:
        for name in _file_names(view, version):
            if name == "user_data":
                if user_data is not None:
                    out.append((f"openstack/{version}/{name}", user_data.encode()))
                continue
            reply = _file(view, version, name) if name != "password" else None
            if reply is not None:
                out.append((f"openstack/{version}/{name}", reply.body))
    return out
