#!/usr/bin/python3
"""Drive cloud-init's real EC2 datasource against a metadata server.

Usage:
    /usr/bin/python3 tests/cloudinit_client.py --url http://HOST:PORT \
        --platform aws|kvm [--timeout S]

Builds a real ``cloudinit.sources.DataSourceEc2.DataSourceEc2`` (the one
cloud-init uses in the "init-network" stage), calls its real ``get_data()``
(the full crawl) against --url, and prints one JSON object to stdout.
cloud-init's own logging (every URL it opens, with the token header shown as
REDACTED when it is sent) goes to stderr at DEBUG.

Exit status: 0 if get_data() returned True, 1 if it returned False or
raised, 2 on a usage or pre-flight error.

Requires Debian's python3 with the cloud-init package (written against
cloud-init 22.4.2); uses only the standard library and cloudinit.

What is patched, and why only that
----------------------------------
Exactly one thing in cloud-init is replaced:
``cloudinit.sources.DataSourceEc2._collect_platform_data``. This is the
function that reads SMBIOS/DMI (/sys/class/dmi/id/*, /sys/hypervisor/uuid)
and returns the raw facts (uuid, uuid_source, serial, asset_tag, vendor,
product_name). We replace it with canned DMI data:

* aws: the system uuid starts with "ec2" and the serial equals the uuid.
  This is what a libvirt guest shows with <sysinfo type='smbios'> setting
  the uuid and the serial to an "ec2..." uuid. cloud-init's own
  identify_aws() then says "aws".
* kvm: plain QEMU/KVM values, so every identify_*() check fails and
  identify_platform() returns "unknown".

Everything that follows is unchanged cloud-init code, so it runs as it
would in a guest: identify_platform(), DataSourceEc2._get_cloud_name(), the
DataSource.cloud_name property, strict_id handling (the default, "warn", lets
"unknown" go on to crawl), the IMDSv2 token logic (PUT /latest/api/token and
X-aws-ec2-metadata-token only when cloud_name == "aws"), the choice of API
version, the crawl, and network_config. We patch the DMI reader, not
identify_platform or cloud_name, because the DMI reader is the only part
that depends on the host. The host running the tests is not the guest, and
we want the real decision logic to run.

Safety and sandboxing (none of this touches cloud-init code):
* sys_cfg is built in memory (nothing is read from /etc/cloud), and
  helpers.Paths points cloud_dir and run_dir at a temporary directory that
  is removed afterwards. get_data() writes instance-data.json there, so
  /var/lib/cloud and /run/cloud-init are never touched.
* Proxy environment variables are removed so requests talks to --url
  directly.
* socket.getaddrinfo (stdlib) is wrapped so that only numeric IPs and names
  in /etc/hosts resolve. cloud-init's util.is_resolvable() otherwise sends
  DNS queries for "does-not-exist.example.com." and similar names to detect
  DNS redirection. Those names fail to resolve either way, as on an offline
  guest, so cloud-init's behaviour is the same. Use --allow-dns to turn the
  wrapper off.
* If the --url host can't be resolved, we stop before calling get_data().
  Otherwise cloud-init quietly falls back to its built-in metadata_urls
  (169.254.169.254, [fd00:ec2::254], instance-data.:8773).
"""

import argparse
import base64
import ipaddress
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
import traceback
from urllib.parse import urlparse

# Canned SMBIOS/DMI facts, in the exact shape returned by
# DataSourceEc2._collect_platform_data() (values are lower-cased there too).
_AWS_UUID = "ec2d6f4a-1b2c-4d5e-8f90-0123456789ab"
FAKE_PLATFORM_DATA = {
    "aws": {
        "uuid": _AWS_UUID,
        "uuid_source": "dmi",
        "serial": _AWS_UUID,
        "asset_tag": "",
        "vendor": "amazon ec2",
        "product_name": "t3.micro",
    },
    "kvm": {
        "uuid": "5b3c2a10-7e4f-4c8d-9a61-2f0e8d7c6b5a",
        "uuid_source": "dmi",
        "serial": "",
        "asset_tag": "",
        "vendor": "qemu",
        "product_name": "standard pc (q35 + ich9, 2009)",
    },
}

