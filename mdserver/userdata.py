"""User-data: which template an instance gets, its context, and checked rendering."""

import logging
import os
import re
import stat
import threading
import time
from typing import Callable, Dict, FrozenSet, List, Mapping, Optional, Tuple, Union

import yaml
from bottle import SimpleTemplate

from mdserver.config import Config
from mdserver.errors import TemplateError
from mdserver.fsutil import safe_name
from mdserver.view import Site, all_keys, local_hostname
from mdserver.models import Instance

log = logging.getLogger(__name__)

BUILTIN_NAME = "<built-in>"
# What the original mdserver did: hostname, keys for the default user and,
# when a password is configured, that password with SSH password login.
BUILTIN_TEMPLATE = """\
% from json import dumps as q
#cloud-config
preserve_hostname: false
hostname: {{!q(hostname)}}
fqdn: {{!q(fqdn)}}
manage_etc_hosts: true
% if public_key_list:
ssh_authorized_keys:
% for key in public_key_list:
  - {{!q(key)}}
% end
% end
% if defined('mdserver_password'):
password: {{!q(mdserver_password)}}
chpasswd:
  expire: false
ssh_pwauth: true
% end
"""

# Rendered user-data kept per instance (a boot storm's worth; each is a few KB).
MAX_RENDERED = 1024
# A directory changed this recently may change again within its mtime's
# granularity unseen: its listing is not trusted until it is older.
RACY_SECONDS = 2.0
Stamp = Optional[Tuple[int, int, int]]  # (inode, mtime ns, size) of a template file


class Templates:
    """Finds and renders templates; each file is compiled once and again
    only when it changes on disk, and an instance's rendered text is kept
    until the instance's record or its template changes (the context is
    built from the record and the configuration, both unchanging)."""

    def __init__(self, userdata_dir: str, suffixes: Tuple[str, ...],
                 default_template: Optional[str], clock: Callable[[], float] = time.time):
        self.userdata_dir = userdata_dir
        self.suffixes = suffixes
        self.default_template = default_template
        self._clock = clock
        self._compiled: Dict[str, Tuple[Stamp, SimpleTemplate]] = {}
        self._builtin = SimpleTemplate(BUILTIN_TEMPLATE)
        # uuid -> (record, template path, its stamp, checked text)
        self._rendered: Dict[str, Tuple[Instance, str, Stamp, str]] = {}
        # (directory's stamp, names in it): most candidates do not exist, and
        # a stat that fails costs an exception; one stat of the directory
        # tells whether the listing is still current.
        self._listing: Tuple[Stamp, FrozenSet[str]] = (None, frozenset())
        self._lock = threading.Lock()

    def candidates(self, inst: Instance) -> List[str]:
        """Paths to try, in order; names that are not safe are skipped."""
        out: List[str] = []
        wanted = inst.settings.template
        if wanted:
            if safe_name(wanted):
                out.append(os.path.join(self.userdata_dir, wanted))
            else:
                log.warning("instance %s: template name %r is not a plain file name; ignored",
                            inst.name, wanted)
        for base in (inst.name, inst.mac):
            if safe_name(base):
                out += [os.path.join(self.userdata_dir, base + s) for s in ("",) + self.suffixes]
        if self.default_template:
            out.append(self.default_template)
        return out

    def choose(self, inst: Instance) -> Tuple[str, Stamp, SimpleTemplate]:
        """The first template that exists for `inst`: (path or BUILTIN_NAME, its stamp, template)."""
        # Templates someone asked for by name: a missing one is worth a warning.
        named = {self.default_template}
        if inst.settings.template:
            named.add(os.path.join(self.userdata_dir, inst.settings.template))
        listed = self._names()
        for path in self.candidates(inst):
            found = None
            if listed is None or os.path.dirname(path) != self.userdata_dir \
                    or os.path.basename(path) in listed:
                found = self._load(path)
            if found is not None:
                return (path,) + found
            if path in named:
                log.warning("instance %s: template %s does not exist; trying the next",
                            inst.name, path)
        return BUILTIN_NAME, None, self._builtin

    def _names(self) -> Optional[FrozenSet[str]]:
        """The names in userdata_dir, or None when they cannot be trusted (stat every candidate)."""
        try:
            st = os.stat(self.userdata_dir)
        except OSError:
            return None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        listing = self._listing
        if listing[0] == stamp:
            return listing[1]
        try:
            names = frozenset(os.listdir(self.userdata_dir))
        except OSError:
            return None
        if self._clock() - st.st_mtime < RACY_SECONDS:
            return names  # current now, but not to be kept
        self._listing = (stamp, names)
        return names

    def _load(self, path: str) -> Optional[Tuple[Stamp, SimpleTemplate]]:
        try:
            st = os.stat(path)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._compiled.get(path)
        if cached is not None and cached[0] == stamp:
            return cached
        try:
            with open(path, encoding="utf-8") as f:
                source = f.read()
            template = SimpleTemplate(source, name=path)
            template.co  # compile now, so a syntax error is reported here
        except (OSError, UnicodeDecodeError, SyntaxError) as e:
            raise TemplateError(f"{path}: {e}") from None
        with self._lock:
            self._compiled[path] = (stamp, template)
        return stamp, template

    def render(self, inst: Instance,
               context: Union[Mapping[str, object], Callable[[], Mapping[str, object]]]) \
            -> Tuple[str, str]:
        """(template path, checked text) for `inst`, or TemplateError.
        `context`: the names the template sees, or a function that builds
        them (called only when the text is not kept from before)."""
        path, stamp, template = self.choose(inst)
        kept = self._rendered.get(inst.uuid)
        if kept is not None and kept[0] is inst and kept[1] == path and kept[2] == stamp:
            return path, kept[3]
        names = context() if callable(context) else context
        try:
            # One mapping, not keywords: a name from `meta` may be `self`,
            # render()'s own parameter (TypeError: multiple values).
            text = template.render(names)
        except Exception as e:  # a template is code: any error is the template's
            raise TemplateError(f"{path}: {type(e).__name__}: {e}") from None
        check_cloud_config(text, path)
        with self._lock:
            if len(self._rendered) >= MAX_RENDERED:  # the oldest goes
                del self._rendered[next(iter(self._rendered))]
            self._rendered[inst.uuid] = (inst, path, stamp, text)
        return path, text


