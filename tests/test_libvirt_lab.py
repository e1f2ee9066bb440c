"""The libvirt lab (a real libvirtd in namespaces of its own) and the shipped mds network.

The privileged tests need root and the packages in libvirt_lab.APT_PACKAGES;
they skip otherwise, or fail under MDSERVER_REQUIRE_PRIVILEGED=1. They also
check that the lab leaves the host's libvirt alone: its configuration is
neither seen nor changed, no directory or mount appears on the host, and a
libvirt daemon already running is not disturbed.
"""

import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest

from helpers import need
from libvirt_lab import (APT_PACKAGES, ETC_LIBVIRT, PRIVATE_DIRS, LibvirtLab, domain_definition,
                         missing_prerequisites, rename_network, running_libvirt_daemons,
                         snapshot_tree, tree_differences)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NETWORK_XML = os.path.join(REPO, "etc", "libvirt", "mds-network.xml")

UUID = "ec2a1b2c-1111-4222-8333-444455556666"
MAC = "52:54:00:12:34:56"
METADATA = ("<mds:instance xmlns:mds='http://example.org/mdserver/1'>"
            "<mds:hostname>web1</mds:hostname></mds:instance>")

# Records every call: the arguments on one line of calls.log, stdin in <op>.xml.
RECORDING_HOOK = """#!/bin/sh
set -e
echo "$*" >> {out}/calls.log
echo "$0" > {out}/argv0
cat > {out}/$2.xml
"""


def need_lab() -> None:
    need(os.geteuid() == 0, "needs root to run a real libvirtd")
    missing = missing_prerequisites()
    need(not missing, "libvirt lab prerequisites missing: " + "; ".join(missing)
         + " (apt-get install --no-install-recommends " + " ".join(APT_PACKAGES) + ")")


def shipped_network(lab: LibvirtLab):
    """(network name, bridge name) of a started, renamed copy of mds-network.xml."""
    name, bridge = lab.name("net"), lab.name("br", 15)
    with open(NETWORK_XML) as f:
        lab.define_network(rename_network(f.read(), name, bridge))
    return name, bridge


def host_has_link(name: str) -> bool:
    return os.path.exists(f"/sys/class/net/{name}")


def host_view():
    """What the lab must not change on the host: /etc/libvirt exactly, which
    of the libvirt state directories exist, and the mount table."""
    with open("/proc/self/mountinfo") as f:
        mounts = sorted(" ".join(line.split()[3:5]) for line in f)
    # `ip netns add` (the lab's own network namespace) mounts under /run/netns
    mounts = [m for m in mounts if not m.split()[1].startswith("/run/netns")]
    return {"etc": snapshot_tree(ETC_LIBVIRT),
            "dirs": {d: os.path.lexists(d) for d in PRIVATE_DIRS},
            "mounts": mounts}


def assert_host_unchanged(before) -> None:
    now = host_view()
    assert tree_differences(before["etc"], now["etc"]) == []
    assert now["dirs"] == before["dirs"]
    assert now["mounts"] == before["mounts"]


@pytest.fixture
def hook_out(tmp_path):
    out = tmp_path / "hook"
    out.mkdir()
    return out


def read_calls(out) -> list:
    path = out / "calls.log"
    return path.read_text().splitlines() if path.exists() else []


# -- without privileges ------------------------------------------------------


@pytest.mark.unit
def test_shipped_network_xml():
    root = ET.parse(NETWORK_XML).getroot()
    assert root.findtext("name") == "mds"
    assert root.find("forward").get("mode") == "nat"
    assert root.find("bridge").get("name") == "br-mds"
    assert root.find("dns").get("enable") == "no"
    ips = [(ip.get("address"), ip.get("prefix")) for ip in root.findall("ip")]
    assert ips == [("10.122.0.1", "16"), ("169.254.169.254", "32"), ("fe80::a9fe:a9fe", "64")]
    assert root.find(".//dhcp") is None, "libvirt must not run DHCP: our dnsmasq does"


@pytest.mark.unit
def test_rename_network():
    with open(NETWORK_XML) as f:
        renamed = ET.fromstring(rename_network(f.read(), "mdt-net-x", "mdt-br-x"))
    assert renamed.findtext("name") == "mdt-net-x"
    assert renamed.find("bridge").get("name") == "mdt-br-x"
    assert len(renamed.findall("ip")) == 3


@pytest.mark.unit
def test_domain_definition():
    root = ET.fromstring(domain_definition("mdt-vm", UUID, MAC, "mdt-net", METADATA))
    assert root.get("type") == "qemu"
    assert root.findtext("uuid") == UUID
    entries = {e.get("name"): e.text for e in root.find("sysinfo/system")}
    assert entries == {"serial": UUID, "uuid": UUID}
    assert root.find("os/smbios").get("mode") == "sysinfo"
    iface = root.find("devices/interface")
    assert iface.get("type") == "network"
    assert iface.find("source").get("network") == "mdt-net"
    assert iface.find("mac").get("address") == MAC
    assert root.find("metadata/{http://example.org/mdserver/1}instance") is not None
    assert root.find("devices/disk") is None


