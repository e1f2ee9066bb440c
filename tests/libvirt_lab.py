"""A real libvirtd for tests, in network and mount namespaces of its own: nothing of the host's libvirt is used.

Usage (as root)::

    from pathlib import Path
    from libvirt_lab import LibvirtLab, rename_network

    hook = "#!/bin/sh\\necho \"$*\" >> /tmp/calls\\ncat > /tmp/$2.xml\\n"
    with LibvirtLab(hooks={"mdt-rec": hook}) as lab:     # hook in place before start
        net, br = lab.name("net"), lab.name("br", 15)     # mdt-net1-<tag>, mdt-br2-<tag>
        lab.define_network(rename_network(Path("etc/libvirt/mds-network.xml").read_text(),
                                          net, br))        # net-define + net-start
        lab.addresses(br)        # ['10.122.0.1/16', '169.254.169.254/32'] (in the netns)
        vm = lab.name("vm")
        secs = lab.start_domain(vm, "ec2a1b2c-...", "52:54:00:12:34:56", net,
                                metadata_xml="<m:i xmlns:m='urn:x'>..</m:i>")
        lab.domain_xml(vm); lab.virsh("destroy", vm); lab.diagnostics()
    # here: domains/networks gone, daemons stopped, netns deleted, temp dir removed

Prerequisites (Debian 12, as root; `missing_prerequisites()` says which are
missing)::

    apt-get install --no-install-recommends libvirt-daemon \\
        libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 \\
        iptables dnsmasq-base iproute2 util-linux

- libvirt-daemon: libvirtd, virtlogd and the network driver.
- libvirt-daemon-driver-qemu: the QEMU driver.
- libvirt-clients: virsh.
- qemu-system-x86: qemu-system-x86_64 (pulls seabios and ipxe-qemu, the
  firmware a disk-less guest sits in). Debian 12 has no smaller x86 QEMU.
- iptables: libvirt 9.0 applies a NAT network's firewall rules with the
  iptables binary (no firewalld without D-Bus); a NAT network fails to start
  without it.
- dnsmasq-base: not used by libvirt for our network (DNS off, no DHCP range,
  so libvirt starts no dnsmasq), but mdserver's own dnsmasq needs it.
- iproute2 (`ip netns`), util-linux (`nsenter`, `mount`): the namespaces.

Do NOT install libvirt-daemon-system: it pulls systemd and systemd-sysv (it
replaces the init system) and starts a libvirtd of its own. Without it the
user `libvirt-qemu` does not exist, and libvirtd 9.0 refuses to start its
QEMU driver even when qemu.conf says `user = "root"` (it resolves the
built-in default user first). The lab therefore bind-mounts copies of
/etc/passwd and /etc/group with that user added, inside its own mount
namespace only.

How it runs: on a hypervisor with a libvirtd of its own, the lab neither
reads, writes nor connects to anything of that libvirt, and the host's file
system is not written outside the lab's temp directory:

- A network namespace `mdt-lv-<random>` (`ip netns add`). A small Python
  "holder" process is started there with `ip netns exec` (which also gives
  it a mount namespace and a sysfs of the namespace); it makes every mount
  private (`mount --make-rprivate /`: nothing propagates back to the host)
  and, seen only from there:
  - a fresh tmpfs on /run (and /var/run if it is not a link to /run): no
    host socket (libvirt's, D-Bus, mdserver's) is reachable, and
    /run/libvirt is the lab's directory;
  - the lab's directories bind-mounted over /etc/libvirt (only the lab's
    qemu.conf and hooks; the host's configuration is not visible),
    /var/lib/libvirt, /var/log/libvirt and /var/cache/libvirt;
  - a mount point the host lacks (say /var/lib/libvirt without
    libvirt-daemon-system) is made on an overlay of its parent whose upper
    layer is a tmpfs of the namespace: the host's directory stays untouched.
  It makes itself a child subreaper, then starts `virtlogd` and `libvirtd`
  in the foreground (no -d, no systemd) as its children, and reaps every
  orphan (QEMU double-forks).
- Bridges, taps, addresses, iptables rules and ip_forward all live in the
  namespace: the host's interfaces and firewall are never touched, and
  cgroups are not used (the namespace's /sys has no cgroup mounts).
- libvirtd listens on <tmp>/root/run/libvirt/libvirt-sock; `lab.uri` is
  `qemu+unix:///system?socket=<that path>`, never the host's qemu:///system.
  `lab.virsh()` runs virsh with that URI inside the lab's mount namespace,
  so not even the host's client configuration (/etc/libvirt/libvirt.conf) is
  read. `lab.ns_prefix()` runs a command inside the lab's namespaces.
- Stop: every domain destroyed and undefined, every network destroyed and
  undefined, then SIGTERM to libvirtd, to any process left in the namespace,
  to virtlogd, to the holder (each by PID, SIGKILL after a grace period),
  `ip netns del`, temp dir removed.

Labs are independent of each other and of any libvirt daemon on the host
(several may run at once); a lab never signals a process it did not start.

Hooks: the lab's /etc/libvirt/hooks/qemu.d holds only the lab's hooks (a
hook installed on the host, e.g. mdserver's own, never runs for lab
domains). What libvirt 9.0 does with new hook files (checked here): libvirtd
decides at start and on SIGHUP whether the qemu driver has any hook
(hooks/qemu or a file in hooks/qemu.d). If it had none, a qemu.d file added
later is never called until SIGHUP; if it had one, qemu.d is listed again at
every call, so a file added later is called at once.
`install_hook(..., reload=True)` sends SIGHUP and waits for the re-scan.

Timing on a 2-core VM: the first libvirtd start in a process probes QEMU's
capabilities (~8 s); the probe result is cached in a per-process temp dir
(removed at exit), so later labs start in ~0.5-1 s. `virsh start` of the
disk-less TCG domain takes ~0.5 s.

Diagnostics: libvirtd's log (hook debug lines and warnings), its stderr,
virtlogd's log and each domain's QEMU log are under `lab.tmpdir`;
`lab.diagnostics()` returns their tails (the directory is removed on exit
unless MDT_KEEP_LAB=1 or keep_tmp=True).
"""

