"""The writer's revision in an 8-byte file every process maps: a replica sees without a system call whether it is behind."""

import mmap
import os
import struct
from typing import Optional

_FORMAT = "<Q"
SIZE = struct.calcsize(_FORMAT)


class SharedRevision:
    """One unsigned 64-bit number in a file, mapped: the writer sets it after
    each commit, readers compare it with their own. A torn read (the writer
    mid-store) only costs the reader one needless refresh."""

    def __init__(self, fd: int, writable: bool):
        try:
            self._map = mmap.mmap(fd, SIZE, access=mmap.ACCESS_WRITE if writable
                                  else mmap.ACCESS_READ)
        finally:
            os.close(fd)  # the mapping keeps the file

    @classmethod
    def create(cls, path: str, revision: int) -> "SharedRevision":
        """The writer's: created (or taken over) with `revision` in it."""
        # Not a secret (a count of writes), but only the daemon's user and
        # group need it, like the database beside it.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            os.fchmod(fd, 0o640)  # the umask may have cut it; never wider
            # Written, not just sized: the block exists before it is mapped,
            # so a store to the mapping never needs space (on a full file
            # system a first store to a hole kills the process with SIGBUS).
            data = struct.pack(_FORMAT, revision)
            if os.pwrite(fd, data, 0) != SIZE:
                raise OSError(f"{path}: short write")
        except OSError:
            os.close(fd)
            raise
        return cls(fd, writable=True)

    @classmethod
    def open(cls, path: str) -> Optional["SharedRevision"]:
        """A reader's, or None while the writer has not made it yet."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        if os.fstat(fd).st_size < SIZE:
            os.close(fd)
            return None
        return cls(fd, writable=False)

    def get(self) -> int:
        return struct.unpack_from(_FORMAT, self._map)[0]

    def set(self, revision: int) -> None:
        struct.pack_into(_FORMAT, self._map, 0, revision)

    def close(self) -> None:
        self._map.close()
