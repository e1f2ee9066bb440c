#!/usr/bin/env python3
"""The cloud-init versions the real-client tests run: their code, and how to run it.

* "22.4": Debian 12's cloud-init package (22.4.2), installed in the system
  Python by scripts/run-tests.sh; nothing to add to PYTHONPATH.
* "25.1": Debian 13 (trixie)'s cloud-init 25.1.x .deb. It is downloaded
  from the Debian archive this machine's apt already uses (the mirror URL is
  read from apt at run time, `apt-get indextargets`; no host name is written
  here), through a PRIVATE apt configuration: its own sources list (that
  mirror, suite trixie, main), its own lists, cache and (empty) dpkg status
  under CACHE/apt/. The host's apt.conf.d (a proxy, say) still applies and
  its sources are read for the mirror URL and keyring only; the host's apt
  state and installed packages are never changed. The newest 25.1.x that `apt-cache madison` lists there
  is fetched with `apt-get download` (apt checks its signature and hash),
  unpacked with `dpkg-deb -x` into CACHE/cloud-init-<version>/ and marked
  complete; the private apt state is then deleted. A later run finds the
  tree there and costs nothing (no apt call at all). Its
  usr/lib/python3/dist-packages goes first on PYTHONPATH for
  /usr/bin/python3 (Debian 12's Python 3.11); its dependencies (yaml,
  jinja2, jsonschema, jsonpatch, requests, configobj, oauthlib) are Debian
  12's python3-* packages that cloud-init 22.4 pulled in; check() imports
  every module the tests use with them.

CACHE is $MDSERVER_CLOUDINIT_CACHE, else ~/.cache/mdserver-cloudinit.
Both versions are the top-level package `cloudinit`, so each runs in its own
subprocess: `env_for(version)` gives the environment for it.

From the command line::

    python3 tests/cloudinit_versions.py            # fetch if needed, check both
    python3 tests/cloudinit_versions.py --refresh  # fetch 25.1 again
"""

import argparse
import fcntl
import glob
import json
import os
import shutil
import subprocess
import sys
import time

# The guest image builder already reads this machine's apt sources.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "guest"))
from build_image import host_source_entries  # noqa: E402

SYSTEM_PYTHON = "/usr/bin/python3"
VERSIONS = ("22.4", "25.1")
TRIXIE = "trixie"
PINNED = {"25.1": "25.1"}  # version -> Debian version prefix fetched from trixie
SITE_PACKAGES = "usr/lib/python3/dist-packages"


class Unavailable(Exception):
    """This cloud-init version can't be had here (the reason is the message)."""