def check_cloud_config(text: str, path: str) -> None:
    """A #cloud-config that is not a YAML mapping would be silently ignored by
    cloud-init: refuse it, naming the line."""
    if not text.startswith("#cloud-config"):
        return
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = _unquoted(getattr(e, "problem", None) or str(e))
        raise TemplateError(f"{path}: rendered #cloud-config is not valid YAML at"
                            f"{where}: {problem}") from None
    if data is not None and not isinstance(data, dict):
        raise TemplateError(f"{path}: rendered #cloud-config is not a YAML mapping")


# PyYAML quotes what it stumbled on; an alias, anchor or tag is a piece of the
# user-data (say a password after `*` or `!`), which must not reach the log.
# Kept: single characters (',' or '\t') and its own token names ('<stream end>').
_QUOTED = re.compile(r"'([^']*)'|\"([^\"]*)\"")
_HARMLESS = re.compile(r"\\?.?|<[a-z ]+>")


def _unquoted(problem: str) -> str:
    def redact(m: "re.Match[str]") -> str:
        inner = m.group(1) if m.group(1) is not None else m.group(2)
        return m.group(0) if _HARMLESS.fullmatch(inner) else "'...'"
    return _QUOTED.sub(redact, problem)


def context(inst: Instance, site: Site, cfg: Config) -> Dict[str, object]:
    """The explicit, minimal set of names a template sees."""
    keys = all_keys(inst, site)
    ctx: Dict[str, object] = dict(cfg.template_data)
    ctx.update({f"public_key_{name}": key for name, key in keys})
    ctx.update(
        public_keys=dict(keys),
        public_key_list=[key for _, key in keys],
        hostname=inst.hostname,
        fqdn=local_hostname(inst, site),
        name=inst.name,
        uuid=inst.uuid,
        mac=inst.mac,
        ip=inst.ipv4,
        instance_id=inst.instance_id,
        meta=dict(inst.settings.meta),
    )
    # Per-instance values also by their own name, where that is a name
    # (registration refused those that shadow the names above), but not a
    # dunder: `__builtins__` among a template's globals breaks every template,
    # the built-in one too (SystemError). Such values stay in `meta`.
    ctx.update((k, v) for k, v in inst.settings.meta
               if k.isidentifier() and not (k.startswith("__") and k.endswith("__")))
    password = inst.settings.password or cfg.mdserver.password
    if password:
        ctx["mdserver_password"] = password
    return ctx
