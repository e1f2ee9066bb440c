"""Composition root of `mdserverctl`, the admin tool (virsh style)."""

import argparse
import difflib
import json
import os
import subprocess
import sys
from typing import Callable, List, Optional, Tuple
from urllib.parse import quote

from mdserver import __version__
from mdserver import adminclient, domains, hoplimit, pruning, status as statusmod
from mdserver import config as configmod
from mdserver.wiring import EXIT_CONFIG, build_views, template_problem
from mdserver.errors import ConfigError, DaemonUnavailable, MdserverError, TemplateError
from mdserver.fsutil import atomic_write, safe_name
from mdserver.models import ROUTES, SEED_ROUTES, Instance
from mdserver import routes as routesmod
from mdserver.registry import describe
from mdserver.seeds import FORMATS as SEED_FORMATS, seed_image
from mdserver.service import fresh_seed
from mdserver.store import Store
from mdserver.stores import open_replica, replica_path
from mdserver.timefmt import for_people, local_iso
from mdserver.tokens import read_key
from mdserver.view import derived_seed

COLUMNS = ("name", "ip", "mac", "uuid", "hostname", "route", "userdata")
LONG_COLUMNS = ("first_seen", "last_seen")
# How the admin API's record marks a route that waits for a cold boot
# (registry.record_json); the state column says it from libvirt instead.
PENDING_MARK = " (pending: next cold boot)"


