"""The wiring the daemon and mdserverctl share: views, the metadata service, the guest app."""

from functools import partial
from typing import Callable, NamedTuple, Optional

from mdserver import adminclient
from mdserver import config as configmod
from mdserver.errors import ConfigError, TemplateError
from mdserver.fastpath import FastPath
from mdserver.looptick import LoopTick
from mdserver.metrics import WorkerMetrics, directory_for, use_directory
from mdserver.models import Instance
from mdserver.neighbours import IdentityCheck, kernel_identity_check
from mdserver.service import MetadataService, Views, fresh_seed
from mdserver.store import Store
from mdserver.storeapi import InstanceStore
from mdserver.stores import open_replica
from mdserver.tokens import TokenSigner, load_or_create_key
from mdserver.userdata import Templates, check_cloud_config

# Exit status of both commands for a configuration error.
EXIT_CONFIG = 2


def build_views(cfg: configmod.Config, seed: Callable[[Instance], bytes] = fresh_seed) -> Views:
    md = cfg.mdserver
    templates = Templates(md.userdata_dir, md.userdata_suffixes, md.default_template)
    return Views(cfg, templates, read_vendor_data(md.vendor_data), seed)


def build_service(cfg: configmod.Config, store: InstanceStore,
                  signer: Optional[TokenSigner] = None,
                  identity: Optional[IdentityCheck] = None) -> MetadataService:
    signer = signer or TokenSigner(load_or_create_key(cfg.mdserver.token_key_file))
    return MetadataService(cfg, store, signer, build_views(cfg), identity)


class GuestApp(NamedTuple):
    """What a server worker runs: the guest-facing WSGI app, its replica's
    catch-up (before each request), and the fast path for hot GETs (None
    with the access log on: the app writes those lines), the turn of
    the worker's event loop the identity check is made once in, and the
    worker's counts (None: not counted)."""
    app: Callable
    catch_up: Callable[[], None]
    fast: Optional[FastPath]
    tick: LoopTick
    metrics: Optional[WorkerMetrics] = None


def guest_builder(cfg: configmod.Config) -> Callable[[configmod.Config], GuestApp]:
    """build_guest_app with the store's replica opened now, in the main
    process, before granian forks the workers: they share its pages (copy
    on write; the main process never touches it, and server freezes it out
    of the garbage collector's walks) instead of each reading its own, ~18
    MB per worker at 10,000 instances. Each worker then catches up on its
    own."""
    return partial(build_guest_app, replica=open_replica(cfg))


def build_guest_app(cfg: configmod.Config, replica: Optional[Store] = None) -> GuestApp:
    """In the server worker: a read-only replica of the store (its local
    file, or this host's etcd cache) and the guest-facing app; uploads go to
    the main process over the admin socket. Its counts go to its own file in
    the daemon's metrics directory (made by the main process, beside the
    admin socket)."""
    from mdserver import web
    md = cfg.mdserver
    use_directory(directory_for(md.admin_socket))
    counts = WorkerMetrics()
    replica = open_replica(cfg) if replica is None else replica
    tick = LoopTick()
    identity = kernel_identity_check(cfg.dnsmasq.network, tick) if md.check_mac else None
    service = build_service(cfg, replica, identity=identity)
    app = web.metadata_app(
        service, access_log=md.access_log, events=counts.event,
        upload=partial(adminclient.request, md.admin_socket, "POST", "/instance-upload"),
        host_addresses={"127.0.0.1", "::1", md.listen_address},
        password=lambda uuid, blob: adminclient.request(
            md.admin_socket, "POST", f"/instances/{uuid}/password", blob))
    return GuestApp(app, replica.catch_up,
                    None if md.access_log else FastPath(service), tick, counts)


def read_vendor_data(path: Optional[str]) -> Optional[str]:
    """[mdserver] vendor_data, read once at start-up and checked as user-data is."""
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(path, "mdserver", "vendor_data", f"cannot read: {e}") from None
    try:
        check_cloud_config(text, path)
    except TemplateError as e:
        raise ConfigError(path, "mdserver", "vendor_data", str(e)) from None
    return text


def template_problem(views: Views) -> Callable[[Instance], Optional[str]]:
    def check(inst: Instance) -> Optional[str]:
        try:
            views.userdata(inst)
        except TemplateError as e:
            return str(e)
        return None
    return check
