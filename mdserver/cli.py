"""Composition root of `mdserver`, the daemon."""

import argparse
import getpass
import logging
import os
import sys
import time
from functools import partial
from typing import List, Optional

from mdserver import adminclient, logs
from mdserver import config as configmod
from mdserver.dnsmasq import DnsmasqFiles
from mdserver.errors import ConfigError, MdserverError
from mdserver.models import Instance
from mdserver.registry import Registry
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


def build_guest_app(cfg: configmod.Config):
    """In the server worker: a read-only replica of the database and the
    guest-facing app; uploads go to the main process over the admin socket."""
    from mdserver import web
    md = cfg.mdserver
    replica = Store(md.db_file, writable=False)
    app = web.metadata_app(
        build_service(cfg, replica), access_log=md.access_log,
        upload=partial(adminclient.request, md.admin_socket, "POST", "/instance-upload"),
        host_addresses={"127.0.0.1", "::1", md.listen_address})
    return app, replica.refresh


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
    from mdserver import server, web
    try:
        store = Store(cfg.mdserver.db_file, freed_retention=cfg.dnsmasq.lease_len)
    except MdserverError as e:
        log.error("%s", e)
        return 1
    try:
        registry = Registry(cfg, store, DnsmasqFiles(cfg), on_change=server.notify_workers)
        registry.sync_dnsmasq()
        if args.demo:
            register_demo(cfg, store)
        return server.run(cfg, web.admin_app(registry), build_guest_app)
    except (MdserverError, OSError) as e:
        log.error("%s", e)
        return 1
    finally:
        store.close()


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
admin_socket = admin.sock
access_log = yes

[dnsmasq]
base_dir = dnsmasq
user = {getpass.getuser()}

[public-keys]
demo = ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDemoKeyDemoKeyDemoKeyDemoKeyDemoKeyDemo demo@mdserver
""")
    return path


def register_demo(cfg: configmod.Config, store: Store) -> None:
    """Register 127.0.0.1 as instance `demo`, so curl from this host sees its metadata."""
    if store.by_uuid(DEMO_UUID) is None:
        now = time.time()
        store.put(Instance(uuid=DEMO_UUID, name="demo", mac="52:54:00:de:30:01",
                           ipv4="127.0.0.1", hostname="demo", first_seen=now,
                           last_seen=now))
    base = f"http://127.0.0.1:{cfg.mdserver.port}"
    print(f"mdserver demo: instance 'demo' is 127.0.0.1. Try:\n"
          f"  curl {base}/latest/meta-data/\n"
          f"  curl {base}/latest/meta-data/instance-id\n"
          f"  curl {base}/latest/user-data\n"
          f"Stop with Ctrl-C.", flush=True)
