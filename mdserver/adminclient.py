"""Client of the admin API on mdserver's Unix socket (mdserverctl, the upload relay)."""

import http.client
import json
import os
import socket
from typing import Any, Optional, Tuple

from mdserver.errors import DaemonUnavailable, MdserverError


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def request(path: str, method: str, url: str, body: Optional[bytes] = None,
            timeout: float = 10.0) -> Tuple[int, bytes]:
    """(status, body) of one request on the admin socket at `path`."""
    conn = _UnixConnection(path, timeout)
    try:
        headers = {"Content-Type": "application/xml"} if body is not None else {}
        conn.request(method, url, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    except (FileNotFoundError, ConnectionRefusedError) as e:
        raise DaemonUnavailable(f"mdserver is not running ({path}: {e.strerror})") from None
    except PermissionError:
        raise DaemonUnavailable(f"no permission to use {path} (root or group mdserver "
                                "needed)") from None
    except (OSError, http.client.HTTPException) as e:  # timeouts, resets, garbage
        raise DaemonUnavailable(f"mdserver did not answer on {path}: {e}") from None
    finally:
        conn.close()


def call(path: str, method: str, url: str, body: Optional[bytes] = None) -> Any:
    """The decoded JSON of a successful request; MdserverError with the daemon's message."""
    status, data = request(path, method, url, body)
    if status != 200:
        raise MdserverError(data.decode(errors="replace").strip() or f"HTTP {status}")
    return json.loads(data)


def port_file(admin_socket: str) -> str:
    """Where the daemon reports the port it serves guests on: beside the admin
    socket, `admin.sock` -> `admin.port`. One line, the port number; written
    when serving starts, removed at exit. Useful with `port = 0`."""
    stem, ext = os.path.splitext(admin_socket)
    return (stem if ext == ".sock" else admin_socket) + ".port"
