"""Least privilege on a real daemon: no secret in logs or error answers; every file documented, none wider."""

import base64
import fnmatch
import getpass
import json
import os
import re
import stat
import time
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Set, Tuple

import pytest

from daemon import ROOT, Daemon, request
from helpers import domain_xml, make_instance, mds_metadata
from mdserver import adminclient, config
from mdserver.errors import ConfigError, TemplateError
from mdserver.store import Store
from mdserver.userdata import check_cloud_config

unit, process = pytest.mark.unit, pytest.mark.process

SECURITY_MD = os.path.join(ROOT, "docs", "SECURITY.md")
MiB = 1024 * 1024
STRANGER = "127.0.0.9"  # no instance has this address
U1, M1 = "ec200001-aaaa-4bbb-8ccc-000000000001", "52:54:00:00:00:01"
U2, M2 = "ec200002-aaaa-4bbb-8ccc-000000000002", "52:54:00:00:00:02"
U3, M3 = "ec200003-aaaa-4bbb-8ccc-000000000003", "52:54:00:00:00:03"
U4, M4 = "ec200004-aaaa-4bbb-8ccc-000000000004", "52:54:00:00:00:04"  # refused every time
TTL = {"X-aws-ec2-metadata-token-ttl-seconds": "300"}


# -- the secrets: each carries a marker, the text searched for --------------------

@dataclass(frozen=True)
class Secret:
    what: str
    marker: str  # unique text inside the secret (survives JSON, YAML and repr alike)
    owner: str   # "all": every registered guest may get it; "vm1": vm1 only; "": nobody


CONF_HASH = Secret("[mdserver] password", "ConfHashMarkA1", "all")
ADMIN_KEY = Secret("[public-keys] admin", "AdminKeyMarkB2", "all")
TEMPLATE_DATA = Secret("[template-data] app_secret", "TemplateDataMarkC3", "all")
VM1_HASH = Secret("vm1's <mds:password>", "Vm1HashMarkD4", "vm1")
VM1_KEY = Secret("vm1's <mds:ssh-key>", "Vm1KeyMarkE5", "vm1")
VM1_META = Secret("vm1's <mds:meta key=db_password>", "Vm1MetaMarkF6", "vm1")
VM1_USERDATA = Secret("vm1's user-data body", "Vm1UserdataMarkG7", "vm1")
VM1_BLOB = Secret("vm1's stored password blob", "Vm1PasswordBlobMarkH8", "vm1")
# Not served to anyone: a template that fails, bodies the daemon refuses.
VM2_TEMPLATE = Secret("vm2's failing template", "Vm2TemplateMarkJ9", "")
PLAIN_PASSWORD = Secret("a refused plain-text <mds:password>", "PlainPasswordMarkK1", "")
MALFORMED_XML = Secret("a malformed upload", "MalformedXmlMarkL2", "")
LONG_META = Secret("a refused over-long meta value", "LongMetaMarkM3", "")
DSMODE_META = Secret("a refused dsmode meta value", "DsmodeMarkN4", "")
GUEST_UPLOAD = Secret("an upload from a guest", "GuestUploadMarkP5", "")
BIG_BLOB = Secret("an over-long password blob", "BigBlobMarkQ6", "")
FORGED_TOKEN = Secret("a forged IMDSv2 token", "ForgedTokenMarkR7", "")
BIG_UPLOAD = Secret("an upload over 2 MiB", "BigUploadMarkS8", "")
ADMIN_BAD_XML = Secret("a malformed upload on the admin socket", "AdminBadXmlMarkT9", "")
SECOND_BLOB = Secret("a second password blob (409)", "SecondBlobMarkU1", "")
FIXED = [CONF_HASH, ADMIN_KEY, TEMPLATE_DATA, VM1_HASH, VM1_KEY, VM1_META, VM1_USERDATA,
         VM1_BLOB, VM2_TEMPLATE, PLAIN_PASSWORD, MALFORMED_XML, LONG_META, DSMODE_META,
         GUEST_UPLOAD, BIG_BLOB, FORGED_TOKEN, BIG_UPLOAD, ADMIN_BAD_XML, SECOND_BLOB]

