"""Seed images: their files (golden), the SeedImages sink, `mdserverctl seed` and `password`."""

import dataclasses
import io
import json
import logging
import os
import stat
import subprocess
import sys

import pycdlib
import pytest

from daemon import ROOT, Daemon
from golden import check
from helpers import make_instance, write_config
from hermetic import hermetic_env
from mdserver import adminclient, config
from mdserver.models import InstanceSettings
from mdserver.seeds import FORMATS, SeedImages, seed_files, seed_image
from mdserver.store import Store
from mdserver.view import derived_seed
from mdserver.wiring import build_views
from helpers import view_of

unit, process = pytest.mark.unit, pytest.mark.process

INST = make_instance(7, settings=InstanceSettings(
    ssh_keys=("ssh-ed25519 OWN me@vm",), meta=(("role", "web"),), route="configdrive"))
KEY = b"k" * 32


def read_image(data: bytes):
    """(label, {Rock Ridge path: (ISO9660 path, content)}) of an image."""
    image = pycdlib.PyCdlib()
    image.open_fp(io.BytesIO(data))
    try:
        label = image.pvd.volume_identifier.decode().rstrip()
        files = {}
        for top, _, names in image.walk(rr_path="/"):
            for name in names:
                path = f"{top.rstrip('/')}/{name}"
                out = io.BytesIO()
                image.get_file_from_iso_fp(out, rr_path=path)
                iso_name = image.full_path_from_dirrecord(image.get_record(rr_path=path))
                files[path.lstrip("/")] = (iso_name, out.getvalue())
        return label, files
    finally:
        image.close()


def masked(path: str, content: bytes) -> str:
    text = content.decode()
    if path.endswith("meta_data.json"):
        md = json.loads(text)
        if "random_seed" in md:
            md["random_seed"] = "MASKED"
        text = json.dumps(md, indent=1, sort_keys=True)
    return text


def listing(data: bytes) -> str:
    """An image as text: label, each file with its ISO9660 name, each content."""
    label, files = read_image(data)
    lines = [f"label: {label}", ""]
    lines += [f"{path}  {iso}" for path, (iso, _) in sorted(files.items())]
    for path, (_, content) in sorted(files.items()):
        lines += ["", f"== {path}", masked(path, content)]
    return "\n".join(lines) + "\n"


# -- the images' content --------------------------------------------------------

@unit
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_image_files_golden(fmt):
    data = seed_image(view_of(INST), fmt)
    check(f"seed_{fmt}.txt", listing(data))
    label, files = read_image(data)
    assert label == FORMATS[fmt][0]
    # the image carries exactly what the faces give, nothing else
    assert {p: c for p, (_, c) in files.items()} == dict(seed_files(view_of(INST), fmt))


@unit
def test_config_drive_layout():
    paths = [p for p, _ in seed_files(view_of(INST), "configdrive")]
    assert "openstack/latest/meta_data.json" in paths
    assert "openstack/2012-08-10/user_data" in paths
    assert "ec2/latest/meta-data.json" in paths
    assert not any(p.endswith("/password") for p in paths)  # a drive takes no POST
    md = json.loads(dict(seed_files(view_of(INST), "configdrive"))
                    ["openstack/latest/meta_data.json"])
    assert md["uuid"] == INST.uuid  # the instance-id: the domain's, never a content hash


@unit
def test_nocloud_layout():
    files = dict(seed_files(view_of(INST), "nocloud"))
    assert {"meta-data", "user-data", "vendor-data"} <= set(files)
    assert b"instance-id: " + INST.uuid.encode() in files["meta-data"]


@unit
def test_same_view_same_bytes():
    for fmt in FORMATS:
        assert seed_image(view_of(INST), fmt) == seed_image(view_of(INST), fmt)


@unit
def test_user_data_rendered_once_per_image():
    calls = []
    view = view_of(INST)
    view = dataclasses.replace(view, render_userdata=lambda: calls.append(1) or "#cc\n")
    files = dict(seed_files(view, "configdrive"))
    assert len(calls) == 1
    assert files["openstack/latest/user_data"] == b"#cc\n"


@unit
def test_failing_template_nocloud_keeps_an_empty_user_data(caplog):
    with caplog.at_level(logging.ERROR):
        files = dict(seed_files(view_of(INST, userdata=None), "nocloud"))
    assert files["user-data"] == b""
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1
    assert "user-data left out" in caplog.text


