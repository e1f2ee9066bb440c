"""Composition roots: `mdserver` (the daemon) and `mdserverctl` (administration)."""

import argparse
import logging
import os
import sys
import time
from typing import List, Optional

from mdserver import config as configmod
from mdserver import logs
from mdserver.errors import ConfigError, MdserverError, TemplateError
from mdserver.models import Instance
from mdserver.service import MetadataService
from mdserver.store import Store
from mdserver.tokens import TokenSigner, load_or_create_key
from mdserver.userdata import Templates

log = logging.getLogger("mdserver")

EXIT_CONFIG = 2
DEMO_PORT = 8169
DEMO_UUID = "ec2de302-0000-4000-8000-000000000001"


def build_service(cfg: configmod.Config, store: Store,
                  signer: Optional[TokenSigner] = None) -> MetadataService:
    md = cfg.mdserver
    signer = signer or TokenSigner(load_or_create_key(md.token_key_file))
    templates = Templates(md.userdata_dir, md.userdata_suffixes, md.default_template)
    return MetadataService(cfg, store, signer, templates)


def build_app(cfg: configmod.Config):
    """The guest-facing WSGI app with its store (runs in the server worker)."""
    from mdserver import web
    store = Store(cfg.mdserver.db_file)
    return web.metadata_app(build_service(cfg, store), access_log=cfg.mdserver.access_log)


# -- the daemon -------------------------------------------------------------

def daemon_main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mdserver", description="EC2-compatible metadata service for libvirt guests.")
    parser.add_argument("config", nargs="?", default=configmod.DEFAULT_PATH,
                        help=f"configuration file (default {configmod.DEFAULT_PATH})")
    parser.add_argument("--demo", metavar="STATE_DIR",
                        help="run a self-contained demo on 127.0.0.1:%d with its state "
                             "in STATE_DIR (the config argument is ignored)" % DEMO_PORT)
    args = parser.parse_args(argv)
    path = write_demo(args.demo) if args.demo else args.config
    try:
        cfg = configmod.load(path)
    except ConfigError as e:
        print(f"mdserver: {e}", file=sys.stderr)
        return EXIT_CONFIG
    logs.setup(cfg.mdserver.loglevel, cfg.mdserver.logfile)
    for warning in cfg.warnings:
        log.warning("%s", warning)
    try:
        # Read the database once here so a corrupt or locked one stops start-up
        # with one line, before any worker exists.
        Store(cfg.mdserver.db_file).close()
        if args.demo:
            register_demo(cfg)
        from mdserver import server
        return server.run(cfg, build_app)
    except MdserverError as e:
        log.error("%s", e)
        return 1


def write_demo(state_dir: str) -> str:
    """A demo configuration on loopback and a high port, state in `state_dir`."""
    state_dir = os.path.abspath(state_dir)
    os.makedirs(os.path.join(state_dir, "userdata"), exist_ok=True)
    path = os.path.join(state_dir, "mdserver.conf")
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"""\
# Written by `mdserver --demo`: a loopback-only demo. Not for production.
[mdserver]
listen_address = 127.0.0.1
port = {DEMO_PORT}
db_file = db.json
userdata_dir = userdata
access_log = yes

[public-keys]
demo = ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDemoKeyDemoKeyDemoKeyDemoKeyDemoKeyDemo demo@mdserver
""")
    return path


def register_demo(cfg: configmod.Config) -> None:
    """Register 127.0.0.1 as instance `demo`, so curl from this host sees its metadata."""
    store = Store(cfg.mdserver.db_file)
    try:
        if store.by_uuid(DEMO_UUID) is None:
            now = time.time()
            store.put(Instance(uuid=DEMO_UUID, name="demo", mac="52:54:00:de:30:01",
                               ipv4="127.0.0.1", hostname="demo", first_seen=now,
                               last_seen=now))
    finally:
        store.close()
    base = f"http://127.0.0.1:{cfg.mdserver.port}"
    print(f"mdserver demo: instance 'demo' is 127.0.0.1. Try:\n"
          f"  curl {base}/latest/meta-data/\n"
          f"  curl {base}/latest/meta-data/instance-id\n"
          f"  curl {base}/latest/user-data\n"
          f"Stop with Ctrl-C.", flush=True)


# -- mdserverctl ------------------------------------------------------------

def ctl_main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="mdserverctl", description="Administer mdserver.")
    parser.add_argument("-c", "--config", default=configmod.DEFAULT_PATH,
                        help=f"configuration file (default {configmod.DEFAULT_PATH})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("check-config", help="validate a configuration file and exit")
    p.add_argument("file", nargs="?", help="file to check (default: --config)")
    p = sub.add_parser("userdata", help="print the user-data an instance would get")
    p.add_argument("instance", help="instance name, UUID, MAC or IPv4 address")
    args = parser.parse_args(argv)
    try:
        if args.command == "check-config":
            return ctl_check_config(args.file or args.config)
        return ctl_userdata(args.config, args.instance)
    except ConfigError as e:
        print(f"mdserverctl: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except MdserverError as e:
        print(f"mdserverctl: {e}", file=sys.stderr)
        return 1


def ctl_check_config(path: str) -> int:
    cfg = configmod.load(path)
    for warning in cfg.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{path}: OK")
    return 0


def ctl_userdata(config_path: str, key: str) -> int:
    cfg = configmod.load(config_path)
    store = Store(cfg.mdserver.db_file, writable=False)
    # Preview only: no token key is read or created.
    service = build_service(cfg, store, TokenSigner(os.urandom(32)))
    inst = store.find(key)
    try:
        path, text = service.userdata(inst)
    except TemplateError as e:
        print(f"mdserverctl: {inst.name}: {e}", file=sys.stderr)
        return 1
    print(f"# {inst.name}: template {path}", file=sys.stderr)
    sys.stdout.write(text)
    return 0