CONFIG = """[mdserver]
listen_address = 127.0.0.1
port = 0
db_file = {root}/state/db.json
admin_socket = {root}/run/admin.sock
userdata_dir = {root}/userdata
logfile = {root}/log/mdserver.log
loglevel = debug
access_log = yes
password = $$6$$PrivSalt$$ConfHashMarkA1
[public-keys]
admin = ssh-ed25519 AAAAC3NzaAdminKeyMarkB2 admin@host
[template-data]
app_secret = TemplateDataMarkC3
[dnsmasq]
net_address = 127.77.0.0
net_prefix = 16
gateway = 127.77.0.1
base_dir = {root}/state/dnsmasq
user = {user}
"""
# vm1's template prints every secret it can reach; vm2's does not parse, and
# the YAML error would name the alias (so the marker) if the log quoted it.
VM1_TEMPLATE = """#cloud-config
password: "{{!mdserver_password}}"
write_files:
- path: /etc/app.conf
  content: "Vm1UserdataMarkG7 {{!app_secret}} {{!meta['db_password']}}"
"""
VM2_TEMPLATE_TEXT = "#cloud-config\nkey: *Vm2TemplateMarkJ9\n"

# -- what the daemon writes, mirroring docs/SECURITY.md ("Files mdserver writes") --

DIR, FILE, SOCKET = "directory", "file", "socket"
# (name in the docs' table, glob patterns relative to the test's root, kind,
# widest mode). A path matching no entry fails the test: a new file needs a
# row here and in the docs. Entries this run does not produce (dnsmasq's own
# files, the etcd cache, the md_server 0.6 backup) are checked by the docs
# comparison and, for the store's, by test_store_files_under_any_umask.
WRITTEN: List[Tuple[str, Tuple[str, ...], str, int]] = [
    ("temporary files", ("*/.tmp-*",), FILE, 0o600),
    ("state directory", ("state",), DIR, 0o755),
    ("database", ("state/db.json",), FILE, 0o640),
    ("database journal", ("state/db.json.journal",), FILE, 0o640),
    ("database lock", ("state/db.json.lock",), FILE, 0o600),
    ("database revision", ("state/db.json.rev",), FILE, 0o640),
    ("md_server 0.6 backup", ("state/db.json.md_server-0.6.bak",), FILE, 0o640),
    ("etcd cache", ("state/etcd-cache.json",), FILE, 0o640),
    ("etcd cache journal", ("state/etcd-cache.json.journal",), FILE, 0o640),
    ("etcd cache lock", ("state/etcd-cache.json.lock",), FILE, 0o600),
    ("etcd cache revision", ("state/etcd-cache.json.rev",), FILE, 0o640),
    ("token key", ("state/imds-token.key",), FILE, 0o600),
    ("seed directory", ("state/seeds",), DIR, 0o711),
    ("seed images", ("state/seeds/*.iso",), FILE, 0o600),
    ("dnsmasq directory", ("state/dnsmasq",), DIR, 0o770),
    ("dnsmasq configuration", ("state/dnsmasq/mds.conf",), FILE, 0o644),
    ("dnsmasq host directories", ("state/dnsmasq/dhcp-hosts", "state/dnsmasq/hosts"), DIR,
     0o755),
    ("dnsmasq host files", ("state/dnsmasq/dhcp-hosts/*", "state/dnsmasq/hosts/*"), FILE,
     0o644),
    ("dnsmasq pid and lease files", ("state/dnsmasq/dnsmasq.pid",
                                     "state/dnsmasq/dnsmasq.leases"), FILE, 0o640),
    ("run directory", ("run",), DIR, 0o755),
    ("admin socket", ("run/admin.sock",), SOCKET, 0o660),
    ("admin socket lock", ("run/admin.sock.lock",), FILE, 0o600),
    ("port file", ("run/admin.port",), FILE, 0o644),
    ("metrics directory", ("run/admin.metrics",), DIR, 0o700),
    ("metrics files", ("run/admin.metrics/*.db",), FILE, 0o600),
    ("log file", ("log/mdserver.log",), FILE, 0o640),
]
# The test's own: configuration, templates, the log directory (as systemd's
# LogsDirectory= would make it), the daemon's captured stdout and stderr.
TEST_MADE = ("mdserver.conf", "mdserver.conf.stderr", "userdata", "userdata/*", "log")


