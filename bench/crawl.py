"""Scenario (f): one full cloud-init crawl per face from one guest, a new connection per request, against mdserver and both references."""

from bench.context import FACES, SERVERS, Bench, guest_spec
from bench.stats import ratio, summary_ms


def run(b: Bench) -> None:
    lab = b.lab
    expected = {lab.load.ip: b.answers.get(lab.load.ip, {})}
    faces = {}
    for face in FACES:
        row = {}
        for server in SERVERS:
            spec = b.spec(server, "run", [guest_spec(lab.load, face)], expected=expected,
                          rounds=b.plan.crawl_rounds)
            out = b.clients([(lab.load_ns, spec)])[0]
            guests = out.get("guests") or [{"errors": out.get("errors", ["no output"]),
                                            "rounds": [], "latencies": []}]
            g = guests[0]
            for err in g["errors"]:
                b.fail("f", f"{face} crawl from {server}: {err}")
            crawls = [r["end"] - r["start"] for r in g["rounds"]]
            row[server] = {"crawls": len(crawls),
                           "requests_per_crawl": g["rounds"][0]["requests"] if g["rounds"] else 0,
                           "crawl": summary_ms(crawls), "request": summary_ms(g["latencies"]),
                           "errors": g["errors"]}
        md, ngx, bare = (row[x]["crawl"]["p50_ms"] for x in SERVERS)
        row["vs_nginx"], row["vs_bare"] = ratio(md, ngx), ratio(md, bare)
        b.log(f"(f) {face:9} crawl ({row['mdserver']['requests_per_crawl']} requests): mdserver "
              f"{md} ms, nginx {ngx} ms, bare {bare} ms: {row['vs_nginx']}x nginx")
        faces[face] = row
    b.results["f"] = {"title": "one cloud-init crawl per face (new connection per request)",
                      "instances": b.plan.serving_size, "rounds": b.plan.crawl_rounds,
                      "faces": faces}
