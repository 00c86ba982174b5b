"""``tether serve`` with SQLite's ``synchronous=FULL``: every commit (a whole group-commit
batch) fsyncs the WAL, as the reference server's file-backed store fdatasyncs every append.

Used by ``bench/durable_streams.py`` for its ``tether-sqlite-fsync`` row; tether itself is not
changed (``SqliteStore(..., synchronous="FULL")`` is its own option, not yet a store URL one).
"""

from __future__ import annotations

import functools
import sys

from tether.store import sqlite

sqlite.SqliteStore.__init__ = functools.partialmethod(  # type: ignore[method-assign]
    sqlite.SqliteStore.__init__, synchronous="FULL")

if __name__ == "__main__":
    from tether.cli import main

    sys.exit(main(sys.argv[1:]))
