"""Durable Streams: tether (SQLite, Redis) against the reference server, in the same run.

Systems, each a fresh server per run, pinned to the server core:

- ``tether-sqlite``: ``tether serve`` on SQLite (WAL) in a temp dir, requests with a bearer token;
- ``tether-sqlite-fsync``: the same with SQLite ``synchronous=FULL`` (an fsync per group
  commit: ``bench/ds_reference/tether_fsync.py``), the durability of ``ref-file``;
- ``tether-redis``: ``tether serve --store redis://…`` and a redis-server (no persistence) on
  the same core;
- ``ref-memory`` / ``ref-file``: ``@durable-streams/server`` 0.3.7 (``DurableStreamTestServer``,
  the protocol's Node reference server) in memory, and file-backed (LMDB metadata +
  append-only log files), compression off, from ``bench/ds_reference`` (``npm ci`` there).

Workloads, every request over HTTP/1.1 keep-alive from aiohttp in this process (client core):

- **appends/s**: ``WRITERS`` concurrent writers, each on its own ``application/json`` stream,
  POST one ~100-byte message and wait for the answer, for ``--duration`` seconds;
- **appends/s, idempotent producer**: the same with ``Producer-Id`` / ``-Epoch`` / ``-Seq``;
- **catch-up MB/s**: one JSON stream of ``CATCHUP_MESSAGES`` ~500-byte messages (written in
  batches of 200) read from ``offset=-1`` to the tail, following ``Stream-Next-Offset``,
  ``CATCHUP_READS`` times; body bytes over wall time;
- **live-tail latency**: a reader on an SSE connection at the tail, a writer POSTs a message
  and waits for the reader to see it before the next; ``LATENCY_SAMPLES`` of them, p50/p99
  from just before the POST to the ``data`` event.

Run: ``python -m bench.durable_streams`` (3 runs each, ~5 min) or ``--quick``; results in
``bench/results/durable_streams.json`` and ``docs/benchmarks.md`` ("Durable Streams").
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common as c
from bench.redis_store import RedisServer

REFERENCE = Path(__file__).resolve().parent / "ds_reference"
SYSTEMS = ("tether-sqlite", "tether-sqlite-fsync", "tether-redis", "ref-memory", "ref-file")
FSYNC = str(REFERENCE / "tether_fsync.py")  # tether serve with synchronous=FULL
WRITERS = 32
CATCHUP_MESSAGES = 20_000
CATCHUP_BATCH = 200
CATCHUP_READS = 3
LATENCY_SAMPLES = 300
MESSAGE = {"type": "delta", "text": c.DELTA_TEXT, "n": 0}
BIG = {"type": "message", "text": "x" * 460}


class System:
    """A server under test: its processes, base URL and the headers requests carry."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.procs: list[c.Proc] = []
        self.redis: RedisServer | None = None
        self.headers: dict[str, str] = {}
        self.base = ""

    def start(self) -> System:
        if self.name.startswith("tether"):
            store = None
            if self.name == "tether-redis":
                self.redis = RedisServer()
                store = self.redis.url
            # One process on the server core, as the reference server is (--workers would
            # only share that core); the writers share one token subject: no subject limits.
            proc = c.tether_server(store, {"TETHER_WORKERS": "1"})
            if self.name == "tether-sqlite-fsync":
                at = proc.cmd.index("-m")
                proc.cmd[at:at + 2] = [FSYNC]  # python FSYNC serve …
            self.headers = {"Authorization": f"Bearer {c.token()}"}
        else:
            port = c.free_port()
            proc = c.Proc(self.name, [], port)
            data = [str(proc.dir / "data")] if self.name == "ref-file" else []
            # node resolves the package from the script's folder, whatever the working dir.
            proc.cmd = c.pinned(["node", str(REFERENCE / "server.mjs"), str(port), *data])
        self.procs.append(proc.start())
        self.base = f"http://127.0.0.1:{proc.port}/v1/stream"
        return self

    @property
    def server_pids(self) -> list[int]:
        pids = [p.pid for p in self.procs]
        if self.redis is not None:
            pids.append(self.redis.proc.pid)
        return pids

    def cpu(self) -> float:
        return sum(c.cpu_seconds(pid) for pid in self.server_pids)

    def stop(self) -> None:
        for proc in self.procs:
            proc.cleanup()
        if self.redis is not None:
            self.redis.close()


