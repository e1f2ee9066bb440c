"""Guests' cloud-init crawls from inside a namespace, timed: one new connection per request, as cloud-init 22.4 makes them.

Standard library only (it runs under any python3, inside `ip netns exec`):
    python3 crawl_client.py SPEC.json OUT.json

SPEC: {"host", "port", "mode": "record"|"run"|"probe", "rounds", "start_at"
(wall clock, shared by every client of a storm), "guests": [{"src", "face",
"id", "uuid", "extra": [paths]}], "expected": {src: {path: [status, body]}}}.
Every guest of the file runs its crawls concurrently, each bound to its own
source address (`src`; "" = whatever the namespace's route gives).

- record: one crawl per guest; checks that the guest got its own identity
  (EC2 instance-id, OpenStack uuid, NoCloud instance-id) and returns every
  answer (latin-1 text) plus the `extra` paths', to serve the references.
- run: `rounds` crawls per guest, every answer compared with `expected`
  (status and exact body) when given; per guest: start/end of each round
  (wall clock) and each request's seconds.
- probe: one GET of guests[0]'s first `extra` path until it answers 200.

The sequences follow ../shared/DESIGN.md section 2: EC2 of a non-AWS guest
(instance-id probe, version probe, user-data, depth-first crawl of
meta-data/), OpenStack (the version list, the newest known version's files,
then the EC2 crawl of latest/meta-data/), NoCloud's four files (25.x order;
22.4 asks three of them). A crawl stops at its first failure.
"""

import asyncio
import json
import re
import sys
import time
from typing import Dict, List, Optional, Tuple

# cloud-init's known OpenStack versions, newest last (DESIGN.md section 2)
OPENSTACK_KNOWN = ("2012-08-10", "2013-04-04", "2013-10-17", "2015-10-15", "2016-06-30",
                   "2016-10-06", "2017-02-22", "2018-08-27")
EC2_PROBES = ("2021-03-23", "2018-09-24", "2016-09-02")
TIMEOUT = 30.0


# OpenStack's random_seed is fresh per instance view (and each granian
# worker has its own): compared without its value.
RANDOM_SEED = re.compile(rb'"random_seed":\s*"[^"]*"')


class Failed(Exception):
    pass


def same(body: bytes, recorded: str) -> bool:
    want = recorded.encode("latin-1")
    return body == want or RANDOM_SEED.sub(b"", body) == RANDOM_SEED.sub(b"", want)


def parse(data: bytes) -> Tuple[int, bytes]:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        raise Failed("incomplete answer")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers[k.strip().lower()] = v.strip()
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        out, rest = b"", body
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2:]
        body = out
    elif b"content-length" in headers and len(body) != int(headers[b"content-length"]):
        raise Failed("body shorter than its Content-Length")
    return status, body


