"""routes: the domain XML each route needs (golden files), idempotence, preservation of
everything else, conflicts, switching with force, detecting the route a domain shows."""

import difflib
import xml.etree.ElementTree as ET
from typing import List

import pytest

from golden import check
from helpers import read_data
from mdserver import routes
from mdserver.errors import BadDomainXML
from mdserver.models import ROUTES

pytestmark = pytest.mark.unit

INPUTS = ("q35", "pc", "sysinfo")
SEEDS = "/var/lib/mdserver/seeds"
NS = "{urn:mdserver:1}"
LIBOSINFO = 'xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0"'
UUID = "5f0c7d4e-3b1a-4c8e-9d2f-6a7b8c9d0e1f"
EC2_UUID = "ec2d41a0-77b3-4c55-8e0f-2b9a6c1d3e57"


def source(name: str) -> str:
    return read_data(f"route_{name}.xml").decode()


def seed_of(xml: str) -> str:
    return f"{SEEDS}/{routes.domain_facts(xml).uuid}.iso"


def planned(xml: str, route: str, **kw) -> routes.Plan:
    return routes.plan(xml, route, seed_of(xml), **kw)


def dom(uuid: str = UUID, sysinfo: str = "", os_extra: str = "", devices: str = "",
        metadata: str = "", machine: str = "pc-q35-7.2") -> str:
    """A small domain XML; `sysinfo`: the inside of <sysinfo type='smbios'>."""
    return f"""<domain type='kvm'>
  <name>t</name>
  <uuid>{uuid}</uuid>
{f"  <metadata>{metadata}</metadata>" if metadata else ""}
  <memory unit='KiB'>65536</memory>
{f"  <sysinfo type='smbios'>{sysinfo}</sysinfo>" if sysinfo else ""}
  <os>
    <type arch='x86_64'{f" machine='{machine}'" if machine else ""}>hvm</type>{os_extra}
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>{devices}
  </devices>
</domain>
"""


def system(**entries: str) -> str:
    return "<system>" + "".join(f"<entry name='{k}'>{v}</entry>"
                                for k, v in entries.items()) + "</system>"


def mds(**elements: str) -> str:
    return "<mds:instance xmlns:mds='urn:mdserver:1'>" + "".join(
        f"<mds:{k}>{v}</mds:{k}>" for k, v in elements.items()) + "</mds:instance>"


def cdrom(path: str, dev: str = "sdb", bus: str = "scsi") -> str:
    return (f"<disk type='file' device='cdrom'><source file='{path}'/>"
            f"<target dev='{dev}' bus='{bus}'/><readonly/></disk>")


def strip_added(a: ET.Element, b: ET.Element) -> List[str]:
    """Remove from `b` the elements `a` does not have (children matched in
    order by tag and attributes); their tags, depth first. Fails if an
    element of `a` is missing from `b`."""
    removed: List[str] = []
    kids = list(b)
    j = 0
    for child in a:
        while j < len(kids) and (kids[j].tag, kids[j].attrib) != (child.tag, child.attrib):
            removed.append(kids[j].tag)
            b.remove(kids[j])
            j += 1
        assert j < len(kids), f"<{child.tag} {child.attrib}> of the input is missing"
        removed += strip_added(child, kids[j])
        j += 1
    for extra in kids[j:]:
        removed.append(extra.tag)
        b.remove(extra)
    return removed


def canonical(tree: ET.Element) -> str:
    return ET.canonicalize(ET.tostring(tree, encoding="unicode"), strip_text=True)


def added_only(before: str, after: str) -> bool:
    """The text diff only adds lines."""
    diff = difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="")
    return not [d for d in diff if d.startswith("-") and not d.startswith("---")]


# -- the transformation per input and route (golden files) --------------------

@pytest.mark.parametrize("name", INPUTS)
@pytest.mark.parametrize("route", ROUTES)
def test_golden(name, route):
    check(f"route_{name}_{route}.xml", planned(source(name), route).xml)


