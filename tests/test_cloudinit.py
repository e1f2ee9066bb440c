"""Debian's real cloud-init DataSourceEc2 against the real daemon, over a real network.

The daemon runs in a network namespace on 169.254.169.254:80, as in
production; each guest is a namespace on the bridge with its registered MAC
and address, running tests/cloudinit_client.py with /usr/bin/python3.
Only cloud-init's platform-detection function (_collect_platform_data, which
reads SMBIOS) is patched there; everything else is cloud-init's own code.
"""

import json
import os
import socket
import subprocess

import pytest

from helpers import make_instance, need, need_root, write_config
from daemon import Daemon
from mdserver.store import Store
from netns import Lab, exec_in

pytestmark = pytest.mark.privileged

HERE = os.path.dirname(os.path.abspath(__file__))
CLIENT = os.path.join(HERE, "cloudinit_client.py")
SYSTEM_PYTHON = "/usr/bin/python3"
KEYS = {"admin": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAdmin admin@host",
        "ops": "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQOps ops@host"}
KVM = make_instance(21, ipv4="10.122.0.21")
AWS = make_instance(22, ipv4="10.122.0.22")
ROOT_TEMPLATE = ("#cloud-config\nhostname: {{hostname}}\nruncmd:\n"
                 "  - [sh, -c, 'echo {{name}} {{colour}} > /run/marker']\n")


def has_cloud_init() -> bool:
    return subprocess.run([SYSTEM_PYTHON, "-c", "import cloudinit.sources.DataSourceEc2"],
                          capture_output=True).returncode == 0


@pytest.fixture
def lab(tmp_path):
    need_root()
    need(has_cloud_init(), "needs Debian's cloud-init package (apt-get install cloud-init)")
    lab = Lab()
    daemons = []

    def start(**md):
        keys = "".join(f"{k} = {v}\n" for k, v in KEYS.items())
        path = write_config(tmp_path, f"[public-keys]\n{keys}[template-data]\ncolour = blue\n"
                                      "[dnsmasq]\ndomain = mds.test\n",
                            listen_address="169.254.169.254", port=80, access_log="yes",
                            logfile=str(tmp_path / "mdserver.log"), **md)
        (tmp_path / "userdata" / f"{KVM.name}.yaml").write_text(ROOT_TEMPLATE)
        store = Store(str(tmp_path / "db.json"))
        for inst in (KVM, AWS):
            store.put(inst)
        store.close()
        notify = str(tmp_path / "notify.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(notify)
        sock.settimeout(20)
        d = Daemon(path, "169.254.169.254", 80, env={"NOTIFY_SOCKET": notify},
                   netns=lab.host)
        daemons.append(d)
        try:
            assert sock.recv(256).startswith(b"READY=1\nSTATUS=serving"), d.output()
        finally:
            sock.close()
        return d
    lab.start = start
    lab.logfile = tmp_path / "mdserver.log"
    yield lab
    for d in daemons:
        d.stop()
    lab.close()


def run_client(lab, inst, platform):
    ns = lab.guest(int(inst.ipv4.rsplit(".", 1)[1]), inst.mac, inst.ipv4)
    r = subprocess.run(exec_in(ns, [SYSTEM_PYTHON, CLIENT, "--url", "http://169.254.169.254",
                                    "--platform", platform, "--timeout", "10"]),
                       capture_output=True, text=True, timeout=180)
    assert r.stdout, r.stderr[-3000:]
    return r.returncode, json.loads(r.stdout), r.stderr


def guest_requests(lab, ip):
    """(method, path, status, token sent?) of every request `ip` made, in order."""
    out = []
    for line in lab.logfile.read_text().splitlines():
        _, sep, entry = line.partition(" mdserver.access: ")
        if sep and entry.startswith(ip + " "):
            # the line's own words, then its key=value fields (logs.fields)
            _, method, path, status, token = entry.split(" ")[:5]
            out.append((method, path, status, token.split("=")[1]))
    return out


def check_common(result, inst):
    md = result["metadata"]
    assert result["ok"] is True
    assert md["instance-id"] == inst.instance_id == result["instance_id"]
    assert md["local-hostname"] == f"{inst.name}.mds.test"
    assert result["local_hostname"] == inst.name  # cloud-init takes the short name
    assert md["local-ipv4"] == inst.ipv4
    assert md["public-keys"] == KEYS
    assert sorted(result["public_keys"]) == sorted(KEYS.values())
    assert md["placement"]["availability-zone"] == "mds-1a"
    assert result["availability_zone"] == "mds-1a" and result["region"] == "mds-1"
    for value in (md["instance-id"], md["local-hostname"], result["availability_zone"]):
        assert isinstance(value, str)  # a trailing newline would have made it a list
    mac = md["network"]["interfaces"]["macs"][inst.mac]
    assert mac["local-ipv4s"] == inst.ipv4 and mac["device-number"] == "0"
    eth = result["network_config"]["ethernets"]
    assert [e["match"]["macaddress"] for e in eth.values()] == [inst.mac]
    assert all(e["dhcp4"] is True for e in eth.values())
    assert result["api_version"] == "2021-03-23"


def test_plain_kvm_guest_tokenless(lab):
    lab.start()
    code, result, err = run_client(lab, KVM, "kvm")
    assert code == 0, err[-3000:]
    check_common(result, KVM)
    assert result["cloud_name"] == "unknown"
    assert result["userdata_raw"] == (
        f"#cloud-config\nhostname: {KVM.name}\nruncmd:\n"
        f"  - [sh, -c, 'echo {KVM.name} blue > /run/marker']\n")
    seen = guest_requests(lab, KVM.ipv4)
    assert seen[0] == ("GET", "/2009-04-04/meta-data/instance-id", "200", "no")
    assert ("GET", "/2021-03-23/user-data", "200", "no") in seen
    assert all(token == "no" for *_, token in seen)
    assert all(status == "200" for _, _, status, _ in seen), seen


def test_aws_guest_token_first(lab):
    lab.start()
    code, result, err = run_client(lab, AWS, "aws")
    assert code == 0, err[-3000:]
    check_common(result, AWS)
    assert result["cloud_name"] == "aws"
    assert result["identity"]["instanceId"] == AWS.instance_id
    assert result["identity"]["privateIp"] == AWS.ipv4
    assert result["userdata_raw"].startswith("#cloud-config\n")
    assert f'hostname: "{AWS.name}"' in result["userdata_raw"]
    seen = guest_requests(lab, AWS.ipv4)
    assert seen[0] == ("PUT", "/latest/api/token", "200", "no")
    assert all(token == "yes" for *_, token in seen[1:]) and len(seen) > 10
    assert ("GET", "/2021-03-23/dynamic/instance-identity/document", "200", "yes") in seen


def test_required_tokens_lock_out_non_aws_guests(lab):
    lab.start(imds_tokens="required")
    code, result, _ = run_client(lab, AWS, "aws")
    assert code == 0 and result["metadata"]["instance-id"] == AWS.instance_id
    code, result, _ = run_client(lab, KVM, "kvm")
    assert code == 1 and result["ok"] is False
    assert {s for _, _, s, _ in guest_requests(lab, KVM.ipv4)} == {"401"}

