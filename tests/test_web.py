"""Every route and status code of the guest-facing app, in process."""

import json
import logging

import pytest

from helpers import make_instance, write_config
from mdserver import config, web
from mdserver.errors import DaemonUnavailable, MdserverError
from mdserver.wiring import build_service
from mdserver.faces.ec2 import VERSIONS
from mdserver.models import InstanceSettings
from mdserver.store import Store
import wsgi

pytestmark = pytest.mark.unit

GUEST = "10.122.0.7"
OTHER = "10.122.0.8"
KEY = "ssh-ed25519 AAAAC3Nza admin@host"
TTL = {"X-aws-ec2-metadata-token-ttl-seconds": "21600"}


def call(app, method, path, ip=GUEST, headers=None):
    return wsgi.call(app, method, path, ip=ip, headers=headers)


@pytest.fixture
def env(tmp_path):
    def make(tokens="optional", access_log=False, extra=""):
        while made:  # one writer per database: close the previous app's store
            made.pop().close()
        cfg = config.load(write_config(tmp_path, f"[public-keys]\nadmin = {KEY}\n" + extra,
                                       imds_tokens=tokens))
        store = Store(cfg.mdserver.db_file)
        store.put(make_instance(7, ipv4=GUEST))
        store.put(make_instance(8, ipv4=OTHER,
                                settings=InstanceSettings(ssh_keys=("ssh-rsa OWN8 x@y",))))
        service = build_service(cfg, store)
        made.append(store)
        return web.metadata_app(service, access_log=access_log), service
    made = []
    yield make
    while made:
        made.pop().close()


def token_for(app, ip=GUEST):
    status, headers, body = call(app, "PUT", "/latest/api/token", ip=ip, headers=TTL)
    assert status == 200
    return body


def test_version_listing(env):
    app, _ = env()
    status, headers, body = call(app, "GET", "/", ip="10.9.9.9")
    assert status == 200 and headers["Content-Type"] == "text/plain"
    assert body.split("\n") == list(VERSIONS) + ["latest"]


@pytest.mark.parametrize("version", ["latest", "2009-04-04", "2021-03-23", "1.0"])
@pytest.mark.parametrize("slash", ["", "/"])
def test_version_root(env, version, slash):
    app, _ = env()
    assert call(app, "GET", f"/{version}{slash}")[2] == "dynamic/\nmeta-data/\nuser-data"


@pytest.mark.parametrize("path, expected", [
    ("meta-data/instance-id", "i-ec200007aaaa4bbb8"),
    ("meta-data/local-ipv4", GUEST),
    ("meta-data/public-keys", "0=admin"),
    ("meta-data/public-keys/", "0=admin"),
    ("meta-data/public-keys/0/", "openssh-key"),
    ("meta-data/public-keys/0/openssh-key", KEY),
    ("meta-data/placement/availability-zone", "mds-1a"),
    ("meta-data/placement/", "availability-zone\nregion"),
    ("dynamic/instance-identity", "document"),
    ("dynamic/instance-identity/", "document"),
])
def test_tree_paths(env, path, expected):
    app, _ = env()
    status, headers, body = call(app, "GET", f"/2021-03-23/{path}", ip=GUEST)
    assert (status, body) == (200, expected)
    assert headers["Content-Type"] == "text/plain"


def test_each_guest_sees_only_its_own_data(env):
    app, _ = env()
    mine = call(app, "GET", "/latest/meta-data/instance-id", ip=GUEST)[2]
    theirs = call(app, "GET", "/latest/meta-data/instance-id", ip=OTHER)[2]
    assert mine != theirs
    assert call(app, "GET", "/latest/meta-data/public-keys/", ip=OTHER)[2] == "0=admin\n1=vm8-0"
    assert "OWN8" not in call(app, "GET", "/latest/user-data", ip=GUEST)[2]
    assert "OWN8" in call(app, "GET", "/latest/user-data", ip=OTHER)[2]


def test_forwarded_for_never_changes_identity(env):
    app, _ = env()
    status, _, body = call(app, "GET", "/latest/meta-data/local-ipv4", ip="10.9.9.9",
                           headers={"X-Forwarded-For": GUEST})
    assert status == 404 and GUEST not in body


def test_identity_document(env):
    app, _ = env()
    doc = json.loads(call(app, "GET", "/latest/dynamic/instance-identity/document")[2])
    assert doc["privateIp"] == GUEST and doc["instanceId"] == "i-ec200007aaaa4bbb8"


def test_user_data(env):
    app, _ = env()
    status, headers, body = call(app, "GET", "/latest/user-data")
    assert status == 200 and body.startswith("#cloud-config\n")
    assert headers["Content-Type"] == "application/octet-stream"


@pytest.mark.parametrize("method, path, ip, status", [
    ("GET", "/latest/meta-data/", "10.9.9.9", 404),         # unknown guest
    ("GET", "/latest/user-data", "10.9.9.9", 404),
    ("GET", "/latest/meta-data/nothing", GUEST, 404),       # unknown path
    ("GET", "/latest/meta-data/instance-id/extra", GUEST, 404),
    ("GET", "/2099-01-01/meta-data/", GUEST, 404),          # unknown version
    ("GET", "/latest/api/token", GUEST, 405),
    ("POST", "/latest/meta-data/", GUEST, 405),             # wrong method
    ("DELETE", "/latest/meta-data/instance-id", GUEST, 405),
    ("PUT", "/latest/meta-data/instance-id", GUEST, 405),
])
def test_error_statuses_are_one_plain_line(env, method, path, ip, status):
    app, _ = env()
    got, headers, body = call(app, method, path, ip=ip)
    assert got == status
    assert headers["Content-Type"] == "text/plain"
    assert body.endswith("\n") and body.count("\n") == 1 and "<" not in body


