"""Behaviour only the SQLite store has: restarts, group commit, failed commits, SIGKILL."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tests.helpers import nested
from tether.protocol.encoded import FORMATS, encode_reference
from tether.protocol.events import STREAM_APPEND, STREAM_END, UNREADABLE, Event, Sender
from tether.store import Retention, StoreError, StreamClosedError, open_store
from tether.store import sqlite as sqlite_module
from tether.store.base import EncodedReader
from tether.store.sqlite import SqliteStore

ALICE = Sender("alice", "c1", "human")


async def opened(path: Path, retention: Retention | None = None, *,
                 on_batch: Callable[[int], None] | None = None,
                 busy_timeout: float = 5.0) -> SqliteStore:
    store = SqliteStore(str(path), retention, on_batch=on_batch, busy_timeout=busy_timeout)
    await store.start()
    return store


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    store = await opened(tmp_path / "data")
    yield store
    await store.close()


def side_connection(path: Path) -> sqlite3.Connection:
    """A second connection to the store's database, as another process would have."""
    return sqlite3.connect(path / "tether.db", isolation_level=None)


async def test_open_store_url_creates_the_folder_and_database(tmp_path: Path) -> None:
    folder = tmp_path / "nested" / "data"
    store = open_store(f"sqlite://{folder}")
    assert isinstance(store, SqliteStore)
    await store.start()
    try:
        await store.append("s1", "message", "hi", ALICE)
        assert (folder / "tether.db").is_file()
    finally:
        await store.close()


async def test_reopen_keeps_epoch_events_and_idempotency_keys(tmp_path: Path) -> None:
    path = tmp_path / "data"
    store = await opened(path)
    keyed = await store.append("s1", "message", {"n": 1}, ALICE, key="k1")
    for i in range(2, 6):
        await store.append("s1", "message", {"n": i}, ALICE)
    await store.append("s2", "message", "other", ALICE)
    empty_head = await store.head("empty")
    before = await store.read("s1", 0, 100)
    head = await store.head("s1")
    await store.close()

    store = await opened(path)
    try:
        assert await store.head("s1") == head
        assert await store.head("empty") == empty_head
        assert await store.read("s1", 0, 100) == before
        again = await store.append("s1", "message", {"n": 1}, ALICE, key="k1")
        assert again.duplicate and again.event == keyed.event
        after = await store.append("s1", "message", {"n": 6}, ALICE)
        assert (after.event.seq, after.event.epoch) == (6, head.epoch)
        assert (await store.append("s2", "message", "x", ALICE)).event.seq == 2
    finally:
        await store.close()


async def test_reopen_keeps_closed_and_open_streams(tmp_path: Path) -> None:
    path = tmp_path / "data"
    store = await opened(path)
    for text in ("a", "b"):
        await store.append("s1", STREAM_APPEND, {"stream": "done", "text": text}, ALICE)
    await store.append("s1", STREAM_END, {"stream": "done"}, ALICE)
    for text in ("Hel", "lo, ", "wörld 🎉"):
        await store.append("s1", STREAM_APPEND, {"stream": "open", "text": text}, ALICE)
    await store.close()

    store = await opened(path)
    try:
        with pytest.raises(StreamClosedError):
            await store.append("s1", STREAM_APPEND, {"stream": "done", "text": "late"}, ALICE)
        with pytest.raises(StreamClosedError):
            await store.append("s1", STREAM_END, {"stream": "done"}, ALICE)
        await store.append("s1", STREAM_APPEND, {"stream": "open", "text": "!"}, ALICE)
        end = await store.append("s1", STREAM_END, {"stream": "open"}, ALICE)
        assert end.event.data["text"] == "Hello, wörld 🎉!"
        assert (await store.read("s1", end.event.seq - 1, 1))[0].data["text"] == "Hello, wörld 🎉!"
    finally:
        await store.close()


