"""python -m bench: the benchmark suite of issue 11 (docs/BENCHMARKS.md).

    python -m bench [--quick] [--workers N] [--json PATH] [--only a,b,...] [--plots DIR]
                    [--markdown FILE]

Needs root (network namespaces), nginx, wrk, iproute2 and /usr/bin/python3;
installs nothing: it says what is missing and exits with status 2. Exit
status 1 when any answer was wrong (not 200, another body) or a step failed,
0 otherwise; PASS/MISS of the targets does not change it.
"""

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time

from bench import crawl, lab as lablib, references, report, serve, sizes, storm
from bench.context import Bench, Plan

SCENARIOS = "abcdefghijk"
NEEDS = {
    "nginx": "apt-get install nginx-light, or nginx",
    "wrk": "apt-get install wrk",
    "ip": "apt-get install iproute2",
    "sysctl": "apt-get install procps",
}


def missing() -> list:
    out = [f"{tool} ({how})" for tool, how in NEEDS.items() if shutil.which(tool) is None]
    if not os.access(sizes.SYSTEM_PYTHON, os.X_OK):
        out.append(f"{sizes.SYSTEM_PYTHON} (the hook's interpreter: apt-get install python3)")
    if os.geteuid() != 0:
        out.append("root (network namespaces for the guests)")
    return out


def parse(argv):
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="a tiny set (100 instances, (a) at 16 connections, (f) 3 crawls, "
                         "a storm of 5 guests, (h)-(k) at 100): under a minute")
    ap.add_argument("--json", metavar="PATH", help="write every figure here")
    ap.add_argument("--only", metavar="a,b,...", default="",
                    help=f"only these scenarios (of {','.join(SCENARIOS)})")
    ap.add_argument("--plots", metavar="DIR", help="PNG plots here (needs matplotlib: the "
                                                   "`bench` extra); default beside --markdown")
    ap.add_argument("--markdown", metavar="FILE",
                    help="write the results section of this file (docs/BENCHMARKS.md)")
    ap.add_argument("--workers", type=int, default=0, metavar="N",
                    help="mdserver's [mdserver] workers (default 0: the daemon's own default, "
                         "half the CPUs); the bare callable runs as many")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, raw "
                                                          "outputs) and print its path")
    args = ap.parse_args(argv)
    args.only = tuple(s.strip() for s in args.only.split(",") if s.strip())
    bad = [s for s in args.only if s not in SCENARIOS]
    if bad:
        ap.error(f"unknown scenario {', '.join(bad)} (one of {','.join(SCENARIOS)})")
    if args.markdown and not args.plots:
        args.plots = os.path.join(os.path.dirname(os.path.abspath(args.markdown)), "bench")
    return args


def _terminate(signum, frame):
    # SIGTERM like Ctrl-C: unwind, so every `finally` below cleans up
    raise KeyboardInterrupt(f"signal {signum}")


def run(b: Bench, stack: contextlib.ExitStack) -> None:
    plan = b.plan
    serving = None
    for size in plan.sizes:
        if size == plan.serving_size:
            break
        if plan.wants("h") or plan.wants("j") or plan.wants("k"):
            sizes.measure(b, size, serving=False)
    serving = sizes.measure(b, plan.serving_size, serving=True)
    stack.callback(serving.stop)
    if any(plan.wants(s) for s in "abcdefg"):
        references.record(b)
        if b.errors:
            return  # mdserver's own answers are wrong: nothing to compare
        problems = references.start(b, stack)
        for p in problems:
            b.fail("references", p)
        if problems:
            return
        if plan.scenarios_ae:
            serve.run(b)
        if plan.wants("f"):
            crawl.run(b)
        if plan.wants("g"):
            storm.run(b)
    sizes.after_load(b, serving)
    # what the daemon said beyond routine lines (a 429, a refusal, an error)
    noted = [line for line in serving.tail(100000).splitlines()
             if line.split(" ", 1)[0] in ("WARNING", "ERROR", "CRITICAL")]
    b.results.setdefault("meta", {})["daemon_warnings"] = noted[:30]


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    lacking = missing()
    if lacking:
        print("python -m bench: missing, install first (the suite installs nothing):\n  "
              + "\n  ".join(lacking), file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    plan = Plan.make(args.quick, args.only, args.workers)
    started, wall = time.monotonic(), time.time()
    workdir = tempfile.mkdtemp(prefix="mdserver-bench-")
    os.chmod(workdir, 0o755)  # nginx's worker (nobody) reads its files under it
    b = None
    try:
        stale = lablib.remove_stale()
        if stale:
            print(f"removed namespaces of a run that died: {', '.join(stale)}", file=sys.stderr)
        with contextlib.ExitStack() as stack:
            lab = lablib.Lab(storm=plan.storm_guests)
            stack.callback(lab.close)
            b = Bench(plan=plan, workdir=workdir, lab=lab, started=started)
            b.log(f"lab up: {len(lab.namespaces)} namespaces, {1 + len(lab.storm)} guests; "
                  f"work directory {workdir}")
            try:
                run(b, stack)
            except KeyboardInterrupt:
                b.fail("run", "interrupted")
                raise
            except Exception as e:  # a step that broke: reported like a wrong answer
                import traceback
                b.fail("run", f"{type(e).__name__}: {e}")
                traceback.print_exc()
        doc = report.document(b, wall, time.monotonic() - started)
        print(report.table(doc))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(doc, f, indent=1)
            if os.path.exists(b.path("wrk.txt")):  # wrk's own output, beside it
                shutil.copy(b.path("wrk.txt"), os.path.splitext(args.json)[0] + "-wrk.txt")
        if args.plots:
            print(report.plots(doc, args.plots), file=sys.stderr)
        if args.markdown:
            report.markdown(doc, args.markdown, args.plots, args.json)
        return 1 if doc["errors"] else 0
    except KeyboardInterrupt:
        print("interrupted: namespaces and processes cleaned up", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
