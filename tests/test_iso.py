"""mdserver.iso: ISO9660 + Rock Ridge + Joliet images, read back by pycdlib, isoinfo,
blkid and the kernel; byte-identical whatever the clock and the time zone."""

import io
import re
import shutil
import subprocess
import sys
import time

import pycdlib
import pytest

from helpers import need
from mdserver import iso as isomod
from mdserver.iso import build_iso

unit, process, privileged = pytest.mark.unit, pytest.mark.process, pytest.mark.privileged

FILES = [
    ("openstack/2012-08-10/meta_data.json", b'{"uuid": "x"}'),
    ("openstack/latest/meta_data.json", b'{"uuid": "y"}'),
    ("openstack/latest/user_data", b"#cloud-config\nhostname: a\n"),
    ("ec2/latest/meta-data.json", b"{}"),
    ("meta-data", b"instance-id: x\n"),
    ("user-data", b""),
    ("meta_data", b"clashes with meta-data in ISO9660"),
    ("a.b.c", b"dots"),
    ("x" * 40 + ".configuration", b"long"),
]
ISO_NAME = re.compile(r"^[A-Z0-9_]{1,29}\.[A-Z0-9_]{0,8};1$")
ISO_DIR = re.compile(r"^[A-Z0-9_]{1,31}$")


def open_iso(data: bytes) -> pycdlib.PyCdlib:
    image = pycdlib.PyCdlib()
    image.open_fp(io.BytesIO(data))
    return image


def tree(image, **root):
    """{path: content} of every file, and the set of directories, under one
    name space (rr_path, joliet_path or iso_path)."""
    kind = next(iter(root))
    files, dirs = {}, set()
    for top, subdirs, names in image.walk(**root):
        for d in subdirs:
            dirs.add(f"{top.rstrip('/')}/{d}".lstrip("/"))
        for name in names:
            path = f"{top.rstrip('/')}/{name}"
            out = io.BytesIO()
            image.get_file_from_iso_fp(out, **{kind: path})
            files[path.lstrip("/")] = out.getvalue()
    return files, dirs


def expected_dirs():
    dirs = set()
    for path, _ in FILES:
        parts = path.split("/")
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
    return dirs


@unit
def test_rock_ridge_and_joliet_names_are_exact():
    image = open_iso(build_iso("config-2", FILES))
    try:
        assert image.has_rock_ridge() and image.has_joliet()
        for root in ({"rr_path": "/"}, {"joliet_path": "/"}):
            files, dirs = tree(image, **root)
            assert files == dict(FILES), root
            assert dirs == expected_dirs(), root
    finally:
        image.close()


@unit
def test_iso9660_names_are_valid_level_3_and_unique():
    image = open_iso(build_iso("config-2", FILES))
    try:
        files, dirs = tree(image, iso_path="/")
        assert sorted(files.values()) == sorted(data for _, data in FILES)
        for path in files:
            assert ISO_NAME.match(path.rsplit("/", 1)[-1]), path
            assert len(path.rsplit("/", 1)[-1]) <= 32  # 30 + ";1"
        for d in dirs:
            assert ISO_DIR.match(d.rsplit("/", 1)[-1]), d
        assert {"OPENSTACK/2012_08_10/META_DATA.JSON;1", "OPENSTACK/LATEST/USER_DATA.;1",
                "EC2/LATEST/META_DATA.JSON;1", "META_DATA.;1", "META_DATA_1.;1",
                "A_B.C;1"} <= set(files)
        # each ISO9660 name belongs to the right Rock Ridge name
        rec = image.get_record(rr_path="/meta_data")
        assert rec.file_identifier() == b"META_DATA_1.;1"
    finally:
        image.close()


@unit
def test_label_is_the_volume_identifier_in_both_descriptors():
    for label in ("config-2", "cidata"):
        image = open_iso(build_iso(label, [("meta-data", b"")]))
        try:
            assert image.pvd.volume_identifier.decode().rstrip() == label
            assert image.joliet_vd.volume_identifier.decode("utf-16-be").rstrip() == label
        finally:
            image.close()


@unit
def test_deterministic_whatever_the_clock_the_tz_and_the_order(monkeypatch):
    first = build_iso("config-2", FILES)
    assert build_iso("config-2", FILES) == first
    # another time, another zone, the files in another order: the same bytes
    monkeypatch.setattr(time, "time", lambda: 2000000000.5)
    monkeypatch.setenv("TZ", "XST-5:30")  # +05:30 (POSIX form: no tzdata needed)
    time.tzset()
    try:
        assert build_iso("config-2", list(reversed(FILES))) == first
    finally:
        monkeypatch.undo()
        time.tzset()
    assert build_iso("cidata", FILES) != first


