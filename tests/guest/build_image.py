#!/usr/bin/env python3
"""Build (and cache) a bootable Debian 12 (bookworm, amd64) guest image.

The image is used by the guest boot test: qemu boots it with -kernel/-initrd
and the stock cloud-init inside it must find our EC2-compatible metadata
service by itself (ds-identify, from the SMBIOS uuid/serial starting "ec2").

Usage::

    python3 tests/guest/build_image.py [--cache-dir DIR] [--force]

or, from Python::

    from build_image import build_image
    paths = build_image(cache_dir=None)
    # {'kernel': ..., 'initrd': ..., 'rootfs': ..., 'key': ..., 'dir': ...,
    #  'seconds': float, 'cached': bool}

Everything comes from Debian's package archive, read from this machine's apt
sources at run time (no host name is written in this repository), through the
host's apt proxy if one is configured.  Building needs root (mmdebstrap in
"root" mode, mkfs.ext4 -d keeping ownership); a cached image does not.

The result lives in CACHE_DIR/<key>/ where <key> is derived from the sha256
of this file and the package list: editing this script rebuilds the image.
A build happens in CACHE_DIR/.tmp-<key>-<pid>/ and is renamed into place only
when complete, so an interrupted build never counts as cached.
"""

import argparse
import fcntl
import glob
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

SUITE = "bookworm"
ARCH = "amd64"
SUITES = (SUITE, SUITE + "-updates", SUITE + "-security")

# What the guest needs.  mmdebstrap's "apt" variant gives the Essential set
# plus apt; everything else is listed here (recommends are not installed).
PACKAGES = (
    # boot
    "systemd-sysv",
    "udev",
    "dbus",
    "libpam-systemd",
    "linux-image-cloud-amd64",
    "initramfs-tools",
    "e2fsprogs",  # not in the "apt" variant: fsck.ext4 and cloud-init's resize2fs
    # the thing under test: stock cloud-init with the distribution's config
    "cloud-init",
    # network, as cloud-init's Debian renderer ("eni") writes it
    "ifupdown",
    "isc-dhcp-client",
    "iproute2",
    "netbase",
    # log in with the key the metadata service hands out
    "openssh-server",
    "sudo",
    "ca-certificates",
    # small conveniences for debugging a guest
    "procps",
    "less",
)

# The system locale.  Without one, cloud-init's locale module tries to make
# en_US.UTF-8 the default on the first boot, which fails on Debian (its
# locale-gen takes no argument) and costs time; C.UTF-8 is built into glibc.
LOCALE = "LANG=C.UTF-8\n"

IMAGE_MIN_BYTES = 2 * 1024 ** 3  # sparse, so the size costs nothing on disk
KEY_RE = re.compile(r"^[0-9a-f]{16}$")

# Units that would only slow a test boot down (network time, apt, scrubbing).
MASKED_UNITS = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "apt-daily.service",
    "apt-daily-upgrade.service",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
)

FSTAB = "# root is the whole virtio disk, no partition table\n" \
        "/dev/vda / ext4 errors=remount-ro 0 1\n"

HOSTS = """127.0.0.1\tlocalhost
::1\t\tlocalhost ip6-localhost ip6-loopback
ff02::1\t\tip6-allnodes
ff02::2\t\tip6-allrouters
"""

# sshd must not start without host keys.  cloud-init (ordered before ssh)
# creates fresh ones on the first boot; this only covers a boot where
# cloud-init was disabled, and is a no-op otherwise.
SSH_DROPIN = """[Service]
ExecStartPre=
ExecStartPre=/usr/bin/ssh-keygen -A
ExecStartPre=/usr/sbin/sshd -t
"""