async def test_a_version_1_database_is_migrated_with_its_streams(tmp_path: Path) -> None:
    """Version 1 indexed every stream event; version 2 keeps one row per stream instead."""
    path = tmp_path / "data"
    store = await opened(path)
    await store.append("s1", STREAM_APPEND, {"stream": "done", "text": "a"}, ALICE)
    await store.append("s1", STREAM_END, {"stream": "done"}, ALICE)
    await store.append("s1", "message", "between", ALICE)
    for text in ("Hel", "lo"):
        await store.append("s1", STREAM_APPEND, {"stream": "open", "text": text}, ALICE)
    await store.close()
    side = side_connection(path)
    side.executescript(
        "DROP TABLE streams;"
        "CREATE INDEX events_stream ON events (sid, stream, seq) WHERE stream IS NOT NULL;"
        "PRAGMA user_version = 1;"
    )

    store = await opened(path)
    try:
        assert side.execute("PRAGMA user_version").fetchone()[0] == sqlite_module.SCHEMA_VERSION
        assert side.execute("SELECT stream, first_seq FROM streams ORDER BY stream"
                            ).fetchall() == [("done", 1), ("open", 4)]
        assert side.execute("SELECT count(*) FROM sqlite_master WHERE name = 'events_stream'"
                            ).fetchone()[0] == 0
        with pytest.raises(StreamClosedError):
            await store.append("s1", STREAM_APPEND, {"stream": "done", "text": "late"}, ALICE)
        end = await store.append("s1", STREAM_END, {"stream": "open"}, ALICE)
        assert end.event.data["text"] == "Hello"
    finally:
        side.close()
        await store.close()


async def test_a_stream_row_is_written_once_and_trimmed_with_its_first_event(
        tmp_path: Path) -> None:
    path = tmp_path / "data"
    store = await opened(path, Retention(max_events=100))
    side = side_connection(path)
    try:
        for i in range(3):
            await store.append("s1", STREAM_APPEND, {"stream": "old", "text": str(i)}, ALICE)
        await store.append("s2", STREAM_APPEND, {"stream": "old", "text": "x"}, ALICE)
        assert side.execute("SELECT sid, stream, first_seq FROM streams ORDER BY sid"
                            ).fetchall() == [(1, "old", 1), (2, "old", 1)]
        for i in range(300):
            await store.append("s1", "message", i, ALICE)
        await store.trim()
        await store.append("s1", STREAM_APPEND, {"stream": "new", "text": "y"}, ALICE)
        assert side.execute("SELECT sid, stream, first_seq FROM streams ORDER BY sid"
                            ).fetchall() == [(1, "new", 304), (2, "old", 1)]
    finally:
        side.close()
        await store.close()


async def test_concurrent_appends_are_committed_in_few_batches(tmp_path: Path) -> None:
    batches: list[int] = []
    store = await opened(tmp_path / "data", on_batch=batches.append)
    try:
        results = await asyncio.gather(
            *(store.append(f"s{i % 7}", "message", {"i": i}, ALICE) for i in range(500))
        )
        assert sum(batches) == 500
        assert len(batches) <= 5
        for s in range(7):
            seqs = [r.event.seq for r in results if r.event.session == f"s{s}"]
            assert seqs == list(range(1, len(seqs) + 1))
    finally:
        await store.close()


def wal_restarts(path: Path) -> int:
    """The WAL header's checkpoint sequence number: SQLite adds one each time it restarts the
    WAL from its start instead of appending to it."""
    with open(path / "tether.db-wal", "rb") as wal:
        return int.from_bytes(wal.read(16)[12:16], "big")


