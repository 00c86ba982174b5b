"""Experiment: commit stalls of the SQLite store around WAL checkpoints, and what removes them.

``SqliteStore`` commits on the loop's thread and checkpoints on a thread of its own. SQLite
reuses the WAL from its start only when a write transaction begins on a fully copied WAL; under a
steady stream of commits a checkpoint on another connection never ends in that state, so the WAL
grew until SQLite's ``wal_autocheckpoint`` backstop ran on the loop, and the first commit after
each restart truncated the grown file and fsynced the new WAL header behind megabytes of dirty
pages. This runs the real store at a steady rate (appends spread over 100 sessions, a few per
loop iteration, as ``bench.latency`` sends them) with its checkpointer in two ways, alternating:

* ``passes``: one passive checkpoint per request, as the store did before;
* ``rounds``: the store's own (passes until one leaves only a few frames, then the writer copies
  those few before its next transaction, which restarts the WAL).

For each it reports every commit's wall time, how many took over 5 ms, how often the WAL was
restarted (the WAL header's checkpoint sequence number) and its size at the end. Run as root and
``BENCH_STALLS_STACKS``-style kernel stacks are also sampled during commits over 5 ms.

``python bench/experiments/wal_restarts.py [--runs 2] [--seconds 8] [--rate 10000]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from bench import common as c
from tether.protocol.events import Sender
from tether.store import sqlite as store_sqlite

SENDER = Sender("bench", "c-1", "agent")
SLOW = 0.005
_rounds = store_sqlite._Checkpointer._catch_up


def _one_pass(self: Any) -> None:
    self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


def _wal_restarts(folder: Path) -> int:
    try:
        with open(folder / "tether.db-wal", "rb") as wal:
            return int.from_bytes(wal.read(16)[12:16], "big")
    except OSError:
        return 0


async def _run(mode: str, seconds: float, rate: float) -> dict[str, Any]:
    store_sqlite._Checkpointer._catch_up = (  # type: ignore[method-assign]
        _rounds if mode == "rounds" else _one_pass)
    commits: list[tuple[float, float]] = []
    in_commit = [0.0]
    stacks: list[tuple[float, str]] = []
    original = store_sqlite.SqliteStore._commit

    def timed(self: Any, batch: list[Any]) -> None:
        begin = in_commit[0] = time.perf_counter()
        try:
            original(self, batch)
        finally:
            in_commit[0] = 0.0
            commits.append((begin, time.perf_counter() - begin))

    tid = threading.get_native_id()
    stop = threading.Event()

    def sample() -> None:
        path = f"/proc/self/task/{tid}/stack"
        while not stop.is_set():
            begin = in_commit[0]
            if begin:
                with contextlib.suppress(OSError), open(path) as f:
                    frames = [line.split("] ", 1)[-1].split("+", 1)[0]
                              for line in f.read().splitlines()]
                if "entry_SYSCALL_64_after_hwframe" in frames:
                    stacks.append((begin, " < ".join(frames[:6])))
            time.sleep(0.0003)

    store_sqlite.SqliteStore._commit = timed  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory(prefix="bench-wal-") as folder:
        store = store_sqlite.SqliteStore(folder)
        await store.start()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            await store.append("warm", "message", {}, SENDER)
            first = _wal_restarts(Path(folder))
            per_tick, tick = 7, 7 / rate
            pending: set[asyncio.Future[Any]] = set()
            n = 0
            start = time.perf_counter()
            due = start
            while (now := time.perf_counter()) < start + seconds:
                if now < due:
                    await asyncio.sleep(due - now)
                due += tick
                for _ in range(per_tick):
                    fut = asyncio.ensure_future(store.append(
                        f"s{n % 100}", "message", {"n": n, "text": "x" * 120}, SENDER))
                    pending.add(fut)
                    fut.add_done_callback(pending.discard)
                    n += 1
            await asyncio.gather(*pending)
            restarts = _wal_restarts(Path(folder)) - first
            wal_bytes = (Path(folder) / "tether.db-wal").stat().st_size
        finally:
            stop.set()
            sampler.join()
            await store.close()
            store_sqlite.SqliteStore._commit = original  # type: ignore[method-assign]
    # A commit is identified by its start time; count each kernel stack once per slow commit.
    slow_starts = {begin for begin, took in commits if took > SLOW}
    seen: Counter[str] = Counter()
    for frames in {(b, f) for b, f in stacks if b in slow_starts}:
        seen[frames[1]] += 1
    durations = sorted(took for _, took in commits)
    slow = [d for d in durations if d > SLOW]
    return {
        "mode": mode, "commits": len(durations), "appends": n,
        "p50_ms": c.percentile(durations, 50) * 1e3, "p99_ms": c.percentile(durations, 99) * 1e3,
        "p999_ms": c.percentile(durations, 99.9) * 1e3, "max_ms": durations[-1] * 1e3,
        "over_5ms": len(slow), "wal_restarts": restarts, "wal_mib_at_end": wal_bytes / 2**20,
        "kernel_stacks_in_slow_commits": seen.most_common(6) if slow else [],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--rate", type=float, default=10_000.0)
    args = p.parse_args()
    c.install_uvloop()
    results = []
    for _ in range(args.runs):
        for mode in ("passes", "rounds"):
            results.append(asyncio.run(_run(mode, args.seconds, args.rate)))
            r = results[-1]
            print(f"{mode}: {r['commits']} commits, p99 {r['p99_ms']:.2f} ms, max "
                  f"{r['max_ms']:.1f} ms, {r['over_5ms']} over 5 ms, {r['wal_restarts']} WAL "
                  f"restarts", file=sys.stderr)
    rows = [[r["mode"], r["commits"], f"{r['p50_ms']:.3f}", f"{r['p99_ms']:.3f}",
             f"{r['p999_ms']:.2f}", f"{r['max_ms']:.1f}", r["over_5ms"], r["wal_restarts"],
             f"{r['wal_mib_at_end']:.1f}"] for r in results]
    print(c.table(["checkpointer", "commits", "p50 ms", "p99 ms", "p99.9 ms", "max ms",
                   "> 5 ms", "WAL restarts", "WAL MiB"], rows))
    for r in results:
        for frames, count in r["kernel_stacks_in_slow_commits"]:
            print(f"{r['mode']}: {count} slow commits in {frames}")
    out = {"machine": c.machine(), "config": vars(args), "runs": results}
    print(f"wrote {c.write_results('wal_restarts', out)}")


if __name__ == "__main__":
    main()
