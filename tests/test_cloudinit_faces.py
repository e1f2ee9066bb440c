"""cloud-init's real OpenStack, NoCloud and ConfigDrive datasources against the real daemon.

Two cloud-init versions: Debian 12's 22.4.2 (installed) and Debian 13's
25.1.x (its .deb from the Debian archive, cached; tests/cloudinit_versions.py).
The daemon runs in a network namespace on 169.254.169.254:80 as in
production; each instance is registered with its domain XML on the admin
socket, and every client (tests/cloudinit_faces_client.py, one subprocess of
/usr/bin/python3 each) runs in a guest namespace whose eth0 has the
instance's MAC and address:

* openstack:   DataSourceOpenStack over HTTP (cloud-init's own URL list);
* nocloud-net: DataSourceNoCloudNet, seedfrom http://169.254.169.254/nocloud/
               (as an SMBIOS serial gives it);
* configdrive: DataSourceConfigDrive reading `mdserverctl seed --format
               configdrive` (an ISO on a loop device, mounted by cloud-init);
* nocloud:     DataSourceNoCloud reading `mdserverctl seed --format nocloud`.

Only platform detection (the DMI reader) and, for the ISOs, device discovery
are patched in cloud-init; see the client's docstring.
"""

import concurrent.futures
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from xml.sax.saxutils import escape, quoteattr

import pytest

import cloudinit_versions
from daemon import ROOT, Daemon
from helpers import domain_xml, need, need_root, write_config
from mdserver import adminclient
from netns import Lab, exec_in

pytestmark = pytest.mark.privileged

HERE = os.path.dirname(os.path.abspath(__file__))
CLIENT = os.path.join(HERE, "cloudinit_faces_client.py")
SYSTEM_PYTHON = cloudinit_versions.SYSTEM_PYTHON
VERSIONS = cloudinit_versions.VERSIONS
FACES = ("openstack", "nocloud-net", "configdrive", "nocloud")
SEED_FACES = ("configdrive", "nocloud")
MDS = "http://169.254.169.254"
NOCLOUD_URL = MDS + "/nocloud/"
DOMAIN = "mds.test"
GATEWAY = "10.122.0.1"
KEYS = {"admin": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAdmin admin@host",
        "ops": "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQOps ops@host"}
OWN_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOwnKey me@laptop"
TEMPLATE = ("#cloud-config\nfqdn: {{fqdn}}\nwrite_files:\n  - path: /run/marker\n"
            "    content: \"{{name}} {{colour}}\"\n")
VENDOR_DATA = "#cloud-config\nbootcmd:\n  - [sh, -c, 'echo vendor > /run/vendor-marker']\n"
# <mds:meta> values a guest must read back unchanged from every face.
ODD_META = {
    "motd": "line one\nline two: with a colon\n  indented third",
    "quotes": "it's \"double\" and 'single'",
    "colon": "key: value",
    "unicode": "Grüße aus Köln – 東京 – ✓",
    "emoji": "rocket 🚀",
    "clé": "valeur française",
    "key with: colon": "x",
    "yes": "yes",
    "octal": "0755",
    "null": "null",
    "tilde": "~",
    "float": "1e3",
    "date": "2024-01-01",
    "dash": "- not a list",
    "hash": "# not a comment",
    "flow": "{a: 1, b: [2]}",
    "anchor": "&anchor *alias !tag",
    "percent": "%TAG ! @ `",
    "cr": "carriage\rreturn",
    "tab": "a\tb",
    "long": "é" * 255,  # domainxml's limit: 255 characters
    "empty": "",
}


class Guest:
    """One registered instance (its record from the daemon) and its namespace."""

    def __init__(self, name, uuid, mac, record, ns, network):
        self.name, self.uuid, self.mac = name, uuid, mac
        self.ip, self.record, self.ns, self.network = record["ip"], record, ns, network
        self.seeds = {}


