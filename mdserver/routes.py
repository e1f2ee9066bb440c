"""What a domain's definition needs for its route: domain XML in, domain XML out (pure).

A stock cloud image uses a datasource only when it recognises its platform,
so each route (README, "Routes") is something the domain shows the guest:
SMBIOS entries, or a CD-ROM with the seed image. `plan()` adds what is
missing to a libvirt domain XML document and records the route as
`<mds:route>` in the domain's metadata; the enroller and `mdserverctl route`
share it.

The document is edited as text: it is parsed (expat) only to learn where each
element starts and ends, and new elements are spliced in with the document's
own indentation. Everything else keeps its bytes: attribute quoting,
namespace prefixes (libosinfo's and any other metadata), comments, order.
So the edited document differs from the input only in the added lines, and
planning again changes nothing (the DEFINED event an edit causes is a no-op).
"""

import os
import re
import shlex
import uuid as uuidlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple, Union
from xml.parsers import expat

from mdserver.domainxml import MAX_XML_BYTES
from mdserver.errors import BadDomainXML
from mdserver.models import ROUTES, SEED_ROUTES

ROUTE_NAMESPACE = "urn:mdserver:1"

# What nova sets (and cloud-init's OpenStack check reads: product, or the
# chassis asset tag).
NOVA_MANUFACTURER = "OpenStack Foundation"
NOVA_PRODUCT = "OpenStack Nova"
NOVA_FAMILY = "Virtual Machine"
OPENSTACK_NAMES = ("OpenStack Nova", "OpenStack Compute")
NOCLOUD_SERIAL = "ds=nocloud-net;s=http://169.254.169.254/nocloud/"
SMBIOS_ROUTES = ("openstack", "ec2", "nocloud-net")
# libvirt's order of <sysinfo><system> entries (it rewrites them so).
SYSTEM_ENTRIES = ("manufacturer", "product", "version", "serial", "uuid", "sku", "family")
VIRTIO_SCSI = ("virtio-scsi", "virtio-transitional", "virtio-non-transitional")
# Elements libvirt puts before <metadata>.
BEFORE_METADATA = ("name", "uuid", "genid", "title", "description")


@dataclass(frozen=True)
class Plan:
    route: Optional[str]       # the route the domain has after the plan (or keeps); None: none
    xml: str                   # the new domain XML (== the input text if nothing changes)
    changes: Tuple[str, ...]   # one line per element added, changed or removed
    problems: Tuple[str, ...]  # what was left alone and why; warnings

    @property
    def changed(self) -> bool:
        return bool(self.changes)


@dataclass(frozen=True)
class Domain:
    """What the route commands need to know of a domain besides the plan."""
    name: str
    uuid: str     # lower case
    machine: str  # <os><type machine=...>, "" if not set


# -- a located parse: each element with its byte span ------------------------

class _Node:
    __slots__ = ("uri", "local", "prefix", "attrs", "children", "text", "parent",
                 "start", "head_end", "close", "end")

    def __init__(self, name: str, attrs: Dict[str, str], start: int,
                 parent: Optional["_Node"]):
        # expat with namespace_prefixes: "uri local prefix", "uri local" or "local"
        parts = name.split(" ")
        self.uri = parts[0] if len(parts) > 1 else ""
        self.local = parts[1] if len(parts) > 1 else parts[0]
        self.prefix = parts[2] if len(parts) > 2 else ""
        self.attrs = attrs
        self.children: List[_Node] = []
        self.text = ""
        self.parent = parent
        self.start = start      # '<' of the start tag
        self.head_end = start   # after the start tag's '>'
        self.close = start      # '<' of the end tag (== head_end if empty)
        self.end = start        # after the element

    @property
    def qname(self) -> str:
        return f"{self.prefix}:{self.local}" if self.prefix else self.local

    @property
    def empty(self) -> bool:
        return self.close == self.head_end and self.end == self.head_end

    def kids(self, local: str, uri: str = "") -> List["_Node"]:
        return [c for c in self.children if c.local == local and c.uri == uri]

    def kid(self, local: str, uri: str = "") -> Optional["_Node"]:
        found = self.kids(local, uri)
        return found[0] if found else None

    def value(self) -> str:
        return self.text.strip()


def _tag_end(data: bytes, i: int) -> int:
    """The index after the '>' closing the tag that starts at `i`."""
    quote = 0
    while i < len(data):
        c = data[i]
        if quote:
            if c == quote:
                quote = 0
        elif c in (0x22, 0x27):
            quote = c
        elif c == 0x3E:
            return i + 1
        i += 1
    raise BadDomainXML("unterminated tag")  # (expat has refused such a document)