async def test_the_writer_finishes_a_checkpoint_round_so_the_wal_restarts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a steady stream, commits land while the checkpointer copies, so its passes alone
    never leave the WAL fully copied when a transaction begins, and SQLite grows the WAL instead
    of restarting it. The writer copies what the round left, then its transaction restarts it."""
    monkeypatch.setattr(sqlite_module, "_CHECKPOINT_PAGES", 1 << 30)  # rounds only when told
    path = tmp_path / "data"
    store = await opened(path)
    side = side_connection(path)
    try:
        for i in range(50):
            await store.append(f"s{i % 7}", "message", {"i": i}, ALICE)
        before = wal_restarts(path)
        # A pass of the round copies what the WAL held when it began (a reader's snapshot
        # stands for that here) while a commit lands ...
        reader = side_connection(path)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM events").fetchone()
        await store.append("s1", "message", {"i": 50}, ALICE)
        side.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        reader.execute("COMMIT")
        reader.close()
        await store.append("s1", "message", {"i": 51}, ALICE)
        assert wal_restarts(path) == before  # not fully copied: SQLite appends to the WAL
        checkpointer = store._checkpointer
        assert checkpointer is not None
        checkpointer.caught_up = True  # ... and the round ends
        await store.append("s2", "message", {"i": 52}, ALICE)
        assert wal_restarts(path) == before + 1
        assert not checkpointer.caught_up
        await store.close()
        store = await opened(path)
        assert [e.data["i"] for e in await store.read("s1", 0, 100)][-3:] == [43, 50, 51]
        assert (await store.read("s2", 0, 100))[-1].data == {"i": 52}
    finally:
        side.close()
        await store.close()


async def test_max_batch_commits_the_rest_in_order_and_close_commits_all(tmp_path: Path
                                                                         ) -> None:
    """The sequencer of --workers bounds its transactions: what is over the bound is committed
    in the next loop iterations, in queue order, and close() commits everything queued."""
    batches: list[int] = []
    seen: list[Event] = []
    store = SqliteStore(str(tmp_path / "data"), on_batch=batches.append, max_batch=16)
    await store.start()
    store.listen("s0", seen.append)
    results = await asyncio.gather(
        *(store.append(f"s{i % 3}", "message", {"i": i}, ALICE) for i in range(100)))
    assert batches[:6] == [16] * 6 and sum(batches) == 100
    for s in range(3):
        assert [r.event.data["i"] for r in results if r.event.session == f"s{s}"] == \
            list(range(s, 100, 3))
        assert [r.event.seq for r in results if r.event.session == f"s{s}"] == \
            list(range(1, len(range(s, 100, 3)) + 1))
    assert [e.seq for e in seen] == list(range(1, 35))
    queued = [store.append_future("s9", "message", i, ALICE) for i in range(40)]
    await store.close()
    assert [f.result().event.seq for f in queued] == list(range(1, 41))


async def test_one_batch_sees_its_own_stream_events(store: SqliteStore) -> None:
    results = await asyncio.gather(
        store.append("s1", STREAM_APPEND, {"stream": "m", "text": "a"}, ALICE),
        store.append("s1", STREAM_APPEND, {"stream": "m", "text": "b"}, ALICE),
        store.append("s1", STREAM_END, {"stream": "m"}, ALICE),
        store.append("s1", STREAM_APPEND, {"stream": "m", "text": "late"}, ALICE),
        store.append("s1", STREAM_APPEND, {"stream": "n", "text": "x"}, ALICE),
        return_exceptions=True,
    )
    assert isinstance(results[3], StreamClosedError)
    ok = [r for r in results if not isinstance(r, BaseException)]
    assert [r.event.seq for r in ok] == [1, 2, 3, 4]
    assert ok[2].event.data["text"] == "ab"
    assert (await store.head("s1")).last_seq == 4


async def test_one_batch_mixes_known_new_and_repeated_keys(store: SqliteStore) -> None:
    known = [await store.append("s1", "message", i, ALICE, key=f"k{i}") for i in range(3)]
    results = await asyncio.gather(
        *(store.append("s1", "message", i, ALICE, key=f"k{i}") for i in range(6)),
        store.append("s1", "message", 5, ALICE, key="k5"),
        store.append("s1", "message", 0, Sender("bob"), key="k0"),
    )
    assert [(r.event.seq, r.duplicate) for r in results] == [
        (1, True), (2, True), (3, True), (4, False), (5, False), (6, False), (6, True),
        (7, False),
    ]
    assert [r.event for r in results[:3]] == [a.event for a in known]
    assert (await store.head("s1")).last_seq == 7


async def test_unencodable_data_fails_only_its_own_append(store: SqliteStore) -> None:
    results = await asyncio.gather(
        store.append("s1", "message", 1, ALICE),
        store.append("s1", "message", {"bad": object()}, ALICE),
        store.append("s1", "message", 3, ALICE),
        return_exceptions=True,
    )
    assert isinstance(results[1], TypeError)
    assert [e.data for e in await store.read("s1", 0, 10)] == [1, 3]


async def test_failed_batch_rejects_every_append_and_keeps_the_log(tmp_path: Path) -> None:
    path = tmp_path / "data"
    seen: list[Event] = []
    store = await opened(path)
    try:
        store.listen("s1", seen.append)
        for text in ("a", "b"):
            await store.append("s1", STREAM_APPEND, {"stream": "m", "text": text}, ALICE)
        before = await store.read("s1", 0, 10)

        side = side_connection(path)
        side.execute("CREATE TRIGGER boom BEFORE INSERT ON events WHEN NEW.type = 'boom'"
                     " BEGIN SELECT RAISE(ABORT, 'boom'); END")
        results = await asyncio.gather(
            store.append("s1", "message", "ok", ALICE, key="k"),
            store.append("s1", STREAM_APPEND, {"stream": "m", "text": "lost"}, ALICE),
            store.append("s2", "message", "new session", ALICE),
            store.append("s1", "boom", {}, ALICE),
            store.append("s1", "message", "ok too", ALICE),
            return_exceptions=True,
        )
        assert all(isinstance(r, StoreError) for r in results), results
        assert [e.seq for e in seen] == [1, 2]
        assert await store.read("s1", 0, 10) == before
        assert (await store.head("s1")).last_seq == 2
        assert side.execute("SELECT COUNT(*) FROM sessions WHERE session = 's2'").fetchone() == (0,)

        side.execute("DROP TRIGGER boom")
        side.close()
        # Seqs, keys and stream text continue from what was committed, not from the failure.
        retry = await store.append("s1", "message", "ok", ALICE, key="k")
        assert (retry.event.seq, retry.duplicate) == (3, False)
        end = await store.append("s1", STREAM_END, {"stream": "m"}, ALICE)
        assert (end.event.seq, end.event.data["text"]) == (4, "ab")
        assert [e.seq for e in seen] == [1, 2, 3, 4]
    finally:
        await store.close()


async def test_locked_database_fails_the_batch_then_recovers(tmp_path: Path) -> None:
    path = tmp_path / "data"
    store = await opened(path, busy_timeout=0.05)
    try:
        await store.append("s1", "message", 1, ALICE)
        side = side_connection(path)
        side.execute("BEGIN IMMEDIATE")  # holds the write lock, as a stuck writer would
        with pytest.raises(StoreError):
            await store.append("s1", "message", 2, ALICE)
        side.execute("ROLLBACK")
        side.close()
        assert (await store.append("s1", "message", 2, ALICE)).event.seq == 2
        assert [e.data for e in await store.read("s1", 0, 10)] == [1, 2]
    finally:
        await store.close()


async def test_second_store_on_the_same_folder_is_refused(store: SqliteStore) -> None:
    other = SqliteStore(str(store.path))
    with pytest.raises(StoreError, match="in use"):
        await other.start()
    await store.append("s1", "message", 1, ALICE)


async def test_close_commits_appends_still_queued(tmp_path: Path) -> None:
    path = tmp_path / "data"
    store = await opened(path)
    # gather starts the append before close runs, and close runs before the scheduled flush.
    appended, _ = await asyncio.gather(store.append("s1", "message", "last", ALICE),
                                       store.close())
    assert appended.event.seq == 1
    with pytest.raises(StoreError):
        await store.append("s1", "message", "after close", ALICE)
    store = await opened(path)
    try:
        assert [e.data for e in await store.read("s1", 0, 10)] == ["last"]
    finally:
        await store.close()


async def test_count_is_enforced_while_appending(tmp_path: Path) -> None:
    store = await opened(tmp_path / "data", Retention(max_events=100))
    try:
        for i in range(50):
            await asyncio.gather(*(store.append("s1", "message", i * 20 + j, ALICE)
                                   for j in range(20)))
        head = await store.head("s1")
        assert head.last_seq == 1000
        assert 100 <= head.last_seq - head.first_seq + 1 <= 200
        events = await store.read("s1", 0, 1000)
        assert [e.seq for e in events] == list(range(head.first_seq, 1001))
        assert await store.trim() == head.last_seq - head.first_seq + 1 - 100
        assert (await store.head("s1")).first_seq == 901
    finally:
        await store.close()


async def test_trim_survives_reopen_even_when_everything_was_removed(tmp_path: Path) -> None:
    path = tmp_path / "data"
    # A negative age puts the cutoff in the future: every event is old, deterministically.
    store = await opened(path, Retention(max_age=-60.0, idempotency_window=-60.0))
    for i in range(5):
        await store.append("s1", "message", i, ALICE, key=f"k{i}")
    await store.append("s2", "message", "x", ALICE)
    assert await store.trim() == 6
    assert await store.trim() == 0
    head = await store.head("s1")
    assert (head.last_seq, head.first_seq) == (5, 6)
    await store.close()

    side = side_connection(path)
    assert side.execute("SELECT COUNT(*) FROM idempotency").fetchone() == (0,)
    side.close()
    store = await opened(path)
    try:
        assert await store.head("s1") == head
        assert await store.read("s1", 0, 10) == []
        again = await store.append("s1", "message", 0, ALICE, key="k0")
        assert (again.event.seq, again.duplicate) == (6, False)
        assert (await store.head("s1")).first_seq == 6
    finally:
        await store.close()


async def test_key_outlives_its_trimmed_event(tmp_path: Path) -> None:
    store = await opened(tmp_path / "data", Retention(max_events=2))
    try:
        first = await store.append("s1", "message", "original", ALICE, key="k")
        for i in range(5):
            await store.append("s1", "message", i, ALICE)
        await store.trim()
        assert (await store.head("s1")).first_seq == 5
        again = await store.append("s1", "message", "original", ALICE, key="k")
        assert again.duplicate and again.event.seq == first.event.seq == 1
        assert (await store.head("s1")).last_seq == 6
    finally:
        await store.close()


def child_program(worker_body: str) -> str:
    """A child that appends from 16 workers over 4 sessions until it is killed, writing a line
    per acknowledged append; ``worker_body`` is the loop of ``worker(w)``, with ``session``,
    ``store`` and ``sender`` in scope."""
    return f"""
