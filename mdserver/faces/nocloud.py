"""The NoCloud face (/nocloud/, and a cidata seed image): meta-data, user-data, vendor-data, network-config."""

import uuid as uuidlib
from typing import Any, Dict, List, Optional, Tuple

import yaml

from mdserver import netconfig
from mdserver.errors import Forbidden
from mdserver.faces import Reply, text, user_data_or_none
from mdserver.view import InstanceView

NAME = "nocloud"
FILES = ("meta-data", "user-data", "vendor-data", "network-config")


def _yaml(data) -> str:
    # safe_dump quotes whatever needs it (newlines, ": ", quotes, "yes"...),
    # so a value parses back to itself.
    return yaml.safe_dump(data, default_flow_style=False, allow_unicode=True, sort_keys=False)


def meta_data(view: InstanceView) -> str:
    # Without instance-id cloud-init takes "nocloud": every clone the same instance.
    md: Dict[str, Any] = {"instance-id": view.instance_id, "local-hostname": view.fqdn}
    if view.public_keys:
        md["public-keys"] = [key for _, key in view.public_keys]
    if view.meta:
        md["meta"] = dict(view.meta)
    return _yaml(md)


def network_config(view: InstanceView) -> str:
    data = netconfig.config_v2(view.network)
    return "" if data is None else _yaml(data)


def _is_uuid(text: str) -> bool:
    try:
        uuidlib.UUID(text)
    except ValueError:
        return False
    return True


def _file(view: InstanceView, name: str) -> Reply:
    # Always 200: cloud-init retries a 404 ten times a second apart, and 22.4
    # drops the whole datasource on an error status.
    if name == "meta-data":
        return text(meta_data(view))
    if name == "user-data":
        return text(user_data_or_none(view, NAME) or "", cacheable=False)
    if name == "vendor-data":
        return text(view.vendor_data or "")
    return text(network_config(view))


def lookup(view: InstanceView, path: str) -> Optional[Reply]:
    """GET /nocloud/<file> or /nocloud/<own UUID>/<file> (cloud-init >= 23.1's
    s=.../__dmi.system-uuid__/); another instance's UUID is Forbidden."""
    parts = [p for p in path.split("/") if p]
    if parts and _is_uuid(parts[0]):
        if parts[0].lower() != view.uuid.lower():
            raise Forbidden("that UUID is not the requester's")
        parts = parts[1:]
    if not parts:
        return text("\n".join(FILES))
    if len(parts) != 1 or parts[0] not in FILES:
        return None
    return _file(view, parts[0])


def files(view: InstanceView) -> List[Tuple[str, bytes]]:
    """The four files of a cidata image (user-data may be empty, never absent)."""
    out = []
    for name in FILES:
        if name == "network-config" and not network_config(view):
            continue  # absent, not empty: cloud-init's fallback
        out.append((name, _file(view, name).body))
    return out
