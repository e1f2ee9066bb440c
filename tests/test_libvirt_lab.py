"""The libvirt lab (a real libvirtd in a namespace) and the shipped mds network.

The privileged tests need root and the packages in libvirt_lab.APT_PACKAGES;
they skip otherwise, or fail under MDSERVER_REQUIRE_PRIVILEGED=1.
"""

import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest

from conftest import need
from libvirt_lab import (APT_PACKAGES, ETC_LIBVIRT, LabRefused, LibvirtLab, domain_definition,
                         missing_prerequisites, rename_network, restore_tree,
                         running_libvirt_daemons, snapshot_tree, tree_differences)

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


def host_qemu_hooks() -> list:
    """Hooks the host has for libvirt's qemu driver."""
    found = []
    if os.path.exists(os.path.join(ETC_LIBVIRT, "hooks", "qemu")):
        found.append("hooks/qemu")
    d = os.path.join(ETC_LIBVIRT, "hooks", "qemu.d")
    if os.path.isdir(d):
        found += ["hooks/qemu.d/" + n for n in sorted(os.listdir(d))]
    return found


def need_lab() -> None:
    need(os.geteuid() == 0, "needs root to run a real libvirtd")
    missing = missing_prerequisites()
    need(not missing, "libvirt lab prerequisites missing: " + "; ".join(missing)
         + " (apt-get install --no-install-recommends " + " ".join(APT_PACKAGES) + ")")
    others = running_libvirt_daemons()
    need(not others, f"a libvirt daemon already runs here ({others}); the lab will not touch it")


def shipped_network(lab: LibvirtLab):
    """(network name, bridge name) of a started, renamed copy of mds-network.xml."""
    name, bridge = lab.name("net"), lab.name("br", 15)
    with open(NETWORK_XML) as f:
        lab.define_network(rename_network(f.read(), name, bridge))
    return name, bridge


def host_has_link(name: str) -> bool:
    return os.path.exists(f"/sys/class/net/{name}")


@pytest.fixture
def hook_out(tmp_path):
    out = tmp_path / "hook"
    out.mkdir()
    return out


def read_calls(out) -> list:
    path = out / "calls.log"
    return path.read_text().splitlines() if path.exists() else []


# -- without privileges ------------------------------------------------------


def test_shipped_network_xml():
    root = ET.parse(NETWORK_XML).getroot()
    assert root.findtext("name") == "mds"
    assert root.find("forward").get("mode") == "nat"
    assert root.find("bridge").get("name") == "br-mds"
    assert root.find("dns").get("enable") == "no"
    ips = [(ip.get("address"), ip.get("prefix")) for ip in root.findall("ip")]
    assert ips == [("10.122.0.1", "16"), ("169.254.169.254", "32")]
    assert root.find(".//dhcp") is None, "libvirt must not run DHCP: our dnsmasq does"


def test_rename_network():
    with open(NETWORK_XML) as f:
        renamed = ET.fromstring(rename_network(f.read(), "mdt-net-x", "mdt-br-x"))
    assert renamed.findtext("name") == "mdt-net-x"
    assert renamed.find("bridge").get("name") == "mdt-br-x"
    assert len(renamed.findall("ip")) == 2


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


def test_missing_prerequisites_is_a_list_of_reasons():
    missing = missing_prerequisites()
    assert isinstance(missing, list) and all(isinstance(m, str) for m in missing)
    assert "libvirt-daemon-driver-qemu" in APT_PACKAGES


def test_snapshot_restore_is_exact(tmp_path):
    root = tmp_path / "etc"
    (root / "hooks" / "qemu.d").mkdir(parents=True)
    (root / "qemu.conf").write_text("user = 'x'\n")
    (root / "qemu.conf").chmod(0o600)
    (root / "hooks" / "qemu.d" / "other").write_text("#!/bin/sh\n")
    (root / "hooks" / "qemu.d" / "other").chmod(0o755)
    (root / "hooks").chmod(0o750)
    (root / "link").symlink_to("qemu.conf")
    (root / "gone").write_text("a")
    if os.geteuid() == 0:
        os.chown(root / "qemu.conf", 1234, 4321)
    before = snapshot_tree(str(root))

    (root / "qemu.conf").write_text("changed\n")
    (root / "qemu.conf").chmod(0o644)
    (root / "hooks" / "qemu.d" / "mdt-new").write_text("new")
    (root / "hooks" / "qemu.d" / "other").chmod(0o644)
    (root / "hooks").chmod(0o755)
    (root / "link").unlink()
    (root / "link").symlink_to("elsewhere")
    (root / "gone").unlink()
    (root / "gone").mkdir()
    (root / "gone" / "deep").write_text("x")
    (root / "qemu" / "networks").mkdir(parents=True)
    if os.geteuid() == 0:
        os.chown(root / "qemu.conf", 0, 0)
    assert tree_differences(before, snapshot_tree(str(root)))

    restore_tree(str(root), before)
    assert tree_differences(before, snapshot_tree(str(root))) == []