def test_golden_summary():
    """Route, changes and problems of every input and route, in one file."""
    out = []
    for name in INPUTS:
        for route in ROUTES:
            p = planned(source(name), route)
            out.append(f"== {name} {route}: route {p.route}, changed {p.changed}")
            out += [f"+ {c}" for c in p.changes] + [f"! {c}" for c in p.problems]
    check("route_summary.txt", "\n".join(out) + "\n")


@pytest.mark.parametrize("name", INPUTS)
@pytest.mark.parametrize("route", ROUTES)
def test_idempotent(name, route):
    first = planned(source(name), route)
    again = planned(first.xml, route)
    assert not again.changed and again.changes == ()
    assert again.xml == first.xml and again.route == first.route


@pytest.mark.parametrize("name", INPUTS)
@pytest.mark.parametrize("route", ROUTES)
def test_preserves_everything_else(name, route):
    x = source(name)
    p = planned(x, route)
    assert added_only(x, p.xml)
    before, after = ET.fromstring(x), ET.fromstring(p.xml)
    removed = strip_added(before, after)
    assert canonical(before) == canonical(after)
    assert bool(removed) == p.changed
    # namespaces and prefixes are the input's, byte for byte
    if LIBOSINFO in x:
        assert LIBOSINFO in p.xml and '<libosinfo:os id="http://debian.org/debian/12"/>' in p.xml


def test_added_elements_per_route():
    def added(name, route):
        x = source(name)
        return strip_added(ET.fromstring(x), ET.fromstring(planned(x, route).xml))
    assert added("q35", "openstack") == [f"{NS}instance", "sysinfo", "smbios"]
    assert added("q35", "configdrive") == [f"{NS}instance", "disk", "controller"]
    assert added("pc", "nocloud") == ["metadata", "disk"]
    assert added("sysinfo", "openstack") == [f"{NS}route", "entry", "entry", "entry", "entry"]
    assert added("sysinfo", "configdrive") == [f"{NS}route", "disk"]


@pytest.mark.parametrize("name", INPUTS)
@pytest.mark.parametrize("route", ROUTES)
def test_the_result_shows_the_route(name, route):
    p = planned(source(name), route)
    # route none on a domain that shows nothing: the plan says "none", the XML nothing
    assert routes.existing_route(p.xml) == (None if p.route == "none" else p.route)
    if p.changed:
        assert p.route == route and routes.recorded_route(p.xml) == route


# -- what each route adds ------------------------------------------------------

def test_seed_cdrom_on_q35_is_virtio_scsi_never_sata():
    x = source("q35")  # a SATA CD-ROM (sda) is there already
    disk = [d for d in ET.fromstring(planned(x, "configdrive").xml).iter("disk")][-1]
    assert disk.find("source").attrib == {"file": seed_of(x), "startupPolicy": "optional"}
    assert disk.find("target").attrib == {"dev": "sdb", "bus": "scsi"}
    assert disk.find("readonly") is not None and disk.find("address") is None
    assert disk.find("driver").attrib == {"name": "qemu", "type": "raw"}
    controllers = ET.fromstring(planned(x, "configdrive").xml).iter("controller")
    assert {"type": "scsi", "model": "virtio-scsi"} in [c.attrib for c in controllers]


def test_seed_cdrom_uses_an_existing_virtio_scsi_controller():
    p = planned(source("sysinfo"), "nocloud")
    assert "controller" not in " ".join(p.changes)
    assert "on scsi as sdb" in p.changes[0]


