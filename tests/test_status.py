"""mdserverctl status: the pure verdicts (golden files), the probes on a fake /proc, a real
daemon, and in a namespace a real dnsmasq whose printed fixes are run and fix."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest

from golden import check
from helpers import need, need_root, write_config
from daemon import ROOT, Daemon
from mdserver import config, dnsmasq, probes
from mdserver.status import (AddressFacts, Context, DaemonFacts, DnsmasqFacts, EnrollerFacts,
                             Facts, StoreFacts, healthy, judge, render_json, render_text)

# -- the core: facts in, verdicts out ---------------------------------------------------

CTX = Context(config="/etc/mdserver/mdserver.conf", admin_socket="/run/mdserver/admin.sock",
              listen_address="169.254.169.254", interface="br-mds", net_name="mds",
              gateway="10.122.0.1", dnsmasq_conf="/var/lib/mdserver/dnsmasq/mds.conf",
              libvirt_uri="qemu:///system", systemd=True)
PID_FILE = "/var/lib/mdserver/dnsmasq/dnsmasq.pid"
SERVING = (("tcp", 53), ("udp", 53), ("udp", 67))
WELL = Facts(
    CTX,
    DaemonFacts(answers=True, port=80),
    AddressFacts(interface_exists=True, on_interface=True),
    DnsmasqFacts(pid=812, pid_file=PID_FILE, command="dnsmasq", conf_arg=CTX.dnsmasq_conf,
                 conf="current", sockets=SERVING, hosts=12),
    EnrollerFacts(load_state="loaded", unit_file_state="enabled", active_state="active",
                  status_text="connected to qemu:///system"),
    StoreFacts(status={"backend": "local", "path": "/var/lib/mdserver/db_file.json",
                       "host": "hv-a", "revision": 341, "cache_age": 0.0,
                       "records": {"hv-a": 12}}))
ETCD = {"backend": "etcd", "endpoints": ["https://10.0.0.1:2379", "https://10.0.0.2:2379"],
        "host": "hv-a", "prefix": "/mdserver/", "connected": True, "revision": 9120,
        "cache_age": 0.0, "records": {"hv-a": 12, "hv-b": 30}}

# Each scenario: a name and the facts; every verdict and fix is in its golden file.
SCENARIOS = {
    "well": WELL,
    "well_etcd": replace(WELL, store=StoreFacts(status=ETCD)),
    # the host just booted: the network is not up yet
    "no_network": replace(
        WELL, daemon=DaemonFacts(answers=True, port=None),
        address=AddressFacts(interface_exists=False),
        dnsmasq=replace(WELL.dnsmasq, sockets=(("udp", 67),)),
        enroller=replace(WELL.enroller, active_state="activating",
                         status_text="waiting for libvirt"),
        store=StoreFacts(status=dict(ETCD, connected=False, cache_age=73.5))),
    "stopped": replace(
        WELL, daemon=DaemonFacts(answers=False, error="not running (no admin socket "
                                                      "/run/mdserver/admin.sock)"),
        dnsmasq=replace(WELL.dnsmasq, command=None),
        enroller=replace(WELL.enroller, active_state="failed", status_text=""),
        store=StoreFacts(status=dict(WELL.store.status or {}), source="file")),
    "misplaced": replace(
        WELL, daemon=DaemonFacts(answers=True, port=80, listener_error="timed out"),
        address=AddressFacts(interface_exists=True, elsewhere=("eth0",)),
        dnsmasq=replace(WELL.dnsmasq, conf_arg="/etc/dnsmasq.conf"),
        enroller=replace(WELL.enroller, active_state="inactive"),
        store=StoreFacts(status=dict(ETCD, locked="[store] host hv-a is already served by "
                                                  "another mdserver (pid 4242 on hv-a2)"))),
    "stale_files": replace(
        WELL, address=AddressFacts(interface_exists=True),
        dnsmasq=replace(WELL.dnsmasq, conf="differs"),
        enroller=EnrollerFacts(load_state="not-found", active_state="inactive")),
    "no_systemd": replace(
        WELL, context=replace(CTX, systemd=False),
        daemon=DaemonFacts(answers=False, denied=True, error="permission denied"),
        dnsmasq=replace(WELL.dnsmasq, conf="newer", sockets=None),
        enroller=EnrollerFacts(error="System has not been booted with systemd as init "
                                     "system (PID 1). Can't operate."),
        store=StoreFacts(status=dict(ETCD), source="file")),
}


@pytest.mark.unit
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_verdicts_golden(name):
    verdicts = judge(SCENARIOS[name])
    assert [v.check for v in verdicts] == ["daemon", "address", "dnsmasq", "enroller", "store"]
    # every problem comes with its fix, nothing else has one
    assert all((v.fix is not None) == (v.verdict == "problem") for v in verdicts)
    check(f"status_{name}.txt", render_text(verdicts))
    body = render_json(verdicts)
    check(f"status_{name}.json", body)
    assert json.loads(body)["ok"] == healthy(verdicts)


@pytest.mark.unit
def test_only_problems_fail_unknown_does_not():
    assert healthy(judge(WELL))
    unknown = replace(WELL, enroller=EnrollerFacts(error="no systemctl"),
                      address=AddressFacts(error="ip not found"))
    verdicts = judge(unknown)
    assert [v.verdict for v in verdicts] == ["ok", "unknown", "ok", "unknown", "ok"]
    assert healthy(verdicts)
    assert not healthy(judge(SCENARIOS["stale_files"]))


@pytest.mark.unit
def test_dnsmasq_without_dns_on_a_present_bridge_is_its_own_problem():
    facts = replace(WELL, dnsmasq=replace(WELL.dnsmasq, sockets=(("udp", 67),)))
    v = judge(facts)[2]
    assert (v.verdict, v.fix) == ("problem", "systemctl restart mdserver-dnsmasq")
    assert "does not serve DNS (see its log)" in v.detail


# -- the probes, on a FAKE /proc (the real one: the tests below) ----------------------------

@pytest.mark.unit
def test_dnsmasq_probe_reads_pid_cmdline_sockets_and_start(tmp_path):
    path = write_config(tmp_path, "[dnsmasq]\ngateway = 10.122.0.1\n")
    cfg = config.load(path)
    base = tmp_path / "dnsmasq"
    os.makedirs(base / "dhcp-hosts")
    (base / "dhcp-hosts" / "u1").write_text("x")
    (base / dnsmasq.CONF_NAME).write_text(dnsmasq.render_conf(cfg))
    (base / dnsmasq.PID_NAME).write_text("4321\n")
    proc = tmp_path / "proc"
    pid = proc / "4321"
    os.makedirs(pid / "fd")
    os.makedirs(pid / "net")
    (pid / "comm").write_text("dnsmasq\n")
    (pid / "cmdline").write_bytes(b"/usr/sbin/dnsmasq\0--conf-file=" + str(base).encode()
                                  + b"/mds.conf\0--keep-in-foreground\0")
    for fd, inode in (("3", "1001"), ("4", "1002"), ("5", "1003"), ("6", "1004")):
        os.symlink(f"socket:[{inode}]", pid / "fd" / fd)
    os.symlink("/dev/null", pid / "fd" / "0")
    header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    (pid / "net" / "udp").write_text(
        header
        + "   1: 00000000:0043 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1001\n"
        + "   2: 01007A0A:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1002\n"
        + "   3: 00000000:1F90 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 9999\n")
    (pid / "net" / "tcp").write_text(
        header
        + "   1: 01007A0A:0035 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1003\n"
        + "   2: 01007A0A:0036 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 1004\n")
    now = time.time()
    btime = int(now) - 1000
    ticks = os.sysconf("SC_CLK_TCK")
    (proc / "stat").write_text(f"cpu  1 2 3\nbtime {btime}\n")
    # a comm with a space and a parenthesis: fields are counted after the last ')'
    rest = ["S"] + ["0"] * 18 + [str(int((now - btime - 60) * ticks))] + ["0"] * 10
    (pid / "stat").write_text("4321 (dns masq)) " + " ".join(rest) + "\n")
    facts = probes.dnsmasq_facts(cfg, proc=str(proc))
    assert facts.pid == 4321 and facts.command == "dnsmasq" and facts.hosts == 1
    assert facts.conf_arg == str(base / "mds.conf")
    assert facts.sockets == (("tcp", 53), ("udp", 53), ("udp", 67))
    assert facts.conf == "newer"  # written now, dnsmasq started a minute ago
    os.utime(base / dnsmasq.CONF_NAME, (now - 120, now - 120))
    assert probes.dnsmasq_facts(cfg, proc=str(proc)).conf == "current"
    (base / dnsmasq.CONF_NAME).write_text(dnsmasq.render_conf(cfg) + "port=5353\n")
    assert probes.dnsmasq_facts(cfg, proc=str(proc)).conf == "differs"
    (pid / "comm").write_text("sleep\n")
    facts = probes.dnsmasq_facts(cfg, proc=str(proc))
    assert (facts.command, facts.sockets, facts.conf_arg) == ("sleep", None, None)
    os.unlink(base / dnsmasq.PID_NAME)
    assert probes.dnsmasq_facts(cfg, proc=str(proc)).pid is None


class FakeRun:
    """FAKE `subprocess.run` for the commands the probes run (ip, systemctl)."""

    def __init__(self, outputs):
        self.outputs = outputs
        self.calls = []

    def __call__(self, argv, **kw):
        self.calls.append(argv)
        code, out, err = self.outputs[argv[0]]
        if code is None:
            raise FileNotFoundError(argv[0])
        return subprocess.CompletedProcess(argv, code, out, err)


@pytest.mark.unit
def test_enroller_and_address_probes_parse_their_commands(tmp_path):
    shown = ("LoadState=loaded\nUnitFileState=enabled\nActiveState=active\n"
             "StatusText=connected to qemu:///system\n")
    run = FakeRun({"systemctl": (0, shown, "")})
    facts = probes.enroller(run)
    assert run.calls == [["systemctl", "show", "-p",
                          "LoadState,UnitFileState,ActiveState,StatusText",
                          "mdserver-enroll.service"]]
    assert (facts.active_state, facts.status_text, facts.error) == (
        "active", "connected to qemu:///system", "")
    facts = probes.enroller(FakeRun({"systemctl": (1, "", "System has not been booted with "
                                                         "systemd.\nFailed to connect\n")}))
    assert facts.error == "System has not been booted with systemd."
    assert probes.enroller(FakeRun({"systemctl": (None, "", "")})).error == \
        "systemctl not found"
    cfg = config.load(write_config(tmp_path))
    links = [{"ifname": "lo", "addr_info": [{"local": "127.0.0.1"}]},
             {"ifname": "eth0", "addr_info": [{"local": "169.254.169.254"},
                                              {"local": "fe80::1"}]},
             {"ifname": "br-mds", "addr_info": []}]
    facts = probes.address(cfg, FakeRun({"ip": (0, json.dumps(links), "")}))
    assert facts == AddressFacts(interface_exists=True, on_interface=False,
                                 elsewhere=("eth0",))
    assert probes.address(cfg, FakeRun({"ip": (0, "garbage", "")})).error.startswith(
        "ip -j address show: unexpected output")


# -- the edge: a real daemon ---------------------------------------------------------------

NO_SYSTEMD = ('#!/bin/sh\necho "System has not been booted with systemd as init system '
              '(PID 1). Can\'t operate." >&2\nexit 1\n')


def fake_systemctl(directory, script: str) -> dict:
    """FAKE systemctl first on PATH (this machine has no systemd; a real one
    would be the host's): the environment for mdserverctl."""
    bin_dir = directory / "bin"
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / "systemctl"
    path.write_text(script)
    path.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def enroller_says(state: str, text: str) -> str:
    return (f"#!/bin/sh\nprintf 'LoadState=loaded\\nUnitFileState=enabled\\n"
            f"ActiveState={state}\\nStatusText={text}\\n'\n")


def status(conf, env, *args, netns=None):
    cmd = [sys.executable, "-m", "mdserver.ctl", "-c", conf, "status", *args]
    if netns:
        cmd = ["ip", "netns", "exec", netns] + cmd
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)


