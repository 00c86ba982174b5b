"""Experiment: how several processes of one machine should share the log (``--workers N``).

The store path alone (no WebSocket), 100 sessions, each "tick" of a writer appends one event
to each of its sessions and waits for the commits — the shape of 100 token streams. Measured
for each candidate: committed events/s and the CPU seconds each process spent per event.

* ``inproc``       — today: one process, ``SqliteStore`` with group commit, nothing shared;
* ``shared K``     — a sequencer process owning the ``SqliteStore`` behind a ``StoreHost``, and K
  writer processes each with a ``SharedStore`` (one Unix socket each, batched frames);
* ``file K``       — K processes sharing the SQLite file itself: each batch a ``BEGIN
  IMMEDIATE`` transaction that reads the sessions' last seqs (no process may cache them), inserts
  and commits; other processes would then need a cross-process wake-up on top (not measured).

``python -m bench.experiments.workers_store [--seconds 3]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from tether.protocol.events import Sender
from tether.store import SessionStore
from tether.store.shared import SharedStore, StoreHost
from tether.store.sqlite import SqliteStore

SESSIONS = 100
DATA = {"stream": "m1", "text": "hello world, this is one token delta of a model stream "}
SENDER = Sender("bench", "c-1", "agent")


TICKS: list[float] = []  # seconds per tick (append to commit), this process


async def ticks(store: SessionStore, sessions: list[str], seconds: float) -> int:
    """Append one event per session per tick until ``seconds`` pass; events committed."""
    done = 0
    TICKS.clear()
    deadline = time.perf_counter() + seconds
    while (start := time.perf_counter()) < deadline:
        futures = [store.append_future(s, "stream.append", DATA, SENDER) for s in sessions]
        await asyncio.gather(*futures)
        TICKS.append(time.perf_counter() - start)
        done += len(futures)
    return done


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))] if ordered else 0.0


def report(name: str, events: int, elapsed: float, cpu: dict[str, float],
           tick_times: list[float]) -> None:
    per_s = events / elapsed
    cpus = ", ".join(f"{who} {seconds / events * 1e6:.1f} µs" for who, seconds in cpu.items())
    print(f"{name:<10} {per_s:>10,.0f} events/s   commit p50 "
          f"{percentile(tick_times, 50) * 1e3:5.2f} ms p99 {percentile(tick_times, 99) * 1e3:6.2f}"
          f" ms   CPU per event: {cpus}", flush=True)


def inproc(folder: Path, seconds: float) -> None:
    async def run() -> None:
        store = SqliteStore(str(folder))
        await store.start()
        await ticks(store, [f"s{i}" for i in range(SESSIONS)], 0.5)  # warm up
        t0, c0 = time.perf_counter(), time.process_time()
        events = await ticks(store, [f"s{i}" for i in range(SESSIONS)], seconds)
        report("inproc", events, time.perf_counter() - t0, {"process": time.process_time() - c0},
               TICKS)
        await store.close()

    asyncio.run(run())


def shared(folder: Path, seconds: float, writers: int) -> None:
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(writers)]
    procs = []
    for i, (_, theirs) in enumerate(pairs):
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "writer", str(theirs.fileno()), str(i), str(writers),
             str(seconds)], pass_fds=[theirs.fileno()], stdout=subprocess.PIPE))
        theirs.close()

    async def run() -> dict[str, float]:
        store = SqliteStore(str(folder))
        await store.start()
        host = StoreHost(store)
        for ours, _ in pairs:
            await host.serve(ours)
        c0 = time.process_time()
        while host.connections:
            await asyncio.sleep(0.05)
        cpu = time.process_time() - c0
        await store.close()
        return {"sequencer": cpu}

    cpu = asyncio.run(run())
    events = 0
    elapsed = 0.0
    tick_times: list[float] = []
    for i, proc in enumerate(procs):
        out, _ = proc.communicate()
        n, took, used, times = orjson.loads(out)
        events += n
        elapsed = max(elapsed, took)
        cpu[f"writer{i}"] = used
        tick_times += times
    report(f"shared {writers}", events, elapsed, cpu, tick_times)


def writer(fd: int, index: int, writers: int, seconds: float) -> None:
    async def run() -> None:
        store = SharedStore(socket.socket(fileno=fd))
        await store.start()
        mine = [f"s{i}" for i in range(SESSIONS) if i % writers == index]
        await ticks(store, mine, 0.5)
        t0, c0 = time.perf_counter(), time.process_time()
        events = await ticks(store, mine, seconds)
        took, used = time.perf_counter() - t0, time.process_time() - c0
        await store.close()
        sys.stdout.write(orjson.dumps([events, took, used, TICKS]).decode())

    asyncio.run(run())


_FILE_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (id INTEGER PRIMARY KEY, last_seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    sid INTEGER NOT NULL, seq INTEGER NOT NULL, type TEXT NOT NULL, stream TEXT,
    data BLOB NOT NULL, sub TEXT NOT NULL, client TEXT NOT NULL, kind TEXT NOT NULL,
    time INTEGER NOT NULL, PRIMARY KEY (sid, seq));
"""


