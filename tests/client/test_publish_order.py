"""Publish order across temporary refusals (``rate_limited``, ``store_unavailable``).

What the SDK guarantees for the publishes of one session (see *Publish order* in
``tether/client/protocol.py``): nothing is lost or committed twice, and the log order equals the
call order except for one case the protocol cannot prevent: a publish already in flight behind
a refused one, and accepted by the server, keeps its place ahead of it. These tests check the
state machine by hand, against a model server (hypothesis) and against a real server.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.client import AttachError, Client, ConnectionState, Session, SessionClosed
from tether.client.client import SESSION_TRANSITIONS, SessionState
from tether.client.protocol import (
    ClientProtocol,
    Completed,
    Failed,
    Outcome,
    RetryLater,
    Send,
)
from tether.protocol.events import Sender
from tether.server import Server
from tether.store import MemoryStore
from tether.store.base import Appended, StoreError

from .conftest import client_for, drop_connections, fake_server, make_server, until

EPOCH = "AAAAAAAA"
REFUSED = {"op": "error", "code": "rate_limited", "message": "slow down", "temporary": True}


def online() -> ClientProtocol:
    proto = ClientProtocol(client_id="c1")
    hello = proto.hello("tok")
    proto.receive({"op": "welcome", "id": hello["id"], "heartbeat": 15.0})
    return proto


def sent(outcomes: list[Outcome]) -> list[int]:
    """Ids of the publish frames among ``outcomes``."""
    return [o.frame["id"] for o in outcomes if isinstance(o, Send) and o.frame["op"] == "publish"]


def published(proto: ClientProtocol, rid: int, seq: int) -> list[Outcome]:
    return proto.receive({"op": "published", "id": rid, "session": "demo", "seq": seq,
                          "cursor": f"{EPOCH}:{seq}", "duplicate": False})


def inversions(order: list[int]) -> int:
    """Pairs committed in the opposite order of their calls."""
    return sum(1 for i, a in enumerate(order) for b in order[i + 1:] if a > b)


# --- the state machine by hand ----------------------------------------------------------------


def test_refused_publish_and_later_ones_are_resent_one_at_a_time_in_call_order() -> None:
    proto = online()
    ids = []
    for i in range(6):
        rid, frame = proto.publish("demo", "n", {"i": i})
        assert frame is not None  # pipelined
        ids.append(rid)
    p0, p1, p2, p3, p4, p5 = ids
    assert published(proto, p0, 1) == [Completed(p0, f"{EPOCH}:1")]
    (retry,) = proto.receive({**REFUSED, "id": p1})
    assert retry == RetryLater(p1, 0, "rate_limited", "slow down", session="demo",
                               op="publish")
    assert proto.receive({**REFUSED, "id": p2}) == []  # held behind p1: no second backoff
    published(proto, p3, 2)  # in flight behind p1 and accepted: keeps its place (allowed)
    held, frame = proto.publish("demo", "n", {"i": 6})
    assert frame is None  # made after the refusal: held
    assert sent(proto.retry_publishes("demo")) == []  # p4, p5 still in flight
    assert proto.receive({**REFUSED, "id": p4}) == []  # a straggler: nothing sent yet
    assert sent(published(proto, p5, 3)) == [p1]  # nothing in flight: the earliest, alone
    assert sent(published(proto, p1, 4)) == [p2]
    (again,) = proto.receive({**REFUSED, "id": p2})  # the lone re-send refused: back off
    assert isinstance(again, RetryLater) and again.attempt == 1
    assert sent(proto.retry(again)) == [p2]
    assert sent(published(proto, p2, 5)) == [p4]
    assert sent(published(proto, p4, 6)) == [held]
    assert sent(published(proto, held, 7)) == []
    assert proto.retrying == {}
    _, frame = proto.publish("demo", "n", {"i": 7})
    assert frame is not None  # nothing left unanswered: pipelining again


def test_other_sessions_transient_events_and_interrupts_are_not_held() -> None:
    proto = online()
    rid, _ = proto.publish("demo", "n", {})
    proto.receive({**REFUSED, "id": rid})
    assert proto.publish("demo", "n", {})[1] is None
    assert proto.publish("other", "n", {})[1] is not None
    assert proto.publish("demo", "typing", {}, transient=True)[1] is not None
    assert proto.publish("demo", "run.cancel", {"run": "r"})[1] is not None
    assert proto.publish("demo", "run.steer", {"run": "r", "text": "t"})[1] is not None


def test_a_reconnect_while_retrying_resends_only_the_earliest() -> None:
    proto = online()
    a, _ = proto.publish("demo", "n", {})
    b, _ = proto.publish("demo", "n", {})
    c, _ = proto.publish("other", "n", {})
    (retry,) = proto.receive({**REFUSED, "id": a})
    proto.connection_lost()
    hello = proto.hello("tok")
    out = proto.receive({"op": "welcome", "id": hello["id"]})
    assert sent(out) == [c]  # demo waits for its backoff
    assert sent(proto.retry(retry)) == [a]
    proto.connection_lost()
    hello = proto.hello("tok")
    out = proto.receive({"op": "welcome", "id": hello["id"]})
    assert sent(out) == [c, a]  # backoff over: demo's earliest, alone
    assert sent(published(proto, a, 1)) == [b]


def test_cancel_give_up_and_permanent_errors_let_the_next_one_go() -> None:
    proto = online()
    a, _ = proto.publish("demo", "n", {})
    b, _ = proto.publish("demo", "n", {})
    c, _ = proto.publish("demo", "n", {})
    d, _ = proto.publish("demo", "n", {})
    (retry,) = proto.receive({**REFUSED, "id": a})
    for rid in (b, c, d):
        proto.receive({**REFUSED, "id": rid})
    out = proto.give_up(retry)  # attempts spent on a: it fails, b goes without waiting
    assert out[0] == Failed(a, "rate_limited", "slow down") and sent(out) == [b]
    assert sent(proto.cancel(b)) == [c]  # the caller stopped waiting for b (it may commit)
    out = proto.receive({"op": "error", "id": c, "code": "too_large", "message": "big"})
    assert out[0] == Failed(c, "too_large", "big") and sent(out) == [d]


# --- against a model server that handles frames in order -------------------------------------


@dataclass
class Model:
    """A client protocol wired to a server model: the wire is FIFO both ways, the server
    handles frames in order and either commits (dedupe by key) or refuses temporarily."""

    proto: ClientProtocol = field(default_factory=online)
    clock: int = 0
    to_server: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # (sent at, frame)
    to_client: list[dict[str, Any]] = field(default_factory=list)
    log: list[int] = field(default_factory=list)  # call indices, in commit order
    keys: dict[str, int] = field(default_factory=dict)  # key → seq
    committed_by: dict[int, int] = field(default_factory=dict)  # index → clock of its send
    refused: set[int] = field(default_factory=set)  # indices the server refused
    first_refusal_seen: dict[int, int] = field(default_factory=dict)  # index → clock
    timers: list[RetryLater] = field(default_factory=list)
    index: dict[int, int] = field(default_factory=dict)  # request id → call index
    answered: set[int] = field(default_factory=set)

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def apply(self, outcomes: list[Outcome]) -> None:
        for outcome in outcomes:
            if isinstance(outcome, Send):
                self.to_server.append((self.tick(), outcome.frame))
            elif isinstance(outcome, RetryLater):
                self.timers.append(outcome)
            elif isinstance(outcome, Completed | Failed):
                self.answered.add(outcome.id)

    def publish(self) -> None:
        rid, frame = self.proto.publish("demo", "n", {"i": len(self.index)})
        self.index[rid] = len(self.index)
        if frame is not None:
            self.to_server.append((self.tick(), frame))

    def server_step(self, accept: bool) -> None:
        if not self.to_server:
            return
        at, frame = self.to_server.pop(0)
        reply: dict[str, Any]
        if not accept:  # like the server: the rate limit comes before the key lookup
            self.refused.add(frame["data"]["i"])
            reply = {**REFUSED, "id": frame["id"]}
        elif frame["key"] in self.keys:
            seq = self.keys[frame["key"]]
            reply = {"op": "published", "id": frame["id"], "seq": seq, "duplicate": True,
                     "cursor": f"{EPOCH}:{seq}"}
        else:
            self.log.append(frame["data"]["i"])
            self.committed_by[frame["data"]["i"]] = at
            seq = self.keys[frame["key"]] = len(self.log)
            reply = {"op": "published", "id": frame["id"], "seq": seq, "duplicate": False,
                     "cursor": f"{EPOCH}:{seq}"}
        self.to_client.append(reply)

    def client_step(self) -> None:
        if not self.to_client:
            return
        reply = self.to_client.pop(0)
        if reply["op"] == "error":
            self.first_refusal_seen.setdefault(self.index[reply["id"]], self.tick())
        self.apply(self.proto.receive(reply))

    def timer(self) -> None:
        if self.timers:
            self.apply(self.proto.retry(self.timers.pop(0)))

    def drop(self, delivered: int) -> None:
        """The connection dies: the server got the first ``delivered`` frames in flight."""
        for _ in range(min(delivered, len(self.to_server))):
            self.server_step(accept=True)
        self.to_server.clear()
        self.to_client.clear()
        self.apply(self.proto.connection_lost())
        hello = self.proto.hello("tok")
        self.apply(self.proto.receive({"op": "welcome", "id": hello["id"]}))

    def settle(self) -> None:
        """The server stops refusing: run until every publish is answered."""
        for _ in range(100_000):
            if len(self.answered) == len(self.index):
                return
            if self.to_server:
                self.server_step(accept=True)
            elif self.to_client:
                self.client_step()
            else:
                self.timer()
        raise AssertionError("publishes never settled")


step = st.one_of(
    st.just(("publish",)),
    st.tuples(st.just("server"), st.booleans()),
    st.just(("client",)),
    st.just(("timer",)),
    st.tuples(st.just("drop"), st.integers(0, 5)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(step, max_size=120))
def test_model_log_order_is_call_order_but_for_publishes_in_flight_at_a_refusal(
        steps: list[tuple[Any, ...]]) -> None:
    model = Model()
    for action, *args in steps:
        getattr(model, {"server": "server_step", "client": "client_step"}.get(action, action))(
            *args)
    model.settle()
    assert sorted(model.log) == list(range(len(model.index)))  # nothing lost, nothing twice
    for i, later in enumerate(model.log):
        for earlier in model.log[i + 1:]:
            if later > earlier:
                # ``later`` was called after ``earlier`` yet committed first: only allowed if
                # the server refused ``earlier`` and ``later`` was sent before the client saw
                # that refusal (or never saw it: lost with its connection).
                assert earlier in model.refused, (later, earlier, model.log)
                seen = model.first_refusal_seen.get(earlier, model.clock + 1)
                assert model.committed_by[later] < seen, (later, earlier, model.log)


# --- against a real server ----------------------------------------------------------------------


class OutageStore(MemoryStore):
    """A store that fails every append from the ``fail_from``-th until ``recover()``."""

    def __init__(self, fail_from: int) -> None:
        super().__init__()
        self.fail_from = fail_from
        self.appends = 0
        self.failed = 0
        self.down = False

    def append_future(self, session: str, type: str, data: Any, sender: Sender,
                      key: str | None = None) -> asyncio.Future[Appended]:
        self.appends += 1
        if self.appends == self.fail_from:
            self.down = True
        if not self.down:
            return super().append_future(session, type, data, sender, key)
        self.failed += 1
        future: asyncio.Future[Appended] = asyncio.get_running_loop().create_future()
        future.set_exception(StoreError("store down (test)"))
        return future


async def log_order(store: MemoryStore, session: str) -> list[int]:
    events = await store.read(session, 0, 10_000)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    return [e.data["i"] for e in events]


async def test_publishes_refused_by_a_store_outage_commit_in_call_order(tmp_path: Path) -> None:
    """Everything in flight behind the first failure fails too (the outage lasts until the
    client has stopped sending), which is when the protocol allows exact call order: 200
    pipelined publishes land in call order, once each, and each returns its own cursor.
    (Fewer than 100 fail in a row: the server closes a connection after ``max_errors_in_row``
    errors, temporary ones included.)"""
    store = OutageStore(fail_from=131)
    srv = make_server(tmp_path, store=store)
    await srv.start()
    try:
        async with client_for(srv) as client:
            session = await client.attach("demo")
            calls = [asyncio.ensure_future(session.publish("n", {"i": i})) for i in range(200)]
            # Recover once the client holds the session's publishes with none in flight.
            proto = client._proto
            await until(lambda: "demo" in proto.retrying and store.failed >= 1
                        and not any(p.in_flight for p in proto.publishes.values()))
            store.down = False
            cursors = await asyncio.gather(*calls)
        order = await log_order(store, "demo")
        assert order == list(range(200)), f"{inversions(order)} inversions"
        events = await store.read("demo", 0, 10_000)
        assert cursors == [str(e.cursor) for e in events]
        assert store.failed >= 70  # the failure and everything in flight behind it
    finally:
        await srv.stop()


@dataclass
class Wire:
    """Records, in one order, the publishes a client sends and the refusals it reads; keyed
    by the publish's ``data["i"]`` (its call index)."""

    clock: int = 0
    first_sent: dict[int, int] = field(default_factory=dict)  # call index → clock
    last_sent: dict[int, int] = field(default_factory=dict)
    refused: dict[int, int] = field(default_factory=dict)  # call index → first refusal clock
    index: dict[int, int] = field(default_factory=dict)  # request id → call index

    def attach(self, client: Client) -> None:
        proto, send = client._proto, client._send
        receive = proto.receive

        def recording_send(frame: dict[str, Any]) -> None:
            if frame.get("op") == "publish":
                self.clock += 1
                i = self.index[frame["id"]] = frame["data"]["i"]
                self.first_sent.setdefault(i, self.clock)
                self.last_sent[i] = self.clock
            send(frame)

        def recording_receive(frame: dict[str, Any]) -> list[Outcome]:
            if frame.get("op") == "error" and frame.get("temporary"):
                self.clock += 1
                self.refused.setdefault(self.index[frame["id"]], self.clock)
            return receive(frame)

        client._send = recording_send  # type: ignore[method-assign]
        proto.receive = recording_receive  # type: ignore[method-assign]