import atexit
import glob
import json
import os
import pwd
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union
from xml.sax.saxutils import escape, quoteattr

from labbase import LabContext, Step

PREFIX = "mdt-"
ETC_LIBVIRT = "/etc/libvirt"

APT_PACKAGES = (
    "libvirt-daemon",
    "libvirt-daemon-driver-qemu",
    "libvirt-clients",
    "qemu-system-x86",
    "iptables",
    "dnsmasq-base",
    "iproute2",
    "util-linux",
)

# program -> Debian package that ships it
PROGRAMS = (
    ("libvirtd", "libvirt-daemon"),
    ("virtlogd", "libvirt-daemon"),
    ("virsh", "libvirt-clients"),
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("iptables", "iptables"),
    ("dnsmasq", "dnsmasq-base"),
    ("ip", "iproute2"),
    ("nsenter", "util-linux"),
    ("mount", "mount"),
)

# shared object -> Debian package (any multiarch directory)
DRIVERS = (
    ("libvirt_driver_qemu.so", "libvirt-daemon-driver-qemu"),
    ("libvirt_driver_network.so", "libvirt-daemon"),
)

LIBVIRT_DAEMONS = frozenset({
    "libvirtd", "virtlogd", "virtlockd", "virtqemud", "virtnetworkd",
    "virtproxyd", "virtstoraged", "virtinterfaced", "virtnodedevd",
    "virtnwfilterd", "virtsecretd", "virtchd", "virtlxcd",
})

# What libvirtd sees of these host paths is the lab's own directory
# <tmp>/root/<path> (the capabilities cache: one per test process).
PRIVATE_DIRS = (
    "/etc/libvirt",
    "/run/libvirt",
    "/var/lib/libvirt",
    "/var/log/libvirt",
    "/var/cache/libvirt",
)

QEMU_CONF = """\
# mdserver test lab: QEMU runs as root, no security driver.
user = "root"
group = "root"
dynamic_ownership = 0
security_driver = "none"
"""

_SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class LabError(RuntimeError):
    """The lab could not do what was asked; the message says why."""


# --------------------------------------------------------------------------
# prerequisites and the process table


def _which(program: str) -> Optional[str]:
    return shutil.which(program, path=os.environ.get("PATH", "") + ":" + _SBIN_PATH)


def missing_prerequisites() -> List[str]:
    """What this machine lacks to run a lab; empty when it can."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (the lab starts libvirtd and creates network namespaces)")
    for program, package in PROGRAMS:
        if _which(program) is None:
            missing.append(f"program {program} (apt package {package})")
    for lib, package in DRIVERS:
        if not glob.glob(f"/usr/lib/*/libvirt/connection-driver/{lib}") and \
                not glob.glob(f"/usr/lib*/libvirt/connection-driver/{lib}"):
            missing.append(f"libvirt driver {lib} (apt package {package})")
    if not os.path.exists("/dev/net/tun"):
        missing.append("/dev/net/tun (kernel module tun)")
    if not os.path.exists("/proc/self/ns/net"):
        missing.append("network namespaces (/proc/self/ns/net)")
    return missing


def _proc_stat(pid: int) -> Optional[Tuple[str, str]]:
    """(comm, state) of a process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    comm = data[data.index("(") + 1:data.rindex(")")]
    state = data[data.rindex(")") + 2:].split(" ", 1)[0]
    return comm, state


