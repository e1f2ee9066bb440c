"""The daemon under test: its configuration, a prebuilt database, start to ready, memory of its process tree, stop."""

import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

from bench.lab import METADATA, identity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATE = os.path.join(ROOT, "etc", "mdserver", "userdata", "example.yaml")
ADMIN_KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBenchBenchBenchBenchBenchBenchBenchBench "
             "admin@bench")


def write_config(d: str, listen: str = METADATA, port: int = 80, **mdserver: str) -> str:
    """A configuration whose every path is under `d` (never /run/mdserver,
    /var/lib/mdserver or /etc/mdserver); user-data from the shipped example
    template (scenario (c) renders it)."""
    os.makedirs(os.path.join(d, "userdata"), exist_ok=True)
    shutil.copy(TEMPLATE, os.path.join(d, "userdata", "example.yaml"))
    extra = "".join(f"{k} = {v}\n" for k, v in mdserver.items())
    path = os.path.join(d, "mdserver.conf")
    with open(path, "w") as f:
        f.write(f"[mdserver]\nlisten_address = {listen}\nport = {port}\n"
                f"db_file = {d}/db.json\nuserdata_dir = {d}/userdata\n"
                f"default_template = example.yaml\nadmin_socket = {d}/admin.sock\n{extra}"
                f"[public-keys]\nadmin = {ADMIN_KEY}\n"
                f"[dnsmasq]\nbase_dir = {d}/dnsmasq\nuser = {getpass.getuser()}\n"
                f"[seeds]\ndir = {d}/seeds\n")
    return path


def build_database(d: str, size: int) -> float:
    """db.json with slots 0..size-1 (the lab's guests are the first slots),
    written in one transaction: far faster than registering them. Seconds."""
    from mdserver.models import Instance, InstanceSettings
    from mdserver.store import Store

    t = time.monotonic()
    store = Store(os.path.join(d, "db.json"))
    try:
        store.put_many(Instance(uuid=g.uuid, name=g.name, mac=g.mac, ipv4=g.ip, hostname=g.name,
                                first_seen=1700000000.0, last_seen=1700000000.0,
                                settings=InstanceSettings())
                       for g in map(identity, range(size)))
    finally:
        store.close()
    return time.monotonic() - t


def settings(conf: str) -> Dict[str, int]:
    """What the references copy from mdserver's granian: read at run time,
    as the daemon reads it. `workers`: the key where this version has it (0:
    the daemon's own default, mdserver.server.default_workers), else 1;
    Daemon.workers() then counts the processes the daemon really started."""
    from mdserver import config
    md = config.load(conf).mdserver
    workers = int(getattr(md, "workers", 1))
    if workers == 0:
        from mdserver import server
        workers = server.default_workers() if hasattr(server, "default_workers") else 1
    return {"workers": workers, "max_connections": md.max_connections,
            "backlog": md.backlog, "header_timeout": md.header_timeout}


def _children() -> Dict[int, List[int]]:
    out: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            out.setdefault(ppid, []).append(int(entry))
    return out


def tree(pid: int) -> List[int]:
    """`pid` and all its descendants."""
    children, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def memory(pid: int) -> Dict[str, object]:
    """RSS and PSS (kB, smaps_rollup) of each process of the tree and in sum."""
    procs = []
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                fields = {line.split(":")[0]: int(line.split()[1]) for line in f
                          if line.split(":")[0] in ("Rss", "Pss")}
            with open(f"/proc/{p}/comm") as f:
                comm = f.read().strip()
        except (OSError, ValueError, IndexError):
            continue
        procs.append({"pid": p, "comm": comm, "rss_kb": fields.get("Rss", 0),
                      "pss_kb": fields.get("Pss", 0)})
    return {"processes": procs, "rss_kb": sum(p["rss_kb"] for p in procs),
            "pss_kb": sum(p["pss_kb"] for p in procs)}


class Daemon:
    """`python -m mdserver CONF` in namespace `netns`; ready when it sends
    READY=1 to our notify socket (it does once guests are served)."""

    def __init__(self, conf: str, netns: str, log_path: str):
        self.conf, self.log_path = conf, log_path
        d = os.path.dirname(conf)
        self.notify_path = os.path.join(d, "notify.sock")
        if os.path.exists(self.notify_path):
            os.unlink(self.notify_path)
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(self.notify_path)
        self.log = open(log_path, "ab")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-m", "mdserver", conf],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
            env={**os.environ, "NOTIFY_SOCKET": self.notify_path}, start_new_session=True)
        self.ready_seconds: Optional[float] = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 120.0) -> float:
        """Seconds from the start to READY=1."""
        deadline = self.started + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"mdserver not ready within {timeout:.0f} s:\n{self.tail()}")
            if self.proc.poll() is not None:
                raise RuntimeError(f"mdserver exited with {self.proc.returncode}:\n{self.tail()}")
            self.notify.settimeout(min(left, 0.5))
            try:
                message = self.notify.recv(4096).decode()
            except socket.timeout:
                continue
            if "READY=1" in message.split("\n") and "STATUS=serving" in message:
                self.ready_seconds = time.monotonic() - self.started
                return self.ready_seconds

    def workers(self) -> int:
        """granian's worker processes: the main process's children."""
        return len(_children().get(self.pid, []))

    def tail(self, n: int = 30) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                # our own child's session only (start_new_session above)
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        self.notify.close()


def dnsmasq_files(d: str) -> Tuple[int, int]:
    """(files, bytes) under the configuration's dnsmasq base_dir."""
    n = size = 0
    for root, _, files in os.walk(os.path.join(d, "dnsmasq")):
        for name in files:
            n += 1
            size += os.path.getsize(os.path.join(root, name))
    return n, size


def registration_xml(k: int, route: Optional[str] = None) -> bytes:
    """A small libvirt domain (the hook's input) for a new domain `k`, on the
    network `mds`; `route` recorded in mdserver's own <metadata>."""
    uuid = f"bf{k:06x}-aaaa-4bbb-8ccc-{k:012x}"
    mac = f"52:54:01:{k >> 16 & 0xff:02x}:{k >> 8 & 0xff:02x}:{k & 0xff:02x}"
    meta = (f"<metadata><mds:instance xmlns:mds='urn:mdserver:1'><mds:route>{route}</mds:route>"
            f"</mds:instance></metadata>") if route else ""
    return f"""<domain type='kvm'>
  <name>new{k}</name>
  <uuid>{uuid}</uuid>
  {meta}
  <memory unit='MiB'>512</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <interface type='network'>
      <mac address='{mac}'/>
      <source network='mds'/>
      <model type='virtio'/>
    </interface>
  </devices>
</domain>
""".encode()


def register_all(admin: str, xmls: Sequence[bytes]) -> List[float]:
    """POST /instance-upload on the admin socket (what the hook does), one
    after the other: each one's seconds."""
    from mdserver import adminclient
    out = []
    for xml in xmls:
        t = time.perf_counter()
        adminclient.call(admin, "POST", "/instance-upload", xml)
        out.append(time.perf_counter() - t)
    return out
