"""Token streams: 100 sessions, each with its own publisher streaming ``stream.append`` deltas.

Figure: durable deltas/s, counted twice: committed (``published`` replies, sent after the SQLite
commit) and delivered (``event`` frames received by the one subscriber of each session). Each
publisher keeps a bounded number of publishes in flight. Target: >= 100k/s both ways.

Baselines in the same run:

* raw SQLite inserts of the same rows (tether's ``events`` schema, WAL, ``synchronous=NORMAL``)
  at 100 rows per transaction, one row per session per transaction, on the client core while
  nothing else runs: the ceiling the store itself puts on tether;
* bare aiohttp relay with acks: the same 100 publishers and 100 subscribers, each message
  forwarded to its session's subscriber and acknowledged, no store: the ceiling the WebSocket
  stack puts on the same three frames per delta (in, ack, event) on one core.

Run: ``python -m bench.streams`` (3 runs, ~40 s) or ``--quick``; ``--workers 1,2`` measures
``tether serve --workers 1`` and ``--workers 2`` in the same runs as the baselines (``--workers``
N > 1 is not pinned to the server core: it is there to use every core).
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common as c

SESSIONS = 100
WINDOW = 32  # publishes in flight per publisher
DATA = {"stream": "m1", "text": c.DELTA_TEXT}

_SCHEMA = """
CREATE TABLE events (
    sid INTEGER NOT NULL, seq INTEGER NOT NULL, type TEXT NOT NULL, stream TEXT,
    data BLOB NOT NULL, sub TEXT NOT NULL, client TEXT NOT NULL, kind TEXT NOT NULL,
    time INTEGER NOT NULL, PRIMARY KEY (sid, seq));