def test_seed_cdrom_on_i440fx_is_ide_in_a_free_slot():
    p = planned(source("pc"), "configdrive")  # hda holds an empty CD-ROM drive
    assert "<target dev='hdb' bus='ide'/>" in p.xml and "controller" not in " ".join(p.changes)
    full = "".join(cdrom(f"/iso/{d}.iso", d, "ide") for d in ("hda", "hdb", "hdc", "hdd"))
    blocked = routes.plan(dom(devices=full, machine="pc-i440fx-7.2"), "configdrive", "/s/x.iso")
    assert not blocked.changed and blocked.route is None
    assert "no free IDE slot" in blocked.problems[0]


def test_seed_cdrom_without_machine_type_is_virtio_scsi():
    p = routes.plan(dom(machine=""), "nocloud", "/s/x.iso")
    assert "<target dev='sda' bus='scsi'/>" in p.xml
    assert "<controller type='scsi' model='virtio-scsi'/>" in p.xml


def test_seed_cdrom_beside_another_scsi_controller_gets_its_own_address():
    devices = ("<disk type='file' device='disk'><source file='/d.img'/>"
               "<target dev='sda' bus='scsi'/></disk>"
               "<controller type='scsi' index='0' model='lsilogic'/>")
    p = routes.plan(dom(devices=devices), "configdrive", "/s/x.iso")
    assert "<controller type='scsi' index='1' model='virtio-scsi'/>" in p.xml
    assert "<address type='drive' controller='1' bus='0' target='0' unit='0'/>" in p.xml
    assert "<target dev='sdb' bus='scsi'/>" in p.xml
    assert not routes.plan(p.xml, "configdrive", "/s/x.iso").changed


def test_seed_cdrom_already_there_is_kept_and_sata_is_reported():
    x = dom(devices=cdrom(f"{SEEDS}/{UUID}.iso", "sda", "sata"))
    p = planned(x, "configdrive")
    assert p.route == "configdrive" and p.changes == (
        "recorded <mds:route>configdrive</mds:route> in <metadata>",)
    assert "SATA" in p.problems[0]


def test_seed_cdrom_from_another_directory_is_left_alone():
    p = planned(dom(devices=cdrom(f"/old/seeds/{UUID}.iso"),
                    metadata=mds(route="configdrive")), "configdrive")
    assert not p.changed and p.route == "configdrive"
    assert f"already holds /old/seeds/{UUID}.iso" in p.problems[0]


def test_seed_routes_need_a_seed_path():
    p = routes.plan(dom(), "configdrive")
    assert not p.changed and "seed image's path" in p.problems[0]


def test_seed_path_is_escaped():
    path = "/srv/o'neil & co/<x>.iso"
    p = routes.plan(dom(), "nocloud", path)
    disk = [d for d in ET.fromstring(p.xml).iter("disk")][0]
    assert disk.find("source").get("file") == path
    assert not routes.plan(p.xml, "nocloud", path).changed


def test_openstack_entries_are_novas():
    tree = ET.fromstring(planned(source("q35"), "openstack").xml)
    entries = [(e.get("name"), e.text) for e in tree.find("sysinfo/system")]
    assert entries == [("manufacturer", "OpenStack Foundation"), ("product", "OpenStack Nova"),
                       ("serial", UUID), ("uuid", UUID), ("family", "Virtual Machine")]
    assert tree.find("os/smbios").attrib == {"mode": "sysinfo"}


def test_nocloud_net_serial():
    tree = ET.fromstring(planned(source("pc"), "nocloud-net").xml)
    assert [(e.get("name"), e.text) for e in tree.find("sysinfo/system")] == [
        ("serial", "ds=nocloud-net;s=http://169.254.169.254/nocloud/")]


# -- conflicts, impossible routes, none ------------------------------------------

def test_admin_sysinfo_keeps_its_entries_and_a_conflicting_serial_is_reported():
    x = source("sysinfo")  # bios entries and serial ASSET-0042, set by the admin
    p = planned(x, "openstack")
    assert p.route == "openstack" and p.changed
    tree = ET.fromstring(p.xml)
    assert [e.get("name") for e in tree.find("sysinfo/bios")] == ["vendor", "version", "date"]
    assert [(e.get("name"), e.text) for e in tree.find("sysinfo/system")][2] == \
        ("serial", "ASSET-0042")
    assert p.problems == ("<sysinfo> entry serial='ASSET-0042' left alone (route openstack "
                          f"sets '{routes.domain_facts(x).uuid}')",)
    assert "<!-- license server checks the serial above; do not change it -->" in p.xml


