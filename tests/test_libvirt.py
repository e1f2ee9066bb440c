"""A real libvirtd runs the installed hook: starting a domain registers it, and then a
guest with its MAC gets its address and name from mdserver's dnsmasq and its metadata.

libvirtd, the `mds` network (etc/libvirt/mds-network.xml, renamed), mdserver
and its dnsmasq all run in the libvirt lab's network namespace
(tests/libvirt_lab.py), so the bridge, 10.122.0.1/16 and 169.254.169.254
exist only there. The hook file is a two-line shim that runs the real
hooks/qemu with MDSERVER_CONFIG pointing at the test's configuration (libvirt
clears the environment of hooks), and its syslog and fallback socket at paths
of the test's own.
"""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from helpers import Notify, mds_metadata, need, need_root, write_config
from daemon import ROOT, Daemon
from mdserver import adminclient
from netns import Lab, exec_in, start_dnsmasq
from test_dnsmasq_live import DHCP_SCRIPT, resolve

pytestmark = pytest.mark.privileged

try:
    from libvirt_lab import LibvirtLab, missing_prerequisites, rename_network
except ImportError:  # pragma: no cover
    LibvirtLab = None

HOOK = os.path.join(ROOT, "hooks", "qemu")
NETWORK_XML = os.path.join(ROOT, "etc", "libvirt", "mds-network.xml")
VM1 = ("ec2c0001-aaaa-4bbb-8ccc-000000000001", "52:54:00:c0:00:01")
VM2 = ("ec2c0002-aaaa-4bbb-8ccc-000000000002", "52:54:00:c0:00:02")
VM3 = ("ec2c0003-aaaa-4bbb-8ccc-000000000003", "52:54:00:c0:00:03")


@pytest.fixture
def world(tmp_path):
    need_root()
    need(LibvirtLab is not None and not missing_prerequisites(),
         f"needs libvirt and qemu: {LibvirtLab and missing_prerequisites()}")
    conf = str(tmp_path / "mdserver.conf")
    # Every path the hook may use is the test's: its log lines go to a
    # socket nobody listens on (so to stderr, into libvirtd's log), not to the
    # host's syslog; its fallback socket is not the host's mdserver.
    shim = (f"#!/bin/sh\nMDSERVER_CONFIG={conf} MDSERVER_HOOK_SYSLOG={tmp_path}/no-syslog "
            f"MDSERVER_HOOK_DEFAULT_SOCKET={tmp_path}/no-default.sock "
            f'exec /usr/bin/python3 {HOOK} "$@"\n')
    with LibvirtLab(hooks={"mdserver": shim}) as lab:
        net, br = lab.name("net"), lab.name("br", 15)
        write_config(tmp_path, f"[dnsmasq]\nnet_name = {net}\ninterface = {br}\n"
                               "domain = mds.test\nuse_dns = yes\nlease_len = 600\n"
                               "upstream_servers = 127.0.0.1\n",
                     listen_address="169.254.169.254", port=80, access_log="yes",
                     logfile=str(tmp_path / "mdserver.log"))
        notify = Notify(str(tmp_path / "notify.sock"))
        procs = []
        w = type("World", (), {})()
        w.lab, w.net, w.br, w.tmp, w.notify = lab, net, br, tmp_path, notify
        w.admin = str(tmp_path / "admin.sock")

        def start_mdserver():
            d = Daemon(conf, "169.254.169.254", 80, env={"NOTIFY_SOCKET": notify.path},
                       netns=lab.netns)
            procs.append(d)
            return d
        w.start_mdserver = start_mdserver
        guests = Lab.attach(lab.netns, br)
        w.guests = guests
        try:
            yield w
        finally:
            for p in procs:
                if isinstance(p, Daemon):
                    p.stop()
            for p in getattr(w, "dnsmasq", []):
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
                    p.wait(10)
            guests.close()
            notify.sock.close()


def registered(w):
    return {r["uuid"]: r for r in adminclient.call(w.admin, "GET", "/instances")}