def file_writer(path: str, index: int, writers: int, seconds: float) -> None:
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    mine = [i for i in range(SESSIONS) if i % writers == index]
    blob = orjson.dumps(DATA)
    events = 0
    t0, c0 = time.perf_counter(), time.process_time()
    deadline = t0 + seconds
    times: list[float] = []
    while (start := time.perf_counter()) < deadline:
        now = int(time.time() * 1000)
        conn.execute("BEGIN IMMEDIATE")  # waits for the other writers: SQLite's busy handler
        marks = ",".join("?" * len(mine))
        heads = dict(conn.execute(f"SELECT id, last_seq FROM sessions WHERE id IN ({marks})",
                                  mine).fetchall())
        rows = [(sid, heads[sid] + 1, "stream.append", "m1", blob, "bench", "c-1", "agent", now)
                for sid in mine]
        conn.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        conn.executemany("UPDATE sessions SET last_seq = ? WHERE id = ?",
                         [(heads[sid] + 1, sid) for sid in mine])
        conn.execute("COMMIT")
        times.append(time.perf_counter() - start)
        events += len(rows)
    sys.stdout.write(orjson.dumps([events, time.perf_counter() - t0,
                                   time.process_time() - c0, times]).decode())


def shared_file(folder: Path, seconds: float, writers: int) -> None:
    path = folder / "file.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(_FILE_SCHEMA)
    conn.executemany("INSERT INTO sessions VALUES (?, 0)", [(i,) for i in range(SESSIONS)])
    conn.close()
    procs = [subprocess.Popen([sys.executable, __file__, "file-writer", str(path), str(i),
                               str(writers), str(seconds)], stdout=subprocess.PIPE)
             for i in range(writers)]
    events, elapsed, cpu, tick_times = 0, 0.0, {}, []
    for i, proc in enumerate(procs):
        out, _ = proc.communicate()
        n, took, used, times = orjson.loads(out)
        events += n
        elapsed = max(elapsed, took)
        cpu[f"writer{i}"] = used
        tick_times += times
    report(f"file {writers}", events, elapsed, cpu, tick_times)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "writer":
        writer(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "file-writer":
        file_writer(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
        return
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=3.0)
    args = p.parse_args()
    print(f"{os.cpu_count()} cores; {SESSIONS} sessions, one event each per tick", flush=True)
    runs: list[tuple[Any, ...]] = [(inproc,), (shared, 1), (shared, 2), (shared_file, 1),
                                   (shared_file, 2)]
    for run, *extra in runs:
        with tempfile.TemporaryDirectory(prefix="bench-workers-") as folder:
            run(Path(folder), args.seconds, *extra)


if __name__ == "__main__":
    main()
