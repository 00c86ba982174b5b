"""The one contract every store keeps (log, fan-out, presence): memory, sqlite and redis."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.store.conftest import STORE_KINDS, make_store
from tether.protocol.codec import MSGPACK
from tether.protocol.encoded import FORMATS, encode_reference
from tether.protocol.events import SYSTEM, Event, Sender
from tether.protocol.frames import event_frame
from tether.store import Retention, Store, StreamClosedError
from tether.store.base import read_encoded

ALICE = Sender("alice", "c1", "human")


class _Collected(list[Event]):
    """A list a listener appends to, that sets ``done`` once it holds ``count`` events."""

    def __init__(self, count: int, done: asyncio.Event) -> None:
        super().__init__()
        self.count = count
        self.done = done

    def append(self, event: Event) -> None:
        super().append(event)
        if len(self) >= self.count:
            self.done.set()


def collector(count: int) -> tuple[_Collected, asyncio.Event]:
    done = asyncio.Event()
    return _Collected(count, done), done
BOB = Sender("bob", "c2", "human")


async def test_new_session_head_is_empty_and_stable(store: Store) -> None:
    head = await store.head("s1")
    assert (head.last_seq, head.first_seq) == (0, 1)
    assert (await store.head("s1")).epoch == head.epoch
    assert await store.read("s1", 0, 10) == []


async def test_append_assigns_gapless_seq_and_read_pages(store: Store) -> None:
    for i in range(25):
        appended = await store.append("s1", "message", {"i": i}, ALICE)
        assert appended.event.seq == i + 1
        assert not appended.duplicate
    head = await store.head("s1")
    assert head.last_seq == 25
    assert appended.event.epoch == head.epoch
    page = await store.read("s1", 10, 5)
    assert [e.seq for e in page] == [11, 12, 13, 14, 15]
    assert [e.data["i"] for e in page] == [10, 11, 12, 13, 14]
    assert page[0].sender == ALICE and page[0].type == "message" and page[0].time > 0
    assert [e.seq for e in await store.read("s1", 20, 100)] == [21, 22, 23, 24, 25]
    assert await store.read("s1", 25, 10) == []


async def test_sessions_are_independent(store: Store) -> None:
    await store.append("a", "message", 1, ALICE)
    await store.append("a", "message", 2, ALICE)
    appended = await store.append("b", "message", 3, ALICE)
    assert appended.event.seq == 1
    assert [e.data for e in await store.read("a", 0, 10)] == [1, 2]


async def test_concurrent_appends_are_gapless_and_listeners_see_commit_order(
    store: Store,
) -> None:
    seen, all_seen = collector(300)
    store.listen("s1", seen.append)
    results = await asyncio.gather(
        *(store.append("s1", "message", {"i": i}, ALICE) for i in range(300))
    )
    seqs = sorted(r.event.seq for r in results)
    assert seqs == list(range(1, 301))
    await asyncio.wait_for(all_seen.wait(), 10)
    assert [e.seq for e in seen] == list(range(1, 301))
    stored = await store.read("s1", 0, 1000)
    assert [e.data for e in stored] == [e.data for e in seen]


async def test_listener_runs_after_commit(store: Store) -> None:
    checks: list[asyncio.Task[list[Event]]] = []
    called = asyncio.Event()

    def on_event(event: Event) -> None:
        checks.append(asyncio.ensure_future(store.read("s1", event.seq - 1, 1)))
        called.set()

    store.listen("s1", on_event)
    await store.append("s1", "message", "x", ALICE)
    await asyncio.wait_for(called.wait(), 10)
    got = await checks[0]
    assert [e.data for e in got] == ["x"]
    store.unlisten("s1", on_event)


async def test_idempotency_key_returns_original_event(store: Store) -> None:
    first = await store.append("s1", "message", "hi", ALICE, key="k1")
    again = await store.append("s1", "message", "hi", ALICE, key="k1")
    assert again.duplicate and again.event.seq == first.event.seq
    assert again.event.data == "hi"
    # Keys are scoped to (session, sender subject).
    other_sender = await store.append("s1", "message", "hi", BOB, key="k1")
    other_session = await store.append("s2", "message", "hi", ALICE, key="k1")
    assert not other_sender.duplicate and not other_session.duplicate
    assert (await store.head("s1")).last_seq == 2


async def test_concurrent_duplicates_append_once(store: Store) -> None:
    results = await asyncio.gather(
        *(store.append("s1", "message", "x", ALICE, key="same") for _ in range(20))
    )
    assert len({r.event.seq for r in results}) == 1
    assert sum(not r.duplicate for r in results) == 1
    assert (await store.head("s1")).last_seq == 1


async def test_stream_end_carries_the_concatenated_deltas(store: Store) -> None:
    deltas = ["Hel", "lo", ", wo", "rld ", "— ünï", "cödé 🎉", ""]
    for text in deltas:
        await store.append("s1", "stream.append", {"stream": "m1", "text": text}, ALICE)
    await store.append("s1", "stream.append", {"stream": "other", "text": "zz"}, ALICE)
    end = await store.append("s1", "stream.end", {"stream": "m1", "role": "assistant"}, ALICE)
    assert end.event.data["text"].encode() == "".join(deltas).encode()
    assert end.event.data["role"] == "assistant"
    stored = (await store.read("s1", end.event.seq - 1, 1))[0]
    assert stored.data == end.event.data
    with pytest.raises(StreamClosedError):
        await store.append("s1", "stream.append", {"stream": "m1", "text": "late"}, ALICE)
    with pytest.raises(StreamClosedError):
        await store.append("s1", "stream.end", {"stream": "m1"}, ALICE)
    assert (await store.head("s1")).last_seq == end.event.seq


async def test_catch_up_frames_are_the_reference_encoding_of_read(store: Store) -> None:
    # Whether the store builds them from stored bytes (SQLite, shared) or read_encoded's
    # default decodes and encodes (memory, Redis): the same bytes, in the same pages.
    agent = Sender('ünï "quoted" \\ \u0001', "tab\tclient", "agent")
    published = [
        ("message", {"text": "héllo ✓ 🎉", "big": 2**63, "neg": -(2**63)}, ALICE),
        ("message", [1, -0.0, 1e300, 0.1, None, True, {"deep": [{"x": "\u0000\n\"\\"}]}],
         agent),
        ("run.delta", "plain", SYSTEM),
        ("message", 2**64 - 1, BOB),
        ("stream.append", {"stream": "m1", "text": "Hel"}, agent),
        ("stream.append", {"stream": "m1", "text": "lo ✓"}, agent),
        ("stream.end", {"stream": "m1"}, agent),  # its text filled in by the store
    ]
    for type_, data, sender in published:
        await store.append("s1", type_, data, sender)

    def msgpack(event: Event) -> bytes:  # no stored bytes to reuse: the default path
        return MSGPACK.encode(event_frame(event))

    for fmt in [*sorted(FORMATS), "msgpack"]:
        def encode(event: Event, fmt: str = fmt) -> bytes:
            return msgpack(event) if fmt == "msgpack" else encode_reference(fmt, event)

        for after, limit in ((0, 100), (2, 3), (6, 10), (7, 10)):
            events = await store.read("s1", after, limit)
            page = await read_encoded(store, "s1", after, limit, fmt, encode)
            assert [seq for seq, _ in page] == [e.seq for e in events]
            assert [frame for _, frame in page] == [encode(e) for e in events], fmt
        assert await read_encoded(store, "nobody", 0, 10, fmt, encode) == []


async def test_transient_events_reach_listeners_and_are_not_stored(store: Store) -> None:
    seen, arrived = collector(1)
    store.listen("s1", seen.append)
    head = await store.head("s1")
    event = Event("s1", head.epoch, 0, "typing", {"on": True}, ALICE, 1, transient=True)
    await store.publish_transient(event)
    await asyncio.wait_for(arrived.wait(), 10)
    assert seen[0].transient and seen[0].data == {"on": True}
    assert await store.read("s1", 0, 10) == []
    assert (await store.head("s1")).last_seq == 0


async def test_presence_set_list_clear(store: Store) -> None:
    await store.set_presence("s1", "alice/c1", {"sub": "alice", "client": "c1"}, ttl=30)
    await store.set_presence("s1", "bob/c2", {"sub": "bob", "client": "c2"}, ttl=30)
    members = await store.presence("s1")
    assert sorted(m["sub"] for m in members) == ["alice", "bob"]
    await store.clear_presence("s1", "alice/c1")
    assert [m["sub"] for m in await store.presence("s1")] == ["bob"]
    assert await store.presence("other") == []


async def test_presence_expires(store: Store) -> None:
    await store.set_presence("s1", "ghost", {"sub": "ghost"}, ttl=0.05)
    async def gone() -> None:
        while await store.presence("s1"):
            await asyncio.sleep(0.01)
    await asyncio.wait_for(gone(), 5)


@pytest.mark.parametrize("kind", STORE_KINDS)
async def test_retention_by_count(kind: str, request: pytest.FixtureRequest,
                                  tmp_path: Path) -> None:
    store = await make_store(kind, request, tmp_path, Retention(max_events=10))
    try:
        for i in range(25):
            await store.append("s1", "message", i, ALICE)
        await store.trim()
        head = await store.head("s1")
        assert head.last_seq == 25
        assert 16 >= head.first_seq >= 15  # redis MAXLEN may keep a few more; never fewer
        events = await store.read("s1", 0, 100)
        assert events[0].seq == head.first_seq and events[-1].seq == 25
        assert [e.seq for e in events] == list(range(head.first_seq, 26))
    finally:
        await store.close()


@pytest.mark.parametrize("kind", STORE_KINDS)
async def test_retention_by_age(kind: str, request: pytest.FixtureRequest,
                                tmp_path: Path) -> None:
    store = await make_store(kind, request, tmp_path, Retention(max_age=0.001))
    try:
        for i in range(5):
            await store.append("s1", "message", i, ALICE)
        async def trimmed() -> None:
            while (await store.head("s1")).first_seq != 6:
                await store.trim()
                await asyncio.sleep(0.01)
        await asyncio.wait_for(trimmed(), 5)
        assert await store.read("s1", 0, 10) == []
        appended = await store.append("s1", "message", 5, ALICE)
        assert appended.event.seq == 6
    finally:
        await store.close()
