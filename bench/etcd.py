"""The etcd store against the local one: registration latency, guest GET throughput, catch-up.

Needs root (the etcd of tests/etcd_lab.py runs in a network namespace the
pytest-free process joins over a veth), etcd-server, wrk. Three figures, each
against the local store in the same run:

1. Registry.register latency (p50/p99) for K new domains on top of N
   registered ones, local Store vs EtcdStore (one etcd transaction each).
2. The real daemon with 10,000 instances, one of them 127.0.0.1, serving a
   meta-data leaf to wrk (64 connections), [store] backend = local vs etcd,
   rounds A/B: the etcd backend answers from its cache, so the ratio should
   be ~1.
3. Catch-up: an EtcdStore holding 10,000 records, etcd stopped until the
   store notices, then started: seconds until the store is connected again
   and at etcd's revision.

    sudo python bench/etcd.py [--existing 1000] [--new 300] [--rounds 2] [--json out.json]
"""

import argparse
import getpass
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, os.path.join(ROOT, "tests")]
from etcd_lab import EtcdLab  # noqa: E402
from helpers import domain_xml, make_instance  # noqa: E402
from server_candidates import LEAF_PATH, Managed, free_port, run_wrk, wait_ready  # noqa: E402

from mdserver import config  # noqa: E402
from mdserver.dnsmasq import DnsmasqFiles  # noqa: E402
from mdserver.etcdstore import EtcdStore  # noqa: E402
from mdserver.registry import Registry  # noqa: E402
from mdserver.store import Store  # noqa: E402

N_SERVED = 10_000


def write_conf(d: str, store: str = "", **md: str) -> str:
    path = os.path.join(d, "mdserver.conf")
    extra = "".join(f"{k} = {v}\n" for k, v in md.items())
    with open(path, "w") as f:
        f.write(f"[mdserver]\ndb_file = {d}/db.json\nuserdata_dir = {d}/ud\n"
                f"admin_socket = {d}/admin.sock\n{extra}"
                f"[dnsmasq]\nbase_dir = {d}/dnsmasq\nuser = {getpass.getuser()}\n"
                "[public-keys]\nadmin = ssh-ed25519 AAAAC3Nza admin@host\n" + store)
    return path


def etcd_section(lab: EtcdLab, host: str, prefix: str) -> str:
    return (f"[store]\nbackend = etcd\nendpoints = {','.join(lab.endpoints)}\n"
            f"host = {host}\nprefix = {prefix}\n")


def instances(n: int, host: str, me: bool = False):
    out = [make_instance(i, host=host) for i in range(2, n + 2)]
    if me:
        out[-1] = make_instance(n + 2, ipv4="127.0.0.1", host=host)
    return out


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def registration(lab: EtcdLab, existing: int, new: int, backend: str, run: int):
    with tempfile.TemporaryDirectory() as d:
        prefix = f"/bench-reg-{run}-{backend}/"
        cfg = config.load(write_conf(d, etcd_section(lab, "bench", prefix)
                                     if backend == "etcd" else ""))
        records = instances(existing, "bench")
        if backend == "local":
            store = Store(cfg.mdserver.db_file, host="bench")
            store.commit(put=records)
        else:
            seed = EtcdStore(cfg.store, Store(os.path.join(d, "seed.json"), host="bench"))
            seed.import_records(records)
            seed.close()
            store = EtcdStore(cfg.store, Store(os.path.join(d, "cache.json"), host="bench"))
            store.start()
        registry = Registry(cfg, store, [DnsmasqFiles(cfg, host="bench")])
        registry.sync()
        xmls = [domain_xml(f"new{i}", f"ec2f{i:04x}-aaaa-4bbb-8ccc-{i:012x}",
                           f"52:54:01:00:{i >> 8 & 0xff:02x}:{i & 0xff:02x}").encode()
                for i in range(new)]
        times = []
        for xml in xmls:
            t = time.perf_counter()
            registry.register(xml)
            times.append(time.perf_counter() - t)
        store.close()
    return times


