"""ISO9660 images in memory (pure: bytes in, bytes out): the seed images' container.

Each file gets three names: an ISO9660 one (upper case, d-characters only,
`NAME.EXT;1`, what a reader without extensions sees), its exact name in Rock
Ridge (what Linux, so cloud-init, sees) and in Joliet (Windows,
cloudbase-init). The image is deterministic: the same label and files give
the same bytes, whenever and wherever it is built.
"""

import io
import re
import sys
import threading
import time as _time
from contextlib import contextmanager
from typing import Dict, Iterable, Iterator, List, Set, Tuple

import pycdlib

# Every timestamp in the image (volume descriptors, directory records, Rock
# Ridge TF entries): 2000-01-01T00:00:00Z, in UTC.
TIMESTAMP = 946684800.0
FILE_MODE = 0o100444  # Rock Ridge: read-only files and directories
DIR_MODE = 0o040555
MAX_DEPTH = 7  # ECMA-119 6.8.2.1: eight levels, the root being one
NAME_MAX = 30  # ECMA-119 7.5.2, level 2+: name and extension together
DIR_NAME_MAX = 31
JOLIET_MAX = 64  # UCS-2 characters per Joliet name
_NOT_D = re.compile(r"[^A-Z0-9_]")

_clock_lock = threading.Lock()


class _FixedClock:
    """Stands in for the `time` module inside pycdlib while an image is built."""

    def __init__(self, when: float):
        self.when = when

    def time(self) -> float:
        return self.when

    def localtime(self, secs=None) -> _time.struct_time:
        # UTC whatever the process's TZ: pycdlib derives the stored GMT
        # offset from localtime, which would make the bytes depend on TZ.
        return _time.gmtime(self.when if secs is None else secs)

    def __getattr__(self, name):
        return getattr(_time, name)


@contextmanager
def _fixed_time(when: float) -> Iterator[None]:
    """pycdlib takes no date: it stamps time.time() (in local time) into the
    volume descriptors (one of them at write time), every directory record and
    every Rock Ridge TF entry, and its API has no way to pass one. So, while
    an image is built and written, the name `time` in pycdlib's own modules
    (only those: the rest of the process keeps the real clock) refers to a
    clock fixed at `when`, in UTC. Builds are serialised by a lock; pycdlib
    has no other users in mdserver. Patching the date fields afterwards would
    need a walk over pycdlib's internals, and the modification date of the
    volume is made inside write_fp() anyway. tests/test_iso.py proves the
    result independent of the clock and of TZ."""
    with _clock_lock:
        clock = _FixedClock(when)
        patched = []
        for name, module in list(sys.modules.items()):
            if (name == "pycdlib" or name.startswith("pycdlib.")) and \
                    getattr(module, "time", None) is _time:
                patched.append(module)
                setattr(module, "time", clock)
        try:
            yield
        finally:
            for module in patched:
                setattr(module, "time", _time)


def _split(path: str) -> List[str]:
    parts = path.split("/")
    if not path or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"not a relative path of plain names: {path!r}")
    if len(parts) > MAX_DEPTH:
        raise ValueError(f"{path!r} is nested deeper than ISO9660 allows ({MAX_DEPTH})")
    for p in parts:
        if len(p) > JOLIET_MAX:
            raise ValueError(f"{p!r} is longer than a Joliet name may be ({JOLIET_MAX})")
    return parts


def _d_chars(text: str) -> str:
    return _NOT_D.sub("_", text.upper())


def _iso_name(name: str, is_dir: bool, taken: Set[str]) -> str:
    """`name` as an ISO9660 level-3 identifier unique among `taken` (which it
    joins): `META_DATA.JSON;1` for files, `2012_08_10` for directories."""
    if is_dir:
        base, ext = _d_chars(name)[:DIR_NAME_MAX], None
    else:
        stem, dot, ext = name.rpartition(".")
        if not dot or not stem:  # "user_data", ".hidden": all of it is the name
            stem, ext = name, ""
        ext = _d_chars(ext)[:8]
        base = _d_chars(stem)[:NAME_MAX - 1 - len(ext)]
    candidate, n = base, 0
    while (candidate if ext is None else f"{candidate}.{ext}") in taken:
        # Two names the same after mapping (meta-data, meta_data): number the
        # later ones, in the (sorted) order they come.
        n += 1
        suffix = f"_{n}"
        limit = DIR_NAME_MAX if ext is None else NAME_MAX - 1 - len(ext)
        candidate = base[:limit - len(suffix)] + suffix
    ident = candidate if ext is None else f"{candidate}.{ext}"
    taken.add(ident)
    return ident if ext is None else ident + ";1"


def build_iso(label: str, files: Iterable[Tuple[str, bytes]]) -> bytes:
    """An ISO9660 image (Rock Ridge 1.09, Joliet level 3) with volume label
    `label` holding `files` ((relative path, content); directories are made
    as the paths need them). Deterministic: same arguments, same bytes."""
    contents: Dict[str, bytes] = {}
    for path, data in files:
        _split(path)
        if path in contents:
            raise ValueError(f"{path!r} given twice")
        contents[path] = bytes(data)
    dirs: Set[str] = set()
    for path in contents:
        parts = path.split("/")
        for i in range(1, len(parts)):
            dirs.add("/".join(parts[:i]))
    both = sorted(dirs & set(contents))
    if both:
        raise ValueError(f"{both[0]!r} is both a file and a directory")

    # One ISO9660 name per exact path; siblings are mapped in sorted order so
    # that the numbering of clashes does not depend on the caller's order.
    iso_path: Dict[str, str] = {"": ""}
    taken: Dict[str, Set[str]] = {}
    for path in sorted(dirs | set(contents)):
        parent, _, name = path.rpartition("/")
        ident = _iso_name(name, path in dirs, taken.setdefault(parent, set()))
        iso_path[path] = f"{iso_path[parent]}/{ident}"

    out = io.BytesIO()
    with _fixed_time(TIMESTAMP):
        iso = pycdlib.PyCdlib()
        iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=label)
        try:
            for d in sorted(dirs, key=lambda p: (p.count("/"), p)):  # parents first
                iso.add_directory(iso_path[d], rr_name=d.rpartition("/")[2],
                                  joliet_path="/" + d, file_mode=DIR_MODE)
            for path in sorted(contents):
                data = contents[path]
                iso.add_fp(io.BytesIO(data), len(data), iso_path[path],
                           rr_name=path.rpartition("/")[2], joliet_path="/" + path,
                           file_mode=FILE_MODE)
            iso.write_fp(out)
        finally:
            iso.close()
    return out.getvalue()
