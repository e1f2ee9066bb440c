"""Log lines: text with stable key=value fields, or one JSON object per line; from a real daemon and exactly (golden)."""

import json
import logging
import os
import time
from typing import Iterator, List

import pytest

import golden
from daemon import Daemon, request
from helpers import domain_xml, write_config
from mdserver import adminclient, logs

unit, process = pytest.mark.unit, pytest.mark.process

NET = "[dnsmasq]\nnet_address = 127.77.0.0\nnet_prefix = 16\ngateway = 127.77.0.1\n"
STRANGER = "127.0.0.9"
UUID, MAC = "ec2d0001-aaaa-4bbb-8ccc-000000000001", "52:54:00:dd:00:01"
CREATED = 1767225600.25  # 2026-01-01T00:00:00.250Z


@pytest.fixture
def utc() -> Iterator[None]:
    old = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    try:
        yield
    finally:
        if old is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = old
        time.tzset()


def record(name: str, level: int, msg: str, *args, **fields) -> logging.LogRecord:
    r = logging.LogRecord(name, level, __file__, 1, msg, args, None)
    r.created, r.msecs = CREATED, 250.0
    if fields:
        r.__dict__.update(logs.fields(**fields))
    return r


def samples() -> List[logging.LogRecord]:
    return [
        record("mdserver.registry", logging.INFO, "registered %s (%s) %s %s", "vm1", UUID, MAC,
               "127.77.0.2", instance="vm1", uuid=UUID, ip="127.77.0.2", mac=MAC,
               event="registered"),
        record("mdserver.web", logging.INFO, "%d %s %s from %s: %s", 404, "GET",
               "/latest/meta-data/instance-id", STRANGER, "no instance has address 127.0.0.9",
               ip=STRANGER, face="ec2", kind="meta-data", method="GET",
               path="/latest/meta-data/instance-id", status=404),
        # A guest's path with a space, a quote, an = and a line break: one token, no forged field.
        record("mdserver.web", logging.INFO, "%d %s %s from %s: %s", 404, "GET",
               '/x y"z=1\nstatus=200', "127.77.0.2", "no such path", ip="127.77.0.2",
               face="ec2", kind="other", method="GET", path='/x y"z=1\nstatus=200',
               status=404),
        record("mdserver.dnsmasq", logging.INFO, "dnsmasq (pid %d) told to re-read its host "
               "files", 4242, event="dnsmasq-reload", pid=4242),
        record("mdserver.server", logging.WARNING, "no fields here"),
    ]


@unit
def test_text_lines_are_todays_with_their_fields_appended(utc):
    f = logs.formatter("text", to_file=False)
    golden.check("logs-text.txt", "".join(f.format(r) + "\n" for r in samples()))
    f = logs.formatter("text", to_file=True)
    assert f.format(samples()[0]).startswith("2026-01-01 00:00:00,250 INFO mdserver.registry: "
                                             "registered vm1")


@unit
def test_json_lines_carry_time_level_logger_message_and_the_fields(utc):
    f = logs.formatter("json", to_file=False)
    lines = [f.format(r) for r in samples()]
    golden.check("logs-json.txt", "".join(line + "\n" for line in lines))
    for line in lines:
        assert "\n" not in line
        event = json.loads(line)
        assert event["time"] == "2026-01-01T00:00:00.250+00:00"
        assert {"time", "level", "logger", "message"} <= set(event)
    assert json.loads(lines[2])["path"] == '/x y"z=1\nstatus=200'


@unit
def test_a_traceback_stays_inside_its_json_line():
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        r = logging.LogRecord("mdserver", logging.ERROR, __file__, 1, "failed", (),
                              __import__("sys").exc_info())
    line = logs.JsonFormatter().format(r)
    assert "\n" not in line and "RuntimeError: boom" in json.loads(line)["exception"]
    text = logs.TextFormatter(logs.STDERR_FORMAT).format(r)
    assert text.startswith("ERROR mdserver: failed\nTraceback")


@unit
def test_only_known_fields():
    with pytest.raises(ValueError):
        logs.fields(password="x")
    assert logs.fields(ip="1.2.3.4", face=None) == {"mds_fields": {"ip": "1.2.3.4"}}


def drive(tmp_path, fmt: str, **keys) -> str:
    """A daemon with `log_format = fmt`: a registration, guest requests (one
    from nobody's address), an update, a removal; its log file's text."""
    log_file = tmp_path / "mdserver.log"
    path = write_config(tmp_path, NET, listen_address="127.0.0.1", port=0, workers=1,
                        log_format=fmt, logfile=str(log_file), **keys)
    d = Daemon(path).wait_ready()
    admin = str(tmp_path / "admin.sock")
    try:
        vm = adminclient.call(admin, "POST", "/instance-upload",
                              domain_xml("logvm", UUID, MAC).encode())
        assert request(d.host, d.port, "GET", "/latest/meta-data/instance-id",
                       source=vm["ip"])[0] == 200
        assert request(d.host, d.port, "GET", "/latest/meta-data/instance-id",
                       source=STRANGER)[0] == 404
        adminclient.call(admin, "DELETE", f"/instances/{UUID}")
    finally:
        assert d.stop() == 0, d.output()
    return log_file.read_text()


@process
def test_a_daemon_logs_json_lines_with_the_fields(tmp_path):
    text = drive(tmp_path, "json", access_log="yes")
    events = [json.loads(line) for line in text.splitlines()]  # every line is one object
    assert all({"time", "level", "logger", "message"} <= set(e) for e in events)
    registered = [e for e in events if e.get("event") == "registered"]
    assert len(registered) == 1
    assert registered[0]["instance"] == "logvm" and registered[0]["uuid"] == UUID
    assert registered[0]["mac"] == MAC and registered[0]["ip"].startswith("127.77.")
    refused = [e for e in events if e.get("ip") == STRANGER and e.get("status") == 404]
    assert refused and all(e["face"] == "ec2" and e["kind"] == "meta-data" for e in refused)
    access = [e for e in events if e["logger"] == "mdserver.access"]
    assert {e["status"] for e in access} == {200, 404}
    removed = [e for e in events if e.get("event") == "removed"]
    assert len(removed) == 1 and removed[0]["instance"] == "logvm"


@process
def test_a_daemon_logs_text_lines_with_key_value_fields(tmp_path):
    lines = drive(tmp_path, "text").splitlines()
    registered = [line for line in lines if " registered logvm " in line]
    assert len(registered) == 1
    assert registered[0].endswith(f" instance=logvm uuid={UUID} ip=127.77.0.2 mac={MAC} "
                                  "event=registered"), registered
    refused = [line for line in lines if f"from {STRANGER}" in line]
    assert refused and refused[0].endswith(f"ip={STRANGER} face=ec2 kind=meta-data method=GET "
                                           "path=/latest/meta-data/instance-id status=404")