class Guest:
    def __init__(self, spec: dict, host: str, port: int, expected: Optional[dict], record: bool):
        self.spec, self.host, self.port = spec, host, port
        self.src = spec.get("src") or None
        self.expected, self.record = expected, record
        self.answers: Dict[str, List] = {}
        self.latencies: List[float] = []
        self.request = ("GET {} HTTP/1.1\r\nHost: 169.254.169.254\r\nUser-Agent: Cloud-Init/22.4.2"
                        "\r\nAccept: */*\r\nConnection: close\r\n\r\n")

    async def get(self, path: str, optional: bool = False) -> bytes:
        t = time.perf_counter()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                self.host, self.port, local_addr=(self.src, 0) if self.src else None), TIMEOUT)
            try:
                writer.write(self.request.format(path).encode())
                data = await asyncio.wait_for(reader.read(), TIMEOUT)
            finally:
                writer.close()
        except (OSError, asyncio.TimeoutError) as e:
            raise Failed(f"{path}: {type(e).__name__} {e}") from None
        status, body = parse(data)
        self.latencies.append(time.perf_counter() - t)
        if self.record:
            self.answers[path] = [status, body.decode("latin-1")]
        if self.expected is not None:
            want = self.expected.get(path)
            if want is None:
                raise Failed(f"{path}: not in the recorded request list")
            # a 404's text is each server's own: only its status is compared
            if status != want[0] or (status == 200 and not same(body, want[1])):
                raise Failed(f"{path}: {status}, body {body[:80]!r} is not the recorded "
                             f"{want[0]}, {want[1][:80]!r}")
        if status == 404 and optional:
            return b""
        if status != 200:
            raise Failed(f"{path}: {status} {body[:120]!r}")
        return body

    async def ec2_tree(self, base: str) -> None:
        """cloud-init 22.4's MetadataMaterializer: a listing's children
        (lines ending in '/') first, depth first, then its leaves; an
        `N=name` line is the leaf N/openssh-key; never security-credentials."""
        leaves: Dict[str, str] = {}
        children: List[str] = []
        for field in (await self.get(base)).decode().splitlines():
            field = field.strip()
            name = field.rstrip("/") if field.endswith("/") else field
            if not field or not name or name == "security-credentials":
                continue
            if field.endswith("/"):
                if name not in children:
                    children.append(name)
                continue
            resource = name
            ident, eq, sub = field.partition("=")
            if eq and ident.strip().lstrip("-").isdigit():
                resource, name = f"{int(ident)}/openssh-key", sub
            leaves[name] = resource
        for child in children:
            await self.ec2_tree(base + child + "/")
        for resource in leaves.values():
            await self.get(base + resource)

    async def ec2(self) -> None:
        got = (await self.get("/2009-04-04/meta-data/instance-id")).decode()
        if self.record and got != self.spec["id"]:
            raise Failed(f"instance-id {got!r}, not this guest's {self.spec['id']!r}")
        version = None
        for v in EC2_PROBES:
            if await self.get(f"/{v}/meta-data/instance-id", optional=True):
                version = v
                break
        if version is None:
            raise Failed("no known EC2 version answered")
        await self.get(f"/{version}/user-data", optional=True)
        await self.ec2_tree(f"/{version}/meta-data/")

    async def openstack(self) -> None:
        listed = (await self.get("/openstack")).decode().split()
        version = next((v for v in reversed(OPENSTACK_KNOWN) if v in listed), "latest")
        base = f"/openstack/{version}/"
        meta = json.loads(await self.get(base + "meta_data.json"))
        if self.record and meta.get("uuid") != self.spec["uuid"]:
            raise Failed(f"meta_data.json uuid {meta.get('uuid')!r}, not {self.spec['uuid']!r}")
        for name in ("user_data", "vendor_data.json", "vendor_data2.json", "network_data.json"):
            await self.get(base + name, optional=True)
        await self.ec2_tree("/latest/meta-data/")

    async def nocloud(self) -> None:
        for name in ("network-config", "meta-data", "user-data", "vendor-data"):
            body = await self.get("/nocloud/" + name)
            if self.record and name == "meta-data" and self.spec["uuid"] not in body.decode():
                raise Failed(f"nocloud meta-data names another instance: {body[:120]!r}")

    async def crawl(self) -> None:
        await getattr(self, self.spec["face"])()


async def run_guest(spec: dict, cfg: dict, start_at: float) -> dict:
    mode = cfg["mode"]
    expected = (cfg.get("expected") or {}).get(spec.get("src") or "") if mode == "run" else None
    if mode == "run" and cfg.get("expected") is not None and expected is None:
        return {"src": spec.get("src"), "errors": ["no recorded answers for this guest"],
                "rounds": [], "latencies": []}
    g = Guest(spec, cfg["host"], cfg["port"], expected, mode == "record")
    out: dict = {"src": spec.get("src"), "face": spec["face"], "errors": [], "rounds": []}
    await asyncio.sleep(max(0.0, start_at - time.time()))
    for _ in range(cfg.get("rounds", 1) if mode == "run" else 1):
        start = time.time()
        n = len(g.latencies)
        try:
            await g.crawl()
            if mode == "record":
                for path in spec.get("extra", []):
                    await g.get(path)
        except Failed as e:
            out["errors"].append(str(e))
            break
        out["rounds"].append({"start": start, "end": time.time(), "requests": len(g.latencies) - n})
    out["latencies"] = g.latencies
    if mode == "record":
        out["answers"] = g.answers
    return out


async def probe(cfg: dict) -> dict:
    spec = cfg["guests"][0]
    g = Guest(spec, cfg["host"], cfg["port"], None, False)
    deadline = time.monotonic() + cfg.get("timeout", 30)
    last = ""
    while time.monotonic() < deadline:
        try:
            await g.get(spec["extra"][0])
            return {"errors": []}
        except Failed as e:
            last = str(e)
            await asyncio.sleep(0.05)
    return {"errors": [f"not answering: {last}"]}


async def main_async(cfg: dict) -> dict:
    if cfg["mode"] == "probe":
        return await probe(cfg)
    start_at = cfg.get("start_at") or time.time()
    results = await asyncio.gather(*(run_guest(s, cfg, start_at) for s in cfg["guests"]))
    return {"guests": list(results)}


def main(argv: List[str]) -> int:
    with open(argv[1]) as f:
        cfg = json.load(f)
    out = asyncio.run(main_async(cfg))
    with open(argv[2], "w") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
