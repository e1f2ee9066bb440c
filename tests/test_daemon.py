"""The real daemon process: guests told apart by source address, signals, readiness."""

import os
import signal
import socket
import time

import pytest

from helpers import make_instance, write_config
from daemon import Daemon, request
from mdserver.adminclient import port_file
from mdserver.store import Store

pytestmark = pytest.mark.process

G1, G2, STRANGER = "127.0.0.5", "127.0.0.6", "127.0.0.9"
KEY = "ssh-ed25519 AAAAC3Nza admin@host"
TTL = {"X-aws-ec2-metadata-token-ttl-seconds": "300"}


def prepare(tmp_path, **md):
    """A config serving on 127.0.0.1, any free port (the daemon reports it)."""
    path = write_config(tmp_path, f"[public-keys]\nadmin = {KEY}\n",
                        listen_address="127.0.0.1", port=0, **md)
    store = Store(str(tmp_path / "db.json"))
    store.put(make_instance(1, ipv4=G1))
    store.put(make_instance(2, ipv4=G2))
    store.close()
    return path


@pytest.fixture
def daemon(tmp_path):
    started = []

    def start(env=None, **md):
        d = Daemon(prepare(tmp_path, **md), env=env)
        started.append(d)
        return d.wait_ready()
    yield start
    for d in started:
        d.stop()


def get(d, path, source, headers=None):
    return request(d.host, d.port, "GET", path, source=source, headers=headers)


def test_guests_are_told_apart_by_source_address(daemon):
    d = daemon()
    one = get(d, "/latest/meta-data/instance-id", G1)
    two = get(d, "/latest/meta-data/instance-id", G2)
    assert one[0] == two[0] == 200
    assert one[2] == make_instance(1).instance_id and two[2] == make_instance(2).instance_id
    assert get(d, "/latest/meta-data/local-ipv4", G2)[2] == G2
    status, _, body = get(d, "/latest/meta-data/instance-id", STRANGER)
    assert status == 404 and body.count("\n") == 1
    # a claimed identity changes nothing
    assert get(d, "/latest/meta-data/local-ipv4", STRANGER,
               {"X-Forwarded-For": G1})[0] == 404


def test_token_from_one_guest_fails_for_another(daemon):
    d = daemon()
    status, _, token = request(d.host, d.port, "PUT", "/latest/api/token", G1, TTL)
    assert status == 200
    hdr = {"X-aws-ec2-metadata-token": token}
    assert get(d, "/latest/meta-data/instance-id", G1, hdr)[0] == 200
    assert get(d, "/latest/meta-data/instance-id", G2, hdr)[0] == 401


def test_token_survives_a_restart(tmp_path):
    path = prepare(tmp_path)
    d = Daemon(path).wait_ready()
    token = request(d.host, d.port, "PUT", "/latest/api/token", G1, TTL)[2]
    assert d.stop() == 0
    d = Daemon(path).wait_ready()
    try:
        assert get(d, "/latest/meta-data/instance-id", G1,
                   {"X-aws-ec2-metadata-token": token})[0] == 200
    finally:
        d.stop()


def test_idle_and_slow_clients_do_not_stall_others(daemon):
    d = daemon()
    idle = []
    try:
        for _ in range(40):  # connected, silent
            idle.append(socket.create_connection((d.host, d.port)))
        for _ in range(10):  # half a request, never finished
            s = socket.create_connection((d.host, d.port))
            s.sendall(b"GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\n")
            idle.append(s)
        started = time.monotonic()
        for _ in range(20):
            assert get(d, "/latest/meta-data/instance-id", G1)[0] == 200
        assert time.monotonic() - started < 5  # functional bound, generous
    finally:
        for s in idle:
            s.close()


def test_garbage_never_crashes_the_daemon(daemon):
    d = daemon()
    for payload in (b"\x00\xff" * 100 + b"\r\n\r\n", b"GET " + b"/a" * 40000 + b" HTTP/1.1\r\n\r\n",
                    b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 2000 + b"\r\n", b"PUT /latest/api/token"):
        with socket.create_connection((d.host, d.port), timeout=5) as s:
            try:  # the server may answer (431, 400) and close before we are done
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
                s.recv(1024)
            except OSError:
                pass
    assert get(d, "/latest/meta-data/instance-id", G1)[0] == 200
    assert d.proc.poll() is None


def test_sigterm_stops_gracefully(daemon):
    d = daemon()
    assert d.stop() == 0
    with pytest.raises(OSError):
        socket.create_connection((d.host, d.port), timeout=1).close()


