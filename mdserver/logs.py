"""Logging set-up: stderr (the journal) or a file that SIGHUP reopens for logrotate; text or JSON lines with stable fields."""

import io
import json
import logging
import os
import sys
import time
from typing import Any, Dict, Optional

FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
STDERR_FORMAT = "%(levelname)s %(name)s: %(message)s"  # the journal adds the time

# The stable fields an event may carry, in the order text lines show them.
FIELDS = ("instance", "uuid", "ip", "mac", "face", "kind", "method", "path", "status",
          "event", "pid")
_ATTR = "mds_fields"  # the LogRecord attribute fields() sets through `extra=`


def fields(**values: Any) -> Dict[str, Any]:
    """`extra=` for a log call: its stable fields (see FIELDS; None is left out).
    Filters in journald or a log shipper match these, not the message text."""
    for name in values:
        if name not in FIELDS:
            raise ValueError(f"unknown log field {name!r}")
    return {_ATTR: {k: v for k, v in values.items() if v is not None}}


def _text_value(value: Any) -> str:
    """A field value as one token: quoted (JSON string rules) when it holds a
    space, a quote, an `=` or a control character, so a guest-chosen path
    can neither split the line nor forge a field."""
    text = str(value)
    if text and all(c.isprintable() and c not in ' "=\\' for c in text):
        return text
    return json.dumps(text)


def _printable(text: str) -> str:
    """Control characters (a guest's path may hold a line break) written as escapes."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


class TextFormatter(logging.Formatter):
    """The classic line, then ` key=value` for each field the event carries.
    One line per event: control characters in the message are escaped (a
    traceback, for a bug, still follows on its own lines)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if not message.isprintable():
            record = logging.makeLogRecord(dict(record.__dict__, msg=_printable(message),
                                                args=None))
        line = super().format(record)
        extra = getattr(record, _ATTR, None)
        if not extra:
            return line
        tail = " ".join(f"{k}={_text_value(extra[k])}" for k in FIELDS if k in extra)
        head, nl, rest = line.partition("\n")  # a traceback stays below its line
        return f"{head} {tail}{nl}{rest}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601, local, with its offset),
    level, logger, message, the event's fields, and `exception` (its
    traceback as one string) if any."""

    def format(self, record: logging.LogRecord) -> str:
        out: Dict[str, Any] = {"time": _iso(record.created), "level": record.levelname,
                               "logger": record.name, "message": record.getMessage()}
        out.update(getattr(record, _ATTR, None) or {})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        return json.dumps(out, ensure_ascii=False, default=str)


def _iso(created: float) -> str:
    local = time.localtime(created)
    offset = time.strftime("%z", local)
    return (time.strftime("%Y-%m-%dT%H:%M:%S", local) + f".{int(created % 1 * 1000):03d}"
            + offset[:3] + ":" + offset[3:])


def formatter(fmt: str, to_file: bool) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter()
    return TextFormatter(FILE_FORMAT if to_file else STDERR_FORMAT)


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


def setup(level: str, logfile: Optional[str],
          fmt: str = "text") -> Optional[ReopenableFileHandler]:
    """Configure the root logger; returns the file handler to reopen on SIGHUP, if any."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler: logging.Handler
    file_handler = None
    if logfile:
        handler = file_handler = ReopenableFileHandler(logfile, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt, to_file=bool(logfile)))
    root.addHandler(handler)
    root.setLevel(level.upper())
    return file_handler