def documented(rel: str, kind: str) -> Optional[Tuple[str, int]]:
    """(name, widest mode) of the entry `rel` falls under, None if none."""
    for name, patterns, k, mode in WRITTEN:
        if k == kind and any(fnmatch.fnmatchcase(rel, p) for p in patterns):
            return name, mode
    return None


def kind_of(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return DIR
    if stat.S_ISREG(mode):
        return FILE
    if stat.S_ISSOCK(mode):
        return SOCKET
    return "other"


def walk(root: str) -> Dict[str, Tuple[str, int, int]]:
    """rel path -> (kind, permission bits, uid) of everything under `root` but the test's own."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            if any(fnmatch.fnmatchcase(rel, p) for p in TEST_MADE):
                continue
            st = os.lstat(full)
            found[rel] = (kind_of(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid)
    return found


def mode_problems(found: Dict[str, Tuple[str, int, int]]) -> List[str]:
    problems = []
    for rel, (kind, mode, uid) in sorted(found.items()):
        entry = documented(rel, kind)
        if entry is None:
            problems.append(f"{rel}: {kind} {mode:04o}, not in docs/SECURITY.md's table")
        elif mode & ~entry[1]:
            problems.append(f"{rel}: {mode:04o}, wider than the documented {entry[1]:04o} "
                            f"({entry[0]})")
        elif uid != os.geteuid():
            problems.append(f"{rel}: owned by uid {uid}, not the daemon's")
    return problems


# -- one daemon run with known secrets --------------------------------------------

@dataclass
class Answer:
    who: str      # vm1, vm2, vm3, stranger, host (TCP from 127.0.0.1), admin (the socket)
    what: str
    status: int
    body: str


@dataclass
class Run:
    root: str
    answers: List[Answer]
    logs: Dict[str, bytes]            # file name -> content
    secrets: List[Secret]             # FIXED and those learnt during the run
    files: Dict[str, Tuple[str, int, int]]
    key: bytes


def vm_xml(name: str, uuid: str, mac: str, meta: Tuple[Tuple[str, str], ...] = (),
           **settings) -> str:
    block = mds_metadata(**settings)
    extra = "".join(f"<mds:meta key='{k}'>{v}</mds:meta>" for k, v in meta)
    return domain_xml(name, uuid, mac,
                      metadata=block.replace("</mds:instance>", extra + "</mds:instance>"))


def drive(d: Daemon, admin: str, answers: List[Answer]) -> Dict[str, str]:
    """Registrations, guest requests and refusals; the secrets learnt on the way."""
    def tcp(who: str, source: str, method: str, path: str, headers=None, body=None) -> Answer:
        status, _, text = request(d.host, d.port, method, path, source=source,
                                  headers=headers, body=body, timeout=15)
        a = Answer(who, f"{method} {path}", status, text)
        answers.append(a)
        return a

    def sock(method: str, url: str, body: Optional[bytes] = None) -> Answer:
        status, data = adminclient.request(admin, method, url, body, timeout=15)
        a = Answer("admin", f"{method} {url}", status, data.decode(errors="replace"))
        answers.append(a)
        return a

    # Registrations on the admin socket (what the hook and mdserverctl do).
    vm1 = sock("POST", "/instance-upload", vm_xml(
        "vm1", U1, M1, (("db_password", "Vm1MetaMarkF6"),), password="$6$Vm1Salt$Vm1HashMarkD4",
        ssh_key="ssh-ed25519 AAAAC3NzaVm1KeyMarkE5 me@laptop", route="configdrive").encode())
    vm2 = sock("POST", "/instance-upload", vm_xml("vm2", U2, M2, route="nocloud").encode())
    vm3 = sock("POST", "/instance-upload", vm_xml("vm3", U3, M3).encode())
    assert (vm1.status, vm2.status, vm3.status) == (200, 200, 200), (vm1, vm2, vm3)
    ip1, ip2, ip3 = (json.loads(a.body)["ip"] for a in (vm1, vm2, vm3))
    # Refused registrations, each body carrying a secret.
    for secret, xml in (
            (PLAIN_PASSWORD, vm_xml("vm4", U4, M4, password="PlainPasswordMarkK1")),
            (LONG_META, vm_xml("vm4", U4, M4, (("k", "x" * 250 + "LongMetaMarkM3"),))),
            (DSMODE_META, vm_xml("vm4", U4, M4, (("dsmode", "DsmodeMarkN4"),))),
            (ADMIN_BAD_XML, "<domain><name>AdminBadXmlMarkT9</name><uuid>")):
        assert sock("POST", "/instance-upload", xml.encode()).status == 400, secret
    assert sock("POST", "/instance-upload",
                b"<domain>" + b" " * (2 * MiB) + b"BigUploadMarkS8</domain>").status == 413
    assert sock("GET", "/instances/NoSuchInstance").status == 404
    # On the guest port from the host (md_server's upload URL).
    assert tcp("host", "127.0.0.1", "POST", "/instance-upload",
               body="<domain><name>MalformedXmlMarkL2</name>").status == 400
    assert tcp("host", "127.0.0.1", "POST", "/instance-upload",
               body="<domain>" + " " * (2 * MiB) + "BigUploadMarkS8</domain>").status == 413

    # vm1, the owner: its data, then its mistakes.
    token = tcp("vm1", ip1, "PUT", "/latest/api/token", TTL)
    assert token.status == 200
    with_token = {"X-aws-ec2-metadata-token": token.body}
    for path in ("/latest/meta-data/public-keys/0/openssh-key",
                 "/latest/meta-data/public-keys/1/openssh-key", "/latest/user-data"):
        assert tcp("vm1", ip1, "GET", path, with_token).status == 200, path
    meta = tcp("vm1", ip1, "GET", "/openstack/latest/meta_data.json")
    assert meta.status == 200
    for path in ("/openstack/latest/user_data", "/nocloud/meta-data", "/nocloud/user-data"):
        assert tcp("vm1", ip1, "GET", path).status == 200, path
    assert tcp("vm1", ip1, "POST", "/openstack/latest/password",
               body="Vm1PasswordBlobMarkH8").status == 200
    # The worker's replica follows the store a moment later (SIGUSR1).
    deadline = time.monotonic() + 5
    while tcp("vm1", ip1, "GET", "/openstack/latest/password").body == "":
        assert time.monotonic() < deadline, "the stored blob is not served"
        time.sleep(0.02)
    assert tcp("vm1", ip1, "POST", "/openstack/latest/password",
               body="SecondBlobMarkU1").status == 409
    assert tcp("vm1", ip1, "POST", "/openstack/latest/password",
               body="BigBlobMarkQ6" * 40).status == 413
    assert tcp("vm1", ip1, "GET", "/latest/meta-data/nope", with_token).status == 404
    assert tcp("vm1", ip1, "GET", "/openstack/latest/nope").status == 404
    assert tcp("vm1", ip1, "DELETE", "/latest/meta-data/").status == 405
    assert tcp("vm1", ip1, "GET", "/latest/meta-data/instance-id",
               {"X-aws-ec2-metadata-token": "99999999999.ForgedTokenMarkR7"}).status == 401
    assert tcp("vm1", ip1, "PUT", "/latest/api/token",
               {**TTL, "X-Forwarded-For": ip2}).status == 403
    assert tcp("vm1", ip1, "POST", "/instance-upload",
               body=vm_xml("vm9", U4, M4, hostname="GuestUploadMarkP5")).status == 403
    # vm2: its own answers, its failing template, vm1's token and vm1's data.
    assert tcp("vm2", ip2, "GET", "/openstack/latest/meta_data.json").status == 200
    assert tcp("vm2", ip2, "GET", "/nocloud/user-data").status == 200
    assert tcp("vm2", ip2, "GET", "/latest/user-data").status == 500
    assert tcp("vm2", ip2, "GET", "/latest/meta-data/instance-id", with_token).status == 401
    assert tcp("vm2", ip2, "GET", f"/nocloud/{U1}/user-data").status == 403
    assert tcp("vm2", ip2, "GET", "/openstack/latest/password").status == 200
    # vm3: the built-in template (the configured password hash).
    assert tcp("vm3", ip3, "GET", "/latest/user-data").status == 200
    # Nobody's address, claiming vm1's.
    for path in ("/latest/meta-data/instance-id", "/openstack/latest/meta_data.json",
                 "/nocloud/user-data", "/latest/user-data"):
        assert tcp("stranger", STRANGER, "GET", path, {"X-Forwarded-For": ip1}).status == 404
    assert sock("GET", "/instances").status == 200

    signature = token.body.partition(".")[2]
    seed = json.loads(meta.body)["random_seed"]
    return {"vm1's IMDSv2 token": signature, "vm1's random_seed": seed[8:48]}


@pytest.fixture(scope="module", params=[0o022, 0o000], ids=["umask022", "umask000"])
def run(request, tmp_path_factory) -> Iterator[Run]:
    root = tmp_path_factory.mktemp(f"privilege-{request.param:03o}")
    path = str(root / "mdserver.conf")
    with open(path, "w") as f:
        f.write(CONFIG.format(root=root, user=getpass.getuser()))
    (root / "userdata").mkdir()
    (root / "userdata" / "vm1.yaml").write_text(VM1_TEMPLATE)
    (root / "userdata" / "vm2.yaml").write_text(VM2_TEMPLATE_TEXT)
    (root / "log").mkdir(mode=0o750)
    old = os.umask(request.param)  # the daemon inherits it
    try:
        d = Daemon(path)
    finally:
        os.umask(old)
    answers: List[Answer] = []
    try:
        d.wait_ready()
        learnt = drive(d, str(root / "run" / "admin.sock"), answers)
        files = walk(str(root))  # the socket and the port file exist only now
    finally:
        status = d.stop()
    assert status == 0, d.output()
    files.update(walk(str(root)))
    with open(root / "state" / "imds-token.key", "rb") as f:
        key = f.read()
    learnt.update({"token key (hex)": key.hex(),
                   "token key (base64)": base64.b64encode(key).decode().rstrip("="),
                   "token key (base64url)": base64.urlsafe_b64encode(key).decode().rstrip("=")})
    owners = {"vm1's IMDSv2 token": "vm1", "vm1's random_seed": "vm1"}
    secrets = FIXED + [Secret(what, marker, owners.get(what, ""))
                       for what, marker in learnt.items()]
    logs = {}
    for name in ("log/mdserver.log", "mdserver.conf.stderr"):
        with open(root / name, "rb") as f:
            logs[name] = f.read()
    yield Run(str(root), answers, logs, secrets, files, key)


def found_in(data: bytes, secrets: List[Secret]) -> List[str]:
    return [s.what for s in secrets if s.marker.encode() in data]


@process
def test_no_secret_in_the_logs(run):
    log = run.logs["log/mdserver.log"].decode()
    # Not vacuous: the log has the registrations, the refusals and the access lines.
    for expected in ("registered vm1", "user-data fails", "401 GET /latest/meta-data/instance-id",
                     "413 POST /openstack/latest/password", "400 POST /instance-upload",
                     "token=yes", "the guest stored its encrypted password"):
        assert expected in log, expected
    for name, data in run.logs.items():
        assert found_in(data, run.secrets) == [], name
        assert run.key not in data, name


@process
def test_no_secret_in_an_error_answer(run):
    errors = [a for a in run.answers if a.status >= 400]
    print(f"{len(run.secrets)} secrets, {len(run.answers)} answers ({len(errors)} errors: "
          f"{sorted({a.status for a in errors})}), {len(run.logs['log/mdserver.log'])} "
          "bytes of log")
    assert len(errors) >= 20 and {a.status for a in errors} >= {400, 401, 403, 404, 405, 409,
                                                                 413, 500}
    leaks = [(a.who, a.what, a.status, found_in(a.body.encode(), run.secrets))
             for a in errors if found_in(a.body.encode(), run.secrets)]
    assert leaks == []


@process
def test_successful_answers_carry_only_their_owners_secrets(run):
    served: Set[str] = set()
    for a in run.answers:
        if a.status >= 400:
            continue
        got = [s for s in run.secrets if s.marker in a.body]
        if a.who == "admin":  # the host's administrator: anything but the host's own secrets
            allowed = {s for s in run.secrets if s.owner}
        else:
            allowed = {s for s in run.secrets if s.owner in ("all", a.who)}
        assert [s.what for s in got if s not in allowed] == [], (a.who, a.what)
        served.update(s.what for s in got if a.who != "admin")
    # Not vacuous: every secret a guest may get was served to it.
    assert {s.what for s in run.secrets if s.owner} <= served


@process
def test_every_file_is_documented_and_no_wider(run):
    problems = mode_problems(run.files)
    assert not problems, "\n".join(problems)
    # Not vacuous: the run wrote what the table is mostly about.
    entries = [documented(rel, kind) for rel, (kind, _, _) in run.files.items()]
    names = {entry[0] for entry in entries if entry is not None}
    assert names >= {"database journal", "token key", "seed images",
                     "dnsmasq host files", "admin socket", "port file", "log file",
                     "metrics directory", "metrics files"}


@unit
@pytest.mark.parametrize("umask", [0o022, 0o000], ids=["umask022", "umask000"])
def test_store_files_under_any_umask(tmp_path, umask):
    """The database, its journal and lock (and the etcd cache, the same code),
    and an md_server 0.6 database's backup, whatever the umask."""
    legacy = tmp_path / "state" / "old.json"
    legacy.parent.mkdir()
    legacy.write_text(json.dumps([{"domain_name": "vm1", "domain_uuid": U1, "mds_mac": M1,
                                   "mds_ipv4": "10.122.0.2"}]))
    old = os.umask(umask)
    try:
        store = Store(str(tmp_path / "state" / "etcd-cache.json"))
        store.put(make_instance(1))
        store._compact()  # the snapshot is written at compaction only
        store.close()
        Store(str(legacy)).close()  # converts it, keeping a backup
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "state").iterdir()}
    widest = {"etcd-cache.json": 0o640, "etcd-cache.json.journal": 0o640,
              "etcd-cache.json.lock": 0o600, "etcd-cache.json.rev": 0o640,
              "old.json.md_server-0.6.bak": 0o640}
    for name, mode in widest.items():
        assert name in modes and modes[name] & ~mode == 0, (name, oct(modes[name]))


