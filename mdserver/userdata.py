"""User-data: which template an instance gets, its context, and checked rendering."""

import logging
import os
import re
import threading
from typing import Dict, List, Mapping, Optional, Tuple

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

class Templates:
    """Finds and renders templates; each file is compiled once and again
    only when it changes on disk."""

    def __init__(self, userdata_dir: str, suffixes: Tuple[str, ...],
                 default_template: Optional[str]):
        self.userdata_dir = userdata_dir
        self.suffixes = suffixes
        self.default_template = default_template
        self._compiled: Dict[str, Tuple[tuple, SimpleTemplate]] = {}
        self._builtin = SimpleTemplate(BUILTIN_TEMPLATE)
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

    def choose(self, inst: Instance) -> Tuple[str, SimpleTemplate]:
        """The first template that exists for `inst`: (path or BUILTIN_NAME, template)."""
        # Templates someone asked for by name: a missing one is worth a warning.
        named = {self.default_template}
        if inst.settings.template:
            named.add(os.path.join(self.userdata_dir, inst.settings.template))
        for path in self.candidates(inst):
            template = self._load(path)
            if template is not None:
                return path, template
            if path in named:
                log.warning("instance %s: template %s does not exist; trying the next",
                            inst.name, path)
        return BUILTIN_NAME, self._builtin

    def _load(self, path: str) -> Optional[SimpleTemplate]:
        try:
            st = os.stat(path)
        except OSError:
            return None
        if not os.path.isfile(path):
            return None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._compiled.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            with open(path, encoding="utf-8") as f:
                source = f.read()
            template = SimpleTemplate(source, name=path)
            template.co  # compile now, so a syntax error is reported here
        except (OSError, UnicodeDecodeError, SyntaxError) as e:
            raise TemplateError(f"{path}: {e}") from None
        with self._lock:
            self._compiled[path] = (stamp, template)
        return template

    def render(self, inst: Instance, context: Mapping[str, object]) -> Tuple[str, str]:
        """(template path, checked text) for `inst`, or TemplateError."""
        path, template = self.choose(inst)
        try:
            # One mapping, not keywords: a name from `meta` may be `self`,
            # render()'s own parameter (TypeError: multiple values).
            text = template.render(context)
        except Exception as e:  # a template is code: any error is the template's
            raise TemplateError(f"{path}: {type(e).__name__}: {e}") from None
        check_cloud_config(text, path)
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