def test_conflicting_essential_entry_changes_nothing():
    x = source("sysinfo")
    p = planned(x, "nocloud-net")  # needs the serial the admin set
    assert (p.xml, p.route, p.changed) == (x, None, False)
    assert "serial='ASSET-0042' left alone" in p.problems[0]
    assert "would not see route nocloud-net" in p.problems[0]
    product = dom(sysinfo=system(product="Billing Appliance"))
    p = planned(product, "openstack")
    assert (p.xml, p.changed) == (product, False)
    assert any("product='Billing Appliance' left alone" in line for line in p.problems)


def test_chassis_asset_tag_is_openstack_enough():
    x = dom(sysinfo=system(product="Appliance") + "<chassis><entry name='asset'>OpenStack Nova"
                                                  "</entry></chassis>")
    assert routes.existing_route(x) == "openstack"
    p = planned(x, "openstack")
    assert p.route == "openstack" and p.changed
    assert "product='Appliance' left alone" in p.problems[0]


def test_other_smbios_mode_is_left_alone():
    p = planned(dom(os_extra="<smbios mode='host'/>"), "openstack")
    assert not p.changed and "mode='host'" in p.problems[0]


def test_ec2_needs_an_ec2_uuid():
    x = source("q35")
    p = planned(x, "ec2")
    assert (p.xml, p.route, p.changed) == (x, None, False)
    assert "needs a domain UUID starting with 'ec2'" in p.problems[0]
    assert "cannot be changed" in p.problems[0]
    p = planned(source("pc"), "ec2")
    assert p.route == "ec2"
    assert [(e.get("name"), e.text) for e in ET.fromstring(p.xml).find("sysinfo/system")] == [
        ("serial", EC2_UUID), ("uuid", EC2_UUID)]


@pytest.mark.parametrize("name", INPUTS)
def test_none_never_touches_a_domain(name):
    x = source(name)
    assert planned(x, "none") == routes.Plan("none", x, (), ())
    shown = planned(x, "openstack").xml
    p = planned(shown, "none", force=True)
    assert (p.xml, p.route, p.changed) == (shown, "openstack", False)
    assert "never changes a domain" in p.problems[0]


def test_opted_out_domain_is_left_alone_unless_forced():
    x = dom(metadata=mds(route="none"))
    assert routes.existing_route(x) == "none"
    p = planned(x, "openstack")
    assert (p.xml, p.route) == (x, "none") and "opted out" in p.problems[0]
    p = planned(x, "openstack", force=True)
    assert p.route == "openstack" and "changed <mds:route> none -> openstack" in p.changes


def test_invalid_recorded_route_is_left_alone():
    x = dom(metadata=mds(route="nocloudnet"))
    p = planned(x, "openstack")
    assert (p.xml, p.route) == (x, None) and "'nocloudnet' is not one of" in p.problems[0]
    assert routes.recorded_route(x) == "nocloudnet"


# -- switching ---------------------------------------------------------------------

def test_another_route_is_not_switched_without_force():
    shown = planned(source("q35"), "openstack").xml
    p = planned(shown, "configdrive")
    assert (p.xml, p.route, p.changed) == (shown, "openstack", False)
    assert "already shows route openstack (SMBIOS product 'OpenStack Nova')" in p.problems[0]