def _pids() -> List[int]:
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


def running_libvirt_daemons() -> List[Tuple[int, str]]:
    """(pid, name) of every live libvirt daemon on the machine (zombies ignored)."""
    found = []
    for pid in _pids():
        st = _proc_stat(pid)
        if st and st[0] in LIBVIRT_DAEMONS and st[1] not in ("Z", "X"):
            found.append((pid, st[0]))
    return found


def _alive(pid: int) -> bool:
    st = _proc_stat(pid)
    return st is not None and st[1] not in ("Z", "X")


# --------------------------------------------------------------------------
# exact snapshot of a directory tree (tests check that the host's is untouched)

Entry = Tuple  # (kind, mode, uid, gid, mtime_ns, payload)


def snapshot_tree(root: str) -> Optional[Dict[str, Entry]]:
    """Everything under `root` (itself included, as ''), or None if absent.

    Each entry: (kind, mode, uid, gid, mtime_ns, payload) where kind is 'dir',
    'file' (payload: bytes), 'link' (payload: target) or 'other'.
    """
    if not os.path.lexists(root):
        return None
    snap: Dict[str, Entry] = {}

    def add(path: str) -> None:
        rel = os.path.relpath(path, root)
        rel = "" if rel == "." else rel
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            kind, payload = "link", os.readlink(path)
        elif stat.S_ISDIR(st.st_mode):
            kind, payload = "dir", None
        elif stat.S_ISREG(st.st_mode):
            with open(path, "rb") as f:
                kind, payload = "file", f.read()
        else:
            kind, payload = "other", st.st_mode
        snap[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                     st.st_mtime_ns, payload)

    add(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames) + sorted(filenames):
            add(os.path.join(dirpath, name))
    return snap


def tree_differences(a: Optional[Dict[str, Entry]], b: Optional[Dict[str, Entry]]) -> List[str]:
    """Human-readable differences between two snapshots (empty when equal)."""
    if a is None or b is None:
        return [] if a is b else [f"tree {'absent' if a is None else 'present'} before, "
                                  f"{'absent' if b is None else 'present'} after"]
    out = []
    for rel in sorted(set(a) | set(b)):
        if rel not in a:
            out.append(f"added: {rel or '.'}")
        elif rel not in b:
            out.append(f"removed: {rel or '.'}")
        elif a[rel] != b[rel]:
            fields = ("kind", "mode", "uid", "gid", "mtime_ns", "content")
            changed = [f for f, x, y in zip(fields, a[rel], b[rel]) if x != y]
            out.append(f"changed: {rel or '.'} ({', '.join(changed)})")
    return out


# --------------------------------------------------------------------------
# XML helpers


def rename_network(xml: str, name: str, bridge: str) -> str:
    """A copy of a libvirt network XML with another name and bridge (and no uuid/mac)."""
    root = ET.fromstring(xml)
    if root.tag != "network":
        raise ValueError("not a <network> document")
    root.find("name").text = name
    br = root.find("bridge")
    if br is None:
        br = ET.SubElement(root, "bridge")
    br.set("name", bridge)
    for tag in ("uuid", "mac"):
        for el in root.findall(tag):
            root.remove(el)
    return ET.tostring(root, encoding="unicode")


def domain_definition(name: str, uuid: str, mac: str, network: str,
                      metadata_xml: Optional[str] = None, memory_mib: int = 64,
                      boot: str = "hd") -> str:
    """A disk-less TCG domain on `network`, SMBIOS uuid = serial = `uuid`.

    boot='hd' (no disk) makes SeaBIOS stop at 'No bootable device' without
    sending anything; boot='network' lets iPXE try DHCP on the NIC.
    """
    metadata = f"  <metadata>\n    {metadata_xml}\n  </metadata>\n" if metadata_xml else ""
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <uuid>{escape(uuid)}</uuid>
{metadata}  <memory unit='MiB'>{int(memory_mib)}</memory>
  <vcpu>1</vcpu>
  <sysinfo type='smbios'>
    <system>
      <entry name='serial'>{escape(uuid)}</entry>
      <entry name='uuid'>{escape(uuid)}</entry>
    </system>
  </sysinfo>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <boot dev={quoteattr(boot)}/>
    <smbios mode='sysinfo'/>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <interface type='network'>
      <source network={quoteattr(network)}/>
      <mac address={quoteattr(mac)}/>
      <model type='virtio'/>
    </interface>
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def _check_name(name: str) -> None:
    if not name.startswith(PREFIX):
        raise ValueError(f"lab object names must start with {PREFIX!r}: {name!r}")