def test_domain_start_registers_then_guest_gets_address_name_and_metadata(world):
    w = world
    md = w.start_mdserver()
    # Boot order: the bridge does not exist yet; mdserver is up for
    # registrations and waits for 169.254.169.254.
    first = w.notify.next()
    assert first.startswith("READY=1\nSTATUS=waiting for 169.254.169.254"), md.output()
    w.lab.define_network(rename_network(open(NETWORK_XML).read(), w.net, w.br))
    # fe80::a9fe:a9fe: cloud-init >= 24.2 also asks OpenStack's IPv6 address;
    # there it is refused at once instead of waiting out a timeout.
    assert sorted(w.lab.addresses(w.br)) == ["10.122.0.1/16", "169.254.169.254/32",
                                             "fe80::a9fe:a9fe/64"]
    assert w.notify.next().startswith("READY=1\nSTATUS=serving on 169.254.169.254:80")

    base = w.lab.start_domain(w.lab.name("vm"), *VM1, w.net,
                              metadata_xml=mds_metadata(template="special.yaml"))
    rec = registered(w)[VM1[0]]
    assert rec["mac"] == VM1[1] and rec["template"] == "special.yaml"
    (w.tmp / "userdata" / "special.yaml").write_text(
        "#cloud-config\nwrite_files:\n  - path: /marker\n    content: {{name}}\n")

    # dnsmasq from the generated mds.conf, in the namespace of the bridge
    w.dnsmasq = [start_dnsmasq(w.lab.netns, w.tmp / "dnsmasq", w.tmp / "dnsmasq.log")]

    # The VM itself has no disk; take it off the bridge and play it with a
    # namespace that has its MAC.
    w.lab.destroy_domain(w.lab.domains[0])
    script = w.tmp / "udhcpc.sh"
    script.write_text(DHCP_SCRIPT)
    script.chmod(0o755)
    ns = w.guests.guest(1, VM1[1])
    r = subprocess.run(exec_in(ns, ["busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-f",
                                    "-O", "staticroutes", "-t", "5", "-T", "1",
                                    "-s", str(script)]),
                       capture_output=True, text=True, timeout=60)
    assert f"BOUND ip={rec['ip']} " in r.stdout, r.stdout + r.stderr
    assert resolve(ns, f"{rec['hostname']}.mds.test") == [rec["ip"]]
    get = lambda path: subprocess.run(exec_in(ns, ["busybox", "wget", "-q", "-O", "-",
                                                   f"http://169.254.169.254{path}"]),
                                      capture_output=True, text=True, timeout=20).stdout
    assert get("/latest/meta-data/local-ipv4") == rec["ip"]
    assert get("/latest/meta-data/local-hostname") == f"{rec['hostname']}.mds.test"
    assert get("/latest/user-data").endswith(f"content: {rec['name']}\n")

    # mdserver down: a domain still starts, and without a noticeable delay
    md.stop()
    down = w.lab.start_domain(w.lab.name("vm"), *VM2, w.net)
    assert w.lab.domain_state(w.lab.domains[-1]) == "running"
    assert down < base + 2.0, (down, base)  # the hook's bound is 2 s; generous margin

    # mdserver hung (accepts, never answers): still within the bound
    hung = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hung.bind(w.admin)
    hung.listen(16)
    try:
        slow = w.lab.start_domain(w.lab.name("vm"), *VM3, w.net)
    finally:
        hung.close()
        os.unlink(w.admin)
    assert w.lab.domain_state(w.lab.domains[-1]) == "running"
    assert slow < base + 2.0, (slow, base)
    w.timings = {"hook_ok": base, "hook_down": down, "hook_hung": slow}
    print("virsh start seconds:", w.timings)


def test_prune_asks_the_real_libvirtd(world):
    w = world
    w.start_mdserver()
    assert w.notify.next().startswith("READY=1")
    w.lab.define_network(rename_network(open(NETWORK_XML).read(), w.net, w.br))
    keep, gone = w.lab.name("vm"), w.lab.name("vm")
    w.lab.start_domain(keep, *VM1, w.net)
    w.lab.start_domain(gone, *VM2, w.net)
    assert set(registered(w)) == {VM1[0], VM2[0]}
    w.lab.virsh("destroy", gone)
    w.lab.virsh("undefine", gone)
    w.lab.domains.remove(gone)
    ctl = [sys.executable, "-m", "mdserver.ctl", "-c", str(w.tmp / "mdserver.conf"), "prune",
           "--connect", w.lab.uri, "--json"]
    r = subprocess.run(ctl, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert [x["uuid"] for x in json.loads(r.stdout)] == [VM2[0]], r.stderr
    r = subprocess.run(ctl + ["--yes"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    assert set(registered(w)) == {VM1[0]}
