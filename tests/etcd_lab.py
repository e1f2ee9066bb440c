"""A real etcd (1 or 3 members) for tests, in a network namespace of its own.

Usage (as root)::

    from etcd_lab import EtcdLab

    with EtcdLab(members=3) as lab:          # started and healthy here
        lab.endpoints        # ['http://10.251.<b>.1:23790', ...:23791, ...:23792]
        lab.attach(None)     # the pytest process (root namespace) joins: '10.251.<b>.11'
        lab.attach(hv_ns)    # a test's "hypervisor" namespace joins: '10.251.<b>.12'
        rev = lab.put("k", "v"); lab.get("k")          # b'v' (HTTP gateway, urllib)
        lab.stop_member(0); lab.put("k", "v2")          # 2 of 3: still a quorum
        lab.start_member(0)                             # same data dir, rejoins
        lab.stop_all(); ...; lab.start_all()            # unreachable, then back with its data
        lab.compact(lab.revision())
    # here: members stopped, veths and namespace deleted, temp dir removed

Layout:

- namespace `mdt-etcd-<tag>` with bridge `mdtebr<tag>` holding
  10.251.<b>.1/24, <b> random (and not routed in the root namespace);
- member i (`mdt-etcd<i>-<tag>`) listens on 10.251.<b>.1, client port
  23790+i, peer port 23800+i (never 2379/2380; the ports are the
  namespace's own, so labs never clash), data in `<tmpdir>/m<i>/`, log
  (zap, appended across restarts) in `<tmpdir>/m<i>.log`;
- `attach(ns)` adds a veth pair `mdtep<n><tag>` (bridge port) /
  `mdtea<n><tag>` (in `ns`, or in the root namespace for None) with
  10.251.<b>.(10+n)/24 on the outer end: its only new route is the
  connected /24 (no IPv6 link-local either).

Only the standard library talks to etcd: `put`/`get`/`revision`/`compact`
use the v3 JSON gateway (`POST /v3/kv/...`, keys and values base64,
int64 fields as strings) from the pytest process, which needs
`attach(None)` first; `wait_ready` polls `/health` from a Python process in
the lab's namespace, so it works without any attachment. `etcdctl()` runs
etcdctl (package etcd-client) in a namespace, with proxies cleared.

TLS (`EtcdLab(tls=True)`): `openssl` makes a CA, a server certificate (SAN
IP:10.251.<b>.1, serverAuth and clientAuth: etcd's own gateway dials its
gRPC port with it) and a client certificate (O=mdserver, no CN: see
make_certs), P-256 keys valid one day, in `lab.tls_dir`. Members then speak
https to clients and to each other and require a client certificate signed
by the CA (`--client-cert-auth`); `endpoints` are https URLs and `ca_file`,
`client_cert`, `client_key` name what a client needs. Every helper above
uses them. `sign_cert(lab.tls_dir, ...)` issues more client certificates.

Authentication (`enable_auth(user, password, prefix)`): creates `root` (etcd
refuses `auth enable` without it) with a password only the lab knows, and
`user` with a role that may read and write keys under `prefix`, then turns
auth on; the helpers then authenticate as root.

The temp dir (`lab.tmpdir`) is kept when MDT_KEEP_LAB=1 or keep_tmp=True.
"""

import atexit
import base64
import json
import os
import platform
import random
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

from labbase import LabContext, Step

PREFIX = "mdt"
CLIENT_PORT = 23790          # member i: CLIENT_PORT + i
PEER_PORT = 23800            # member i: PEER_PORT + i
SECOND_OCTETS = (251,)       # 10.251.<b>.0/24
MAX_ATTACH = 200             # attached addresses .11 ... .210

Bytes = Union[str, bytes]

