"""wrk from the load guest's namespace: throughput and p50/p99/p99.9, every answer checked (status 200 and the exact body)."""

import os
import re
import subprocess
from typing import Dict, Optional

from bench.lab import exec_in

# Checks each answer in wrk's own Lua (the same script against every server:
# its cost is part of the load generator's ceiling, which the nginx column
# shows) and prints one machine-readable line; wrk's threads each have their
# own Lua state, so done() adds their counters up.
SCRIPT = r"""
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args)
  bad_status = 0; bad_body = 0; first = ""
  local f = assert(io.open(args[1], "rb")); expected = f:read("*a"); f:close()
  -- OpenStack's random_seed is fresh per instance view (and per granian
  -- worker): such bodies are compared without its value
  bare_expected = string.gsub(expected, '"random_seed":%s*"[^"]*"', "")
  seeded = bare_expected ~= expected
end
function response(status, headers, body)
  if status ~= 200 then
    bad_status = bad_status + 1
    if first == "" then first = tostring(status) .. " " .. string.sub(body or "", 1, 120) end
  elseif body ~= expected and (not seeded or
      string.gsub(body, '"random_seed":%s*"[^"]*"', "") ~= bare_expected) then
    bad_body = bad_body + 1
    if first == "" then first = "200 with another body: " .. string.sub(body or "", 1, 120) end
  end
end
function done(summary, latency, requests)
  local bs, bb, seen = 0, 0, ""
  for _, t in ipairs(threads) do
    bs = bs + t:get("bad_status"); bb = bb + t:get("bad_body")
    local f = t:get("first")
    if seen == "" and f and f ~= "" then seen = f end
  end
  local e = summary.errors
  io.write(string.format("BENCH %d %d %d %d %d %d %d %d %d %d %.0f %.0f %.0f %.0f %.0f %.1f\n",
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, bs, bb, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), latency.max, latency.mean))
  local line = string.gsub(seen, "[\r\n]", " ")
  io.write("BENCHFIRST " .. line .. "\n")
end
"""
FIELDS = ("requests", "duration_us", "bytes", "connect_errors", "read_errors", "write_errors",
          "status_errors", "timeouts", "bad_status", "bad_body", "p50_us", "p90_us", "p99_us",
          "p999_us", "max_us", "mean_us")


def write_script(d: str) -> str:
    path = os.path.join(d, "check.lua")
    with open(path, "w") as f:
        f.write(SCRIPT)
    return path


def threads_for(connections: int) -> int:
    # Two threads: the server under test has the other core's share; one
    # connection cannot be split.
    return 1 if connections < 2 else 2


def run(netns: str, url: str, body_file: str, script: str, connections: int,
        seconds: float, out_file: Optional[str] = None) -> Dict:
    """One wrk run; the parsed figures plus `errors` (a list of reasons:
    socket errors, any answer that is not 200 with the expected body)."""
    cmd = exec_in(netns, ["wrk", f"-t{threads_for(connections)}", f"-c{connections}",
                          f"-d{max(1, round(seconds))}s", "--timeout", "10s", "-s", script, url,
                          "--", body_file])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    if out_file:
        with open(out_file, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n{r.stdout}{r.stderr}\n")
    m = re.search(r"^BENCH ((?:[\d.]+ ?){16})$", r.stdout, re.M)
    if r.returncode or not m:
        return {"errors": [f"wrk failed ({r.returncode}): {(r.stderr or r.stdout)[-400:]}"]}
    res = {k: float(v) for k, v in zip(FIELDS, m.group(1).split())}
    first = re.search(r"^BENCHFIRST (.*)$", r.stdout, re.M)
    res["rps"] = res["requests"] / (res["duration_us"] / 1e6) if res["duration_us"] else 0.0
    for k in ("p50", "p90", "p99", "p999"):
        res[f"{k}_ms"] = res.pop(f"{k}_us") / 1000.0
    res["max_ms"], res["mean_ms"] = res.pop("max_us") / 1000.0, res.pop("mean_us") / 1000.0
    errors = []
    sock = {k: int(res[k]) for k in ("connect_errors", "read_errors", "write_errors", "timeouts")
            if res[k]}
    if sock:
        errors.append(f"socket errors {sock}")
    if res["bad_status"] or res["bad_body"]:
        errors.append(f"{int(res['bad_status'])} answers not 200, {int(res['bad_body'])} with "
                      f"another body (first: {first.group(1).strip() if first else '?'})")
    if not res["requests"]:
        errors.append("no request answered")
    res["errors"] = errors
    return res