def lines_of(out: str) -> dict:
    """check -> (verdict, detail, fix) from the text output."""
    found, last = {}, None
    for line in out.splitlines():
        verdict, rest = line[:7].strip(), line[9:]
        if verdict:
            last = rest[:8].strip()
            found[last] = (verdict, rest[10:], None)
        else:
            assert rest[10:].startswith("fix: ")
            found[last] = found[last][:2] + (rest[15:],)
    return found


@pytest.mark.process
def test_status_against_a_real_daemon(tmp_path):
    conf = write_config(tmp_path, "[dnsmasq]\ninterface = lo\n[libvirt]\nuri = test:///default\n",
                        listen_address="127.0.0.1", port=0)
    env = fake_systemctl(tmp_path, enroller_says("active", "connected to test:///default"))
    d = Daemon(conf).wait_ready()
    try:
        r = status(conf, env)
        got = lines_of(r.stdout)
        assert r.returncode == 1, r.stdout + r.stderr  # no dnsmasq runs here
        assert got["daemon"] == ("ok", f"up and ready: admin socket {tmp_path}/admin.sock, "
                                       f"guests served on 127.0.0.1:{d.port}", None)
        assert got["address"] == ("ok", "127.0.0.1 on lo", None)
        assert got["dnsmasq"] == ("problem", f"not running (no pid in {tmp_path}/dnsmasq/"
                                             "dnsmasq.pid)", "systemctl restart mdserver-dnsmasq")
        assert got["enroller"] == ("ok", "connected to test:///default", None)
        assert got["store"][0] == "ok" and got["store"][1].startswith(f"local {tmp_path}/db.json")
        assert r.stderr == ""
        # the same in JSON
        body = json.loads(status(conf, env, "--json").stdout)
        assert body["ok"] is False
        assert [c["verdict"] for c in body["checks"]] == ["ok", "ok", "problem", "ok", "ok"]
        # the enroller waiting for libvirt
        env = fake_systemctl(tmp_path, enroller_says("activating", "waiting for libvirt"))
        got = lines_of(status(conf, env).stdout)
        assert got["enroller"] == ("problem", "waiting for libvirt at test:///default",
                                   "systemctl start libvirtd (virtqemud with libvirt's "
                                   "modular daemons)")
    finally:
        d.stop()
    # the daemon down: its problem, the store read from its file; no systemd
    env = fake_systemctl(tmp_path, NO_SYSTEMD)
    r = status(conf, env)
    got = lines_of(r.stdout)
    assert r.returncode == 1
    assert got["daemon"] == ("problem", f"not running (no admin socket {tmp_path}/admin.sock)",
                             f"mdserver {conf}")
    assert got["enroller"][0] == "unknown" and "not been booted with systemd" in \
        got["enroller"][1]
    assert got["store"][1].endswith("(read from the file: the daemon is down)")


