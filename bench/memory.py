"""Idle memory: server RSS growth per idle attached connection, at 10,000 connections.

Several client processes (on the client core) open the connections: for tether each sends
hello and attaches, to its own session (``own``) or all to one session (``shared``, with a
token without the ``presence`` capability: see below); the baseline is a bare aiohttp server
holding the same number of idle WebSockets. RSS is read from ``/proc/PID/status`` after a small
warm-up (connections opened and closed, so lazily built code paths are paid for) and again once
every connection is open and the server is idle; the difference over the count is KiB/conn.
Target: <= 16 KiB per connection.

The shared variant drops ``presence`` because with it every attach to one session sends the
whole member list to the newcomer and a join to every member: O(n^2) frames and bytes for n
members, which is a separate (reported) problem, not idle memory.

Memory figures barely move between runs and opening 10,000 tether connections takes ~13 s (the
server spends most of a millisecond of CPU on each hello + attach), so the default is one run of
each; ``--runs 3`` takes about two minutes.

Run: ``python -m bench.memory`` (~45 s) or ``--quick`` (2,000 connections).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common as c

WORKERS = 2
KIB = 1024.0


# --- worker: opens connections, reports, holds them until told to go ------------------------------

async def worker(port: int, count: int, mode: str, prefix: str, concurrency: int) -> None:
    loop = asyncio.get_running_loop()
    tok = os.environ.get("BENCH_TOKEN", "")

    async def one(i: int) -> Any:
        if mode == "bare":
            return await c.connect(port, "/ws", None, c.CountingConn)
        conn = await c.connect(port)
        await conn.hello(tok)
        await conn.attach("shared" if mode.startswith("shared") else f"{prefix}-{i}")
        return conn

    start = time.perf_counter()
    conns = await c.gather_limited([one(i) for i in range(count)], concurrency)
    elapsed = time.perf_counter() - start
    errors = sum(len(getattr(conn, "errors", [])) for conn in conns)
    print(orjson.dumps({"open": len(conns), "seconds": elapsed, "errors": errors}).decode(),
          flush=True)
    # Hold until the parent closes our stdin.
    await loop.run_in_executor(None, sys.stdin.read)
    for conn in conns:
        conn.close()
    await asyncio.sleep(0.2)


def spawn_workers(port: int, total: int, mode: str, tag: str, workers: int
                  ) -> list[subprocess.Popen[bytes]]:
    per = [total // workers + (1 if i < total % workers else 0) for i in range(workers)]
    # Minted here: workers then need not import the JWT library, and start faster.
    tok = "" if mode == "bare" else c.token(caps=["subscribe"] if mode == "shared" else None)
    return [subprocess.Popen(
        [sys.executable, "-m", "bench.memory", "--worker", "--port", str(port), "--count",
         str(n), "--mode", mode, "--prefix", f"{tag}-{i}"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=c.ROOT,
        env={**c.child_env(), "BENCH_TOKEN": tok}) for i, n in enumerate(per) if n]


def collect(procs: list[subprocess.Popen[bytes]], timeout: float = 120) -> list[dict[str, Any]]:
    reports = []
    for proc in procs:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"a client worker exited with {proc.wait(timeout)}")
        reports.append(orjson.loads(line))
    return reports


def release(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.close()
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def settled_rss(server: c.Proc, seconds: float = 1.5) -> int:
    """RSS once it stops moving (or after ``seconds``)."""
    last = server.rss()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = server.rss()
        if abs(now - last) < 64 * 1024:
            return now
        last = now
    return last


def run_one(kind: str, count: int, workers: int) -> dict[str, Any]:
    mode = {"tether own session": "own", "tether shared session": "shared",
            "bare aiohttp": "bare"}[kind]
    server = c.bare_server("idle") if mode == "bare" else c.tether_server()
    with server:
        # Warm-up: a few connections opened and closed.
        warm = spawn_workers(server.port, 50, mode, "warm", 1)
        collect(warm)
        release(warm)
        time.sleep(0.5)
        before = settled_rss(server)
        start = time.perf_counter()
        procs = spawn_workers(server.port, count, mode, "conn", workers)
        try:
            reports = collect(procs)
            opened = time.perf_counter() - start
            time.sleep(1.0)
            after = settled_rss(server)
            alive = server.alive()
        finally:
            release(procs)
    total = sum(r["open"] for r in reports)
    errors = sum(r["errors"] for r in reports)
    if total != count or errors or not alive:
        raise RuntimeError(f"{kind}: opened {total}/{count}, {errors} errors, alive={alive}")
    return {"connections": total, "rss_before_mib": before / KIB / KIB,
            "rss_after_mib": after / KIB / KIB, "kib_per_conn": (after - before) / KIB / total,
            "open_per_s": total / opened}


def presence_scaling(sizes: list[int]) -> None:
    """Attach ``n`` members to one session with and without presence: server CPU per attach."""
    rows = []
    for n in sizes:
        row: list[Any] = [n]
        for mode in ("shared-presence", "shared"):
            with c.tether_server() as server:
                cpu0, start = server.cpu_seconds(), time.perf_counter()
                procs = spawn_workers(server.port, n, mode, "p", 1)
                try:
                    collect(procs, timeout=3600)
                finally:
                    release(procs)
                row += [(server.cpu_seconds() - cpu0) / n * 1000, time.perf_counter() - start]
            print(f"{n} members, {mode}: {row[-2]:.2f} ms CPU per attach, {row[-1]:.1f} s",
                  flush=True)
        rows.append(row)
    print(c.table(["members", "CPU ms/attach with presence", "wall s", "without presence",
                   "wall s"], rows))


def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--connections", type=int, default=None)
    p.add_argument("--workers", type=int, default=WORKERS)
    p.add_argument("--presence", metavar="N,N,...", default=None,
                   help="instead: attach N members to one session with and without presence "
                        "and report server CPU per attach (shows presence's O(n^2))")
    p.add_argument("--worker", action="store_true", help=argparse_hidden())
    p.add_argument("--port", type=int, default=0, help=argparse_hidden())
    p.add_argument("--count", type=int, default=0, help=argparse_hidden())
    p.add_argument("--mode", default="own", help=argparse_hidden())
    p.add_argument("--prefix", default="m", help=argparse_hidden())
    args = p.parse_args()
    if args.worker:
        c.raise_nofile()
        c.install_uvloop()
        asyncio.run(worker(args.port, args.count, args.mode, args.prefix, 64))
        return
    c.setup()
    if args.presence:
        presence_scaling([int(n) for n in args.presence.split(",")])
        return
    count = args.connections or (2000 if args.quick else 10_000)
    limit = c.raise_nofile()
    if limit < count / max(1, args.workers) + 100 or limit < count + 100:
        print(f"RLIMIT_NOFILE is {limit}: too low for {count} connections", file=sys.stderr)
    kinds = ["tether own session", "bare aiohttp", "tether shared session"]
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    n_runs = args.runs or 1
    for i in range(n_runs):
        for kind in kinds:
            if kind == "tether shared session" and i > 0:
                continue  # one run is enough for the variant; keeps the default near a minute
            background = c.settle()
            r = run_one(kind, count, args.workers)
            r["background_busy"] = background
            results[kind].append(r)
            print(f"run {i + 1} {kind}: {r['kib_per_conn']:.1f} KiB/conn (RSS "
                  f"{r['rss_before_mib']:.0f} -> {r['rss_after_mib']:.0f} MiB, "
                  f"{r['open_per_s']:,.0f} conn/s)", flush=True)
    summary = {k: {key: c.median([r[key] for r in rs])
                   for key in ("kib_per_conn", "rss_before_mib", "rss_after_mib", "open_per_s")}
               for k, rs in results.items() if rs}
    bare = summary["bare aiohttp"]["kib_per_conn"]
    own = summary["tether own session"]["kib_per_conn"]
    target = 16.0
    print()
    print(f"idle memory: {count:,} connections, median of runs")
    rows = [[k, s["kib_per_conn"], s["rss_before_mib"], s["rss_after_mib"], s["open_per_s"],
             "" if k == "bare aiohttp" else f"{s['kib_per_conn'] / bare:.2f}x",
             len(results[k])] for k, s in summary.items()]
    print(c.table(["server", "KiB/conn", "RSS before MiB", "RSS after MiB", "opened/s",
                   "vs bare", "runs"], rows))
    print(f"target <= {target:g} KiB/conn (tether, own session): {own:.1f} KiB "
          f"{'MET' if own <= target else 'MISSED'}")
    path = c.write_results("memory", {
        "config": {"connections": count, "workers": args.workers, "runs": n_runs},
        "runs": results, "summary": summary,
        "ratios": {k: s["kib_per_conn"] / bare for k, s in summary.items()},
        "target": {"kib_per_conn": target, "value": own, "met": own <= target}})
    print(f"\nwrote {path.relative_to(c.ROOT)}")


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