def test_restore_only_the_given_paths_keeps_other_changes(tmp_path):
    root = tmp_path / "etc"
    root.mkdir()
    (root / "keep.conf").write_text("original\n")
    before = snapshot_tree(str(root))
    (root / "hooks" / "qemu.d").mkdir(parents=True)      # ours
    (root / "hooks" / "qemu.d" / "mdt-x").write_text("x")
    (root / "keep.conf").write_text("changed by someone else\n")
    (root / "theirs").write_text("installed meanwhile\n")
    restore_tree(str(root), before, only=["hooks"])
    assert not (root / "hooks").exists()
    assert (root / "keep.conf").read_text() == "changed by someone else\n"
    assert (root / "theirs").exists()


def test_snapshot_restore_of_absent_tree(tmp_path):
    root = tmp_path / "absent"
    before = snapshot_tree(str(root))
    assert before is None
    (root / "hooks").mkdir(parents=True)
    restore_tree(str(root), before)
    assert not root.exists()


# -- with a real libvirtd ----------------------------------------------------


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
        assert sorted(lab.addresses(bridge)) == ["10.122.0.1/16", "169.254.169.254/32"]
        # libvirt starts no dnsmasq when DNS is off and no DHCP range is given
        assert [c for _p, c in lab.processes() if c == "dnsmasq"] == []
        dumped = ET.fromstring(lab.virsh("net-dumpxml", name))
        assert dumped.find(".//dhcp") is None
        assert dumped.find("dns").get("enable") == "no"
        # everything stays in the lab's namespace
        assert not host_has_link(bridge)
        with open("/proc/sys/net/ipv4/ip_forward") as f:
            assert f.read() == host_forward
        # only one lab at a time
        with pytest.raises(LabRefused, match="another LibvirtLab"):
            LibvirtLab(lock_timeout=0.3).start()
    assert not host_has_link(bridge)


def test_domain_starts_and_stops_and_hook_sees_full_xml(hook_out):
    need_lab()
    etc_before = snapshot_tree(ETC_LIBVIRT)
    created = [d for d in ("/run/libvirt", "/var/lib/libvirt", "/var/log/libvirt",
                           "/var/cache/libvirt") if not os.path.exists(d)]
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

    # nothing left behind
    assert tree_differences(etc_before, snapshot_tree(ETC_LIBVIRT)) == []
    assert lab.netns not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                           text=True).stdout
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or \
            open(f"/proc/{pid}/stat").read().split(") ")[1][0] in "ZX"
    assert running_libvirt_daemons() == []
    for d in created:
        assert not os.path.exists(d), f"{d} left behind"
    assert not os.path.exists(lab.tmpdir)
    assert "libvirt version" in lab.diagnostics()


def test_hook_in_the_hosts_etc_libvirt_is_restored_exactly(hook_out):
    need_lab()
    if host_qemu_hooks():
        pytest.skip(f"this host has libvirt qemu hooks {host_qemu_hooks()} that would "
                    "run for lab domains with host_hooks=True")
    etc_before = snapshot_tree(ETC_LIBVIRT)
    host_path = os.path.join(ETC_LIBVIRT, "hooks", "qemu.d", "mdt-record")
    with LibvirtLab(hooks={"mdt-record": RECORDING_HOOK.format(out=hook_out)},
                    host_hooks=True) as lab:
        st = os.stat(host_path)
        assert st.st_mode & 0o777 == 0o755
        net, _bridge = shipped_network(lab)
        dom = lab.name("vm")
        lab.start_domain(dom, UUID, MAC, net, metadata_xml=METADATA)
        assert read_calls(hook_out)[0] == f"{dom} prepare begin -"
        assert ET.parse(hook_out / "prepare.xml").getroot().findtext("uuid") == UUID
    assert not os.path.exists(host_path)
    assert tree_differences(etc_before, snapshot_tree(ETC_LIBVIRT)) == []


def test_change_made_by_someone_else_meanwhile_survives():
    need_lab()
    etc_before = snapshot_tree(ETC_LIBVIRT)
    assert etc_before is not None, "libvirt's packages create /etc/libvirt"
    theirs = ""
    try:
        with LibvirtLab() as lab:
            theirs = f"{lab.name('foreign')}.conf"
            with open(os.path.join(ETC_LIBVIRT, theirs), "w") as f:
                f.write("someone else's\n")
        assert os.path.exists(os.path.join(ETC_LIBVIRT, theirs))
        diffs = tree_differences(etc_before, snapshot_tree(ETC_LIBVIRT))
        assert [d for d in diffs if d != "changed: . (mtime_ns)"] == [f"added: {theirs}"]
    finally:
        if theirs:
            restore_tree(ETC_LIBVIRT, etc_before, only=[theirs])
    assert tree_differences(etc_before, snapshot_tree(ETC_LIBVIRT)) == []


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


def test_refuses_when_another_libvirt_daemon_runs(tmp_path):
    need_lab()
    fake = tmp_path / "libvirtd"  # its /proc comm is "libvirtd"
    shutil.copy(shutil.which("sleep"), fake)
    etc_before = snapshot_tree(ETC_LIBVIRT)
    proc = subprocess.Popen([str(fake), "60"])
    try:
        deadline = time.monotonic() + 5
        while proc.pid not in [p for p, _n in running_libvirt_daemons()]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with pytest.raises(LabRefused, match=f"libvirtd pid {proc.pid}"):
            LibvirtLab().start()
        assert proc.poll() is None, "the lab touched a daemon it did not start"
        assert tree_differences(etc_before, snapshot_tree(ETC_LIBVIRT)) == []
    finally:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v", "-s"]))
