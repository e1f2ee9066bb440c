"""Scenario (g): a boot storm, N distinct guests each doing a full crawl at the same instant; time until all are done, p99 per request."""

import statistics
import time

from bench.context import SERVERS, Bench, face_of, guest_spec
from bench.lab import GROUP_SIZE
from bench.stats import ratio, summary_ms

# The clients (one process per namespace of GROUP_SIZE guests) start at a
# wall-clock instant this far ahead: enough for every process to be up.
LEAD = 1.0
LEAD_PER_PROCESS = 0.25


def one_storm(b: Bench, server: str, n: int) -> dict:
    guests = b.lab.storm[:n]
    groups = b.lab.groups(guests)
    start_at = time.time() + LEAD + LEAD_PER_PROCESS * len(groups)
    jobs = [(ns, b.spec(server, "run", [guest_spec(g, face_of(g)) for g in members],
                        expected={g.ip: b.answers.get(g.ip, {}) for g in members},
                        start_at=start_at, rounds=1))
            for ns, members in groups.items()]
    outs = b.clients(jobs)
    errors, starts, ends, latencies, done = [], [], [], [], 0
    for out in outs:
        errors += out.get("errors", [])
        for g in out.get("guests", []):
            errors += [f"guest {g['src']}: {e}" for e in g["errors"]]
            latencies += g["latencies"]
            for r in g["rounds"]:
                starts.append(r["start"])
                ends.append(r["end"])
                done += 1
    return {"all_done_s": round(max(ends) - start_at, 3) if ends and done == n else None,
            "late_start_s": round(max(starts) - start_at, 3) if starts else None,
            "guests_done": done, "requests": len(latencies), "request": summary_ms(latencies),
            "errors": errors[:20], "error_count": len(errors)}


def run(b: Bench) -> None:
    storms = {}
    for n in b.plan.storms:
        rounds = {server: [] for server in SERVERS}
        for _ in range(b.plan.storm_rounds):
            for server in SERVERS:
                res = one_storm(b, server, n)
                rounds[server].append(res)
                for err in res["errors"][:5]:
                    b.fail("g", f"{n} guests, {server}: {err}")
                if res["guests_done"] != n:
                    b.fail("g", f"{n} guests, {server}: only {res['guests_done']} finished "
                                f"({res['error_count']} errors)")
                b.log(f"(g) {n} guests on {server}: all done in {res['all_done_s']} s, p99 "
                      f"{res['request']['p99_ms']} ms per request, {res['error_count']} errors")
                if (res["late_start_s"] or 0) > 0.1:  # a client process was not up in time
                    b.log(f"(g) warning: a guest started {res['late_start_s']} s late")
        row = {}
        for server, runs in rounds.items():
            times = [r["all_done_s"] for r in runs if r["all_done_s"] is not None]
            row[server] = {"all_done_s": round(statistics.median(times), 3) if times else None,
                           "all_done_runs": [r["all_done_s"] for r in runs],
                           "p99_request_ms": max((r["request"]["p99_ms"] or 0) for r in runs),
                           "p50_request_ms": statistics.median(
                               [r["request"]["p50_ms"] or 0 for r in runs]),
                           "requests": runs[-1]["requests"],
                           "late_start_s": max((r["late_start_s"] or 0) for r in runs),
                           "error_count": sum(r["error_count"] for r in runs)}
        md, ngx, bare = (row[x]["all_done_s"] for x in SERVERS)
        row["vs_nginx"], row["vs_bare"] = ratio(md, ngx), ratio(md, bare)
        storms[str(n)] = row
    b.results["g"] = {"title": "boot storm: N guests each doing a full crawl at once",
                      "instances": b.plan.serving_size, "rounds": b.plan.storm_rounds,
                      "guests_per_namespace": GROUP_SIZE,
                      "faces": "guest k crawls face k mod 3 (ec2, openstack, nocloud)",
                      "storms": storms}
