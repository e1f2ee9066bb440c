#!/usr/bin/python3
"""Drive cloud-init's real OpenStack, NoCloud and ConfigDrive datasources.

Usage (run by /usr/bin/python3; PYTHONPATH chooses the cloud-init version,
see tests/cloudinit_versions.py):

    cloudinit_faces_client.py --ds openstack [--url http://169.254.169.254]
    cloudinit_faces_client.py --ds nocloud-net --url http://169.254.169.254/nocloud/
    cloudinit_faces_client.py --ds configdrive --seed DIR_OR_ISO
    cloudinit_faces_client.py --ds nocloud --seed DIR_OR_ISO
        [--uuid UUID] [--serial S] [--timeout S] [--mac MAC=IFNAME ...] [--allow-dns]

Builds the real datasource class cloud-init would use in a guest
(DataSourceOpenStack and DataSourceNoCloudNet: the network-stage classes;
DataSourceConfigDrive and DataSourceNoCloud: the seed-image ones), calls its
real get_data() and prints one JSON object with what cloud-init derived:
ok, instance_id, local_hostname, public_keys, userdata_raw, vendordata_raw,
network_config (ds.network_config), network (that config through
cloud-init's own parser into a NetworkState, summarised, and rendered as
netplan YAML and as /etc/network/interfaces), cloud_name, platform,
subplatform, metadata, dsmode, check_instance_id, requests (every HTTP
request, in order, with its status), version, errors.
cloud-init's own log goes to stderr at DEBUG.

Exit status: 0 if get_data() returned True, 1 if not (or it raised), 2 on a
usage or pre-flight error.

What is patched, and why only that
----------------------------------
1. Platform detection: ``cloudinit.dmi.read_dmi_data`` (the function that
   reads SMBIOS from /sys/class/dmi/id or dmidecode) answers from a canned
   table of what the libvirt guest of that route shows (keys it doesn't
   know read as absent, None). It is the only host-dependent input of
   every detection below, in both versions; each datasource module calls it
   as ``dmi.read_dmi_data`` (a module attribute), so replacing it there
   reaches every caller, and all of cloud-init's decision logic still runs:
   * openstack: product "OpenStack Nova", manufacturer "OpenStack
     Foundation", serial and uuid = --uuid, family "Virtual Machine" (what
     nova sets). 22.4's detect_openstack() and 25.1's ds_detect() read the
     product name. A patch of detect_openstack/ds_detect themselves would be
     narrower in lines but would skip that check; the DMI reader is the
     narrowest patch that keeps it (and it also feeds check_instance_id's
     comparison with the SMBIOS uuid).
   * nocloud-net: serial "ds=nocloud-net;s=<--url>" (libvirt <sysinfo>
     system serial), plain QEMU otherwise. Both versions parse it into
     seedfrom (22.4 in _get_data, 25.1 also in ds_detect).
   * configdrive, nocloud: plain QEMU (no serial): they are found by label.
   sys_cfg's datasource_list is [<name>, None], as ds-identify writes it: a
   single-entry list would make 25.1 skip ds_detect.
2. Device discovery (configdrive, nocloud, nocloud-net: NoCloudNet scans
   for a cidata disk too). ConfigDrive's ``find_candidate_devs`` and
   NoCloud's ``DataSourceNoCloud._get_devices`` (both query blkid for the
   label and filesystem type) are wrapped: the real function runs, and its
   result is cut down to the guest's own device: with --seed ISO, the loop
   device the ISO is attached to (read-only, losetup), else none. So a
   device of the host, or another test's seed image, is never mounted. The
   output's "seed.discovered" says what cloud-init's own discovery found
   (with an ISO, our device is expected among it: its label and type were
   recognised). cloud-init then mounts it with its own util.mount_cb.
   --seed DIR (no device then): the directory is linked where cloud-init
   reads a seed directory (<cloud_dir>/seed/config_drive or seed/nocloud).
   Not cloud-init but this host: a kernel without iso9660 (the CI
   machines' kernel has none, and no modules) cannot mount the image, so
   `mount` and `umount` are shadowed on PATH by two small shims (for our
   loop device only; anything else goes to the real tools): "mount -o ro
   -t auto|iso9660 DEV DIR" extracts the image into DIR with xorriso, an
   ISO9660 reader independent of the writer (Rock Ridge names, as Linux
   shows them), and "umount DIR" empties it again. util.mount_cb and the
   callback that reads the files run unchanged. With iso9660 in
   /proc/filesystems the kernel mounts it. The output's "seed.mount" says
   which.
3. --mac MAC=IFNAME (optional): ``cloudinit.net.get_interfaces_by_mac``
   returns exactly these, for a run outside the guest's namespace (OpenStack
   network_data.json names NICs by MAC). The tests run every client inside
   a namespace whose eth0 has the instance's MAC, so they don't need it.

Safety and sandboxing (none of it changes cloud-init's decisions):
* As root, the process first enters a private mount namespace (propagation
  private) and mounts a tmpfs on /run there: cloud-init's temporary
  directories (/run/cloud-init/tmp for util.mount_cb), blkid's cache and
  mount's utab then vanish with the process, and the seed mount is never
  seen outside it.
* sys_cfg is built in memory, helpers.Paths points cloud_dir and run_dir to
  a temporary directory (removed afterwards).
* DEBUG_PROC_CMDLINE (cloud-init's own hook) sets the kernel command line
  to a plain guest's, so the host's /proc/cmdline plays no part.
* ConfigDrive's write_injected_files (OpenStack "files" written to /) and the
  distro's apply_network_config (only for dsmode "pass") record instead of
  writing to this host.
* "requests" is recorded by wrapping requests.Session.send (the HTTP
  library all of cloud-init's url_helper goes through, not cloud-init):
  method, URL and status (or the error) of every request, in the order they
  were sent; a request still unanswered when the client ends has status null.
* Proxy variables are removed; the offline resolver guard of
  cloudinit_client.py (only numeric IPs and /etc/hosts names resolve, so no
  DNS query leaves) is installed unless --allow-dns.
* The netplan YAML comes from the renderer's _render_content (pure): 25.1's
  render_network_state writes through the netplan Python API into the
  host's /etc/netplan whatever the target when python3-netplan is there.
  The ENI renderer's render_network_state writes under a temporary target.
"""

