"""Logging set-up: stderr (the journal) or a file that SIGHUP reopens for logrotate."""

import io
import logging
import os
import sys
from typing import Optional

FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
STDERR_FORMAT = "%(levelname)s %(name)s: %(message)s"  # the journal adds the time


class ReopenableFileHandler(logging.FileHandler):
    """A file handler whose file can be reopened after logrotate moved it."""

    def _open(self) -> io.TextIOWrapper:
        # A new log file is 0640 whatever the umask (logging's own open gives
        # 0666 less the umask): no secrets go there, but guests' names and
        # addresses are not everyone's, and a log others can write can be forged.
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                     0o640)
        return open(fd, "a", encoding=self.encoding, errors=self.errors)

    def reopen(self) -> None:
        self.acquire()
        try:
            if self.stream is not None:
                self.stream.close()
            self.stream = self._open()
        finally:
            self.release()


def setup(level: str, logfile: Optional[str]) -> Optional[ReopenableFileHandler]:
    """Configure the root logger; returns the file handler to reopen on SIGHUP, if any."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler: logging.Handler
    file_handler = None
    if logfile:
        handler = file_handler = ReopenableFileHandler(logfile, encoding="utf-8")
        handler.setFormatter(logging.Formatter(FILE_FORMAT))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(STDERR_FORMAT))
    root.addHandler(handler)
    root.setLevel(level.upper())
    return file_handler
