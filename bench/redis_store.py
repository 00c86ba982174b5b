"""RedisStore append throughput: 100,000 events across 100 sessions, concurrently.

``tether.store.redis.RedisStore`` runs in this process (client core) against a redis-server the
script starts on a free port (server core, no persistence). Every session has ``K`` appenders,
each awaiting its append before the next (so 100 x K appends are in flight); the store batches
what queues up while a pipeline is out (one Lua call per session batch). Figure: events/s from
the first append to the last commit, checked against each session's head. Target: >= 100k/s.

Variants: plain events (``message``, ~80-byte data), token deltas (``stream.append``: the script
also appends to the stream's text), and plain events with an idempotency key each (what the
Python SDK sends), at K = 1 and K = 10.

Baseline in the same run: one ``XADD`` at a time with redis-py (asyncio, hiredis), same data,
round-robin over 100 streams; and, for scale, ``XADD`` pipelined 100 at a time.

``--cluster``: every variant also runs on a 3-master Redis Cluster the script starts, all three
masters pinned to the server core like the single Redis (so the two compare on the same core:
the ratio is what splitting each flush into one script call per slot costs Redis and the
client). Its "redis CPU" is the three masters' sum.

``--wait-replicas``: the single Redis gets a replica (on the server core too), and every variant
also runs with ``?wait_replicas=1`` (each commit pipeline ends with ``WAIT 1``) against the same
Redis and replica, right after the variant without it; the ratio is what waiting for the
replica costs. At K=1 the mean time an append takes is the appends in flight over events/s.

Run: ``python -m bench.redis_store`` (3 runs, ~30 s) or ``--quick``; add ``--cluster`` or
``--wait-replicas``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common as c

SESSIONS = 100
DATA = {"stream": "m1", "text": c.DELTA_TEXT}
HEADLINE = "message, K=10"


class RedisServer:
    def __init__(self, replica: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            sys.exit("redis-server is not installed (apt-get install -y redis-server)")
        self.port = c.free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="bench-redis-")
        argv = [binary, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", self._dir.name, "--protected-mode", "no",
                "--repl-diskless-sync-delay", "0"]
        self.proc = subprocess.Popen(c.pinned([*argv, "--port", str(self.port)]),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        c.wait_for_port(self.port, 10, self.proc)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.pids = [self.proc.pid]
        self.replica: subprocess.Popen[bytes] | None = None
        if replica:
            port = c.free_port()
            self.replica = subprocess.Popen(
                c.pinned([*argv, "--port", str(port), "--dbfilename", "replica.rdb",
                          "--replicaof", "127.0.0.1", str(self.port)]),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            c.wait_for_port(port, 10, self.replica)
            self._wait_replica()

    def _wait_replica(self) -> None:
        """Until the replica acknowledges writes (Redis streams them to it only then)."""
        import redis as sync_redis

        node = sync_redis.Redis(port=self.port)
        deadline = time.monotonic() + 30
        while True:
            node.flushall()
            if int(node.wait(1, 1000)) >= 1:
                break
            if time.monotonic() > deadline:
                sys.exit("the redis replica did not sync")
        node.close()

    async def flush(self) -> None:
        await flush(self.url)

    def close(self) -> None:
        for proc in (self.proc, self.replica):
            if proc is not None:
                proc.terminate()
                proc.wait(10)
        self._dir.cleanup()


class RedisClusterServer:
    """Three masters of a Redis Cluster (no replicas), on the server core."""

    def __init__(self) -> None:
        binary, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if binary is None or cli is None:
            sys.exit("redis-server is not installed (apt-get install -y redis-server)")
        self._dir = tempfile.TemporaryDirectory(prefix="bench-redis-cluster-")
        self.ports = [c.free_port() for _ in range(3)]
        self.procs = [subprocess.Popen(
            c.pinned([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                      "--appendonly", "no", "--dir", self._dir.name, "--protected-mode", "no",
                      "--cluster-enabled", "yes", "--cluster-port", str(c.free_port()),
                      "--cluster-config-file", f"nodes-{port}.conf"]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for port in self.ports]
        for port, proc in zip(self.ports, self.procs, strict=True):
            c.wait_for_port(port, 10, proc)
        subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, stdout=subprocess.DEVNULL, timeout=30)
        import redis as sync_redis

        deadline = time.monotonic() + 30
        for port in self.ports:
            node = sync_redis.Redis(port=port)
            while node.cluster("info").get("cluster_state") != "ok":
                if time.monotonic() > deadline:
                    sys.exit(f"redis cluster node {port} did not become ok")
                time.sleep(0.05)
            node.close()
        self.url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)
        self.pids = [proc.pid for proc in self.procs]

    async def flush(self) -> None:
        for port in self.ports:
            await flush(f"redis://127.0.0.1:{port}/0")

    def close(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(10)
        self._dir.cleanup()


async def flush(url: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    await client.flushall()
    await client.aclose()


async def run_store(redis: RedisServer | RedisClusterServer, total: int, per_session: int,
                    type_: str, keyed: bool, profile: str | None = None,
                    query: str = "") -> dict[str, Any]:
    from tether.protocol.events import Sender
    from tether.store.redis import RedisStore

    url = redis.url + query
    await redis.flush()
    batches: list[int] = []
    store = RedisStore(url, on_batch=batches.append)
    await store.start()
    sender = Sender("bench", "c-1", "agent")
    per_appender = total // (SESSIONS * per_session)
    data: Any = DATA if type_ == "stream.append" else {"text": c.DELTA_TEXT, "n": 1}

    async def appender(session: str) -> None:
        for _ in range(per_appender):
            key = uuid.uuid4().hex if keyed else None
            await store.append(session, type_, data, sender, key)

    sessions = [f"redis-{i}" for i in range(SESSIONS)]
    spy = c.start_profile(os.getpid(), profile, 3)
    if spy is not None:
        await asyncio.sleep(1.0)  # py-spy attaching
    try:
        start = time.perf_counter()
        own0, redis0 = time.process_time(), sum(c.cpu_seconds(p) for p in redis.pids)
        await asyncio.gather(*(appender(s) for s in sessions for _ in range(per_session)))
        elapsed = time.perf_counter() - start
        own1, redis1 = time.process_time(), sum(c.cpu_seconds(p) for p in redis.pids)
        heads = [await store.head(s) for s in sessions]
    finally:
        await store.close()
    if spy is not None:
        spy.wait()
    expected = per_appender * per_session
    if any(h.last_seq != expected for h in heads):
        raise RuntimeError(f"heads {[h.last_seq for h in heads][:5]}... != {expected}")
    done = expected * SESSIONS
    return {"events_per_s": done / elapsed, "events": done, "seconds": elapsed,
            "client_cpu": (own1 - own0) / elapsed, "redis_cpu": (redis1 - redis0) / elapsed,
            "mean_batch": sum(batches) / len(batches) if batches else float("nan")}


async def run_one_at_a_time(redis: RedisServer, count: int, query: str) -> list[float]:
    """Seconds each of ``count`` appends takes, one at a time to one session."""
    from tether.protocol.events import Sender
    from tether.store.redis import RedisStore

    await redis.flush()
    store = RedisStore(redis.url + query)
    await store.start()
    sender = Sender("bench", "c-1", "agent")
    took = []
    try:
        for _ in range(count):
            start = time.perf_counter()
            await store.append("latency", "message", {"text": c.DELTA_TEXT}, sender)
            took.append(time.perf_counter() - start)
    finally:
        await store.close()
    return took


async def run_xadd(url: str, count: int, pipeline: int) -> float:
    import redis.asyncio as aioredis

    await flush(url)
    client = aioredis.Redis.from_url(url)
    payload = orjson.dumps(["message", ["bench", "c-1", "agent"], DATA])
    keys = [f"bench:{{redis-{i}}}:log" for i in range(SESSIONS)]
    try:
        start = time.perf_counter()
        if pipeline <= 1:
            for i in range(count):
                await client.xadd(keys[i % SESSIONS], {"t": 0, "e": payload})
        else:
            for base in range(0, count, pipeline):
                pipe = client.pipeline(transaction=False)
                for i in range(base, min(count, base + pipeline)):
                    pipe.xadd(keys[i % SESSIONS], {"t": 0, "e": payload})
                await pipe.execute()
        elapsed = time.perf_counter() - start
    finally:
        await client.aclose()
    return count / elapsed


VARIANTS = [  # (name, type, K, keyed)
    ("message, K=1", "message", 1, False),
    ("message, K=10", "message", 10, False),
    ("stream.append, K=10", "stream.append", 10, False),
    ("message + idempotency key, K=10", "message", 10, True),
]


async def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=None)
    p.add_argument("--profile", metavar="PATH", default=None,
                   help="py-spy this process (the store) during one variant of the first run")
    p.add_argument("--profile-variant", default=HEADLINE, choices=[v[0] for v in VARIANTS])
    p.add_argument("--cluster", action="store_true",
                   help="also run every variant on a 3-master Redis Cluster")
    p.add_argument("--wait-replicas", action="store_true",
                   help="give the Redis a replica; also run every variant with wait_replicas=1")
    args = p.parse_args()
    total = args.events or (20_000 if args.quick else 100_000)
    redis = RedisServer(replica=args.wait_replicas)
    cluster = RedisClusterServer() if args.cluster else None
    results: dict[str, list[dict[str, Any]]] = {v[0]: [] for v in VARIANTS}
    if cluster is not None:
        results.update({f"{v[0]}, cluster": [] for v in VARIANTS})
    if args.wait_replicas:
        results.update({f"{v[0]}, wait_replicas=1": [] for v in VARIANTS})
    baselines: dict[str, list[float]] = {"XADD one at a time": [], "XADD pipelined 100": []}
    one_at_a_time: dict[str, list[float]] = {"": [], "?wait_replicas=1": []}
    try:
        for i in range(c.runs(args)):
            background = c.settle()
            single = await run_xadd(redis.url, total // 20, 1)
            piped = await run_xadd(redis.url, total, 100)
            baselines["XADD one at a time"].append(single)
            baselines["XADD pipelined 100"].append(piped)
            line = [f"XADD {single:,.0f}/s, pipelined {piped:,.0f}/s"]
            for name, type_, k, keyed in VARIANTS:
                profile = args.profile if i == 0 and name == args.profile_variant else None
                r = await run_store(redis, total, k, type_, keyed, profile)
                r["background_busy"] = background
                results[name].append(r)
                line.append(f"{name} {r['events_per_s']:,.0f}/s")
                if cluster is not None:
                    r = await run_store(cluster, total, k, type_, keyed)
                    r["background_busy"] = background
                    results[f"{name}, cluster"].append(r)
                    line.append(f"cluster {r['events_per_s']:,.0f}/s")
                if args.wait_replicas:
                    r = await run_store(redis, total, k, type_, keyed, query="?wait_replicas=1")
                    r["background_busy"] = background
                    results[f"{name}, wait_replicas=1"].append(r)
                    line.append(f"waiting {r['events_per_s']:,.0f}/s")
            if args.wait_replicas:
                for query, took in one_at_a_time.items():
                    took += await run_one_at_a_time(redis, 2000, query)
            print(f"run {i + 1}: " + "; ".join(line), flush=True)
    finally:
        redis.close()
        if cluster is not None:
            cluster.close()
    base = {n: c.median(v) for n, v in baselines.items()}
    summary = {n: {k: c.median([r[k] for r in rs])
                   for k in ("events_per_s", "mean_batch", "client_cpu", "redis_cpu")}
               for n, rs in results.items()}
    single = base["XADD one at a time"]
    print()
    print(f"RedisStore.append: {total:,} events over {SESSIONS} sessions, median of "
          f"{c.runs(args)} runs")
    rows = [[f"RedisStore {n}", s["events_per_s"], s["mean_batch"], f"{s['client_cpu']:.0%}",
             f"{s['redis_cpu']:.0%}", f"{s['events_per_s'] / single:.1f}x"]
            for n, s in summary.items()]
    rows += [[f"redis-py {n} (baseline)", v, "", "", "", f"{v / single:.1f}x"]
             for n, v in base.items()]
    print(c.table(["figure", "events/s", "mean batch", "store CPU", "redis CPU",
                   "vs one XADD"], rows))
    target = 100_000
    headline = summary[HEADLINE]["events_per_s"]
    met = headline >= target
    print(f"target >= {target:,}/s ({HEADLINE}): {headline:,.0f}/s "
          f"{'MET' if met else 'MISSED'} ({headline / target:.0%} of target)")
    if cluster is not None:
        ratios = {name: summary[f"{name}, cluster"]["events_per_s"]
                  / summary[name]["events_per_s"] for name, *_ in VARIANTS}
        print("cluster / one Redis, same core: "
              + "; ".join(f"{name} {ratio:.2f}" for name, ratio in ratios.items()))
    if args.wait_replicas:
        ratios = {name: summary[f"{name}, wait_replicas=1"]["events_per_s"]
                  / summary[name]["events_per_s"] for name, *_ in VARIANTS}
        print("wait_replicas=1 / without, same Redis and replica: "
              + "; ".join(f"{name} {ratio:.2f}" for name, ratio in ratios.items()))
        per_append = {name: SESSIONS * k / summary[name]["events_per_s"] * 1000
                      for name, _, k, _ in VARIANTS}
        per_append_waiting = {
            name: SESSIONS * k / summary[f"{name}, wait_replicas=1"]["events_per_s"] * 1000
            for name, _, k, _ in VARIANTS}
        print("mean ms per append (in flight / events/s): " + "; ".join(
            f"{name} {per_append[name]:.2f} -> {per_append_waiting[name]:.2f}"
            for name, *_ in VARIANTS))
        alone = {q: (c.percentile(t, 50) * 1000, c.percentile(t, 99) * 1000)
                 for q, t in one_at_a_time.items()}
        print("one append at a time, one session: p50 {:.3f} -> {:.3f} ms, p99 {:.3f} -> "
              "{:.3f} ms".format(alone[""][0], alone["?wait_replicas=1"][0],
                                 alone[""][1], alone["?wait_replicas=1"][1]))
    name = ("redis_store_cluster" if cluster is not None
            else "redis_store_wait" if args.wait_replicas else "redis_store")
    path = c.write_results(name, {
        "config": {"events": total, "sessions": SESSIONS, "runs": c.runs(args),
                   "headline": HEADLINE, "cluster": cluster is not None,
                   "wait_replicas": args.wait_replicas},
        "runs": results, "baselines": baselines, "summary": summary, "baseline": base,
        "one_at_a_time_ms": {q or "plain": {"p50": c.percentile(took, 50) * 1000,
                                             "p99": c.percentile(took, 99) * 1000}
                             for q, took in one_at_a_time.items() if took},
        "ratios": {n: s["events_per_s"] / single for n, s in summary.items()},
        "target": {"events_per_s": target, "value": headline, "met": met}})
    print(f"\nwrote {path.relative_to(c.ROOT)}")


if __name__ == "__main__":
    c.setup()
    asyncio.run(main())
