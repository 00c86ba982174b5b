"""The run index: control events find their run without reading the session's log.

Real stores throughout (memory, sqlite, redis); the counting stores below are subclasses that
only record what ``read`` and ``head`` were asked and returned.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.agents.conftest import make_agent
from tether.agents.index import RunIndex
from tether.agents.runner import RunManager
from tether.agents.state import RunState, fold
from tether.protocol.codes import ErrorCode, RequestError
from tether.protocol.events import Event, Sender
from tether.server.auth import Grant
from tether.store import SessionStore
from tether.store.memory import MemoryStore
from tether.store.redis import RedisStore
from tether.store.sqlite import SqliteStore

ALICE = Sender("alice", "phone", "human")
AGENT = Sender("agent:tester", "n1", "agent")
GRANT = Grant("alice", ("*",), frozenset({"subscribe", "publish", "approve"}), None)


class Counting:
    """Mixin: remembers every read as (session, after, events returned), and heads."""

    reads: list[tuple[str, int, int]]
    heads: int

    async def read(self, session: str, after: int, limit: int) -> list[Event]:
        events: list[Event] = await super().read(session, after, limit)  # type: ignore[misc]
        self.reads.append((session, after, len(events)))
        return events

    async def head(self, session: str) -> Any:
        self.heads += 1
        return await super().head(session)  # type: ignore[misc]

    def events_read(self, session: str) -> int:
        return sum(n for s, _, n in self.reads if s == session)


class CountingMemory(Counting, MemoryStore):
    def __init__(self) -> None:
        MemoryStore.__init__(self)
        self.reads, self.heads = [], 0


class CountingSqlite(Counting, SqliteStore):
    def __init__(self, path: Path) -> None:
        SqliteStore.__init__(self, str(path))
        self.reads, self.heads = [], 0


class CountingRedis(Counting, RedisStore):
    def __init__(self, url: str) -> None:
        RedisStore.__init__(self, url)
        self.reads, self.heads = [], 0


StoreFactory = Callable[[], Any]


@pytest.fixture(params=["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)])
async def open_counting(request: pytest.FixtureRequest, tmp_path: Path
                        ) -> AsyncIterator[StoreFactory]:
    """Opens counting stores on one shared log (a fresh process's view of the same data)."""
    opened: list[Any] = []
    memory = CountingMemory() if request.param == "memory" else None

    async def opener(restart: bool = False) -> Any:
        if restart and memory is None:  # the previous process is gone (sqlite locks its files)
            for old in opened:
                await old.close()
            opened.clear()
        if memory is not None:
            store: Any = memory  # in-process: a "restart" keeps the same object
        elif request.param == "sqlite":
            store = CountingSqlite(tmp_path / "data")
        else:
            store = CountingRedis(request.getfixturevalue("redis_url"))
        if store not in opened:
            await store.start()
            opened.append(store)
        return store

    yield opener
    for store in opened:
        await store.close()


async def fill(store: SessionStore, session: str, count: int) -> None:
    """``count`` chat messages, committed in batches (group commit)."""
    for start in range(0, count, 1000):
        await asyncio.gather(*(store.append(session, "message", {"text": f"m{i}"}, ALICE)
                               for i in range(start, min(count, start + 1000))))


async def run_events(store: SessionStore, session: str, run: str, *steps: tuple[str, Any]
                     ) -> None:
    for type_, data in steps:
        await store.append(session, type_, {"run": run, **data}, AGENT)


def created(agent: str = "tester") -> tuple[str, Any]:
    return ("run.created", {"agent": agent, "trigger": "api", "input": {"text": "x"}})


def state(value: str, **extra: Any) -> tuple[str, Any]:
    return ("run.state", {"state": value, "trigger": "t", **extra})


def approval(call: str) -> tuple[str, Any]:
    return ("approval.request", {"call": call, "name": "deploy", "arguments": {}})


def client_call(call: str) -> tuple[str, Any]:
    return ("tool.call", {"call": call, "name": "ask", "arguments": {}, "target": "client"})


async def same_as_fold(index: RunIndex, store: SessionStore, session: str) -> None:
    """The index's view of every run equals a fold of the whole log."""
    log = await store.read(session, 0, 100_000)
    expected = fold([(e.seq, e.type, e.data) for e in log])
    table = await index.table(session)
    assert set(table.runs) == set(expected)
    for run, record in expected.items():
        got = table.runs[run]
        assert got.state == record.state, run
        wanted = {} if record.final else {c: p.kind for c, p in record.pending.items()}
        assert {c: p.kind for c, p in got.pending.items()} == wanted, run


# --- control events on a long session ---------------------------------------------------------


async def test_unknown_run_on_a_long_session_reads_the_log_once(
        open_counting: StoreFactory) -> None:
    store = await open_counting()
    await fill(store, "big", 20_000)
    await run_events(store, "big", "run_waiting", created(), state("running"),
                     approval("call_1"), state("awaiting_approval", call="call_1"))
    manager = RunManager(store, "n1")
    manager.register(make_agent())
    index = manager.run_tables
    store.reads.clear()

    # The first control event builds the session's table: one fold, in pages, yielding to
    # the event loop between pages (a ticker gets to run between every two pages).
    ticks = 0
    building = True

    async def ticker() -> None:
        nonlocal ticks
        while building:
            ticks += 1
            await asyncio.sleep(0)

    ticking = asyncio.get_running_loop().create_task(ticker())
    with pytest.raises(RequestError) as refused:
        await manager.control("big", "run.cancel", {"run": "run_nope"}, ALICE, GRANT)
    building = False
    await ticking
    assert refused.value.code == ErrorCode.RUN_NOT_FOUND
    pages = [r for r in store.reads if r[0] == "big"]
    assert store.events_read("big") == 20_004
    assert len(pages) >= 20_004 // index.page and ticks >= len(pages) - 1
    assert max(n for _, _, n in pages) <= index.page

    # Then: every further control event on it is a lookup. Unknown runs, and known ones.
    store.reads.clear()
    for i in range(50):
        for type_, data in [("run.cancel", {"run": f"run_nope{i}"}),
                            ("approval.decision", {"run": f"run_x{i}", "call": "call_1",
                                                   "decision": "approve"}),
                            ("tool.result", {"run": "run_waiting", "call": "call_1",
                                             "result": 1})]:
            with pytest.raises(RequestError):
                await manager.control("big", type_, data, ALICE, GRANT)
    assert store.events_read("big") == 0  # no event read again
    assert all(after >= 20_004 for s, after, _ in store.reads if s == "big")
    if not index.lossy:
        assert not store.reads  # in-process fan-out: the listener kept the table exact

    # New events since are read once (by the listener, or the tail of one lookup), not the log.
    await fill(store, "big", 100)
    store.reads.clear()
    for i in range(20):
        with pytest.raises(RequestError):
            await manager.control("big", "run.cancel", {"run": f"run_nope{i}"}, ALICE, GRANT)
    assert store.events_read("big") <= 100
    reply = await manager.control("big", "approval.decision", {
        "run": "run_waiting", "call": "call_1", "decision": "approve"}, ALICE, GRANT)
    assert reply.event.type == "approval.decision" and not reply.duplicate
    assert store.events_read("big") <= 100
    index.close()


# --- the index follows runs as they live ------------------------------------------------------


async def test_index_equals_the_fold_as_runs_are_created_transition_and_finish(
        open_counting: StoreFactory) -> None:
    store = await open_counting()
    index = RunIndex(store)
    session = "s"
    await same_as_fold(index, store, session)  # an empty session
    steps = [
        ("r1", [created(), state("running")]),
        ("r2", [created()]),  # queued behind r1
        ("r1", [approval("c1"), state("awaiting_approval", call="c1")]),
        ("r2", [("run.steer", {"text": "hi", "by": {"sub": "alice"}})]),
        ("r1", [("approval.decision", {"call": "c1", "decision": "approve"}),
                state("running"), client_call("c2"), state("awaiting_tool", call="c2")]),
        ("r1", [("tool.result", {"call": "c2", "result": "blue"}), state("running"),
                state("completed")]),
        ("r2", [state("running"), client_call("c3"), state("awaiting_tool", call="c3")]),
        ("r2", [("run.cancel", {"by": {"sub": "alice"}, "reason": ""}), state("cancelled")]),
        ("r3", [created(), state("running"), state("failed", error="boom")]),
    ]
    for run, events in steps:
        await run_events(store, session, run, *events)
        await same_as_fold(index, store, session)
        fresh = RunIndex(store)  # built from scratch: the same answer
        await same_as_fold(fresh, store, session)
        fresh.close()
    assert (await index.lookup(session, "r1")).state == RunState.COMPLETED  # type: ignore
    assert (await index.lookup(session, "r2")).state == RunState.CANCELLED  # type: ignore
    assert await index.lookup(session, "r4") is None
    assert await index.lookup("other", "r1") is None  # runs belong to their session only
    index.close()


async def test_a_missed_event_is_caught_up_from_the_tail(open_counting: StoreFactory) -> None:
    store = await open_counting()
    index = RunIndex(store)
    await run_events(store, "s", "r1", created(), state("running"))
    await index.table("s")
    store.unlisten("s", index._observe)  # the live channel drops what follows
    await run_events(store, "s", "r1", approval("c1"), state("awaiting_approval", call="c1"))
    store.listen("s", index._observe)
    await run_events(store, "s", "r2", created())  # live, after a gap (a lossy channel may
    # deliver it later or never: the lookups below must be right either way)
    store.reads.clear()
    record = await index.lookup("s", "r1")
    assert record is not None and record.state == RunState.AWAITING_APPROVAL
    assert list(record.pending) == ["c1"]
    assert await index.lookup("s", "r2") is not None
    assert all(after >= 2 for _, after, _ in store.reads)  # the tail, not the log
    await same_as_fold(index, store, "s")
    index.close()


async def test_tables_are_evicted_whole_and_rebuilt(open_counting: StoreFactory) -> None:
    store = await open_counting()
    index = RunIndex(store, max_sessions=2, max_runs=5)
    for session in ("a", "b", "c"):
        await run_events(store, session, "r", created(), state("running"))
        assert await index.lookup(session, "r") is not None
    assert list(index.tables) == ["b", "c"]  # "a", the least recently used, went
    await run_events(store, "a", "r", state("completed"))  # while "a" was not cached
    record = await index.lookup("a", "r")  # rebuilt
    assert record is not None and record.state == RunState.COMPLETED
    assert list(index.tables) == ["c", "a"]
    for i in range(6):  # more runs than max_runs in one session: it stays, the others go
        await run_events(store, "d", f"r{i}", created())
    await index.table("d")
    assert list(index.tables) == ["d"] and index.records == 6
    await run_events(store, "a", "r2", created())  # "a" is not cached: not followed
    assert await index.lookup("a", "r2") is not None
    index.close()


async def test_finished_runs_keep_only_their_state(open_counting: StoreFactory) -> None:
    store = await open_counting()
    index = RunIndex(store)
    await run_events(store, "s", "r1", created(), state("running"), approval("c1"),
                     state("awaiting_approval", call="c1"), state("cancelled"))
    record = await index.lookup("s", "r1")
    assert record is not None and record.final
    assert not record.pending and not record.results and record.input is None
    index.close()


async def test_a_new_epoch_rebuilds_the_table() -> None:
    """A log replaced under the index (seqs restart) is noticed: live, or on a miss."""
    store = MemoryStore()
    index = RunIndex(store)
    index.lossy = True  # as on a store whose live channel may drop events
    await run_events(store, "s", "old", created(), state("running"), state("completed"))
    await index.table("s")
    for live in (True, False):
        del store._logs["s"]  # the log is gone: the next append starts a new epoch at seq 1
        if not live:
            store.unlisten("s", index._observe)
        await run_events(store, "s", f"new{live}", created())
        assert await index.lookup("s", f"new{live}") is not None
        assert await index.lookup("s", "old") is None
        assert await index.lookup("s", f"new{not live}") is None
    index.close()


# --- across a restart and across nodes --------------------------------------------------------


async def test_a_fresh_manager_on_the_same_store_knows_every_run(
        open_counting: StoreFactory) -> None:
    store = await open_counting()
    await run_events(store, "s", "run_wait", created(), state("running"), approval("c1"),
                     state("awaiting_approval", call="c1"))
    await run_events(store, "s", "run_done", created(), state("running"), state("completed"))
    first = RunManager(store, "n1")
    assert (await first.run_tables.lookup("s", "run_wait")) is not None
    first.run_tables.close()

    # A new manager (a restarted node, or another node) on the same data: same answers.
    again = RunManager(await open_counting(restart=True), "n1")
    with pytest.raises(RequestError) as done:
        await again.control("s", "run.cancel", {"run": "run_done"}, ALICE, GRANT)
    assert done.value.code == ErrorCode.RUN_FINISHED
    with pytest.raises(RequestError) as missing:
        await again.control("s", "run.cancel", {"run": "run_gone"}, ALICE, GRANT)
    assert missing.value.code == ErrorCode.RUN_NOT_FOUND
    with pytest.raises(RequestError) as elsewhere:
        await again.control("t", "run.cancel", {"run": "run_wait"}, ALICE, GRANT)
    assert elsewhere.value.code == ErrorCode.RUN_NOT_FOUND
    decided = await again.control("s", "approval.decision", {
        "run": "run_wait", "call": "c1", "decision": "approve"}, ALICE, GRANT)
    assert not decided.duplicate
    with pytest.raises(RequestError) as twice:
        await again.control("s", "approval.decision", {
            "run": "run_wait", "call": "c1", "decision": "reject"}, ALICE, GRANT)
    assert twice.value.code == ErrorCode.UNKNOWN_CALL  # the index saw its own decision
    again.run_tables.close()


@pytest.mark.redis
async def test_a_run_created_on_another_node_is_found_at_once(redis_url: str) -> None:
    one, two = CountingRedis(redis_url), CountingRedis(redis_url)
    await one.start()
    await two.start()
    try:
        node1, node2 = RunManager(one, "n1"), RunManager(two, "n2")
        await run_events(one, "s", "r0", created())
        assert await node2.run_tables.lookup("s", "r0") is not None  # node 2 builds its table
        for i in range(1, 20):  # each written on node 1, then controlled at once on node 2
            await run_events(one, "s", f"r{i}", created(), state("running"), approval("c"),
                             state("awaiting_approval", call="c"))
            reply = await node2.control("s", "approval.decision", {
                "run": f"r{i}", "call": "c", "decision": "approve"}, ALICE, GRANT)
            assert not reply.duplicate
        # And node 1 (following its own writes and node 2's) agrees with the log.
        await same_as_fold(node1.run_tables, one, "s")
        await same_as_fold(node2.run_tables, two, "s")
        node1.run_tables.close()
        node2.run_tables.close()
    finally:
        await one.close()
        await two.close()


# --- a run reads its conversation in its own task ---------------------------------------------


async def test_a_run_merges_what_it_saw_live_while_reading_its_log() -> None:
    from tether.agents.runner import Run
    from tether.agents.state import RunRecord

    store = MemoryStore()
    manager = RunManager(store, "n1")
    agent = make_agent()
    await fill(store, "s", 2500)  # more than one page
    await run_events(store, "s", "r1", created())
    run = Run(manager, "s", RunRecord("r1", agent.name), agent)
    assert not run.loaded and not run.events
    live = await store.append("s", "approval.decision", {"run": "r1", "call": "c1",
                                                         "decision": "approve"}, ALICE)
    run.observe(live.event)  # delivered live before the log was read
    await run.load()
    seqs = [e[0] for e in run.events]
    assert seqs == list(range(1, 2503)) and run.seen == set(seqs)
    assert run.arrived["c1"].seq == live.event.seq
