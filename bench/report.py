"""The run's output: the JSON document, PASS/MISS of the issue's targets, the terminal table, the Markdown section and the plots."""

import os
import platform
import subprocess
import time
from typing import Dict, List, Optional

from bench.context import FACES, PATHS, SERVERS, Bench
from bench.stats import ratio

START = "<!-- bench:results:start (written by python -m bench --markdown) -->"
END = "<!-- bench:results:end -->"
TARGET_CONNECTIONS = 64
TARGET_SIZE = 10000


# -- the document ---------------------------------------------------------

def _run(cmd: List[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (r.stdout or r.stderr).strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine() -> Dict[str, object]:
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    distro = ""
    try:
        with open("/etc/os-release") as f:
            distro = dict(line.rstrip().split("=", 1) for line in f if "=" in line) \
                .get("PRETTY_NAME", "").strip('"')
    except OSError:
        pass
    import granian
    import mdserver
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commit = _run(["git", "-C", root, "rev-parse", "--short", "HEAD"])
    dirty = bool(_run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"]))
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem_kb / 1048576, 1),
            "kernel": platform.release(), "os": distro,
            "python": platform.python_version(), "granian": granian.__version__,
            "nginx": _run(["nginx", "-v"]).split("/")[-1],
            "wrk": _run(["wrk", "-v"]).split(" [")[0].replace("wrk ", ""),
            "mdserver": mdserver.__version__,
            "commit": commit + (" (uncommitted changes)" if dirty else "")}


def document(b: Bench, wall_start: float, seconds: float) -> dict:
    doc = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(wall_start)),
           "seconds": round(seconds, 1), "quick": b.plan.quick,
           "plan": {k: v for k, v in vars(b.plan).items()},
           "machine": machine(), "settings": b.settings,
           "scenarios": {k: v for k, v in b.results.items() if k != "meta"},
           "meta": b.results.get("meta", {}), "errors": b.errors}
    doc["targets"] = targets(doc)
    return doc


# -- targets ----------------------------------------------------------------

def _cell(doc: dict, s: str, connections: int) -> Optional[dict]:
    r = doc["scenarios"].get(s)
    if not r or r.get("instances") != TARGET_SIZE:
        return None
    return next((c for c in r["cells"] if c["connections"] == connections), None)


def _t(tid: str, what: str, value, limit, ok: Optional[bool], unit: str = "",
       op: str = "<=") -> dict:
    return {"id": tid, "target": what, "value": value, "op": op, "limit": limit, "unit": unit,
            "result": "n/a" if ok is None else ("PASS" if ok else "MISS")}


def _le(v, limit) -> Optional[bool]:
    return None if v is None else v <= limit


def _ge(v, limit) -> Optional[bool]:
    return None if v is None else v >= limit