def test_force_switch_removes_mdservers_own_additions():
    x = source("q35")
    openstack = planned(x, "openstack").xml
    p = planned(openstack, "configdrive", force=True)
    assert p.route == "configdrive"
    # nova's entries, the emptied <sysinfo> and the smbios mode go: as if planned directly
    assert p.xml == planned(x, "configdrive").xml
    assert "may provision it again" in p.problems[0]
    assert "removed <sysinfo> entry product=OpenStack Nova (mdserver's, for route openstack)" \
        in p.changes
    back = planned(p.xml, "openstack", force=True)
    assert back.route == "openstack" and seed_of(x) not in back.xml
    # the virtio-scsi controller stays (it cannot be told from the admin's)
    assert "<controller type='scsi' model='virtio-scsi'/>" in back.xml
    assert not planned(back.xml, "openstack").changed


def test_force_switch_to_ec2_keeps_the_entries_ec2_needs():
    x = source("pc")
    p = planned(planned(x, "openstack").xml, "ec2", force=True)
    assert p.route == "ec2" and p.xml == planned(x, "ec2").xml
    assert "instance-id changes, so cloud-init will provision it again" in p.problems[0]
    assert [c for c in p.changes if c.startswith("removed")] == [
        "removed <sysinfo> entry manufacturer=OpenStack Foundation (mdserver's, for route "
        "openstack)",
        "removed <sysinfo> entry product=OpenStack Nova (mdserver's, for route openstack)",
        "removed <sysinfo> entry family=Virtual Machine (mdserver's, for route openstack)"]


def test_force_switch_leaves_what_the_admin_set():
    admin = dom(uuid=EC2_UUID, sysinfo=system(product="OpenStack Compute"),
                os_extra="<smbios mode='sysinfo'/>")
    p = planned(admin, "nocloud-net", force=True)  # NoCloud comes first in cloud-init
    assert p.route == "nocloud-net" and "OpenStack Compute" in p.xml
    p = planned(admin, "ec2", force=True)          # but OpenStack comes before Ec2
    assert (p.xml, p.route) == (admin, "openstack")
    assert "would still show route openstack (SMBIOS product 'OpenStack Compute')" in \
        p.problems[-1]
    x = source("sysinfo")
    p = planned(planned(x, "openstack").xml, "nocloud-net", force=True)
    assert not p.changed and p.route == "openstack"
    assert any("ASSET-0042" in line for line in p.problems)


# -- what a domain shows -----------------------------------------------------------

@pytest.mark.parametrize("xml, route", [
    (dom(), None),
    (dom(sysinfo=system(product="OpenStack Nova")), "openstack"),
    (dom(sysinfo=system(product="OpenStack Compute")), "openstack"),
    (dom(sysinfo="<chassis><entry name='asset'>OpenStack Nova</entry></chassis>"), "openstack"),
    (dom(sysinfo=system(serial="ds=nocloud;s=http://metadata/nocloud/")), "nocloud-net"),
    (dom(sysinfo=system(serial=routes.NOCLOUD_SERIAL)), "nocloud-net"),
    (dom(EC2_UUID, sysinfo=system(serial=EC2_UUID)), "ec2"),
    (dom(EC2_UUID, sysinfo=system(serial=EC2_UUID.upper())), "ec2"),
    (dom(EC2_UUID, sysinfo=system(serial="ec2-something")), "ec2"),
    (dom(EC2_UUID), None),
    (dom(UUID, sysinfo=system(serial=UUID)), None),
    # nova's SMBIOS on an ec2 UUID: cloud-init tries OpenStack before Ec2
    (dom(EC2_UUID, sysinfo=system(product="OpenStack Nova", serial=EC2_UUID)), "openstack"),
    (dom(devices=cdrom(f"{SEEDS}/{UUID}.iso"), metadata=mds(route="configdrive")),
     "configdrive"),
    (dom(devices=cdrom(f"/elsewhere/{UUID}.iso"), metadata=mds(route="nocloud")), "nocloud"),
    (dom(devices=cdrom(f"{SEEDS}/{UUID}.iso")), None),
    (dom(devices=cdrom(f"{SEEDS}/{UUID}.iso"), metadata=mds(route="openstack")), "openstack"),
    (dom(metadata=mds(route="nocloud-net")), "nocloud-net"),
    (dom(metadata=mds(route="none")), "none"),
    (dom(metadata=mds(route="bogus")), None),
    (dom(sysinfo=system(serial=routes.NOCLOUD_SERIAL, product="OpenStack Nova")),
     "nocloud-net"),
])
def test_existing_route(xml, route):
    assert routes.existing_route(xml) == route


