"""Seed images: an instance's data on an ISO that cloud-init reads without a network.

A config drive (`configdrive`, label config-2: openstack/<version>/... and
ec2/latest/meta-data.json) or a NoCloud seed (`nocloud`, label cidata:
meta-data, user-data, vendor-data, network-config), for the instances whose
route is one of them. The domain attaches `<seeds dir>/<uuid>.iso` as a
read-only cdrom; SeedImages keeps those files in step with the database.

Modes and ownership. The directory is 0711: QEMU's user (libvirt-qemu,
qemu on Fedora) must traverse it to open an image by name, but nobody but
the daemon may list it (names are UUIDs). Images are written 0600 by the
daemon's user (they hold user-data and the password hash): with libvirt's
default `dynamic_ownership = 1` (qemu.conf) libvirtd chowns an image to the
QEMU user when the domain starts, and its security driver labels it
(AppArmor's virt-aa-helper adds the path to the domain's own profile,
SELinux's svirt relabels it). libvirt 9.0 does not give a read-only disk
back when the domain stops (seen in tests/test_libvirt_boot.py): the image
then stays the QEMU user's, 0600. The daemon may therefore be unable to read
an image: it compares with what it wrote last, and on a change replaces the
file (the directory is its own), which QEMU opens at the domain's next start.
"""

import hashlib
import logging
import os
import re
from typing import Callable, Dict, List, Optional, Protocol, Sequence, Tuple

from mdserver import logs
from mdserver.faces import ec2, nocloud, openstack
from mdserver.fsutil import atomic_write
from mdserver.iso import build_iso
from mdserver.metrics import HostMetrics
from mdserver.models import SEED_ROUTES, Instance
from mdserver.view import InstanceView, Site

log = logging.getLogger(__name__)

FaceFiles = Callable[[InstanceView], List[Tuple[str, bytes]]]

# route -> (volume label cloud-init looks for, the faces whose files it carries)
FORMATS: Dict[str, Tuple[str, Tuple[FaceFiles, ...]]] = {
    "configdrive": ("config-2", (openstack.files, ec2.files)),
    "nocloud": ("cidata", (nocloud.files,)),
}
assert set(FORMATS) == set(SEED_ROUTES)

DIR_MODE = 0o711
IMAGE_MODE = 0o600
SUFFIX = ".iso"
IMAGE_NAME = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\.iso$",
                        re.IGNORECASE)


def seed_files(view: InstanceView, fmt: str) -> List[Tuple[str, bytes]]:
    """The (path, content) pairs of `view`'s image in format `fmt`
    (configdrive or nocloud). A failing template leaves user-data out
    (config drive) or empty (NoCloud, where the file must exist)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown seed format {fmt!r} (one of {', '.join(FORMATS)})")
    return [f for face_files in FORMATS[fmt][1] for f in face_files(view)]


def seed_image(view: InstanceView, fmt: str) -> bytes:
    """`view`'s seed image in format `fmt`, as ISO9660 bytes (deterministic)."""
    files = seed_files(view, fmt)
    return build_iso(FORMATS[fmt][0], files)


class ViewSource(Protocol):
    """What SeedImages needs of service.Views: the site (for the default
    route) and an InstanceView per instance."""

    site: Site

    def __call__(self, inst: Instance) -> InstanceView: ...


def image_name(uuid: str) -> str:
    return uuid.lower() + SUFFIX


class SeedImages:
    """A registration sink: `<directory>/<uuid>.iso` for each instance on a
    seed route, rewritten only when its bytes change. Nothing to reload:
    QEMU opens the image when the domain starts. With a shared registry
    (`host` set) only this host's instances have images here."""

    name = "seeds"  # its label in metrics

    def __init__(self, directory: str, views: ViewSource, host: Optional[str] = None,
                 metrics: Optional[HostMetrics] = None):
        self.dir = directory
        self.views = views
        self.host = host
        self.metrics = metrics
        # path -> (inode, mtime, size, sha256) of what this process wrote or
        # read last: how an image owned by QEMU's user (the domain runs) is
        # known to be unchanged without reading it.
        self._known: Dict[str, Tuple[int, int, int, bytes]] = {}

    def path(self, uuid: str) -> str:
        name = image_name(uuid)
        if not IMAGE_NAME.match(name):  # the database holds only UUIDs: never a path
            raise ValueError(f"not a UUID: {uuid!r}")
        return os.path.join(self.dir, name)

    def route(self, inst: Instance) -> str:
        return inst.settings.route or self.views.site.route

    def _ensure_dir(self) -> None:
        os.makedirs(self.dir, mode=DIR_MODE, exist_ok=True)
        if os.stat(self.dir).st_mode & 0o777 != DIR_MODE:
            os.chmod(self.dir, DIR_MODE)  # makedirs' mode is cut by the umask

    def _read(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def _unchanged(self, path: str, data: bytes) -> bool:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return False
        digest = hashlib.sha256(data).digest()
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        known = self._known.get(path)
        if known is not None and known[:3] == key:
            return known[3] == digest
        try:
            same = self._read(path) == data
        except PermissionError:
            return False  # not ours to read now and not known: write anew
        if same:
            self._known[path] = key + (digest,)
        return same

    def _write(self, path: str, data: bytes) -> None:
        atomic_write(path, data, IMAGE_MODE)
        st = os.stat(path)
        self._known[path] = (st.st_ino, st.st_mtime_ns, st.st_size,
                             hashlib.sha256(data).digest())

    def _unlink(self, path: str) -> bool:
        self._known.pop(path, None)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        return True

    def put(self, inst: Instance) -> bool:
        """Write `inst`'s image if its route is a seed route and the bytes
        changed; remove a leftover image if the route is not (any more)."""
        fmt = self.route(inst) if self.host in (None, inst.host) else "elsewhere"
        path = self.path(inst.uuid)
        if fmt not in FORMATS:
            if self._unlink(path):
                log.info("%s (%s): %s, seed image removed", inst.name, inst.uuid,
                         f"route {fmt}" if fmt != "elsewhere" else f"now on host {inst.host}")
            return False
        self._ensure_dir()
        data = seed_image(self.views(inst), fmt)
        if not self._unchanged(path, data):
            self._write(path, data)
            if self.metrics is not None:
                self.metrics.seed_written()
            log.info("%s (%s): %s seed image written: %s", inst.name, inst.uuid, fmt, path,
                     extra=logs.fields(instance=inst.name, uuid=inst.uuid,
                                       event="seed-written"))
        return False

    def remove(self, uuid: str) -> bool:
        self._unlink(self.path(uuid))
        return False

    def sync(self, instances: Sequence[Instance]) -> bool:
        """Start-up: every wanted image written, images of unknown UUIDs
        deleted (only `<uuid>.iso`: nothing else in the directory is touched)."""
        self._ensure_dir()
        wanted = set()
        for inst in instances:
            self.put(inst)
            if self.route(inst) in FORMATS and self.host in (None, inst.host):
                wanted.add(image_name(inst.uuid))
        for name in sorted(os.listdir(self.dir)):
            if IMAGE_NAME.match(name) and name not in wanted:
                self._unlink(os.path.join(self.dir, name))
                log.info("stray seed image %s removed", name)
        return False

    def reload(self) -> bool:
        return False