@unit
def test_failing_template_config_drive_has_no_user_data(caplog):
    with caplog.at_level(logging.ERROR):
        data = seed_image(view_of(INST, userdata=None), "configdrive")
    _, files = read_image(data)
    assert not any(p.endswith("user_data") for p in files)
    assert "openstack/latest/meta_data.json" in files  # keys and hostname still there
    assert "user-data left out" in caplog.text


@unit
def test_failing_template_config_drive_logs_one_error(caplog):
    with caplog.at_level(logging.ERROR):
        seed_image(view_of(INST, userdata=None), "configdrive")
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1


# -- the SeedImages sink -----------------------------------------------------------

def sink(cfg):
    return SeedImages(cfg.seeds.dir, build_views(cfg, derived_seed(KEY)))


def with_route(inst, route):
    return inst.updated(settings=dataclasses.replace(inst.settings, route=route))


def identity(path):
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns


@unit
def test_writes_only_for_seed_routes(cfg):
    seeds = sink(cfg)
    a, b, c = (with_route(make_instance(n), r)
               for n, r in ((1, "configdrive"), (2, "nocloud"), (3, "openstack")))
    d = make_instance(4)  # the configured default: openstack
    for inst in (a, b, c, d):
        assert seeds.put(inst) is False  # nothing to reload, ever
    assert sorted(os.listdir(cfg.seeds.dir)) == sorted([a.uuid + ".iso", b.uuid + ".iso"])
    views = build_views(cfg, derived_seed(KEY))
    for inst, fmt in ((a, "configdrive"), (b, "nocloud")):
        with open(seeds.path(inst.uuid), "rb") as f:
            data = f.read()
        assert data == seed_image(views(inst), fmt)
        assert read_image(data)[0] == FORMATS[fmt][0]


@unit
def test_default_route_comes_from_the_configuration(tmp_path):
    cfg = config.load(write_config(tmp_path, "[libvirt]\nroute = nocloud\n"))
    seeds = sink(cfg)
    seeds.put(make_instance(1))
    seeds.put(with_route(make_instance(2), "ec2"))
    assert os.listdir(cfg.seeds.dir) == [make_instance(1).uuid + ".iso"]


@unit
def test_unchanged_image_is_not_rewritten(cfg):
    inst = with_route(make_instance(1), "configdrive")
    seeds = sink(cfg)
    seeds.put(inst)
    path = seeds.path(inst.uuid)
    before = identity(path)
    seeds.put(inst)
    seeds.put(inst.updated(last_seen=inst.last_seen + 60))  # not in the image
    assert identity(path) == before
    sink(cfg).put(inst)  # a restarted daemon (nothing remembered) reads and compares
    sink(cfg).sync([inst])
    assert identity(path) == before


@unit
def test_changed_instance_is_rewritten(cfg):
    inst = with_route(make_instance(1), "configdrive")
    seeds = sink(cfg)
    seeds.put(inst)
    path = seeds.path(inst.uuid)
    before, old = identity(path), read_image(open(path, "rb").read())[1]
    seeds.put(inst.updated(hostname="renamed"))
    assert identity(path) != before
    new = read_image(open(path, "rb").read())[1]
    assert new != old
    assert b"renamed" in new["openstack/latest/meta_data.json"][1]


@unit
def test_image_owned_by_qemu_is_compared_with_what_was_written(cfg, monkeypatch):
    """While the domain runs, libvirt has chowned the image to QEMU's user:
    the daemon cannot read it, and must not rewrite it for nothing."""
    inst = with_route(make_instance(1), "nocloud")
    seeds = sink(cfg)
    seeds.put(inst)
    path = seeds.path(inst.uuid)
    before = identity(path)

    def unreadable(path):
        raise PermissionError(13, "Permission denied", path)
    monkeypatch.setattr(seeds, "_read", unreadable)
    seeds.put(inst)
    assert identity(path) == before
    seeds.put(inst.updated(hostname="renamed"))  # changed: written anew
    assert identity(path) != before
    # a daemon that remembers nothing cannot tell: it writes
    fresh = sink(cfg)
    monkeypatch.setattr(fresh, "_read", unreadable)
    again = identity(path)
    fresh.put(inst.updated(hostname="renamed"))
    assert identity(path) != again