# Waits for /health of every endpoint in argv[1] (JSON list) for argv[2]
# seconds; runs in the lab's namespace. argv[3]: JSON [ca, cert, key] for a
# TLS lab, else null. Exit 0 when all are healthy, else 1 with the last
# error per endpoint (JSON) on stdout.
_HEALTH_POLLER = r"""
import json, ssl, sys, time, urllib.error, urllib.request
eps, timeout, tls = json.loads(sys.argv[1]), float(sys.argv[2]), json.loads(sys.argv[3])
handlers = [urllib.request.ProxyHandler({})]
if tls:
    ctx = ssl.create_default_context(cafile=tls[0])
    ctx.load_cert_chain(tls[1], tls[2])
    handlers.append(urllib.request.HTTPSHandler(context=ctx))
opener = urllib.request.build_opener(*handlers)
deadline = time.monotonic() + timeout
pending, last = list(eps), {}
while True:
    for ep in list(pending):
        try:
            with opener.open(ep + "/health", timeout=2) as r:
                body = r.read().decode()
        except urllib.error.HTTPError as e:
            body = e.read().decode() or str(e)
        except Exception as e:
            last[ep] = repr(e)
            continue
        try:
            ok = json.loads(body).get("health") == "true"
        except ValueError:
            ok = False
        if ok:
            pending.remove(ep)
        else:
            last[ep] = body.strip()
    if not pending:
        sys.exit(0)
    if time.monotonic() > deadline:
        print(json.dumps({ep: last.get(ep, "?") for ep in pending}))
        sys.exit(1)
    time.sleep(0.05)
"""


class EtcdLabError(Exception):
    pass


class EtcdHTTPError(EtcdLabError):
    """The gateway answered with an error: `status` (HTTP) and etcd's `body`."""

    def __init__(self, status: int, body: Dict[str, Any]):
        super().__init__(f"etcd gateway: HTTP {status}: {body.get('message') or body}")
        self.status = status
        self.body = body


def _http_error(e: urllib.error.HTTPError) -> EtcdHTTPError:
    raw = e.read()
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = {"message": raw.decode(errors="replace")}
    return EtcdHTTPError(e.code, answer)


def _token_refused(e: EtcdHTTPError) -> bool:
    """A root token the member no longer knows (restarted, expired): log in again."""
    return e.status == 401 or "invalid auth token" in str(e.body.get("message", ""))


# The extensions of the lab's certificates (openssl -extensions <section>).
# Go checks only the subjectAltName against the address it dials, never the CN.
_OPENSSL_CNF = """
[req]
distinguished_name = dn
[dn]
[ca]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = IP:{address}
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
"""


_NEWKEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]


def make_certs(directory: str, address: str, client_subject: str = "/O=mdserver",
               label: str = "mdt etcd lab") -> Dict[str, str]:
    """A CA and, signed by it, a server certificate for `address` and a
    client certificate (P-256 keys, valid one day), in `directory`; their
    paths: ca, ca_key, server_cert, server_key, client_cert, client_key.

    Neither leaf has a CN by default. The client's: etcd 3.4 refuses every
    JSON gateway request over a client certificate with a CN once auth is
    on ("CommonName of client sending a request against gateway will be
    ignored"), even a login. The server's: the gateway presents it to etcd's
    gRPC port, where a CN would be taken as the user of token-less requests.
    """
    os.makedirs(directory, mode=0o700, exist_ok=True)
    cnf = os.path.join(directory, "openssl.cnf")
    with open(cnf, "w") as f:
        f.write(_OPENSSL_CNF.format(address=address))
    paths = {"ca": os.path.join(directory, "ca.crt"),
             "ca_key": os.path.join(directory, "ca.key")}
    _run(["openssl", "req", "-x509", "-config", cnf, "-extensions", "ca", *_NEWKEY,
          "-keyout", paths["ca_key"], "-out", paths["ca"], "-days", "1",
          "-subj", f"/CN={label} CA"])
    paths["server_cert"], paths["server_key"] = sign_cert(
        directory, "server", f"/O={label} server", "server")
    paths["client_cert"], paths["client_key"] = sign_cert(
        directory, "client", client_subject, "client")
    return paths


def sign_cert(directory: str, name: str, subject: str, kind: str = "client") -> Tuple[str, str]:
    """A new key and certificate (`kind`: "client" or "server") for `subject`,
    signed by the CA make_certs() put in `directory`: (cert, key) paths."""
    cnf, cert, key, csr = (os.path.join(directory, n) for n in (
        "openssl.cnf", f"{name}.crt", f"{name}.key", f"{name}.csr"))
    _run(["openssl", "req", "-new", "-config", cnf, *_NEWKEY, "-keyout", key, "-out", csr,
          "-subj", subject])
    _run(["openssl", "x509", "-req", "-in", csr, "-CA", os.path.join(directory, "ca.crt"),
          "-CAkey", os.path.join(directory, "ca.key"),
          "-set_serial", str(int.from_bytes(os.urandom(8), "big") >> 1),
          "-days", "1", "-extfile", cnf, "-extensions", kind, "-out", cert])
    return cert, key


