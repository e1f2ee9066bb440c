"""libvirt domain XML -> DomainInfo: name, UUID, the MAC on the managed network, mdserver settings."""

import re
import uuid as uuidlib
from dataclasses import dataclass
from typing import Any, List, Optional

import xmltodict
from xml.parsers import expat
from xml.parsers.expat import ExpatError

from mdserver.config import CRYPT_HASH, HOST_LABEL, RESERVED_TEMPLATE_NAMES
from mdserver.errors import BadDomainXML, PayloadTooLarge
from mdserver.fsutil import safe_name
from mdserver.models import NETWORK_MODES, ROUTES, InstanceSettings

# Real domain XML can pass 100 KB (many devices, long metadata); 2 MiB is
# far above that and still cheap to parse.
MAX_XML_BYTES = 2 * 1024 * 1024
NAMESPACE = "urn:mdserver:1"
MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
# nova's defaults: 128 metadata items, keys and values of up to 255 characters.
MAX_META = 128
MAX_META_KEY = 255
MAX_META_VALUE = 255
# Keys cloud-init acts on when it finds them in OpenStack's `meta`.
CLOUD_INIT_META_KEYS = frozenset({"dsmode"})
SSH_KEY = re.compile(r"^(ssh-|ecdsa-|sk-)[A-Za-z0-9@._-]+ [A-Za-z0-9+/=]+( [^\n\r]*)?$")


@dataclass(frozen=True)
class DomainInfo:
    name: str
    uuid: str
    mac: str
    arch: str
    settings: InstanceSettings


NO_DTD = "DOCTYPE and ENTITY declarations are not accepted"


def _refuse_doctype(*_: Any) -> None:
    raise BadDomainXML(NO_DTD)


class _NoDoctypeExpat:
    """The expat module as xmltodict uses it (ParserCreate only), its parsers
    refusing a DOCTYPE themselves: the byte test in parse() sees one only in
    an ASCII-compatible encoding, and expat reads UTF-16 as well."""

    @staticmethod
    def ParserCreate(*args: Any, **kwargs: Any) -> Any:
        parser = expat.ParserCreate(*args, **kwargs)
        parser.StartDoctypeDeclHandler = _refuse_doctype
        return parser


