"""Scenarios (a)-(e): one path from one guest, keep-alive, at each connection count; mdserver, nginx and the bare callable in turn."""

import os

from bench import wrk
from bench.context import PATHS, SERVERS, TARGETS, Bench
from bench.report import TARGET_CONNECTIONS
from bench.stats import ratio


def median_run(runs: list) -> dict:
    """The run with the median throughput, whole (its percentiles with it);
    every run's throughput kept beside it."""
    ranked = sorted(runs, key=lambda r: r.get("rps", 0.0))
    chosen = dict(ranked[(len(ranked) - 1) // 2])
    if len(runs) > 1:
        chosen["rounds_rps"] = [round(r.get("rps", 0.0), 1) for r in runs]
    return chosen


def run(b: Bench) -> None:
    script = wrk.write_script(b.workdir)
    raw = b.path("wrk.txt")
    mine = b.answers.get(b.lab.load.ip, {})
    for s in b.plan.scenarios_ae:
        title, path = PATHS[s]
        if path not in mine or mine[path][0] != 200:
            b.fail(s, f"mdserver did not answer {path} with 200 when recorded: "
                      f"{mine.get(path, ['nothing'])[0]}")
            continue
        body_file = b.path(f"body-{s}")
        with open(body_file, "wb") as f:
            f.write(mine[path][1].encode("latin-1"))
        cells = []
        for c in b.plan.connections:
            cell: dict = {"connections": c}
            runs: dict = {server: [] for server in SERVERS}
            rounds = b.plan.target_rounds if c == TARGET_CONNECTIONS else 1
            # A B C in turn at each point: drift over the run hits all three.
            for _ in range(rounds):
                for server in SERVERS:
                    url = f"http://{TARGETS[server]}{path}"
                    if b.plan.warmup:
                        warm = wrk.run(b.lab.load_ns, url, body_file, script, c, b.plan.warmup,
                                       raw)
                        for err in warm["errors"]:
                            b.fail(s, f"{server}, {c} connections (warm-up): {err}")
                    res = wrk.run(b.lab.load_ns, url, body_file, script, c, b.plan.seconds, raw)
                    for err in res["errors"]:
                        b.fail(s, f"{server}, {c} connections: {err}")
                    runs[server].append({k: (round(v, 3) if isinstance(v, float) else v)
                                         for k, v in res.items()})
            for server in SERVERS:
                cell[server] = median_run(runs[server])
            md, ngx, bare = (cell[x] for x in SERVERS)
            cell["vs_nginx"] = ratio(md.get("rps"), ngx.get("rps"))
            cell["vs_bare"] = ratio(md.get("rps"), bare.get("rps"))
            cell["p99_vs_nginx"] = ratio(md.get("p99_ms"), ngx.get("p99_ms"))
            cell["p99_vs_bare"] = ratio(md.get("p99_ms"), bare.get("p99_ms"))
            cell["ok"] = not any(cell[x].get("errors") for x in SERVERS)
            b.log(f"({s}) {c:>3} conn: mdserver {md.get('rps', 0):8.0f}/s p99 "
                  f"{md.get('p99_ms', 0):6.2f} ms | nginx {ngx.get('rps', 0):8.0f}/s | bare "
                  f"{bare.get('rps', 0):8.0f}/s | {cell['vs_nginx']}x nginx, "
                  f"{cell['vs_bare']}x bare")
            cells.append(cell)
        b.results[s] = {"title": title, "path": path, "instances": b.plan.serving_size,
                        "body_bytes": os.path.getsize(body_file), "seconds": b.plan.seconds,
                        "wrk_threads": {c: wrk.threads_for(c) for c in b.plan.connections},
                        "cells": cells}