class FacesLab:
    """A Lab, the daemon in its host namespace, registered guests, their seed
    images, and memoised client runs (guest, version, face) -> result."""

    def __init__(self, tmp, network_config):
        self.tmp = tmp
        self.lab = Lab()
        self.daemon = None
        self.guests = {}
        self._runs = {}
        self._lock = threading.Lock()
        keys = "".join(f"{k} = {v}\n" for k, v in KEYS.items())
        (tmp / "vendor.yaml").write_text(VENDOR_DATA)
        self.conf = write_config(
            tmp, f"[public-keys]\n{keys}[template-data]\ncolour = blue\n"
                 f"[dnsmasq]\ndomain = {DOMAIN}\nuse_dns = yes\n",
            listen_address="169.254.169.254", port=80, access_log="yes",
            logfile=str(tmp / "mdserver.log"), default_template="base.yaml",
            network_config=network_config, vendor_data=str(tmp / "vendor.yaml"))
        (tmp / "userdata" / "base.yaml").write_text(TEMPLATE)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(tmp / "notify.sock"))
        notify.settimeout(20)
        try:
            self.daemon = Daemon(self.conf, "169.254.169.254", 80,
                                 env={"NOTIFY_SOCKET": str(tmp / "notify.sock")},
                                 netns=self.lab.host)
            assert notify.recv(256).startswith(b"READY=1\nSTATUS=serving"), self.daemon.output()
        except BaseException:
            self.close()
            raise
        finally:
            notify.close()

    def register(self, n, name, meta=(), network=None, own_key=OWN_KEY):
        uuid = f"5b3c2a10-7e4f-4c8d-9a61-{n:012x}"
        mac = f"52:54:00:5f:00:{n:02x}"
        inner = f"<mds:ssh-key>{escape(own_key)}</mds:ssh-key>" if own_key else ""
        if network:
            inner += f"<mds:network>{network}</mds:network>"
        # (a raw CR in XML text reads back as LF: it goes as a character reference)
        inner += "".join(f"<mds:meta key={quoteattr(k)}>{escape(v, {chr(13): '&#13;'})}"
                         "</mds:meta>" for k, v in meta)
        xml = domain_xml(name, uuid, mac, metadata=(
            f"<mds:instance xmlns:mds='urn:mdserver:1'>{inner}</mds:instance>"))
        record = adminclient.call(str(self.tmp / "admin.sock"), "POST", "/instance-upload",
                                  xml.encode("utf-8"))
        ns = self.lab.guest(n, mac, record["ip"])
        guest = Guest(name, uuid, mac, record, ns, network)
        for fmt in SEED_FACES:
            iso = self.tmp / f"{name}-{fmt}.iso"
            r = subprocess.run([sys.executable, "-m", "mdserver.ctl", "-c", self.conf, "seed",
                                name, "--format", fmt, "-o", str(iso)],
                               capture_output=True, text=True, cwd=ROOT, timeout=60)
            assert r.returncode == 0 and iso.is_file(), (fmt, r.stdout, r.stderr)
            guest.seeds[fmt] = str(iso)
        self.guests[name] = guest
        return guest

    def _client(self, guest, version, face, env):
        cmd = [SYSTEM_PYTHON, CLIENT, "--ds", face, "--uuid", guest.uuid, "--timeout", "10"]
        if face == "nocloud-net":
            cmd += ["--url", NOCLOUD_URL]
        elif face in SEED_FACES:
            cmd += ["--seed", guest.seeds[face]]
        r = subprocess.run(exec_in(guest.ns, cmd), capture_output=True, text=True,
                           timeout=120, env=env)
        assert r.stdout, f"{face} {version}: no output\n{r.stderr[-4000:]}"
        result = json.loads(r.stdout)
        result["_exit"], result["_stderr"] = r.returncode, r.stderr
        return result

    def runs(self, guest, version, env, faces=FACES):
        """{face: result} for `guest` under cloud-init `version`, the missing ones in parallel."""
        todo = [f for f in faces if (guest.name, version, f) not in self._runs]
        if todo:
            with concurrent.futures.ThreadPoolExecutor(len(todo)) as pool:
                done = dict(zip(todo, pool.map(
                    lambda f: self._client(guest, version, f, env), todo)))
            with self._lock:
                for f, result in done.items():
                    self._runs[(guest.name, version, f)] = result
        return {f: self._runs[(guest.name, version, f)] for f in faces}

    def close(self):
        if self.daemon is not None:
            self.daemon.stop()
        for guest in self.guests.values():  # a killed client may have left its loop device
            for iso in guest.seeds.values():
                attached = subprocess.run(["losetup", "--associated", iso, "--noheadings",
                                           "--output", "NAME"], capture_output=True,
                                          text=True).stdout.split()
                for dev in attached:
                    subprocess.run(["losetup", "--detach", dev], capture_output=True)
        self.lab.close()