def targets(doc: dict) -> List[dict]:
    """The issue's targets; n/a where this run did not measure the point
    (--quick, --only, a failed cell)."""
    sc, out = doc["scenarios"], []
    a = _cell(doc, "a", TARGET_CONNECTIONS)
    ok_a = a is not None and a["ok"]
    out.append(_t("a", "leaf, 10,000 instances, 64 conn: x nginx", a and a["vs_nginx"], 0.45,
                  _ge(a and a["vs_nginx"], 0.45) if ok_a else (False if a else None), "x", ">="))
    out.append(_t("a", "leaf: x the bare callable", a and a["vs_bare"], 0.8,
                  _ge(a and a["vs_bare"], 0.8) if ok_a else (False if a else None), "x", ">="))
    out.append(_t("a", "leaf: p99 x nginx's p99", a and a["p99_vs_nginx"], 3.0,
                  _le(a and a["p99_vs_nginx"], 3.0) if ok_a else (False if a else None), "x"))
    for s, limit in (("b", 0.35), ("c", 0.3), ("d", 0.35), ("e", 0.35)):
        c = _cell(doc, s, TARGET_CONNECTIONS)
        ok = _ge(c and c["vs_nginx"], limit) if c is not None and c["ok"] else \
            (False if c else None)
        out.append(_t(s, f"{PATHS[s][0]}, 64 conn: x nginx",
                      c and c["vs_nginx"], limit, ok, "x", ">="))
    f = sc.get("f", {}).get("faces", {})
    for face in FACES:
        row = f.get(face)
        v = row and row["vs_nginx"]
        bad = row is not None and any(row[x]["errors"] for x in SERVERS)
        out.append(_t("f", f"one {face} crawl: x nginx's", v, 2.0,
                      False if bad else _le(v, 2.0), "x"))
    g = sc.get("g", {}).get("storms", {}).get("500")
    if g is None:
        out.append(_t("g", "500 guests all done, no error: x nginx's time", None, 2.0, None, "x"))
    else:
        clean = all(g[x]["error_count"] == 0 for x in SERVERS) and g["mdserver"]["all_done_s"]
        out.append(_t("g", "500 guests all done, no error: x nginx's time", g["vs_nginx"], 2.0,
                      _le(g["vs_nginx"], 2.0) if clean else False, "x"))
    h = sc.get("h", {}).get("sizes", {})
    hv = ratio(h.get("10000", {}).get("p50_ms"), h.get("100", {}).get("p50_ms"), 2)
    out.append(_t("h", "registration p50 at 10,000 x at 100", hv, 1.2, _le(hv, 1.2), "x"))
    i = sc.get("i", {})
    iv = i.get("routes", {}).get("openstack", {}).get("vs_python") \
        if i.get("instances") == TARGET_SIZE else None
    out.append(_t("i", "hook, default route (no seed image): x python3 -c pass", iv, 3.0,
                  _le(iv, 3.0), "x"))
    j = sc.get("j", {}).get("sizes", {})
    big = (j.get("10000") or {}).get("after_load") or (j.get("10000") or {}).get("after_crawl")
    if big:
        limit = 60 + 25 * big["workers"]
        pss = round(big["pss_kb"] / 1024, 1)
        out.append(_t("j", f"PSS at 10,000 ({big['workers']} worker"
                           f"{'s' if big['workers'] != 1 else ''})", pss, limit,
                      pss <= limit, "MB"))
    else:
        out.append(_t("j", "PSS at 10,000", None, None, None, "MB"))
    slope = per_instance(j)
    out.append(_t("j", "memory per instance per process", slope, 4.0, _le(slope, 4.0), "KB"))
    k = sc.get("k", {}).get("sizes", {}).get("10000", {})
    out.append(_t("k", "start to ready, 10,000 instances, files present", k.get("ready_s"), 2.0,
                  _le(k.get("ready_s"), 2.0), "s"))
    return out


def per_instance(j: dict) -> Optional[float]:
    """KB per instance per process holding the database (the main process
    and each worker): PSS of the tree after a crawl at 10,000 instances
    minus at 100, over 9,900 instances and those processes."""
    lo, hi = (j.get(s, {}).get("after_crawl") for s in ("100", "10000"))
    if not lo or not hi:
        return None
    return round((hi["pss_kb"] - lo["pss_kb"]) / (10000 - 100) / (1 + hi["workers"]), 2)


# -- text -----------------------------------------------------------------