def test_recorded_route_any_prefix():
    assert routes.recorded_route(dom()) is None
    assert routes.recorded_route(dom(metadata=mds(route=" openstack "))) == "openstack"
    assert routes.recorded_route(dom(metadata=mds(route=""))) is None
    assert routes.recorded_route(dom(metadata=mds(hostname="h"))) is None
    other = "<m:instance xmlns:m='urn:mdserver:1'><m:route>ec2</m:route></m:instance>"
    assert routes.recorded_route(dom(metadata=other)) == "ec2"
    default = "<instance xmlns='urn:mdserver:1'><route>nocloud</route></instance>"
    assert routes.recorded_route(dom(metadata=default)) == "nocloud"
    wrong = "<mds:instance xmlns:mds='urn:other'><mds:route>ec2</mds:route></mds:instance>"
    assert routes.recorded_route(dom(metadata=wrong)) is None


# -- the document's own form ---------------------------------------------------------

def test_route_recorded_with_the_documents_prefix():
    x = dom(metadata="<m:instance xmlns:m='urn:mdserver:1'><m:hostname>h</m:hostname>"
                     "</m:instance>")
    p = planned(x, "openstack")
    assert "<m:hostname>h</m:hostname><m:route>openstack</m:route></m:instance>" in p.xml
    x = dom(metadata="<instance xmlns='urn:mdserver:1'/>")
    p = planned(x, "openstack")
    assert "<instance xmlns='urn:mdserver:1'>" in p.xml and "<route>openstack</route>" in p.xml
    assert routes.recorded_route(p.xml) == "openstack"


def test_empty_metadata_element():
    x = dom().replace("<memory", "<metadata/>\n  <memory")
    p = planned(x, "nocloud-net")
    assert "  <metadata>\n    <mds:instance xmlns:mds='urn:mdserver:1'>\n" in p.xml
    assert routes.recorded_route(p.xml) == "nocloud-net" and p.xml.count("<metadata") == 1


def test_one_line_document_stays_one_line():
    x = "".join(line.strip() for line in source("pc").splitlines())
    for route in ("openstack", "configdrive", "ec2"):
        p = planned(x, route)
        assert p.route == route and "\n" not in p.xml
        assert not planned(p.xml, route).changed
        removed = strip_added(ET.fromstring(x), ET.fromstring(p.xml))
        assert removed


def test_crlf_document_keeps_crlf():
    x = source("q35").replace("\n", "\r\n")
    p = planned(x, "openstack")
    assert "\r\n" in p.xml and "\n" not in p.xml.replace("\r\n", "")
    assert p.xml.replace("\r\n", "\n") == planned(source("q35"), "openstack").xml


def test_entries_go_in_libvirts_order():
    x = dom(sysinfo=system(version="1.0", sku="S1"), os_extra="<smbios mode='sysinfo'/>")
    tree = ET.fromstring(planned(x, "openstack").xml)
    assert [e.get("name") for e in tree.find("sysinfo/system")] == [
        "manufacturer", "product", "version", "serial", "uuid", "sku", "family"]


