"""`mdserverctl store migrate --to etcd` and `store status`, against real etcd."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from daemon import ROOT, Daemon
from etcd_lab import EtcdLab
from helpers import make_instance, need, need_root, write_config
from mdserver.store import Store

pytestmark = pytest.mark.privileged


@pytest.fixture(scope="module")
def etcd():
    need_root()
    need(shutil.which("etcd") is not None, "needs etcd (apt-get install etcd-server)")
    with EtcdLab(members=1) as lab:
        lab.attach(None)
        yield lab


def ctl(config, *args):
    return subprocess.run([sys.executable, "-m", "mdserver.ctl", "-c", config, *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def conf(tmp_path, lab, host, backend="local", prefix="/migrate/"):
    return write_config(tmp_path, f"[store]\nbackend = {backend}\nhost = {host}\n"
                                  f"prefix = {prefix}\nendpoints = {','.join(lab.endpoints)}\n",
                        listen_address="127.0.0.1", port=0)


def local_db(config_dir, instances):
    s = Store(os.path.join(str(config_dir), "db.json"))
    s.commit(put=instances)
    s.close()


def test_migrate_copies_refuses_conflicts_and_can_be_run_again(etcd, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    conf_a, conf_b = conf(a, etcd, "hv-a"), conf(b, etcd, "hv-b")
    local_db(a, [make_instance(n) for n in (1, 2, 3)])
    # b's database: one address and one name that a's records hold, one free record
    local_db(b, [make_instance(11, ipv4="10.122.0.2"), make_instance(12, name="vm3"),
                 make_instance(13)])
    r = ctl(conf_a, "store", "migrate", "--to", "etcd")
    assert r.returncode == 0, r.stderr
    assert "3 of 3 record(s)" in r.stderr
    again = ctl(conf_a, "store", "migrate", "--to", "etcd")
    assert again.returncode == 0 and "0 of 3 record(s)" in again.stderr, again.stderr
    r = ctl(conf_b, "store", "migrate", "--to", "etcd")
    assert r.returncode == 1
    conflicts = [line for line in r.stderr.splitlines() if line.startswith("conflict:")]
    assert len(conflicts) == 2, r.stderr
    assert any("10.122.0.2" in line for line in conflicts)
    assert any("vm3" in line for line in conflicts)
    assert "nothing copied" in r.stderr
    # nothing of b's got in: a daemon of a's host sees exactly a's three
    etcd_conf = conf(a, etcd, "hv-a", backend="etcd")
    d = Daemon(etcd_conf).wait_ready(30)
    try:
        listed = json.loads(ctl(etcd_conf, "list", "--json").stdout)
        assert sorted((r["name"], r["host"]) for r in listed) == [
            ("vm1", "hv-a"), ("vm2", "hv-a"), ("vm3", "hv-a")]
        r = ctl(etcd_conf, "store", "status", "--json")
        status = json.loads(r.stdout)
        assert status["backend"] == "etcd" and status["connected"] is True
        assert status["records"] == {"hv-a": 3} and status["revision"] > 0
        assert status["endpoints"] == etcd.endpoints
        text = ctl(etcd_conf, "store", "status").stdout
        assert "hv-a: 3" in text and "connected" in text
    finally:
        d.stop()
    # with the daemon down: what the cache holds, said so
    r = ctl(etcd_conf, "store", "status", "--json")
    assert r.returncode == 0 and "reading" in r.stderr
    assert json.loads(r.stdout)["records"] == {"hv-a": 3}


def test_migrate_needs_endpoints(tmp_path):
    config = write_config(tmp_path, "")
    r = ctl(config, "store", "migrate", "--to", "etcd")
    assert r.returncode == 1 and "set [store] endpoints" in r.stderr