PROXY_ENV_VARS = (
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
)


def _hosts_file_names(path="/etc/hosts"):
    names = set()
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split("#", 1)[0].split()
                for name in fields[1:]:
                    names.add(name.lower().rstrip("."))
    except OSError:
        pass
    names.update({"localhost", "ip6-localhost", "ip6-loopback"})
    return names


def _is_locally_resolvable(host, hosts_names):
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    h = host.strip("[]").split("%", 1)[0]
    try:
        ipaddress.ip_address(h)
        return True
    except ValueError:
        pass
    return h.lower().rstrip(".") in hosts_names


def install_offline_resolver_guard():
    """Only numeric IPs and /etc/hosts names resolve, so no DNS queries go out.

    This wraps the standard library, not cloud-init.
    """
    real_getaddrinfo = socket.getaddrinfo
    hosts_names = _hosts_file_names()

    def guarded_getaddrinfo(host, *args, **kwargs):
        if not _is_locally_resolvable(host, hosts_names):
            raise socket.gaierror(
                socket.EAI_NONAME,
                "Name or service not known (offline guard in "
                "cloudinit_client.py: %r)" % (host,),
            )
        return real_getaddrinfo(host, *args, **kwargs)

    socket.getaddrinfo = guarded_getaddrinfo
    return hosts_names


def jsonable(obj):
    """Recursively turn obj into something json.dumps accepts."""
    if isinstance(obj, bytes):
        try:
            return obj.decode("utf-8")
        except UnicodeDecodeError:
            return "base64:" + base64.b64encode(obj).decode("ascii")
    if isinstance(obj, dict):
        return {str(jsonable(k)): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return repr(obj)


def _err(exc):
    return "error: %s: %s" % (type(exc).__name__, exc)


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Run cloud-init's real DataSourceEc2 against a "
        "metadata server and print what it builds as JSON."
    )
    p.add_argument("--url", required=True, help="base URL, http://HOST:PORT")
    p.add_argument("--platform", required=True, choices=("aws", "kvm"))
    p.add_argument(
        "--timeout",
        type=int,
        default=5,
        help="seconds: datasource max_wait and per-request timeout for "
        "the wait-for-service and token phases (default 5). Note: the "
        "crawl itself uses cloud-init's fixed timeout=5s, retries=5.",
    )
    p.add_argument(
        "--allow-dns",
        action="store_true",
        help="do not install the offline getaddrinfo guard",
    )
    args = p.parse_args(argv)
    if args.timeout < 1:
        p.error("--timeout must be >= 1 (cloud-init wants an int > 0)")
    return args


