"""Faults of the file systems the main process writes: a full disk under the
store, unwritable dnsmasq and seed directories, dnsmasq not running.

The conditions are real, never simulated in the code under test: a tmpfs of a
few hundred KiB filled up (ENOSPC), a tmpfs remounted read-only (EROFS), a
directory replaced by a regular file (ENOTDIR: the one that needs no root and
still holds for root, which a mode 0500 directory does not, as
CAP_DAC_OVERRIDE writes there anyway), a pid file naming nobody, or someone
who is not dnsmasq.
"""

import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from typing import Iterator, List, Optional

import pytest

import wsgi
from daemon import Daemon, request
from helpers import domain_xml, make_instance, mds_metadata, need, need_root, wait_for, \
    write_config
from mdserver import adminclient, config, web
from mdserver import store as storemod
from mdserver.dnsmasq import DnsmasqFiles, render_dhcp_host, render_host, signal_dnsmasq
from mdserver.errors import StoreFull
from mdserver.models import Instance
from mdserver.registry import Registry
from mdserver.seeds import SeedImages, image_name, seed_image
from mdserver.store import Store
from mdserver.tokens import load_or_create_key
from mdserver.view import derived_seed
from mdserver.wiring import build_views

unit, process, privileged = pytest.mark.unit, pytest.mark.process, pytest.mark.privileged

KEY = "ssh-ed25519 AAAAC3Nza admin@host"
G1 = "127.0.0.5"  # a guest of the daemon tests: loopback, so the test can ask as it
N = 5  # registrations while a sink fails


# -- real file-system conditions ----------------------------------------------

