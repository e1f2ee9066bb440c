"""Scenarios (h)-(k) at each database size: registration latency, the hook's wall time, memory of the process tree, start-up to ready."""

import os
import statistics
import subprocess
import time
from typing import Optional

from bench import mdserverd
from bench.context import FACES, ROOT_DIR, Bench, guest_spec
from bench.stats import ratio, summary_ms

HOOK = os.path.join(ROOT_DIR, "hooks", "qemu")
SYSTEM_PYTHON = "/usr/bin/python3"  # the hook's interpreter (its #! line)
# Domain numbers of the new domains (registration_xml), apart from the
# database's slots and from each other.
REGISTERED_FROM, HOOKED_FROM = 100_000, 200_000


def touch(b: Bench, label: str) -> None:
    """One crawl of each face from the load guest: what a guest's first
    boot makes the daemon load and cache (answers must be 200)."""
    jobs = [(b.lab.load_ns, b.spec("mdserver", "run", [guest_spec(b.lab.load, face)], rounds=1))
            for face in FACES]
    for out in b.clients(jobs):
        for err in out.get("errors", []) + [e for g in out.get("guests", []) for e in g["errors"]]:
            b.fail(label, f"crawl before measuring memory: {err}")


def start(b: Bench, size: int) -> mdserverd.Daemon:
    """A database of `size` instances, its daemon's first start (it writes
    the dnsmasq files), memory; the daemon is left running."""
    d = b.path(f"db-{size}")
    os.makedirs(d)
    conf = mdserverd.write_config(d, workers=str(b.plan.workers))
    b.settings = mdserverd.settings(conf)
    built = mdserverd.build_database(d, size)
    daemon = mdserverd.Daemon(conf, b.lab.host, os.path.join(d, "mdserver.log"))
    try:
        first = daemon.wait_ready()
    except BaseException:
        daemon.stop()
        raise
    seen = daemon.workers()
    if seen != b.settings["workers"]:  # the references copy what really runs
        b.log(f"configured workers {b.settings['workers']}, running {seen}: using {seen}")
        b.settings["workers"] = seen
    files, size_bytes = mdserverd.dnsmasq_files(d)
    b.results.setdefault("k", {"title": "start-up to ready", "sizes": {}})["sizes"][str(size)] = {
        "database_build_s": round(built, 3), "first_start_s": round(first, 3),
        "dnsmasq_files": files, "dnsmasq_bytes": size_bytes}
    b.log(f"(k) {size} instances: first start (writes {files} dnsmasq files) ready in "
          f"{first:.2f} s")
    return daemon


def restarts(b: Bench, size: int, daemon: mdserverd.Daemon) -> mdserverd.Daemon:
    """Stop and start again `plan.starts` times, the dnsmasq files present:
    the daemon of the last start is returned, running."""
    times = []
    for _ in range(b.plan.starts):
        daemon.stop()
        daemon = mdserverd.Daemon(daemon.conf, b.lab.host, daemon.log_path)
        times.append(daemon.wait_ready())
    row = b.results["k"]["sizes"][str(size)]
    row["starts_s"] = [round(t, 3) for t in times]
    row["ready_s"] = round(statistics.median(times), 3)
    b.log(f"(k) {size} instances, files present: ready in {row['ready_s']} s (median of "
          f"{len(times)})")
    return daemon


def memory(b: Bench, size: int, daemon: mdserverd.Daemon, when: str) -> None:
    m = mdserverd.memory(daemon.pid)
    m["workers"] = b.settings["workers"]
    b.results.setdefault("j", {"title": "memory of the process tree", "sizes": {}})["sizes"] \
        .setdefault(str(size), {})[when] = m
    b.log(f"(j) {size} instances, {when}: RSS {m['rss_kb'] / 1024:.1f} MB, PSS "
          f"{m['pss_kb'] / 1024:.1f} MB in {len(m['processes'])} processes")


def registrations(b: Bench, size: int, daemon: mdserverd.Daemon) -> None:
    """`plan.registrations` new domains through the admin socket, one after
    the other (what the hook asks of the daemon)."""
    admin = os.path.join(os.path.dirname(daemon.conf), "admin.sock")
    first = REGISTERED_FROM + size  # new domains at every size
    xmls = [mdserverd.registration_xml(first + i) for i in range(b.plan.registrations)]
    try:
        seconds = mdserverd.register_all(admin, xmls)
    except Exception as e:  # the daemon refused: a failure of (h), not of the run
        b.fail("h", f"registration at {size} instances: {type(e).__name__}: {e}")
        return
    row = summary_ms(seconds)
    row["mean_ms"] = round(sum(seconds) / len(seconds) * 1000, 3)
    b.results.setdefault("h", {"title": "registration latency (admin socket, local store)",
                               "sizes": {}})["sizes"][str(size)] = row
    b.log(f"(h) {size} instances: registration p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms")


