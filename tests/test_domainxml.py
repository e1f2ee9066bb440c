"""Domain XML parsing: what is extracted, and every kind of bad input refused."""

import pytest

from mdserver import domainxml
from mdserver.errors import BadDomainXML, PayloadTooLarge

from helpers import domain_xml, read_data

pytestmark = pytest.mark.unit


def parse(data, net="mds"):
    return domainxml.parse(data if isinstance(data, bytes) else data.encode(), net, "br-mds")


def test_real_dumpxml():
    info = parse(read_data("web1.xml"))
    assert (info.name, info.uuid, info.arch) == ("web1", "ec2b7e2a-5d1c-4f3e-9a8b-1c2d3e4f5a6b",
                                                 "x86_64")
    assert info.mac == "52:54:00:ab:cd:02"  # first on mds, lower-cased; not 'default'
    s = info.settings
    assert (s.template, s.hostname, s.password) == ("webserver.yaml", "www",
                                                    "$6$saltsalt$5Qw3kYbq2Hh0aG7m")
    assert s.ssh_keys == ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOwnKey owner@laptop",
                          "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ second@desk")


def test_other_network_name():
    assert parse(read_data("web1.xml"), net="default").mac == "52:54:00:11:22:01"


def test_live_xml_with_bridge_interface():
    xml = domain_xml("vm1", "ec200001-aaaa-4bbb-8ccc-000000000001", "52:54:00:00:00:01")
    xml = xml.replace("<interface type='network'>", "<interface type='bridge'>").replace(
        "<source network='mds'/>", "<source bridge='br-mds'/>")
    assert parse(xml).mac == "52:54:00:00:00:01"


def test_no_metadata_means_default_settings():
    info = parse(domain_xml("vm1", "ec200001-aaaa-4bbb-8ccc-000000000001", "52:54:00:00:00:01"))
    assert info.settings == domainxml.InstanceSettings()


def test_large_domain_accepted():
    big = "".join(f"<disk type='file' device='disk'><source file='/img/{i}.qcow2'/>"
                  f"<target dev='vd{i}'/></disk>" for i in range(3000))
    xml = domain_xml("vm1", "ec200001-aaaa-4bbb-8ccc-000000000001", "52:54:00:00:00:01",
                     devices=big)
    assert len(xml) > 200_000
    assert parse(xml).name == "vm1"


GOOD = domain_xml("vm1", "ec200001-aaaa-4bbb-8ccc-000000000001", "52:54:00:00:00:01")


@pytest.mark.parametrize("xml, why", [
    ("", "malformed XML"),
    ("<domain><name>x</name>", "malformed XML"),
    ("not xml at all", "malformed XML"),
    ("<network><name>mds</name></network>", "no <domain> element"),
    (GOOD.replace("<name>vm1</name>", ""), "missing <name>"),
    (GOOD.replace("<name>vm1</name>", "<name>a/b</name>"), "unusable domain name"),
    (GOOD.replace("<uuid>ec200001-aaaa-4bbb-8ccc-000000000001</uuid>", ""), "missing <uuid>"),
    (GOOD.replace("ec200001-aaaa-4bbb-8ccc-000000000001", "nope"), "is not a UUID"),
    (GOOD.replace("network='mds'", "network='default'"), "no <interface> on network 'mds'"),
    (GOOD.replace("<mac address='52:54:00:00:00:01'/>", ""), "no valid <mac"),
    ('<?xml version="1.0"?><!DOCTYPE d [<!ENTITY x "boom">]><domain><name>&x;</name></domain>',
     "DOCTYPE"),
    ('<!DOCTYPE domain SYSTEM "file:///etc/passwd"><domain/>', "DOCTYPE"),
    ('<domain><name>&xxe;</name></domain>', "malformed XML"),
    (GOOD.replace("</devices>", "</devices><metadata><mds:instance xmlns:mds='urn:mdserver:1'>"
                  "<mds:template>../../etc/shadow</mds:template></mds:instance></metadata>"),
     "<mds:template>"),
    (GOOD.replace("</devices>", "</devices><metadata><mds:instance xmlns:mds='urn:mdserver:1'>"
                  "<mds:hostname>bad_name!</mds:hostname></mds:instance></metadata>"),
     "<mds:hostname>"),
    (GOOD.replace("</devices>", "</devices><metadata><mds:instance xmlns:mds='urn:mdserver:1'>"
                  "<mds:ssh-key>not a key</mds:ssh-key></mds:instance></metadata>"),
     "<mds:ssh-key>"),
    (GOOD.replace("</devices>", "</devices><metadata><mds:instance xmlns:mds='urn:mdserver:1'>"
                  "<mds:password>plaintext</mds:password></mds:instance></metadata>"),
     "<mds:password>"),
])
def test_bad_xml_says_what_is_wrong(xml, why):
    with pytest.raises(BadDomainXML) as info:
        parse(xml)
    assert why in str(info.value)


def test_body_over_limit():
    with pytest.raises(PayloadTooLarge):
        parse(b" " * (domainxml.MAX_XML_BYTES + 1))
    assert domainxml.MAX_XML_BYTES >= 1024 * 1024


def meta_xml(inner: str) -> str:
    return domain_xml("vm1", "ec200001-aaaa-4bbb-8ccc-000000000001", "52:54:00:00:00:01",
                      metadata=f"<mds:instance xmlns:mds='urn:mdserver:1'>{inner}</mds:instance>")


def test_meta_network_and_route():
    s = parse(meta_xml("<mds:meta key='role'>web</mds:meta>"
                       "<mds:meta key='note'>a: b\n&quot;c&quot; 'd' ü</mds:meta>"
                       "<mds:meta key='empty'></mds:meta>"
                       "<mds:network>static</mds:network><mds:route>configdrive</mds:route>")).settings
    assert s.meta == (("role", "web"), ("note", "a: b\n\"c\" 'd' ü"), ("empty", ""))
    assert (s.network, s.route) == ("static", "configdrive")


@pytest.mark.parametrize("inner, why", [
    ("<mds:network>bridged</mds:network>", "<mds:network> 'bridged' is not one of"),
    ("<mds:route>azure</mds:route>", "<mds:route> 'azure' is not one of"),
    ("<mds:meta>x</mds:meta>", "<mds:meta> needs a key attribute"),
    ("<mds:meta key=''>x</mds:meta>", "<mds:meta> needs a key attribute"),
    ("<mds:meta key='dsmode'>local</mds:meta>", "cloud-init acts on this key"),
    ("<mds:meta key='hostname'>x</mds:meta>", "shadows a name"),
    ("<mds:meta key='meta'>x</mds:meta>", "shadows a name"),
    ("<mds:meta key='a'>1</mds:meta><mds:meta key='a'>2</mds:meta>", "appears twice"),
    ("<mds:meta key='a&#10;b'>1</mds:meta>", "control characters"),
    ("<mds:meta key='a'>" + "x" * 256 + "</mds:meta>", "limited to 255"),
    ("".join(f"<mds:meta key='k{i}'>v</mds:meta>" for i in range(129)), "more than 128"),
])
def test_bad_per_instance_settings_name_the_element(inner, why):
    with pytest.raises(BadDomainXML) as e:
        parse(meta_xml(inner))
    assert why in str(e.value)


def test_non_utf8_metadata_is_refused():
    data = meta_xml("<mds:meta key='k'>VALUE</mds:meta>").encode().replace(b"VALUE", b"\xff\xfe")
    with pytest.raises(BadDomainXML):
        parse(data)
