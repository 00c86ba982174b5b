"""The session service on its own: no sockets, a real MemoryStore, a hub with an in-memory peer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from tether.agents.runner import RunManager
from tether.protocol.codes import ErrorCode, RequestError, TetherError
from tether.protocol.cursor import Cursor
from tether.protocol.events import Sender
from tether.server.auth import Grant
from tether.server.config import ServerConfig
from tether.server.hub import FORMAT_JSON, Hub, Outbox
from tether.server.metrics import Metrics
from tether.server.sessions import (
    Caller,
    Catchup,
    SessionService,
    TokenBucket,
    as_error,
    parse_cursor,
    resume_decision,
)
from tether.store import MemoryStore, Retention
from tether.store.base import Head, StoreError, StreamClosedError

ALL = frozenset({"subscribe", "publish", "presence"})


class Collected:
    """A sink that keeps what the outbox writes (the hub's view of a connection)."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()

    async def send(self, data: bytes) -> None:
        self.write_now([data])

    async def send_many(self, frames: list[bytes]) -> None:
        self.write_now(frames)

    def write_now(self, frames: list[bytes]) -> bool:
        self.frames += [orjson.loads(f) for f in frames]
        self.arrived.set()
        return True

    def abort(self) -> None:
        pass


class MemoryPeer:
    format = FORMAT_JSON

    def __init__(self, metrics: Metrics) -> None:
        self.sink = Collected()
        self.outbox = Outbox(self.sink, 1 << 20, metrics)

    async def events(self, count: int) -> list[dict[str, Any]]:
        while True:
            got = [f for f in self.sink.frames if f.get("op") == "event"]
            if len(got) >= count:
                return got
            self.sink.arrived.clear()
            await asyncio.wait_for(self.sink.arrived.wait(), 5)


def nested(depth: int) -> Any:
    value: Any = "leaf"
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


def caller(sub: str = "alice", caps: frozenset[str] = ALL, sessions: tuple[str, ...] = ("*",),
           bucket: TokenBucket | None = None) -> Caller:
    return Caller(Grant(sub, sessions, caps, None), Sender(sub, "c1"), "conn1", bucket=bucket)


@pytest.fixture
async def service() -> AsyncIterator[SessionService]:
    store = MemoryStore(Retention(max_events=20))
    metrics = Metrics()
    config = ServerConfig(snapshot_events=5, max_event_bytes=1000)
    runs = RunManager(store, "node-test")
    yield SessionService(config, store, store, Hub(store, metrics), runs, metrics)


async def test_publish_commits_and_a_retry_with_the_key_is_a_duplicate(
        service: SessionService) -> None:
    first = await service.publish(caller(), "s", "message", {"text": "hi"}, key="k")
    again = await service.publish(caller(), "s", "message", {"text": "hi"}, key="k")
    assert first.event.seq == 1 and not first.duplicate
    assert again.duplicate and again.event.cursor == first.event.cursor
    assert (await service.store.head("s")).last_seq == 1


@pytest.mark.parametrize(("type_", "data", "transient", "code"), [
    ("run.state", {}, False, ErrorCode.FORBIDDEN),  # only the server writes it
    ("run.nonsense", {}, False, ErrorCode.UNKNOWN_EVENT_TYPE),
    ("bad type", {}, False, ErrorCode.INVALID),
    ("stream.append", {"stream": "m", "text": "x"}, True, ErrorCode.INVALID),
    ("stream.append", {"stream": "m"}, False, ErrorCode.INVALID),
    ("message", "x" * 2000, False, ErrorCode.TOO_LARGE),
    ("run.cancel", {"run": "r"}, True, ErrorCode.INVALID),
    ("message", {"b": b"bytes"}, False, ErrorCode.INVALID),  # MessagePack-only values
    ("message", {1: "int key"}, False, ErrorCode.INVALID),
    ("message", 1 << 70, False, ErrorCode.INVALID),
    ("message", "\ud800", False, ErrorCode.INVALID),
    ("message", nested(33), False, ErrorCode.INVALID),  # deeper than the limit
    ("message", nested(250), False, ErrorCode.INVALID),
])
async def test_publish_refuses_bad_events_before_the_store(
        service: SessionService, type_: str, data: Any, transient: bool, code: ErrorCode
) -> None:
    with pytest.raises(RequestError) as caught:
        service.publish(caller(), "s", type_, data, transient=transient)
    assert caught.value.code == code
    assert (await service.store.head("s")).last_seq == 0


async def test_data_at_the_depth_limit_is_accepted_and_deliverable(
        service: SessionService) -> None:
    appended = await service.publish(caller(), "s", "message", nested(32))
    (event,) = await service.store.read("s", 0, 1)
    assert event.data == nested(32) and appended.event.seq == 1


async def test_publish_needs_the_capability_and_respects_the_bucket(
        service: SessionService) -> None:
    with pytest.raises(RequestError) as caught:
        service.publish(caller(caps=frozenset({"subscribe"})), "s", "message", 1)
    assert caught.value.code == ErrorCode.FORBIDDEN
    limited = caller(bucket=TokenBucket(rate=0.0, capacity=2))
    await service.publish(limited, "s", "message", 1)
    await service.publish(limited, "s", "message", 2)
    with pytest.raises(RequestError) as caught:
        service.publish(limited, "s", "message", 3)
    assert caught.value.code == ErrorCode.RATE_LIMITED and caught.value.temporary


async def test_a_closed_stream_fails_with_its_own_code(service: SessionService) -> None:
    await service.publish(caller(), "s", "stream.append", {"stream": "m", "text": "a"})
    await service.publish(caller(), "s", "stream.end", {"stream": "m"})
    with pytest.raises(StreamClosedError) as caught:
        await service.publish(caller(), "s", "stream.append", {"stream": "m", "text": "b"})
    assert as_error(caught.value).code == ErrorCode.STREAM_CLOSED


def test_errors_carry_their_code() -> None:
    assert StoreError("down").code == ErrorCode.STORE_UNAVAILABLE
    assert StoreError("down").temporary
    assert StreamClosedError("ended").code == ErrorCode.STREAM_CLOSED
    assert isinstance(StoreError("x"), TetherError)
    assert as_error(TypeError("a bug")).code == ErrorCode.INTERNAL


async def test_control_events_for_unknown_runs_write_nothing(service: SessionService) -> None:
    with pytest.raises(RequestError) as caught:
        await service.publish(caller(), "s", "run.cancel", {"run": "run_nope"})
    assert caught.value.code == ErrorCode.RUN_NOT_FOUND
    assert (await service.store.head("s")).last_seq == 0


async def test_attach_resumes_from_a_cursor_with_no_gap_and_no_duplicate(
        service: SessionService) -> None:
    for i in range(5):
        await service.publish(caller(), "s", "message", i)
    head = await service.store.head("s")
    peer = MemoryPeer(service.metrics)
    attachment = await service.attach(caller(), peer, "s", Cursor(head.epoch, 2))
    assert attachment.resumed and attachment.cursor == Cursor(head.epoch, 2)
    attachment.start()
    await service.publish(caller(), "s", "message", 5)
    events = await peer.events(4)
    assert [e["seq"] for e in events] == [3, 4, 5, 6]
    service.detach(attachment.subscription)


async def test_attach_without_continuity_snapshots_or_replays(service: SessionService) -> None:
    for i in range(30):  # retention keeps 20: seqs 11–30
        await service.publish(caller(), "s", "message", i)
    head = await service.store.head("s")
    snap_peer = MemoryPeer(service.metrics)
    snap = await service.attach(caller(), snap_peer, "s", Cursor(head.epoch, 3))
    assert not snap.resumed and snap.reason == "cursor_expired"
    assert snap.snapshot is not None and [e["seq"] for e in snap.snapshot] == [26, 27, 28, 29, 30]
    assert snap.cursor == Cursor(head.epoch, 30)
    replay_peer = MemoryPeer(service.metrics)
    replay = await service.attach(caller(), replay_peer, "s", Cursor(head.epoch, 3),
                                  catchup=Catchup.REPLAY)
    assert not replay.resumed and replay.snapshot is None and replay.after == 10
    replay.start()
    assert [e["seq"] for e in await replay_peer.events(20)] == list(range(11, 31))
    service.detach(snap.subscription)
    service.detach(replay.subscription)


async def test_history_pages_and_says_when_continuity_is_lost(service: SessionService) -> None:
    for i in range(30):
        await service.publish(caller(), "s", "message", i)
    head = await service.store.head("s")
    page = await service.history(caller(), "s", Cursor(head.epoch, 25), limit=3)
    assert page.resumed and [e.seq for e in page.events] == [26, 27, 28] and page.more
    lost = await service.history(caller(), "s", Cursor(head.epoch, 1), limit=3)
    assert not lost.resumed and lost.reason == "cursor_expired"
    assert [e.seq for e in lost.events] == [11, 12, 13]


async def test_a_cursor_of_another_session_is_refused(service: SessionService) -> None:
    other = (await service.store.head("other")).epoch
    with pytest.raises(RequestError) as caught:
        parse_cursor(f"{other}:0", "s")
    assert caught.value.code == ErrorCode.BAD_CURSOR
    with pytest.raises(RequestError):
        await service.attach(caller(), MemoryPeer(service.metrics), "s", Cursor(other, 0))
    assert service.hub.channels == {}


def test_resume_decision_table() -> None:
    head = Head("E", last_seq=10, first_seq=5)
    assert resume_decision(None, Head("E", 10, 1)) == (True, 0, None)
    assert resume_decision(None, head) == (False, 10, "history_trimmed")
    assert resume_decision(Cursor("F", 3), head) == (False, 10, "epoch_changed")
    assert resume_decision(Cursor("E", 3), head) == (False, 10, "cursor_expired")
    assert resume_decision(Cursor("E", 4), head) == (True, 4, None)
    assert resume_decision(Cursor("E", 10), head) == (True, 10, None)
    with pytest.raises(RequestError):
        resume_decision(Cursor("E", 11), head)


async def test_presence_join_update_leave(service: SessionService) -> None:
    alice = caller()
    await service.join(alice, "s", {"typing": False})
    (member,) = await service.members("s")
    assert member["sub"] == "alice" and member["state"] == {"typing": False}
    await service.update_presence(alice, "s", {"typing": True})
    assert (await service.members("s"))[0]["state"] == {"typing": True}
    await service.leave(alice, "s")
    assert await service.members("s") == []
    with pytest.raises(RequestError) as caught:
        await service.update_presence(alice, "s", {})
    assert caught.value.code == ErrorCode.NOT_ATTACHED
    watcher = caller("bob", caps=frozenset({"subscribe"}))
    await service.join(watcher, "s", {})  # no presence capability: not a member
    assert await service.members("s") == []
