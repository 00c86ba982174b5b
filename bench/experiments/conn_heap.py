"""Experiment: where an idle attached connection's Python heap goes, by tracemalloc.

The server (tether, memory store, heartbeats on, no compression; or bare aiohttp with
``--bare``) runs in this process under tracemalloc; a client process of ``bench.connections``
opens ``--connections`` raw WebSockets that say hello and attach to their own session (bare: one
request, one reply) and holds them. A snapshot before (after a warm-up of 50 connections opened
and closed) and one once all are open and idle; the difference, per connection, grouped by the
line that allocated it (``--group file``: by file), largest first.

``python -m bench.experiments.conn_heap`` (tether, 1,000) and ``… --bare``; with
``--rest 11 --heartbeat 5``, what grows over a rest with heartbeats (from the all-open snapshot).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import orjson

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from bench import common as c
from bench.connections import bare_app

ROOT = Path(__file__).resolve().parent.parent.parent


async def clients(port: int, count: int, mode: str, tag: str, tok: str
                  ) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.connections", "--worker", "--port", str(port),
        "--count", str(count), "--mode", mode, "--prefix", tag, "--source", "127.0.0.2",
        "--concurrency", "50", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        cwd=ROOT, env={**c.child_env(), "BENCH_TOKEN": tok})
    assert proc.stdout is not None
    report = orjson.loads(await proc.stdout.readline())
    if report["open"] != count:
        raise SystemExit(f"opened {report['open']} of {count}: {report['failures']}")
    return proc


async def release(proc: asyncio.subprocess.Process) -> None:
    assert proc.stdin is not None
    proc.stdin.write(b"quit\n")
    await proc.stdin.drain()
    proc.stdin.close()
    await proc.wait()


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0.05)
    gc.collect()


async def measure(args: Any) -> list[tuple[str, float]]:
    from aiohttp import web

    mode = "bare" if args.bare else "tether"
    tok = ""
    if args.bare:
        runner = web.AppRunner(bare_app(args.heartbeat, False), access_log=None)
        await runner.setup()
        port = c.free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        stop = runner.cleanup
    else:
        from tether.server.app import Server
        from tether.server.config import ServerConfig

        tok = c.token(caps=["subscribe", "publish"])
        server = Server(ServerConfig(port=0, store_url="memory://", secret=c.SECRET,
                                     compression=False, max_sessions_per_connection=100,
                                     heartbeat=args.heartbeat,
                                     subject_connections=max(1000, args.connections)))
        await server.start()
        port = server.port
        stop = server.stop
    try:
        warm = await clients(port, 50, mode, "warm", tok)
        await release(warm)
        await settle()
        before = tracemalloc.take_snapshot()
        held = await clients(port, args.connections, mode, "c", tok)
        await settle()
        after = tracemalloc.take_snapshot()
        if args.rest:
            # What grows while every connection is idle and pinged: the open-and-idle snapshot
            # becomes the baseline.
            before = after
            if args.serve_gc:
                gc.collect()
                gc.freeze()
                gc.set_threshold(20_000, 20, 20)
            await asyncio.sleep(args.rest)
            if args.collect:
                gc.collect()
            after = tracemalloc.take_snapshot()
            if args.serve_gc:
                gc.unfreeze()
        await release(held)
    finally:
        await stop()
    key = "filename" if args.group == "file" else "lineno"
    if args.group == "traceback":
        key = "traceback"
    stats = after.compare_to(before, key)
    rows = []
    for stat in stats:
        frame = stat.traceback[0] if key != "traceback" else stat.traceback[-1]
        where = f"{_short(frame.filename)}:{frame.lineno}" if key != "filename" \
            else _short(frame.filename)
        if key == "traceback":
            where = " <- ".join(f"{_short(f.filename)}:{f.lineno}"
                                for f in list(stat.traceback)[::-1][:args.depth])
        rows.append((where, stat.size_diff / args.connections))
    return rows


def _short(filename: str) -> str:
    for marker in ("site-packages/", "/lib/python3", str(ROOT) + "/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--connections", type=int, default=1000)
    p.add_argument("--bare", action="store_true", help="bare aiohttp instead of tether")
    p.add_argument("--group", choices=["line", "file", "traceback"], default="line")
    p.add_argument("--depth", type=int, default=6, help="frames shown with --group traceback")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--heartbeat", type=float, default=300.0,
                   help="seconds; long by default: a ping in flight during the snapshot adds "
                        "its pong timer to some connections, which is noise here")
    p.add_argument("--rest", type=float, default=0.0,
                   help="seconds idle (pinged) after all are open: then the difference shown is "
                        "over the rest, from the open-and-idle snapshot")
    p.add_argument("--serve-gc", action="store_true",
                   help="with --rest: tether serve's collector settings (freeze, threshold "
                        "20,000) during the rest")
    p.add_argument("--collect", action="store_true",
                   help="with --rest: a full collection before the after-rest snapshot")
    args = p.parse_args()
    c.raise_nofile()
    c.install_uvloop()
    tracemalloc.start(args.depth if args.group == "traceback" else 1)
    rows = asyncio.run(measure(args))
    total = sum(size for _, size in rows)
    print(f"{'bare aiohttp' if args.bare else 'tether'}: {args.connections} connections, "
          f"Python heap {total:,.0f} bytes ({total / 1024:.2f} KiB) per connection")
    for where, size in sorted(rows, key=lambda r: -abs(r[1]))[:args.top]:
        print(f"{size:9.1f}  {where}")
    os.environ.pop("BENCH_TOKEN", None)


if __name__ == "__main__":
    main()