# -- the edge in a namespace: real dnsmasq, and the printed fixes fix -------------------------

@pytest.mark.privileged
def test_status_in_a_namespace_and_its_fixes_work(tmp_path):
    need_root()
    need(shutil.which("dnsmasq") is not None, "needs dnsmasq (apt-get install dnsmasq-base)")
    import netns
    lab = netns.Lab()
    daemon = dns = None
    env = fake_systemctl(tmp_path, NO_SYSTEMD)
    try:
        conf = write_config(tmp_path, f"[dnsmasq]\ninterface = {lab.bridge}\nnet_name = mdt\n"
                                      "[libvirt]\nuri = test:///default\n",
                            listen_address="169.254.169.254", port=80)
        daemon = Daemon(conf, "169.254.169.254", 80, netns=lab.host).wait_ready()
        base = tmp_path / "dnsmasq"
        dns = netns.start_dnsmasq(lab.host, base, str(tmp_path / "dnsmasq.log"))
        r = status(conf, env, netns=lab.host)
        got = lines_of(r.stdout)
        assert r.returncode == 0, r.stdout + r.stderr
        assert got["daemon"][1].endswith("guests served on 169.254.169.254:80")
        assert got["address"] == ("ok", f"169.254.169.254 on {lab.bridge}", None)
        assert got["dnsmasq"][0] == "ok" and got["dnsmasq"][1].startswith(
            "serving DHCP and DNS: pid ")
        assert [v for v, _, _ in got.values()] == ["ok", "ok", "ok", "unknown", "ok"]

        # the address gone: the problem, and its fix run as printed
        netns.ip("addr", "del", "169.254.169.254/32", "dev", lab.bridge, netns=lab.host)
        got = lines_of(status(conf, env, netns=lab.host).stdout)
        fix = f"ip address add 169.254.169.254/32 dev {lab.bridge}"
        assert got["address"][0] == "problem" and got["address"][2] == fix
        subprocess.run(netns.exec_in(lab.host, fix.split()), check=True)
        assert lines_of(status(conf, env, netns=lab.host).stdout)["address"][0] == "ok"

        # dnsmasq stopped: the problem, and its fix (it daemonizes: stopped below by pid)
        dns.send_signal(signal.SIGTERM)
        dns.wait(10)
        dns = None
        got = lines_of(status(conf, env, netns=lab.host).stdout)
        assert got["dnsmasq"][0] == "problem" and "not running" in got["dnsmasq"][1]
        fix = got["dnsmasq"][2]
        assert fix == f"dnsmasq --conf-file={base}/mds.conf"
        subprocess.run(netns.exec_in(lab.host, fix.split()), check=True, timeout=30)
        r = status(conf, env, netns=lab.host)
        assert r.returncode == 0, r.stdout

        # the daemon stopped
        daemon.stop()
        daemon = None
        got = lines_of(status(conf, env, netns=lab.host).stdout)
        assert got["daemon"][0] == "problem" and got["daemon"][2] == f"mdserver {conf}"
    finally:
        pid = probes._pid(str(tmp_path / "dnsmasq" / dnsmasq.PID_NAME))
        if dns is not None:
            dns.send_signal(signal.SIGTERM)
            dns.wait(10)
        elif pid is not None and probes._read(f"/proc/{pid}/comm") == "dnsmasq\n":
            os.kill(pid, signal.SIGTERM)  # the one the fix started, by its pid file
        if daemon is not None:
            daemon.stop()
        lab.close()
