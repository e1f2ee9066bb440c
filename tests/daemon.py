"""Start and stop a real mdserver daemon process for tests; query it from chosen sources."""

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

from mdserver import config
from mdserver.adminclient import port_file as daemon_port_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    """`python -m mdserver CONFIG` as a child process of the test.

    Tests give their daemons `port = 0` (any free port: no race for a port
    picked beforehand) and learn the port from the daemon's own report, the
    file beside its admin socket (mdserver.adminclient.port_file), in wait_ready().
    `host` and `port`, when given, are what the test expects (say
    169.254.169.254:80 in a namespace of its own); by default both come from
    the configuration and the report. `port_file` is for configurations the
    daemon writes itself (--demo).
    """

    def __init__(self, config_path: str, host: Optional[str] = None, port: Optional[int] = None,
                 env: Optional[Dict] = None, netns: Optional[str] = None,
                 args: Optional[List[str]] = None, port_file: Optional[str] = None):
        if host is None or port_file is None:
            md = config.load(config_path).mdserver
            host = host or md.listen_address
            port_file = port_file or daemon_port_file(md.admin_socket)
        self.host, self.port, self.port_file, self.netns = host, port or 0, port_file, netns
        try:  # a previous run's report (the daemon removes it too, but later)
            os.unlink(port_file)
        except FileNotFoundError:
            pass
        self.log_path = config_path + ".stderr"
        cmd = [sys.executable, "-m", "mdserver"] + (args or [config_path])
        if netns:
            cmd = ["ip", "netns", "exec", netns] + cmd
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**os.environ, **(env or {})},
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 15.0) -> "Daemon":
        """Until the daemon reports its port (it does once it serves)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n"
                                   + self.output())
            try:
                with open(self.port_file) as f:
                    text = f.read()
                if text.endswith("\n"):
                    break
            except FileNotFoundError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"no port reported in {self.port_file}:\n" + self.output())
            time.sleep(0.05)
        port = int(text)
        assert self.port in (0, port), f"daemon serves on {port}, not {self.port}"
        self.port = port
        if not self.netns:  # from here, the daemon's own namespace
            wait_port(self.host, self.port, max(1.0, deadline - time.monotonic()), self.proc)
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