def _clean_env() -> Dict[str, str]:
    """Our environment without proxies (gRPC and urllib both honour them)
    and without ETCD_*/ETCDCTL_* settings that would change a member."""
    env = {k: v for k, v in os.environ.items()
           if not k.lower().endswith("_proxy") and not k.startswith(("ETCD_", "ETCDCTL_"))}
    env["NO_PROXY"] = env["no_proxy"] = "*"
    env["ETCDCTL_API"] = "3"
    goarch = {"x86_64": "amd64", "aarch64": "arm64", "ppc64le": "ppc64le", "s390x": "s390x",
              "riscv64": "riscv64", "armv7l": "arm", "i686": "386"}.get(platform.machine())
    if goarch and goarch not in ("amd64", "ppc64le"):
        # etcd 3.4 only runs on amd64 and ppc64le unless this names the arch
        env["ETCD_UNSUPPORTED_ARCH"] = goarch
    return env


def _run(argv: Sequence[str], check: bool = True, timeout: float = 30) -> str:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise EtcdLabError(f"{' '.join(argv)}: exit {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def _ip(*args: str, netns: Optional[str] = None, check: bool = True) -> str:
    return _run(["ip"] + (["-n", netns] if netns else []) + list(args), check=check)


def _b64(data: Bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


_used_octets: Set[Tuple[int, int]] = set()     # subnets of this process's open labs


class EtcdLab(LabContext):
    """`members` (1 or 3) etcd 3.4 members in namespace `mdt-etcd-<tag>`.

    Use as a context manager (or start()/close()); close() always runs, also
    at interpreter exit (atexit), and is idempotent.
    """

    def __init__(self, members: int = 1, keep_tmp: Optional[bool] = None,
                 start_timeout: float = 30.0, tls: bool = False):
        if members not in (1, 3):
            raise ValueError("members must be 1 or 3")
        self.size = members
        self.tag = os.urandom(3).hex()
        self.netns = f"{PREFIX}-etcd-{self.tag}"
        self.bridge = f"{PREFIX}ebr{self.tag}"
        self.keep_tmp = (os.environ.get("MDT_KEEP_LAB") == "1") if keep_tmp is None else keep_tmp
        self.start_timeout = start_timeout
        self.tls = tls
        self.ca_file = ""         # TLS: the CA, the client certificate and its key
        self.client_cert = ""
        self.client_key = ""
        self.tls_dir = ""         # TLS: the CA's directory, for sign_cert()
        self._certs: Dict[str, str] = {}
        self._root_password: Optional[str] = None     # set by enable_auth()
        self._token: Optional[str] = None             # root's, while auth is on
        self.cluster_token = f"{PREFIX}-{self.tag}-{os.urandom(4).hex()}"
        self.tmpdir = ""
        self.subnet = ""          # '10.251.<b>.0/24'
        self.address = ""         # '10.251.<b>.1', every member's listen address
        self.prefix = ""          # '10.251.<b>.'
        self.procs: List[Optional[subprocess.Popen]] = [None] * members
        self.attached: Dict[Optional[str], str] = {}      # netns (None: root) -> address
        self._links: List[Tuple[Optional[str], str]] = []     # (netns or None, outer link name)
        self._octet: Optional[Tuple[int, int]] = None
        self._netns_created = False
        self._started = False
        self._env = _clean_env()
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    LAB_NAME = "etcd lab"
    LAB_ERRORS = (EtcdLabError,)

    def diagnostics(self) -> str:
        return self.log_tail()

    # -- names -------------------------------------------------------------

    def member_name(self, i: int) -> str:
        return f"{PREFIX}-etcd{i}-{self.tag}"

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def client_url(self, i: int) -> str:
        return f"{self.scheme}://{self.address}:{CLIENT_PORT + i}"

    def peer_url(self, i: int) -> str:
        return f"{self.scheme}://{self.address}:{PEER_PORT + i}"

    @property
    def endpoints(self) -> List[str]:
        """Every member's client URL (running or not)."""
        return [self.client_url(i) for i in range(self.size)]

    def running(self) -> List[int]:
        return [i for i, p in enumerate(self.procs) if p is not None and p.poll() is None]

    def log_path(self, i: int) -> str:
        return os.path.join(self.tmpdir, f"m{i}.log")

    def data_dir(self, i: int) -> str:
        return os.path.join(self.tmpdir, f"m{i}")

    def log_tail(self, lines: int = 30) -> str:
        out = []
        for i in range(self.size):
            try:
                with open(self.log_path(i), errors="replace") as f:
                    tail = f.read().splitlines()[-lines:]
            except OSError:
                continue
            p = self.procs[i]
            state = "not started" if p is None else (
                "running" if p.poll() is None else f"exited {p.returncode}")
            out.append(f"--- member {i} ({state}): {self.log_path(i)} ---")
            out += tail
        return "\n".join(out)

    def _fail(self, message: str) -> EtcdLabError:
        return EtcdLabError(f"{message}\n{self.log_tail()}")

    # -- start -------------------------------------------------------------

    def start(self) -> None:
        if self._started:
            raise EtcdLabError("lab already started")
        self._started = True
        if shutil.which("etcd") is None:
            raise EtcdLabError("etcd not found (apt-get install etcd-server)")
        atexit.register(self.close)
        try:
            self._start()
        except BaseException:
            try:
                self.close()
            except EtcdLabError as e:
                print(e, file=sys.stderr)
            raise

    def _pick_subnet(self) -> None:
        taken = _run(["ip", "-4", "route", "show", "table", "all"]) + _run(["ip", "-4", "addr"])
        choices = [(a, b) for a in SECOND_OCTETS for b in range(1, 255)
                   if (a, b) not in _used_octets and f"10.{a}.{b}." not in taken]
        if not choices:
            raise EtcdLabError("no free 10.251.x.0/24 for the etcd lab")
        a, b = random.choice(choices)
        _used_octets.add((a, b))
        self._octet = (a, b)
        self.prefix = f"10.{a}.{b}."
        self.subnet, self.address = f"{self.prefix}0/24", f"{self.prefix}1"

    def _start(self) -> None:
        self.tmpdir = tempfile.mkdtemp(prefix=f"{PREFIX}-etcd-{self.tag}-")
        self._pick_subnet()
        _ip("netns", "add", self.netns)
        self._netns_created = True
        _ip("link", "set", "lo", "up", netns=self.netns)
        # a fixed MAC: a bridge otherwise takes the lowest of its ports'
        # MACs, which changes under the attached sides' ARP caches
        _ip("link", "add", self.bridge, "address", f"02:6d:64:65:{self.tag[:2]}:{self.tag[2:4]}",
            "type", "bridge", netns=self.netns)
        _ip("addr", "add", f"{self.address}/24", "dev", self.bridge, netns=self.netns)
        _ip("link", "set", self.bridge, "up", netns=self.netns)
        if self.tls:
            self.tls_dir = os.path.join(self.tmpdir, "tls")
            self._certs = make_certs(self.tls_dir, self.address)
            self.ca_file = self._certs["ca"]
            self.client_cert, self.client_key = (self._certs["client_cert"],
                                                 self._certs["client_key"])
            ctx = ssl.create_default_context(cafile=self.ca_file)
            ctx.load_cert_chain(self.client_cert, self.client_key)
            self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                                       urllib.request.HTTPSHandler(context=ctx))
        for i in range(self.size):
            self._spawn(i)
        self.wait_ready(self.start_timeout)

    def _argv(self, i: int) -> List[str]:
        cluster = ",".join(f"{self.member_name(j)}={self.peer_url(j)}" for j in range(self.size))
        return [
            "ip", "netns", "exec", self.netns, "etcd",
            "--name", self.member_name(i),
            "--data-dir", self.data_dir(i),
            "--listen-client-urls", self.client_url(i),
            "--advertise-client-urls", self.client_url(i),
            "--listen-peer-urls", self.peer_url(i),
            "--initial-advertise-peer-urls", self.peer_url(i),
            "--initial-cluster", cluster,
            "--initial-cluster-state", "new",     # ignored once the data dir has a WAL
            "--initial-cluster-token", self.cluster_token,
            "--heartbeat-interval", "100",
            "--election-timeout", "1000",
            "--logger", "zap", "--log-outputs", "stderr",
        ] + self._tls_args()

    def _tls_args(self) -> List[str]:
        if not self.tls:
            return []
        # One certificate for both sides of client and peer traffic: its SAN
        # is the one address every member listens on.
        crt, key, ca = self._certs["server_cert"], self._certs["server_key"], self._certs["ca"]
        return ["--cert-file", crt, "--key-file", key, "--client-cert-auth",
                "--trusted-ca-file", ca,
                "--peer-cert-file", crt, "--peer-key-file", key, "--peer-client-cert-auth",
                "--peer-trusted-ca-file", ca]

    def _spawn(self, i: int) -> None:
        p = self.procs[i]
        if p is not None and p.poll() is None:
            raise EtcdLabError(f"member {i} is already running")
        with open(self.log_path(i), "ab") as log:
            log.write(f"=== mdt etcd lab: starting member {i} at {time.ctime()} ===\n".encode())
            log.flush()
            # `ip netns exec` execs etcd: the pid is etcd's own. A session of
            # its own: a ^C at the terminal reaches pytest, not the members.
            self.procs[i] = subprocess.Popen(self._argv(i), stdin=subprocess.DEVNULL,
                                             stdout=log, stderr=subprocess.STDOUT,
                                             env=self._env, start_new_session=True)

    # -- members -----------------------------------------------------------

    def wait_ready(self, timeout: float = 30.0, members: Optional[Sequence[int]] = None) -> float:
        """Wait until `members` (default: every running one) answer /health
        with true; returns the seconds waited. Raises with the logs' tails
        when one exits or the time is up."""
        t0 = time.monotonic()
        members = self.running() if members is None else list(members)
        if not members:
            return 0.0
        eps = [self.client_url(i) for i in members]
        poller = subprocess.Popen(["ip", "netns", "exec", self.netns, sys.executable, "-c",
                                   _HEALTH_POLLER, json.dumps(eps), str(timeout),
                                   json.dumps(self._client_tls())],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env=self._env, start_new_session=True)
        try:
            while poller.poll() is None:
                dead = [i for i in members if i not in self.running()]
                if dead:
                    raise self._fail(f"etcd member(s) {dead} exited while starting")
                if time.monotonic() - t0 > timeout + 10:
                    raise self._fail("etcd health poller hangs")
                time.sleep(0.05)
            out = poller.stdout.read() if poller.stdout else ""
        finally:
            if poller.poll() is None:
                poller.kill()
                poller.wait()
            if poller.stdout:
                poller.stdout.close()
        if poller.returncode != 0:
            raise self._fail(f"etcd not healthy after {timeout:.0f} s: {out.strip()}")
        return time.monotonic() - t0

    def _client_tls(self) -> Optional[List[str]]:
        return [self.ca_file, self.client_cert, self.client_key] if self.tls else None

    def stop_member(self, i: int, timeout: float = 10.0) -> None:
        """SIGTERM (a clean stop; a leader hands over first), SIGKILL after `timeout`."""
        p = self.procs[i]
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)

    def kill_member(self, i: int) -> None:
        """SIGKILL: no clean shutdown (the WAL is what survives). When it was
        the leader, a write before the others notice (election timeout, 1 s)
        hangs until etcd's request timeout: call wait_ready() first."""
        p = self.procs[i]
        if p is None or p.poll() is not None:
            return
        p.kill()
        p.wait(10)

    def start_member(self, i: int, wait: bool = True, timeout: float = 30.0) -> None:
        """Start member i again on its data dir (it rejoins with its data).
        wait: until it is healthy, which needs a quorum of running members."""
        self._spawn(i)
        if wait:
            self.wait_ready(timeout, [i])

    def stop_all(self) -> None:
        for i in range(self.size):
            self.stop_member(i)

    def start_all(self, wait: bool = True, timeout: float = 30.0) -> None:
        """Start every stopped member (all before waiting: a quorum must form)."""
        for i in range(self.size):
            if i not in self.running():
                self._spawn(i)
        if wait:
            self.wait_ready(timeout)

    # -- joining other namespaces -----------------------------------------

    def attach(self, netns: Optional[str] = None) -> str:
        """Join `netns` (None: this process's namespace) to the etcd bridge
        with a veth pair; returns its address in the lab's /24 (the only
        route it gets). Attaching the same namespace again returns the same
        address."""
        if not self._netns_created:
            raise EtcdLabError("lab not started")
        if netns in self.attached:
            return self.attached[netns]
        n = len(self._links) + 1
        if n > MAX_ATTACH:
            raise EtcdLabError("too many attachments")
        inner, outer = f"{PREFIX}ep{n}{self.tag}", f"{PREFIX}ea{n}{self.tag}"
        address = f"{self.prefix}{10 + n}"
        # created in place: `outer` in `netns` (or here), `inner` in the lab
        _run(["ip", "link", "add", outer] + (["netns", netns] if netns else [])
             + ["type", "veth", "peer", "name", inner, "netns", self.netns])
        self._links.append((netns, outer))
        _ip("link", "set", inner, "addrgenmode", "none", netns=self.netns)
        _ip("link", "set", inner, "master", self.bridge, "up", netns=self.netns)
        _ip("link", "set", outer, "addrgenmode", "none", netns=netns)
        _ip("addr", "add", f"{address}/24", "dev", outer, netns=netns)
        _ip("link", "set", outer, "up", netns=netns)
        self.attached[netns] = address
        return address

    # -- the v3 JSON gateway, from this process (after attach(None)) -------

    def call(self, path: str, body: Dict[str, Any], endpoint: Optional[str] = None,
             timeout: float = 5.0) -> Dict[str, Any]:
        """POST `body` to `/v3/<path>` (e.g. 'kv/put') of `endpoint`, or of
        the first running member that answers; returns etcd's JSON. As root
        once enable_auth() ran."""
        if None not in self.attached:
            raise EtcdLabError("call attach(None) first: this process is not on the etcd bridge")
        eps = [endpoint] if endpoint else [self.client_url(i) for i in self.running()]
        if not eps:
            raise EtcdLabError("no etcd member is running")
        errors = []
        for ep in eps:
            try:
                return self._call_as_root(ep, path, body, timeout)
            except urllib.error.HTTPError as e:
                raise _http_error(e) from None
            except urllib.error.URLError as e:
                # not connected (refused, unreachable, connect timeout): the
                # request never reached this member, so the next may have it
                errors.append(f"{ep}: {e.reason}")
            except OSError as e:
                # sent but unanswered (e.g. etcd's own request timeout after
                # the leader died): it may have been applied, so no retry
                raise EtcdLabError(f"{ep}/v3/{path}: {e!r}") from None
        raise EtcdLabError("no etcd member answered: " + "; ".join(errors))

    def _post(self, ep: str, path: str, body: Dict[str, Any], timeout: float,
              token: Optional[str] = None) -> Dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = token
        req = urllib.request.Request(f"{ep}/v3/{path}", data=json.dumps(body).encode(),
                                     method="POST", headers=headers)
        with self._opener.open(req, timeout=timeout) as r:
            return json.loads(r.read() or b"{}")

    def _call_as_root(self, ep: str, path: str, body: Dict[str, Any],
                      timeout: float) -> Dict[str, Any]:
        if self._root_password is None:
            return self._post(ep, path, body, timeout)
        for attempt in (1, 2):
            if self._token is None:
                answer = self._post(ep, "auth/authenticate",
                                    {"name": "root", "password": self._root_password}, timeout)
                self._token = str(answer["token"])
            try:
                return self._post(ep, path, body, timeout, self._token)
            except urllib.error.HTTPError as e:
                error = _http_error(e)
                if attempt == 2 or not _token_refused(error):
                    raise error from None
                self._token = None
        raise AssertionError("unreachable")

    def put(self, key: Bytes, value: Bytes, **kw) -> int:
        """Returns the revision of the write."""
        r = self.call("kv/put", {"key": _b64(key), "value": _b64(value)}, **kw)
        return int(r["header"]["revision"])

    def get(self, key: Bytes, revision: int = 0, serializable: bool = False,
            **kw) -> Optional[bytes]:
        body: Dict[str, Any] = {"key": _b64(key)}
        if revision:
            body["revision"] = str(revision)
        if serializable:
            body["serializable"] = True
        r = self.call("kv/range", body, **kw)
        kvs = r.get("kvs") or []
        return base64.b64decode(kvs[0].get("value", "")) if kvs else None

    def revision(self, **kw) -> int:
        """The store's current revision (the header of a range request)."""
        r = self.call("kv/range", {"key": _b64(b"\0"), "limit": "1", "keys_only": True}, **kw)
        return int(r["header"]["revision"])

    def compact(self, revision: int, physical: bool = True, **kw) -> None:
        """Compact history before `revision` (physical: wait until done)."""
        self.call("kv/compaction", {"revision": str(revision), "physical": physical}, **kw)

    def enable_auth(self, user: str, password: str, prefix: Bytes = b"") -> None:
        """Turn etcd authentication on, with `user` (password `password`)
        allowed to read and write the keys under `prefix` (b"": every key)
        and nothing else; `root` gets a password only the lab knows (unless
        `user` is root), and the helpers log in as root from here on. Needs
        attach(None)."""
        if self._root_password is not None:
            raise EtcdLabError("auth is enabled already")
        root_password = password if user == "root" else os.urandom(12).hex()
        calls: List[Tuple[str, Dict[str, Any]]] = [
            ("auth/user/add", {"name": "root", "password": root_password}),
            ("auth/role/add", {"name": "root"}),
            ("auth/user/grant", {"user": "root", "role": "root"})]
        if user != "root":
            role = f"{user}-rw"
            key = prefix.encode() if isinstance(prefix, str) else prefix
            # etcd's ranges: [key, range_end); "\0" to "\0" is the whole key space
            start, end = (key, key[:-1] + bytes([key[-1] + 1])) if key else (b"\0", b"\0")
            calls += [("auth/user/add", {"name": user, "password": password}),
                      ("auth/role/add", {"name": role}),
                      ("auth/role/grant", {"name": role, "perm": {
                          "permType": "READWRITE", "key": _b64(start),
                          "range_end": _b64(end)}}),
                      ("auth/user/grant", {"user": user, "role": role})]
        for path, body in calls:
            self.call(path, body)
        self.call("auth/enable", {})
        self._root_password, self._token = root_password, None

    # -- etcdctl -----------------------------------------------------------

    def etcdctl(self, *args: str, in_netns: Optional[str] = None, endpoints: Optional[
            Sequence[str]] = None, check: bool = True,
            timeout: float = 20.0) -> subprocess.CompletedProcess:
        """etcdctl (v3 API) with --endpoints (default: all members), run in
        `in_netns` (default: the lab's own namespace, always reachable)."""
        argv = ["ip", "netns", "exec", in_netns or self.netns, "etcdctl",
                "--endpoints", ",".join(endpoints or self.endpoints)]
        if self.tls:
            argv += ["--cacert", self.ca_file, "--cert", self.client_cert,
                     "--key", self.client_key]
        if self._root_password is not None:
            # on the command line: a test lab's root, in a namespace of its own
            argv += [f"--user=root:{self._root_password}"]
        argv += list(args)
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=self._env)
        if check and r.returncode != 0:
            raise EtcdLabError(f"etcdctl {' '.join(args)}: exit {r.returncode}: "
                               f"{r.stdout}{r.stderr}")
        return r

    # -- teardown ----------------------------------------------------------

    def teardown(self, step: Step) -> None:
        """close(): stop every member, delete every veth and the namespace,
        remove the temp dir."""
        atexit.unregister(self.close)
        for i in range(self.size):
            step(f"stop member {i}", self.stop_member, i)
        if self._netns_created:
            step("stop leftover processes", self._kill_leftovers)
        for netns, link in reversed(self._links):
            if netns is None:
                step(f"delete {link}", _ip, "link", "del", link)
            else:   # its namespace may be gone already, and the link with it
                _ip("link", "del", link, netns=netns, check=False)
        self._links.clear()
        self.attached.clear()
        if self._netns_created:
            step("delete netns", _ip, "netns", "del", self.netns)
            self._netns_created = False
        if self._octet:
            _used_octets.discard(self._octet)
        if self.tmpdir and os.path.isdir(self.tmpdir) and not self.keep_tmp:
            step("remove temp dir", shutil.rmtree, self.tmpdir)

    def _kill_leftovers(self) -> None:
        """Anything still running in the lab's namespace (a test's etcdctl)."""
        for pid in _run(["ip", "netns", "pids", self.netns], check=False).split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
