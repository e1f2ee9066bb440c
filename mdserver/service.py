"""The use cases: who is asking, the views of instances, each face's answers, tokens."""

import logging
import os
import threading
from typing import Callable, Dict, Optional, Tuple

from mdserver import userdata
from mdserver.config import Config
from mdserver.errors import ForeignSender, Forbidden, NotFound, Unauthorized, UnknownGuest
from mdserver.faces import Reply
from mdserver.faces.ec2 import LATEST
from mdserver.models import Instance
from mdserver.neighbours import IdentityCheck
from mdserver.storeapi import InstanceStore
from mdserver.tokens import TokenSigner, parse_ttl
from mdserver.view import SEED_BYTES, InstanceView, Site, make_view

log = logging.getLogger(__name__)

# Replies cached per (face, instance): a full crawl of any face asks far fewer.
MAX_CACHED_PATHS = 128


def fresh_seed(inst: Instance) -> bytes:
    return os.urandom(SEED_BYTES)


class Views:
    """Builds InstanceViews: the site's facts, the instance's, its user-data renderer."""

    def __init__(self, cfg: Config, templates: userdata.Templates,
                 vendor_data: Optional[str] = None,
                 seed: Callable[[Instance], bytes] = fresh_seed):
        self.cfg = cfg
        self.templates = templates
        self.site = Site.from_config(cfg, vendor_data)
        self.seed = seed

    def userdata(self, inst: Instance) -> Tuple[str, str]:
        """(template used, rendered user-data) for `inst`, or TemplateError."""
        return self.templates.render(inst, lambda: userdata.context(inst, self.site, self.cfg))

    def __call__(self, inst: Instance) -> InstanceView:
        return make_view(inst, self.site, inst.settings.password or self.cfg.mdserver.password,
                         self.seed(inst), lambda: self.userdata(inst)[1])


class MetadataService:
    """Answers guests. Everything it needs is passed in."""

    def __init__(self, cfg: Config, store: InstanceStore, signer: TokenSigner, views: Views,
                 identity: Optional[IdentityCheck] = None):
        self.store = store
        # None: every sender is taken to be who its address says (tests, demo).
        self.identity = identity
        self.signer = signer
        self.views = views
        self.tokens_required = cfg.mdserver.imds_tokens == "required"
        # Records are immutable and replaced on change, so the identity of
        # the record a cache entry was built from tells whether it is current.
        self._views: Dict[str, Tuple[Instance, InstanceView]] = {}
        # (face, uuid) -> (record, {path: reply})
        self._replies: Dict[Tuple[str, str], Tuple[Instance, Dict[str, Reply]]] = {}
        self._lock = threading.Lock()

    # -- identity and tokens -------------------------------------------------

    def guest(self, ip: str) -> Instance:
        inst = self.store.by_ip(ip)
        # A replica may lag the writer by a signal's delivery: before saying
        # "unknown", catch up (cheap: one stat when nothing changed).
        if inst is None:
            self.store.refresh()  # (another thread may have just done it: look again anyway)
            inst = self.store.by_ip(ip)
        if inst is None:
            raise UnknownGuest(f"no instance has address {ip}")
        self._verify(ip, inst)
        return inst

    def _verify(self, ip: str, inst: Instance) -> None:
        if self.identity is not None and not self.identity.matches(ip, inst.mac):
            raise ForeignSender(f"{ip} is not the interface of the instance that holds it")

    def issue_token(self, ip: str, version: str, ttl_header: Optional[str],
                    forwarded: bool) -> Tuple[str, int]:
        """A token for `ip` (AWS rules: only /latest, never through a proxy)."""
        if version != LATEST:
            raise Forbidden("tokens are issued only at /latest/api/token")
        if forwarded:
            raise Forbidden("token requests through a proxy are refused")
        inst = self.store.by_ip(ip)
        if inst is not None:
            self._verify(ip, inst)
        ttl = parse_ttl(ttl_header)
        return self.signer.issue(ip, ttl), ttl

    def check_token(self, ip: str, token: Optional[str]) -> Optional[int]:
        """Seconds left on the request's token (None if it sent none and
        tokens are optional); Unauthorized otherwise."""
        if token is None:
            if self.tokens_required:
                raise Unauthorized("an IMDSv2 token is required")
            return None
        return self.signer.remaining(token, ip)

    # -- content -------------------------------------------------------------

    def view(self, inst: Instance) -> InstanceView:
        cached = self._views.get(inst.uuid)
        if cached is not None and cached[0] is inst:
            return cached[1]
        view = self.views(inst)
        with self._lock:
            self._views[inst.uuid] = (inst, view)
            if len(self._views) > 2 * len(self.store) + 64:
                self._views = {u: v for u, v in self._views.items()
                               if self.store.by_uuid(u) is v[0]}
                self._replies = {k: v for k, v in self._replies.items()
                                 if self.store.by_uuid(k[1]) is v[0]}
        return view

    def answer(self, face, ip: str, path: str) -> Reply:
        """`face`'s reply to GET <face root>/<path> from guest `ip`; NotFound otherwise."""
        inst = self.guest(ip)
        key = (face.NAME, inst.uuid)
        cached = self._replies.get(key)
        if cached is not None and cached[0] is inst:
            reply = cached[1].get(path)
            if reply is not None:
                return reply
        reply = face.lookup(self.view(inst), path)
        if reply is None:
            raise NotFound(f"no such path {path!r}")
        if reply.cacheable:
            with self._lock:
                cached = self._replies.get(key)
                if cached is None or cached[0] is not inst:
                    cached = self._replies[key] = (inst, {})
                # Keyed by the path as asked, and a face serves one file under
                # many spellings (extra slashes, letter case): bounded, so a
                # guest cannot grow this at will.
                if len(cached[1]) < MAX_CACHED_PATHS:
                    cached[1][path] = reply
        return reply