@unit
def test_the_table_matches_the_docs():
    """docs/SECURITY.md's "Files mdserver writes" and WRITTEN: same names, same modes."""
    with open(SECURITY_MD, encoding="utf-8") as f:
        text = f.read()
    section = text.split("### Files mdserver writes", 1)[1].split("\n#", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and re.fullmatch(r"`0[0-7]{3}`", cells[2]):
            rows[cells[0]] = int(cells[2].strip("`"), 8)
    assert rows == {name: mode for name, _, _, mode in WRITTEN}


# -- error messages that quoted what they refused ---------------------------------

@unit
@pytest.mark.parametrize("body", [
    "[mdserver]\npassword = $6$PrivSalt$ConfHashMarkA1\n",          # $ not doubled
    "[mdserver]\npassword = $$6$$${nope}$$ConfHashMarkA1\n",         # a reference to nothing
    "password = $$6$$PrivSalt$$ConfHashMarkA1\n[mdserver]\n",         # before any section
])
def test_config_errors_do_not_quote_the_value(tmp_path, body):
    # mdserver prints this line to stderr, the journal: readable by group adm.
    path = tmp_path / "mdserver.conf"
    path.write_text(body)
    with pytest.raises(ConfigError) as e:
        config.load(str(path))
    assert "ConfHashMarkA1" not in str(e.value) and str(e.value).startswith(str(path))


@unit
@pytest.mark.parametrize("text, problem", [
    ("#cloud-config\nkey: *Vm2TemplateMarkJ9\n", "undefined alias"),
    ("#cloud-config\nkey: !Vm2TemplateMarkJ9 x\n", "constructor for the tag"),
    ("#cloud-config\nkey: [Vm2TemplateMarkJ9\n", "expected ',' or ']', but got '<stream end>'"),
])
def test_yaml_errors_do_not_quote_user_data(text, problem):
    with pytest.raises(TemplateError) as e:
        check_cloud_config(text, "t.yaml")
    assert "Vm2TemplateMarkJ9" not in str(e.value) and problem in str(e.value)