def has_cloud_init_22() -> bool:
    return subprocess.run([SYSTEM_PYTHON, "-c", "import cloudinit.sources.DataSourceOpenStack"],
                          capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def version_env():
    """version -> environment for SYSTEM_PYTHON; 25.1 fetched once (then cached)."""
    envs = {}

    def get(version):
        if version not in envs:
            try:
                cloudinit_versions.check(version)
                envs[version] = cloudinit_versions.env_for(version)
            except cloudinit_versions.Unavailable as e:
                envs[version] = e
        if isinstance(envs[version], Exception):
            need(False, f"cloud-init {version}: {envs[version]}")
        return envs[version]
    return get


def _start(tmp_path_factory, network_config):
    need_root()
    need(has_cloud_init_22(), "needs Debian's cloud-init package (apt-get install cloud-init)")
    need(subprocess.run(["losetup", "--version"], capture_output=True).returncode == 0,
         "needs losetup (util-linux) for the seed images")
    with open("/proc/filesystems") as f:
        iso9660 = any(line.split()[-1:] == ["iso9660"] for line in f)
    need(iso9660 or shutil.which("xorriso") is not None,
         "needs xorriso to read the seed images (this kernel cannot mount iso9660)")
    return FacesLab(tmp_path_factory.mktemp(f"faces-{network_config}"), network_config)


@pytest.fixture(scope="module")
def static_lab(tmp_path_factory):
    """[mdserver] network_config = static; guests: vm-static (plain), vm-meta (odd meta)."""
    lab = _start(tmp_path_factory, "static")
    try:
        lab.register(1, "vm-static", meta=[("role", "web"), ("tier", "front")])
        lab.register(2, "vm-meta", meta=list(ODD_META.items()))
        yield lab
    finally:
        lab.close()


@pytest.fixture(scope="module")
def dhcp_lab(tmp_path_factory):
    """[mdserver] network_config = dhcp; vm-dhcp (inherits it), vm-none (<mds:network>none)."""
    lab = _start(tmp_path_factory, "dhcp")
    try:
        lab.register(3, "vm-dhcp")
        lab.register(4, "vm-none", network="none", own_key=None)
        yield lab
    finally:
        lab.close()


# ---------------------------------------------------------------------------
# what cloud-init derived, reduced to comparable facts

def no_network_config(version, face):
    """22.4's NoCloud over HTTP never fetches network-config: cloud-init's
    fallback (DHCP on the first NIC) applies, whatever mdserver serves."""
    return version == "22.4" and face == "nocloud-net"


def net_facts(result):
    """{mac: {mode, addresses, gateway, dns, search}} from cloud-init's own
    NetworkState of ds.network_config (v1 from network_data.json, v2 from
    network-config): the same facts whatever the format."""
    network = result["network"]
    assert network and not result["errors"].get("network"), result["errors"]
    state = network["state"]
    out = {}
    for iface in state["interfaces"]:
        facts = {"mode": set(), "addresses": [], "gateway": None, "dns": [], "search": []}
        for s in iface["subnets"]:
            facts["mode"].add("dhcp" if s["type"] in ("dhcp", "dhcp4") else s["type"])
            if s["type"] == "static":
                addr = s["address"]
                if "/" not in addr:
                    prefix = s.get("prefix") or \
                        ipaddress.IPv4Network("0.0.0.0/" + s["netmask"]).prefixlen
                    addr = f"{addr}/{prefix}"
                facts["addresses"].append(addr)
            if s.get("gateway"):
                facts["gateway"] = s["gateway"]
            for r in s.get("routes") or []:
                if r.get("prefix") == 0 or r.get("netmask") == "0.0.0.0" \
                        or r.get("network") in ("0.0.0.0/0", "default"):
                    facts["gateway"] = r["gateway"]
            facts["dns"] += s.get("dns_nameservers") or []
            facts["search"] += s.get("dns_search") or []
        facts["dns"] += state["dns_nameservers"]
        facts["search"] += state["dns_searchdomains"]
        facts["mode"] = sorted(facts["mode"])
        facts["dns"] = sorted(set(facts["dns"]))
        facts["search"] = sorted(set(facts["search"]))
        out[iface["mac_address"]] = facts
    return out


def identity(result):
    """What must not depend on the face or the version."""
    return {
        "ok": result["ok"],
        "instance_id": result["instance_id"],
        "local_hostname": result["local_hostname"],
        "public_keys": sorted(result["public_keys"] or []),
        "userdata_raw": result["userdata_raw"],
        "vendordata_raw": result["vendordata_raw"],
        "meta": (result["metadata"] or {}).get("meta"),
    }


def paths_requested(result, prefix=MDS):
    return [(e["method"], e["url"][len(prefix):], e["status"]) for e in result["requests"]
            if e["url"].startswith(prefix)]


# What cloud-init may warn about. 25.x deprecates the datasource name in the
# serial `ds=nocloud-net;s=...` (to go in 29.1), but 22.4 needs that spelling
# (test_nocloud_serial_spelling).
KNOWN_WARNINGS = (re.compile(r"The 'nocloud-net' datasource name is deprecated"),)


def warnings(result):
    return [line for line in result["_stderr"].splitlines()
            if re.search(r"\[(WARNING|ERROR|CRITICAL)\]:", line)
            and not any(k.search(line) for k in KNOWN_WARNINGS)]


def check_ok(runs):
    for face, result in runs.items():
        assert result["ok"] is True and result["_exit"] == 0, (
            face, result["errors"], result["_stderr"][-4000:])
        assert warnings(result) == [], (face, warnings(result))


# ---------------------------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
def test_every_face_gives_the_same_instance(static_lab, version_env, version):
    guest = static_lab.guests["vm-static"]
    runs = static_lab.runs(guest, version, version_env(version))
    check_ok(runs)
    expected = {
        "ok": True,
        "instance_id": guest.uuid,  # the domain UUID (EC2 alone keeps i-<17 hex>)
        "local_hostname": guest.name,  # cloud-init takes the short name
        "public_keys": sorted(list(KEYS.values()) + [OWN_KEY]),
        "userdata_raw": (f"#cloud-config\nfqdn: {guest.name}.{DOMAIN}\nwrite_files:\n"
                         f"  - path: /run/marker\n    content: \"{guest.name} blue\"\n"),
        "vendordata_raw": VENDOR_DATA,
        "meta": {"role": "web", "tier": "front"},
    }
    for face, result in runs.items():
        assert identity(result) == expected, face
        assert result["errors"] == {}, (face, result["errors"])
        assert result["dsmode"] == "net", face
        md = result["metadata"]
        assert md["instance-id"] == guest.uuid
        assert md["local-hostname"] == f"{guest.name}.{DOMAIN}", face
    # OpenStack and ConfigDrive compare instance-id with the SMBIOS uuid at each boot
    for face in ("openstack", "configdrive"):
        assert runs[face]["check_instance_id"] is True, face
        assert runs[face]["availability_zone"] == "mds-1a", face
        # vendor data once: nova's vendor_data2.json has no top-level "cloud-init"
        assert runs[face]["vendordata2_raw"] is None, face
        assert runs[face]["metadata"]["uuid"] == guest.uuid
        assert runs[face]["metadata"]["name"] == guest.name
        assert runs[face]["injected_files"] in ([], [{}], [None]), face
        # the EC2 tree beside it (HTTP crawl, or ec2/latest/meta-data.json on the drive)
        ec2 = runs[face]["ec2_metadata"]
        assert ec2["instance-id"] == f"i-{guest.uuid.replace('-', '')[:17]}", face
        assert ec2["local-ipv4"] == guest.ip, face
    assert runs["openstack"]["cloud_name"] == runs["openstack"]["platform"] == "openstack"
    assert runs["openstack"]["subplatform"] == f"metadata ({MDS})"
    assert runs["nocloud-net"]["platform"] == "nocloud"
    # "dmi": the seedfrom came from the SMBIOS serial
    assert runs["nocloud-net"]["subplatform"] == f"seed-dir (dmi,{NOCLOUD_URL})"
    for face in SEED_FACES:
        seed = runs[face]["seed"]
        # cloud-init's own discovery (blkid by label and type) found the image
        assert seed["iso"] and seed["device"] in seed["discovered"], seed
        assert runs[face]["subplatform"] == f"config-disk ({seed['device']})"
        assert runs[face]["requests"] == []  # a seed image needs no network
    assert runs["configdrive"]["platform"] == "configdrive"
    assert runs["nocloud"]["platform"] == "nocloud"


@pytest.mark.parametrize("version", VERSIONS)
def test_static_network_config_on_every_face(static_lab, version_env, version):
    guest = static_lab.guests["vm-static"]
    runs = static_lab.runs(guest, version, version_env(version))
    check_ok(runs)
    want = {"mode": ["static"], "addresses": [f"{guest.ip}/16"], "gateway": GATEWAY,
            "dns": [GATEWAY]}
    for face, result in runs.items():
        if no_network_config(version, face):
            assert result["network_config"] is None, result["network_config"]
            continue
        facts = net_facts(result)
        assert list(facts) == [guest.mac], (face, facts)
        got = dict(facts[guest.mac])
        assert got.pop("search") == [], face  # nova's format has none: no face gives one
        assert got == want, (face, result["network_config"])
        rendered = result["network"]
        assert f"{guest.ip}/16" in rendered["netplan"], rendered["netplan"]
        assert f"address {guest.ip}/16" in rendered["eni"], rendered["eni"]
        assert guest.mac in rendered["netplan"]
    # OpenStack formats are converted with the NIC named by its MAC (the guest's eth0)
    for face in ("openstack", "configdrive"):
        eth = [c for c in runs[face]["network_config"]["config"] if c["type"] == "physical"]
        assert [(c["name"], c["mac_address"]) for c in eth] == [("eth0", guest.mac)]


@pytest.mark.parametrize("version", VERSIONS)
def test_dhcp_and_none_network_config(dhcp_lab, version_env, version):
    env = version_env(version)
    guest = dhcp_lab.guests["vm-dhcp"]
    runs = dhcp_lab.runs(guest, version, env)
    check_ok(runs)
    for face, result in runs.items():
        if no_network_config(version, face):
            assert result["network_config"] is None, result["network_config"]
            continue
        facts = net_facts(result)
        # DHCP gives the DNS servers: no face pins any beside it
        assert facts == {guest.mac: {"mode": ["dhcp"], "addresses": [], "gateway": None,
                                     "dns": [], "search": []}}, (face, facts)
        assert "dhcp4: true" in result["network"]["netplan"], result["network"]["netplan"]
        assert "inet dhcp" in result["network"]["eni"], result["network"]["eni"]
    # network none: no network config at all, cloud-init falls back to DHCP on its first NIC
    none = dhcp_lab.guests["vm-none"]
    runs = dhcp_lab.runs(none, version, env)
    check_ok(runs)
    for face, result in runs.items():
        assert result["network_config"] is None and result["network"] is None, face
        assert result["errors"] == {}, (face, result["errors"])
        assert sorted(result["public_keys"]) == sorted(KEYS.values()), face
    assert ("GET", "/openstack/2018-08-27/network_data.json", 404) in \
        paths_requested(runs["openstack"])


@pytest.mark.parametrize("version", VERSIONS)
def test_what_each_face_fetches(static_lab, version_env, version):
    guest = static_lab.guests["vm-static"]
    runs = static_lab.runs(guest, version, version_env(version))
    check_ok(runs)
    nocloud = paths_requested(runs["nocloud-net"])
    files = ["meta-data", "user-data", "vendor-data"]
    if version == "22.4":
        assert nocloud == [("GET", f"/nocloud/{f}", 200) for f in files], nocloud
        assert not any("network-config" in p for _, p, _ in nocloud)  # 22.4 never asks
    else:
        assert sorted(nocloud) == sorted(("GET", f"/nocloud/{f}", 200)
                                         for f in files + ["network-config"]), nocloud
    openstack = paths_requested(runs["openstack"])
    # the probe, then the version list (the same URL), then the files
    assert openstack[:2] == [("GET", "/openstack", 200)] * 2, openstack
    v = "2018-08-27"  # the newest cloud-init knows of those listed
    assert openstack[2:7] == [("GET", f"/openstack/{v}/{f}", 200) for f in (
        "meta_data.json", "user_data", "vendor_data.json", "vendor_data2.json",
        "network_data.json")], openstack
    assert openstack[7] == ("GET", "/latest/meta-data/", 200)  # then the EC2 crawl
    assert all(status == 200 for _, _, status in openstack), openstack
    others = [e for e in runs["openstack"]["requests"] if not e["url"].startswith(MDS)]
    # 25.1 also tries nova's IPv6 link-local address (nothing answers there)
    assert all(e["url"].startswith("http://[fe80::a9fe:a9fe%25") for e in others), others
    assert bool(others) == (version != "22.4")


def test_versions_agree(static_lab, version_env):
    guest = static_lab.guests["vm-static"]
    by_version = {v: static_lab.runs(guest, v, version_env(v)) for v in VERSIONS}
    first = by_version[VERSIONS[0]]
    for v, runs in by_version.items():
        assert runs["openstack"]["version"].startswith(v + ".")
        for face in FACES:
            assert identity(runs[face]) == identity(first[face]), (v, face)
            if not any(no_network_config(w, face) for w in VERSIONS):
                assert net_facts(runs[face]) == net_facts(first[face]), (v, face)


@pytest.mark.parametrize("version", VERSIONS)
def test_odd_meta_values_survive_every_face(static_lab, version_env, version):
    guest = static_lab.guests["vm-meta"]
    runs = static_lab.runs(guest, version, version_env(version))
    check_ok(runs)
    for face, result in runs.items():
        assert result["metadata"]["meta"] == ODD_META, face
        assert result["instance_id"] == guest.uuid, face


@pytest.mark.parametrize("version", VERSIONS)
def test_nocloud_serial_spelling(static_lab, version_env, version):
    """Why the serial says ds=nocloud-net: with ds=nocloud;s=http://... 22.4
    fetches the seed but takes dsmode local, so its network stage exits
    without using it; 25.1 takes dsmode net from the http:// scheme."""
    guest = static_lab.guests["vm-static"]
    cmd = [SYSTEM_PYTHON, CLIENT, "--ds", "nocloud-net", "--url", NOCLOUD_URL,
           "--uuid", guest.uuid, "--serial", f"ds=nocloud;s={NOCLOUD_URL}"]
    r = subprocess.run(exec_in(guest.ns, cmd), capture_output=True, text=True, timeout=120,
                       env=version_env(version))
    result = json.loads(r.stdout)
    assert result["ok"] is True and result["instance_id"] == guest.uuid, r.stderr[-3000:]
    assert result["dsmode"] == ("local" if version == "22.4" else "net")
