"""The fast path answers exactly as the guest app does, or leaves the request to it."""

import pytest

from helpers import domain_xml, mds_metadata, write_config
from mdserver import config, web
from mdserver.fastpath import FastPath
from mdserver.registry import Registry
from mdserver.store import Store
from mdserver.wiring import build_service, build_views, template_problem
import wsgi

pytestmark = pytest.mark.unit

KEY = "ssh-ed25519 AAAAC3Nza admin@host"
GUESTS = (("alpha", "5b3c2a10-7e4f-4c8d-9a61-2f0e8d7c6b5a", "52:54:00:00:00:0a"),
          ("beta", "6b3c2a10-7e4f-4c8d-9a61-2f0e8d7c6b5b", "52:54:00:00:00:0b"))
ROOTS = ("/", "/latest/", "/2009-04-04/", "/2021-03-23/", "/openstack/", "/openstack/latest/",
         "/openstack/2018-08-27/", "/nocloud/")
# What the fast path must leave to the app, or answer as the app does.
ODD = ("/", "//latest/meta-data/", "/latest", "/latest/api/token", "/latest/api/token/",
       "/openstack", "/openstack/", "/openstackx/latest/", "/nocloud", "/nocloudx",
       "/instance-upload", "/latest/meta-data/nope", "/1999-01-01/meta-data/",
       "/latest//meta-data/", "/LATEST/meta-data/", "/latest/meta-data/instance-id/",
       "/openstack/latest/password", "/openstack/latest/nope.json", "/nocloud/nope",
       "/latest/user-data", "/openstack/latest/user_data", "/nocloud/user-data")


class World:
    def __init__(self, tmp_path, tokens: str):
        self.cfg = config.load(write_config(tmp_path, f"[public-keys]\nadmin = {KEY}\n",
                                            imds_tokens=tokens))
        self.store = Store(self.cfg.mdserver.db_file)
        registry = Registry(self.cfg, self.store, [], check=template_problem(build_views(self.cfg)))
        self.guests = [registry.register(domain_xml(name, uuid, mac,
                                                    metadata=mds_metadata()).encode())
                       for name, uuid, mac in GUESTS]
        self.service = build_service(self.cfg, self.store)
        self.app = web.metadata_app(self.service)
        self.fast = FastPath(self.service)

    def served(self, ip: str):
        """Every path the guest's listings name, from each root (the app's answers)."""
        seen, todo = set(), list(ROOTS)
        while todo:
            path = todo.pop()
            if path in seen or len(seen) > 400:
                continue
            seen.add(path)
            status, _, body = wsgi.call(self.app, "GET", path, ip)
            if status != 200 or not path.endswith("/"):
                continue
            for line in body.splitlines():
                name = line.strip().split("=", 1)[0]
                if name and not name.startswith(("#", "{")) and " " not in name:
                    todo.append(path + name)
        return sorted(seen)


@pytest.fixture(params=["optional", "required"])
def world(request, tmp_path):
    w = World(tmp_path, request.param)
    yield w
    w.store.close()


def check_same(world, method, path, ip, token=None):
    """The fast answer, if any, is the app's: status, headers and body."""
    fast = world.fast(method, path, ip, token)
    if fast is None:
        return None
    headers = {"X-aws-ec2-metadata-token": token} if token else {}
    status, app_headers, body = wsgi.call(world.app, method, path, ip, headers=headers)
    if method == "HEAD":
        body = ""
    assert fast[0] == status, (method, path)
    assert dict(fast[1]) == app_headers, (method, path)
    assert fast[2].decode() == body or method == "HEAD", (method, path)
    return fast


def test_every_served_path_is_answered_fast_and_the_same(world):
    token = world.service.issue_token(world.guests[0].ipv4, "latest", "60", False)[0]
    for guest in world.guests:
        paths = world.served(guest.ipv4)
        assert len(paths) > 60, paths
        own = token if guest is world.guests[0] else None
        fast = [p for p in paths if check_same(world, "GET", p, guest.ipv4, own) is not None]
        if world.service.tokens_required and own is None:
            # no token where one is required: EC2 paths go to the app (401)
            assert not any(p.startswith("/latest") for p in fast)
            fast_faces = [p for p in paths if p.startswith(("/openstack/", "/nocloud/"))]
            assert set(fast_faces) <= set(fast) | {p for p in fast_faces if "user" in p}
        else:
            # the hot paths (every cacheable file of every face) go fast
            assert len(fast) > 0.8 * len(paths), sorted(set(paths) - set(fast))
        for p in paths:
            check_same(world, "HEAD", p, guest.ipv4, own)


def test_odd_paths_unknown_guests_and_bad_tokens_are_the_apps(world):
    a, b = world.guests
    token_b = world.service.issue_token(b.ipv4, "latest", "60", False)[0]
    for path in ODD:
        for ip, token in ((a.ipv4, None), (a.ipv4, token_b), (a.ipv4, "junk"),
                          ("10.9.9.9", None), (b.ipv4, token_b)):
            fast = check_same(world, "GET", path, ip, token)
            if fast is not None:
                assert fast[0] == 200
        for method in ("PUT", "POST", "DELETE", "OPTIONS"):
            assert world.fast(method, path, a.ipv4, None) is None
    # never an answer with another guest's token or for an unknown address
    assert world.fast("GET", "/latest/meta-data/instance-id", a.ipv4, token_b) is None
    assert world.fast("GET", "/latest/meta-data/instance-id", "10.9.9.9", None) is None


def test_it_answers_the_senders_own_data(world):
    a, b = world.guests
    if world.service.tokens_required:
        tokens = {g.ipv4: world.service.issue_token(g.ipv4, "latest", "60", False)[0]
                  for g in (a, b)}
    else:
        tokens = {a.ipv4: None, b.ipv4: None}
    for g in (a, b):
        status, headers, body = world.fast("GET", "/latest/meta-data/instance-id", g.ipv4,
                                           tokens[g.ipv4])
        assert (status, body.decode()) == (200, g.instance_id)
        assert world.fast("GET", "/openstack/latest/meta_data.json", g.ipv4, None)[2] \
            .decode().count(g.uuid) >= 1