def ensure_reference() -> None:
    if not (REFERENCE / "node_modules" / ".package-lock.json").exists():
        npm = shutil.which("npm")
        if npm is None:
            sys.exit("npm is needed for the reference server (Node 20 + npm)")
        subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                       cwd=REFERENCE, check=True)


# --- workloads --------------------------------------------------------------------------------


async def create(http: aiohttp.ClientSession, system: System, name: str) -> str:
    url = f"{system.base}/{name}"
    async with http.put(url, headers={**system.headers,
                                      "Content-Type": "application/json"}) as resp:
        assert resp.status in (200, 201), (resp.status, await resp.text())
    return url


async def appends(http: aiohttp.ClientSession, system: System, duration: float,
                  producer: bool) -> dict[str, float]:
    urls = [await create(http, system, f"w{i}-{time.monotonic_ns()}") for i in range(WRITERS)]
    done = [0] * WRITERS
    stop = time.perf_counter() + duration
    cpu0 = system.cpu()

    async def writer(i: int) -> None:
        headers = {**system.headers, "Content-Type": "application/json"}
        seq = 0
        while time.perf_counter() < stop:
            if producer:
                headers.update({"Producer-Id": f"bench-{i}", "Producer-Epoch": "0",
                                "Producer-Seq": str(seq)})
            body = orjson.dumps({**MESSAGE, "n": seq})
            async with http.post(urls[i], data=body, headers=headers) as resp:
                await resp.read()
                assert resp.status in (200, 204), (resp.status, await resp.text())
            seq += 1
            done[i] += 1

    start = time.perf_counter()
    await asyncio.gather(*(writer(i) for i in range(WRITERS)))
    elapsed = time.perf_counter() - start
    cpu = system.cpu() - cpu0
    total = sum(done)
    return {"per_s": total / elapsed, "per_cpu_s": total / cpu if cpu else float("nan"),
            "appends": total}


