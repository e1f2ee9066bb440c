"""mdserver's answers recorded from the guests, and the two references that serve them: nginx and the bare RSGI callable."""

import json
import os
import signal
import subprocess
import sys
from typing import List

from bench.context import FACES, PATHS, ROOT_DIR, Bench, face_of, guest_spec
from bench.lab import BARE_ADDRESS, exec_in
from bench.nginx import Nginx


def record(b: Bench) -> None:
    """Every crawl the scenarios make, once, from mdserver (also its warm-up):
    the load guest's three faces and (a)-(e)'s paths, each storm guest's
    crawl. Each guest must get its own identity (crawl_client.py checks)."""
    lab = b.lab
    extra = [path for _, path in PATHS.values()]
    jobs = [(lab.load_ns, b.spec("mdserver", "record", [guest_spec(lab.load, face, extra)]))
            for face in FACES]
    for ns, guests in lab.groups(lab.storm).items():
        jobs.append((ns, b.spec("mdserver", "record", [guest_spec(g, face_of(g)) for g in guests])))
    for out in b.clients(jobs):
        for err in out.get("errors", []):
            b.fail("record", err)
        for g in out.get("guests", []):
            for err in g["errors"]:
                b.fail("record", f"guest {g['src']} ({g['face']}): {err}")
            b.answers.setdefault(g["src"], {}).update(g.get("answers", {}))
    # which optional files mdserver does not have (cloud-init's crawl asks them)
    missing = sorted({p for per in b.answers.values() for p, (s, _) in per.items() if s != 200})
    b.results.setdefault("meta", {})["optional_404"] = missing
    with open(b.path("answers.json"), "w") as f:
        json.dump(b.answers, f)


class Bare:
    """bench/bare.py in the host namespace on BARE_ADDRESS:80."""

    def __init__(self, b: Bench):
        s = b.settings
        self.log = open(b.path("bare.log"), "wb")
        self.proc = subprocess.Popen(
            exec_in(b.lab.host, [sys.executable, "-m", "bench.bare", b.path("answers.json"),
                                 BARE_ADDRESS, "80", str(s["workers"]), str(s["max_connections"]),
                                 str(s["backlog"]), str(s["header_timeout"])]),
            cwd=ROOT_DIR, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # our own child's session
                self.proc.wait()
        self.log.close()


def start(b: Bench, stack) -> List[str]:
    """nginx and the bare callable, both answering: stopped by `stack`'s
    exit. The reasons either did not come up, if any."""
    ngx = Nginx(b.path("nginx"), b.lab.host, b.answers, b.settings["backlog"])
    stack.callback(ngx.stop)
    bare = Bare(b)
    stack.callback(bare.stop)
    problems = []
    probe_path = PATHS["a"][1]
    for name in ("nginx", "bare"):
        why = b.probe(name, probe_path)
        if why:
            detail = ngx.errors() if name == "nginx" else ""
            problems.append(f"{name} does not answer: {why} {detail}")
    return problems
