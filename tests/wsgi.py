"""A minimal in-process WSGI client (no server, no sockets)."""

import io
from typing import Dict, Tuple


def call(app, method: str, path: str, ip: str, headers: Dict[str, str] = None,
         body: bytes = b"") -> Tuple[int, Dict[str, str], str]:
    env = {
        "REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": "",
        "REMOTE_ADDR": ip, "SERVER_NAME": "169.254.169.254", "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body), "wsgi.errors": io.StringIO(),
        "CONTENT_LENGTH": str(len(body)),
    }
    for name, value in (headers or {}).items():
        env["HTTP_" + name.upper().replace("-", "_")] = value
    seen = {}

    def start_response(status, hdrs, exc_info=None):
        seen["status"], seen["headers"] = status, dict(hdrs)

    body = b"".join(app(env, start_response))
    return int(seen["status"].split()[0]), seen["headers"], body.decode()