async def catchup(http: aiohttp.ClientSession, system: System) -> dict[str, float]:
    url = await create(http, system, f"catchup-{time.monotonic_ns()}")
    batch = orjson.dumps([BIG] * CATCHUP_BATCH)
    headers = {**system.headers, "Content-Type": "application/json"}
    for _ in range(CATCHUP_MESSAGES // CATCHUP_BATCH):
        async with http.post(url, data=batch, headers=headers) as resp:
            assert resp.status in (200, 204), resp.status
    total = 0
    items = 0
    cpu0 = system.cpu()
    start = time.perf_counter()
    for _ in range(CATCHUP_READS):
        offset = "-1"
        while True:
            async with http.get(url, params={"offset": offset},
                                headers=system.headers) as resp:
                body = await resp.read()
                assert resp.status == 200, resp.status
                offset = resp.headers["Stream-Next-Offset"]
                total += len(body)
                items += len(orjson.loads(body))
                if resp.headers.get("Stream-Up-To-Date") == "true":
                    break
    elapsed = time.perf_counter() - start
    cpu = system.cpu() - cpu0
    assert items == CATCHUP_MESSAGES * CATCHUP_READS, items
    return {"mb_per_s": total / elapsed / 1e6, "bytes": total,
            "mb_per_cpu_s": total / cpu / 1e6 if cpu else float("nan")}


async def live_tail(http: aiohttp.ClientSession, system: System, samples: int
                    ) -> dict[str, float]:
    url = await create(http, system, f"tail-{time.monotonic_ns()}")
    seen: asyncio.Queue[tuple[int, float]] = asyncio.Queue()
    ready = asyncio.Event()

    async def reader() -> None:
        async with http.get(url, params={"offset": "now", "live": "sse"},
                            headers=system.headers,
                            timeout=aiohttp.ClientTimeout(total=None)) as resp:
            assert resp.status == 200, resp.status
            event = ""
            async for raw in resp.content:
                line = raw.decode().rstrip("\r\n")
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:") and event == "control":
                    ready.set()
                elif line.startswith("data:") and event == "data":
                    now = time.perf_counter()
                    for item in orjson.loads(line[5:]):
                        seen.put_nowait((item["n"], now))

    task = asyncio.create_task(reader())
    await asyncio.wait_for(ready.wait(), 10)  # the first control event: the reader is live
    headers = {**system.headers, "Content-Type": "application/json"}
    latencies = []
    for n in range(samples):
        sent = time.perf_counter()
        async with http.post(url, data=orjson.dumps({**MESSAGE, "n": n}),
                             headers=headers) as resp:
            assert resp.status in (200, 204), resp.status
        got, at = await asyncio.wait_for(seen.get(), 10)
        assert got == n, (got, n)
        latencies.append((at - sent) * 1000)
    task.cancel()
    return {"p50_ms": c.percentile(latencies, 50), "p99_ms": c.percentile(latencies, 99)}


async def run_one(system: System, quick: bool, duration: float) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=WRITERS + 4)
    async with aiohttp.ClientSession(connector=connector) as http:
        plain = await appends(http, system, duration, producer=False)
        producer = await appends(http, system, duration, producer=True)
        read = await catchup(http, system)
        tail = await live_tail(http, system, 60 if quick else LATENCY_SAMPLES)
    return {"appends": plain, "producer_appends": producer, "catchup": read, "tail": tail}


ROWS: list[tuple[str, Callable[[dict[str, Any]], float]]] = [
    ("appends/s", lambda r: r["appends"]["per_s"]),
    ("appends/s, idempotent producer", lambda r: r["producer_appends"]["per_s"]),
    ("appends per server CPU-second", lambda r: r["appends"]["per_cpu_s"]),
    ("producer appends per server CPU-second", lambda r: r["producer_appends"]["per_cpu_s"]),
    ("catch-up read MB/s", lambda r: r["catchup"]["mb_per_s"]),
    ("catch-up MB per server CPU-second", lambda r: r["catchup"]["mb_per_cpu_s"]),
    ("live-tail latency p50 ms", lambda r: r["tail"]["p50_ms"]),
    ("live-tail latency p99 ms", lambda r: r["tail"]["p99_ms"]),
]


def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=None, help="seconds per append test")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    args = p.parse_args()
    c.setup()
    ensure_reference()
    systems = args.systems.split(",")
    duration = args.duration or (2.0 if args.quick else 5.0)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in systems}
    background: list[list[float]] = []
    for run in range(c.runs(args)):
        for name in systems:  # interleaved: drift hits every system alike
            background.append(c.settle())
            system = System(name)
            try:
                system.start()
                result = asyncio.run(run_one(system, args.quick, duration))
            finally:
                system.stop()
            results[name].append(result)
            print(f"run {run + 1} {name}: " + ", ".join(
                f"{label} {c.fmt(get(result))}" for label, get in ROWS), flush=True)
    medians = {name: {label: c.median([get(r) for r in results[name]]) for label, get in ROWS}
               for name in systems}
    print()
    print(c.table(["", *systems], [[label, *(medians[n][label] for n in systems)]
                                   for label, _ in ROWS]))
    path = c.write_results("durable_streams", {
        "runs": results, "medians": medians, "background_busy": background,
        "writers": WRITERS, "duration": duration, "catchup_messages": CATCHUP_MESSAGES,
        "latency_samples": LATENCY_SAMPLES})
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()

