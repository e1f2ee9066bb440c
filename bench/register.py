"""Registration latency with 100 vs 10,000 instances, and the libvirt hook's wall time.

1. Registry.register (parse domain XML, allocate, durable store write,
   dnsmasq files) for K new domains on top of N already registered, N = 100
   and 10,000, interleaved rounds; reported per registration and as a ratio.
2. The real daemon with 10,000 instances: hooks/qemu `prepare begin` (what
   libvirtd runs at each VM start) timed as a whole process, against
   `/usr/bin/python3 -c pass` (the interpreter's own start) in the same run.

    python bench/register.py [--rounds 3] [--new 200]
"""

import argparse
import getpass
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [os.path.join(ROOT, "tests")]
from helpers import domain_xml, make_instance  # noqa: E402
from daemon import Daemon  # noqa: E402

from mdserver import config  # noqa: E402
from mdserver.dnsmasq import DnsmasqFiles  # noqa: E402
from mdserver.registry import Registry  # noqa: E402
from mdserver.store import Store  # noqa: E402


def write_conf(d: str, **extra: str) -> str:
    path = os.path.join(d, "mdserver.conf")
    md = "".join(f"{k} = {v}\n" for k, v in extra.items())
    with open(path, "w") as f:
        f.write(f"[mdserver]\ndb_file = {d}/db.json\nuserdata_dir = {d}/ud\n"
                f"admin_socket = {d}/admin.sock\n{md}"
                f"[dnsmasq]\nbase_dir = {d}/dnsmasq\nuser = {getpass.getuser()}\n")
    return path


def populate(d: str, n: int) -> None:
    store = Store(os.path.join(d, "db.json"))
    store.put_many(make_instance(i) for i in range(2, n + 2))  # 10.122.x.y, not .0.1
    store.close()


def per_registration(n: int, new: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        cfg = config.load(write_conf(d))
        populate(d, n)
        store = Store(cfg.mdserver.db_file)
        registry = Registry(cfg, store, [DnsmasqFiles(cfg)])
        registry.sync()
        xmls = [domain_xml(f"new{i}", f"ec2f{i:04x}-aaaa-4bbb-8ccc-{i:012x}",
                           f"52:54:01:00:{i >> 8 & 0xff:02x}:{i & 0xff:02x}").encode()
                for i in range(new)]
        t = time.perf_counter()
        for xml in xmls:
            registry.register(xml)
        elapsed = time.perf_counter() - t
        store.close()
    return elapsed / new


def hook_times(runs: int):
    with tempfile.TemporaryDirectory() as d:
        conf = write_conf(d, listen_address="127.0.0.1", port="0")
        populate(d, 10_000)
        daemon = Daemon(conf).wait_ready(60)
        xml = domain_xml("hooked", "ec2e0001-aaaa-4bbb-8ccc-000000000001",
                         "52:54:02:00:00:01").encode()
        env = {**os.environ, "MDSERVER_CONFIG": conf}
        hook, base = [], []
        try:
            for _ in range(runs):
                t = time.perf_counter()
                subprocess.run(["/usr/bin/python3", os.path.join(ROOT, "hooks", "qemu"),
                                "hooked", "prepare", "begin", "-"], input=xml, env=env,
                               check=True, capture_output=True)
                hook.append(time.perf_counter() - t)
                t = time.perf_counter()
                subprocess.run(["/usr/bin/python3", "-c", "pass"], check=True)
                base.append(time.perf_counter() - t)
            registered = "hooked" in subprocess.run(
                [sys.executable, "-m", "mdserver.ctl", "-c", conf, "list"],
                capture_output=True, text=True, cwd=ROOT).stdout
        finally:
            daemon.stop()
    return statistics.median(hook), statistics.median(base), registered


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new", type=int, default=200)
    ap.add_argument("--hook-runs", type=int, default=15)
    args = ap.parse_args()
    small, large = [], []
    for _ in range(args.rounds):
        small.append(per_registration(100, args.new))
        large.append(per_registration(10_000, args.new))
    hook, interp, ok = hook_times(args.hook_runs)
    s, l = statistics.median(small) * 1e3, statistics.median(large) * 1e3
    print(json.dumps({
        "register_ms_at_100": round(s, 3), "register_ms_at_10000": round(l, 3),
        "ratio_10000_over_100": round(l / s, 2),
        "hook_wall_ms": round(hook * 1e3, 1), "python_start_ms": round(interp * 1e3, 1),
        "hook_over_python_start": round(hook / interp, 2), "hook_registered": ok,
        "rounds": args.rounds, "new_per_round": args.new, "when": time.strftime("%Y-%m-%d"),
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
