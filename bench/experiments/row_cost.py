"""Experiment: what one event's row costs SQLite, by table layout, rows per commit and page size.

The floor under tether's CPU per durable event is the relay's frames plus this row, so it is
measured on its own: ``executemany`` of token-delta rows spread over 100 sessions, as the
store commits them (WAL, ``synchronous=NORMAL``, one transaction per batch), timed with
``time.thread_time`` (CPU of this thread: the Python call, SQLite's work and the WAL writes).
Layouts:

* ``tether``: the store's ``events`` table, a rowid table with a ``(sid, seq)`` primary key;
* ``+ stream index``: the same with the index of events by stream that schema version 1 had;
* ``without rowid``: ``events`` clustered by ``(sid, seq)``;
* ``no index``: a rowid table alone (what a row costs without the index reads need).

``python bench/experiments/row_cost.py [--rows 100000] [--runs 2]``
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from bench import common as c

SESSIONS = 100
DATA = {"stream": "m1", "text": "hello world, this is one token delta of a model stream "}
_COLUMNS = """sid INTEGER NOT NULL, seq INTEGER NOT NULL, type TEXT NOT NULL, stream TEXT,
    data BLOB NOT NULL, sub TEXT NOT NULL, client TEXT NOT NULL, kind TEXT NOT NULL,
    time INTEGER NOT NULL"""
LAYOUTS = {
    "tether": f"CREATE TABLE events ({_COLUMNS}, PRIMARY KEY (sid, seq));",
    "+ stream index": f"CREATE TABLE events ({_COLUMNS}, PRIMARY KEY (sid, seq));"
                      "CREATE INDEX events_stream ON events (sid, stream, seq)"
                      " WHERE stream IS NOT NULL;",
    "without rowid": f"CREATE TABLE events ({_COLUMNS}, PRIMARY KEY (sid, seq)) WITHOUT ROWID;",
    "no index": f"CREATE TABLE events ({_COLUMNS});",
}


def measure(layout: str, per_commit: int, rows: int, page_size: int) -> float:
    """CPU µs per row of ``rows`` rows committed ``per_commit`` at a time (after a warm-up)."""
    with tempfile.TemporaryDirectory(prefix="bench-rows-") as folder:
        conn = sqlite3.connect(Path(folder) / "x.db", isolation_level=None)
        conn.execute(f"PRAGMA page_size = {page_size}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.executescript(LAYOUTS[layout])
        blob = orjson.dumps(DATA)
        seqs = [0] * SESSIONS
        n = 0
        spent = 0.0
        warm = rows // 5
        while n < warm + rows:
            batch: list[tuple[Any, ...]] = []
            for _ in range(per_commit):
                sid = n % SESSIONS
                seqs[sid] += 1
                batch.append((sid, seqs[sid], "stream.append", "m1", blob, "bench", "c-1",
                              "agent", 1_700_000_000_000 + n))
                n += 1
            begin = time.thread_time()
            conn.execute("BEGIN")
            conn.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", batch)
            conn.execute("COMMIT")
            if n > warm:
                spent += time.thread_time() - begin
        conn.close()
    return spent / rows * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000, help="measured rows per case")
    p.add_argument("--runs", type=int, default=2)
    args = p.parse_args()
    cases = [(layout, per, 4096) for layout in LAYOUTS for per in (100, 7)]
    cases += [("tether", per, size) for size in (1024, 2048, 8192) for per in (100, 7)]
    results: dict[str, list[float]] = {}
    for _ in range(args.runs):  # the cases interleaved, so drift hits all alike
        for layout, per, size in cases:
            key = f"{layout}|{per}|{size}"
            results.setdefault(key, []).append(measure(layout, per, args.rows, size))
    rows = []
    for key, values in results.items():
        layout, per, size = key.split("|")
        rows.append([layout, per, size, f"{statistics.median(values):.2f}",
                     " ".join(f"{v:.2f}" for v in values)])
    print(c.table(["layout", "rows per commit", "page size", "CPU us per row (median)",
                   "runs"], rows))
    out = {"machine": c.machine(), "config": vars(args), "us_per_row": results}
    print(f"wrote {c.write_results('row_cost', out)}")


if __name__ == "__main__":
    main()