# --------------------------------------------------------------------------
# the holder: runs inside `ip netns exec`, makes the lab's mounts, owns the daemons

_HOLDER = r"""
import ctypes, json, os, signal, subprocess, sys, time
cfg = json.loads(sys.argv[1])

def mount(*args):
    subprocess.run(["mount"] + list(args), check=True)

# Nothing mounted here reaches the host (ip netns exec makes mounts slaves,
# not private).
mount("--make-rprivate", "/")
scratch = cfg["scratch"]
mount("-t", "tmpfs", "-o", "mode=0700", "mdt-scratch", scratch)
ours = set()  # directories that are the lab's (tmpfs, overlay): mkdir is harmless

def ensure_dir(path):
    # A missing mount point is made on an overlay of its parent (upper layer
    # in the scratch tmpfs), never in the host's directory.
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    ensure_dir(parent)
    if parent not in ours:
        upper, work = scratch + "/upper" + parent, scratch + "/work" + parent
        os.makedirs(upper)
        os.makedirs(work)
        mount("-t", "overlay", "-o", f"lowerdir={parent},upperdir={upper},workdir={work}",
              "mdt-overlay", parent)
        ours.add(parent)
    os.mkdir(path, 0o755)

for run in ("/run", "/var/run"):
    if os.path.isdir(run) and not os.path.islink(run):
        mount("-t", "tmpfs", "-o", "mode=0755", "mdt-run", run)
        ours.add(run)
for src, dst in cfg["binds"]:
    if os.path.isdir(src):
        ensure_dir(dst)
    mount("--bind", src, dst)

libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
    sys.exit("prctl(PR_SET_CHILD_SUBREAPER) failed")
signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
env = cfg["env"]
def start(argv, out):
    f = open(out, "ab")
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=f, env=env,
                         close_fds=True)
    f.close()
    return p.pid
pids = {"virtlogd": start(cfg["virtlogd"], cfg["virtlogd_out"])}
pids["libvirtd"] = start(cfg["libvirtd"], cfg["libvirtd_out"])
sys.stdout.write(json.dumps(pids) + "\n")
sys.stdout.flush()
os.close(1)
os.open(os.devnull, os.O_WRONLY)
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(0.2)
    except InterruptedError:
        pass
"""
_caps_cache: Optional[str] = None
_caps_lock = threading.Lock()


def _capabilities_cache() -> str:
    """One QEMU-capabilities cache per process (the first probe takes ~8 s)."""
    global _caps_cache
    with _caps_lock:
        if _caps_cache is None:
            _caps_cache = tempfile.mkdtemp(prefix="mdt-libvirt-cache-")
            atexit.register(shutil.rmtree, _caps_cache, True)
        return _caps_cache


# --------------------------------------------------------------------------


HookSource = Union[str, bytes, "os.PathLike[str]"]