def log(msg):
    print("build_image: " + msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# cache key and location

def cache_key():
    """sha256 over this script's content and the package list (16 hex)."""
    h = hashlib.sha256()
    with open(os.path.abspath(__file__), "rb") as f:
        h.update(f.read())
    h.update(b"\0" + "\n".join(PACKAGES).encode() + b"\0" + SUITE.encode()
             + b"\0" + ARCH.encode())
    return h.hexdigest()[:16]


def default_cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mdserver-guest")


def _result(d, key, seconds, cached):
    return {
        "kernel": os.path.join(d, "vmlinuz"),
        "initrd": os.path.join(d, "initrd.img"),
        "rootfs": os.path.join(d, "rootfs.raw"),
        "key": key,
        "dir": d,
        "seconds": seconds,
        "cached": cached,
    }


def _complete(d):
    return all(os.path.isfile(os.path.join(d, n)) for n in
               ("manifest.json", "vmlinuz", "initrd.img", "rootfs.raw"))


# --------------------------------------------------------------------------
# apt sources and proxy of this machine

def _read_oneline(text):
    """Entries of a one-line sources.list."""
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.match(r"^(deb|deb-src)\s+(?:\[([^\]]*)\]\s+)?(\S+)\s+(\S+)"
                     r"\s*(.*)$", line)
        if not m:
            continue
        opts = {}
        for opt in (m.group(2) or "").split():
            if "=" in opt:
                k, v = opt.split("=", 1)
                opts[k.lower()] = v
        out.append({
            "types": [m.group(1)],
            "uris": [m.group(3)],
            "suites": [m.group(4)],
            "components": m.group(5).split(),
            "signed-by": opts.get("signed-by", ""),
            "enabled": True,
        })
    return out


def _read_deb822(text):
    """Entries (stanzas) of a deb822 .sources file."""
    out = []
    for stanza in re.split(r"\n\s*\n", text):
        fields = {}
        cur = None
        for line in stanza.splitlines():
            if line.startswith("#"):
                continue
            if line[:1] in (" ", "\t") and cur is not None:
                fields[cur] += "\n" + line  # continuation (e.g. inline key)
                continue
            if ":" in line:
                k, v = line.split(":", 1)
                cur = k.strip().lower()
                fields[cur] = v.strip()
        if "uris" not in fields:
            continue
        out.append({
            "types": fields.get("types", "deb").split(),
            "uris": fields.get("uris", "").split(),
            "suites": fields.get("suites", "").split(),
            "components": fields.get("components", "").split(),
            "signed-by": fields.get("signed-by", ""),
            "enabled": fields.get("enabled", "yes").lower()
            not in ("no", "false", "0"),
        })
    return out


def host_source_entries(root="/"):
    """Every entry of the machine's apt sources (one-line and deb822 files)."""
    etc = os.path.join(root, "etc/apt")
    entries = []
    files = [os.path.join(etc, "sources.list")]
    files += sorted(glob.glob(os.path.join(etc, "sources.list.d", "*")))
    for path in files:
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        if path.endswith(".sources"):
            entries += _read_deb822(text)
        elif path.endswith(".list") or path.endswith("sources.list"):
            entries += _read_oneline(text)
    return entries


def host_sources(root="/"):
    """The machine's Debian bookworm apt sources, as a deb822 text.

    Reads /etc/apt/sources.list and /etc/apt/sources.list.d/*.list|*.sources
    (files disabled by renaming, e.g. *.disabled-*, are not read because of
    their suffix).  Keeps binary ("deb") entries for bookworm,
    bookworm-updates and bookworm-security with the "main" component, signed
    (if at all) by Debian's archive keyring.
    """
    etc = os.path.join(root, "etc/apt")
    entries = host_source_entries(root)
    by_uri = {}  # uri -> (suites, signed_by), keeping the order seen
    for e in entries:
        if not e["enabled"] or "deb" not in e["types"]:
            continue
        if "main" not in e["components"]:
            continue
        sb = e["signed-by"]
        if sb and "BEGIN PGP" not in sb and "debian-archive" not in sb:
            continue  # a third party's repository
        suites = [s for s in e["suites"] if s in SUITES]
        if not suites:
            continue
        for uri in e["uris"]:
            known = by_uri.setdefault(uri, ([], sb))
            for s in suites:
                if s not in known[0]:
                    known[0].append(s)
    if not by_uri:
        raise RuntimeError(
            "no Debian %s apt source found in %s/sources.list{,.d}: the image "
            "is built from the machine's configured Debian archive" %
            (SUITE, etc))
    have = {s for suites, _ in by_uri.values() for s in suites}
    if SUITE not in have:
        raise RuntimeError("the apt sources have no '%s' suite" % SUITE)
    stanzas = []
    for uri, (suites, sb) in by_uri.items():
        st = ["Types: deb", "URIs: " + uri, "Suites: " + " ".join(suites),
              "Components: main"]
        if sb:
            st.append("Signed-By: " + sb)
        stanzas.append("\n".join(st))
    return "\n\n".join(stanzas) + "\n"


def host_apt_proxy_options():
    """--aptopt values reproducing the host's apt proxy settings, if any."""
    try:
        out = subprocess.run(["apt-config", "dump"], check=True,
                             stdout=subprocess.PIPE,
                             universal_newlines=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    opts = []
    for line in out.splitlines():
        # e.g. Acquire::http::Proxy "http://proxy:3142";
        m = re.match(r'^(Acquire::[^\s]*proxy[^\s]*)\s+"(.*)";\s*$', line,
                     re.IGNORECASE)
        if m:
            opts.append('%s "%s";' % (m.group(1), m.group(2)))
    return opts


# --------------------------------------------------------------------------
# building

def _mounts_under(path):
    path = os.path.realpath(path).rstrip("/") + "/"
    found = []
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                mnt = line.split()[1].replace("\\040", " ")
                if (mnt.rstrip("/") + "/").startswith(path):
                    found.append(mnt)
    except OSError:
        pass
    return found


def _safe_rmtree(path):
    """rmtree that never descends into something still mounted (an
    interrupted mmdebstrap can leave /dev, /proc... bound in its chroot)."""
    if not os.path.lexists(path):
        return True
    for mnt in sorted(_mounts_under(path), key=len, reverse=True):
        subprocess.run(["umount", "-l", mnt], stderr=subprocess.DEVNULL)
    if _mounts_under(path):
        log("not removing %s: something is still mounted in it" % path)
        return False
    shutil.rmtree(path, ignore_errors=True)
    return not os.path.lexists(path)


def ensure_tools():
    missing = [t for t in ("mmdebstrap", "mkfs.ext4") if not shutil.which(t)]
    if not missing:
        return
    if os.geteuid() != 0:
        raise RuntimeError("missing %s: apt-get install mmdebstrap e2fsprogs"
                           % " ".join(missing))
    log("installing mmdebstrap e2fsprogs")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if subprocess.run(["apt-get", "install", "-y", "-q", "mmdebstrap",
                       "e2fsprogs"], env=env).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True)
        subprocess.run(["apt-get", "install", "-y", "-q", "mmdebstrap",
                        "e2fsprogs"], env=env, check=True)


def run_mmdebstrap(rootdir):
    sources = host_sources()
    cmd = [
        "mmdebstrap",
        "--mode=root",
        "--format=directory",
        "--variant=apt",
        "--architectures=" + ARCH,
        "--include=" + ",".join(PACKAGES),
        # documentation and translations are of no use in a test guest
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/info/*",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        "--dpkgopt=path-include=/usr/share/locale/locale.alias",
    ]
    # Before the kernel is installed, so that its initramfs is made with
    # them: fstab, the root file system type and gzip compression (zstd is
    # not installed).
    cmd.append("--essential-hook=" + " && ".join([
        'printf %s {} > "$1/etc/fstab"'.format(shlex.quote(FSTAB)),
        'mkdir -p "$1/etc/initramfs-tools/conf.d"',
        'echo COMPRESS=gzip > "$1/etc/initramfs-tools/conf.d/compress"',
        # the fsck hook probes the build host's root device for the type of
        # "/" unless told: then fsck.ext4 is left out of the initramfs
        'echo FSTYPE=ext4 > "$1/etc/initramfs-tools/conf.d/fstype"',
    ]))
    for opt in host_apt_proxy_options():
        cmd.append("--aptopt=" + opt)
    cmd += [SUITE, rootdir, "-"]
    log("mmdebstrap %s with %d package(s), sources from the host's apt "
        "configuration" % (SUITE, len(PACKAGES)))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C.UTF-8")
    subprocess.run(cmd, input=sources, universal_newlines=True, env=env,
                   check=True)


def _write(path, text, mode=0o644):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def customize(root):
    """Turn the chroot into a clean first-boot image."""
    etc = os.path.join(root, "etc")
    # The build copied the host's resolv.conf: the guest must not wait on a
    # name server it cannot reach (dhclient fills it in from DHCP).
    if os.path.islink(os.path.join(etc, "resolv.conf")):
        os.unlink(os.path.join(etc, "resolv.conf"))
    _write(os.path.join(etc, "resolv.conf"), "")
    # No host name of the build machine; cloud-init sets it from metadata.
    _write(os.path.join(etc, "hostname"), "localhost\n")
    _write(os.path.join(etc, "hosts"), HOSTS)
    # systemd makes a new machine id on every fresh image/clone.
    _write(os.path.join(etc, "machine-id"), "", 0o444)
    dbus_id = os.path.join(root, "var/lib/dbus/machine-id")
    if os.path.lexists(dbus_id):
        os.unlink(dbus_id)
    os.makedirs(os.path.dirname(dbus_id), exist_ok=True)
    os.symlink("/etc/machine-id", dbus_id)
    _write(os.path.join(etc, "fstab"), FSTAB)
    # Host keys are made on the first boot (by cloud-init), never shipped.
    for p in glob.glob(os.path.join(etc, "ssh", "ssh_host_*")):
        os.unlink(p)
    dropin = os.path.join(etc, "systemd/system/ssh.service.d")
    os.makedirs(dropin, exist_ok=True)
    _write(os.path.join(dropin, "hostkeys.conf"), SSH_DROPIN)
    # Mask units that only slow down a test boot.
    for unit in MASKED_UNITS:
        p = os.path.join(etc, "systemd/system", unit)
        if os.path.lexists(p):
            os.unlink(p)
        os.symlink("/dev/null", p)
    # No logs or cloud-init state from the build.
    for d in ("var/lib/cloud", "var/log/cloud-init.log",
              "var/log/cloud-init-output.log"):
        p = os.path.join(root, d)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        elif os.path.lexists(p):
            os.unlink(p)
    _write(os.path.join(etc, "default/locale"), LOCALE)


# What the initramfs must hold (mkinitramfs's default MODULES=most puts the
# drivers in): an ext4 root on a virtio disk, and the CD-ROM of the config
# drive test (IDE on the `pc` machine, or virtio-scsi). ds-identify looks for
# the config-2 label from a systemd generator, before udev runs on the real
# root: only the initramfs can have loaded the CD-ROM's drivers by then.
INITRAMFS_NEEDS = ("/virtio_blk.ko", "/virtio_pci.ko", "/fsck.ext4",
                   "/ata_piix.ko", "/virtio_scsi.ko", "/sr_mod.ko")


def check_initramfs(root, version):
    out = subprocess.run(
        ["chroot", root, "lsinitramfs", "/boot/initrd.img-" + version],
        check=True, stdout=subprocess.PIPE, universal_newlines=True).stdout
    missing = [n for n in INITRAMFS_NEEDS
               if not re.search(re.escape(n) + "$", out, re.M)]
    if missing:
        raise RuntimeError("the initramfs lacks %s" % ", ".join(missing))


def _kernel_files(root):
    kernels = sorted(glob.glob(os.path.join(root, "boot", "vmlinuz-*")))
    if len(kernels) != 1:
        raise RuntimeError("expected one kernel in /boot, got %r" % kernels)
    version = os.path.basename(kernels[0])[len("vmlinuz-"):]
    initrd = os.path.join(root, "boot", "initrd.img-" + version)
    return version, kernels[0], initrd


def _du_bytes(path):
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for n in filenames + dirnames:
            try:
                st = os.lstat(os.path.join(dirpath, n))
            except OSError:
                continue
            total += max(st.st_blocks * 512, 4096 if n in dirnames else 0)
    return total


def make_ext4(rootdir, image):
    used = _du_bytes(rootdir)
    size = max(IMAGE_MIN_BYTES, int(used * 1.3) + 256 * 1024 ** 2)
    size = (size + 64 * 1024 ** 2 - 1) // (64 * 1024 ** 2) * (64 * 1024 ** 2)
    with open(image, "wb") as f:
        f.truncate(size)  # sparse
    log("mkfs.ext4 -d: %d MiB of files into a %d MiB image"
        % (used >> 20, size >> 20))
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "rootfs", "-d", rootdir,
                    image], check=True)
    return used, size


def _build_into(tmp, key):
    rootdir = os.path.join(tmp, "root")
    run_mmdebstrap(rootdir)
    customize(rootdir)
    version, kernel, initrd = _kernel_files(rootdir)
    check_initramfs(rootdir, version)
    shutil.copyfile(kernel, os.path.join(tmp, "vmlinuz"))
    shutil.copyfile(initrd, os.path.join(tmp, "initrd.img"))
    used, size = make_ext4(rootdir, os.path.join(tmp, "rootfs.raw"))
    _safe_rmtree(rootdir)
    return {"kernel_version": version, "used_bytes": used,
            "image_bytes": size}


def build_image(cache_dir=None, force=False):
    """Return the paths of a bookworm guest image, building it if needed.

    Returns dict(kernel=, initrd=, rootfs=, key=, dir=, seconds=, cached=):
    kernel/initrd/rootfs are paths in the cache (never boot rootfs directly:
    put a qcow2 overlay on it), seconds is how long this call took.
    """
    t0 = time.monotonic()
    cache_dir = os.path.abspath(cache_dir or default_cache_dir())
    key = cache_key()
    final = os.path.join(cache_dir, key)
    if not force and _complete(final):
        return _result(final, key, time.monotonic() - t0, True)

    os.makedirs(cache_dir, exist_ok=True)
    with open(os.path.join(cache_dir, ".lock"), "a+") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)  # one builder at a time
        if not force and _complete(final):  # someone else just built it
            return _result(final, key, time.monotonic() - t0, True)
        if os.geteuid() != 0:
            raise RuntimeError("building the guest image needs root "
                               "(mmdebstrap --mode=root)")
        ensure_tools()
        # Left-overs of interrupted builds and images of older keys.
        for name in os.listdir(cache_dir):
            p = os.path.join(cache_dir, name)
            if name.startswith(".tmp-") or ".old-" in name or (
                    KEY_RE.match(name) and name != key):
                log("removing stale %s" % name)
                _safe_rmtree(p)
        tmp = os.path.join(cache_dir, ".tmp-%s-%d" % (key, os.getpid()))
        _safe_rmtree(tmp)
        os.makedirs(tmp)
        ok = False
        try:
            info = _build_into(tmp, key)
            seconds = time.monotonic() - t0
            info.update(key=key, packages=list(PACKAGES), suite=SUITE,
                        arch=ARCH, build_seconds=round(seconds, 1),
                        built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                               time.gmtime()))
            _write(os.path.join(tmp, "manifest.json"),
                   json.dumps(info, indent=2) + "\n")
            if os.path.lexists(final):
                old = final + ".old-%d" % os.getpid()
                os.rename(final, old)
                os.rename(tmp, final)
                _safe_rmtree(old)
            else:
                os.rename(tmp, final)
            ok = True
        finally:
            if not ok and not os.environ.get("MDSERVER_GUEST_KEEP_FAILED"):
                _safe_rmtree(tmp)
    seconds = time.monotonic() - t0
    log("built %s in %.1f s" % (final, seconds))
    return _result(final, key, seconds, False)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-dir", default=None,
                    help="default: $XDG_CACHE_HOME/mdserver-guest or "
                         "~/.cache/mdserver-guest")
    ap.add_argument("--force", action="store_true",
                    help="rebuild even if a cached image exists")
    args = ap.parse_args(argv)
    try:
        res = build_image(cache_dir=args.cache_dir, force=args.force)
    except (RuntimeError, subprocess.CalledProcessError, OSError) as e:
        log("failed: %s" % e)
        return 1
    print("%s in %.2f s" % ("cached image" if res["cached"] else
                            "built image", res["seconds"]))
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