def main(argv=None):
    args = parse_args(argv)
    url = args.url.rstrip("/")

    for var in PROXY_ENV_VARS:
        os.environ.pop(var, None)
    os.environ["no_proxy"] = os.environ["NO_PROXY"] = "*"

    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        print(json.dumps({"ok": False, "error": "bad --url %r" % args.url}))
        return 2
    if not args.allow_dns:
        hosts_names = install_offline_resolver_guard()
        if not _is_locally_resolvable(parsed.hostname, hosts_names):
            msg = (
                "host %r of --url is neither an IP nor in /etc/hosts; "
                "cloud-init would drop it and fall back to its built-in "
                "metadata_urls" % parsed.hostname
            )
            print(json.dumps({"ok": False, "error": msg}))
            return 2

    from cloudinit import distros, helpers
    from cloudinit.sources import DataSourceEc2 as ec2_module

    # Importing cloudinit (cloudinit/log.py) resets the root logger, so
    # logging has to be set up after the imports.
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG,
        format="%(asctime)s %(name)s[%(levelname)s]: %(message)s",
        force=True,
    )
    log = logging.getLogger("cloudinit_client")

    # ---- THE ONLY PATCH (see module docstring) -------------------------
    platform_data = dict(FAKE_PLATFORM_DATA[args.platform])

    def fake_collect_platform_data():
        log.debug("patched _collect_platform_data() -> %s", platform_data)
        return dict(platform_data)

    ec2_module._collect_platform_data = fake_collect_platform_data
    # ---------------------------------------------------------------------

    tmpdir = tempfile.mkdtemp(prefix="cloudinit-client-")
    try:
        paths = helpers.Paths(
            {
                "cloud_dir": os.path.join(tmpdir, "var-lib-cloud"),
                "run_dir": os.path.join(tmpdir, "run-cloud-init"),
                "templates_dir": os.path.join(tmpdir, "templates"),
            }
        )
        os.makedirs(paths.cloud_dir)
        os.makedirs(paths.run_dir)
        sys_cfg = {
            "datasource_list": ["Ec2"],
            "datasource": {
                "Ec2": {
                    "metadata_urls": [url],
                    "max_wait": args.timeout,
                    "timeout": args.timeout,
                }
            },
        }
        distro = distros.fetch("debian")("debian", {}, paths)
        ds = ec2_module.DataSourceEc2(sys_cfg, distro, paths)

        result = {"ok": False}
        errors = {}
        try:
            started = time.monotonic()
            ok = bool(ds.get_data())
            # the crawl's wall time, without interpreter start and imports
            result["get_data_seconds"] = time.monotonic() - started
        except Exception as e:  # report; don't crash without JSON output
            log.error("get_data() raised:\n%s", traceback.format_exc())
            errors["get_data"] = _err(e)
            ok = False
        result["ok"] = ok

        crawled = getattr(ds, "_crawled_metadata", None) or {}

        def attempt(key, fn):
            try:
                return fn()
            except Exception as e:
                log.debug("%s failed:\n%s", key, traceback.format_exc())
                errors[key] = _err(e)
                return errors[key]

        result["metadata"] = ds.metadata
        result["userdata_raw"] = ds.userdata_raw
        result["identity"] = (
            getattr(ds, "identity", None) if "dynamic" in crawled else None
        )
        # After a failed get_data(), get_instance_id() (on aws, identity not
        # set) and network_config (on aws, no "network" key) would go back
        # to the server: a second crawl that clutters the request log.
        # So we don't call them.
        skipped = "skipped: get_data() failed"
        if ok:
            result["instance_id"] = attempt("instance_id", ds.get_instance_id)
        else:
            result["instance_id"] = None
            errors["instance_id"] = skipped
        result["local_hostname"] = attempt(
            "local_hostname", lambda: ds.get_hostname().hostname
        )
        result["public_keys"] = attempt(
            "public_keys", ds.get_public_ssh_keys
        )
        result["availability_zone"] = attempt(
            "availability_zone", lambda: ds.availability_zone
        )
        result["region"] = attempt("region", lambda: ds.region)
        result["cloud_name"] = attempt("cloud_name", lambda: ds.cloud_name)
        if ok:
            result["network_config"] = attempt(
                "network_config", lambda: ds.network_config
            )
        else:
            result["network_config"] = None
            errors["network_config"] = skipped
        result["api_version"] = crawled.get("_metadata_api_version")
        # Extras (not part of the required interface, handy for debugging):
        result["metadata_address"] = getattr(ds, "metadata_address", None)
        result["platform_data"] = platform_data

        # ds.network_config only includes NICs whose MAC exists on *this*
        # host (net.get_interfaces_by_mac()). Same real converter, but the
        # NIC names are made up from metadata: device-number N -> ethN.
        def all_macs_netcfg():
            net_md = (ds.metadata or {}).get("network")
            if not isinstance(net_md, dict):
                return None
            macs = net_md.get("interfaces", {}).get("macs", {})
            mapping = {}
            for i, (mac, md) in enumerate(sorted(macs.items())):
                num = md.get("device-number", i) if isinstance(md, dict) else i
                mapping[mac] = "eth%s" % num
            return ec2_module.convert_ec2_metadata_network_config(
                net_md, macs_to_nics=mapping, fallback_nic=None
            )

        result["network_config_all_macs"] = attempt(
            "network_config_all_macs", all_macs_netcfg
        )
        inst_json = paths.get_runpath("instance_data")
        if os.path.exists(inst_json):
            with open(inst_json, encoding="utf-8") as f:
                result["instance_data_v1"] = json.load(f).get("v1")
        else:
            result["instance_data_v1"] = None
        result["errors"] = errors

        sys.stdout.write(json.dumps(jsonable(result), indent=2) + "\n")
        sys.stdout.flush()
        return 0 if ok else 1
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
