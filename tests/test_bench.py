"""The benchmark suite still works: `python -m bench --quick` end to end (namespaces, the daemon, nginx, the bare callable, wrk, the crawls, the storm)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import need_root

pytestmark = pytest.mark.privileged

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What --quick measures (bench/context.py, Plan.make).
QUICK = ("a", "f", "g", "h", "i", "j", "k")


def test_the_quick_run_measures_every_scenario_without_error(tmp_path):
    need_root()
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing (scripts/run-tests.sh installs it)")
    out = tmp_path / "bench.json"
    proc = subprocess.Popen([sys.executable, "-m", "bench", "--quick", "--json", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the suite cleans up on SIGTERM
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-5000:]
    doc = json.loads(out.read_text())
    assert doc["errors"] == [] and doc["quick"]
    sc = doc["scenarios"]
    assert sorted(sc) == sorted(QUICK), sorted(sc)

    (cell,) = sc["a"]["cells"]
    assert cell["connections"] == 16 and cell["ok"]
    for server in ("mdserver", "nginx", "bare"):
        assert cell[server]["rps"] > 0 and cell[server]["errors"] == []
        assert 0 < cell[server]["p50_ms"] <= cell[server]["p99_ms"] <= cell[server]["p999_ms"]
    assert cell["vs_nginx"] > 0 and cell["vs_bare"] > 0

    for face in ("ec2", "openstack", "nocloud"):
        row = sc["f"]["faces"][face]
        for server in ("mdserver", "nginx", "bare"):
            assert row[server]["errors"] == [] and row[server]["crawl"]["p50_ms"] > 0
            assert row[server]["crawls"] == doc["plan"]["crawl_rounds"]
        assert row["mdserver"]["requests_per_crawl"] >= 4  # NoCloud's four files at least

    storm = sc["g"]["storms"]["5"]
    for server in ("mdserver", "nginx", "bare"):
        assert storm[server]["error_count"] == 0 and storm[server]["all_done_s"] > 0

    assert sc["h"]["sizes"]["100"]["n"] == doc["plan"]["registrations"]
    assert sc["h"]["sizes"]["100"]["p50_ms"] > 0
    assert sc["i"]["python_start_ms"] > 0
    assert all(r["p50_ms"] > 0 for r in sc["i"]["routes"].values())
    assert sc["i"]["seed_images"] >= 2 * doc["plan"]["hook_runs"]
    mem = sc["j"]["sizes"]["100"]
    assert all(mem[w]["pss_kb"] > 0 and mem[w]["rss_kb"] >= mem[w]["pss_kb"]
               for w in ("idle", "after_crawl", "after_load"))
    k = sc["k"]["sizes"]["100"]
    assert k["first_start_s"] > 0 and k["ready_s"] > 0 and k["dnsmasq_files"] > 0

    assert {t["result"] for t in doc["targets"]} <= {"PASS", "MISS", "n/a"}
    assert "targets" in stdout  # the terminal table
    # nothing left behind: the run's namespaces (mdb-<its pid>-...) are gone
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"mdb-{proc.pid}-" not in names
