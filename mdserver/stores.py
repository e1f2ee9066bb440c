"""Opens the configured instance store ([store] backend): the writer's and the worker's replica."""

import os

from mdserver.config import Config
from mdserver.store import Store
from mdserver.storeapi import InstanceStore

CACHE_NAME = "etcd-cache.json"


def cache_path(cfg: Config) -> str:
    """Where an etcd-backed host keeps its copy of the registry (beside db_file,
    never db_file itself: that stays the local database `store migrate` reads)."""
    return os.path.join(os.path.dirname(cfg.mdserver.db_file), CACHE_NAME)


def replica_path(cfg: Config) -> str:
    """The file the guest-facing worker follows: the local database, or the etcd cache."""
    return cfg.mdserver.db_file if cfg.store.backend == "local" else cache_path(cfg)


def open_store(cfg: Config) -> InstanceStore:
    """The main process's store (the writer). An etcd store is started: it
    answers from its cache at once, and refuses (StoreLocked) when another
    daemon serves the same [store] host."""
    st = cfg.store
    if st.backend == "local":
        return Store(cfg.mdserver.db_file, freed_retention=cfg.dnsmasq.lease_len, host=st.host)
    from mdserver.etcdstore import EtcdStore
    cache = Store(cache_path(cfg), freed_retention=cfg.dnsmasq.lease_len, host=st.host)
    store = EtcdStore(st, cache)
    try:
        store.start()
    except BaseException:
        store.close()
        raise
    return store


def open_replica(cfg: Config) -> Store:
    """A read-only copy that follows the writer (refresh() on its signal)."""
    return Store(replica_path(cfg), writable=False, host=cfg.store.host)