@unit
def test_route_change_and_remove_delete_the_image(cfg):
    inst = with_route(make_instance(1), "configdrive")
    seeds = sink(cfg)
    seeds.put(inst)
    path = seeds.path(inst.uuid)
    seeds.put(with_route(inst, "nocloud"))
    assert read_image(open(path, "rb").read())[0] == "cidata"
    seeds.put(with_route(inst, "openstack"))
    assert not os.path.exists(path)
    seeds.put(inst)
    assert os.path.exists(path)
    assert seeds.remove(inst.uuid) is False
    assert not os.path.exists(path)
    seeds.remove(inst.uuid)  # twice: no error


@unit
def test_sync_writes_wanted_and_deletes_only_stray_images(cfg):
    keep, other = with_route(make_instance(1), "configdrive"), make_instance(2)
    os.makedirs(cfg.seeds.dir)
    d = cfg.seeds.dir
    stray = "0f0e0d0c-0000-4000-8000-000000000009.iso"
    others = ["notes.txt", stray + ".bak", "not-a-uuid.iso", ".tmp-abc", "sub",
              "0F0E0D0C-0000-4000-8000-00000000000A.txt"]
    for name in [stray, other.uuid + ".iso"] + others[:-2]:
        with open(os.path.join(d, name), "w") as f:
            f.write("x")
    os.mkdir(os.path.join(d, "sub"))
    with open(os.path.join(d, others[-1]), "w") as f:
        f.write("x")
    assert sink(cfg).sync([keep, other]) is False
    assert sorted(os.listdir(d)) == sorted(others + [keep.uuid + ".iso"])