def parser() -> argparse.ArgumentParser:
    """The command line (also the source of its man page and bash completion)."""
    parser = argparse.ArgumentParser(
        prog="mdserverctl",
        description="Administer mdserver: its instances (list, show, register, remove, "
                    "prune), their user-data, seed images, passwords and routes, the "
                    "instance store, and whether the host serves guests well (status).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-c", "--config", default=configmod.DEFAULT_PATH,
                        help=f"configuration file (default {configmod.DEFAULT_PATH})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("check-config", help="validate a configuration file and exit")
    p.add_argument("file", nargs="?", help="file to check (default: --config)")
    p = sub.add_parser("userdata", help="print the user-data an instance would get")
    p.add_argument("instance", help="instance name, UUID, MAC or IPv4 address")
    p = sub.add_parser(
        "list", help="list instances, with their route and state",
        description="List the instances, each with its route and its state as libvirt "
                    "([libvirt] uri) has it: registered; pending: next cold boot (the "
                    "definition has a route the running guest does not have yet); not "
                    "defined (libvirt no longer has the domain: see prune); other host "
                    "(a shared registry: another hypervisor's); unknown (libvirt could "
                    "not be asked: one line on standard error says why).")
    p.add_argument("--long", action="store_true",
                   help="also when each instance was first and last registered (local time)")
    p.add_argument("--json", action="store_true",
                   help="JSON: the records with their state; times in epoch seconds")
    p = sub.add_parser("show", help="show one instance, with its state")
    p.add_argument("instance", help="instance name, UUID, MAC or IPv4 address")
    p.add_argument("--json", action="store_true",
                   help="JSON: the record with its state; times in epoch seconds")
    p = sub.add_parser("register", help="register a domain from its XML (virsh dumpxml)")
    p.add_argument("file", help="domain XML file, or - for standard input")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p = sub.add_parser("remove", help="remove an instance (its address is freed)")
    p.add_argument("instance", help="instance name or UUID")
    p.add_argument("--any-host", action="store_true",
                   help="also an instance another hypervisor owns (shared registry)")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p = sub.add_parser("prune", help="list (with --yes remove) instances libvirt no longer has")
    p.add_argument("--yes", action="store_true", help="remove them")
    p.add_argument("--connect", metavar="URI", help="libvirt URI for virsh (default: virsh's)")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p = sub.add_parser(
        "seed", help="write an instance's seed image (ISO), as the daemon makes it",
        description="Write the config drive or NoCloud seed image of an instance, made from "
                    "the database (read-only) and the templates as the daemon would make it. "
                    "Its random_seed matches the daemon's only if the token key file can be "
                    "read (as root or the daemon's user).")
    p.add_argument("instance", help="instance name, UUID, MAC or IPv4 address")
    p.add_argument("--format", choices=SEED_ROUTES,
                   help="configdrive (label config-2) or nocloud (label cidata); "
                        "default: the instance's route, if it is one of these")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="file to write (mode 0600), or - for standard output (never a "
                        "terminal); default: NAME-FORMAT.iso in the current directory "
                        "(UUID-FORMAT.iso if the name is not a plain file name)")
    p = sub.add_parser(
        "password", help="print (or --clear) the encrypted password the guest stored",
        description="Print the password blob the guest POSTed to /openstack/<v>/password "
                    "(cloudbase-init: the admin password encrypted with the instance's SSH "
                    "RSA key, base64; decrypt with `base64 -d | openssl pkeyutl -decrypt "
                    "-inkey KEY`). Exit 1 if none is stored.")
    p.add_argument("instance", help="instance name or UUID")
    p.add_argument("--clear", action="store_true",
                   help="delete it, so the guest may store a new one (needs the daemon)")
    p = sub.add_parser(
        "route", help="show the domain XML a guest's route needs (--xml FILE: without libvirt)",
        description="Print the domain XML with the route its guest needs applied (SMBIOS "
                    "entries or the seed CD-ROM, and <mds:route>), as mdserver-enroll "
                    "applies it; the changes, the problems and the equivalent "
                    "virt-install/virt-xml options go to standard error, one line each. "
                    "Exit 0 if the route is in place, 1 if something prevents it.")
    p.add_argument("domain", nargs="?", metavar="NAME|UUID",
                   help="a domain of libvirt's ([libvirt] uri), read with its inactive XML")
    p.add_argument("--xml", metavar="FILE",
                   help="domain XML file (virsh dumpxml --inactive), or - for standard input")
    p.add_argument("--route", choices=ROUTES,
                   help="default: the route the domain already shows (or its <mds:route>), "
                        "else [libvirt] route")
    p.add_argument("--force", action="store_true",
                   help="switch a domain that shows another route: removes what mdserver "
                        "added for it (the guest may be provisioned again)")
    p.add_argument("--diff", action="store_true",
                   help="print a unified diff instead of the whole document")
    p.add_argument("--apply", action="store_true",
                   help="with a domain: define it with the route applied and register it, "
                        "as mdserver-enroll does (it takes effect at the next cold boot)")
    p = sub.add_parser(
        "status", help="is everything well? one line per check, and how to fix each problem",
        description="Check the daemon (admin socket, guests served), the metadata address "
                    "on the bridge, dnsmasq (running, from mdserver's mds.conf, serving DHCP "
                    "and DNS), the enroller (systemd's view of mdserver-enroll) and the "
                    "store. One line per check: ok, problem (with the command that fixes "
                    "it on the next line) or unknown (could not be told). Exit 0 when no "
                    "check has a problem, 1 otherwise. Run it as root to see dnsmasq's "
                    "sockets.")
    p.add_argument("--json", action="store_true",
                   help='JSON: {"ok": ..., "checks": [{"check", "verdict", "detail", "fix"}]}')
    sub.add_parser("nft", help="print the nftables rule set for [mdserver] hop_limit "
                               "(mdserver.service loads it: `mdserverctl nft | nft -f -`)")
    p = sub.add_parser("store", help="the instance store: status, or migrate a local "
                                     "database into etcd")
    store_sub = p.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    q = store_sub.add_parser("status", help="backend, endpoints, revision, cache age, "
                                            "records per host")
    q.add_argument("--json", action="store_true", help="JSON instead of lines")
    q = store_sub.add_parser(
        "migrate", help="copy this host's local database into etcd ([store] endpoints)",
        description="Copy every record of db_file into the etcd registry named by [store] "
                    "endpoints and prefix, as instances of [store] host. Refuses (and lists) "
                    "any address, name or UUID already held there by another instance; "
                    "records already there unchanged are skipped. Then set [store] backend "
                    "= etcd and restart mdserver.")
    q.add_argument("--to", choices=("etcd",), required=True, help="the backend to copy into")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "check-config":
            return check_config(args.file or args.config)
        cfg = configmod.load(args.config)
        return COMMANDS[args.command](cfg, args)
    except ConfigError as e:
        print(f"mdserverctl: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except MdserverError as e:
        print(f"mdserverctl: {e}", file=sys.stderr)
        return 1


def check_config(path: str) -> int:
    cfg = configmod.load(path)
    for warning in cfg.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{path}: OK")
    return 0


def userdata(cfg: configmod.Config, args) -> int:
    inst = open_replica(cfg).find(args.instance)
    try:
        path, text = build_views(cfg).userdata(inst)
    except TemplateError as e:
        print(f"mdserverctl: {inst.name}: {e}", file=sys.stderr)
        return 1
    print(f"# {inst.name}: template {path}", file=sys.stderr)
    sys.stdout.write(text)
    return 0


def _url(key: str) -> str:
    # Domain names may hold spaces, '/' and worse: one path segment, quoted.
    return "/instances/" + quote(key, safe="")


def _daemon(cfg: configmod.Config, method: str, url: str, body: Optional[bytes] = None):
    return adminclient.call(cfg.mdserver.admin_socket, method, url, body)


def _records(cfg: configmod.Config) -> List[dict]:
    """From the daemon; with it down, read-only from the database."""
    try:
        return _daemon(cfg, "GET", "/instances")
    except DaemonUnavailable as e:
        print(f"mdserverctl: {e}; reading {replica_path(cfg)}", file=sys.stderr)
        store = open_replica(cfg)
        check = template_problem(build_views(cfg))
        return [describe(i, cfg.libvirt.route, check(i))
                for i in sorted(store, key=lambda i: (i.name, i.uuid))]


def _cell(record: dict, column: str) -> str:
    value = record.get(column, "-")
    if column in LONG_COLUMNS:
        return local_iso(value) if isinstance(value, (int, float)) else str(value)
    value = str(value)
    if column == "route" and "state" in record and value.endswith(PENDING_MARK):
        return value[:-len(PENDING_MARK)]  # the state column says it
    # the whole error is in show and --json; the table only flags it
    return "ERROR" if column == "userdata" and value.startswith("error") else value


def _print(records, as_json: bool, extra: Tuple[str, ...] = ()) -> None:
    if as_json:
        print(json.dumps(records, indent=1))
        return
    # `extra` columns (times, the state: words with spaces) after the
    # single-word ones; a shared registry's host (who owns each instance) last.
    columns = COLUMNS + extra + (("host",) if len({r.get("host") for r in records}) > 1 else ())
    rows = [[_cell(r, c) for c in columns] for r in records]
    widths = [max([len(c)] + [len(row[i]) for row in rows]) for i, c in enumerate(columns)]
    for row in [[c.upper() for c in columns]] + rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


def _with_states(cfg: configmod.Config, records: List[dict],
                 uuids: Optional[List[str]] = None) -> List[dict]:
    """`records` with the state libvirt gives each (domains.state_of);
    libvirt out of reach: one line on standard error, every state unknown."""
    try:
        survey: Optional[domains.Survey] = domains.survey(cfg.libvirt.uri, uuids)
    except MdserverError as e:
        print(f"mdserverctl: libvirt: {e}: states unknown", file=sys.stderr)
        survey = None
    return [dict(r, state=domains.state_of(r, survey, cfg.store.host)) for r in records]


def list_(cfg, args) -> int:
    _print(_with_states(cfg, _records(cfg)), args.json,
           (LONG_COLUMNS if args.long else ()) + ("state",))
    return 0


def show(cfg, args) -> int:
    try:
        record = _daemon(cfg, "GET", _url(args.instance))
    except DaemonUnavailable as e:
        print(f"mdserverctl: {e}; reading {replica_path(cfg)}", file=sys.stderr)
        inst = open_replica(cfg).find(args.instance)
        record = describe(inst, cfg.libvirt.route, template_problem(build_views(cfg))(inst))
    record = _with_states(cfg, [record], [record["uuid"]])[0]
    if args.json:
        print(json.dumps(record, indent=1))
    else:
        record = for_people(record)
        width = max(len(k) for k in record)
        for key, value in record.items():
            print(f"{key.ljust(width)}  {value}")
    return 0


def status(cfg: configmod.Config, args) -> int:
    from mdserver import probes
    verdicts = statusmod.judge(probes.gather(cfg))
    render = statusmod.render_json if args.json else statusmod.render_text
    sys.stdout.write(render(verdicts))
    return 0 if statusmod.healthy(verdicts) else 1


def _write(cfg, method: str, url: str, body: Optional[bytes] = None) -> dict:
    try:
        return _daemon(cfg, method, url, body)
    except DaemonUnavailable as e:
        raise MdserverError(f"{e}: changes need the running daemon") from None


def register(cfg, args) -> int:
    if args.file == "-":
        data = sys.stdin.buffer.read()
    else:
        with open(args.file, "rb") as f:
            data = f.read()
    _print([_write(cfg, "POST", "/instance-upload", data)], args.json)
    return 0


def remove(cfg, args) -> int:
    url = _url(args.instance) + ("?any_host=1" if args.any_host else "")
    _print([_write(cfg, "DELETE", url)], args.json)
    return 0


def libvirt_uuids(connect: Optional[str]) -> set:
    cmd = ["virsh"] + (["--connect", connect] if connect else []) + ["list", "--all", "--uuid"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise MdserverError(f"cannot ask libvirt ({' '.join(cmd)}): {e}") from None
    if out.returncode != 0:
        raise MdserverError(f"{' '.join(cmd)} failed: {out.stderr.strip()}")
    return {line.strip().lower() for line in out.stdout.splitlines() if line.strip()}


def prune(cfg, args) -> int:
    known = libvirt_uuids(args.connect)
    # the same guards as mdserver-enroll; --yes overrides the 10% one only
    decision = pruning.decide(_records(cfg), known, cfg.store.host, force=args.yes)
    gone = list(decision.gone)
    if args.yes:
        if decision.refused:
            raise MdserverError(decision.refused)
        gone = [_write(cfg, "DELETE", _url(r['uuid'])) for r in decision.remove]
    _print(gone, args.json)
    if not args.json:
        verb = "removed" if args.yes else "unknown to libvirt (remove with --yes)"
        print(f"{len(gone)} instance(s) {verb}", file=sys.stderr)
    return 0


def _daemon_seed(cfg: configmod.Config) -> Callable[[Instance], bytes]:
    """The daemon's random seed per instance (derived from its token key), so
    the image is the daemon's byte for byte; a fresh one if the key cannot be
    read. The key is only read: a key file created here (as root) would lock
    the daemon out of it."""
    path = cfg.mdserver.token_key_file
    try:
        key = read_key(path)
        reason = "no key there yet"
    except OSError as e:
        key, reason = None, e.strerror or str(e)
    if key is None:
        print(f"mdserverctl: warning: cannot read {path} ({reason}): random_seed differs "
              "from the daemon's image", file=sys.stderr)
        return fresh_seed
    return derived_seed(key)


def seed(cfg: configmod.Config, args) -> int:
    inst = open_replica(cfg).find(args.instance)
    route = inst.settings.route or cfg.libvirt.route
    fmt = args.format or (route if route in SEED_ROUTES else None)
    if fmt is None:
        raise MdserverError(f"{inst.name}: its route is {route}, not a seed route: "
                            f"give --format {' or '.join(SEED_ROUTES)}")
    output = args.output or "%s-%s.iso" % (inst.name if safe_name(inst.name) else inst.uuid,
                                           fmt)
    if output == "-" and sys.stdout.isatty():
        raise MdserverError("refusing to write an ISO image to a terminal: "
                            "redirect it or give -o FILE")
    # A failing template: the face leaves user-data out and says so (stderr).
    data = seed_image(build_views(cfg, _daemon_seed(cfg))(inst), fmt)
    if output == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        try:
            atomic_write(output, data, 0o600)  # user-data and password hash inside
        except OSError as e:
            raise MdserverError(f"cannot write {output}: {e.strerror or e}") from None
    print(f"# {inst.name}: {fmt} image (label {SEED_FORMATS[fmt][0]}), {len(data)} bytes"
          f" -> {'standard output' if output == '-' else output}", file=sys.stderr)
    return 0


def password(cfg: configmod.Config, args) -> int:
    url = _url(args.instance) + "/password"
    try:
        blob = _daemon(cfg, "GET", url)["password"]
    except DaemonUnavailable as e:
        if args.clear:
            raise MdserverError(f"{e}: changes need the running daemon") from None
        print(f"mdserverctl: {e}; reading {replica_path(cfg)}", file=sys.stderr)
        blob = open_replica(cfg).find(args.instance).password_blob
    if not blob:
        print(f"mdserverctl: {args.instance}: no password stored", file=sys.stderr)
        return 1
    if args.clear:
        _write(cfg, "DELETE", url)
        print(f"# {args.instance}: stored password cleared", file=sys.stderr)
    else:
        print(blob)
    return 0


def _libvirt_domain(cfg: configmod.Config, key: str):
    """(connection, domain) for a name or UUID, through [libvirt] uri."""
    libvirt, conn = domains.open_libvirt(cfg.libvirt.uri)
    for lookup in (conn.lookupByName, conn.lookupByUUIDString):
        try:
            return libvirt, conn, lookup(key)
        except libvirt.libvirtError:
            continue
    raise MdserverError(f"libvirt has no domain {key!r} ({cfg.libvirt.uri})")


def route(cfg: configmod.Config, args) -> int:
    if bool(args.domain) == bool(args.xml):
        raise MdserverError("route: give a domain NAME|UUID or --xml FILE (one of them)")
    if args.apply and not args.domain:
        raise MdserverError("route: --apply needs a domain of libvirt's, not --xml")
    if args.domain:
        libvirt, conn, dom = _libvirt_domain(cfg, args.domain)
        text = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        source = f"{dom.name()} (libvirt)"
    else:
        text, source = _read_text(args.xml), args.xml if args.xml != "-" else "standard input"
    facts = routesmod.domain_facts(text)
    wanted = args.route or routesmod.existing_route(text) or cfg.libvirt.route
    seed_path = os.path.join(cfg.seeds.dir, facts.uuid + ".iso")
    plan = routesmod.plan(text, wanted, seed_path, force=args.force)
    if args.diff or args.apply:
        sys.stdout.writelines(difflib.unified_diff(
            text.splitlines(True), plan.xml.splitlines(True), source,
            f"{source} (route {wanted})"))
    else:
        sys.stdout.write(plan.xml)
    sys.stdout.flush()
    ok = plan.route == wanted
    state = "in place" if ok else f"NOT in place (the domain keeps {plan.route or 'no route'})"
    print(f"# {facts.name}: route {wanted} {state}, {len(plan.changes)} change(s)",
          file=sys.stderr)
    for line in plan.changes:
        print(f"change: {line}", file=sys.stderr)
    for line in plan.problems:
        print(f"problem: {line}", file=sys.stderr)
    if plan.changed or not ok:
        for line in routesmod.virt_options(wanted, facts.uuid, seed_path, facts.machine,
                                           facts.name or facts.uuid):
            print(f"equivalent: {line}", file=sys.stderr)
    if args.apply and ok:
        if plan.changed:
            conn.defineXML(plan.xml)  # the same edit mdserver-enroll makes
            print(f"# {facts.name}: defined with route {wanted}; a running guest gets it at "
                  "its next cold boot", file=sys.stderr)
        live = dom.XMLDesc(0) if dom.isActive() else None
        url = "/instance-upload?pending=1" if routesmod.pending(live, plan.xml) \
            else "/instance-upload"
        _write(cfg, "POST", url, plan.xml.encode())
    return 0 if ok else 1


def _read_text(path: str) -> str:
    """A file (or - for standard input) as UTF-8 text."""
    if path == "-":
        data = sys.stdin.buffer.read()
    else:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise MdserverError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MdserverError(f"{path}: not UTF-8: {e}") from None


def store(cfg: configmod.Config, args) -> int:
    if args.store_command == "status":
        try:
            status = _daemon(cfg, "GET", "/store")
        except DaemonUnavailable as e:
            print(f"mdserverctl: {e}; reading {replica_path(cfg)}", file=sys.stderr)
            status = dict(open_replica(cfg).status(), backend=cfg.store.backend,
                          daemon="not running")
        if cfg.store.backend == "etcd":
            status.setdefault("endpoints", list(cfg.store.endpoints))
        if args.json:
            print(json.dumps(status, indent=1))
        else:
            for key, value in status.items():
                if isinstance(value, dict):
                    value = ", ".join(f"{k or '-'}: {v}" for k, v in value.items()) or "none"
                elif isinstance(value, list):
                    value = ", ".join(map(str, value))
                print(f"{key.ljust(10)}  {value}")
        return 0
    return migrate(cfg)


def migrate(cfg: configmod.Config) -> int:
    """`store migrate --to etcd`: the local database's records into etcd."""
    import tempfile
    from mdserver.etcdstore import EtcdStore
    if not cfg.store.endpoints:
        raise MdserverError("store migrate: set [store] endpoints (and prefix, host) first")
    local = Store(cfg.mdserver.db_file, writable=False, host=cfg.store.host)
    records = [i.updated(host=cfg.store.host) for i in local]
    with tempfile.TemporaryDirectory(prefix="mdserverctl-") as tmp:
        target = EtcdStore(cfg.store, Store(os.path.join(tmp, "cache.json"),
                                            host=cfg.store.host))
        try:
            problems = target.conflicts(records)
            if problems:
                for line in problems:
                    print(f"conflict: {line}", file=sys.stderr)
                raise MdserverError(f"store migrate: {len(problems)} conflict(s) with the "
                                    "etcd registry: nothing copied")
            written = target.import_records(records)
        finally:
            target.close()
    print(f"# {written} of {len(records)} record(s) of {cfg.mdserver.db_file} copied to etcd "
          f"{cfg.store.prefix} as host {cfg.store.host} (the rest were there already); "
          "now set [store] backend = etcd and restart mdserver", file=sys.stderr)
    return 0


def nft(cfg: configmod.Config, args) -> int:
    sys.stdout.write(hoplimit.ruleset(cfg.mdserver))
    return 0


COMMANDS = {"nft": nft, "store": store, "userdata": userdata, "list": list_, "show": show,
            "register": register, "remove": remove, "prune": prune, "seed": seed,
            "password": password, "route": route, "status": status}


if __name__ == "__main__":
    sys.exit(main())