def _parse(data: bytes) -> _Node:
    if len(data) > MAX_XML_BYTES:
        raise BadDomainXML(f"domain XML larger than {MAX_XML_BYTES} bytes")
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise BadDomainXML("DOCTYPE and ENTITY declarations are not accepted")
    parser = expat.ParserCreate(encoding="UTF-8", namespace_separator=" ")
    parser.namespace_prefixes = True
    stack: List[_Node] = []
    nodes: List[_Node] = []

    def start(name: str, attrs: Dict[str, str]) -> None:
        node = _Node(name, attrs, parser.CurrentByteIndex, stack[-1] if stack else None)
        if stack:
            stack[-1].children.append(node)
        stack.append(node)
        nodes.append(node)

    def end(name: str) -> None:
        stack.pop().close = parser.CurrentByteIndex

    def chars(text: str) -> None:
        if stack:
            stack[-1].text += text

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = chars
    try:
        parser.Parse(data, True)
    except expat.ExpatError as e:
        raise BadDomainXML(f"malformed XML: {e}") from None
    for node in nodes:
        node.head_end = _tag_end(data, node.start)
        if data[node.head_end - 2] == 0x2F:  # '/>': an empty-element tag
            node.close = node.end = node.head_end
        else:
            node.end = _tag_end(data, node.close)
    root = nodes[0]
    if root.local != "domain" or root.uri:
        raise BadDomainXML("not a libvirt domain: no <domain> element")
    return root


def _text_of(xml: Union[str, bytes]) -> bytes:
    return xml.encode("utf-8") if isinstance(xml, str) else xml


# -- what a domain shows -----------------------------------------------------

def _uuid(root: _Node) -> str:
    node = root.kid("uuid")
    if node is None or not node.value():
        raise BadDomainXML("missing <uuid>")
    try:
        return str(uuidlib.UUID(node.value()))
    except ValueError:
        raise BadDomainXML(f"<uuid> {node.value()!r} is not a UUID") from None


def _machine(root: _Node) -> str:
    os_ = root.kid("os")
    type_ = os_.kid("type") if os_ is not None else None
    return (type_.attrs.get("machine") or "") if type_ is not None else ""


def _sysinfo(root: _Node) -> Optional[_Node]:
    for node in root.kids("sysinfo"):
        if node.attrs.get("type") == "smbios":
            return node
    return None


def _entries(root: _Node, section: str) -> List[_Node]:
    sysinfo = _sysinfo(root)
    block = sysinfo.kid(section) if sysinfo is not None else None
    return block.kids("entry") if block is not None else []


def _entry(root: _Node, section: str, name: str) -> Optional[str]:
    for node in _entries(root, section):
        if node.attrs.get("name") == name:
            return node.value()
    return None


def _route_node(root: _Node) -> Optional[_Node]:
    meta = root.kid("metadata")
    inst = meta.kid("instance", ROUTE_NAMESPACE) if meta is not None else None
    return inst.kid("route", ROUTE_NAMESPACE) if inst is not None else None


def _recorded(root: _Node) -> Optional[str]:
    node = _route_node(root)
    return (node.value() or None) if node is not None else None


@dataclass(frozen=True)
class _Disk:
    node: _Node
    device: str
    source: Optional[str]
    bus: str
    dev: str
    address: Optional[Dict[str, str]]


def _disks(root: _Node) -> List[_Disk]:
    devices = root.kid("devices")
    out = []
    for disk in devices.kids("disk") if devices is not None else []:
        source = disk.kid("source")
        target = disk.kid("target")
        address = disk.kid("address")
        out.append(_Disk(
            node=disk, device=disk.attrs.get("device") or "disk",
            source=source.attrs.get("file") if source is not None else None,
            bus=(target.attrs.get("bus") or "") if target is not None else "",
            dev=(target.attrs.get("dev") or "") if target is not None else "",
            address=address.attrs if address is not None
            and address.attrs.get("type") == "drive" else None))
    return out


def _is_seed_image(source: Optional[str], uuid: str) -> bool:
    return bool(source) and os.path.basename(source or "") == f"{uuid}.iso"


def _openstack_shown(root: _Node) -> Optional[str]:
    product = _entry(root, "system", "product")
    if product in OPENSTACK_NAMES:
        return f"SMBIOS product {product!r}"
    asset = _entry(root, "chassis", "asset")
    if asset in OPENSTACK_NAMES:
        return f"SMBIOS chassis asset tag {asset!r}"
    return None