@unit
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o000])
def test_modes(cfg, umask):
    old = os.umask(umask)
    try:
        seeds = sink(cfg)
        seeds.sync([with_route(make_instance(1), "nocloud")])
        seeds.put(with_route(make_instance(2), "configdrive"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(cfg.seeds.dir).st_mode) == 0o711
    for name in os.listdir(cfg.seeds.dir):
        st = os.stat(os.path.join(cfg.seeds.dir, name))
        assert stat.S_IMODE(st.st_mode) == 0o600, name
        assert st.st_uid == os.geteuid()


@unit
def test_put_creates_the_directory_without_a_sync(cfg):
    seeds = sink(cfg)
    seeds.put(with_route(make_instance(1), "nocloud"))
    assert stat.S_IMODE(os.stat(cfg.seeds.dir).st_mode) == 0o711


@unit
def test_failing_template_still_gives_an_image(cfg, tmp_path, caplog):
    inst = with_route(make_instance(1), "nocloud")
    (tmp_path / "userdata" / "vm1.yaml").write_text("#cloud-config\na: [\n")
    with caplog.at_level(logging.ERROR):
        sink(cfg).put(inst)
    _, files = read_image(open(sink(cfg).path(inst.uuid), "rb").read())
    assert files["user-data"][1] == b""
    assert b"instance-id" in files["meta-data"][1]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "vm1.yaml" in errors[0].getMessage()


@unit
def test_only_uuids_name_images(cfg):
    with pytest.raises(ValueError):
        sink(cfg).path("../../etc/passwd")


# -- mdserverctl seed and password ---------------------------------------------------

def ctl(path, *args, cwd=ROOT):
    env = hermetic_env(dict(os.environ, PYTHONPATH=ROOT))
    return subprocess.run([sys.executable, "-m", "mdserver.ctl", "-c", path, *args],
                          capture_output=True, timeout=60, cwd=cwd, env=env)


def setup(tmp_path, key=True, **md):
    path = write_config(tmp_path, "[public-keys]\nadmin = ssh-ed25519 AAAAC3Nza admin@host\n",
                        **md)
    store = Store(str(tmp_path / "db.json"))
    store.put(with_route(make_instance(1, ipv4="127.0.0.5"), "configdrive"))
    store.put(make_instance(2, ipv4="127.0.0.6"))
    store.close()
    if key:
        with open(config.load(path).mdserver.token_key_file, "wb") as f:
            f.write(KEY)
    return path


@process
def test_ctl_seed_file_and_stdout_are_the_daemons_image(tmp_path):
    path = setup(tmp_path)
    out = tmp_path / "out.iso"
    r = ctl(path, "seed", "vm1", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert b"configdrive image (label config-2)" in r.stderr
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    r2 = ctl(path, "seed", "vm1", "-o", "-")
    assert r2.returncode == 0, r2.stderr
    assert r2.stdout == out.read_bytes()
    # byte for byte what the daemon's sink writes (same key, same random seed)
    cfg = config.load(path)
    inst = Store(cfg.mdserver.db_file, writable=False).find("vm1")
    seeds = sink(cfg)
    seeds.put(inst)
    assert open(seeds.path(inst.uuid), "rb").read() == r2.stdout


@process
def test_ctl_seed_default_output_and_format(tmp_path):
    path = setup(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    r = ctl(path, "seed", make_instance(1).mac, cwd=str(work))
    assert r.returncode == 0, r.stderr
    assert os.listdir(work) == ["vm1-configdrive.iso"]
    # vm2's route (openstack, the default) is no seed route: --format is needed
    r = ctl(path, "seed", "vm2", cwd=str(work))
    assert r.returncode == 1
    assert r.stderr.decode().startswith("mdserverctl: vm2: its route is openstack")
    assert len(r.stderr.decode().splitlines()) == 1
    r = ctl(path, "seed", "127.0.0.6", "--format", "nocloud", cwd=str(work))
    assert r.returncode == 0, r.stderr
    assert read_image((work / "vm2-nocloud.iso").read_bytes())[0] == "cidata"
    r = ctl(path, "seed", "nope", cwd=str(work))
    assert r.returncode == 1 and b"no instance 'nope'" in r.stderr


@process
def test_ctl_seed_without_the_key_warns_and_creates_no_key(tmp_path):
    path = setup(tmp_path, key=False)
    key_file = config.load(path).mdserver.token_key_file
    r = ctl(path, "seed", "vm1", "-o", "-")
    assert r.returncode == 0, r.stderr
    assert b"warning: cannot read" in r.stderr and b"random_seed differs" in r.stderr
    assert read_image(r.stdout)[0] == "config-2"
    assert not os.path.exists(key_file)


@process
def test_ctl_seed_failing_template_warns_once(tmp_path):
    path = setup(tmp_path)
    (tmp_path / "userdata" / "vm1.yaml").write_text("#cloud-config\na: [\n")
    r = ctl(path, "seed", "vm1", "-o", "-")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.decode().splitlines()
    assert len([line for line in lines if "vm1.yaml" in line]) == 1, lines
    assert not any(p.endswith("user_data") for p in read_image(r.stdout)[1])


@process
def test_ctl_password_show_and_clear(tmp_path):
    path = setup(tmp_path, key=False, listen_address="127.0.0.1", port=0)
    cfg = config.load(path)
    d = Daemon(path).wait_ready()
    try:
        # the daemon made vm1's config drive at start, as `seed` makes it
        image = os.path.join(cfg.seeds.dir, make_instance(1).uuid + ".iso")
        assert stat.S_IMODE(os.stat(cfg.seeds.dir).st_mode) == 0o711
        assert stat.S_IMODE(os.stat(image).st_mode) == 0o600
        r = ctl(path, "seed", "vm1", "-o", "-")
        assert r.returncode == 0 and b"warning" not in r.stderr, r.stderr
        assert r.stdout == open(image, "rb").read()

        r = ctl(path, "password", "vm1")
        assert (r.returncode, r.stdout) == (1, b"")
        assert r.stderr == b"mdserverctl: vm1: no password stored\n"
        adminclient.call(cfg.mdserver.admin_socket, "POST",
                         f"/instances/{make_instance(1).uuid}/password", b"c2VjcmV0\n")
        r = ctl(path, "password", "vm1")
        assert (r.returncode, r.stdout) == (0, b"c2VjcmV0\n"), r.stderr
        r = ctl(path, "password", make_instance(1).uuid, "--clear")
        assert r.returncode == 0, r.stderr
        r = ctl(path, "password", "vm1")
        assert r.returncode == 1 and b"no password stored" in r.stderr
        r = ctl(path, "password", "vm1", "--clear")
        assert r.returncode == 1 and b"no password stored" in r.stderr
        adminclient.call(cfg.mdserver.admin_socket, "POST",
                         f"/instances/{make_instance(1).uuid}/password", b"YWdhaW4=")
    finally:
        d.stop()
    # daemon down: shown from the database, not cleared
    r = ctl(path, "password", "vm1")
    assert (r.returncode, r.stdout) == (0, b"YWdhaW4=\n"), r.stderr
    assert b"reading" in r.stderr
    r = ctl(path, "password", "vm1", "--clear")
    assert r.returncode == 1 and b"changes need the running daemon" in r.stderr