async def test_rate_limited_pipelined_publishes_keep_call_order(tmp_path: Path) -> None:
    """200 publishes pipelined on one session through a small rate limit (many refusals):
    nothing lost or duplicated, and the log order equals the call order except, possibly,
    for publishes already in flight when an earlier one was refused and that the server
    accepted: the only inversion the protocol allows. With these settings (a token every
    25 ms, a wave of refusals answered in a few ms) there is normally none at all."""
    store = MemoryStore()
    srv = make_server(tmp_path, store=store, publish_rate=40.0, publish_burst=150)
    await srv.start()
    try:
        async with client_for(srv) as client:
            wire = Wire()
            wire.attach(client)
            session = await client.attach("demo")
            await asyncio.gather(*(session.publish("n", {"i": i}) for i in range(200)))
        order = await log_order(store, "demo")
        assert sorted(order) == list(range(200))
        assert wire.refused  # the limit did bite (~50 refusals unless the machine is slow)
        for pos, later in enumerate(order):
            for earlier in order[pos + 1:]:
                if later > earlier:  # allowed only for one sent before that refusal
                    assert earlier in wire.refused, order
                    assert wire.last_sent[later] == wire.first_sent[later], order
                    assert wire.first_sent[later] < wire.refused[earlier], order
    finally:
        await srv.stop()