def test_sighup_reopens_the_log_file(daemon, tmp_path):
    logfile = tmp_path / "mdserver.log"
    d = daemon(logfile=str(logfile), access_log="yes")
    get(d, "/latest/meta-data/instance-id", G1)
    rotated = tmp_path / "mdserver.log.1"
    deadline = time.monotonic() + 5
    while "GET /latest/meta-data/instance-id" not in logfile.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.rename(logfile, rotated)
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while not logfile.exists() or G2 not in logfile.read_text():
        assert time.monotonic() < deadline, d.output()
        get(d, "/latest/meta-data/local-ipv4", G2)
        time.sleep(0.1)
    assert d.proc.poll() is None  # SIGHUP did not stop it


def test_systemd_readiness_and_stopping(daemon, tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(15)
    try:
        d = daemon(env={"NOTIFY_SOCKET": path})
        ready = sock.recv(256).split(b"\n")
        assert ready[0] == b"READY=1"
        assert ready[1] == f"STATUS=serving on 127.0.0.1:{d.port}".encode()
        # READY=1 came once the listener answers
        assert get(d, "/latest/meta-data/instance-id", G1)[0] == 200
        d.proc.send_signal(signal.SIGTERM)
        assert sock.recv(256) == b"STOPPING=1"
        assert d.proc.wait(10) == 0
    finally:
        sock.close()


def test_corrupt_database_stops_startup_with_one_line(tmp_path):
    path = prepare(tmp_path)
    (tmp_path / "db.json").write_text("{broken")
    d = Daemon(path)
    assert d.proc.wait(20) == 1
    out = d.output().strip().splitlines()
    assert len(out) == 1 and "db.json" in out[0]
    assert (tmp_path / "db.json").read_text() == "{broken"


def test_second_daemon_on_same_database_refuses(daemon, tmp_path):
    d = daemon()
    other = Daemon(str(tmp_path / "mdserver.conf"))
    assert other.proc.wait(20) == 1
    assert "in use" in other.output()
    assert get(d, "/latest/meta-data/instance-id", G1)[0] == 200


def test_port_zero_is_reported_and_held(daemon, tmp_path):
    """`port = 0`: the port served is in the log, in admin.port beside the
    admin socket (removed at exit), and nobody else can bind it."""
    d = daemon()
    assert d.port != 0
    report = tmp_path / "admin.port"
    assert report.read_text() == f"{d.port}\n"
    assert f"listening on 127.0.0.1:{d.port}" in d.output()
    with socket.socket() as s:
        with pytest.raises(OSError):  # EADDRINUSE
            s.bind(("127.0.0.1", d.port))
    assert d.stop() == 0
    assert not report.exists()
    assert port_file("/run/mdserver/admin.sock") == "/run/mdserver/admin.port"
    assert port_file("/run/mdserver/ctl") == "/run/mdserver/ctl.port"


def test_every_face_and_the_password_relay_through_the_real_daemon(daemon):
    import json
    import yaml
    from mdserver import adminclient
    d = daemon()
    one, two = make_instance(1), make_instance(2)
    md = json.loads(get(d, "/openstack/latest/meta_data.json", G1)[2])
    assert md["uuid"] == one.uuid and md["public_keys"] == {"admin": KEY}
    assert yaml.safe_load(get(d, "/nocloud/meta-data", G2)[2])["instance-id"] == two.uuid
    assert get(d, f"/nocloud/{one.uuid}/meta-data", G2)[0] == 403
    # the worker hands the guest's password to the main process (the only writer)
    post = request(d.host, d.port, "POST", "/openstack/latest/password", source=G1,
                   body="ZW5jcnlwdGVk")
    assert post[0] == 200 and post[2] == ""
    assert request(d.host, d.port, "POST", "/openstack/latest/password", source=G1,
                   body="YWdhaW4=")[0] == 409
    admin = os.path.join(os.path.dirname(d.log_path), "admin.sock")
    assert adminclient.call(admin, "GET", f"/instances/{one.uuid}/password") == {
        "password": "ZW5jcnlwdGVk"}
    assert get(d, "/openstack/latest/password", G1)[2] == "ZW5jcnlwdGVk"  # replica followed
    assert get(d, "/openstack/latest/password", G2)[2] == ""
    assert adminclient.call(admin, "GET", f"/instances/{one.uuid}")["guest_password"] is True
