"""One owner per admin socket and per store: a second daemon refuses to start, changing nothing."""

import os
import socket
import time

import pytest

from daemon import Daemon, request
from helpers import make_instance, write_config
from mdserver import adminclient
from mdserver.store import Store

pytestmark = pytest.mark.process

KEY = "ssh-ed25519 AAAAC3Nza admin@host"


def prepare(directory, **md) -> str:
    """A config in `directory` (serving 127.0.0.1, any port) with one instance stored."""
    os.makedirs(directory, exist_ok=True)
    path = write_config(directory, f"[public-keys]\nadmin = {KEY}\n",
                        listen_address="127.0.0.1", port=0, **md)
    store = Store(os.path.join(str(directory), "db.json"))
    store.put(make_instance(1, ipv4="127.0.0.5"))
    store.close()
    return path


def share(path: str, key: str, value: str) -> None:
    """Point `[mdserver] key` of the config at `path` to another daemon's `value`."""
    with open(path) as f:
        lines = [f"{key} = {value}" if line.startswith(f"{key} = ") else line
                 for line in f.read().splitlines()]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def snapshot(directory) -> dict:
    """Every file under `directory`: its content and mtime (to see that nothing was rewritten)."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            p = os.path.join(root, name)
            with open(p, "rb") as f:
                out[p] = (f.read(), os.stat(p).st_mtime_ns)
    return out


def started(path: str, directory) -> Daemon:
    """A daemon whose port report, if it ever writes one, is not another daemon's to lose."""
    return Daemon(path, host="127.0.0.1", port_file=os.path.join(str(directory), "unused.port"))


def refusal(d: Daemon, timeout: float = 20.0) -> str:
    """The one line of a daemon that must exit 1 at start."""
    assert d.proc.wait(timeout) == 1, d.output()
    lines = d.output().strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_second_daemon_on_a_live_admin_socket_refuses_and_changes_nothing(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    first = Daemon(prepare(a)).wait_ready()
    try:
        sock = str(a / "admin.sock")
        inode = os.stat(sock).st_ino
        before = snapshot(a / "dnsmasq")
        assert before  # the first daemon wrote its hosts files
        path = prepare(b)  # its own database and dnsmasq files; only the socket is shared
        share(path, "admin_socket", sock)
        second = started(path, b)
        try:
            line = refusal(second)
        finally:
            second.stop()  # (without the guarantee it runs: not left behind)
        assert f"{sock}: another mdserver answers on this admin socket " \
               f"(pid {first.proc.pid}): not started" in line
        assert os.stat(sock).st_ino == inode  # not replaced
        assert snapshot(a / "dnsmasq") == before
        assert not (b / "dnsmasq").exists()  # nothing synced for the refused daemon
        assert [i["name"] for i in adminclient.call(sock, "GET", "/instances")] == ["vm1"]
        assert request(first.host, first.port, "GET", "/latest/meta-data/instance-id",
                       source="127.0.0.5")[0] == 200
        assert first.proc.poll() is None
    finally:
        first.stop()


def test_stale_socket_file_is_replaced(tmp_path):
    path = prepare(tmp_path)
    sock = str(tmp_path / "admin.sock")
    # What a killed daemon leaves: the socket file with no listener behind
    # it, and its lock file (no lock held any more).
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(sock)
    (tmp_path / "admin.sock.lock").write_text("999999\n")
    with pytest.raises(ConnectionRefusedError):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(sock)
    d = Daemon(path).wait_ready()
    try:
        assert [i["name"] for i in adminclient.call(sock, "GET", "/instances")] == ["vm1"]
        assert (tmp_path / "admin.sock.lock").read_text() == f"{d.proc.pid}\n"
    finally:
        assert d.stop() == 0
    assert not os.path.exists(sock)


def test_two_daemons_started_at_once_on_one_socket_exactly_one_runs(tmp_path):
    for attempt in range(3):
        a, b = tmp_path / f"a{attempt}", tmp_path / f"b{attempt}"
        pa, pb = prepare(a), prepare(b)
        sock = str(a / "admin.sock")
        share(pb, "admin_socket", sock)
        pair = [started(pa, a), started(pb, b)]
        try:
            deadline = time.monotonic() + 30
            while all(d.proc.poll() is None for d in pair):
                assert time.monotonic() < deadline, "neither daemon gave way"
                time.sleep(0.05)
            loser = next(d for d in pair if d.proc.poll() is not None)
            winner = next(d for d in pair if d is not loser)
            line = refusal(loser)
            assert f"{sock}: another mdserver" in line and line.endswith(": not started")
            # the winner serves the socket, and stays up
            deadline = time.monotonic() + 20
            while True:
                try:
                    names = [i["name"] for i in adminclient.call(sock, "GET", "/instances")]
                    break
                except Exception:
                    assert time.monotonic() < deadline and winner.proc.poll() is None, \
                        winner.output()
                    time.sleep(0.05)
            assert names == ["vm1"]
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(sock)
                pid = int.from_bytes(s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)[:4],
                                     "little")
            assert pid == winner.proc.pid
            time.sleep(0.5)
            assert winner.proc.poll() is None, winner.output()
        finally:
            for d in pair:
                d.stop()


def test_second_daemon_on_a_held_store_refuses_before_touching_its_admin_socket(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    first = Daemon(prepare(a)).wait_ready()
    try:
        path = prepare(b)
        share(path, "db_file", str(a / "db.json"))  # the same store, its own admin socket
        second = started(path, b)
        try:
            line = refusal(second)
        finally:
            second.stop()
        assert f"{a / 'db.json'} is in use by another process" in line
        # refused before its admin socket (and the lock beside it) or its dnsmasq files
        assert not (b / "admin.sock").exists() and not (b / "admin.sock.lock").exists()
        assert not (b / "dnsmasq").exists()
        assert first.proc.poll() is None
    finally:
        first.stop()
