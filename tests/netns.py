"""Network namespaces for tests: a host side with the mds bridge, guests on veth pairs.

Every name carries the `mdt` prefix and a random part, and everything is
deleted on exit, even when a test fails.
"""

import os
import subprocess
import time
from typing import List, Optional

PREFIX = "mdt"


def ip(*args: str, netns: Optional[str] = None) -> str:
    cmd = ["ip"] + (["-n", netns] if netns else []) + list(args)
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


class Lab:
    """A host namespace with bridge 10.122.0.1/16 + 169.254.169.254/32, and guests."""

    def __init__(self, gateway: str = "10.122.0.1/16",
                 metadata_address: str = "169.254.169.254/32"):
        tag = os.urandom(3).hex()
        self.tag = tag
        self.host = f"{PREFIX}-h-{tag}"
        self.bridge = f"{PREFIX}br{tag}"
        self.gateway = gateway.split("/")[0]
        self.namespaces: List[str] = []
        self._add_ns(self.host)
        ip("link", "set", "lo", "up", netns=self.host)
        # A fixed MAC: a bridge otherwise takes the lowest MAC of its ports,
        # so adding a guest can change it under the other guests' ARP caches.
        ip("link", "add", self.bridge, "address", "02:6d:64:74:00:01", "type", "bridge",
           netns=self.host)
        ip("addr", "add", gateway, "dev", self.bridge, netns=self.host)
        ip("addr", "add", metadata_address, "dev", self.bridge, netns=self.host)
        ip("link", "set", self.bridge, "up", netns=self.host)

    @classmethod
    def attach(cls, host_ns: str, bridge: str, gateway: str = "10.122.0.1") -> "Lab":
        """Guests on a bridge in a namespace someone else owns (a libvirt
        network in the libvirt lab); only the guests are ours to delete."""
        lab = cls.__new__(cls)
        lab.tag, lab.host, lab.bridge, lab.gateway = os.urandom(3).hex(), host_ns, bridge, gateway
        lab.namespaces = []
        return lab

    def _add_ns(self, name: str) -> None:
        ip("netns", "add", name)
        self.namespaces.append(name)

    def guest(self, index: int, mac: str, address: Optional[str] = None) -> str:
        """A guest namespace whose eth0 has `mac` (and `address`/16 if given)."""
        ns = f"{PREFIX}-g{index}-{self.tag}"
        self._add_ns(ns)
        outer = f"{PREFIX}v{index}{self.tag}"
        ip("link", "add", outer, "netns", self.host, "type", "veth", "peer", "name", "eth0",
           "netns", ns)
        ip("link", "set", outer, "master", self.bridge, "up", netns=self.host)
        ip("link", "set", "eth0", "address", mac, netns=ns)
        ip("link", "set", "lo", "up", netns=ns)
        ip("link", "set", "eth0", "up", netns=ns)
        if address:
            ip("addr", "add", f"{address}/16", "dev", "eth0", netns=ns)
            ip("route", "add", "default", "via", self.gateway, netns=ns)
        return ns

    def close(self) -> None:
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.namespaces.clear()


def exec_in(ns: str, cmd: List[str]) -> List[str]:
    return ["ip", "netns", "exec", ns] + cmd


def start_dnsmasq(ns: str, base_dir, log_path, *options: str) -> subprocess.Popen:
    """dnsmasq from mdserver's generated mds.conf, as production runs it,
    in namespace `ns`; returns once it has written its pid file."""
    p = subprocess.Popen(exec_in(ns, ["dnsmasq", f"--conf-file={base_dir}/mds.conf",
                                      "--keep-in-foreground", f"--log-facility={log_path}",
                                      *options]),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 10
    while not os.path.exists(os.path.join(str(base_dir), "dnsmasq.pid")):
        assert p.poll() is None, p.stdout.read()
        assert time.monotonic() < deadline, "dnsmasq wrote no pid file"
        time.sleep(0.05)
    return p


# Requests from inside a namespace (stdlib only): [[method, path], ...] ->
# [[status, body], ...]; status 0 when no answer came (timeout, reset).
GUEST_CLIENT = r"""
import json, sys, urllib.error, urllib.request
out = []
for method, path in json.loads(sys.argv[1]):
    req = urllib.request.Request("http://169.254.169.254" + path, method=method)
    if method == "PUT":
        req.add_header("X-aws-ec2-metadata-token-ttl-seconds", "60")
    try:
        with urllib.request.urlopen(req, timeout=float(sys.argv[2])) as r:
            out.append([r.status, r.read().decode(errors="replace")])
    except urllib.error.HTTPError as e:
        out.append([e.code, e.read().decode(errors="replace")])
    except OSError as e:
        out.append([0, str(e)])
print(json.dumps(out))
"""


def guest_requests(ns: str, requests: list, timeout: float = 5.0) -> list:
    """What the metadata address answers `requests` made from namespace `ns`."""
    import json
    import sys
    r = subprocess.run(exec_in(ns, [sys.executable, "-c", GUEST_CLIENT, json.dumps(requests),
                                    str(timeout)]),
                       capture_output=True, text=True, timeout=60 + timeout * len(requests))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)