def _shown(root: _Node, uuid: str) -> Tuple[Optional[str], str]:
    """(route, the evidence). In the order cloud-init's datasource_list
    tries them (NoCloud, ConfigDrive, OpenStack, Ec2): a domain showing two
    routes gets the first; so the nova SMBIOS on an `ec2...` UUID (whose
    serial is then the UUID too) is the OpenStack route, not the AWS one."""
    recorded = _recorded(root)
    serial = _entry(root, "system", "serial")
    if serial and "ds=nocloud" in serial:
        return "nocloud-net", f"SMBIOS serial {serial!r}"
    if recorded in SEED_ROUTES:
        for disk in _disks(root):
            if disk.device == "cdrom" and _is_seed_image(disk.source, uuid):
                return recorded, f"CD-ROM {disk.source} and <mds:route>{recorded}</mds:route>"
    openstack = _openstack_shown(root)
    if openstack:
        return "openstack", openstack
    if uuid.startswith("ec2") and serial and (
            serial.lower() == uuid or serial.lower().startswith("ec2")):
        return "ec2", f"UUID {uuid} and SMBIOS serial {serial!r}"
    if recorded in ROUTES:
        return recorded, f"<mds:route>{recorded}</mds:route>"
    return None, ""


def domain_facts(xml: Union[str, bytes]) -> Domain:
    """Name, UUID and machine type of a domain XML document."""
    root = _parse(_text_of(xml))
    name = root.kid("name")
    return Domain(name=name.value() if name is not None else "", uuid=_uuid(root),
                  machine=_machine(root))


def recorded_route(xml: Union[str, bytes]) -> Optional[str]:
    """The text of <mds:route> in the domain's <metadata><mds:instance> (any
    prefix bound to urn:mdserver:1), None if absent or empty. Not checked
    against ROUTES (plan() refuses to act on a domain with another value)."""
    return _recorded(_parse(_text_of(xml)))


def existing_route(xml: Union[str, bytes]) -> Optional[str]:
    """The route the domain already shows a guest, from its XML alone:
    'nocloud-net' (SMBIOS system serial containing 'ds=nocloud'); 'configdrive'
    or 'nocloud' (a CD-ROM whose source is named <uuid>.iso, the seed image,
    with that route in <mds:route>); 'openstack' (SMBIOS system product, or
    chassis asset tag, 'OpenStack Nova' or 'OpenStack Compute'); 'ec2' (UUID
    starting ec2 and SMBIOS serial = the UUID or starting ec2); else the route
    recorded in <mds:route> (one of models.ROUTES: 'none' is an opt-out), else
    None. The order is cloud-init's: see _shown."""
    root = _parse(_text_of(xml))
    return _shown(root, _uuid(root))[0]


# -- editing -----------------------------------------------------------------

# An element to insert: (qualified name, attributes, content); content None:
# empty element, str: text, list: child elements.
_El = Tuple[str, Sequence[Tuple[str, str]], Union[None, str, Sequence["_El"]]]


def _attr(value: str) -> str:
    return "'" + value.replace("&", "&amp;").replace("<", "&lt;").replace("'", "&apos;") \
        .replace("\n", "&#10;").replace("\t", "&#9;") + "'"