def serve(lab: EtcdLab, d: str, backend: str):
    port = free_port()
    store = etcd_section(lab, "served", "/bench-serve/") if backend == "etcd" else ""
    conf = write_conf(d, store, listen_address="127.0.0.1", port=str(port))
    records = instances(N_SERVED, "served", me=True)
    if backend == "local":
        s = Store(os.path.join(d, "db.json"), host="served")
        s.commit(put=records)
        s.close()
    else:
        seed = EtcdStore(config.load(conf).store, Store(os.path.join(d, "seed.json")))
        seed.import_records(records)
        seed.close()
    proc = Managed([sys.executable, "-m", "mdserver", conf], os.path.join(d, "mdserver.out"))
    return proc, port


def throughput(lab: EtcdLab, rounds: int, duration: int):
    rows = []
    dirs = {b: tempfile.mkdtemp(prefix=f"mdserver-etcd-{b}-") for b in ("local", "etcd")}
    procs = {}
    try:
        for backend, d in dirs.items():
            procs[backend] = serve(lab, d, backend)
            if not wait_ready(procs[backend][1], procs[backend][0]):
                raise SystemExit(f"{backend}: daemon did not come up: {procs[backend][0].tail()}")
        for r in range(rounds):
            got = {}
            for backend in ("local", "etcd"):
                res, _ = run_wrk(procs[backend][1], duration, 2, 64, 2)
                if res["non_2xx"] or not res["requests"]:
                    raise SystemExit(f"{backend}: errors in wrk run: {res}")
                got[backend] = res
            rows.append({"round": r + 1, "local_rps": got["local"]["rps"],
                         "etcd_rps": got["etcd"]["rps"],
                         "ratio": round(got["etcd"]["rps"] / got["local"]["rps"], 3)})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        for proc, _ in procs.values():
            proc.stop()
        for d in dirs.values():
            shutil.rmtree(d, ignore_errors=True)
    return rows


def catch_up(lab: EtcdLab, n: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        st = config.load(write_conf(d, etcd_section(lab, "catchup", "/bench-catchup/"))).store
        seed = EtcdStore(st, Store(os.path.join(d, "seed.json")))
        seed.import_records(instances(n, "catchup"))
        seed.close()
        store = EtcdStore(st, Store(os.path.join(d, "cache.json"), host="catchup"),
                          lease_ttl=3)
        store.start()
        assert len(store) == n, len(store)
        lab.stop_all()
        deadline = time.monotonic() + 30
        while store.status()["connected"] and time.monotonic() < deadline:
            time.sleep(0.05)
        lab.start_all()
        t = time.monotonic()
        target = lab.revision()
        while not (store.status()["connected"] and int(str(store.status()["revision"])) >= target):
            if time.monotonic() - t > 120:
                raise SystemExit("no catch-up within 120 s")
            time.sleep(0.01)
        took = time.monotonic() - t
        store.close()
    return took


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--existing", type=int, default=1000)
    ap.add_argument("--new", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--json")
    args = ap.parse_args()
    for tool in ("etcd", "wrk"):
        if shutil.which(tool) is None:
            raise SystemExit(f"needs {tool} (apt-get install etcd-server wrk)")
    result = {}
    with EtcdLab(members=1) as lab:
        lab.attach(None)
        for backend in ("local", "etcd"):
            times = registration(lab, args.existing, args.new, backend, 0)
            result[f"register_{backend}_p50_ms"] = round(statistics.median(times) * 1e3, 2)
            result[f"register_{backend}_p99_ms"] = round(percentile(times, 0.99) * 1e3, 2)
        result["register_p50_etcd_over_local"] = round(
            result["register_etcd_p50_ms"] / result["register_local_p50_ms"], 2)
        rows = throughput(lab, args.rounds, args.duration)
        result["get_rps_local"] = statistics.median(r["local_rps"] for r in rows)
        result["get_rps_etcd"] = statistics.median(r["etcd_rps"] for r in rows)
        result["get_etcd_over_local"] = statistics.median(r["ratio"] for r in rows)
        result["catch_up_s_10000"] = round(catch_up(lab, N_SERVED), 2)
    result.update(existing=args.existing, new=args.new, rounds=args.rounds,
                  method=f"wrk -t2 -c64 -d{args.duration}s {LEAF_PATH}, {N_SERVED} instances; "
                         "etcd 3.4 single member, data on this machine's disk",
                  when=time.strftime("%Y-%m-%d"))
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