def _f(v, fmt: str = "{:.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def rows(doc: dict) -> Dict[str, List[List[str]]]:
    """Every table as a header and rows of strings (terminal and Markdown)."""
    sc, out = doc["scenarios"], {}
    ae = [["", "conn", "mdserver req/s", "p50 ms", "p99 ms", "p99.9 ms", "nginx req/s",
           "p99 ms", "bare req/s", "p99 ms", "x nginx", "x bare", "ok"]]
    for s in "abcde":
        for c in sc.get(s, {}).get("cells", []):
            md, ngx, bare = (c[x] for x in SERVERS)
            ae.append([f"({s})", str(c["connections"]), _f(md.get("rps")),
                       _f(md.get("p50_ms"), "{:.2f}"), _f(md.get("p99_ms"), "{:.2f}"),
                       _f(md.get("p999_ms"), "{:.2f}"), _f(ngx.get("rps")),
                       _f(ngx.get("p99_ms"), "{:.2f}"), _f(bare.get("rps")),
                       _f(bare.get("p99_ms"), "{:.2f}"), _f(c["vs_nginx"], "{:.3f}"),
                       _f(c["vs_bare"], "{:.3f}"), "yes" if c["ok"] else "FAIL"])
    out["ae"] = ae
    f = [["face", "requests", "mdserver crawl p50 ms", "p99 ms", "per request p99 ms",
          "nginx p50 ms", "bare p50 ms", "x nginx", "x bare"]]
    for face, r in sc.get("f", {}).get("faces", {}).items():
        md = r["mdserver"]
        f.append([face, str(md["requests_per_crawl"]), _f(md["crawl"]["p50_ms"], "{:.1f}"),
                  _f(md["crawl"]["p99_ms"], "{:.1f}"), _f(md["request"]["p99_ms"], "{:.2f}"),
                  _f(r["nginx"]["crawl"]["p50_ms"], "{:.1f}"),
                  _f(r["bare"]["crawl"]["p50_ms"], "{:.1f}"), _f(r["vs_nginx"], "{:.2f}"),
                  _f(r["vs_bare"], "{:.2f}")])
    out["f"] = f
    g = [["guests", "requests", "mdserver all done s", "p50 / p99 per request ms",
          "nginx all done s", "p99 ms", "bare all done s", "p99 ms", "x nginx", "x bare",
          "errors"]]
    for n, r in sc.get("g", {}).get("storms", {}).items():
        md, ngx, bare = (r[x] for x in SERVERS)
        g.append([n, str(md["requests"]), _f(md["all_done_s"], "{:.2f}"),
                  f"{_f(md['p50_request_ms'], '{:.1f}')} / {_f(md['p99_request_ms'], '{:.1f}')}",
                  _f(ngx["all_done_s"], "{:.2f}"), _f(ngx["p99_request_ms"], "{:.1f}"),
                  _f(bare["all_done_s"], "{:.2f}"), _f(bare["p99_request_ms"], "{:.1f}"),
                  _f(r["vs_nginx"], "{:.2f}"), _f(r["vs_bare"], "{:.2f}"),
                  str(sum(r[x]["error_count"] for x in SERVERS))])
    out["g"] = g
    sizes = sorted({int(s) for k in "hjk" for s in sc.get(k, {}).get("sizes", {})})
    hjk = [["instances", "(h) register p50 ms", "p99 ms", "(j) RSS MB idle / crawled / loaded",
            "PSS MB idle / crawled / loaded", "processes", "(k) first start s",
            "ready, files present s"]]
    for n in sizes:
        h = sc.get("h", {}).get("sizes", {}).get(str(n), {})
        j = sc.get("j", {}).get("sizes", {}).get(str(n), {})
        k = sc.get("k", {}).get("sizes", {}).get(str(n), {})
        mem = [j.get(w) for w in ("idle", "after_crawl", "after_load")]
        hjk.append([str(n), _f(h.get("p50_ms"), "{:.2f}"), _f(h.get("p99_ms"), "{:.2f}"),
                    " / ".join(_f(m and m["rss_kb"] / 1024, "{:.1f}") for m in mem),
                    " / ".join(_f(m and m["pss_kb"] / 1024, "{:.1f}") for m in mem),
                    str(len(mem[0]["processes"])) if mem[0] else "-",
                    _f(k.get("first_start_s"), "{:.2f}"), _f(k.get("ready_s"), "{:.2f}")])
    out["hjk"] = hjk
    i = sc.get("i", {})
    iv = [["hook route", "p50 ms", "max ms", "x python3 -c pass", "seed image"]]
    for route, r in i.get("routes", {}).items():
        iv.append([route, _f(r["p50_ms"], "{:.1f}"), _f(r["max_ms"], "{:.1f}"),
                   _f(r["vs_python"], "{:.2f}"), "yes" if r["seed_image"] else "no"])
    if i:
        iv.append(["python3 -c pass", _f(i["python_start_ms"], "{:.1f}"), "", "1.00", ""])
    out["i"] = iv
    t = [["", "target", "measured", "limit", "result"]]
    for x in doc["targets"]:
        t.append([f"({x['id']})", x["target"],
                  _f(x["value"], "{}") + (" " + x["unit"] if x["value"] is not None else ""),
                  f"{x['op']} {_f(x['limit'], '{}')} {x['unit']}", x["result"]])
    out["targets"] = t
    return out


def _text_table(t: List[List[str]]) -> str:
    widths = [max(len(r[i]) for r in t) for i in range(len(t[0]))]
    left = {0} | {k for k, h in enumerate(t[0]) if h == "target"}  # text, not figures
    return "\n".join("  ".join(c.ljust(w) if k in left else c.rjust(w)
                               for k, (c, w) in enumerate(zip(r, widths))).rstrip()
                     for r in t)


TITLES = {
    "ae": "(a)-(e) keep-alive load from one guest",
    "f": "(f) one cloud-init crawl per face, a new connection per request",
    "g": "(g) boot storm: N guests, one full crawl each, at once",
    "hjk": "(h) registration, (j) memory of the process tree, (k) start-up, per database size",
    "i": "(i) libvirt hook wall time",
    "targets": "targets",
}


def table(doc: dict) -> str:
    m = doc["machine"]
    parts = [f"mdserver bench {doc['when']}, {doc['seconds']:.0f} s"
             f"{' (--quick)' if doc['quick'] else ''}: {m['cpu']}, {m['cores']} cores, "
             f"kernel {m['kernel']}, Python {m['python']}, granian {m['granian']}, "
             f"nginx {m['nginx']}, mdserver workers {doc['settings'].get('workers')}"]
    for key, t in rows(doc).items():
        if len(t) > 1:
            parts.append(f"\n{TITLES[key]}\n{_text_table(t)}")
    if doc["errors"]:
        parts.append("\nFAILURES (the run exits 1):\n  " + "\n  ".join(doc["errors"][:40]))
    return "\n".join(parts)


# -- Markdown and plots -----------------------------------------------------

def _md_table(t: List[List[str]]) -> str:
    lines = ["| " + " | ".join(t[0]) + " |", "|" + "---|" * len(t[0])]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in t[1:]]
    return "\n".join(lines)


