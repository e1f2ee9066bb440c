"""Logging set-up: stderr (the journal) or a file that SIGHUP reopens for logrotate."""

import logging
import sys
from typing import Optional

FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
STDERR_FORMAT = "%(levelname)s %(name)s: %(message)s"  # the journal adds the time


class ReopenableFileHandler(logging.FileHandler):
    """A file handler whose file can be reopened after logrotate moved it."""

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