def cache_dir():
    return os.environ.get("MDSERVER_CLOUDINIT_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "mdserver-cloudinit")


def _run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


# --------------------------------------------------------------------------
# the Debian archive this machine's apt uses

def host_debian_archive():
    """(mirror URI, signed-by) of the host's Debian main archive, from apt itself.

    `apt-get indextargets` lists what apt reads, whatever the format of the
    sources files; we take the entry whose Release file says Origin Debian,
    Label Debian, component main (not -security: trixie's packages are in the
    main archive).
    """
    r = _run(["apt-get", "indextargets", "--format",
              "$(REPO_URI)\t$(ORIGIN)\t$(LABEL)\t$(RELEASE)\t$(COMPONENT)\t$(TARGET_OF)"])
    if r.returncode != 0:
        raise Unavailable("apt-get indextargets failed: " + r.stderr.strip())
    uri = None
    for line in r.stdout.splitlines():
        fields = line.split("\t")
        if len(fields) != 6:
            continue
        repo, origin, label, release, component, target_of = fields
        if (origin, label, component, target_of) == ("Debian", "Debian", "main", "deb") \
                and "security" not in release and not repo.rstrip("/").endswith("-security"):
            uri = repo
            break
    if uri is None:
        raise Unavailable("no Debian main archive in this machine's apt sources "
                          "(run apt-get update once?)")
    return uri, _signed_by(uri)


def _signed_by(uri):
    """The Signed-By of the host's entry for `uri` (a keyring path), if any."""
    want = uri.rstrip("/")
    for entry in host_source_entries():
        if "deb" in entry["types"] and want in [u.rstrip("/") for u in entry["uris"]]:
            sb = entry["signed-by"]
            return sb if sb.startswith("/") else ""
    return ""


# --------------------------------------------------------------------------
# a private apt for trixie

class PrivateApt:
    """apt-get/apt-cache with their own sources, lists, cache and status."""

    def __init__(self, root, uri, signed_by):
        self.root = root
        for d in ("sources.list.d", "preferences.d", "state/lists/partial",
                  "cache/archives/partial", "debs"):
            os.makedirs(os.path.join(root, d), exist_ok=True)
        opts = "[signed-by=%s] " % signed_by if signed_by else ""
        with open(os.path.join(root, "sources.list"), "w") as f:
            f.write("deb %s%s %s main\n" % (opts, uri, TRIXIE))
        status = os.path.join(root, "state", "status")
        if not os.path.exists(status):
            open(status, "w").close()
        arch = _run(["dpkg", "--print-architecture"]).stdout.strip() or "amd64"
        user = "root" if os.geteuid() == 0 else ""
        self.options = [
            "-o", "Dir::Etc::SourceList=" + os.path.join(root, "sources.list"),
            "-o", "Dir::Etc::SourceParts=" + os.path.join(root, "sources.list.d"),
            "-o", "Dir::Etc::Preferences=" + os.path.join(root, "preferences"),
            "-o", "Dir::Etc::PreferencesParts=" + os.path.join(root, "preferences.d"),
            "-o", "Dir::State=" + os.path.join(root, "state"),
            "-o", "Dir::State::status=" + status,
            "-o", "Dir::Cache=" + os.path.join(root, "cache"),
            "-o", "Dir::Cache::pkgcache=", "-o", "Dir::Cache::srcpkgcache=",
            "-o", "APT::Architecture=" + arch, "-o", "APT::Architectures=" + arch,
            "-o", "Acquire::Languages=none",
            "-o", "Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled=false",
        ]
        if user:
            # our cache under ~ is not reachable for the _apt sandbox user
            self.options += ["-o", "APT::Sandbox::User=" + user]

    def run(self, tool, *args, cwd=None):
        r = _run([tool, "-q"] + self.options + list(args), cwd=cwd,
                 env={**os.environ, "LC_ALL": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"})
        if r.returncode != 0:
            raise Unavailable("%s %s failed (%d): %s" % (
                tool, " ".join(args), r.returncode, (r.stderr or r.stdout).strip()[-1500:]))
        return r.stdout


def _version_key(v):
    """Debian version order for the few versions we compare (dpkg decides)."""
    import functools

    def cmp(a, b):
        if a == b:
            return 0
        lt = subprocess.run(["dpkg", "--compare-versions", a, "lt", b]).returncode == 0
        return -1 if lt else 1
    return functools.cmp_to_key(cmp)(v)


def _cached(version, root):
    """Unpacked, complete trees for `version` in root, newest first."""
    found = []
    for d in glob.glob(os.path.join(root, "cloud-init-%s*" % PINNED[version])):
        marker = os.path.join(d, ".complete")
        if os.path.isfile(marker):
            with open(marker) as f:
                found.append((json.load(f)["version"], d))
    found.sort(key=lambda vd: _version_key(vd[0]), reverse=True)
    return found


def fetch(version="25.1", cache=None, refresh=False, log=None):
    """Make sure cloud-init `version` (from trixie) is unpacked in the cache.

    Returns {"version": debian version, "root": unpacked tree, "cached": bool,
    "seconds": float}. Raises Unavailable with the reason.
    """
    log = log or (lambda msg: print("cloudinit_versions: " + msg, file=sys.stderr))
    root = cache or cache_dir()
    os.makedirs(root, exist_ok=True)
    t0 = time.monotonic()
    with open(os.path.join(root, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one fetch at a time
        have = _cached(version, root)
        if have and not refresh:
            return {"version": have[0][0], "root": have[0][1], "cached": True,
                    "seconds": time.monotonic() - t0}
        for tool in ("apt-get", "apt-cache", "dpkg-deb"):
            if shutil.which(tool) is None:
                raise Unavailable("needs %s" % tool)
        uri, signed_by = host_debian_archive()
        apt = PrivateApt(os.path.join(root, "apt"), uri, signed_by)
        log("apt-get update (private, %s %s main)" % (uri, TRIXIE))
        apt.run("apt-get", "update")
        out = apt.run("apt-cache", "madison", "cloud-init")
        candidates = []
        for line in out.splitlines():
            parts = [p.strip() for p in line.split("|")]
            if len(parts) >= 3 and parts[0] == "cloud-init" \
                    and parts[1].startswith(PINNED[version] + "."):
                candidates.append(parts[1])
        if not candidates:
            raise Unavailable("%s has no cloud-init %s.* (madison: %s)" % (
                TRIXIE, PINNED[version], out.strip()))
        deb_version = sorted(set(candidates), key=_version_key)[-1]
        target = os.path.join(root, "cloud-init-" + deb_version)
        if os.path.isfile(os.path.join(target, ".complete")) and not refresh:
            return {"version": deb_version, "root": target, "cached": True,
                    "seconds": time.monotonic() - t0}
        debs = os.path.join(apt.root, "debs")
        for old in glob.glob(os.path.join(debs, "*.deb")):
            os.unlink(old)
        log("apt-get download cloud-init=%s" % deb_version)
        apt.run("apt-get", "download", "cloud-init=" + deb_version, cwd=debs)
        got = glob.glob(os.path.join(debs, "cloud-init_*.deb"))
        if len(got) != 1:
            raise Unavailable("apt-get download left %r" % got)
        tmp = target + ".tmp-%d" % os.getpid()
        shutil.rmtree(tmp, ignore_errors=True)
        r = _run(["dpkg-deb", "-x", got[0], tmp])
        if r.returncode != 0:
            raise Unavailable("dpkg-deb -x failed: " + r.stderr.strip())
        shutil.rmtree(target, ignore_errors=True)
        os.rename(tmp, target)
        fields = _run(["dpkg-deb", "-f", got[0], "Version", "Depends"]).stdout
        with open(os.path.join(target, ".complete"), "w") as f:
            json.dump({"version": deb_version, "deb": os.path.basename(got[0]),
                       "control": fields, "fetched": time.time()}, f)
        shutil.rmtree(apt.root, ignore_errors=True)  # the unpacked tree is all we keep
        return {"version": deb_version, "root": target, "cached": False,
                "seconds": time.monotonic() - t0}


# --------------------------------------------------------------------------
# running a version

def pythonpath(version, fetch_missing=True):
    """What goes first on PYTHONPATH for `version` ("" for the system's)."""
    if version == "22.4":
        return ""
    if version not in PINNED:
        raise ValueError("unknown cloud-init version %r" % version)
    have = _cached(version, cache_dir())
    if have:
        tree = have[0][1]
    elif fetch_missing:
        tree = fetch(version)["root"]
    else:
        raise Unavailable("cloud-init %s is not fetched yet" % version)
    return os.path.join(tree, SITE_PACKAGES)


def env_for(version, base=None, fetch_missing=True):
    """An environment for SYSTEM_PYTHON that imports cloud-init `version`."""
    env = dict(os.environ if base is None else base)
    env.pop("PYTHONPATH", None)  # the test runner's (a venv's) never leaks in
    env.pop("PYTHONHOME", None)
    path = pythonpath(version, fetch_missing)
    if path:
        env["PYTHONPATH"] = path
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # keep the cached tree as unpacked
    from hermetic import hermetic_env  # the session's connect check, if on
    return hermetic_env(env)


_CHECK = r"""
import json, sys
import cloudinit, cloudinit.version
from cloudinit.sources import (DataSourceOpenStack, DataSourceNoCloud,
                               DataSourceConfigDrive, DataSourceEc2)
from cloudinit.net import network_state, netplan, eni
from cloudinit.sources.helpers import openstack
print(json.dumps({"version": cloudinit.version.version_string(),
                  "file": cloudinit.__file__,
                  "python": sys.version.split()[0]}))
"""


def check(version):
    """{"version", "file", "python"} of `version` as SYSTEM_PYTHON imports it.

    Raises Unavailable (with the ImportError) if it doesn't import.
    """
    if not os.path.exists(SYSTEM_PYTHON):
        raise Unavailable("needs %s" % SYSTEM_PYTHON)
    r = _run([SYSTEM_PYTHON, "-c", _CHECK], env=env_for(version))
    if r.returncode != 0:
        raise Unavailable("cloud-init %s does not import in %s: %s" % (
            version, SYSTEM_PYTHON, r.stderr.strip()[-1500:]))
    info = json.loads(r.stdout)
    if not info["version"].startswith(version + "."):
        raise Unavailable("asked for cloud-init %s, %s imports %s from %s" % (
            version, SYSTEM_PYTHON, info["version"], info["file"]))
    return info


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--refresh", action="store_true", help="fetch 25.1 again")
    args = p.parse_args(argv)
    for v in PINNED:
        print(json.dumps({v: fetch(v, refresh=args.refresh)}))
    for v in VERSIONS:
        print(json.dumps({v: check(v)}))


if __name__ == "__main__":
    main()
