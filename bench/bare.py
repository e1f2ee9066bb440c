"""The bare reference: an RSGI callable that only returns the recorded body, on a granian Server built as mdserver builds its own.

    python -m bench.bare ANSWERS.json ADDRESS PORT WORKERS MAX_CONNECTIONS BACKLOG HEADER_TIMEOUT

The settings are mdserver's (mdserver/server.py `_serve`: RSGI, HTTP/1,
blocking_threads=1, backpressure=max_connections, backlog, header read
timeout, the same number of workers), so the difference between the two is
what mdserver's own code costs per request.
"""

import json
import sys
from functools import partial
from typing import Dict, Tuple

HEADERS = [("content-type", "text/plain")]
NOT_FOUND = b"Not Found\n"


def load(path: str) -> Dict[Tuple[str, str], bytes]:
    """(guest address, path) -> body, for the 200 answers."""
    with open(path) as f:
        answers = json.load(f)
    return {(addr, p): body.encode("latin-1") for addr, per in answers.items()
            for p, (status, body) in per.items() if status == 200}


def make_app(table: Dict[Tuple[str, str], bytes]):
    async def app(scope, proto):
        # granian's scope.client is "address:port" (IPv4 here)
        body = table.get((scope.client.rsplit(":", 1)[0], scope.path))
        if body is None:
            proto.response_bytes(404, HEADERS, NOT_FOUND)
        else:
            proto.response_bytes(200, HEADERS, body)
    return app


def _loader(path: str, _target: str):
    return make_app(load(path))


def main(argv) -> int:
    from granian.constants import HTTPModes, Interfaces
    from granian.http import HTTP1Settings
    from granian.log import LogLevels
    from granian.server import Server

    path, address, port, workers, max_connections, backlog, header_timeout = argv[1:8]
    server = Server(
        "bench-bare", address=address, port=int(port), interface=Interfaces.RSGI,
        http=HTTPModes.http1, workers=int(workers), blocking_threads=1,
        backpressure=int(max_connections), backlog=int(backlog),
        http1_settings=HTTP1Settings(header_read_timeout=int(header_timeout) * 1000),
        websockets=False, log_level=LogLevels.warning, log_access=False,
    )
    server.serve(target_loader=partial(_loader, path))  # called with the target name
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