@unit
def test_pycdlib_keeps_its_real_clock_outside_a_build():
    build_iso("cidata", [("meta-data", b"")])
    import pycdlib.headervd
    assert pycdlib.headervd.time is time
    for name, module in list(sys.modules.items()):
        if name.startswith("pycdlib.") and hasattr(module, "time"):
            assert module.time is time, name


@unit
def test_timestamps_are_fixed_in_utc():
    image = open_iso(build_iso("cidata", [("d/meta-data", b"x")]))
    try:
        date = image.pvd.volume_creation_date
        assert (date.year, date.month, date.dayofmonth, date.hour, date.gmtoffset) == \
            (2000, 1, 1, 0, 0)
        rec = image.get_record(rr_path="/d/meta-data")
        assert (rec.date.years_since_1900, rec.date.month, rec.date.gmtoffset) == (100, 1, 0)
    finally:
        image.close()


@unit
@pytest.mark.parametrize("files, message", [
    ([("/meta-data", b"")], "relative"),
    ([("a//b", b"")], "relative"),
    ([("a/../b", b"")], "relative"),
    ([("", b"")], "relative"),
    ([("a", b""), ("a", b"")], "twice"),
    ([("a", b""), ("a/b", b"")], "both a file and a directory"),
    ([("/".join("d" * 8), b"")], "deeper"),
    ([("n" * 65, b"")], "Joliet"),
])
def test_bad_paths_are_refused(files, message):
    with pytest.raises(ValueError, match=message):
        build_iso("cidata", files)


@unit
def test_empty_image_and_empty_files():
    image = open_iso(build_iso("cidata", [("user-data", b"")]))
    try:
        assert tree(image, rr_path="/")[0] == {"user-data": b""}
    finally:
        image.close()


# -- independent readers -------------------------------------------------------

@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "seed.iso"
    path.write_bytes(build_iso("config-2", FILES))
    return str(path)


def run(*cmd, **kw):
    return subprocess.run(cmd, capture_output=True, timeout=60, **kw)


@process
def test_isoinfo_reads_label_rock_ridge_and_joliet(image_file):
    need(shutil.which("isoinfo") is not None, "needs isoinfo (apt package genisoimage)")
    info = run("isoinfo", "-d", "-i", image_file).stdout.decode()
    assert re.search(r"^Volume id: config-2$", info, re.M), info
    assert "Rock Ridge signatures version 1 found" in info
    assert "Joliet with UCS level 3 found" in info
    for option in ("-R", "-J"):
        listed = run("isoinfo", option, "-f", "-i", image_file).stdout.decode().split()
        assert set(listed) == {"/" + p for p, _ in FILES} | {"/" + d for d in expected_dirs()}
        for path, data in FILES:
            out = run("isoinfo", option, "-x", "/" + path, "-i", image_file)
            assert out.returncode == 0 and out.stdout == data, (option, path)
    plain = run("isoinfo", "-f", "-i", image_file).stdout.decode().split()
    assert "/OPENSTACK/LATEST/USER_DATA.;1" in plain


@process
def test_blkid_sees_the_label_cloud_init_looks_for(tmp_path):
    need(shutil.which("blkid") is not None, "needs blkid (util-linux)")
    for label in ("config-2", "cidata"):
        path = tmp_path / f"{label}.iso"
        path.write_bytes(build_iso(label, [("meta-data", b"")]))
        out = run("blkid", "-p", "-o", "value", "-s", "LABEL", str(path))
        assert out.stdout.decode().strip() == label
        out = run("blkid", "-p", "-o", "value", "-s", "TYPE", str(path))
        assert out.stdout.decode().strip() == "iso9660"


@unit
def test_iso_names_for_clashes_stay_within_limits():
    taken = set()
    names = [isomod._iso_name("y" * 40 + ".json", False, taken) for _ in range(12)]
    assert len(set(names)) == 12
    assert all(ISO_NAME.match(n) for n in names), names
    dirs = [isomod._iso_name("2012-08-10", True, taken) for _ in range(3)]
    assert dirs == ["2012_08_10", "2012_08_10_1", "2012_08_10_2"]
