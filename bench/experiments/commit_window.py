"""Experiment: group commit with a window when busy, at once when isolated.

Today the SQLite store commits everything queued in one loop iteration from a ``call_soon``:
an isolated publish is committed in the next iteration, and at 10,000 paced events/s a batch
holds only the few publishes of one iteration, each transaction costing its fixed ~20 µs of
SQLite CPU. This wrapper makes the flush wait when the previous one was recent: an append
arriving less than ``BENCH_COMMIT_WINDOW_US`` (default 500) after the last flush is committed
at that flush's time + the window, together with whatever else arrives meanwhile; an append
after a quiet spell is still committed at once. What it buys is fewer, larger transactions
under load, for at most one window of added latency.

``BENCH_TETHER_WRAPPER=bench/experiments/commit_window.py python -m bench.latency``
(``BENCH_COMMIT_WINDOW_US=1000`` to widen it). The store is unchanged; this patches it.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from tether.store import sqlite as store_sqlite
from tether.store.base import StoreError

WINDOW = float(os.environ.get("BENCH_COMMIT_WINDOW_US", "500")) / 1e6

_original_flush = store_sqlite.SqliteStore._flush


def _append_future(self: Any, session: str, type: str, data: Any, sender: Any,
                   key: str | None = None) -> asyncio.Future[Any]:
    if self._conn is None:
        raise StoreError("sqlite store is not open")
    loop = self._loop
    if self._flush_handle is None or loop is None:
        loop = self._loop = asyncio.get_running_loop()
        last = getattr(self, "_last_flush", -1.0)
        now = loop.time()
        if now - last < WINDOW:
            self._flush_handle = loop.call_at(last + WINDOW, self._flush)  # busy: gather
        else:
            self._flush_handle = loop.call_soon(self._flush)  # isolated: at once
    future: asyncio.Future[Any] = loop.create_future()
    self._pending.append((session, type, data, sender, key, future))
    return future


def _flush(self: Any) -> None:
    if self._loop is not None:
        self._last_flush = self._loop.time()
    _original_flush(self)


def install() -> None:
    store_sqlite.SqliteStore.append_future = _append_future  # type: ignore[method-assign]
    store_sqlite.SqliteStore._flush = _flush  # type: ignore[method-assign]


if __name__ == "__main__":
    install()
    from tether.cli import main

    sys.exit(main(sys.argv[1:]))
