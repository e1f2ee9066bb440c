"""The OpenStack and NoCloud route sets of the guest app, and the password relay, in process."""

import json

import pytest
import yaml

from helpers import domain_xml, mds_metadata, write_config
from mdserver import config, web
from mdserver.wiring import build_service, build_views, template_problem
from mdserver.registry import Registry
from mdserver.store import Store
import wsgi

pytestmark = pytest.mark.unit

KEY = "ssh-ed25519 AAAAC3Nza admin@host"
UUID_A = "5b3c2a10-7e4f-4c8d-9a61-2f0e8d7c6b5a"
UUID_B = "6b3c2a10-7e4f-4c8d-9a61-2f0e8d7c6b5b"


class World:
    def __init__(self, tmp_path, extra=""):
        self.cfg = config.load(write_config(tmp_path, f"[public-keys]\nadmin = {KEY}\n" + extra,
                                            network_config="static"))
        self.store = Store(self.cfg.mdserver.db_file)
        self.registry = Registry(self.cfg, self.store, [],
                                 check=template_problem(build_views(self.cfg)))
        self.admin = web.admin_app(self.registry)
        self.a = self.registry.register(domain_xml("alpha", UUID_A, "52:54:00:00:00:0a",
                                                   metadata=mds_metadata()).encode())
        self.b = self.registry.register(domain_xml("beta", UUID_B, "52:54:00:00:00:0b").encode())

        def relay(uuid, blob):
            status, _, body = wsgi.call(self.admin, "POST", f"/instances/{uuid}/password",
                                        "unix", body=blob)
            return status, body.encode()

        self.app = web.metadata_app(build_service(self.cfg, self.store), password=relay)

    def get(self, path, ip=None, method="GET", body=b""):
        return wsgi.call(self.app, method, path, ip or self.a.ipv4, body=body)


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    yield w
    w.store.close()


def test_openstack_routes(world):
    status, headers, body = world.get("/openstack")
    assert status == 200 and body.endswith("2020-10-14\nlatest")
    assert world.get("/openstack/")[2] == body
    for path in ("/openstack/latest", "/openstack/latest/", "/openstack/2018-08-27"):
        assert world.get(path)[2].startswith("meta_data.json\nuser_data\n"), path
    status, headers, body = world.get("/openstack/latest/meta_data.json")
    assert status == 200 and headers["Content-Type"] == "application/json"
    md = json.loads(body)
    assert md["uuid"] == UUID_A and md["name"] == "alpha"
    assert json.loads(world.get("/openstack/latest/meta_data.json", ip=world.b.ipv4)[2])[
        "uuid"] == UUID_B
    net = json.loads(world.get("/openstack/latest/network_data.json")[2])
    assert net["networks"][0]["ip_address"] == world.a.ipv4
    for path in ("/openstack/2011-01-01", "/openstack/latest/nope", "/openstack/2011-01-01/x"):
        assert world.get(path)[0] == 404, path
    assert world.get("/openstack/latest/meta_data.json", ip="10.122.9.9")[0] == 404


def test_openstack_user_data_failing_template_is_404_not_5xx(tmp_path):
    w = World(tmp_path)
    (tmp_path / "userdata" / "alpha").write_text("#cloud-config\nx: {{nope}}\n")
    try:
        assert w.get("/openstack/latest/user_data")[0] == 404
        assert w.get("/openstack/latest/meta_data.json")[0] == 200
        assert w.get("/nocloud/user-data")[:3:2] == (200, "")
        assert w.get("/latest/user-data")[0] == 500  # EC2 as before
        assert w.registry.describe(w.a)["userdata"].startswith("error: ")
        assert w.registry.describe(w.b)["userdata"] == "ok"
    finally:
        w.store.close()


def test_nocloud_routes(world):
    for prefix in ("/nocloud/", f"/nocloud/{UUID_A}/"):
        status, _, body = world.get(prefix + "meta-data")
        assert status == 200 and yaml.safe_load(body)["instance-id"] == UUID_A
        for name in ("user-data", "vendor-data", "network-config"):
            assert world.get(prefix + name)[0] == 200
    assert world.get(f"/nocloud/{UUID_B}/meta-data")[0] == 403  # not the requester's
    assert world.get("/nocloud/meta-data", ip=world.b.ipv4)[0] == 200
    assert world.get("/nocloud/nope")[0] == 404
    assert world.get("/nocloud")[2] == "meta-data\nuser-data\nvendor-data\nnetwork-config"


def test_ec2_still_served_with_its_instance_id(world):
    assert world.get("/latest/meta-data/instance-id")[2] == "i-5b3c2a107e4f4c8d9"


def test_openstack_password_post_once(world):
    assert world.get("/openstack/latest/password")[:3:2] == (200, "")
    assert world.get("/openstack/latest/password", method="POST", body=b"ZW5jcnlwdGVk")[0] == 200
    assert world.get("/openstack/2013-04-04/password")[2] == "ZW5jcnlwdGVk"
    again = world.get("/openstack/latest/password", method="POST", body=b"b3RoZXI=")
    assert again[0] == 409
    assert world.get("/openstack/latest/password", ip=world.b.ipv4)[2] == ""  # not beta's
    assert world.get("/openstack/latest/password", method="POST", body=b"x" * 257)[0] == 413
    assert world.get("/openstack/2012-08-10/password", method="POST", body=b"eA==")[0] == 404
    assert world.get("/openstack/latest/password", ip="10.122.9.9", method="POST",
                     body=b"eA==")[0] == 404
    # the admin sees it, clears it, and a new one can be stored
    assert wsgi.call(world.admin, "GET", "/instances/alpha/password", "unix")[2].strip() == \
        json.dumps({"password": "ZW5jcnlwdGVk"}, indent=1)
    assert wsgi.call(world.admin, "DELETE", "/instances/alpha/password", "unix")[0] == 200
    assert world.get("/openstack/latest/password", method="POST", body=b"b3RoZXI=")[0] == 200
    # and re-registration (every VM start) keeps it
    world.registry.register(domain_xml("alpha", UUID_A, "52:54:00:00:00:0a").encode())
    assert world.store.by_uuid(UUID_A).password_blob == "b3RoZXI="