def _list(value: Any) -> List[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _text(value: Any) -> Optional[str]:
    """Element text, whether xmltodict gave a string or a dict with #text."""
    if isinstance(value, dict):
        value = value.get("#text")
    return value.strip() if isinstance(value, str) else None


def parse(data: bytes, net_name: str, bridge: Optional[str] = None) -> DomainInfo:
    """Parse a domain XML document, or raise BadDomainXML saying what is wrong."""
    if len(data) > MAX_XML_BYTES:
        raise PayloadTooLarge(f"domain XML larger than {MAX_XML_BYTES} bytes")
    # Refuse DTDs outright: entity expansion and external references hide in
    # them, and some xmltodict versions silently drop entity references.
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise BadDomainXML(NO_DTD)
    try:
        doc = xmltodict.parse(data, expat=_NoDoctypeExpat, disable_entities=True,
                              process_namespaces=True, namespaces={NAMESPACE: "mds"})
    except (ExpatError, ValueError) as e:
        raise BadDomainXML(f"malformed XML: {e}") from None
    domain = doc.get("domain") if isinstance(doc, dict) else None
    if not isinstance(domain, dict):
        raise BadDomainXML("not a libvirt domain: no <domain> element")
    name = _text(domain.get("name"))
    if not name:
        raise BadDomainXML("missing <name>")
    if "/" in name or "\0" in name or len(name) > 255:
        raise BadDomainXML(f"unusable domain name {name!r}")
    raw_uuid = _text(domain.get("uuid"))
    if not raw_uuid:
        raise BadDomainXML("missing <uuid>")
    try:
        uuid = str(uuidlib.UUID(raw_uuid))
    except ValueError:
        raise BadDomainXML(f"<uuid> {raw_uuid!r} is not a UUID") from None
    mac = _managed_mac(domain, net_name, bridge)
    os_type = (domain.get("os") or {}).get("type") if isinstance(domain.get("os"), dict) else None
    arch = (os_type.get("@arch") if isinstance(os_type, dict) else None) or "x86_64"
    return DomainInfo(name=name, uuid=uuid, mac=mac, arch=arch,
                      settings=_settings(domain.get("metadata")))


def _managed_mac(domain: dict, net_name: str, bridge: Optional[str]) -> str:
    """The MAC of the first interface on the managed network (or, in the
    live XML a hook may see, on its bridge)."""
    devices: dict = domain["devices"] if isinstance(domain.get("devices"), dict) else {}
    for iface in _list(devices.get("interface")):
        if not isinstance(iface, dict):
            continue
        source: dict = iface["source"] if isinstance(iface.get("source"), dict) else {}
        on_net = iface.get("@type") == "network" and source.get("@network") == net_name
        on_bridge = bridge is not None and iface.get("@type") == "bridge" \
            and source.get("@bridge") == bridge
        if not (on_net or on_bridge):
            continue
        mac_el: dict = iface["mac"] if isinstance(iface.get("mac"), dict) else {}
        mac = (mac_el.get("@address") or "").strip().lower()
        if not MAC.match(mac):
            raise BadDomainXML(f"the interface on network {net_name!r} has no valid "
                               f"<mac address=...> ({mac!r})")
        return mac
    raise BadDomainXML(f"no <interface> on network {net_name!r}")


def _settings(metadata: Any) -> InstanceSettings:
    """mdserver's own <mds:instance xmlns:mds="urn:mdserver:1"> in <metadata>."""
    block = metadata.get("mds:instance") if isinstance(metadata, dict) else None
    if block is None:
        return InstanceSettings()
    if not isinstance(block, dict):
        block = {}
    template = _text(block.get("mds:template"))
    if template is not None and not safe_name(template):
        raise BadDomainXML(f"<mds:template> {template!r} is not a plain file name")
    hostname = _text(block.get("mds:hostname"))
    if hostname is not None and not (len(hostname) <= 253 and all(
            HOST_LABEL.match(p) for p in hostname.split("."))):
        raise BadDomainXML(f"<mds:hostname> {hostname!r} is not a valid host name")
    keys = []
    for raw in _list(block.get("mds:ssh-key")):
        key = _text(raw)
        if not key or not SSH_KEY.match(key):
            raise BadDomainXML("<mds:ssh-key> is not one OpenSSH public key line")
        keys.append(key)
    password = _text(block.get("mds:password"))
    if password is not None and not CRYPT_HASH.match(password):
        raise BadDomainXML("<mds:password> is not a crypt hash cloud-init recognises "
                           "($1$, $2a$, $2y$, $5$ or $6$)")
    return InstanceSettings(template=template or None, hostname=hostname or None,
                            ssh_keys=tuple(keys), password=password or None,
                            meta=_meta(block.get("mds:meta")),
                            network=_choice(block, "network", NETWORK_MODES),
                            route=_choice(block, "route", ROUTES))


def _choice(block: dict, tag: str, options) -> Optional[str]:
    value = _text(block.get(f"mds:{tag}"))
    if value is None or value == "":
        return None
    if value not in options:
        raise BadDomainXML(f"<mds:{tag}> {value!r} is not one of {', '.join(options)}")
    return value


def _meta(elements: Any) -> tuple:
    """<mds:meta key="k">v</mds:meta>, each once. Values keep every inner
    character (each face renders them through a JSON or YAML serialiser);
    leading and trailing white space goes, as XML indentation would."""
    out: dict = {}
    for element in _list(elements):
        key = element.get("@key") if isinstance(element, dict) else None
        value = (element.get("#text") or "") if isinstance(element, dict) else (element or "")
        value = value.strip()  # (xmltodict strips already; said here, not assumed)
        if not isinstance(key, str) or not key.strip():
            raise BadDomainXML("<mds:meta> needs a key attribute")
        if len(key) > MAX_META_KEY or len(value) > MAX_META_VALUE:
            raise BadDomainXML(f"<mds:meta key={key[:40]!r}>: keys and values are limited "
                               f"to {MAX_META_KEY} characters")
        if any(ord(c) < 32 or ord(c) == 127 for c in key):
            raise BadDomainXML(f"<mds:meta key={key!r}>: control characters in the key")
        if key in CLOUD_INIT_META_KEYS:
            raise BadDomainXML(f"<mds:meta key={key!r}>: cloud-init acts on this key; "
                               "not accepted")
        if key in RESERVED_TEMPLATE_NAMES:
            raise BadDomainXML(f"<mds:meta key={key!r}>: shadows a name mdserver gives "
                               "every template")
        if key in out:
            raise BadDomainXML(f"<mds:meta key={key!r}> appears twice")
        out[key] = value
    if len(out) > MAX_META:
        raise BadDomainXML(f"more than {MAX_META} <mds:meta> elements")
    return tuple(out.items())