import asyncio, sys
from tether.protocol.events import STREAM_APPEND, STREAM_END, Sender
from tether.store.sqlite import SqliteStore

async def main() -> None:
    store = SqliteStore(sys.argv[1])
    await store.start()
    sender = Sender("child", "c", "agent")

    async def worker(w: int) -> None:
        session = f"s{{w % 4}}"
{worker_body}
    await asyncio.gather(*(worker(w) for w in range(16)))

asyncio.run(main())
"""


CHILD = child_program("""\
        for i in range(10_000_000):
            appended = await store.append(session, "message", {"w": w, "i": i}, sender)
            # One write per acknowledged append, after the store said it is committed.
            sys.stdout.write(f"{session} {appended.event.seq}\\n")
            sys.stdout.flush()
""")


async def run_until_killed(child: str, path: Path, acks: int,
                           on_ack: Callable[[list[str]], None]) -> str:
    """Run ``child`` on the store at ``path``, SIGKILL it after ``acks`` acknowledgement lines
    and hand every line it printed, split into words, to ``on_ack``; its stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", child, str(path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None

    async def read_acks(until: int | None) -> None:
        assert proc.stdout is not None
        count = 0
        while until is None or count < until:
            line = await proc.stdout.readline()
            if not line.endswith(b"\n"):
                return  # EOF
            on_ack(line.decode().split())
            count += 1

    try:
        await asyncio.wait_for(read_acks(acks), 60)
    finally:
        proc.send_signal(signal.SIGKILL)
    await asyncio.wait_for(read_acks(None), 60)
    stderr = (await proc.stderr.read()).decode()
    assert await proc.wait() == -signal.SIGKILL, stderr
    return stderr