def test_token_put_rules(env):
    app, _ = env()
    status, headers, token = call(app, "PUT", "/latest/api/token", headers=TTL)
    assert status == 200 and token and not token.endswith("\n")
    assert headers["X-Aws-Ec2-Metadata-Token-Ttl-Seconds"] == "21600"
    assert call(app, "PUT", "/2021-03-23/api/token", headers=TTL)[0] == 403
    assert call(app, "PUT", "/latest/api/token",
                headers={**TTL, "X-Forwarded-For": "1.2.3.4"})[0] == 403
    for bad in ("0", "21601", "x"):
        assert call(app, "PUT", "/latest/api/token",
                    headers={"X-aws-ec2-metadata-token-ttl-seconds": bad})[0] == 400
    assert call(app, "PUT", "/latest/api/token")[0] == 400


def test_token_checked_on_every_request_that_carries_one(env):
    app, _ = env()
    token = token_for(app)
    ok = call(app, "GET", "/latest/meta-data/instance-id",
              headers={"X-aws-ec2-metadata-token": token})
    assert ok[0] == 200 and int(ok[1]["X-Aws-Ec2-Metadata-Token-Ttl-Seconds"]) > 21000
    for path in ("/latest/meta-data/instance-id", "/latest/user-data", "/latest/"):
        assert call(app, "GET", path, headers={"X-aws-ec2-metadata-token": "x.y"})[0] == 401
    # valid only for the guest that obtained it
    assert call(app, "GET", "/latest/meta-data/instance-id", ip=OTHER,
                headers={"X-aws-ec2-metadata-token": token})[0] == 401


def test_tokens_optional_by_default_and_required_by_policy(env):
    app, _ = env()
    assert call(app, "GET", "/latest/meta-data/instance-id")[0] == 200
    app, _ = env(tokens="required")
    assert call(app, "GET", "/latest/meta-data/instance-id")[0] == 401
    token = token_for(app)
    assert call(app, "GET", "/latest/meta-data/instance-id",
                headers={"X-aws-ec2-metadata-token": token})[0] == 200
    assert call(app, "GET", "/")[0] == 200  # the version list needs no token


def test_template_error_is_500_one_log_line_no_body(env, tmp_path, caplog):
    app, _ = env()
    (tmp_path / "userdata" / "vm7").write_text(
        "#cloud-config\nsecret: {{public_key_admin}}\nbad: [\n")
    with caplog.at_level(logging.INFO):
        status, _, body = call(app, "GET", "/latest/user-data")
    assert status == 500 and body == "template error\n"
    lines = [r for r in caplog.records if r.name == "mdserver.web"]
    assert len(lines) == 1 and "line" in lines[0].getMessage()
    assert KEY not in caplog.text  # no secret in the log


def test_unexpected_exception_is_500_and_app_keeps_working(env, caplog):
    app, service = env()

    def boom(*a):
        raise RuntimeError("boom")
    service.answer, original = boom, service.answer
    assert call(app, "GET", "/latest/meta-data/instance-id")[0] == 500
    service.answer = original
    assert call(app, "GET", "/latest/meta-data/instance-id")[0] == 200


def test_access_log_has_no_secrets(env, caplog):
    app, _ = env(access_log=True)
    with caplog.at_level(logging.INFO, logger="mdserver.access"):
        token = token_for(app)
        call(app, "GET", "/latest/user-data", headers={"X-aws-ec2-metadata-token": token})
        call(app, "GET", "/latest/meta-data/public-keys/0/openssh-key")
    lines = [r.getMessage() for r in caplog.records if r.name == "mdserver.access"]
    assert lines == [f"{GUEST} PUT /latest/api/token 200 token=no",
                     f"{GUEST} GET /latest/user-data 200 token=yes",
                     f"{GUEST} GET /latest/meta-data/public-keys/0/openssh-key 200 token=no"]
    assert token not in caplog.text and KEY not in caplog.text


def test_updated_instance_is_served_fresh(env):
    app, service = env()
    assert call(app, "GET", "/latest/meta-data/local-hostname")[2] == "vm7"
    inst = service.store.by_ip(GUEST)
    service.store.put(inst.updated(hostname="renamed"))
    assert call(app, "GET", "/latest/meta-data/local-hostname")[2] == "renamed"


def test_instance_upload_route(env):
    _, service = env()
    got = []

    def relay(body):  # FAKE: stands in for the main process's admin socket
        got.append(body)
        return 200, b'{"name": "vm1"}'

    def down(body):
        raise DaemonUnavailable("mdserver is not running (admin.sock: gone)")

    app = web.metadata_app(service, upload=relay, host_addresses={"127.0.0.1"})
    status, headers, body = call(app, "POST", "/instance-upload", ip="127.0.0.1")
    assert (status, headers["Content-Type"], body) == (200, "application/json",
                                                       '{"name": "vm1"}')
    assert call(app, "POST", "/instance-upload", ip="127.0.0.2")[0] == 403
    assert call(app, "POST", "/instance-upload", ip=GUEST)[0] == 403 and len(got) == 1
    app = web.metadata_app(service, upload=down, host_addresses={"127.0.0.1"})
    status, _, body = call(app, "POST", "/instance-upload", ip="127.0.0.1")
    assert status == 503 and "not running" in body


def test_other_server_errors_say_only_internal_error(env, caplog):
    _, service = env()

    def broken(body):
        raise MdserverError("secret detail")
    app = web.metadata_app(service, upload=broken, host_addresses={"127.0.0.1"})
    status, _, body = call(app, "POST", "/instance-upload", ip="127.0.0.1")
    assert (status, body) == (500, "internal error\n") and "secret detail" in caplog.text
