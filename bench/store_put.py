"""Cost of registering one instance with 100 vs 10,000 already stored.

Each run: a fresh store with N records, then K updates through Store.put
(each one durable: a journal line and an fsync; compactions included, as
they fall). Reference in the same run: rewriting the whole N-record JSON
file with fsync, what a naive store would do per registration.

    python bench/store_put.py [--puts K] [--rounds R]
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from helpers import make_instance  # noqa: E402

from mdserver.fsutil import atomic_write  # noqa: E402
from mdserver.store import Store  # noqa: E402


def per_put(n: int, puts: int) -> float:
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as d:
        store = Store(os.path.join(d, "db.json"))
        store.put_many([make_instance(i) for i in range(1, n + 1)])
        targets = [make_instance(1 + (i * 7919) % n) for i in range(puts)]
        start = time.perf_counter()
        for inst in targets:
            store.put(inst.updated(last_seen=inst.last_seen + 1))
        elapsed = time.perf_counter() - start
        store.close()
    return elapsed / puts


def rewrite(n: int, times: int) -> float:
    records = [make_instance(i).to_dict() for i in range(1, n + 1)]
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as d:
        start = time.perf_counter()
        for _ in range(times):
            atomic_write(os.path.join(d, "db.json"),
                         json.dumps({"schema": 1, "instances": records}).encode())
        return (time.perf_counter() - start) / times


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--puts", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    small, large, naive_small, naive_large = [], [], [], []
    for _ in range(args.rounds):  # interleaved, so drift hits both alike
        small.append(per_put(100, args.puts))
        large.append(per_put(10_000, args.puts))
        naive_small.append(rewrite(100, 50))
        naive_large.append(rewrite(10_000, 20))
    m = {k: statistics.median(v) * 1e3 for k, v in
         (("put_100", small), ("put_10000", large),
          ("rewrite_100", naive_small), ("rewrite_10000", naive_large))}
    print(json.dumps({"ms": {k: round(v, 3) for k, v in m.items()},
                      "put_10000_over_put_100": round(m["put_10000"] / m["put_100"], 2),
                      "rewrite_10000_over_put_10000": round(m["rewrite_10000"] / m["put_10000"], 1),
                      "puts": args.puts, "rounds": args.rounds}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
