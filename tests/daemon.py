"""Start and stop a real mdserver daemon process for tests; query it from chosen sources."""

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, timeout: float = 15.0, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode}")
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port}")


class Daemon:
    """`python -m mdserver CONFIG` as a child process of the test."""

    def __init__(self, config_path: str, host: str, port: int, env: Optional[Dict] = None,
                 netns: Optional[str] = None, args: Optional[List[str]] = None):
        self.host, self.port = host, port
        self.log_path = config_path + ".stderr"
        cmd = [sys.executable, "-m", "mdserver"] + (args or [config_path])
        if netns:
            cmd = ["ip", "netns", "exec", netns] + cmd
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**os.environ, **(env or {})},
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 15.0) -> "Daemon":
        wait_port(self.host, self.port, timeout, self.proc)
        return self

    def output(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                # Only our own child, by PID: its process group is its own session.
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def request(host: str, port: int, method: str, path: str, source: str = "127.0.0.1",
            headers: Optional[Dict[str, str]] = None, timeout: float = 5.0,
            body: Optional[str] = None) -> Tuple[int, Dict[str, str], str]:
    """One HTTP request whose TCP source address is `source`."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout, source_address=(source, 0))
    try:
        conn.request(method, path, body=body.encode() if body is not None else None,
                     headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read().decode()
    finally:
        conn.close()