def markdown(doc: dict, path: str, plots_dir: Optional[str],
             json_path: Optional[str] = None) -> None:
    """Replace the results section of `path` (between the markers), or
    write a file that is only that section."""
    m = doc["machine"]
    workers = doc.get("plan", {}).get("workers")
    command = "python -m bench" + (" --quick" if doc["quick"] else "") + \
        (f" --workers {workers}" if workers else "")
    s = [START, "", f"Run of {doc['when']}: `{command}`"
         f", {doc['seconds'] / 60:.1f} minutes.", "",
         f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; {m['os']}, kernel "
         f"{m['kernel']}; Python {m['python']}, granian {m['granian']}, nginx {m['nginx']}, "
         f"wrk {m['wrk']}; mdserver {m['mdserver']} at {m['commit']}, "
         f"{doc['settings'].get('workers')} worker(s).", ""]
    tables = rows(doc)
    s += ["### Targets", "", _md_table(tables["targets"]), ""]
    for key in ("ae", "f", "g", "hjk", "i"):
        if len(tables[key]) > 1:
            s += [f"### {TITLES[key]}", "", _md_table(tables[key]), ""]
    if plots_dir:
        rel = os.path.relpath(plots_dir, os.path.dirname(os.path.abspath(path)))
        for name, caption in PLOTS.items():
            if os.path.exists(os.path.join(plots_dir, name)):
                s += [f"![{caption}]({rel}/{name})", ""]
    if doc["errors"]:
        s += ["### Failures", ""] + [f"- {e}" for e in doc["errors"][:40]] + [""]
    missing = doc["meta"].get("optional_404")
    if missing:
        s += [f"Optional files of cloud-init's crawl that mdserver answers 404 (so does nginx, "
              f"from the same list): {', '.join(f'`{p}`' for p in missing)}.", ""]
    if json_path:
        s += [f"Every figure of this run: `{json_path}` (wrk's own output beside it, "
              f"`{os.path.splitext(json_path)[0]}-wrk.txt`).", ""]
    s.append(END)
    section = "\n".join(s)
    old = ""
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
    if START in old and END in old:
        text = old[:old.index(START)] + section + old[old.index(END) + len(END):]
    else:
        text = (old.rstrip() + "\n\n" if old else "# Benchmarks\n\n") + section + "\n"
    with open(path, "w") as f:
        f.write(text)


