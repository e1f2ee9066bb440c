"""What the scenario groups share: the plan, the lab, the servers under test, the recorded answers, and running guest clients in namespaces."""

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from bench.lab import BARE_ADDRESS, METADATA, NGINX_ADDRESS, Identity, Lab, exec_in

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT_DIR = os.path.dirname(HERE)
CLIENT = os.path.join(HERE, "crawl_client.py")
FACES = ("ec2", "openstack", "nocloud")
# Where each server answers guests (all in the lab's host namespace, port 80).
TARGETS = {"mdserver": METADATA, "nginx": NGINX_ADDRESS, "bare": BARE_ADDRESS}
SERVERS = ("mdserver", "nginx", "bare")

# Scenarios (a)-(e): one path each, from the load guest.
PATHS = {
    "a": ("EC2 meta-data leaf", "/latest/meta-data/instance-id"),
    "b": ("EC2 listing", "/latest/meta-data/"),
    "c": ("user-data from a template", "/latest/user-data"),
    "d": ("OpenStack meta_data.json", "/openstack/latest/meta_data.json"),
    "e": ("NoCloud meta-data", "/nocloud/meta-data"),
}


@dataclass
class Plan:
    """How much of everything: --quick's tiny set or the full run."""
    quick: bool
    only: Tuple[str, ...]
    sizes: Tuple[int, ...]            # database sizes for (h), (j), (k)
    serving_size: int                 # the database of the daemon under load
    connections: Tuple[int, ...]      # (a)-(e)
    seconds: float                    # one wrk run
    warmup: float
    scenarios_ae: Tuple[str, ...]     # which of (a)-(e) run
    crawl_rounds: int                 # (f)
    storms: Tuple[int, ...]           # (g)
    storm_rounds: int
    registrations: int                # (h), per size
    hook_runs: int                    # (i)
    starts: int                       # (k), with the files present
    # (a)-(e) at the targets' connection count: A B C this many times in
    # turn, each server's median run reported (one 5 s run of each moved
    # the ratios by up to 0.15 between runs on this 2-core machine).
    target_rounds: int = 1
    workers: int = 0                  # mdserver's [mdserver] workers (0: its default)

    @classmethod
    def make(cls, quick: bool, only: Sequence[str], workers: int = 0) -> "Plan":
        if quick:
            p = cls(quick=True, only=tuple(only), sizes=(100,), serving_size=100,
                    connections=(16,), seconds=2, warmup=0.5, scenarios_ae=("a",),
                    crawl_rounds=3, storms=(5,), storm_rounds=1, registrations=50,
                    hook_runs=3, starts=1)
        else:
            p = cls(quick=False, only=tuple(only), sizes=(100, 1000, 10000),
                    serving_size=10000, connections=(1, 16, 64, 256), seconds=5, warmup=1,
                    scenarios_ae=("a", "b", "c", "d", "e"), crawl_rounds=20,
                    storms=(100, 500), storm_rounds=3, registrations=200, hook_runs=10,
                    starts=3)
        p.workers = workers
        if only:
            p.scenarios_ae = tuple(s for s in p.scenarios_ae if s in only)
        return p

    def wants(self, scenario: str) -> bool:
        return not self.only or scenario in self.only

    @property
    def storm_guests(self) -> int:
        return max(self.storms) if self.wants("g") else 0


@dataclass
class Bench:
    plan: Plan
    workdir: str
    lab: Lab
    results: Dict[str, dict] = field(default_factory=dict)
    errors: List[str] = field(default_factory=list)
    # {guest address: {path: [status, body]}}: mdserver's answers, which the
    # references serve and every later answer is compared with.
    answers: Dict[str, Dict[str, list]] = field(default_factory=dict)
    settings: Dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def log(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {message}", file=sys.stderr, flush=True)

    def fail(self, scenario: str, message: str) -> None:
        """A failure: recorded, printed, and the run's status non-zero."""
        self.errors.append(f"({scenario}) {message}")
        self.log(f"FAILED ({scenario}): {message}")

    def path(self, *parts: str) -> str:
        return os.path.join(self.workdir, *parts)

    # -- guest clients --------------------------------------------------

    def clients(self, jobs: Sequence[Tuple[str, dict]], timeout: float = 600) -> List[dict]:
        """crawl_client.py once per (namespace, spec), all at once; their outputs."""
        procs = []
        for i, (ns, spec) in enumerate(jobs):
            stem = self.path("clients", f"{time.monotonic_ns()}-{i}")
            os.makedirs(os.path.dirname(stem), exist_ok=True)
            with open(stem + ".json", "w") as f:
                json.dump(spec, f)
            err = open(stem + ".err", "wb")
            procs.append((subprocess.Popen(exec_in(ns, [sys.executable, CLIENT, stem + ".json",
                                                        stem + ".out"]),
                                           stdout=err, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL), stem, err))
        out = []
        deadline = time.monotonic() + timeout
        try:
            for proc, _, _ in procs:
                try:
                    proc.wait(max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()  # our own child, by its PID
                    proc.wait()
        finally:  # interrupted: none of them outlives the run
            for proc, _, err in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                err.close()
        for proc, stem, _ in procs:
            try:
                with open(stem + ".out") as f:
                    out.append(json.load(f))
            except (OSError, ValueError):
                with open(stem + ".err", errors="replace") as f:
                    out.append({"errors": [f"client failed ({proc.returncode}): "
                                           f"{f.read()[-600:]}"], "guests": []})
        return out

    def spec(self, server: str, mode: str, guests: Sequence[dict], **more) -> dict:
        return {"host": TARGETS[server], "port": 80, "mode": mode, "guests": list(guests), **more}

    def probe(self, server: str, path: str, timeout: float = 30) -> Optional[str]:
        """None once `server` answers the load guest's `path` with 200, else why not."""
        spec = self.spec(server, "probe", [guest_spec(self.lab.load, "ec2", extra=[path])],
                         timeout=timeout)
        got = self.clients([(self.lab.load_ns, spec)], timeout=timeout + 30)[0]
        return "; ".join(got.get("errors", [])) or None


def guest_spec(g: Identity, face: str, extra: Sequence[str] = ()) -> dict:
    """One guest for crawl_client.py, bound to its own address."""
    return {"src": g.ip, "face": face, "id": g.instance_id, "uuid": g.uuid,
            "extra": list(extra)}


def face_of(g: Identity) -> str:
    """A storm guest's face: the three in turn (a host serves all of them)."""
    return FACES[g.index % len(FACES)]