@pytest.mark.unit
def test_missing_prerequisites_is_a_list_of_reasons():
    missing = missing_prerequisites()
    assert isinstance(missing, list) and all(isinstance(m, str) for m in missing)
    assert "libvirt-daemon-driver-qemu" in APT_PACKAGES


@pytest.mark.unit
def test_tree_differences(tmp_path):
    root = tmp_path / "etc"
    (root / "hooks" / "qemu.d").mkdir(parents=True)
    (root / "qemu.conf").write_text("user = 'x'\n")
    (root / "link").symlink_to("qemu.conf")
    before = snapshot_tree(str(root))
    assert tree_differences(before, snapshot_tree(str(root))) == []
    (root / "qemu.conf").chmod(0o600)
    (root / "hooks" / "qemu.d" / "mdt-new").write_text("new")
    (root / "link").unlink()
    (root / "link").symlink_to("elsewhere")
    diffs = tree_differences(before, snapshot_tree(str(root)))
    assert "added: hooks/qemu.d/mdt-new" in diffs
    assert "changed: qemu.conf (mode)" in diffs
    assert "changed: link (mtime_ns, content)" in diffs
    assert tree_differences(None, None) == []
    assert tree_differences(before, None) == ["tree present before, absent after"]


# -- with a real libvirtd ----------------------------------------------------


@pytest.mark.privileged
def test_shipped_network_starts_with_both_addresses_in_a_namespace():
    need_lab()
    with open("/proc/sys/net/ipv4/ip_forward") as f:
        host_forward = f.read()
    with LibvirtLab() as lab:
        print(f"libvirtd answered after {lab.startup_seconds:.2f} s")
        name, bridge = shipped_network(lab)
        info = dict(line.split(":", 1) for line in lab.virsh("net-info", name).splitlines()
                    if ":" in line)
        assert info["Active"].strip() == "yes"
        assert info["Bridge"].strip() == bridge
        assert sorted(lab.addresses(bridge)) == ["10.122.0.1/16", "169.254.169.254/32",
                                                 "fe80::a9fe:a9fe/64"]
        # libvirt starts no dnsmasq when DNS is off and no DHCP range is given,
        # and no router advertisements for the link-local IPv6 address
        assert [c for _p, c in lab.processes() if c in ("dnsmasq", "radvd")] == []
        dumped = ET.fromstring(lab.virsh("net-dumpxml", name))
        assert dumped.find(".//dhcp") is None
        assert dumped.find("dns").get("enable") == "no"
        # everything stays in the lab's namespace
        assert not host_has_link(bridge)
        with open("/proc/sys/net/ipv4/ip_forward") as f:
            assert f.read() == host_forward
        # a second lab at the same time is a world of its own
        with LibvirtLab() as other:
            assert other.virsh("net-list", "--all", "--name").split() == []
            assert other.uri != lab.uri
        assert lab.virsh("net-list", "--all", "--name").split() == [name]
    assert not host_has_link(bridge)


@pytest.mark.privileged
def test_domain_starts_and_stops_and_hook_sees_full_xml(hook_out):
    need_lab()
    before = host_view()
    lab = LibvirtLab(hooks={"mdt-record": RECORDING_HOOK.format(out=hook_out)})
    with lab:
        net, _bridge = shipped_network(lab)
        dom = lab.name("vm")
        seconds = lab.start_domain(dom, UUID, MAC, net, metadata_xml=METADATA)
        print(f"libvirtd up in {lab.startup_seconds:.2f} s; virsh start took {seconds:.2f} s")
        assert lab.domain_state(dom) == "running"
        assert "qemu-system-x86" in [c for _p, c in lab.processes()]
        live = ET.fromstring(lab.domain_xml(dom))
        assert live.find("devices/interface/mac").get("address") == MAC

        calls = read_calls(hook_out)
        assert calls[0] == f"{dom} prepare begin -"
        assert f"{dom} start begin -" in calls and f"{dom} started begin -" in calls
        # as libvirtd sees it, the hook is in /etc/libvirt/hooks/qemu.d
        assert (hook_out / "argv0").read_text().strip() == \
            os.path.join(ETC_LIBVIRT, "hooks", "qemu.d", "mdt-record")
        got = ET.parse(hook_out / "prepare.xml").getroot()
        assert got.tag == "domain"
        assert got.findtext("name") == dom
        assert got.findtext("uuid") == UUID
        assert got.find("devices/interface/source").get("network") == net
        assert got.find("devices/interface/mac").get("address") == MAC
        assert got.find("metadata/{http://example.org/mdserver/1}instance")\
            .findtext("{http://example.org/mdserver/1}hostname") == "web1"
        serial = [e.text for e in got.find("sysinfo/system") if e.get("name") == "serial"]
        assert serial == [UUID]

        lab.destroy_domain(dom)
        assert lab.domain_state(dom) == "shut off"
        calls = read_calls(hook_out)
        assert f"{dom} stopped end -" in calls and f"{dom} release end -" in calls
        assert "qemu-system-x86" not in [c for _p, c in lab.processes()]
        pids = [lab.libvirtd_pid, lab.virtlogd_pid, lab.holder.pid]
        assert_host_unchanged(before)  # while it runs, too

    # nothing left behind
    assert_host_unchanged(before)
    assert lab.netns not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                           text=True).stdout
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or \
            open(f"/proc/{pid}/stat").read().split(") ")[1][0] in "ZX"
    assert not [p for p, _n in running_libvirt_daemons() if p in pids]
    assert not os.path.exists(lab.tmpdir)
    assert "libvirt version" in lab.diagnostics()


