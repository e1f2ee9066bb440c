"""Composition root of `mdserver`, the daemon."""

import argparse
import logging
import sys
from typing import List, Optional, Tuple

from mdserver import __version__
from mdserver import demo, logs, metrics
from mdserver import config as configmod
from mdserver.adminserver import AdminClaim, claim_admin
from mdserver.config import Config
from mdserver.dnsmasq import DnsmasqFiles
from mdserver.errors import ConfigError, MdserverError
from mdserver.registry import Registry
from mdserver.storeapi import InstanceStore
from mdserver.stores import open_store
from mdserver.tokens import load_or_create_key
from mdserver.view import derived_seed
from mdserver.wiring import (EXIT_CONFIG, build_views, guest_builder, read_vendor_data,
                             template_problem)

log = logging.getLogger("mdserver")


def take_ownership(cfg: Config) -> Tuple[InstanceStore, AdminClaim]:
    """The daemon's two exclusive resources, the store and the admin socket,
    both taken before anything is changed (dnsmasq files, seeds, the socket
    file), or the one MdserverError that names who has them.

    A local store first: its flock is what tells a second daemon on the same
    database ("in use"), and opening it changes nothing another daemon owns.
    An etcd store second: starting it claims this host in the shared registry
    and refreshes its cache, which a daemon refused for the socket must not do."""
    if cfg.store.backend == "local":
        store = open_store(cfg)
        try:
            return store, claim_admin(cfg.mdserver.admin_socket)
        except BaseException:
            store.close()
            raise
    claim = claim_admin(cfg.mdserver.admin_socket)
    try:
        return open_store(cfg), claim
    except BaseException:
        claim.release()
        raise


def parser() -> argparse.ArgumentParser:
    """The command line (also the source of its man page and bash completion)."""
    p = argparse.ArgumentParser(
        prog="mdserver",
        description="EC2-compatible metadata service for libvirt guests: serves each "
                    "registered guest its metadata and user-data on the metadata address "
                    "(EC2, OpenStack and NoCloud), keeps dnsmasq's files for its address and "
                    "name, and takes registrations on the admin socket.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("config", nargs="?", default=configmod.DEFAULT_PATH,
                   help=f"configuration file (default {configmod.DEFAULT_PATH})")
    p.add_argument("--demo", metavar="STATE_DIR",
                   help="run a self-contained demo on 127.0.0.1:%d with its state "
                        "in STATE_DIR (the config argument is ignored)" % demo.DEMO_PORT)
    p.add_argument("--port", type=int, metavar="PORT",
                   help="with --demo: its port instead of %d (0: any free port)"
                        % demo.DEMO_PORT)
    return p


def daemon_main(argv: Optional[List[str]] = None) -> int:
    cmdline = parser()
    args = cmdline.parse_args(argv)
    if args.port is not None and not args.demo:
        cmdline.error("--port goes with --demo (otherwise [mdserver] port sets it)")
    if args.demo:
        path = demo.write_demo(args.demo, demo.DEMO_PORT if args.port is None else args.port)
    else:
        path = args.config
    try:
        cfg = configmod.load(path)
        read_vendor_data(cfg.mdserver.vendor_data)  # a bad file stops start-up here
    except ConfigError as e:
        print(f"mdserver: {e}", file=sys.stderr)
        return EXIT_CONFIG
    logs.setup(cfg.mdserver.loglevel, cfg.mdserver.logfile, cfg.mdserver.log_format)
    for warning in cfg.warnings:
        log.warning("%s", warning)
    from mdserver import server, web
    from mdserver.seeds import SeedImages
    try:
        store, claim = take_ownership(cfg)
    except (MdserverError, OSError) as e:
        log.error("%s", e)
        return 1
    metrics_dir = metrics.directory_for(cfg.mdserver.admin_socket)
    try:
        # Ours now that the admin socket is: every process of this daemon
        # counts in its own file there (the workers too, which inherit this).
        metrics.prepare_directory(metrics_dir)
        metrics.use_directory(metrics_dir)
        counts = metrics.HostMetrics()
        if hasattr(store, "on_watch_lag"):  # etcd's watch
            setattr(store, "on_watch_lag", counts.watch_lagged)
        # Seeds and the registration check see what guests will: the same
        # views, with each instance's random seed fixed (seed images are
        # rewritten only when their content changes).
        views = build_views(cfg, derived_seed(load_or_create_key(cfg.mdserver.token_key_file)))
        host = store.host
        registry = Registry(cfg, store, [DnsmasqFiles(cfg, host=host, metrics=counts),
                                         SeedImages(cfg.seeds.dir, views, host=host,
                                                    metrics=counts)],
                            check=template_problem(views), metrics=counts)
        registry.sync()
        if args.demo:
            demo.register_demo(store)
        enroll = metrics.EnrollReports()
        scrape = metrics.Exposition(metrics_dir, metrics.Sources(
            store, enroll, cfg.mdserver.workers or server.default_workers()))
        return server.run(cfg, web.admin_app(registry, scrape, enroll), guest_builder(cfg),
                          on_listening=demo.print_hints if args.demo else None, claim=claim,
                          scrape=scrape)
    except (MdserverError, OSError) as e:
        log.error("%s", e)
        return 1
    finally:
        store.close()
        metrics.remove_directory(metrics_dir)
        claim.release()  # last: the socket file is gone by now (server.run removed it)