"""


def sqlite_baseline(seconds: float, per_txn: int = 100) -> float:
    """Rows/s inserted by ``executemany`` at ``per_txn`` rows per transaction."""
    with tempfile.TemporaryDirectory(prefix="bench-sqlite-") as folder:
        conn = sqlite3.connect(Path(folder) / "x.db", isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)
        blob = orjson.dumps(DATA)
        base = 1
        rows = 0
        start = time.perf_counter()
        deadline = start + seconds
        while time.perf_counter() < deadline:
            now = int(time.time() * 1000)
            batch = [(i % SESSIONS, base + i // SESSIONS, "stream.append", "m1", blob,
                      "bench", "c-1", "agent", now) for i in range(per_txn)]
            base += -(-per_txn // SESSIONS)
            conn.execute("BEGIN")
            conn.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", batch)
            conn.execute("COMMIT")
            rows += per_txn
        elapsed = time.perf_counter() - start
        conn.close()
    return rows / elapsed


async def run_tether(warmup: float, duration: float, profile: str | None = None,
                     workers: int = 1) -> dict[str, Any]:
    with c.tether_server(workers=workers) as server:
        async def pair(i: int) -> tuple[c.Conn, c.WindowedPublisher]:
            session = f"stream-{i}"
            sub: c.Conn = await c.connect(server.port)
            await sub.hello()
            await sub.attach(session)
            conn: c.Conn = await c.connect(server.port)
            await conn.hello()
            payload = orjson.dumps({"op": "publish", "session": session,
                                    "type": "stream.append", "data": DATA})
            return sub, c.WindowedPublisher(conn, payload, WINDOW)

        pairs = await c.gather_limited([pair(i) for i in range(SESSIONS)], 20)
        subs = [s for s, _ in pairs]
        pubs = [p for _, p in pairs]
        for pub in pubs:
            pub.start()
        await asyncio.sleep(warmup)

        def counts() -> tuple[int, int]:
            return sum(p.acked for p in pubs), sum(s.events for s in subs)

        spy = c.start_profile(server, profile, duration)
        a0, e0 = counts()
        window = c.CpuWindow(server, workers).start()
        cpu0, own0, t0 = server.cpu_seconds(), time.process_time(), time.perf_counter()
        await asyncio.sleep(duration)
        a1, e1 = counts()
        cpu1, own1, t1 = server.cpu_seconds(), time.process_time(), time.perf_counter()
        cpu = window.stop(min(a1 - a0, e1 - e0))
        for pub in pubs:
            pub.stop()
        if spy is not None:
            spy.wait()
        try:
            await c.wait_until(lambda: all(p.inflight == 0 for p in pubs), 30, what="acks")
            await c.wait_until(lambda: all(s.events >= p.acked for s, p in pairs), 30,
                               what="delivery")
            complete = True
        except TimeoutError:
            complete = False
        errors = [e for s, p in pairs for e in s.errors + p.conn.errors]
        if errors:
            raise RuntimeError(f"tether answered errors: {errors[:3]}")
        for s, p in pairs:
            s.close()
            p.conn.close()
    elapsed = t1 - t0
    committed, delivered = (a1 - a0) / elapsed, (e1 - e0) / elapsed
    return {"committed_per_s": committed, "delivered_per_s": delivered,
            "durable_per_s": min(committed, delivered),
            "server_cpu": (cpu1 - cpu0) / elapsed, "client_cpu": (own1 - own0) / elapsed,
            "durable_per_cpu_s": min(a1 - a0, e1 - e0) / max(cpu1 - cpu0, 1e-9),
            "complete": complete, "cpu": cpu}


async def run_bare(warmup: float, duration: float) -> dict[str, Any]:
    with c.bare_server("relay", "--ack") as server:
        async def pair(i: int) -> tuple[Any, c.WindowedPublisher]:
            sub = await c.connect(server.port, f"/sub/{i}", None, c.CountingConn)
            conn = await c.connect(server.port, f"/pub/{i}", None, c.CountingConn)
            return sub, c.WindowedPublisher(conn, orjson.dumps(DATA), WINDOW, hook="on_event")

        pairs = await c.gather_limited([pair(i) for i in range(SESSIONS)], 20)
        await asyncio.sleep(0.2)  # the server registers subscribers after the handshake
        pubs = [p for _, p in pairs]
        for pub in pubs:
            pub.start()
        await asyncio.sleep(warmup)
        a0, e0 = sum(p.acked for p in pubs), sum(s.events for s, _ in pairs)
        window = c.CpuWindow(server).start()
        cpu0, own0, t0 = server.cpu_seconds(), time.process_time(), time.perf_counter()
        await asyncio.sleep(duration)
        a1, e1 = sum(p.acked for p in pubs), sum(s.events for s, _ in pairs)
        cpu1, own1, t1 = server.cpu_seconds(), time.process_time(), time.perf_counter()
        cpu = window.stop(min(a1 - a0, e1 - e0))
        for pub in pubs:
            pub.stop()
        for s, p in pairs:
            s.close()
            p.conn.close()
    elapsed = t1 - t0
    return {"relayed_per_s": min(a1 - a0, e1 - e0) / elapsed,
            "server_cpu": (cpu1 - cpu0) / elapsed, "client_cpu": (own1 - own0) / elapsed,
            "cpu": cpu}


async def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=None, help="measured seconds per run")
    c.add_profile_option(p)
    p.add_argument("--workers", default="1", metavar="N[,N...]",
                   help="tether serve --workers counts to measure (default 1), e.g. 1,2")
    args = p.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    duration = args.duration or (2.0 if args.quick else 4.0)
    warmup = 0.5 if args.quick else 1.0
    runs: list[dict[str, Any]] = []
    more: dict[int, list[dict[str, Any]]] = {n: [] for n in counts[1:]}
    for i in range(c.runs(args)):
        background = c.settle()
        sqlite_rate = sqlite_baseline(1.0 if args.quick else 1.5)
        r = await run_tether(warmup, duration, args.profile if i == 0 else None, counts[0])
        for n in counts[1:]:
            c.settle()
            more[n].append(await run_tether(warmup, duration, None, n))
            print(f"run {i + 1}, --workers {n}: committed {more[n][-1]['committed_per_s']:,.0f}"
                  f"/s, delivered {more[n][-1]['delivered_per_s']:,.0f}/s (server CPU "
                  f"{more[n][-1]['server_cpu']:.0%})", flush=True)
        bare = await run_bare(warmup, duration)
        r["sqlite_100_per_txn"] = sqlite_rate
        r["bare_relay_per_s"] = bare["relayed_per_s"]
        r["bare_server_cpu"] = bare["server_cpu"]
        r["bare_client_cpu"] = bare["client_cpu"]
        r["bare_cpu"] = bare["cpu"]
        r["background_busy"] = background
        runs.append(r)
        print(f"run {i + 1}: committed {r['committed_per_s']:,.0f}/s, delivered "
              f"{r['delivered_per_s']:,.0f}/s (server CPU {r['server_cpu']:.0%}, client CPU "
              f"{r['client_cpu']:.0%}); raw SQLite {sqlite_rate:,.0f} rows/s; bare relay "
              f"{bare['relayed_per_s']:,.0f}/s (server CPU {bare['server_cpu']:.0%}, client CPU "
              f"{bare['client_cpu']:.0%})", flush=True)
    keys = ("committed_per_s", "delivered_per_s", "durable_per_s", "server_cpu", "client_cpu",
            "durable_per_cpu_s", "sqlite_100_per_txn", "bare_relay_per_s", "bare_server_cpu",
            "bare_client_cpu")
    summary = {k: c.median([r[k] for r in runs]) for k in keys}
    ratio = summary["durable_per_s"] / summary["sqlite_100_per_txn"]
    bare_ratio = summary["durable_per_s"] / summary["bare_relay_per_s"]
    target = 100_000
    met = summary["durable_per_s"] >= target
    print()
    print(f"token streams: {SESSIONS} sessions x (1 publisher, {WINDOW} in flight + "
          f"1 subscriber), median of {len(runs)} x {duration:g}s")
    print(c.table(["figure", "per second"], [
        ["tether deltas committed", summary["committed_per_s"]],
        ["tether deltas delivered", summary["delivered_per_s"]],
        ["tether durable (min of both)", summary["durable_per_s"]],
        ["  per second of server CPU", summary["durable_per_cpu_s"]],
        ["raw SQLite insert, 100/txn (baseline)", summary["sqlite_100_per_txn"]],
        ["bare aiohttp relay + ack, no store (baseline)", summary["bare_relay_per_s"]],
    ]))
    print(f"tether: server CPU {summary['server_cpu']:.0%}, client CPU "
          f"{summary['client_cpu']:.0%}, all delivered: "
          f"{'yes' if all(r['complete'] for r in runs) else 'NO'}; bare relay: server CPU "
          f"{summary['bare_server_cpu']:.0%}, client CPU {summary['bare_client_cpu']:.0%}")
    print(f"tether / raw SQLite: {ratio:.2f}x; tether / bare aiohttp relay: {bare_ratio:.2f}x")
    print(f"target >= {target:,}/s: {summary['durable_per_s']:,.0f}/s "
          f"{'MET' if met else 'MISSED'} ({summary['durable_per_s'] / target:.0%} of target)")
    by_workers = {counts[0]: summary}
    for n, results in more.items():
        by_workers[n] = {k: c.median([r[k] for r in results])
                         for k in ("committed_per_s", "delivered_per_s", "durable_per_s",
                                   "server_cpu", "durable_per_cpu_s")}
    if more:
        print()
        print(c.table(["tether serve", "durable/s", "/ bare relay", "/ raw SQLite",
                       "server CPU", "per CPU-s"], [
            [f"--workers {n}", s["durable_per_s"],
             s["durable_per_s"] / summary["bare_relay_per_s"],
             s["durable_per_s"] / summary["sqlite_100_per_txn"], s["server_cpu"],
             s["durable_per_cpu_s"]] for n, s in by_workers.items()]))
    # Where the CPU went, per process (medians over runs): us per durable delta, share of a
    # core, and what a core per server process would allow.
    cpu = {f"tether --workers {counts[0]}": c.cpu_summary([r["cpu"] for r in runs])}
    for n, results in more.items():
        cpu[f"tether --workers {n}"] = c.cpu_summary([r["cpu"] for r in results])
    cpu["bare relay + ack"] = c.cpu_summary([r["bare_cpu"] for r in runs])
    for n in by_workers:
        by_workers[n]["cpu"] = cpu[f"tether --workers {n}"]
    print()
    print(c.table(["system", "process", "busy", "CPU us per delta"],
                  [row for name, s in cpu.items() for row in c.cpu_rows(name, s)]))
    path = c.write_results("streams", {
        "by_workers": {str(n): s for n, s in by_workers.items()},
        "config": {"sessions": SESSIONS, "window": WINDOW, "duration": duration,
                   "warmup": warmup, "runs": len(runs), "data_bytes": len(orjson.dumps(DATA))},
        "runs": runs, "summary": summary, "cpu": cpu, "ratio_to_sqlite": ratio,
        "ratio_to_bare_relay": bare_ratio,
        "target": {"durable_per_s": target, "met": met}})
    print(f"\nwrote {path.relative_to(c.ROOT)}")


if __name__ == "__main__":
    c.setup()
    asyncio.run(main())
