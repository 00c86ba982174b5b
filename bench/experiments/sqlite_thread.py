"""Experiment: the SQLite commit off the event loop's thread. Does it pay?

The sqlite3 module releases the GIL while SQLite steps, so a commit on a thread of its own can
overlap the loop's Python work — if there is a second core to run it on. Two ways to measure:

1. ``python bench/experiments/sqlite_thread.py`` (micro): the loop thread's CPU per committed
   batch of 1, 10 and 100 rows of tether's ``events`` schema, committed on the loop (today)
   or handed to a writer thread (``run_in_executor``, the result back through the loop), on
   one core and on two (``os.sched_setaffinity``). What the loop saves is what the thread
   does; what it pays is the handoff.
2. As a server wrapper, ``BENCH_TETHER_WRAPPER=bench/experiments/sqlite_thread.py python -m
   bench.streams`` (or ``bench.latency``): ``SqliteStore`` commits on a writer thread with its
   own connection, one batch in flight; appends queue meanwhile and go in the next batch (so
   an isolated publish is committed at once, and a busy store batches by itself). The
   benchmarks pin the server to one core: add ``BENCH_SERVER_CORE=0,1`` to give it both.

Only what the benchmarks exercise is rerouted (appends without idempotency keys); keyed
batches and trimming keep the store's own path. Not for production: heads are created on the
loop's connection while the writer may hold the write lock.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

import orjson

from tether.protocol.events import Event
from tether.store import sqlite as store_sqlite
from tether.store.base import Appended, StoreError, now_ms

DATA = {"stream": "m1", "text": "hello world, this is one token delta of a model stream "}


# --- 1. micro ------------------------------------------------------------------------------

def _database(folder: str) -> Path:
    path = Path(folder) / "x.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(store_sqlite._SCHEMA)
    conn.close()
    return path


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


class _Rows:
    def __init__(self) -> None:
        self.seqs = [0] * 100
        self.n = 0
        self.blob = orjson.dumps(DATA)

    def batch(self, size: int) -> list[tuple[Any, ...]]:
        rows = []
        for _ in range(size):
            sid = self.n % 100
            self.n += 1
            self.seqs[sid] += 1
            rows.append((sid, self.seqs[sid], "stream.append", "m1", self.blob, "bench", "c-1",
                         "agent", 1))
        return rows


def _commit(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    conn.execute("BEGIN")
    conn.executemany(store_sqlite._INSERT_EVENT, rows)
    conn.execute("COMMIT")


async def _micro_one(size: int, offload: bool, seconds: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-sqlite-thread-") as folder:
        conn = _connect(_database(folder))
        rows = _Rows()
        loop = asyncio.get_running_loop()
        pool = concurrent.futures.ThreadPoolExecutor(1)
        batches = 0
        cpu0, all0, t0 = time.thread_time(), time.process_time(), time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            batch = rows.batch(size)
            if offload:
                await loop.run_in_executor(pool, _commit, conn, batch)
            else:
                _commit(conn, batch)
                await asyncio.sleep(0)  # one loop iteration per batch either way
            batches += 1
        loop_cpu = time.thread_time() - cpu0
        all_cpu = time.process_time() - all0
        wall = time.perf_counter() - t0
        pool.shutdown()
        conn.close()
    return {"loop_cpu_us_per_batch": loop_cpu / batches * 1e6,
            "all_cpu_us_per_batch": all_cpu / batches * 1e6,
            "wall_us_per_batch": wall / batches * 1e6}


def micro(seconds: float = 1.5) -> None:
    cores = sorted(os.sched_getaffinity(0))
    print("loop-thread CPU, all CPU and wall time per committed batch (µs); "
          "'thread' = run_in_executor on one writer thread")
    print(f"{'cores':>5} {'rows':>5} {'where':>7} {'loop CPU':>9} {'all CPU':>9} {'wall':>9}")
    for ncores in (1, 2):
        if len(cores) < ncores:
            continue
        os.sched_setaffinity(0, cores[:ncores])
        for size in (1, 10, 100):
            for offload in (False, True):
                r = asyncio.run(_micro_one(size, offload, seconds))
                print(f"{ncores:>5} {size:>5} {'thread' if offload else 'loop':>7} "
                      f"{r['loop_cpu_us_per_batch']:>9.1f} {r['all_cpu_us_per_batch']:>9.1f} "
                      f"{r['wall_us_per_batch']:>9.1f}", flush=True)
    os.sched_setaffinity(0, cores)


# --- 2. server wrapper ---------------------------------------------------------------------

_original_flush = store_sqlite.SqliteStore._flush
_original_start = store_sqlite.SqliteStore.start


async def _start(self: Any) -> None:
    await _original_start(self)
    self._writer_conn = _connect(self.path / "tether.db")
    self._writer_pool = concurrent.futures.ThreadPoolExecutor(1, "tether-sqlite-writer")
    self._writing = False


def _flush(self: Any) -> None:
    self._flush_handle = None
    if self._writing:
        return  # the commit in flight flushes what queued meanwhile when it is done
    batch = self._pending
    if not batch:
        return
    if any(request[4] is not None for request in batch):
        _original_flush(self)  # keyed appends: the store's own path
        return
    self._pending = []
    heads, streams = self._heads, self._streams
    now = now_ms()
    rows: list[tuple[Any, ...]] = []
    answers: list[tuple[asyncio.Future[Appended], Appended | BaseException]] = []
    committed: list[Event] = []
    for session, type_, data, sender, _key, future in batch:
        head = heads.get(session) or self._find_head(session) or self._create_head(session)
        stream = None
        try:
            if type_ in store_sqlite._STREAM_TYPES:
                data = streams.prepare(session, type_, data)
                stream = data["stream"]
            blob = orjson.dumps(data)
        except Exception as exc:
            answers.append((future, exc))
            continue
        seq = head.last_seq = head.last_seq + 1
        if stream is not None:
            streams.committed(session, type_, data)
        rows.append((head.id, seq, type_, stream, blob, sender.sub, sender.client, sender.kind,
                     now))
        event = Event(session, head.epoch, seq, type_, data, sender, now)
        answers.append((future, Appended(event, False)))
        committed.append(event)
    self._writing = True
    done = asyncio.get_running_loop().run_in_executor(
        self._writer_pool, _commit, self._writer_conn, rows)
    done.add_done_callback(functools.partial(_committed, self, batch, answers, committed))


def _committed(self: Any, batch: list[Any], answers: list[Any], committed: list[Event],
               done: asyncio.Future[None]) -> None:
    self._writing = False
    exc = done.exception()
    if exc is not None:
        self._rollback(self._writer_conn)
        self._reject(batch, f"sqlite commit of {len(batch)} events failed: {exc}", exc)
    else:
        for future, answer in answers:
            if future.done():
                continue
            if isinstance(answer, Appended):
                future.set_result(answer)
            else:
                future.set_exception(answer)
        dispatch = self._listeners.dispatch
        for event in committed:
            dispatch(event)
    if self._pending:
        self._flush()


def install() -> None:
    store_sqlite.SqliteStore.start = _start  # type: ignore[method-assign]
    store_sqlite.SqliteStore._flush = _flush  # type: ignore[method-assign]
    assert StoreError  # the store's own error type is what a failed batch answers


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        install()
        from tether.cli import main
        sys.exit(main(sys.argv[1:]))
    micro()