@pytest.mark.privileged
def test_the_hosts_libvirt_is_neither_seen_nor_changed(hook_out):
    """Inside the lab, /etc/libvirt holds only the lab's files and /run only
    the lab's libvirt directory (no host socket); on the host nothing
    appears, not even a mount point."""
    need_lab()
    before = host_view()
    with LibvirtLab(hooks={"mdt-record": RECORDING_HOOK.format(out=hook_out)}) as lab:
        seen = lab.run_in(["ls", "-A", ETC_LIBVIRT]).stdout.split()
        assert sorted(seen) == ["hooks", "nwfilter", "qemu", "qemu.conf", "secrets", "storage"]
        assert lab.run_in(["ls", "-A", f"{ETC_LIBVIRT}/hooks/qemu.d"]).stdout.split() == \
            ["mdt-record"]
        # the lab's libvirt, and util-linux's mount bookkeeping: nothing of the host's
        assert set(lab.run_in(["ls", "-A", "/run"]).stdout.split()) <= {"libvirt", "mount"}
        assert os.path.exists(lab.private("/run/libvirt") + "/libvirt-sock")
        for d in ("/var/lib/libvirt", "/var/log/libvirt", "/var/cache/libvirt"):
            marker = f"{d}/mdt-private-{lab.tag}"
            lab.run_in(["touch", marker])
            assert os.path.exists(lab.private(d) + f"/mdt-private-{lab.tag}")
            assert not os.path.exists(marker)
        # the hook sees the same world as libvirtd
        net, _bridge = shipped_network(lab)
        lab.start_domain(lab.name("vm"), UUID, MAC, net)
        assert read_calls(hook_out)[0].endswith("prepare begin -")
        assert_host_unchanged(before)
    assert_host_unchanged(before)


@pytest.mark.privileged
def test_hook_added_while_running(hook_out):
    """Checks what DESIGN.md section 4 says about new hooks, for libvirt 9.0."""
    need_lab()
    # no qemu hook when libvirtd started: a new one is ignored until SIGHUP
    with LibvirtLab() as lab:
        net, _bridge = shipped_network(lab)
        dom = lab.define_domain(domain_definition(lab.name("vm"), UUID, MAC, net))
        lab.install_hook("mdt-late", RECORDING_HOOK.format(out=hook_out), reload=False)
        lab.virsh("start", dom)
        lab.virsh("destroy", dom)
        assert read_calls(hook_out) == [], "libvirtd called a hook it had not scanned"
        lab.reload()  # SIGHUP
        lab.virsh("start", dom)
        assert read_calls(hook_out)[0] == f"{dom} prepare begin -"
    # a qemu hook existed at start: qemu.d is listed at every call
    (hook_out / "calls.log").unlink()
    with LibvirtLab(hooks={"mdt-early": "#!/bin/sh\ncat >/dev/null\n"}) as lab:
        net, _bridge = shipped_network(lab)
        dom = lab.define_domain(domain_definition(lab.name("vm"), UUID, MAC, net))
        lab.install_hook("mdt-late", RECORDING_HOOK.format(out=hook_out), reload=False)
        lab.virsh("start", dom)
        assert read_calls(hook_out)[0] == f"{dom} prepare begin -"


@pytest.mark.privileged
def test_runs_beside_another_libvirt_daemon_and_leaves_it_alone(tmp_path):
    """On a hypervisor a libvirtd runs already: the lab starts anyway, with
    its own, and never signals the other."""
    need_lab()
    fake = tmp_path / "libvirtd"  # its /proc comm is "libvirtd"
    shutil.copy(shutil.which("sleep"), fake)
    before = host_view()
    proc = subprocess.Popen([str(fake), "60"])
    try:
        deadline = time.monotonic() + 5
        while proc.pid not in [p for p, _n in running_libvirt_daemons()]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with LibvirtLab() as lab:
            assert "libvirt" in lab.virsh("version").lower()
            assert lab.libvirtd_pid != proc.pid
        assert proc.poll() is None, "the lab touched a daemon it did not start"
        assert_host_unchanged(before)
    finally:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v", "-s"]))
