"""The embedded default store: one SQLite database in WAL mode, written with group commit.

Layout: ``DIR/tether.db`` (plus SQLite's ``-wal`` and ``-shm`` files) and ``DIR/tether.lock``,
an advisory lock held while the store is open. Seqs, epochs and stream texts are cached in
process, which is only correct while this process is the database's only writer; the lock turns
a second writer into an error at ``start()`` instead of silently forked seqs.

Group commit. ``append`` queues its request and waits on a future; the first append of a loop
iteration schedules one flush with ``loop.call_soon``, so every append queued in that iteration
is committed in one transaction. Only then are the futures resolved and the events handed to
listeners, so nobody ever sees a seq that is not on disk. SQLite runs on the event-loop thread:
in WAL mode with ``synchronous=NORMAL`` a commit is a few ``write()`` calls into the page cache,
cheaper than handing the work to a thread and back. Checkpoints, which copy the WAL into the
database and fsync, are the exception: a thread runs them on a second connection.

WAL restarts. SQLite writes the WAL from its start again (instead of growing it) only when a
write transaction begins on a WAL that is fully copied into the database; under a steady stream
of commits a checkpoint on another connection never ends in that state, since commits land while
it copies. The WAL then grew until the ``wal_autocheckpoint`` backstop ran on the loop's thread,
and the first commit after each restart also truncated the grown file (with ``discard`` mounts
a synchronous discard) and fsynced the new WAL header behind megabytes of dirty pages: commits of
5-90 ms once a second at 10k events/s. So the thread repeats its passes until one leaves only a
few frames behind, and the writer copies those few itself, just before its next transaction,
which then restarts the WAL: about a millisecond once per checkpoint instead.

Durability. With ``synchronous=NORMAL`` (the default) a commit appends to the WAL without
fsync: a committed transaction survives the process being killed (SIGKILL, OOM, a crash), since
the kernel already holds the data, but a power loss or kernel panic can lose the transactions
committed since the last checkpoint. The database itself is never corrupted either way.
``SqliteStore(..., synchronous="FULL")`` fsyncs the WAL on every commit; group commit then
amortises one fsync over a whole batch, but expect a few hundred to a few thousand batches per
second depending on the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, cast

import orjson

from tether.protocol.cursor import new_epoch
from tether.protocol.encoded import FrameBuilder
from tether.protocol.events import (
    MAX_DELIVERABLE_DEPTH,
    STREAM_APPEND,
    STREAM_END,
    Event,
    Sender,
)
from tether.store.base import (
    Appended,
    EncodedPage,
    Head,
    InProcessFanout,
    InProcessPresence,
    Retention,
    Store,
    StoreError,
    StreamText,
    now_ms,
)
from tether.store.readable import _nested, decode_rows, reference_frame

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows has no flock; run one process per folder there
    fcntl = None  # type: ignore[assignment]

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id INTEGER PRIMARY KEY,
    session TEXT NOT NULL UNIQUE,
    epoch TEXT NOT NULL,
    last_seq INTEGER NOT NULL,
    first_seq INTEGER NOT NULL
);
-- A rowid table with the (sid, seq) key as its index measured faster than WITHOUT ROWID when
-- many sessions append at once: each commit touches one leaf per session, and the index's
-- leaves are small while the rows themselves land on the table's last page.
CREATE TABLE IF NOT EXISTS events (
    sid INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    stream TEXT,
    data BLOB NOT NULL,
    sub TEXT NOT NULL,
    client TEXT NOT NULL,
    kind TEXT NOT NULL,
    time INTEGER NOT NULL,
    PRIMARY KEY (sid, seq)
);
-- Where each token stream begins. Every new stream id is a cache miss that must prove the
-- stream has no events yet, and a stream reloaded after a restart is read from its first seq.
-- One row per stream, written with its first event: an index of events by stream measured
-- 1.5-1.8x the cost of the whole insert of a delta, since each delta added an entry.
CREATE TABLE IF NOT EXISTS streams (
    sid INTEGER NOT NULL,
    stream TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    PRIMARY KEY (sid, stream)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS idempotency (
    sid INTEGER NOT NULL,
    sub TEXT NOT NULL,
    key TEXT NOT NULL,
    seq INTEGER NOT NULL,
    time INTEGER NOT NULL,
    PRIMARY KEY (sid, sub, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idempotency_time ON idempotency (time);
"""
# Version 1 indexed every stream event instead of keeping the streams table. Run inside the
# schema's transaction; a no-op on a new database.
_MIGRATE_FROM_1 = """
INSERT OR IGNORE INTO streams (sid, stream, first_seq)
    SELECT sid, stream, min(seq) FROM events WHERE stream IS NOT NULL GROUP BY sid, stream;
DROP INDEX IF EXISTS events_stream;
"""
_INSERT_STREAM = "INSERT OR IGNORE INTO streams (sid, stream, first_seq) VALUES (?, ?, ?)"
# The streams of a session whose first event is gone, deleted with the events. A stream still
# open across that point and then reloaded (after a restart or eviction) goes on from the text
# appended after the reload, as its earlier deltas are no longer in the log anyway.
_DELETE_STREAMS = "DELETE FROM streams WHERE sid = ? AND first_seq < ?"

