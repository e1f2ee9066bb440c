"""systemd's notify protocol (Type=notify): one datagram to $NOTIFY_SOCKET, no libsystemd."""

import logging
import os
import socket
from typing import Mapping

log = logging.getLogger(__name__)


def sd_notify(message: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Send `message` to systemd's notify socket, if there is one (Type=notify)."""
    address = environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(message.encode())
    except OSError as e:  # systemd gone or a stale variable: not worth dying for
        log.warning("cannot notify %s: %s", address, e.strerror)
        return False
    return True