import argparse
import ctypes
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import tempfile
import threading
import traceback
from urllib.parse import urlparse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cloudinit_client import (PROXY_ENV_VARS, _err, _is_locally_resolvable,  # noqa: E402
                              install_offline_resolver_guard, jsonable)

DATASOURCES = {  # --ds -> (module, class, datasource name in sys_cfg)
    "openstack": ("DataSourceOpenStack", "DataSourceOpenStack", "OpenStack"),
    "nocloud-net": ("DataSourceNoCloud", "DataSourceNoCloudNet", "NoCloud"),
    "configdrive": ("DataSourceConfigDrive", "DataSourceConfigDrive", "ConfigDrive"),
    "nocloud": ("DataSourceNoCloud", "DataSourceNoCloud", "NoCloud"),
}
DEFAULT_UUID = "5b3c2a10-7e4f-4c8d-9a61-2f0e8d7c6b5a"
GUEST_CMDLINE = "BOOT_IMAGE=/vmlinuz root=/dev/vda1 ro console=ttyS0"
QEMU_DMI = {
    "system-manufacturer": "QEMU",
    "system-product-name": "Standard PC (Q35 + ICH9, 2009)",
    "system-version": "pc-q35-7.2",
    "bios-vendor": "SeaBIOS",
    "chassis-vendor": "QEMU",
    "chassis-asset-tag": "",
    "baseboard-asset-tag": "",
}
CLONE_NEWNS = 0x00020000
SHIM = r"""#!%(python)s
# %(tool)s shim of cloudinit_faces_client.py: this kernel cannot mount iso9660.
import os, shutil, subprocess, sys
device, state = %(device)r, %(state)r
args = sys.argv[1:]
real = %(real)r
if %(tool)r == "mount" and len(args) >= 2 and os.path.realpath(args[-2]) == device:
    fstype = args[args.index("-t") + 1] if "-t" in args else "auto"
    if fstype not in ("auto", "iso9660"):
        sys.exit("mount shim: %%s is iso9660, not %%s" %% (device, fstype))
    r = subprocess.run(["xorriso", "-abort_on", "FAILURE", "-osirrox", "on",
                        "-indev", "stdio:" + device, "-extract", "/", args[-1]],
                       stdout=sys.stderr, stderr=sys.stderr)
    if r.returncode != 0:
        sys.exit(32)  # mount's "mount failure"
    with open(state, "a") as f:
        f.write(os.path.realpath(args[-1]) + "\n")
    sys.exit(0)
if %(tool)r == "umount" and len(args) == 1 and os.path.exists(state):
    target = os.path.realpath(args[0])
    with open(state) as f:
        mounted = f.read().split()
    if target in mounted:
        for name in os.listdir(target):
            path = os.path.join(target, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) \
                else os.unlink(path)
        mounted.remove(target)
        with open(state, "w") as f:
            f.write("".join(m + "\n" for m in mounted))
        sys.exit(0)
os.execv(real, [real] + args)
"""


