"""Experiment: where the server's loop stalls, and what overlaps each stall.

A tail of publish → deliver latency is a time when the loop did not run what arrived. This
wrapper records, in the server process (the single process, or the ``--workers`` supervisor,
which is the sequencer), with ``time.perf_counter`` on one clock:

* the loop's lateness: a 1 ms ``call_later`` heartbeat, how late each beat ran;
* every SQLite group commit (``SqliteStore._commit``): its duration and batch size;
* every garbage collection (``gc.callbacks``): its duration and generation;
* every WAL checkpoint of the checkpointer thread: its duration (``BENCH_STALLS_CHECKPOINTS=off``
  runs none, for comparison; ``=low`` runs them at the lowest priority).

At exit it prints (stderr: the server's log, shown with ``BENCH_KEEP_LOGS=1``) their
distributions after the first ``BENCH_STALLS_SKIP`` seconds (default 2: connections and
warm-up) and, for every beat later than 5 ms, what overlapped it: a commit, a collection or a
checkpoint longer than 1 ms, or none of these (the process was not running: the machine's
scheduler, or a burst of frames to handle).

``BENCH_KEEP_LOGS=1 BENCH_TETHER_WRAPPER=bench/experiments/stalls.py python -m bench.latency``
Nothing in ``tether/`` is changed; this patches the store at run time.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import gc
import itertools
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from tether.store import sqlite as store_sqlite

TICK = 0.001
SKIP = float(os.environ.get("BENCH_STALLS_SKIP", "2"))
STALL = 0.005
# BENCH_STALLS_CHECKPOINTS=off: no checkpoints at all (the WAL grows for the whole run), to see
# what the checkpointer's copying and fsync cost the commits on the loop.
NO_CHECKPOINTS = os.environ.get("BENCH_STALLS_CHECKPOINTS") == "off"
# BENCH_STALLS_CHECKPOINTS=low: the checkpointer thread at the lowest priority (SCHED_OTHER,
# nice 19), so that on the server's one core it runs when the loop's thread does not.
LOW_CHECKPOINTS = os.environ.get("BENCH_STALLS_CHECKPOINTS") == "low"
# BENCH_STALLS_CHECKPOINT_PAGES=N: ask for a checkpoint every N (estimated) WAL pages instead
# of the store's own interval.
PAGES = os.environ.get("BENCH_STALLS_CHECKPOINT_PAGES")
LONG = 0.001
# BENCH_STALLS_STACKS=1: a thread samples the loop thread's kernel stack (/proc/self/task/TID/
# stack, root only) every 0.3 ms while a commit runs; the report names where commits longer
# than 5 ms waited in the kernel.
STACKS = os.environ.get("BENCH_STALLS_STACKS") == "1"
_in_commit = [0.0]
stack_samples: list[tuple[float, str]] = []  # (the commit's start, the kernel frames)

clock = time.perf_counter
beats: list[tuple[float, float, float]] = []  # (due, ran, loop thread's CPU time when it ran)
# (start, end, rows, CPU seconds, whether a checkpoint ended since the previous commit)
commits: list[tuple[float, float, int, float, bool]] = []
collections: list[tuple[float, float, int]] = []  # (start, end, generation)
checkpoints: list[tuple[float, float]] = []
_gc_start = [0.0]
_first = [0.0]


def _on_gc(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _gc_start[0] = clock()
    else:
        collections.append((_gc_start[0], clock(), int(info.get("generation", -1))))


def _heartbeat(loop: asyncio.AbstractEventLoop) -> None:
    due = [clock() + TICK]

    def beat() -> None:
        now = clock()
        beats.append((due[0], now, time.thread_time()))
        due[0] = now + TICK
        loop.call_later(TICK, beat)

    loop.call_later(TICK, beat)


_start = store_sqlite.SqliteStore.start
_commit = store_sqlite.SqliteStore._commit
_catch_up = store_sqlite._Checkpointer._catch_up


async def start(self: Any) -> None:
    await _start(self)
    if NO_CHECKPOINTS:
        self._conn.execute("PRAGMA wal_autocheckpoint = 0")
    _heartbeat(asyncio.get_running_loop())
    if STACKS:
        threading.Thread(target=_sample_stacks, args=(threading.get_native_id(),),
                         daemon=True).start()


def _sample_stacks(tid: int) -> None:
    path = f"/proc/self/task/{tid}/stack"
    while True:
        begin = _in_commit[0]
        if begin:
            with contextlib.suppress(OSError), open(path) as f:
                frames = [line.split("] ", 1)[-1].split("+", 1)[0]
                          for line in f.read().splitlines()]
            if frames and "entry_SYSCALL_64_after_hwframe" in frames:
                stack_samples.append((begin, " < ".join(frames[:7])))
        time.sleep(0.0003)


def commit(self: Any, batch: list[Any]) -> None:
    begin = clock()
    cpu = time.thread_time()
    if not _first[0]:
        _first[0] = begin
    after_checkpoint = bool(checkpoints) and (not commits or checkpoints[-1][1] > commits[-1][1])
    _in_commit[0] = begin
    try:
        _commit(self, batch)
    finally:
        _in_commit[0] = 0.0
        commits.append((begin, clock(), len(batch), time.thread_time() - cpu, after_checkpoint))


def catch_up(self: Any) -> None:
    """A round of the checkpointer thread (its passes), timed as one checkpoint."""
    if LOW_CHECKPOINTS and not getattr(self, "_lowered", False):
        with contextlib.suppress(OSError, AttributeError):
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))  # this thread only
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        self._lowered = True
    if NO_CHECKPOINTS:
        return
    begin = clock()
    try:
        _catch_up(self)
    finally:
        checkpoints.append((begin, clock()))


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


def _ms(values: list[float]) -> str:
    return (f"n {len(values)}, p50 {_pct(values, 50) * 1e3:.2f} ms, p99 "
            f"{_pct(values, 99) * 1e3:.2f} ms, max {max(values, default=0) * 1e3:.2f} ms, "
            f"sum {sum(values) * 1e3:.0f} ms")


def _report() -> None:
    if not _first[0]:
        return
    after = _first[0] + SKIP
    b = [(d, r, t) for d, r, t in beats if d >= after]
    c = [x for x in commits if x[0] >= after]
    g = [x for x in collections if x[0] >= after]
    k = [x for x in checkpoints if x[0] >= after]
    if not b:
        return
    span = b[-1][1] - b[0][0]
    out = [f"stalls over {span:.1f}s (pid {os.getpid()}):",
           f"  loop lateness: {_ms([r - d for d, r, _ in b])}",
           f"  commits, wall: {_ms([e - s for s, e, *_ in c])}, rows per commit "
           f"{sum(x[2] for x in c) / max(len(c), 1):.1f}",
           f"  commits, CPU of the loop's thread: {_ms([x[3] for x in c])}",
           f"  the first commit after each checkpoint, wall: "
           f"{_ms([e - s for s, e, _, _, k in c if k])}",
           f"  commits longer than 5 ms: {sum(1 for s, e, *_ in c if e - s > STALL)}, of which "
           f"first after a checkpoint: {sum(1 for s, e, _, _, k in c if k and e - s > STALL)}",
           f"  gc: {_ms([e - s for s, e, _ in g])}, gen2 {sum(1 for *_, n in g if n == 2)}",
           f"  checkpoints: {_ms([e - s for s, e in k])}"]
    kinds = {"commit": 0, "gc": 0, "checkpoint": 0, "none": 0}
    # For each late beat, how much of the time since the previous beat the loop's thread was
    # on a CPU: near 100 % means it was working (what arrived queued behind work), near 0 %
    # that it was not running (not scheduled, or blocked in a system call).
    stalls = []
    on_cpu = wall = 0.0
    for (_, r0, t0), (d, r, t) in itertools.pairwise(b):
        if r - d > STALL:
            stalls.append((d, r))
            on_cpu += t - t0
            wall += r - r0
    for d, r in stalls:
        hit = False
        for name, spans in (("commit", c), ("gc", g), ("checkpoint", k)):
            if any(e - s > LONG and s < r and e > d for s, e, *_ in spans):
                kinds[name] += 1
                hit = True
        if not hit:
            kinds["none"] += 1
    out.append(f"  beats later than {STALL * 1e3:.0f} ms: {len(stalls)} of {len(b)} "
               f"({sum(r - d for d, r in stalls) * 1e3:.0f} ms late in all); overlapping a "
               + ", ".join(f"{n} > 1 ms: {v}" for n, v in kinds.items() if n != "none")
               + f"; none of these: {kinds['none']}; the loop's thread was on a CPU "
               f"{on_cpu / wall if wall else 0:.0%} of those intervals")
    if STACKS:
        slow = {s for s, e, *_ in c if e - s > STALL}
        seen: dict[str, int] = {}
        for begin in slow:
            for frames in {f for b0, f in stack_samples if b0 == begin}:
                seen[frames] = seen.get(frames, 0) + 1
        out.append(f"  kernel stacks seen in the {len(slow)} commits longer than 5 ms:")
        out += [f"    {n} {frames}" for frames, n in sorted(seen.items(), key=lambda x: -x[1])[:8]]
    print("\n".join(out), file=sys.stderr, flush=True)


if __name__ == "__main__":
    store_sqlite.SqliteStore.start = start  # type: ignore[method-assign]
    store_sqlite.SqliteStore._commit = commit  # type: ignore[method-assign]
    store_sqlite._Checkpointer._catch_up = catch_up  # type: ignore[method-assign]
    if PAGES:
        store_sqlite._CHECKPOINT_PAGES = int(PAGES)
    gc.callbacks.append(_on_gc)
    atexit.register(_report)
    from tether.cli import main

    sys.exit(main(sys.argv[1:]))