_INSERT_EVENT = (
    "INSERT INTO events (sid, seq, type, stream, data, sub, client, kind, time)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_KEY = "INSERT OR REPLACE INTO idempotency (sid, sub, key, seq, time) VALUES (?, ?, ?, ?, ?)"
# Keys of a batch are looked up in one statement per _KEY_CHUNK keys: per key, the Python call
# overhead of a query cost more than the lookup itself. CROSS JOIN keeps the key list as the
# outer loop, so each key is a primary-key probe.
_KEY_CHUNK = 256


@functools.cache
def _find_keys_sql(count: int) -> str:
    values = ", ".join(["(?, ?, ?)"] * count)
    return (
        f"WITH wanted (sid, sub, key) AS (VALUES {values})"
        " SELECT k.sid, k.sub, k.key, k.seq, k.time, e.type, e.data, e.sub, e.client, e.kind,"
        " e.time FROM wanted CROSS JOIN idempotency k"
        " ON k.sid = wanted.sid AND k.sub = wanted.sub AND k.key = wanted.key"
        " LEFT JOIN events e ON e.sid = k.sid AND e.seq = k.seq"
    )


_READ = (
    "SELECT seq, type, data, sub, client, kind, time FROM events"
    " WHERE sid = ? AND seq > ? ORDER BY seq LIMIT ?"
)
# The same page for catch-up frames (read_encoded). The type and sender come as one string, a
# JSON array of the four: a page holds few distinct ones, so each row costs one str and one
# dict lookup instead of four columns (measured: a fifth less time in fetchall). json_valid
# tells the rows whose data can go out as stored from those (damaged on disk) that take the
# reference path to their placeholder.
_READ_ENCODED = (
    "SELECT seq, json_array(type, sub, client, kind), data, time, json_valid(data) FROM events"
    " WHERE sid = ? AND seq > ? ORDER BY seq LIMIT ?"
)


def _json_functions() -> bool:
    """Whether this SQLite has the JSON functions _READ_ENCODED uses (built in since 3.38,
    optional before)."""
    try:
        with contextlib.closing(sqlite3.connect(":memory:")) as conn:
            conn.execute("SELECT json_array('a'), json_valid('1')").fetchone()
    except sqlite3.Error:
        return False
    return True


_JSON_FUNCTIONS = _json_functions()
# Stored data this short cannot nest deeper than any frame holds (readable._nested's own
# first test, without the call).
_SHALLOW = 2 * MAX_DELIVERABLE_DEPTH
_UPDATE_SESSION = "UPDATE sessions SET last_seq = ?, first_seq = ? WHERE id = ?"
# sessions.last_seq is only written when events are trimmed (the one time the log cannot say
# its own last seq); an append batch would otherwise pay one UPDATE per session it touches.
_LOAD_HEAD = (
    "SELECT s.id, s.epoch, s.last_seq, s.first_seq,"
    " (SELECT MAX(e.seq) FROM events e WHERE e.sid = s.id) FROM sessions s WHERE s.session = ?"
)

# Outside a flush the cached heads and the tables agree, so the sessions with something to trim
# can be found in one statement instead of one round of queries per session.
_TRIM_CANDIDATES = """
SELECT session FROM (
    SELECT s.session, s.first_seq,
        (SELECT MAX(e.seq) FROM events e WHERE e.sid = s.id) AS last_seq,
        (SELECT e.time FROM events e WHERE e.sid = s.id ORDER BY e.seq LIMIT 1) AS oldest
    FROM sessions s
) WHERE oldest < ? OR last_seq - first_seq + 1 > ?
"""

_STREAM_TYPES = frozenset({STREAM_APPEND, STREAM_END})

# Deleting the oldest events one by one as new ones arrive would double the write work, so an
# append only trims a session once it is this far over ``max_events``; trim() is exact.
_COUNT_SLACK_MAX = 1024
# Rows deleted per transaction by trim(), so a large backlog does not stall the loop.
_TRIM_CHUNK = 10_000
# Checkpointing copies the WAL into the database and fsyncs both files, even with
# synchronous=NORMAL; on the loop it took a fifth of append time, so a thread does it (sqlite3
# releases the GIL while it works). It is asked to run after about this many WAL pages.
_CHECKPOINT_PAGES = 2000
_BACKSTOP_PAGES = 20_000
# The checkpointer's passes go on while each one still had more than this many frames to copy
# (a pass copies what the WAL held when it began), at most _CHECKPOINT_PASSES times.
_FEW_FRAMES = 16
_CHECKPOINT_PASSES = 6
# Heads are reloadable at the cost of one query, so the cache is bounded, oldest first.
_MAX_CACHED_HEADS = 100_000

_Request = tuple[str, str, Any, Sender, str | None, asyncio.Future[Appended]]


class _Answer:
    """What ``_flush`` needs of a future, calling a function instead (``append_callback``)."""

    __slots__ = ("callback",)

    def __init__(self, callback: Callable[[Appended | Exception], None]) -> None:
        self.callback = callback

    def done(self) -> bool:
        return False

    def set_result(self, result: Appended) -> None:
        self.callback(result)

    def set_exception(self, exc: Exception) -> None:
        self.callback(exc)


class _Head:
    __slots__ = ("epoch", "first_seq", "id", "last_seq")

    def __init__(self, id: int, epoch: str, last_seq: int, first_seq: int) -> None:
        self.id = id
        self.epoch = epoch
        self.last_seq = last_seq
        self.first_seq = first_seq


class _Checkpointer(threading.Thread):
    """Runs passive checkpoints on its own connection when the store asks for one."""

    def __init__(self, database: Path) -> None:
        super().__init__(name="tether-sqlite-checkpoint", daemon=True)
        # Created here so open errors surface in start(); used only by the thread from now on.
        self._conn = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
        self._wake = threading.Event()
        self._stopping = False
        # Set when a round of passes left only a few frames; the writer copies those (finish()).
        self.caught_up = False

    def request(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self.join()

    def run(self) -> None:
        try:
            while True:
                self._wake.wait()
                self._wake.clear()
                if self._stopping:
                    return
                # A failure is not fatal: the WAL keeps the data, and the store's own
                # wal_autocheckpoint backstop takes over if this thread never succeeds.
                with contextlib.suppress(sqlite3.Error):
                    self._catch_up()
        finally:
            self._conn.close()

    def _catch_up(self) -> None:
        previous: int | None = None
        for _ in range(_CHECKPOINT_PASSES):
            busy, frames, _copied = self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if busy or frames < 0:
                return
            if previous is not None and frames - previous <= _FEW_FRAMES:
                break
            previous = frames
        self.caught_up = True

    @staticmethod
    def finish(conn: sqlite3.Connection) -> None:
        """Copy the frames the thread's passes left, on the writer's connection between two
        transactions, so that the next one begins on a fully copied WAL and restarts it."""
        with contextlib.suppress(sqlite3.Error):
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


class SqliteStore(InProcessFanout, InProcessPresence):
    """The embedded default store: one SQLite database, group commit (module docstring).

    Live fan-out and presence stay in this process: one writer serves one node.
    """

    live_is_lossy = False  # listeners are called in process, right after commit

    def __init__(self, path: str, retention: Retention | None = None, *,
                 on_batch: Callable[[int], None] | None = None,
                 synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
                 busy_timeout: float = 5.0,
                 cache_mib: int = 64, max_batch: int | None = None) -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError("synchronous must be 'NORMAL' or 'FULL'")
        self.path = Path(path)
        self.retention = retention or Retention()
        self._on_batch = on_batch
        # None: one transaction for everything queued in a loop iteration. The store host of
        # --workers sets a bound, so its workers get answers while it commits the rest.
        self._max_batch = max_batch
        self._synchronous = synchronous
        self._busy_timeout = busy_timeout
        self._cache_mib = cache_mib
        self._conn: sqlite3.Connection | None = None
        self._checkpointer: _Checkpointer | None = None
        self._wal_pages = 0  # an estimate: a leaf per session and per key, plus the new rows
        self._lock_file: IO[bytes] | None = None
        self._heads: dict[str, _Head] = {}
        self._pending: list[_Request] = []
        self._flush_handle: asyncio.Handle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        InProcessFanout.__init__(self)
        InProcessPresence.__init__(self)
        self._streams = StreamText(self._load_stream)
        # Streams the loader found no row for: their first committed event writes the row.
        self._new_streams: set[tuple[str, str]] = set()
        self._count_slack = max(1, min(_COUNT_SLACK_MAX, self.retention.max_events // 8))

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self._conn is not None:
            return
        conn: sqlite3.Connection | None = None
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock_file = self._acquire_lock()
            conn = sqlite3.connect(self.path / "tether.db", isolation_level=None)
            self._configure(conn)
            checkpointer = _Checkpointer(self.path / "tether.db")
        except (OSError, sqlite3.Error, StoreError) as exc:
            if conn is not None:
                conn.close()
            self._release_lock()
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"cannot open sqlite store in {self.path}: {exc}") from exc
        checkpointer.start()
        self._checkpointer = checkpointer
        self._wal_pages = 0
        self._conn = conn

    def _acquire_lock(self) -> IO[bytes] | None:
        if fcntl is None:  # pragma: no cover
            return None
        lock_file = open(self.path / "tether.lock", "ab")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            lock_file.close()
            raise StoreError(f"{self.path} is in use by another tether store") from exc
        return lock_file

    def _release_lock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing the descriptor releases the flock
            self._lock_file = None

    def _configure(self, conn: sqlite3.Connection) -> None:
        conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"{self.path}: the filesystem does not support SQLite WAL mode")
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        conn.execute(f"PRAGMA cache_size = {-1024 * self._cache_mib}")
        conn.execute("PRAGMA temp_store = MEMORY")
        # The checkpointer thread keeps the WAL short; this is only the backstop if it stalls.
        conn.execute(f"PRAGMA wal_autocheckpoint = {_BACKSTOP_PAGES}")
        conn.execute(f"PRAGMA journal_size_limit = {64 << 20}")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path}/tether.db has schema version {version}; this tether "
                             f"only knows {SCHEMA_VERSION}: upgrade tether")
        if version < SCHEMA_VERSION:
            try:
                conn.executescript(
                    f"BEGIN IMMEDIATE;\n{_SCHEMA}\n{_MIGRATE_FROM_1}\n"
                    f"PRAGMA user_version = {SCHEMA_VERSION};\nCOMMIT;"
                )
            except sqlite3.Error:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    async def close(self) -> None:
        if self._conn is None:
            return
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        while self._pending:
            self._flush()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        conn, self._conn = self._conn, None
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
        self._heads.clear()
        self._streams.forget()
        self._new_streams.clear()
        with contextlib.suppress(sqlite3.Error):
            conn.close()
        self._release_lock()

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError("sqlite store is not open")
        return self._conn

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite {what} failed: {exc}") from exc

    # -- heads -------------------------------------------------------------------------------

    def _find_head(self, session: str) -> _Head | None:
        head = self._heads.get(session)
        if head is None:
            row = self._db().execute(_LOAD_HEAD, (session,)).fetchone()
            if row is not None:
                sid, epoch, last_seq, first_seq, max_seq = row
                head = self._heads[session] = _Head(sid, epoch, max(last_seq, max_seq or 0),
                                                    first_seq)
        return head

    def _create_head(self, session: str) -> _Head:
        epoch = new_epoch(session)
        cursor = self._db().execute(
            "INSERT INTO sessions (session, epoch, last_seq, first_seq) VALUES (?, ?, 0, 1)",
            (session, epoch),
        )
        assert cursor.lastrowid is not None
        head = self._heads[session] = _Head(cursor.lastrowid, epoch, 0, 1)
        return head

    def _evict_heads(self) -> None:
        excess = len(self._heads) - _MAX_CACHED_HEADS
        if excess > 0:
            for session in list(itertools.islice(self._heads, excess)):
                del self._heads[session]

    async def head(self, session: str) -> Head:
        with self._errors("head"):
            # Outside a flush the connection is in autocommit mode, so a new session's epoch is
            # on disk before anyone can build a cursor with it.
            head = self._find_head(session) or self._create_head(session)
        return Head(head.epoch, head.last_seq, head.first_seq)

    # -- appends -----------------------------------------------------------------------------

    async def append(self, session: str, type: str, data: Any, sender: Sender,
                     key: str | None = None) -> Appended:
        return await self.append_future(session, type, data, sender, key)

    def append_future(self, session: str, type: str, data: Any, sender: Sender,
                      key: str | None = None) -> asyncio.Future[Appended]:
        """Queue an append for this tick's group commit; the future resolves at commit.

        The server's publish path uses this with a done-callback instead of a task per
        publish.
        """
        if self._conn is None:
            raise StoreError("sqlite store is not open")
        loop = self._loop
        if self._flush_handle is None or loop is None:
            # get_running_loop() costs a getpid() syscall; once per batch is enough, since
            # every append of a batch runs on the loop that runs its flush.
            loop = self._loop = asyncio.get_running_loop()
            self._flush_handle = loop.call_soon(self._flush)
        future: asyncio.Future[Appended] = loop.create_future()
        self._pending.append((session, type, data, sender, key, future))
        return future

    def append_callback(self, session: str, type: str, data: Any, sender: Sender,
                        key: str | None, callback: Callable[[Appended | Exception], None]
                        ) -> None:
        """``append_future`` that calls ``callback`` at commit, with the result or the error.

        For the store host of ``tether serve --workers`` (``tether/store/shared.py``), which
        answers thousands of appends a second for other processes: no future and no loop
        callback per append. ``callback`` must not raise.
        """
        if self._conn is None:
            raise StoreError("sqlite store is not open")
        if self._flush_handle is None or self._loop is None:
            loop = self._loop = asyncio.get_running_loop()
            self._flush_handle = loop.call_soon(self._flush)
        answer = cast("asyncio.Future[Appended]", _Answer(callback))  # the slots _flush uses
        self._pending.append((session, type, data, sender, key, answer))

    def _flush(self) -> None:
        """Commit the queued appends (at most ``max_batch``), answer and notify; a rest is
        committed in the next loop iteration, after what this one answered was sent."""
        self._flush_handle = None
        pending, limit = self._pending, self._max_batch
        if limit is not None and len(pending) > limit:
            batch, self._pending = pending[:limit], pending[limit:]
        else:
            batch, self._pending = pending, []
        if batch:
            self._commit(batch)
        if self._pending and self._flush_handle is None and self._loop is not None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _commit(self, batch: list[_Request]) -> None:
        """Commit ``batch`` in one transaction, then answer and notify."""
        if self._on_batch is not None:
            try:
                self._on_batch(len(batch))
            except Exception as exc:
                self._report("on_batch callback failed", exc)
        conn = self._conn
        if conn is None:
            self._reject(batch, "sqlite store is closed")
            return
        streams = self._streams
        heads = self._heads
        dumps = orjson.dumps
        now = now_ms()
        window_ms = int(self.retention.idempotency_window * 1000)
        checkpointer = self._checkpointer
        if checkpointer is not None and checkpointer.caught_up:
            checkpointer.caught_up = False
            checkpointer.finish(conn)
        rows: list[tuple[Any, ...]] = []
        key_rows: list[tuple[int, str, str, int, int]] = []
        stream_rows: list[tuple[int, str, int]] = []
        new_streams = self._new_streams
        answers: list[tuple[asyncio.Future[Appended], Appended | BaseException]] = []
        committed: list[Event] = []
        touched: dict[int, _Head] = {}
        keyed: dict[tuple[str, str, str], Event] = {}
        batch_heads: list[_Head] = []
        wanted: dict[tuple[int, str, str], None] = {}
        try:
            conn.execute("BEGIN")
            for session, _, _, sender, key, _ in batch:
                head = heads.get(session)
                if head is None:
                    head = self._find_head(session) or self._create_head(session)
                batch_heads.append(head)
                touched[head.id] = head
                if key is not None:
                    wanted[(head.id, sender.sub, key)] = None
            known = self._find_keys(list(wanted), now - window_ms) if wanted else {}
            for (session, type_, data, sender, key, future), head in zip(
                batch, batch_heads, strict=True
            ):
                if key is not None:
                    original = keyed.get((session, sender.sub, key))
                    if original is None:
                        row = known.get((head.id, sender.sub, key))
                        if row is not None:
                            original = self._original(session, head, row, type_, data, sender)
                    if original is not None:
                        answers.append((future, Appended(original, True)))
                        continue
                stream: str | None = None
                try:
                    if type_ in _STREAM_TYPES:
                        data = streams.prepare(session, type_, data)
                        stream = data["stream"]
                    blob = dumps(data)
                except sqlite3.Error:
                    raise  # the stream loader could not read the log: fail the whole batch
                except Exception as exc:
                    # A closed stream or unencodable data fails this append, not its batch.
                    answers.append((future, exc))
                    continue
                seq = head.last_seq = head.last_seq + 1
                if stream is not None:
                    # Applied before commit so a later event of this batch on the same stream
                    # sees this one; a failed commit forgets it all and reloads from disk.
                    streams.committed(session, type_, data)
                    if new_streams and (session, stream) in new_streams:
                        new_streams.discard((session, stream))
                        stream_rows.append((head.id, stream, seq))
                rows.append((head.id, seq, type_, stream, blob,
                             sender.sub, sender.client, sender.kind, now))
                event = Event(session, head.epoch, seq, type_, data, sender, now)
                if key is not None:
                    keyed[(session, sender.sub, key)] = event
                    key_rows.append((head.id, sender.sub, key, seq, now))
                answers.append((future, Appended(event, False)))  # positional: half the cost
                committed.append(event)
            if rows:
                conn.executemany(_INSERT_EVENT, rows)
                if key_rows:
                    conn.executemany(_INSERT_KEY, key_rows)
                if stream_rows:
                    conn.executemany(_INSERT_STREAM, stream_rows)
                self._enforce_count(conn, touched.values())
            conn.execute("COMMIT")
        except Exception as exc:
            self._rollback(conn)
            self._reject(batch, f"sqlite commit of {len(batch)} events failed: {exc}", exc)
            return
        self._wal_pages += len(touched) + len(key_rows) + len(rows) // 16
        if self._wal_pages >= _CHECKPOINT_PAGES and self._checkpointer is not None:
            self._wal_pages = 0
            self._checkpointer.request()
        for future, answer in answers:
            if future.done():  # the appender was cancelled; the event is committed regardless
                continue
            if isinstance(answer, Appended):
                future.set_result(answer)
            else:
                future.set_exception(answer)
        dispatch = self._listeners.dispatch
        for event in committed:
            try:
                dispatch(event)
            except Exception as exc:
                self._report(f"listener of session {event.session!r} failed", exc)
        if len(heads) > _MAX_CACHED_HEADS:
            self._evict_heads()

    def _find_keys(self, wanted: list[tuple[int, str, str]], not_before: int
                   ) -> dict[tuple[int, str, str], tuple[Any, ...]]:
        """Live keys among ``wanted``: (seq, key time, and the event's columns or NULLs)."""
        conn = self._db()
        found: dict[tuple[int, str, str], tuple[Any, ...]] = {}
        for start in range(0, len(wanted), _KEY_CHUNK):
            chunk = wanted[start:start + _KEY_CHUNK]
            # Padding to a power of two keeps the statement cache at nine entries.
            size = 1 << (len(chunk) - 1).bit_length()
            chunk += [chunk[-1]] * (size - len(chunk))
            params = [value for wanted_key in chunk for value in wanted_key]
            for row in conn.execute(_find_keys_sql(size), params):
                if row[4] >= not_before:
                    found[row[:3]] = row[3:]
        return found

    @staticmethod
    def _original(session: str, head: _Head, row: tuple[Any, ...], type_: str, data: Any,
                  sender: Sender) -> Event:
        seq, key_time, e_type, e_data, sub, client, kind, e_time = row
        if e_type is None:
            # The original was trimmed while its key is still inside the window. Appending
            # again would break the promise of idempotency; answer with the original seq and
            # the retry's own payload, which the key says is the same request.
            return Event(session, head.epoch, seq, type_, data, sender, key_time)
        return Event(session, head.epoch, seq, e_type, orjson.loads(e_data),
                     Sender(sub, client, kind), e_time)

    def _enforce_count(self, conn: sqlite3.Connection, heads: Iterable[_Head]) -> None:
        max_events = self.retention.max_events
        limit = max_events + self._count_slack
        for head in heads:
            if head.last_seq - head.first_seq + 1 > limit:
                first = head.last_seq - max_events + 1
                conn.execute("DELETE FROM events WHERE sid = ? AND seq < ?", (head.id, first))
                conn.execute(_DELETE_STREAMS, (head.id, first))
                conn.execute(_UPDATE_SESSION, (head.last_seq, first, head.id))
                head.first_seq = first

    def _rollback(self, conn: sqlite3.Connection) -> None:
        with contextlib.suppress(sqlite3.Error):
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        # Seqs, first seqs and stream texts were advanced for the failed batch; reload them.
        self._heads.clear()
        self._streams.forget()
        self._new_streams.clear()

    @staticmethod
    def _reject(batch: list[_Request], message: str, cause: BaseException | None = None) -> None:
        for request in batch:
            future = request[5]
            if not future.done():
                # One instance per waiter: a shared exception would collect every waiter's
                # traceback as each of them re-raises it.
                error = StoreError(message)
                error.__cause__ = cause
                future.set_exception(error)

    @staticmethod
    def _report(message: str, exc: BaseException) -> None:
        asyncio.get_running_loop().call_exception_handler(
            {"message": f"sqlite store: {message}", "exception": exc}
        )

    def _load_stream(self, session: str, stream: str) -> tuple[list[str], bool]:
        head = self._find_head(session)
        row = None if head is None else self._db().execute(
            "SELECT first_seq FROM streams WHERE sid = ? AND stream = ?", (head.id, stream)
        ).fetchone()
        if head is None or row is None:
            self._new_streams.add((session, stream))
            return [], False
        texts: list[str] = []
        for type_, blob in self._db().execute(
            "SELECT type, data FROM events WHERE sid = ? AND seq >= ? AND stream = ?"
            " ORDER BY seq", (head.id, row[0], stream),
        ):
            if type_ == STREAM_END:
                return texts, True
            texts.append(orjson.loads(blob)["text"])
        return texts, False

    # -- reads -------------------------------------------------------------------------------

    async def read(self, session: str, after: int, limit: int) -> list[Event]:
        if limit <= 0:
            return []
        with self._errors("read"):
            head = self._find_head(session)
            if head is None:
                return []
            rows = self._db().execute(_READ, (head.id, after, limit)).fetchall()
        return decode_rows(session, head.epoch, rows)

    async def read_encoded(self, session: str, after: int, limit: int, fmt: str
                           ) -> EncodedPage:
        """``read`` as catch-up frames of ``fmt``, joined from the stored bytes.

        A row's data is the text ``orjson.dumps`` made at commit, which is the frame's
        ``"data"`` byte for byte (tether/protocol/encoded.py), so a row that is valid JSON,
        valid UTF-8 and not nested deep enough to need the depth check goes out without being
        decoded. Any other row is decoded and encoded by the reference path, which gives its
        ``tether.unreadable`` placeholder where ``read`` would. (Valid JSON that this store did
        not write, spaced differently, say, goes out as stored: the same value, other bytes.)
        """
        if not _JSON_FUNCTIONS:
            return [(event.seq, reference_frame(fmt, event))
                    for event in await self.read(session, after, limit)]
        if limit <= 0:
            return []
        with self._errors("read"):
            head = self._find_head(session)
            if head is None:
                return []
            rows = self._db().execute(_READ_ENCODED, (head.id, after, limit)).fetchall()
        epoch = head.epoch
        builder = FrameBuilder(session, epoch, fmt)
        join = builder.join
        # json_array's text of (type, sub, client, kind) → their JSON as the frame has it.
        # Only a key: the frame's JSON is orjson's, never SQLite's escaping.
        known: dict[str, tuple[bytes, bytes]] = {}
        page: EncodedPage = []
        append = page.append
        for seq, key, data, time, valid in rows:
            parts = known.get(key)
            if parts is None:
                parts = known[key] = builder.parts(*orjson.loads(key))
            if valid and type(data) is bytes and (len(data) <= _SHALLOW or not _nested(data)):
                if data.isascii():
                    append((seq, join(seq, parts[0], data, parts[1], time)))
                    continue
                try:
                    data.decode()
                except UnicodeDecodeError:
                    pass
                else:
                    append((seq, join(seq, parts[0], data, parts[1], time)))
                    continue
            type_, sub, client, kind = orjson.loads(key)
            (event,) = decode_rows(session, epoch, [(seq, type_, data, sub, client, kind, time)])
            append((seq, reference_frame(fmt, event)))
        return page

    # -- retention ---------------------------------------------------------------------------

    async def trim(self) -> int:
        now = now_ms()
        age_cutoff = now - int(self.retention.max_age * 1000)
        key_cutoff = now - int(self.retention.idempotency_window * 1000)
        with self._errors("trim"):
            sessions = [row[0] for row in self._db().execute(
                _TRIM_CANDIDATES, (age_cutoff, self.retention.max_events))]
        removed = 0
        for i, session in enumerate(sessions):
            removed += await self._trim_session(session, age_cutoff)
            if i % 64 == 63:
                await asyncio.sleep(0)
        with self._errors("trim"):
            self._db().execute("DELETE FROM idempotency WHERE time < ?", (key_cutoff,))
        return removed

    async def _trim_session(self, session: str, age_cutoff: int) -> int:
        removed = 0
        while True:
            with self._errors("trim"):
                head = self._find_head(session)
                if head is None:
                    return removed
                conn = self._db()
                first = max(head.first_seq, head.last_seq - self.retention.max_events + 1)
                # Delete a prefix up to the first young event rather than every old event, so
                # the log stays gapless from first_seq even if the clock once stepped back.
                row = conn.execute(
                    "SELECT seq FROM events WHERE sid = ? AND seq >= ? AND time >= ?"
                    " ORDER BY seq LIMIT 1", (head.id, first, age_cutoff),
                ).fetchone()
                first = row[0] if row is not None else head.last_seq + 1
                if first <= head.first_seq:
                    return removed
                upto = min(first, head.first_seq + _TRIM_CHUNK)
                try:
                    conn.execute("BEGIN")
                    cursor = conn.execute("DELETE FROM events WHERE sid = ? AND seq < ?",
                                          (head.id, upto))
                    conn.execute(_DELETE_STREAMS, (head.id, upto))
                    conn.execute(_UPDATE_SESSION, (head.last_seq, upto, head.id))
                    conn.execute("COMMIT")
                except sqlite3.Error:
                    self._rollback(conn)
                    raise
            head.first_seq = upto
            removed += max(cursor.rowcount, 0)
            if upto == first:
                return removed
            await asyncio.sleep(0)


if TYPE_CHECKING:
    # mypy fails here if SqliteStore stops conforming to SessionStore or PresenceStore.
    _conforms: type[Store] = SqliteStore