async def test_session_state_follows_attach_reconnect_and_detach(server: Server) -> None:
    async with client_for(server) as client:
        session = await client.attach("demo")
        assert session.state is SessionState.ATTACHED
        seen: list[SessionState] = []
        client.on_state(lambda state: seen.append(session.state)
                        if state is ConnectionState.RECONNECTING else None)
        await drop_connections(server, client)
        await until(lambda: bool(seen) and session.state is SessionState.ATTACHED)
        assert seen[0] is SessionState.REATTACHING and session.resumed is True
        pending = asyncio.ensure_future(session.publish("n", {}))
        await asyncio.sleep(0)
        detaching = asyncio.ensure_future(session.detach())
        await asyncio.sleep(0)
        assert session.state is SessionState.DETACHING  # waits for the pending publish
        with pytest.raises(SessionClosed):
            await session.publish("n", {})
        await detaching
        assert (await pending) is not None
        assert session.state is SessionState.DETACHED
        other = await client.attach("other")
        with pytest.raises(AttachError):
            await client.attach("forbidden-" + "x" * 200)  # refused: invalid session id
    assert other.state is SessionState.CLOSED
    assert session.state is SessionState.DETACHED
    await session.detach()  # nothing to do any more
    assert session.state is SessionState.DETACHED


def test_session_state_transitions_are_checked() -> None:
    assert SESSION_TRANSITIONS[SessionState.DETACHED] == frozenset()
    assert SESSION_TRANSITIONS[SessionState.CLOSED] == frozenset()
    assert SessionState.REATTACHING in SESSION_TRANSITIONS[SessionState.ATTACHED]
    assert SessionState.REATTACHING not in SESSION_TRANSITIONS[SessionState.ATTACHING]

    async def check() -> None:
        session = Session(Client("ws://127.0.0.1:1"), "demo", None, 4)
        assert session.state is SessionState.ATTACHING
        session._lost()  # never attached: still attaching (the attach is re-sent)
        assert session.state is SessionState.ATTACHING
        session._attached(resumed=False)
        assert session.state is SessionState.ATTACHED and session.resumed is False
        with pytest.raises(RuntimeError, match="ATTACHED -> DETACHED"):
            session._transition(SessionState.DETACHED)
        session._closed()
        with pytest.raises(RuntimeError):
            session._transition(SessionState.ATTACHED)
        session._attached(resumed=True)  # a late attached frame does not revive it
        assert session.state is SessionState.CLOSED

    asyncio.run(check())


