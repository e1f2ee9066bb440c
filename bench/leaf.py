"""mdserver itself vs nginx: a meta-data leaf at 64 connections, 10,000 instances.

Starts the real daemon (`python -m mdserver`) from a temporary config whose
database holds 10,000 instances, one of them 127.0.0.1 (the wrk client), and
nginx serving the same body at the same path; runs wrk against each in turn
(A B A B ...) and prints req/s, p99 and the ratio mdserver/nginx per round and
as medians.

    python bench/leaf.py [--rounds 3] [--duration 10] [--json out.json]
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "tests")]
from helpers import make_instance  # noqa: E402
from server_candidates import LEAF_PATH, Managed, free_port, run_wrk, start_nginx, wait_ready  # noqa: E402

from mdserver.store import Store  # noqa: E402

N_INSTANCES = 10_000


def start_mdserver(workdir: str, **settings: str):
    port = free_port()
    conf = os.path.join(workdir, "mdserver.conf")
    extra = "".join(f"{k} = {v}\n" for k, v in settings.items())
    with open(conf, "w") as f:
        f.write(f"[mdserver]\nlisten_address = 127.0.0.1\nport = {port}\n"
                f"db_file = {workdir}/db.json\nuserdata_dir = {workdir}/userdata\n{extra}"
                "[public-keys]\nadmin = ssh-ed25519 AAAAC3Nza admin@host\n")
    store = Store(os.path.join(workdir, "db.json"))
    instances = [make_instance(n) for n in range(1, N_INSTANCES)]
    me = make_instance(N_INSTANCES, ipv4="127.0.0.1")
    store.put_many(instances + [me])
    store.close()
    proc = Managed([sys.executable, "-m", "mdserver", conf], os.path.join(workdir, "mdserver.out"))
    return proc, port, me.instance_id


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--access-log", action="store_true", help="mdserver with access_log = yes")
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="mdserver-leaf-") as workdir:
        os.chmod(workdir, 0o755)  # nginx workers run unprivileged
        settings = {"access_log": "yes", "logfile": f"{workdir}/access.log"} \
            if args.access_log else {}
        md, md_port, body = start_mdserver(workdir, **settings)
        ngx, ngx_port = start_nginx(workdir, body)
        try:
            for proc, port in ((md, md_port), (ngx, ngx_port)):
                if not wait_ready(port, proc):
                    raise SystemExit(f"server did not come up: {proc.tail()}")
            for r in range(args.rounds):
                got = {}
                for name, port in (("mdserver", md_port), ("nginx", ngx_port)):
                    res, _ = run_wrk(port, args.duration, 2, args.connections, args.warmup)
                    if res["non_2xx"] or not res["requests"]:
                        raise SystemExit(f"{name}: errors in wrk run: {res}")
                    got[name] = res
                rows.append({"round": r + 1, "mdserver_rps": got["mdserver"]["rps"],
                             "mdserver_p99_ms": got["mdserver"]["p99_ms"],
                             "nginx_rps": got["nginx"]["rps"],
                             "nginx_p99_ms": got["nginx"]["p99_ms"],
                             "ratio": round(got["mdserver"]["rps"] / got["nginx"]["rps"], 3)})
                print(json.dumps(rows[-1]), flush=True)
        finally:
            md.stop()
            ngx.stop()
    summary = {
        "method": f"wrk -t2 -c{args.connections} -d{args.duration}s --latency {LEAF_PATH}, "
                  f"{N_INSTANCES} instances, {args.rounds} rounds A/B"
                  + (", access_log on" if args.access_log else ""),
        "median_ratio": statistics.median(r["ratio"] for r in rows),
        "median_mdserver_p99_ms": statistics.median(r["mdserver_p99_ms"] for r in rows),
        "median_nginx_p99_ms": statistics.median(r["nginx_p99_ms"] for r in rows),
        "rounds": rows,
        "when": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "rounds"}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
