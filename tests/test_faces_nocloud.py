"""The NoCloud face: meta-data, user-data, vendor-data, network-config, exactly (golden files)."""

import pytest
import yaml

from helpers import make_instance
from golden import check
from mdserver.errors import Forbidden
from mdserver.faces import nocloud
from mdserver.models import InstanceSettings
from helpers import SITE, view_of

pytestmark = pytest.mark.unit

INST = make_instance(7, settings=InstanceSettings(meta=(("role", "web"),)))


def body(view, path):
    return nocloud.lookup(view, path).body.decode()


def test_meta_data_golden():
    text = body(view_of(INST), "meta-data")
    check("nocloud_meta-data", text)
    md = yaml.safe_load(text)
    assert md["instance-id"] == INST.uuid
    assert md["local-hostname"] == "vm7.example.net"
    assert md["public-keys"] == ["ssh-ed25519 AAAAC3Nza admin@host", "ssh-rsa AAAAB3Nza ops@host"]
    assert md["meta"] == {"role": "web"}


@pytest.mark.parametrize("mode", ["dhcp", "static"])
def test_network_config_golden(mode):
    inst = make_instance(7, settings=InstanceSettings(network=mode))
    check(f"nocloud_network-config_{mode}", body(view_of(inst), "network-config"))


def test_all_four_always_200():
    view = view_of(make_instance(7, settings=InstanceSettings(network="none")), userdata=None)
    for name in nocloud.FILES:
        assert nocloud.lookup(view, name) is not None
    assert body(view, "user-data") == "" and body(view, "vendor-data") == ""
    assert body(view, "network-config") == ""
    assert body(view, "") == "meta-data\nuser-data\nvendor-data\nnetwork-config"


def test_own_uuid_prefix_and_another_uuid_forbidden():
    view = view_of(INST)
    assert body(view, f"{INST.uuid}/meta-data") == body(view, "meta-data")
    assert body(view, f"{INST.uuid.upper()}/user-data") == body(view, "user-data")
    with pytest.raises(Forbidden):
        nocloud.lookup(view, "ec200008-aaaa-4bbb-8ccc-000000000008/meta-data")
    assert nocloud.lookup(view, f"{INST.uuid}/meta-data/x") is None


def test_vendor_data():
    site = SITE.__class__(**{**SITE.__dict__, "vendor_data": "#cloud-config\nruncmd: [x]\n"})
    assert body(view_of(INST, site=site), "vendor-data") == "#cloud-config\nruncmd: [x]\n"


def test_seed_files():
    files = dict(nocloud.files(view_of(INST)))
    assert list(files) == ["meta-data", "user-data", "vendor-data", "network-config"]
    no_net = dict(nocloud.files(view_of(make_instance(7, settings=InstanceSettings(
        network="none")), userdata=None)))
    assert list(no_net) == ["meta-data", "user-data", "vendor-data"]
    assert no_net["user-data"] == b""


@pytest.mark.parametrize("value", ["a: b", "line1\nline2", "'quoted' \"double\"", "- x",
                                   "yes", "~", "{not: a map}", "ünïcödé ✓", "#comment", " pad "])
def test_meta_values_round_trip_on_every_face(value):
    import json
    from mdserver.faces import ec2, openstack
    inst = make_instance(7, settings=InstanceSettings(meta=(("k: x\n", value),)))
    view = view_of(inst)
    assert yaml.safe_load(body(view, "meta-data"))["meta"] == {"k: x\n": value}
    assert json.loads(openstack.lookup(view, "latest/meta_data.json").body)["meta"] == {
        "k: x\n": value}
    files = dict(nocloud.files(view) + openstack.files(view) + ec2.files(view))
    assert yaml.safe_load(files["meta-data"])["meta"] == {"k: x\n": value}
    assert json.loads(files["openstack/latest/meta_data.json"])["meta"] == {"k: x\n": value}