def fake_dmi(ds, uuid, url, serial=None):
    """SMBIOS as the libvirt guest of this route shows it (dmidecode key names)."""
    dmi = dict(QEMU_DMI, **{"system-uuid": uuid})
    if serial is not None:
        dmi["system-serial-number"] = serial
    if ds == "openstack":
        dmi.update({"system-manufacturer": "OpenStack Foundation",
                    "system-product-name": "OpenStack Nova",
                    "system-serial-number": uuid, "system-family": "Virtual Machine"})
    elif ds == "nocloud-net" and serial is None:
        dmi["system-serial-number"] = "ds=nocloud-net;s=%s" % url
    return dmi


def private_mount_namespace():
    """Enter a mount namespace of our own, nothing propagating out, with a fresh /run."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755,nosuid,nodev", "tmpfs", "/run"],
                   check=True)


class RequestLog:
    """Every request made through requests (cloud-init's url_helper uses it), in order."""

    def __init__(self):
        self.entries = []
        self.lock = threading.Lock()

    def install(self):
        import requests

        real_send = requests.Session.send
        log = self

        def send(session, request, **kwargs):
            with log.lock:
                entry = {"method": request.method, "url": request.url, "status": None}
                log.entries.append(entry)
            try:
                resp = real_send(session, request, **kwargs)
            except Exception as e:
                entry["error"] = "%s: %s" % (type(e).__name__, e)
                raise
            entry["status"] = resp.status_code
            return resp

        requests.Session.send = send


def kernel_has_iso9660():
    with open("/proc/filesystems") as f:
        return any(line.split()[-1:] == ["iso9660"] for line in f)


def install_mount_shims(bindir, device):
    """`mount`/`umount` on PATH that extract `device` with xorriso (see docstring)."""
    os.makedirs(bindir)
    state = os.path.join(bindir, ".mounted")
    for tool in ("mount", "umount"):
        real = shutil.which(tool)
        if real is None:
            raise RuntimeError("no %s on PATH" % tool)
        path = os.path.join(bindir, tool)
        with open(path, "w") as f:
            f.write(SHIM % {"python": sys.executable, "tool": tool, "device": device,
                            "state": state, "real": real})
        os.chmod(path, 0o755)
    os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ds", required=True, choices=sorted(DATASOURCES))
    p.add_argument("--url", help="openstack: metadata URL (default: cloud-init's own list); "
                   "nocloud-net: the seedfrom URL, ending in /")
    p.add_argument("--seed", help="configdrive/nocloud: a seed directory or ISO image")
    p.add_argument("--uuid", default=DEFAULT_UUID, help="SMBIOS system uuid (and nova's serial)")
    p.add_argument("--serial", help="SMBIOS system serial instead of the route's "
                   "(nocloud-net: ds=nocloud-net;s=<--url>)")
    p.add_argument("--timeout", type=int, default=5,
                   help="openstack: max_wait and timeout in seconds (default 5)")
    p.add_argument("--mac", action="append", default=[], metavar="MAC=IFNAME",
                   help="NICs cloud-init sees (default: the real ones)")
    p.add_argument("--allow-dns", action="store_true", help="no offline resolver guard")
    args = p.parse_args(argv)
    if args.ds == "nocloud-net" and not args.url:
        p.error("--ds nocloud-net needs --url")
    if args.ds in ("configdrive", "nocloud") and not args.seed:
        p.error("--ds %s needs --seed" % args.ds)
    if args.ds in ("configdrive", "nocloud") and args.url:
        p.error("--url is for openstack and nocloud-net")
    if args.seed and not os.path.exists(args.seed):
        p.error("no such seed: %s" % args.seed)
    if args.timeout < 1:
        p.error("--timeout must be >= 1")
    for m in args.mac:
        if "=" not in m:
            p.error("--mac wants MAC=IFNAME")
    return args


def summarise_network(ns):
    """The NetworkState as plain facts, comparable across config formats."""
    ifaces = []
    for iface in ns.iter_interfaces():
        subnets = []
        for s in iface.get("subnets") or []:
            subnets.append({k: s[k] for k in sorted(s) if k in (
                "type", "address", "netmask", "prefix", "gateway", "routes",
                "dns_nameservers", "dns_search")})
        ifaces.append({"name": iface.get("name"), "type": iface.get("type"),
                       "mac_address": (iface.get("mac_address") or "").lower() or None,
                       "subnets": subnets})
    return {"version": ns.version, "interfaces": ifaces,
            "routes": list(ns.iter_routes()),
            "dns_nameservers": list(ns.dns_nameservers),
            "dns_searchdomains": list(ns.dns_searchdomains)}


def render_network(netcfg, tmpdir):
    """cloud-init's own parse of netcfg (skip_broken=False: raise, don't drop)
    and two of its renderers."""
    from cloudinit.net import eni, netplan, network_state

    ns = network_state.parse_net_config_data(netcfg, skip_broken=False)
    target = os.path.join(tmpdir, "render-target")
    eni.Renderer({"netrules_path": None}).render_network_state(ns, target=target)
    with open(os.path.join(target, "etc/network/interfaces"), encoding="utf-8") as f:
        eni_text = f.read()
    netplan_text = netplan.Renderer({"postcmds": False})._render_content(ns)
    return {"state": summarise_network(ns), "netplan": netplan_text, "eni": eni_text}


def main(argv=None):
    args = parse_args(argv)
    url = args.url

    for var in PROXY_ENV_VARS:
        os.environ.pop(var, None)
    os.environ["no_proxy"] = os.environ["NO_PROXY"] = "*"
    os.environ["DEBUG_PROC_CMDLINE"] = GUEST_CMDLINE

    if url:
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            print(json.dumps({"ok": False, "error": "bad --url %r" % url}))
            return 2
    if not args.allow_dns:
        hosts_names = install_offline_resolver_guard()
        if url and not _is_locally_resolvable(urlparse(url).hostname, hosts_names):
            print(json.dumps({"ok": False, "error": "--url host is neither an IP nor "
                              "in /etc/hosts"}))
            return 2
    iso = args.seed if args.seed and os.path.isfile(args.seed) else None
    if os.geteuid() == 0:
        private_mount_namespace()
    elif iso:
        print(json.dumps({"ok": False, "error": "an ISO seed needs root (loop device)"}))
        return 2

    requests_log = RequestLog()
    requests_log.install()

    import importlib

    from cloudinit import distros, dmi, helpers, net, version

    module_name, class_name, ds_name = DATASOURCES[args.ds]
    module = importlib.import_module("cloudinit.sources." + module_name)
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG, force=True,
                        format="%(asctime)s %(name)s[%(levelname)s]: %(message)s")
    log = logging.getLogger("cloudinit_faces_client")

    result = {"ds": args.ds, "version": version.version_string(), "ok": False}
    errors = {}
    patches = []

    # ---- 1. platform detection: the DMI reader ---------------------------
    table = fake_dmi(args.ds, args.uuid, url, args.serial)
    dmi_reads = []

    def fake_read_dmi_data(key):
        value = table.get(key)
        dmi_reads.append([key, value])
        log.debug("patched read_dmi_data(%r) -> %r", key, value)
        return value

    dmi.read_dmi_data = fake_read_dmi_data
    patches.append("cloudinit.dmi.read_dmi_data")

    # ---- 3. (optional) the NICs by MAC -----------------------------------
    if args.mac:
        macs = {m.split("=", 1)[0].lower(): m.split("=", 1)[1] for m in args.mac}
        net.get_interfaces_by_mac = lambda *a, **kw: dict(macs)
        patches.append("cloudinit.net.get_interfaces_by_mac")

    tmpdir = tempfile.mkdtemp(prefix="cloudinit-faces-")
    loopdev = None
    try:
        paths = helpers.Paths({
            "cloud_dir": os.path.join(tmpdir, "var-lib-cloud"),
            "run_dir": os.path.join(tmpdir, "run-cloud-init"),
            "templates_dir": os.path.join(tmpdir, "templates"),
        })
        os.makedirs(paths.cloud_dir)
        os.makedirs(paths.run_dir)
        ds_cfg = {}
        if args.ds == "openstack":
            ds_cfg = {"max_wait": args.timeout, "timeout": args.timeout}
            if url:
                ds_cfg["metadata_urls"] = [url.rstrip("/")]
        sys_cfg = {"datasource_list": [ds_name, "None"], "datasource": {ds_name: ds_cfg}}

        # ---- 2. the seed: a directory where cloud-init looks, or an ISO --
        discovered = []
        if args.seed and not iso:
            sub = "config_drive" if args.ds == "configdrive" else "nocloud"
            os.makedirs(paths.seed_dir, exist_ok=True)
            os.symlink(os.path.abspath(args.seed), os.path.join(paths.seed_dir, sub))
        elif iso:
            loopdev = subprocess.run(
                ["losetup", "--find", "--show", "--read-only", os.path.abspath(iso)],
                check=True, capture_output=True, text=True).stdout.strip()
            log.debug("seed %s on %s", iso, loopdev)
            if kernel_has_iso9660():
                mount_by = "kernel"
            else:
                if shutil.which("xorriso") is None:
                    print(json.dumps({"ok": False, "error": "this kernel has no iso9660 "
                                      "and xorriso is missing (apt-get install xorriso)"}))
                    return 2
                install_mount_shims(os.path.join(tmpdir, "bin"), loopdev)
                mount_by = "xorriso extraction (no iso9660 in this kernel)"

        # The guest's block devices are its seed image or none: the host's
        # (and other test runs' seed images) never reach cloud-init.
        def only_ours(found):
            discovered.extend(found)
            return [d for d in found if loopdev and os.path.realpath(d) == loopdev]

        if args.ds == "configdrive":
            real_find = module.find_candidate_devs

            def find_candidate_devs(*a, **kw):
                return only_ours(real_find(*a, **kw))

            module.find_candidate_devs = find_candidate_devs
            patches.append("DataSourceConfigDrive.find_candidate_devs (filtered)")
        elif args.ds in ("nocloud", "nocloud-net"):
            real_get_devices = module.DataSourceNoCloud._get_devices

            def _get_devices(self, label):
                return only_ours(real_get_devices(self, label))

            module.DataSourceNoCloud._get_devices = _get_devices
            patches.append("DataSourceNoCloud._get_devices (filtered)")
        result["seed"] = {"path": args.seed, "iso": bool(iso), "device": loopdev,
                          "discovered": discovered, "mount": mount_by if iso else None}

        # ---- safety: nothing written to this host ------------------------
        injected = []
        if args.ds == "configdrive":
            module.write_injected_files = lambda files: injected.append(jsonable(files))
        distro = distros.fetch("debian")("debian", {}, paths)
        applied = []
        distro.apply_network_config = lambda netconfig, *a, **kw: applied.append(netconfig)

        ds = getattr(module, class_name)(sys_cfg, distro, paths)
        try:
            started = time.monotonic()
            ok = bool(ds.get_data())
            # the crawl's wall time, without interpreter start and imports
            result["get_data_seconds"] = time.monotonic() - started
        except Exception as e:
            log.error("get_data() raised:\n%s", traceback.format_exc())
            errors["get_data"] = _err(e)
            ok = False
        result["ok"] = ok

        def attempt(key, fn):
            try:
                return fn()
            except Exception as e:
                log.debug("%s failed:\n%s", key, traceback.format_exc())
                errors[key] = _err(e)
                return None

        result["instance_id"] = attempt("instance_id", ds.get_instance_id) if ok else None
        result["local_hostname"] = attempt("local_hostname", lambda: ds.get_hostname().hostname)
        result["public_keys"] = attempt("public_keys", ds.get_public_ssh_keys)
        result["userdata_raw"] = ds.userdata_raw
        result["vendordata_raw"] = ds.vendordata_raw
        result["vendordata2_raw"] = getattr(ds, "vendordata2_raw", None)
        result["metadata"] = ds.metadata
        result["dsmode"] = ds.dsmode
        result["cloud_name"] = attempt("cloud_name", lambda: ds.cloud_name)
        result["platform"] = attempt("platform", lambda: ds.platform_type)
        result["subplatform"] = attempt("subplatform", lambda: ds.subplatform) if ok else None
        result["availability_zone"] = attempt("availability_zone", lambda: ds.availability_zone)
        result["check_instance_id"] = (
            attempt("check_instance_id", lambda: ds.check_instance_id(sys_cfg)) if ok else None)
        netcfg = attempt("network_config", lambda: ds.network_config) if ok else None
        result["network_config"] = netcfg
        result["network"] = None
        if netcfg:
            result["network"] = attempt("network", lambda: render_network(netcfg, tmpdir))
        for extra in ("network_json", "ec2_metadata"):
            value = getattr(ds, extra, None)
            if isinstance(value, (dict, list, str)) or value is None:
                result[extra] = value
        inst_json = paths.get_runpath("instance_data")
        result["instance_data_v1"] = None
        if ok and os.path.exists(inst_json):
            with open(inst_json, encoding="utf-8") as f:
                result["instance_data_v1"] = json.load(f).get("v1")
        result["requests"] = requests_log.entries
        result["dmi_reads"] = dmi_reads
        result["patched"] = patches
        result["injected_files"] = injected
        result["applied_network_config"] = applied
        result["errors"] = errors
        sys.stdout.write(json.dumps(jsonable(result), indent=2, sort_keys=True) + "\n")
        sys.stdout.flush()
        return 0 if ok else 1
    finally:
        if loopdev:
            subprocess.run(["losetup", "--detach", loopdev], capture_output=True)
        shutil.rmtree(tmpdir, ignore_errors=True)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Not sys.exit: 25.1's dual-stack probe leaves a thread connecting to
    # fe80::a9fe:a9fe (nothing answers there; a TCP connect to an unresolved
    # neighbour waits for its timeout), and interpreter exit would join it.
    # Its request shows in "requests" with status null.
    os._exit(code)