@contextlib.contextmanager
def tmpfs(path, size: str) -> Iterator[str]:
    """A tmpfs of `size` mounted on `path` (created here), unmounted at the end."""
    need_root()
    path = str(path)
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", path],
                       capture_output=True, text=True)
    need(r.returncode == 0, f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield path
    finally:
        # Still busy (a file left open by a failing test): detached all the
        # same, so no mount outlives the test.
        if subprocess.run(["umount", path]).returncode != 0:
            subprocess.run(["umount", "-l", path], check=True)


def remount(path: str, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", path], check=True)


def fill(directory: str) -> str:
    """A file that takes every free page of `directory`'s file system; its path."""
    path = os.path.join(directory, "filler")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)
    assert os.statvfs(directory).f_bavail == 0
    return path


def break_dir(path: str) -> str:
    """`path` (a directory) moved aside and a regular file put in its place:
    every write below it fails with ENOTDIR, for root too."""
    aside = path + ".aside"
    os.rename(path, aside)
    with open(path, "w") as f:
        f.write("not a directory\n")
    return aside


def mend_dir(path: str, aside: str) -> None:
    """The regular file gone; the directory is left for the sink to make again."""
    os.unlink(path)
    shutil.rmtree(aside)


def lines(caplog, level: int, text: str) -> List[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level and text in r.getMessage()]


def big_domain(n: int) -> bytes:
    """Domain n with enough SSH keys that its record is a journal line of
    several pages: appending it needs new pages (a short write, then ENOSPC)."""
    inst = make_instance(n)
    keys = [f"ssh-ed25519 AAAA{'x' * 240}{k} k{k}@host" for k in range(30)]
    return domain_xml(inst.name, inst.uuid, inst.mac,
                      metadata=mds_metadata(ssh_key=keys)).encode()


# -- a disk full under the store ----------------------------------------------

@privileged
def test_disk_full_fails_a_journal_append_and_changes_nothing(tmp_path, caplog):
    with tmpfs(tmp_path / "fs", "256k") as fs:
        s = Store(os.path.join(fs, "db.json"))
        try:
            acked = [make_instance(n) for n in range(1, 4)]
            for inst in acked:
                s.put(inst)
            size, rev = os.path.getsize(s.journal_path), s.status()["revision"]
            filler = fill(fs)
            # One line of ~14 KB: the rest of the journal's last page takes a
            # part of it, then the disk is full (a torn line, cut off again).
            big = [make_instance(n) for n in range(100, 140)]
            with caplog.at_level(logging.DEBUG, logger="mdserver"):
                with pytest.raises(StoreFull, match="No space left on device"):
                    s.put_many(big)
            # The caller (the admin API) logs it, once: the store adds nothing.
            assert [r for r in caplog.records if r.name.startswith("mdserver")] == []
            assert sorted(i.uuid for i in s) == sorted(i.uuid for i in acked)
            assert all(s.by_uuid(i.uuid) is None and s.by_ip(i.ipv4) is None for i in big)
            assert s.status()["revision"] == rev
            assert os.path.getsize(s.journal_path) == size  # no partial line left
            replica = Store(s.path, writable=False)
            assert sorted(replica, key=lambda i: i.uuid) == sorted(acked, key=lambda i: i.uuid)
            replica.close()

            os.unlink(filler)  # space again: no restart needed
            late = make_instance(4)
            s.put(late)
            s.put_many(big[:2])
            acked += [late] + big[:2]
        finally:
            s.close()
        with caplog.at_level(logging.WARNING, logger="mdserver"):
            again = Store(os.path.join(fs, "db.json"))
        try:
            assert caplog.records == []  # no torn line to drop: nothing glued on
            assert sorted(again, key=lambda i: i.uuid) == sorted(acked, key=lambda i: i.uuid)
        finally:
            again.close()


@privileged
def test_disk_full_during_compaction_keeps_the_journal(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(storemod, "MIN_COMPACT", 4)
    with tmpfs(tmp_path / "fs", "256k") as fs:
        s = Store(os.path.join(fs, "db.json"))
        try:
            for n in range(1, 4):
                s.put(make_instance(n))
            filler = fill(fs)
            caplog.set_level(logging.INFO, logger="mdserver")
            # The 4th line fits in the journal's last page; the snapshot the
            # compaction writes after it needs pages there are not.
            s.put(make_instance(4))
            s.put(make_instance(5))  # compaction tried again: fails, said once
            assert len(s) == 5 and s.by_name("vm5") is not None
            assert len(lines(caplog, logging.ERROR, "cannot compact")) == 1
            assert not os.path.exists(s.path)  # no snapshot yet, and no temp files
            assert sorted(os.listdir(fs)) == ["db.json.journal", "db.json.lock", "db.json.rev",
                                              "filler"]
            with open(s.journal_path) as f:
                assert len(f.read().splitlines()) == 5
            replica = Store(s.path, writable=False)
            assert sorted(i.name for i in replica) == [f"vm{n}" for n in range(1, 6)]
            replica.close()

            os.unlink(filler)
            s.put(make_instance(6))
            assert len(lines(caplog, logging.INFO, "compacted again")) == 1
            assert os.path.getsize(s.journal_path) == 0
            with open(s.path) as f:
                assert len(json.load(f)["instances"]) == 6
        finally:
            s.close()
        again = Store(os.path.join(fs, "db.json"))
        assert sorted(i.name for i in again) == [f"vm{n}" for n in range(1, 7)]
        again.close()


@privileged
def test_daemon_with_a_full_disk_answers_507_and_keeps_serving(tmp_path):
    with tmpfs(tmp_path / "fs", "256k") as fs:
        db = os.path.join(fs, "db.json")
        path = write_config(tmp_path, f"[public-keys]\nadmin = {KEY}\n[seeds]\n"
                                      f"dir = {tmp_path}/seeds\n",
                            listen_address="127.0.0.1", port=0,
                            token_key_file=f"{tmp_path}/imds-token.key")
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:  # only the database on the small file system
            f.write(text.replace(f"db_file = {tmp_path}/db.json", f"db_file = {db}"))
        s = Store(db)
        s.put(make_instance(1, ipv4=G1))
        s.close()
        d = Daemon(path).wait_ready()
        try:
            sock = config.load(path).mdserver.admin_socket
            filler = fill(fs)
            status, body = adminclient.request(sock, "POST", "/instance-upload", big_domain(2))
            assert status == 507, body
            assert len([line for line in d.output().splitlines()
                        if "No space left on device" in line]) == 1, d.output()
            # guests and the other requests are answered as before
            status, _, iid = request(d.host, d.port, "GET", "/latest/meta-data/instance-id",
                                     source=G1)
            assert (status, iid) == (200, make_instance(1).instance_id)
            status, body = adminclient.request(sock, "GET", "/instances")
            assert status == 200 and [i["name"] for i in json.loads(body)] == ["vm1"]

            os.unlink(filler)
            status, body = adminclient.request(sock, "POST", "/instance-upload", big_domain(2))
            assert status == 200 and json.loads(body)["name"] == "vm2"
            assert d.stop() == 0
        finally:
            d.stop()
        s = Store(db)
        assert sorted(i.name for i in s) == ["vm1", "vm2"]
        s.close()


# -- sinks that cannot write ---------------------------------------------------

class Host:
    """A registry on a real store with real dnsmasq files and seed images
    (every instance on the configdrive route), its admin app in process."""

    def __init__(self, tmp_path, retry_interval: float = 3600.0, kill=None):
        self.cfg = config.load(write_config(tmp_path, "[libvirt]\nroute = configdrive\n"))
        self.store = Store(self.cfg.mdserver.db_file)
        # `kill`: how dnsmasq is signalled (by default: nobody is)
        self.files = DnsmasqFiles(self.cfg, kill=kill or (lambda pid, sig: None))
        self.views = build_views(self.cfg, derived_seed(b"k" * 32))
        self.seeds = SeedImages(self.cfg.seeds.dir, self.views)
        self.registry = Registry(self.cfg, self.store, [self.files, self.seeds],
                                 retry_interval=retry_interval)
        self.registry.sync()
        self.app = web.admin_app(self.registry)

    def register(self, n: int, **md) -> dict:
        inst = make_instance(n)
        xml = domain_xml(inst.name, inst.uuid, inst.mac,
                         metadata=mds_metadata(**md) if md else "")
        status, _, body = wsgi.call(self.app, "POST", "/instance-upload", "unix",
                                    body=xml.encode())
        assert status == 200, body
        return json.loads(body)

    def close(self) -> None:
        self.registry.close()
        self.store.close()


@pytest.fixture
def host(tmp_path):
    made: List[Host] = []

    def make(**kw) -> Host:
        made.append(Host(tmp_path, **kw))
        return made[-1]
    yield make
    for h in made:
        h.close()


def read(path: str) -> Optional[bytes]:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def in_step(instances: List[Instance], files: DnsmasqFiles, seeds: SeedImages, views) -> bool:
    """Both sinks' files are exactly those of `instances`, with their content."""
    dn = files.dn
    try:
        listed = {d: sorted(n for n in os.listdir(files.path(d)) if not n.startswith("."))
                  for d in ("hosts", "dhcp-hosts")}
        images = sorted(n for n in os.listdir(seeds.dir) if not n.startswith("."))
    except OSError:
        return False
    uuids = sorted(i.uuid for i in instances)
    return (listed == {"hosts": uuids, "dhcp-hosts": uuids}
            and images == sorted(image_name(u) for u in uuids)
            and all(read(files.path("hosts", i.uuid)) == render_host(i, dn).encode()
                    and read(files.path("dhcp-hosts", i.uuid))
                    == render_dhcp_host(i, dn).encode()
                    and read(seeds.path(i.uuid)) == seed_image(views(i), "configdrive")
                    for i in instances))


def host_in_step(h: Host) -> bool:
    return in_step(list(h.store), h.files, h.seeds, h.views)


@unit
@pytest.mark.parametrize("sink", ["DnsmasqFiles", "SeedImages"])
def test_unwritable_sink_directory_registers_reports_once_and_catches_up(host, sink, caplog):
    h = host()
    h.register(1)
    assert host_in_step(h)
    directory = h.files.base if sink == "DnsmasqFiles" else h.seeds.dir
    aside = break_dir(directory)
    caplog.set_level(logging.INFO, logger="mdserver")
    for n in range(2, 2 + N):
        record = h.register(n)  # stored and answered all the same
        assert (record["name"], record["uuid"]) == (f"vm{n}", make_instance(n).uuid)
        assert h.store.by_name(f"vm{n}") is not None
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith(sink + ": "), errors
    assert "Not a directory" in errors[0] or "File exists" in errors[0]

    mend_dir(directory, aside)
    h.register(2 + N)  # the next change brings the sink back in step with every record
    assert lines(caplog, logging.INFO, "writing again") == [f"{sink}: writing again"]
    assert len(h.store) == N + 2 and host_in_step(h)
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1


@unit
def test_a_failing_sink_is_retried_without_a_registration(host, caplog):
    h = host(retry_interval=0.05)
    caplog.set_level(logging.INFO, logger="mdserver")
    aside = break_dir(h.seeds.dir)
    for n in range(1, 4):
        h.register(n)
    assert not host_in_step(h)
    mend_dir(h.seeds.dir, aside)
    wait_for(lambda: host_in_step(h), 10, "seed images caught up by the retry")
    wait_for(lambda: lines(caplog, logging.INFO, "writing again"), 5, "the recovery line")
    assert lines(caplog, logging.INFO, "writing again") == ["SeedImages: writing again"]
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1


@privileged
def test_read_only_sink_directories_through_the_daemon(tmp_path):
    """EROFS, the daemon's own log: dnsmasq's directory and the seed
    directory on tmpfs mounts remounted read-only, then read-write."""
    base, seeds_dir = str(tmp_path / "dnsmasq"), str(tmp_path / "seeds")
    with tmpfs(base, "1m"), tmpfs(seeds_dir, "4m"):
        path = write_config(tmp_path, f"[public-keys]\nadmin = {KEY}\n[libvirt]\n"
                                      f"route = configdrive\n[seeds]\ndir = {seeds_dir}\n",
                            listen_address="127.0.0.1", port=0)
        cfg = config.load(path)
        d = Daemon(path).wait_ready()
        try:
            def register(n: int) -> dict:
                inst = make_instance(n)
                status, body = adminclient.request(
                    cfg.mdserver.admin_socket, "POST", "/instance-upload",
                    domain_xml(inst.name, inst.uuid, inst.mac).encode())
                assert status == 200, body
                return json.loads(body)

            def logged(text: str) -> List[str]:
                return [line for line in d.output().splitlines() if text in line]

            register(1)
            remount(base, "ro")
            remount(seeds_dir, "ro")
            try:
                for n in range(2, 2 + N):
                    assert register(n)["name"] == f"vm{n}"
                status, body = adminclient.request(cfg.mdserver.admin_socket, "GET",
                                                   "/instances")
                assert status == 200 and len(json.loads(body)) == N + 1
            finally:
                remount(base, "rw")
                remount(seeds_dir, "rw")
            errors = logged("ERROR")
            assert len(errors) == 2, d.output()
            assert any("DnsmasqFiles" in e and "Read-only file system" in e for e in errors)
            assert any("SeedImages" in e and "Read-only file system" in e for e in errors)

            register(2 + N)
            assert len(logged("DnsmasqFiles: writing again")) == 1, d.output()
            assert len(logged("SeedImages: writing again")) == 1, d.output()
            assert len(logged("ERROR")) == 2
            assert d.stop() == 0
        finally:
            d.stop()
        s = Store(cfg.mdserver.db_file, writable=False)
        instances = list(s)
        s.close()
        assert len(instances) == N + 2
        views = build_views(cfg, derived_seed(load_or_create_key(cfg.mdserver.token_key_file)))
        assert in_step(instances, DnsmasqFiles(cfg), SeedImages(seeds_dir, views), views)


# -- dnsmasq not running ---------------------------------------------------------

@contextlib.contextmanager
def child(argv: List[str], **kw) -> Iterator[subprocess.Popen]:
    p = subprocess.Popen(argv, **kw)
    try:
        yield p
    finally:
        if p.poll() is None:
            p.kill()  # ours, by its Popen
        p.wait()
        if p.stdout is not None:
            p.stdout.close()


def write_pid(h: Host, pid: Optional[int]) -> None:
    path = h.files.path("dnsmasq.pid")
    if pid is None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    else:
        with open(path, "w") as f:
            f.write(f"{pid}\n")


def change_entry(h: Host, n: int) -> None:
    """A changed entry of an existing file: the kind of change that needs SIGHUP."""
    h.register(n, hostname=f"other{n}")
    assert read(h.files.path("hosts", make_instance(n).uuid)) == \
        render_host(h.store.find(f"vm{n}"), h.files.dn).encode()


@process  # child processes stand in for a stale pid's new owner and for dnsmasq
def test_dnsmasq_not_running_is_no_error(host, caplog):
    h = host(kill=signal_dnsmasq)  # DnsmasqFiles' default: real signals
    caplog.set_level(logging.INFO, logger="mdserver")
    with open("/proc/sys/kernel/pid_max") as f:
        never = int(f.read()) + 1  # above pid_max: no process ever has it
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    with child(sleeper) as other:
        for n, pid in enumerate((None, never, other.pid), 1):
            write_pid(h, pid)
            h.register(n)
            change_entry(h, n)
            h.registry.remove(f"vm{n}")
        # a stale pid file whose number another process has now: not signalled
        assert other.poll() is None
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert host_in_step(h)

    # and a dnsmasq that runs is still told (its name is all that is checked:
    # a process that calls itself dnsmasq, which SIGHUP ends)
    named = ("import time\nopen('/proc/self/comm', 'w').write('dnsmasq')\n"
             "print('ready', flush=True)\ntime.sleep(60)\n")
    with child([sys.executable, "-c", named], stdout=subprocess.PIPE) as dnsmasq:
        assert dnsmasq.stdout is not None and dnsmasq.stdout.readline() == b"ready\n"
        write_pid(h, dnsmasq.pid)
        h.register(9)
        change_entry(h, 9)
        assert dnsmasq.wait(10) == -signal.SIGHUP


@unit
def test_dnsmasq_refusing_signals_is_reported_once(host, caplog):
    def refuse(pid: int, sig: int) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    h = host(kill=refuse)
    write_pid(h, 4242)
    caplog.set_level(logging.INFO, logger="mdserver")
    for n in range(1, 1 + N):
        h.register(n)
        change_entry(h, n)
    assert len(lines(caplog, logging.ERROR, "cannot signal dnsmasq (pid 4242)")) == 1
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1