class LibvirtLab(LabContext):
    """A private libvirtd + virtlogd in network namespace `mdt-lv-<tag>`.

    Use as a context manager; `close()` always runs (also on errors and
    KeyboardInterrupt) and puts everything back.

    hooks: {file name: script text (str), bytes, or a pathlib.Path to copy}
    written (mode 0755) into the lab's /etc/libvirt/hooks/qemu.d/ before
    libvirtd starts. Hooks run inside the lab's network and mount namespaces
    and are the only hooks libvirtd sees.

    qemu_conf: the text of the lab's /etc/libvirt/qemu.conf (default
    QEMU_CONF: QEMU as root, no ownership changes). `qemu_user_ids()` gives
    the uid and gid libvirtd resolves for `libvirt-qemu`.
    """

    def __init__(self, hooks: Optional[Mapping[str, HookSource]] = None,
                 keep_tmp: Optional[bool] = None, start_timeout: float = 120.0,
                 qemu_conf: Optional[str] = None):
        self.qemu_conf = QEMU_CONF if qemu_conf is None else qemu_conf  # the lab's qemu.conf
        self.tag = os.urandom(3).hex()
        self.netns = f"{PREFIX}lv-{self.tag}"
        self.hooks = dict(hooks or {})
        self.keep_tmp = (os.environ.get("MDT_KEEP_LAB") == "1") if keep_tmp is None else keep_tmp
        self.start_timeout = start_timeout
        self.tmpdir = ""
        self.uri = ""
        self.holder: Optional[subprocess.Popen] = None
        self.libvirtd_pid = 0
        self.virtlogd_pid = 0
        self.startup_seconds = 0.0
        self.domains: List[str] = []
        self.networks: List[str] = []
        self.final_diagnostics = ""
        self._counter = 0
        self._netns_created = False
        self._netns_ino = 0
        self._started = False
        self._restarted: List[subprocess.Popen] = []  # libvirtds of restart_libvirtd()

    LAB_NAME = "libvirt lab"
    LAB_ERRORS = (LabError,)

    # -- names and paths ---------------------------------------------------

    def name(self, kind: str = "obj", max_len: int = 0) -> str:
        """A fresh object name `mdt-<kind><n>-<tag>` (bridges: max_len=15)."""
        self._counter += 1
        n = f"{PREFIX}{kind}{self._counter}-{self.tag}"
        if max_len and len(n) > max_len:
            n = f"{PREFIX}{self._counter}{self.tag}"[:max_len]
        return n

    def path(self, *parts: str) -> str:
        return os.path.join(self.tmpdir, *parts)

    def private(self, host_path: str) -> str:
        """The lab's directory that libvirtd sees at `host_path` (one of PRIVATE_DIRS)."""
        if host_path == "/var/cache/libvirt":
            return _capabilities_cache()
        return self.path("root" + host_path)

    @property
    def libvirtd_log(self) -> str:
        return self.path("libvirtd.log")

    def ns_prefix(self) -> List[str]:
        """argv prefix that runs a command inside the lab's net + mount namespaces."""
        if not self.holder:
            raise LabError("lab not started")
        return ["nsenter", "-t", str(self.holder.pid), "-m", "-n"]

    def run_in(self, argv: Sequence[str], check: bool = True, timeout: float = 60,
               **kw) -> subprocess.CompletedProcess:
        """Run argv inside the lab's namespaces (as libvirtd and its hooks see the world)."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.ns_prefix() + list(argv), check=check, timeout=timeout, **kw)

    # -- start -------------------------------------------------------------

    def start(self) -> None:
        if self._started:
            raise LabError("lab already started")
        self._started = True
        missing = missing_prerequisites()
        if missing:
            raise LabError("libvirt lab prerequisites missing: " + "; ".join(missing))
        try:
            self._start()
        except BaseException:
            try:
                self.close()
            except LabError as e:
                print(e, file=sys.stderr)
            raise

    def _start(self) -> None:
        t0 = time.monotonic()
        self.tmpdir = tempfile.mkdtemp(prefix=f"{PREFIX}libvirt-{self.tag}-")
        os.chmod(self.tmpdir, 0o755)
        os.mkdir(self.path("scratch"))

        # The lab's directories, bind-mounted over the host's in its mount
        # namespace (see the module docstring).
        binds: List[Tuple[str, str]] = []
        for host_dir in PRIVATE_DIRS:
            os.makedirs(self.private(host_dir), exist_ok=True)
            binds.append((self.private(host_dir), host_dir))
        # directories libvirt-daemon-system would have shipped
        for sub in ("etc/libvirt/qemu", "etc/libvirt/storage", "etc/libvirt/secrets",
                    "etc/libvirt/nwfilter", "etc/libvirt/hooks/qemu.d",
                    "var/lib/libvirt/qemu", "var/lib/libvirt/dnsmasq",
                    "var/lib/libvirt/network", "var/log/libvirt/qemu"):
            os.makedirs(self.path("root", sub), exist_ok=True)
        with open(self.path("root/etc/libvirt/qemu.conf"), "w") as f:
            f.write(self.qemu_conf)
        # the user libvirtd 9.0 insists on
        try:
            pwd.getpwnam("libvirt-qemu")
        except KeyError:
            binds += self._fake_user_files()
        for hook_name, source in self.hooks.items():
            self._write_hook(hook_name, source)
        # daemon configs
        with open(self.path("libvirtd.conf"), "w") as f:
            f.write('log_filters = "1:util.hook 2:daemon 3:*"\n'
                    f'log_outputs = "1:file:{self.libvirtd_log}"\n')
        with open(self.path("virtlogd.conf"), "w") as f:
            f.write(f'log_outputs = "3:file:{self.path("virtlogd.log")}"\n')

        _run(["ip", "netns", "add", self.netns])
        self._netns_created = True
        self._netns_ino = os.stat(f"/run/netns/{self.netns}").st_ino
        _run(["ip", "-n", self.netns, "link", "set", "lo", "up"])

        cfg = {
            "scratch": self.path("scratch"),
            "binds": binds,
            "env": {"PATH": _SBIN_PATH, "LC_ALL": "C", "HOME": "/root"},
            "virtlogd": ["virtlogd", "-f", self.path("virtlogd.conf"),
                         "-p", "/run/libvirt/virtlogd.pid"],
            "libvirtd": ["libvirtd", "-f", self.path("libvirtd.conf"),
                         "-p", "/run/libvirt/libvirtd.pid"],
            "virtlogd_out": self.path("virtlogd.stderr"),
            "libvirtd_out": self.path("libvirtd.stderr"),
        }
        holder_err = open(self.path("holder.stderr"), "wb")
        try:
            self.holder = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, sys.executable, "-c", _HOLDER,
                 json.dumps(cfg)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=holder_err,
                start_new_session=True, close_fds=True)
        finally:
            holder_err.close()
        line = self._read_line(self.holder, 30)
        try:
            pids = json.loads(line)
        except ValueError:
            raise LabError("lab holder failed to start:\n" + self.diagnostics()) from None
        self.virtlogd_pid, self.libvirtd_pid = pids["virtlogd"], pids["libvirtd"]
        self.uri = ("qemu+unix:///system?socket="
                    + self.path("root/run/libvirt/libvirt-sock"))
        self._wait_ready(t0)
        self.startup_seconds = time.monotonic() - t0

    def _fake_user_files(self) -> List[Tuple[str, str]]:
        used_uids = {p.pw_uid for p in pwd.getpwall()}
        with open("/etc/group") as f:
            group_lines = f.read().splitlines()
        used_gids = {int(line.split(":")[2]) for line in group_lines
                     if line.count(":") >= 3 and line.split(":")[2].isdigit()}
        uid = 64055
        while uid in used_uids or uid in used_gids:
            uid += 1
        with open("/etc/passwd") as f:
            passwd = f.read().rstrip("\n") + "\n"
        passwd += f"libvirt-qemu:x:{uid}:{uid}:Libvirt Qemu (mdt lab):/var/lib/libvirt:/usr/sbin/nologin\n"
        group = "\n".join(group_lines) + f"\nlibvirt-qemu:x:{uid}:\n"
        for name, text in (("passwd", passwd), ("group", group)):
            with open(self.path(name), "w") as f:
                f.write(text)
            os.chmod(self.path(name), 0o644)
        return [(self.path("passwd"), "/etc/passwd"), (self.path("group"), "/etc/group")]

    def qemu_user_ids(self) -> Tuple[int, int]:
        """(uid, gid) of `libvirt-qemu` as libvirtd sees it (the lab's passwd copy
        when the host has no such user)."""
        try:
            with open(self.path("passwd")) as f:
                for line in f:
                    fields = line.split(":")
                    if fields[0] == "libvirt-qemu":
                        return int(fields[2]), int(fields[3])
        except OSError:
            pass
        pw = pwd.getpwnam("libvirt-qemu")
        return pw.pw_uid, pw.pw_gid

    @staticmethod
    def _read_line(proc: subprocess.Popen, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        buf = b""
        fd = proc.stdout.fileno()
        while not buf.endswith(b"\n") and time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                buf += chunk
        proc.stdout.close()
        return buf.decode(errors="replace")

    def _wait_ready(self, t0: float) -> None:
        deadline = t0 + self.start_timeout
        while True:
            for pid, what in ((self.libvirtd_pid, "libvirtd"), (self.virtlogd_pid, "virtlogd")):
                if not _alive(pid):
                    raise LabError(f"{what} exited during start-up:\n" + self.diagnostics())
            r = self._virsh(["version"], timeout=60)
            if r.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise LabError(f"libvirtd did not answer within {self.start_timeout:.0f} s "
                               f"({r.stderr.strip()}):\n" + self.diagnostics())
            time.sleep(0.1)

    # -- hooks ---------------------------------------------------------------

    def _write_hook(self, hook_name: str, source: HookSource) -> str:
        if "/" in hook_name or hook_name in ("", ".", ".."):
            raise ValueError(f"bad hook name {hook_name!r}")
        path = self.path("root/etc/libvirt/hooks/qemu.d", hook_name)
        if isinstance(source, os.PathLike):
            with open(source, "rb") as f:
                data = f.read()
        else:
            data = source.encode() if isinstance(source, str) else bytes(source)
        tmp = path + ".mdt-tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
        return path

    def install_hook(self, hook_name: str, source: HookSource, reload: bool = True) -> str:
        """Write a hook into (libvirtd's) /etc/libvirt/hooks/qemu.d/ of a running lab.

        Returns the file's path as the test process sees it. libvirtd decides
        at start and on SIGHUP whether the qemu driver has hooks at all; when
        it had none, a new file is ignored until SIGHUP (when it had one, the
        files in qemu.d are listed again at every call). reload=True sends
        SIGHUP and waits until libvirtd has re-scanned its hooks.
        """
        path = self._write_hook(hook_name, source)
        if reload:
            self.reload()
        return path

    def reload(self, timeout: float = 15.0) -> None:
        """SIGHUP libvirtd and wait until it has looked for hook scripts again."""
        marker = "Reloading configuration on SIGHUP"
        before = self._log_text().count(marker)
        os.kill(self.libvirtd_pid, signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self._log_text()
            if text.count(marker) > before:
                tail = text[text.rindex(marker):]
                # bhyve is the last driver whose hooks virHookInitialize checks
                if "/hooks/bhyve" in tail:
                    time.sleep(0.05)
                    return
            time.sleep(0.05)
        raise LabError("libvirtd did not reload after SIGHUP:\n" + self.diagnostics())

    def restart_libvirtd(self, down: float = 0.0) -> None:
        """Stop libvirtd (SIGTERM), wait `down` seconds, start it again in the lab's
        namespaces (then a child of this process, not of the holder) and wait until
        it answers. Definitions and active networks survive, as on a host."""
        _terminate(self.libvirtd_pid, 20)
        time.sleep(down)
        out = open(self.path("libvirtd.stderr"), "ab")
        try:  # nsenter execs (no fork without a PID namespace): the PID is libvirtd's
            p = subprocess.Popen(
                self.ns_prefix() + ["env", "-i", f"PATH={_SBIN_PATH}", "LC_ALL=C", "HOME=/root",
                                    "libvirtd", "-f", self.path("libvirtd.conf"),
                                    "-p", "/run/libvirt/libvirtd.pid"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                close_fds=True)
        finally:
            out.close()
        self._restarted.append(p)
        self.libvirtd_pid = p.pid
        self._wait_ready(time.monotonic())

    def _log_text(self) -> str:
        try:
            with open(self.libvirtd_log, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    # -- virsh and objects ---------------------------------------------------

    def _virsh(self, args: Sequence[str], timeout: float, input: Optional[str] = None
               ) -> subprocess.CompletedProcess:
        # In the lab's mount namespace: virsh reads the lab's (empty) client
        # configuration, not the host's, and connects to the lab's socket only.
        if not self.uri or not self.holder:
            raise LabError("lab not started")
        return subprocess.run(["nsenter", "-t", str(self.holder.pid), "-m",
                               "virsh", "-q", "-c", self.uri] + list(args),
                              capture_output=True, text=True, timeout=timeout, input=input)

    def virsh(self, *args: str, check: bool = True, timeout: float = 120,
              input: Optional[str] = None) -> str:
        """Run virsh against the lab's libvirtd; stdout, or LabError on failure."""
        r = self._virsh(args, timeout, input)
        if check and r.returncode != 0:
            raise LabError(f"virsh {' '.join(args)} failed ({r.returncode}): "
                           f"{r.stderr.strip()}\n--- lab logs ---\n{self.diagnostics(40)}")
        return r.stdout

    def _xml_file(self, kind: str, xml: str) -> str:
        self._counter += 1
        path = self.path(f"{kind}-{self._counter}.xml")
        with open(path, "w") as f:
            f.write(xml)
        return path

    def define_network(self, xml: str, start: bool = True) -> str:
        """net-define (and net-start) a network; returns its name (must start 'mdt-')."""
        name = ET.fromstring(xml).findtext("name") or ""
        _check_name(name)
        self.virsh("net-define", self._xml_file("net", xml))
        self.networks.append(name)
        if start:
            self.virsh("net-start", name)
        return name

    def define_domain(self, xml: str) -> str:
        name = ET.fromstring(xml).findtext("name") or ""
        _check_name(name)
        self.virsh("define", self._xml_file("dom", xml))
        self.domains.append(name)
        return name

    def start_domain(self, name: str, uuid: str, mac: str, network: str,
                     metadata_xml: Optional[str] = None, memory_mib: int = 64,
                     boot: str = "hd") -> float:
        """Define and start a disk-less TCG domain; returns the seconds `virsh start` took."""
        self.define_domain(domain_definition(name, uuid, mac, network, metadata_xml,
                                             memory_mib, boot))
        t = time.monotonic()
        self.virsh("start", name)
        return time.monotonic() - t

    def destroy_domain(self, name: str) -> None:
        self.virsh("destroy", name)

    def domain_xml(self, name: str, inactive: bool = False) -> str:
        return self.virsh("dumpxml", *(["--inactive"] if inactive else []), name)

    def domain_state(self, name: str) -> str:
        return self.virsh("domstate", name).strip()

    def addresses(self, device: str) -> List[str]:
        """CIDR addresses on `device` inside the lab's network namespace."""
        out = _run(["ip", "-n", self.netns, "-o", "addr", "show", "dev", device])
        return [line.split()[3] for line in out.splitlines() if " inet" in line]

    def processes(self) -> List[Tuple[int, str]]:
        """(pid, comm) of live processes in the lab's network namespace, holder excluded."""
        found = []
        holder = self.holder.pid if self.holder else -1
        for pid in _pids():
            if pid == holder:
                continue
            try:
                link = os.readlink(f"/proc/{pid}/ns/net")
            except OSError:
                continue
            if self._netns_ino and link == f"net:[{self._netns_ino}]":
                st = _proc_stat(pid)
                if st and st[1] not in ("Z", "X"):
                    found.append((pid, st[0]))
        return found

    # -- diagnostics -----------------------------------------------------------

    def diagnostics(self, lines: int = 80) -> str:
        """Tails of libvirtd's log and stderr, virtlogd's, the holder's and QEMU's logs."""
        if self.final_diagnostics:
            return self.final_diagnostics
        if not self.tmpdir or not os.path.isdir(self.tmpdir):
            return "(no lab directory)"
        files = [self.libvirtd_log, self.path("libvirtd.stderr"), self.path("virtlogd.log"),
                 self.path("virtlogd.stderr"), self.path("holder.stderr")]
        files += sorted(glob.glob(self.path("root/var/log/libvirt/qemu/*.log")))
        out = []
        for p in files:
            try:
                with open(p, errors="replace") as f:
                    text = f.read().splitlines()[-lines:]
            except OSError:
                continue
            if text:
                out.append(f"==> {os.path.relpath(p, self.tmpdir)} <==")
                out.extend(text)
        return "\n".join(out) or "(empty logs)"

    # -- stop ------------------------------------------------------------------

    # -- stop ------------------------------------------------------------------

    def teardown(self, step: Step) -> None:
        """close(): undefine, stop libvirtd and what else runs in the lab, delete
        the namespace, keep the last diagnostics, remove the temp dir."""
        if self.uri and _alive(self.libvirtd_pid):
            step("undefine objects", self._undefine_all)
        if self.libvirtd_pid:
            step("stop libvirtd", _terminate, self.libvirtd_pid, 20)
        if self._netns_ino:
            for pid, _comm in self.processes():
                if pid != self.virtlogd_pid:
                    step(f"stop leftover pid {pid}", _terminate, pid, 10)
        if self.virtlogd_pid:
            step("stop virtlogd", _terminate, self.virtlogd_pid, 10)
        if self.holder:
            step("stop holder", self._stop_holder)
        if self._netns_created:
            step("delete netns", _run, ["ip", "netns", "del", self.netns])
        if self.tmpdir and os.path.isdir(self.tmpdir):
            self.final_diagnostics = ""
            self.final_diagnostics = self.diagnostics(200)
            if not self.keep_tmp:
                step("remove temp dir", shutil.rmtree, self.tmpdir)

    def _undefine_all(self) -> None:
        for name in self.virsh("list", "--all", "--name").split():
            if self.virsh("domstate", name, check=False).strip() != "shut off":
                self.virsh("destroy", name, check=False)
            self.virsh("undefine", name, check=False)
        for name in self.virsh("net-list", "--all", "--name").split():
            self.virsh("net-destroy", name, check=False)
            self.virsh("net-undefine", name, check=False)

    def _stop_holder(self) -> None:
        p = self.holder
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
def _run(argv: Sequence[str], timeout: float = 60) -> str:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


def _terminate(pid: int, grace: float) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; waits until the process is gone."""
    if not _alive(pid):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