def test_sysinfo_goes_before_os_and_system_before_chassis():
    x = dom(sysinfo="<chassis><entry name='vendor'>V</entry></chassis>")
    tree = ET.fromstring(planned(x, "nocloud-net").xml)
    assert [c.tag for c in tree.find("sysinfo")] == ["system", "chassis"]
    tree = ET.fromstring(planned(dom(), "nocloud-net").xml)
    tags = [c.tag for c in tree]
    assert tags.index("sysinfo") + 1 == tags.index("os")
    assert tags.index("metadata") == tags.index("uuid") + 1


# -- errors and hints -------------------------------------------------------------------

@pytest.mark.parametrize("xml, message", [
    ("<domain><name>x", "malformed XML"),
    ("<network><name>x</name></network>", "not a libvirt domain"),
    ("<!DOCTYPE domain [<!ENTITY e 'x'>]><domain/>", "DOCTYPE"),
    ("<domain><name>x</name></domain>", "missing <uuid>"),
    ("<domain><uuid>nope</uuid></domain>", "is not a UUID"),
])
def test_bad_documents(xml, message):
    for call in (lambda: routes.plan(xml, "openstack"), lambda: routes.existing_route(xml)):
        with pytest.raises(BadDomainXML, match=message):
            call()


def test_unknown_route():
    with pytest.raises(ValueError):
        routes.plan(dom(), "aws")


def test_domain_facts():
    assert routes.domain_facts(source("pc")) == routes.Domain(
        name="legacy-db", uuid=EC2_UUID, machine="pc-i440fx-7.2")


def test_virt_options():
    hints = routes.virt_options("openstack", UUID, None, "pc-q35-7.2", "web 2")
    assert hints == [
        "virt-install ... --sysinfo 'smbios,system.manufacturer=OpenStack Foundation,"
        f"system.product=OpenStack Nova,system.serial={UUID},system.uuid={UUID},"
        "system.family=Virtual Machine'",
        "virt-xml 'web 2' --edit --sysinfo 'smbios,system.manufacturer=OpenStack Foundation,"
        f"system.product=OpenStack Nova,system.serial={UUID},system.uuid={UUID},"
        "system.family=Virtual Machine'"]
    q35 = routes.virt_options("configdrive", UUID, "/s/u.iso", "pc-q35-7.2")
    assert q35[0] == ("virt-install ... --disk path=/s/u.iso,device=cdrom,bus=scsi,"
                      "startup_policy=optional --controller type=scsi,model=virtio-scsi")
    pc = routes.virt_options("nocloud", UUID, "/s/u.iso", "pc-i440fx-7.2", "db")
    assert pc == ["virt-install ... --disk path=/s/u.iso,device=cdrom,bus=ide,"
                  "startup_policy=optional",
                  "virt-xml db --add-device --disk path=/s/u.iso,device=cdrom,bus=ide,"
                  "startup_policy=optional"]
    assert "'smbios,system.serial=ds=nocloud-net;s=http://169.254.169.254/nocloud/'" in \
        routes.virt_options("nocloud-net", UUID, None, "")[0]
    assert f"--uuid {EC2_UUID}" in routes.virt_options("ec2", EC2_UUID, None, "")[0]
    assert "a new domain" in routes.virt_options("ec2", UUID, None, "")[0]
    assert routes.virt_options("none", UUID, None, "") == []


def test_bytes_declaration_and_comments_before_the_root():
    x = "<?xml version='1.0' encoding='UTF-8'?>\n<!-- kept in git -->\n" + dom()
    p = routes.plan(x.encode(), "openstack")
    assert p.xml.startswith("<?xml version='1.0' encoding='UTF-8'?>\n<!-- kept in git -->\n")
    assert p.route == "openstack" and not routes.plan(p.xml, "openstack").changed


def test_pending_means_the_running_guest_sees_another_route():
    plain = read_data("route_pc.xml").decode()
    enrolled = routes.plan(plain, "openstack").xml
    assert routes.pending(plain, enrolled)  # running the plain one, defined with the route
    assert not routes.pending(enrolled, enrolled)
    assert not routes.pending(None, enrolled)  # not running: nothing pending