async def test_retry_after_from_the_server_is_honoured() -> None:
    """A refusal with ``retry_after`` (ms) delays the re-send by that much, not by the
    client's backoff (here at most 20 ms)."""
    loop = asyncio.get_running_loop()
    publishes: list[tuple[float, dict[str, Any]]] = []

    async def handler(ws: web.WebSocketResponse) -> None:
        async for msg in ws:
            frame = json.loads(msg.data)
            if frame["op"] == "hello":
                await ws.send_json({"op": "welcome", "id": frame["id"], "heartbeat": 15.0})
            elif frame["op"] == "attach":
                await ws.send_json({"op": "attached", "id": frame["id"], "session": "demo",
                                    "resumed": True, "cursor": f"{EPOCH}:0", "epoch": EPOCH})
            elif frame["op"] == "publish":
                publishes.append((loop.time(), frame))
                if len(publishes) == 1:
                    await ws.send_json({**REFUSED, "id": frame["id"], "retry_after": 300})
                else:
                    await ws.send_json({"op": "published", "id": frame["id"], "seq": 1,
                                        "cursor": f"{EPOCH}:1", "duplicate": False})

    async with fake_server(handler) as port, \
            Client(f"ws://127.0.0.1:{port}", backoff_base=0.02, backoff_cap=0.02) as client:
        session = await client.attach("demo")
        assert await session.publish("n", {}) == f"{EPOCH}:1"
    (first, refused), (second, again) = publishes
    assert refused["key"] == again["key"]
    assert second - first >= 0.3