def _esc(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class _Editor:
    """The document as bytes, re-parsed after every splice (documents are
    small and edits few; node positions are never stale)."""

    def __init__(self, xml: str):
        self.data = xml.encode("utf-8")
        self.root = _parse(self.data)
        self.nl = "\r\n" if b"\r\n" in self.data else "\n" if b"\n" in self.data else ""
        first = self.root.children[0] if self.root.children else None
        indent = self._indent(first) if first is not None else None
        self.unit = indent if indent else ("  " if self.nl else "")

    @property
    def text(self) -> str:
        return self.data.decode("utf-8")

    def _splice(self, start: int, end: int, new: str) -> None:
        self.data = self.data[:start] + new.encode("utf-8") + self.data[end:]
        self.root = _parse(self.data)

    def _indent(self, node: _Node) -> Optional[str]:
        """The white space before `node` on its line, None if it is not
        first on its line."""
        line = self.data.rfind(b"\n", 0, node.start)
        if line < 0:
            return None
        before = self.data[line + 1:node.start]
        return before.decode("utf-8") if not before.strip() else None

    def _child_indent(self, parent: _Node) -> str:
        if not self.nl:
            return ""
        for child in parent.children:
            indent = self._indent(child)
            if indent is not None:
                return indent
        return (self._indent(parent) or "") + self.unit

    def render(self, el: _El, indent: str) -> str:
        tag, attrs, content = el
        head = "<" + tag + "".join(f" {k}={_attr(v)}" for k, v in attrs)
        if content is None:
            return head + "/>"
        if isinstance(content, str):
            return f"{head}>{_esc(content)}</{tag}>"
        inner = "".join(self.nl + indent + self.unit + self.render(c, indent + self.unit)
                        for c in content)
        return f"{head}>{inner}{self.nl}{indent}</{tag}>"

    def insert(self, parent: _Node, el: _El, before: Optional[_Node] = None) -> None:
        """Insert `el` as a child of `parent`, before `before` (one of its
        children) or last."""
        nl = self.nl
        indent = self._child_indent(parent)
        outer = (self._indent(parent) or "") if nl else ""
        if parent.empty:
            head = self.data[parent.start:parent.head_end - 2].rstrip().decode("utf-8")
            self._splice(parent.start, parent.end,
                         f"{head}>{nl}{indent}{self.render(el, indent)}{nl}{outer}"
                         f"</{parent.qname}>")
        elif before is not None:
            own = self._indent(before)
            if own is None or not nl:
                self._splice(before.start, before.start, self.render(el, indent))
            else:
                self._splice(before.start, before.start, self.render(el, own) + nl + own)
        elif parent.children:
            last = parent.children[-1]
            own = self._indent(last)
            if own is None:  # children on one line: the new one joins them
                self._splice(last.end, last.end, self.render(el, indent))
            else:
                self._splice(last.end, last.end, nl + own + self.render(el, own))
        elif not self.data[parent.head_end:parent.close].strip():
            self._splice(parent.head_end, parent.close,
                         f"{nl}{indent}{self.render(el, indent)}{nl}{outer}")
        else:
            self._splice(parent.close, parent.close, self.render(el, indent))

    def insert_after(self, sibling: _Node, el: _El) -> None:
        parent = sibling.parent
        assert parent is not None
        following = parent.children[parent.children.index(sibling) + 1:]
        self.insert(parent, el, following[0] if following else None)

    def remove(self, node: _Node) -> None:
        """Remove `node`, and its line if it has one to itself."""
        start = node.start
        line = self.data.rfind(b"\n", 0, start)
        if line >= 0 and not self.data[line + 1:start].strip():
            start = line - 1 if line > 0 and self.data[line - 1] == 0x0D else line
        self._splice(start, node.end, "")

    def set_text(self, node: _Node, value: str) -> None:
        if node.empty:
            self._splice(node.start, node.end, f"<{node.qname}>{_esc(value)}</{node.qname}>")
        else:
            self._splice(node.head_end, node.close, _esc(value))


# -- the plan ----------------------------------------------------------------

@dataclass(frozen=True)
class _Want:
    name: str
    value: str
    accept: Callable[[str], bool]  # does an existing value do?
    essential: bool                # without it the guest does not see the route


def _same_uuid(uuid: str) -> Callable[[str], bool]:
    return lambda v: v.lower() == uuid


def _wanted(route: str, uuid: str, openstack_asset: bool) -> List[_Want]:
    if route == "openstack":
        return [
            _Want("manufacturer", NOVA_MANUFACTURER, lambda v: v == NOVA_MANUFACTURER, False),
            # cloud-init also takes the chassis asset tag: then the product is not needed
            _Want("product", NOVA_PRODUCT, lambda v: v in OPENSTACK_NAMES, not openstack_asset),
            _Want("serial", uuid, _same_uuid(uuid), False),
            _Want("uuid", uuid, _same_uuid(uuid), False),
            _Want("family", NOVA_FAMILY, lambda v: v == NOVA_FAMILY, False),
        ]
    if route == "nocloud-net":
        return [_Want("serial", NOCLOUD_SERIAL, lambda v: "ds=nocloud" in v, True)]
    if route == "ec2":
        return [_Want("serial", uuid,
                      lambda v: v.lower() == uuid or v.lower().startswith("ec2"), True),
                _Want("uuid", uuid, _same_uuid(uuid), False)]
    return []


def _uses_ide(machine: str) -> bool:
    """i440fx ('pc', 'pc-i440fx-*', old 'pc-X.Y'): IDE. q35 and anything else
    (no machine given, other architectures): virtio-scsi, which works on all."""
    m = machine.lower()
    return "q35" not in m and (m == "pc" or m.startswith("pc-"))


def _disk_name(prefix: str, index: int) -> str:
    """libvirt's virIndexToDiskName: 0 -> a, 25 -> z, 26 -> aa."""
    letters = ""
    while index >= 0:
        letters = chr(ord("a") + index % 26) + letters
        index = index // 26 - 1
    return prefix + letters


def _disk_index(dev: str) -> Optional[int]:
    """libvirt's virDiskNameToIndex (sdb -> 1, hdc -> 2)."""
    m = re.match(r"^(?:fd|hd|vd|sd|xvd|ubd)([a-z]+)", dev)
    if not m:
        return None
    index = -1
    for c in m.group(1):
        index = (index + 1) * 26 + ord(c) - ord("a")
    return index


def _int(value: Optional[str], default: int = 0) -> int:
    try:
        return int(value or "", 0)
    except ValueError:
        return default


def _switch_warning(old: str, new: str) -> str:
    if "ec2" in (old, new):
        return (f"route switched from {old} to {new}: the guest's instance-id changes, so "
                "cloud-init will provision it again at its next cold boot (new SSH host "
                "keys, user-data run again, the default user's password reset)")
    return (f"route switched from {old} to {new}: the guest's datasource changes at its next "
            "cold boot; its instance-id stays the domain UUID, but cloud-init may provision "
            "it again")


class _Planner:
    def __init__(self, xml: str, route: str, uuid: str, seed_path: Optional[str]):
        self.ed = _Editor(xml)
        self.route, self.uuid, self.seed_path = route, uuid, seed_path
        self.changes: List[str] = []
        self.problems: List[str] = []  # reported; the route is still in place
        self.blockers: List[str] = []  # the route cannot be put in place

    # removing what mdserver added for another route (force)
    def remove_additions(self, old: str) -> None:
        uuid = self.uuid
        needed = {(w.name, w.value.lower()) for w in _wanted(self.route, uuid, False)}
        ours = {("manufacturer", NOVA_MANUFACTURER.lower()), ("product", NOVA_PRODUCT.lower()),
                ("family", NOVA_FAMILY.lower()), ("serial", uuid), ("uuid", uuid),
                ("serial", NOCLOUD_SERIAL.lower())} - needed
        while True:
            match = [e for e in _entries(self.ed.root, "system")
                     if (e.attrs.get("name"), e.value().lower()) in ours]
            if not match:
                break
            self.changes.append(f"removed <sysinfo> entry {match[0].attrs.get('name')}="
                                f"{match[0].value()} (mdserver's, for route {old})")
            self.ed.remove(match[0])
        if self.route not in SMBIOS_ROUTES:
            self._remove_empty_sysinfo()
        if self.route not in SEED_ROUTES:
            for disk in _disks(self.ed.root):
                if disk.device == "cdrom" and self._ours(disk.source):
                    self.changes.append(f"removed <disk device='cdrom'> {disk.source} "
                                        f"(mdserver's, for route {old})")
                    self.ed.remove(disk.node)
                    break

    def _ours(self, source: Optional[str]) -> bool:
        if self.seed_path is not None:
            return source == self.seed_path
        return _is_seed_image(source, self.uuid)

    def _remove_empty_sysinfo(self) -> None:
        sysinfo = _sysinfo(self.ed.root)
        system = sysinfo.kid("system") if sysinfo is not None else None
        if system is None or system.children:
            return
        self.ed.remove(system)
        sysinfo = _sysinfo(self.ed.root)
        if sysinfo is None or sysinfo.children:
            return
        self.ed.remove(sysinfo)
        self.changes.append("removed the <sysinfo type='smbios'> left empty")
        os_ = self.ed.root.kid("os")
        smbios = os_.kid("smbios") if os_ is not None else None
        if smbios is not None and smbios.attrs.get("mode") == "sysinfo":
            self.ed.remove(smbios)
            self.changes.append("removed <os><smbios mode='sysinfo'/> (no <sysinfo> left)")

    # SMBIOS routes
    def smbios_mode(self) -> None:
        os_ = self.ed.root.kid("os")
        if os_ is None:
            self.blockers.append("no <os> element")
            return
        smbios = os_.kid("smbios")
        if smbios is None:
            self.ed.insert(os_, ("smbios", [("mode", "sysinfo")], None), os_.kid("bios"))
            self.changes.append("added <os><smbios mode='sysinfo'/>")
        elif smbios.attrs.get("mode") != "sysinfo":
            self.blockers.append(f"<os><smbios mode='{smbios.attrs.get('mode')}'/> left alone: "
                                 f"the guest sees <sysinfo> only with mode 'sysinfo'")

    def system_entries(self) -> None:
        root = self.ed.root
        missing = []
        for want in _wanted(self.route, self.uuid, _entry(root, "chassis", "asset")
                            in OPENSTACK_NAMES):
            value = _entry(root, "system", want.name)
            if value is None:
                missing.append(want)
            elif not want.accept(value):
                why = (f"<sysinfo> entry {want.name}={value!r} left alone (route {self.route} "
                       f"sets {want.value!r})")
                if want.essential:
                    self.blockers.append(f"{why}: the guest would not see route {self.route}")
                else:
                    self.problems.append(why)
        if not missing or self.blockers:
            return
        entries: List[_El] = [("entry", [("name", w.name)], w.value) for w in missing]
        sysinfo = _sysinfo(root)
        system = sysinfo.kid("system") if sysinfo is not None else None
        if sysinfo is None:
            el: _El = ("sysinfo", [("type", "smbios")], [("system", [], entries)])
            others = root.kids("sysinfo")
            if others:
                self.ed.insert_after(others[-1], el)
            else:
                self.ed.insert(root, el, root.kid("os"))
        elif system is None:
            later = [c for c in sysinfo.children if c.local in ("baseBoard", "chassis",
                                                                 "oemStrings")]
            self.ed.insert(sysinfo, ("system", [], entries), later[0] if later else None)
        else:
            for entry in entries:
                self._insert_entry(entry)
        self.changes += [f"added <sysinfo> entry {w.name}={w.value}" for w in missing]

    def _insert_entry(self, entry: _El) -> None:
        sysinfo = _sysinfo(self.ed.root)
        system = sysinfo.kid("system") if sysinfo is not None else None
        assert system is not None
        rank = SYSTEM_ENTRIES.index(dict(entry[1])["name"])
        later = [e for e in system.kids("entry")
                 if e.attrs.get("name") in SYSTEM_ENTRIES
                 and SYSTEM_ENTRIES.index(e.attrs.get("name") or "") > rank]
        self.ed.insert(system, entry, later[0] if later else None)

    # seed routes
    def seed_cdrom(self) -> None:
        seed = self.seed_path
        if seed is None:
            self.blockers.append(f"route {self.route} needs the seed image's path")
            return
        root = self.ed.root
        disks = _disks(root)
        for disk in disks:
            if disk.device == "cdrom" and disk.source == seed:
                if disk.bus == "sata":
                    self.problems.append(f"the CD-ROM with {seed} is on the SATA bus: Debian's "
                                         "cloud kernels have no AHCI driver and do not see it")
                return
        for disk in disks:
            if disk.device == "cdrom" and _is_seed_image(disk.source, self.uuid):
                self.blockers.append(f"a CD-ROM already holds {disk.source}, not the seed image "
                                     f"{seed}: left alone (change its source by hand)")
                return
        devices = root.kid("devices")
        if devices is None:
            self.blockers.append("no <devices> element")
            return
        names = {d.dev for d in disks}
        controller: Optional[_El] = None
        address: List[_El] = []
        if _uses_ide(_machine(root)):
            bus = "ide"
            used = set()
            for d in disks:
                if d.bus != "ide":
                    continue
                if d.address is not None:
                    used.add((_int(d.address.get("controller")), _int(d.address.get("bus")),
                              _int(d.address.get("unit"))))
                elif _disk_index(d.dev) is not None:
                    i = _disk_index(d.dev) or 0
                    used.add((i // 4, i % 4 // 2, i % 2))
            free = [i for i in range(4) if _disk_name("hd", i) not in names
                    and (0, i // 2, i % 2) not in used]
            if not free:
                self.blockers.append("no free IDE slot (hda to hdd) for the seed CD-ROM")
                return
            dev = _disk_name("hd", free[0])
        else:
            bus = "scsi"
            index, controller = self._virtio_scsi(devices)
            units = set()
            for d in disks:
                if d.bus != "scsi":
                    continue
                if d.address is not None:
                    units.add((_int(d.address.get("controller")), _int(d.address.get("unit"))))
                elif _disk_index(d.dev) is not None:
                    i = _disk_index(d.dev) or 0
                    units.add((i // 7, i % 7))  # libvirt's default SCSI mapping (qemu)
            i = next(i for i in range(len(names) + 1) if _disk_name("sd", i) not in names)
            dev = _disk_name("sd", i)
            if (i // 7, i % 7) in units or i // 7 != index:
                # the address libvirt would derive from the name is taken or on
                # another controller: give a free unit on the virtio-scsi one
                unit = next(u for u in range(len(units) + 1) if (index, u) not in units)
                address = [("address", [("type", "drive"), ("controller", str(index)),
                                        ("bus", "0"), ("target", "0"), ("unit", str(unit))],
                            None)]
        children: List[_El] = [
            ("driver", [("name", "qemu"), ("type", "raw")], None),
            ("source", [("file", seed), ("startupPolicy", "optional")], None),
            ("target", [("dev", dev), ("bus", bus)], None),
            ("readonly", [], None)] + address
        el: _El = ("disk", [("type", "file"), ("device", "cdrom")], children)
        if disks:
            self.ed.insert_after(disks[-1].node, el)
        else:
            after = [c for c in devices.children if c.local != "emulator"]
            self.ed.insert(devices, el, after[0] if after else None)
        self.changes.append(f"added <disk device='cdrom'> {seed} (read-only, startupPolicy "
                            f"optional) on {bus} as {dev}")
        if controller is not None:
            devices = self.ed.root.kid("devices")
            assert devices is not None
            anchors = devices.kids("controller") or devices.kids("disk")
            self.ed.insert_after(anchors[-1], controller)
            self.changes.append("added <controller type='scsi' model='virtio-scsi'>")

    def _virtio_scsi(self, devices: _Node) -> Tuple[int, Optional[_El]]:
        """The index of the domain's virtio-scsi controller, or of the one to
        add (and that element)."""
        taken: Set[int] = set()
        pending = []
        for c in devices.kids("controller"):
            if c.attrs.get("type") != "scsi":
                continue
            if c.attrs.get("index") is not None:
                taken.add(_int(c.attrs.get("index")))
            pending.append(c)
        # libvirt gives a controller without index the lowest free one, in order
        indexes = []
        for c in pending:
            if c.attrs.get("index") is not None:
                indexes.append(_int(c.attrs.get("index")))
            else:
                free = next(i for i in range(len(taken) + 1) if i not in taken)
                taken.add(free)
                indexes.append(free)
        for c, index in zip(pending, indexes):
            if c.attrs.get("model") in VIRTIO_SCSI:
                return index, None
        index = next(i for i in range(len(taken) + 1) if i not in taken)
        attrs = [("type", "scsi")] + ([("index", str(index))] if index else []) + \
            [("model", "virtio-scsi")]
        return index, ("controller", attrs, None)

    # the record
    def record(self) -> None:
        root = self.ed.root
        node = _route_node(root)
        if node is not None:
            current = node.value()
            if current != self.route:
                self.ed.set_text(node, self.route)
                self.changes.append(f"changed <mds:route> {current or '(empty)'} -> "
                                    f"{self.route}")
            return
        route_el: _El = ("mds:route", [], self.route)
        instance: _El = ("mds:instance", [("xmlns:mds", ROUTE_NAMESPACE)], [route_el])
        meta = root.kid("metadata")
        inst = meta.kid("instance", ROUTE_NAMESPACE) if meta is not None else None
        if inst is not None:
            tag = f"{inst.prefix}:route" if inst.prefix else "route"
            self.ed.insert(inst, (tag, [], self.route))
        elif meta is not None:
            self.ed.insert(meta, instance)
        else:
            later = [c for c in root.children if c.local not in BEFORE_METADATA or c.uri]
            self.ed.insert(root, ("metadata", [], [instance]), later[0] if later else None)
        self.changes.append(f"recorded <mds:route>{self.route}</mds:route> in <metadata>")


def plan(xml: Union[str, bytes], route: str, seed_path: Optional[str] = None, *,
         force: bool = False) -> Plan:
    """What the persistent definition needs for `route` (one of models.ROUTES),
    applied to `xml`: SMBIOS as nova sets it (openstack), the NoCloud serial
    (nocloud-net), serial = uuid (ec2, only with a UUID starting ec2), a
    read-only CD-ROM with `seed_path` (configdrive, nocloud: virtio-scsi on
    q35 and other machines, adding the controller if needed; IDE on i440fx;
    never SATA), nothing for none; then the route recorded as <mds:route>.

    All or nothing: if anything the guest needs cannot be put in place (a
    conflicting essential entry, no free slot, an ec2 route on another UUID),
    the XML is returned unchanged, `route` is the route the domain already
    shows (or None) and `problems` says why. Entries that only complete the
    picture (nova's manufacturer, family, serial) are left alone when the
    admin set them otherwise, and reported. A domain that already shows
    another route, or is opted out with <mds:route>none</mds:route>, is
    switched only with force=True: what mdserver itself added for the old
    route goes (exact values: nova's entries, the NoCloud serial, the CD-ROM
    with `seed_path`) and `problems` warns that the guest may be provisioned
    again. Raises BadDomainXML for a document that is not a usable domain."""
    if route not in ROUTES:
        raise ValueError(f"unknown route {route!r} (one of {', '.join(ROUTES)})")
    if isinstance(xml, bytes):
        try:
            xml = xml.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadDomainXML(f"not UTF-8: {e}") from None
    root = _parse(xml.encode("utf-8"))
    uuid = _uuid(root)
    recorded = _recorded(root)
    existing, evidence = _shown(root, uuid)

    def keep(*problems: str) -> Plan:
        return Plan(existing, xml, (), tuple(problems))

    if recorded is not None and recorded not in ROUTES:
        return keep(f"<mds:route> {recorded!r} is not one of {', '.join(ROUTES)}: "
                    "domain left alone")
    if route == "none":
        if existing in (None, "none"):
            return Plan("none", xml, (), ())
        return keep(f"route none never changes a domain: it keeps route {existing} "
                    f"({evidence})")
    if route == "ec2" and not uuid.startswith("ec2"):
        return keep(f"route ec2 needs a domain UUID starting with 'ec2' (cloud-init's AWS "
                    f"check); this domain's is {uuid}, and a UUID is a domain's identity: it "
                    "cannot be changed (define a new domain with virt-install --uuid ec2...)")
    if recorded == "none" and not force:
        return keep("opted out with <mds:route>none</mds:route>: domain left alone "
                    "(force to change it)")
    switching = existing not in (None, route)
    if switching and not force:
        return keep(f"the domain already shows route {existing} ({evidence}): not switched "
                    f"to {route} without force (a guest that changes route may be "
                    "provisioned again)")
    p = _Planner(xml, route, uuid, seed_path)
    warning = []
    if switching:
        assert existing is not None
        warning = [_switch_warning(existing, route)]
        p.remove_additions(existing)
    if route in SMBIOS_ROUTES:
        p.smbios_mode()
        p.system_entries()
    else:
        p.seed_cdrom()
    if p.blockers:
        return keep(*(p.problems + p.blockers))
    p.record()
    now, now_evidence = _shown(p.ed.root, uuid)
    if now != route:
        return keep(*(p.problems + [
            f"the domain would still show route {now} ({now_evidence}), which mdserver did "
            f"not add: change that by hand first"]))
    return Plan(route, p.ed.text, tuple(p.changes), tuple(warning + p.problems))


def virt_options(route: str, uuid: str, seed_path: Optional[str], machine: str,
                 domain: str = "DOMAIN") -> List[str]:
    """The equivalent virt-install options (for a new domain) and virt-xml
    commands (for an existing one), for display. virt-install's --sysinfo
    also sets <smbios mode='sysinfo'/>. Neither writes <mds:route>."""
    q = shlex.quote
    if route in SMBIOS_ROUTES:
        if route == "openstack":
            sysinfo = (f"smbios,system.manufacturer={NOVA_MANUFACTURER},"
                       f"system.product={NOVA_PRODUCT},system.serial={uuid},"
                       f"system.uuid={uuid},system.family={NOVA_FAMILY}")
        elif route == "nocloud-net":
            sysinfo = f"smbios,system.serial={NOCLOUD_SERIAL}"
        else:
            sysinfo = f"smbios,system.serial={uuid},system.uuid={uuid}"
            if not uuid.startswith("ec2"):
                return [f"virt-install ... --uuid ec2{uuid[3:]} --sysinfo "
                        f"{q(f'smbios,system.serial=ec2{uuid[3:]},system.uuid=ec2{uuid[3:]}')}"
                        "  (a new domain: an existing one keeps its UUID)"]
            return [f"virt-install ... --uuid {uuid} --sysinfo {q(sysinfo)}",
                    f"virt-xml {q(domain)} --edit --sysinfo {q(sysinfo)}"]
        return [f"virt-install ... --sysinfo {q(sysinfo)}",
                f"virt-xml {q(domain)} --edit --sysinfo {q(sysinfo)}"]
    if route in SEED_ROUTES:
        path = seed_path or f"SEEDS/{uuid}.iso"
        bus = "ide" if _uses_ide(machine) else "scsi"
        disk = f"path={path},device=cdrom,bus={bus},startup_policy=optional"
        if bus == "ide":
            return [f"virt-install ... --disk {q(disk)}",
                    f"virt-xml {q(domain)} --add-device --disk {q(disk)}"]
        controller = "type=scsi,model=virtio-scsi"
        return [f"virt-install ... --disk {q(disk)} --controller {controller}",
                f"virt-xml {q(domain)} --add-device --controller {controller}"
                "  (unless it has a virtio-scsi controller)",
                f"virt-xml {q(domain)} --add-device --disk {q(disk)}"]
    return []


def pending(live_xml: Optional[str], definition_xml: str) -> bool:
    """Whether a running domain (`live_xml`; None: not running) shows its
    guest another route than its definition will at the next cold boot."""
    return live_xml is not None and existing_route(live_xml) != existing_route(definition_xml)