def hooks(b: Bench, size: int, daemon: mdserverd.Daemon) -> None:
    """hooks/qemu `prepare begin` as libvirtd runs it (system python3, XML on
    stdin), for a route without a seed image and the two seed routes, each
    run a new domain, in turn with `python3 -c pass`."""
    d = os.path.dirname(daemon.conf)
    env = {**os.environ, "MDSERVER_CONFIG": daemon.conf,
           # never the host's syslog or /run/mdserver (they do not exist here)
           "MDSERVER_HOOK_SYSLOG": os.path.join(d, "no-syslog"),
           "MDSERVER_HOOK_DEFAULT_SOCKET": os.path.join(d, "no-admin.sock")}
    # the default route (openstack: no seed image) and the two seed routes
    kinds = {"openstack": None, "configdrive": "configdrive", "nocloud": "nocloud"}
    times = {k: [] for k in ["python3 -c pass"] + list(kinds)}
    names = []
    n = HOOKED_FROM
    for _ in range(b.plan.hook_runs):
        t = time.perf_counter()
        subprocess.run([SYSTEM_PYTHON, "-c", "pass"], env=env, check=True)
        times["python3 -c pass"].append(time.perf_counter() - t)
        for kind, route in kinds.items():
            n += 1
            xml = mdserverd.registration_xml(n, route)
            t = time.perf_counter()
            r = subprocess.run([SYSTEM_PYTHON, HOOK, f"new{n}", "prepare", "begin", "-"],
                               input=xml, env=env, capture_output=True)
            times[kind].append(time.perf_counter() - t)
            names.append(f"new{n}")
            if r.returncode or r.stdout:
                b.fail("i", f"hook for {kind}: status {r.returncode}, stdout {r.stdout[:200]!r}")
    # every hooked domain registered, seed images written for the seed routes
    from mdserver import adminclient
    listed = {i.get("name") for i in adminclient.call(
        os.path.join(d, "admin.sock"), "GET", "/instances") or []}
    missing = [x for x in names if x not in listed]
    if missing:
        b.fail("i", f"{len(missing)} hooked domains not registered, e.g. {missing[:3]} "
                    f"(stderr of the last hook: {r.stderr[-300:]!r})")
    seeds = len(os.listdir(os.path.join(d, "seeds"))) if os.path.isdir(os.path.join(d, "seeds")) \
        else 0
    base = statistics.median(times["python3 -c pass"])
    row = {"instances": size, "runs": b.plan.hook_runs, "seed_images": seeds,
           "python_start_ms": round(base * 1000, 2), "routes": {}}
    for kind, route in kinds.items():
        med = statistics.median(times[kind])
        row["routes"][kind] = {"p50_ms": round(med * 1000, 2),
                               "max_ms": round(max(times[kind]) * 1000, 2),
                               "vs_python": ratio(med, base, 2),
                               "seed_image": route is not None}
    b.results["i"] = {"title": "libvirt hook wall time vs python3 -c pass", **row}
    b.log(f"(i) hook {row['routes']['openstack']['p50_ms']} ms "
          f"({row['routes']['openstack']['vs_python']}x "
          f"python3 -c pass, {row['python_start_ms']} ms); seed routes "
          f"{row['routes']['configdrive']['p50_ms']} / {row['routes']['nocloud']['p50_ms']} ms")


def measure(b: Bench, size: int, serving: bool) -> Optional[mdserverd.Daemon]:
    """Everything at one size; the serving size's daemon stays up (returned)."""
    daemon = start(b, size)
    try:
        if serving:
            daemon = restarts(b, size, daemon)
        if b.plan.wants("j"):
            memory(b, size, daemon, "idle")
            touch(b, "j")
            memory(b, size, daemon, "after_crawl")
        if not serving and b.plan.wants("h"):
            registrations(b, size, daemon)
    except BaseException:
        daemon.stop()
        raise
    if serving:
        return daemon
    daemon.stop()
    return None


def after_load(b: Bench, daemon: mdserverd.Daemon) -> None:
    size = b.plan.serving_size
    if b.plan.wants("j"):
        memory(b, size, daemon, "after_load")
    if b.plan.wants("h"):
        registrations(b, size, daemon)
    if b.plan.wants("i"):
        hooks(b, size, daemon)
