"""The use cases: who is asking, their metadata, their user-data, their tokens."""

import logging
import threading
from typing import Dict, Optional, Tuple

from mdserver import metadata, userdata
from mdserver.config import Config
from mdserver.errors import Forbidden, NotFound, Unauthorized, UnknownGuest
from mdserver.metadata import KNOWN_VERSIONS, LATEST, Site
from mdserver.models import Instance
from mdserver.store import Store
from mdserver.tokens import TokenSigner, parse_ttl

log = logging.getLogger(__name__)


class MetadataService:
    """Answers guests. Everything it needs is passed in."""

    def __init__(self, cfg: Config, store: Store, signer: TokenSigner,
                 templates: userdata.Templates):
        self.cfg = cfg
        self.store = store
        self.signer = signer
        self.templates = templates
        self.site = Site.from_config(cfg)
        self.tokens_required = cfg.mdserver.imds_tokens == "required"
        # uuid -> (the Instance object it was built from, flattened tree).
        # Records are immutable and replaced on change, so identity tells
        # whether a cached tree is current.
        self._trees: Dict[str, Tuple[Instance, Dict[str, str]]] = {}
        self._trees_lock = threading.Lock()

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
        return inst

    def issue_token(self, ip: str, version: str, ttl_header: Optional[str],
                    forwarded: bool) -> Tuple[str, int]:
        """A token for `ip` (AWS rules: only /latest, never through a proxy)."""
        if version != LATEST:
            raise Forbidden("tokens are issued only at /latest/api/token")
        if forwarded:
            raise Forbidden("token requests through a proxy are refused")
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

    def tree(self, inst: Instance) -> Dict[str, str]:
        cached = self._trees.get(inst.uuid)
        if cached is not None and cached[0] is inst:
            return cached[1]
        flat = metadata.flatten(metadata.build_tree(inst, self.site))
        with self._trees_lock:
            self._trees[inst.uuid] = (inst, flat)
            if len(self._trees) > 2 * len(self.store) + 64:
                self._trees = {u: v for u, v in self._trees.items()
                               if self.store.by_uuid(u) is v[0]}
        return flat

    def lookup(self, ip: str, version: str, path: str) -> str:
        """The body for GET /<version>/<path> from guest `ip`; NotFound otherwise."""
        if version not in KNOWN_VERSIONS:
            raise NotFound(f"unknown version {version!r}")
        inst = self.guest(ip)
        body = self.tree(inst).get(path.strip("/"))
        if body is None:
            raise NotFound(f"no such path {path!r}")
        return body

    def userdata(self, inst: Instance) -> Tuple[str, str]:
        """(template used, rendered user-data) for `inst`, or TemplateError."""
        ctx = userdata.context(inst, self.site, self.cfg)
        return self.templates.render(inst, ctx)

    def guest_userdata(self, ip: str, version: str) -> str:
        if version not in KNOWN_VERSIONS:
            raise NotFound(f"unknown version {version!r}")
        return self.userdata(self.guest(ip))[1]