PLOTS = {
    "latency.png": "latency percentiles against connections, (a)-(e)",
    "throughput.png": "requests per second against connections, (a)-(e)",
    "registration.png": "registration latency against database size",
    "storm.png": "boot storm: time until all guests are done against N",
}
COLORS = {"mdserver": "tab:blue", "nginx": "tab:green", "bare": "tab:orange"}


def plots(doc: dict, d: str) -> str:
    """PNGs in `d`; what was written, or why none (no matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plots: matplotlib is not installed (pip install -e '.[bench]')"
    os.makedirs(d, exist_ok=True)
    sc, written = doc["scenarios"], []
    ae = [s for s in "abcde" if sc.get(s, {}).get("cells")]
    if ae:
        for name, kind in (("latency.png", "latency"), ("throughput.png", "rps")):
            cols = min(3, len(ae))
            nrows = (len(ae) + cols - 1) // cols
            fig, grid = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.6 * nrows),
                                     squeeze=False)
            axes = [ax for row in grid for ax in row]
            for ax in axes[len(ae):]:
                ax.axis("off")
            for ax, s in zip(axes, ae):
                cells = sc[s]["cells"]
                xs = [c["connections"] for c in cells]
                for server in SERVERS:
                    if kind == "rps":
                        ax.plot(xs, [c[server].get("rps") for c in cells], "o-",
                                color=COLORS[server], label=server)
                    else:
                        for p, style in (("p50_ms", "-"), ("p99_ms", "--"), ("p999_ms", ":")):
                            ax.plot(xs, [c[server].get(p) for c in cells], style, marker=".",
                                    color=COLORS[server],
                                    label=f"{server} {p[:-3].replace('p999', 'p99.9')}")
                ax.set_xscale("log", base=2)
                ax.set_xticks(xs, [str(x) for x in xs])
                if kind == "latency":
                    ax.set_yscale("log")
                ax.set_title(f"({s}) {sc[s]['title']}", fontsize=9)
                ax.set_xlabel("connections")
                ax.set_ylabel("ms" if kind == "latency" else "requests/s")
                ax.grid(True, alpha=0.3)
            axes[0].legend(fontsize=6)
            fig.tight_layout()
            fig.savefig(os.path.join(d, name), dpi=90)
            plt.close(fig)
            written.append(name)
    h = sc.get("h", {}).get("sizes", {})
    if h:
        xs = sorted(int(n) for n in h)
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for p, style in (("p50_ms", "o-"), ("p99_ms", "s--")):
            ax.plot(xs, [h[str(n)][p] for n in xs], style, color=COLORS["mdserver"],
                    label=p[:-3])
        ax.set_xscale("log")
        ax.set_xlabel("instances in the database")
        ax.set_ylabel("ms per registration")
        ax.set_ylim(bottom=0)
        ax.set_title("(h) registration latency (admin socket)", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(d, "registration.png"), dpi=90)
        plt.close(fig)
        written.append("registration.png")
    g = sc.get("g", {}).get("storms", {})
    if g:
        xs = sorted(int(n) for n in g)
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for server in SERVERS:
            ax.plot(xs, [g[str(n)][server]["all_done_s"] for n in xs], "o-",
                    color=COLORS[server], label=server)
        ax.set_xlabel("guests booting at once (N)")
        ax.set_ylabel("s until all are done")
        ax.set_ylim(bottom=0)
        ax.set_title("(g) boot storm completion", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(d, "storm.png"), dpi=90)
        plt.close(fig)
        written.append("storm.png")
    return f"plots in {d}: {', '.join(written) or 'none (no data)'}"
