"""``tether doctor``: find stored events that readers would get as placeholders.

Reads the SQLite database of a data folder directly, read-only (safe while a server runs: WAL
readers do not block the writer), and reports each event whose data does not decode or cannot
be framed in every wire format — see :mod:`tether.store.readable`. Redis deployments run the
same check through any node's readers: those events show up in ``tether_unreadable_events``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from tether.store.readable import problem_with


@dataclass(frozen=True)
class Finding:
    session: str
    seq: int
    type: str
    reason: str


def scan(data_dir: Path) -> Iterator[Finding]:
    """Every undeliverable event in ``data_dir/tether.db``, in (session, seq) order."""
    database = data_dir / "tether.db"
    if not database.exists():
        raise FileNotFoundError(f"no tether database in {data_dir} (looked for {database})")
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT s.session, e.seq, e.type, e.data FROM events e"
            " JOIN sessions s ON s.id = e.sid ORDER BY s.session, e.seq")
        for session, seq, type_, raw in rows:
            try:
                data = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                yield Finding(session, seq, type_, f"stored data does not decode: {exc}")
                continue
            problem = problem_with(data)
            if problem is not None:
                yield Finding(session, seq, type_, problem)
    finally:
        conn.close()
