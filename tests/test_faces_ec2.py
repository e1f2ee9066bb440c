"""The EC2 face: exact content, listing rules and the traps DESIGN.md lists."""

import json

import pytest

from golden import check
from mdserver.faces import ec2 as metadata
from mdserver.models import InstanceSettings
from mdserver.view import Site
from helpers import SITE, make_instance, view_of

pytestmark = pytest.mark.unit


def flat(inst=None, site=SITE):
    return metadata.flatten(metadata.build_tree(view_of(inst or make_instance(7), site)))


def test_tree_golden():
    check("metadata_tree.json", json.dumps(flat(), indent=1, sort_keys=True) + "\n")


def test_versions_listing():
    listing = metadata.VERSION_LISTING.split("\n")
    assert listing[0] == "1.0" and listing[-1] == "latest"
    assert {"2009-04-04", "2016-09-02", "2018-09-24", "2021-03-23"} <= set(listing)
    assert listing[:-1] == sorted(listing[:-1])


def test_no_leaf_ends_in_newline_and_every_listed_name_is_served():
    tree = flat()
    for path, body in tree.items():
        assert not body.endswith("\n"), path
    for path, body in tree.items():
        is_dir = any(p.startswith(path + "/") or (path == "" and p) for p in tree)
        if not is_dir:
            continue
        for line in body.split("\n"):
            name = line.split("=", 1)[0].rstrip("/")
            child = f"{path}/{name}" if path else name
            assert child in tree or child == "user-data", (path, line)


def test_root_and_keys_listings():
    tree = flat()
    assert tree[""] == "dynamic/\nmeta-data/\nuser-data"
    assert tree["meta-data/public-keys"] == "0=admin\n1=ops"
    assert tree["meta-data/public-keys/1"] == "openssh-key"
    assert tree["meta-data/public-keys/1/openssh-key"] == "ssh-rsa AAAAB3Nza ops@host"


def test_instance_keys_follow_configured_ones():
    inst = make_instance(7, settings=InstanceSettings(ssh_keys=("ssh-ed25519 OWN me@vm",)))
    tree = flat(inst)
    assert tree["meta-data/public-keys"] == "0=admin\n1=ops\n2=vm7-0"
    assert tree["meta-data/public-keys/2/openssh-key"] == "ssh-ed25519 OWN me@vm"


def test_no_keys_means_no_public_keys_directory():
    tree = flat(site=Site(**{**SITE.__dict__, "public_keys": ()}))
    assert "public-keys/" not in tree["meta-data"].split("\n")
    assert not any(p.startswith("meta-data/public-keys") for p in tree)


def test_local_hostname_has_domain_only_when_set():
    assert flat()["meta-data/local-hostname"] == "vm7.example.net"
    plain = flat(site=Site(**{**SITE.__dict__, "domain": None}))
    assert plain["meta-data/local-hostname"] == "vm7"


def test_instance_id_is_stable_and_derived_from_uuid():
    a = make_instance(7)
    b = make_instance(7, ipv4="10.122.9.9", name="renamed")
    assert flat(a)["meta-data/instance-id"] == flat(b)["meta-data/instance-id"]
    assert a.instance_id == "i-" + a.uuid.replace("-", "")[:17]
    assert make_instance(8).instance_id != a.instance_id


def test_network_interface_entries():
    inst = make_instance(7)
    base = f"meta-data/network/interfaces/macs/{inst.mac}"
    tree = flat(inst)
    assert tree["meta-data/network/interfaces/macs"] == inst.mac + "/"
    assert tree[f"{base}/local-ipv4s"] == inst.ipv4
    assert tree[f"{base}/device-number"] == "0"
    assert tree[f"{base}/subnet-ipv4-cidr-block"] == "10.122.0.0/16"


def test_identity_document_fields():
    inst = make_instance(7)
    doc = json.loads(flat(inst)["dynamic/instance-identity/document"])
    assert doc["instanceId"] == inst.instance_id
    assert doc["privateIp"] == inst.ipv4
    assert (doc["availabilityZone"], doc["region"]) == ("mds-1a", "mds-1")
    assert doc["pendingTime"] == "2023-11-14T22:13:20Z"
    for field in ("imageId", "instanceType", "architecture", "version", "accountId"):
        assert field in doc


@pytest.mark.parametrize("path", ["meta-data", "meta-data/placement", "dynamic",
                                  "dynamic/instance-identity"])
def test_directories_are_served(path):
    assert flat()[path]


def test_lookup_and_config_drive_file():
    view = view_of(make_instance(7))
    assert metadata.lookup(view, "").body.decode() == metadata.VERSION_LISTING
    assert metadata.lookup(view, "latest/meta-data/instance-id").body == b"i-ec200007aaaa4bbb8"
    assert metadata.lookup(view, "latest/meta-data/nope") is None
    assert metadata.lookup(view, "2099-01-01/meta-data") is None
    ud = metadata.lookup(view, "latest/user-data")
    assert ud.body.startswith(b"#cloud-config") and not ud.cacheable
    [(path, body)] = metadata.files(view)
    assert path == "ec2/latest/meta-data.json"
    doc = json.loads(body)
    assert doc["instance-id"] == "i-ec200007aaaa4bbb8"
    assert doc["public-keys"]["1"]["openssh-key"] == "ssh-rsa AAAAB3Nza ops@host"
    assert doc["placement"]["availability-zone"] == "mds-1a"


def test_the_tree_is_built_once_per_view(monkeypatch):
    view = view_of(make_instance(7), SITE)
    first = metadata.lookup(view, "latest/meta-data/instance-id")
    monkeypatch.setattr(metadata, "build_tree", lambda v: pytest.fail("built again"))
    assert metadata.lookup(view, "latest/meta-data/local-ipv4").body == b"10.122.0.7"
    assert first.body == view.ec2_instance_id.encode()
    # a new view (its instance changed) builds its own
    other = view_of(make_instance(8), SITE)
    monkeypatch.undo()
    assert metadata.lookup(other, "latest/meta-data/local-ipv4").body == b"10.122.0.8"