@pytest.mark.slow
async def test_sigkill_loses_no_acknowledged_append(tmp_path: Path) -> None:
    path = tmp_path / "data"
    acked: dict[str, set[int]] = {}

    def on_ack(words: list[str]) -> None:
        session, seq = words
        acked.setdefault(session, set()).add(int(seq))

    stderr = await run_until_killed(CHILD, path, 3000, on_ack)
    assert sum(len(seqs) for seqs in acked.values()) >= 3000, stderr

    store = await opened(path)
    try:
        for session, seqs in acked.items():
            head = await store.head(session)
            stored = [e.seq for e in await store.read(session, 0, head.last_seq + 1)]
            assert stored == list(range(1, head.last_seq + 1))
            assert seqs <= set(stored)
    finally:
        await store.close()


STREAM_CHILD = child_program("""\
        for n in range(10_000_000):  # a new stream every 20 deltas, each one ended
            stream = f"w{w}-{n}"
            for i in range(20):
                await store.append(session, STREAM_APPEND, {"stream": stream, "text": f"{i};"},
                                   sender)
                sys.stdout.write(f"{session} {stream} {i}\\n")
                sys.stdout.flush()
            await store.append(session, STREAM_END, {"stream": stream}, sender)
            sys.stdout.write(f"{session} {stream} end\\n")
            sys.stdout.flush()
""")


@pytest.mark.slow
async def test_sigkill_mid_stream_keeps_every_acknowledged_delta_in_its_stream(
        tmp_path: Path) -> None:
    # Streams begin and end all through the run, so the kill lands on streams just begun (their
    # row in ``streams`` is written with the first delta), half done and ended.
    path = tmp_path / "data"
    acked: dict[tuple[str, str], int] = {}  # deltas acknowledged per stream
    ended: set[tuple[str, str]] = set()

    def on_ack(words: list[str]) -> None:
        session, stream, what = words
        if what == "end":
            ended.add((session, stream))
        else:
            acked[(session, stream)] = int(what) + 1

    stderr = await run_until_killed(STREAM_CHILD, path, 3000, on_ack)
    assert ended and any(k not in ended for k in acked), stderr

    store = await opened(path)
    try:
        for (session, stream), count in acked.items():
            head = await store.head(session)
            stored = [e.data["text"] for e in await store.read(session, 0, head.last_seq + 1)
                      if e.data["stream"] == stream and e.type == STREAM_APPEND]
            # Committed deltas are a prefix of the stream's, holding every acknowledged one.
            assert stored == [f"{i};" for i in range(len(stored))]
            assert len(stored) >= count
            if (session, stream) in ended:
                with pytest.raises(StreamClosedError):
                    await store.append(session, STREAM_APPEND, {"stream": stream, "text": "x"},
                                       ALICE)
            else:
                end = await store.append(session, STREAM_END, {"stream": stream}, ALICE)
                assert end.event.data["text"] == "".join(stored)
    finally:
        await store.close()


async def test_catch_up_frames_of_damaged_rows_are_the_placeholders_read_gives(
        store: SqliteStore, tmp_path: Path) -> None:
    # Rows no append writes today (an older version, a damaged disk): each goes the reference
    # path and its frame is the one of the placeholder read() returns, in place, no gap.
    assert isinstance(store, EncodedReader)  # catch-up joins stored bytes here
    damaged: list[bytes | str] = [
        b'{"text": "not orjson\'s spacing"}',  # valid JSON all the same: goes out as stored
        b'{"text": "cut',  # not JSON
        b'"\xff\xfe"',  # a JSON string of bytes that are not UTF-8
        '{"text": "a TEXT value, not a BLOB"}',
    ]
    await store.append("s", "message", {"text": "before"}, ALICE)
    for _ in damaged:
        await store.append("s", "message", {"text": "placeholder"}, ALICE)
    await store.append("s", "message", nested(254), ALICE)  # too deep for any frame
    await store.append("s", "message", nested(200), ALICE)  # deep, and deliverable
    await store.append("s", "message", {"text": "after ✓"}, ALICE)
    with side_connection(tmp_path / "data") as db:
        for seq, data in enumerate(damaged, start=2):
            db.execute("UPDATE events SET data = ? WHERE seq = ?", (data, seq))
    events = await store.read("s", 0, 100)
    assert [e.type == UNREADABLE for e in events] == [
        False, False, True, True, False, True, False, False]
    for fmt in FORMATS:
        page = await store.read_encoded("s", 0, 100, fmt)
        assert [seq for seq, _ in page] == list(range(1, 9))
        for (_, frame), event in zip(page, events, strict=True):
            if event.seq == 2:  # not orjson's own text: sent as stored, equal in meaning
                assert b'"data":{"text": "not orjson\'s spacing"},' in frame
                continue
            assert frame == encode_reference(fmt, event)


async def test_catch_up_frames_without_sqlite_json_functions(
        store: SqliteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    # An SQLite built without JSON functions: the same frames, by decoding and encoding.
    for data in ({"text": "a ✓"}, nested(254), [1, 2.5, None]):
        await store.append("s", "message", data, ALICE)
    expected = {fmt: await store.read_encoded("s", 0, 10, fmt) for fmt in FORMATS}
    monkeypatch.setattr(sqlite_module, "_JSON_FUNCTIONS", False)
    for fmt in FORMATS:
        assert await store.read_encoded("s", 0, 10, fmt) == expected[fmt]
        assert [frame for _, frame in expected[fmt]] == [
            encode_reference(fmt, e) for e in await store.read("s", 0, 10)]
