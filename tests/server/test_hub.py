"""The hub's delivery state machine.

:class:`Delivery` is tested without an event loop: a simulator plays the part of
:class:`Subscription` (the outbox, the reader task as a generator, the live channel) and
hypothesis interleaves commits, live deliveries (in order, duplicated, lost, out of order),
transient events, a filling and draining outbox, the reader's steps, catch-up requests, a
snapshot, a peer that goes away and an unsubscribe. The oracle reads the whole log: what the
peer got is exactly the log after its start position, in order, no gap, no duplicate.

Then a few tests of :class:`Subscription` itself, on an event loop with a fake store.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tether.protocol.events import Event, Sender
from tether.server.hub import (
    FORMAT_JSON,
    TABLE,
    Action,
    Delivery,
    DeliveryError,
    Hub,
    Input,
    Outbox,
    State,
    encode_event,
)
from tether.server.metrics import Metrics

FRAME = 10  # bytes of every simulated frame


def persistent(seq: int) -> bytes:
    return b"e%09d" % seq


def transient(n: int) -> bytes:
    return b"t%09d" % n


# --- the table ---------------------------------------------------------------------------


def test_the_table_is_total() -> None:
    assert set(TABLE) == {(state, event) for state in State for event in Input}
    for (state, _), (next_state, action) in TABLE.items():
        assert isinstance(next_state, State) and isinstance(action, Action)
        if action is Action.INVALID:
            assert next_state is state


def test_closed_is_final_and_every_other_state_can_close() -> None:
    for (state, _), (next_state, _) in TABLE.items():
        if state is State.CLOSED:
            assert next_state is State.CLOSED
    for state in State:
        assert TABLE[state, Input.CANCEL][0] is State.CLOSED


def test_invalid_inputs_raise_and_change_nothing() -> None:
    for (state, event), (_, action) in TABLE.items():
        if action is not Action.INVALID:
            continue
        d = Delivery(3, 100)
        d.state = state
        with pytest.raises(DeliveryError):
            d.step(event)
        assert d.state is state


def test_example_transitions() -> None:
    d = Delivery(2, 100)
    assert d.state is State.BUFFERING
    # Before the reply, everything waits, whatever it is.
    assert d.live(3, False, persistent(3), True) == (Input.NEXT, Action.BUFFER)
    assert d.live(0, True, transient(1), False) == (Input.TRANSIENT_FULL, Action.BUFFER)
    assert d.live(9, False, persistent(9), True) == (Input.GAP, Action.BUFFER)
    assert d.last_seq == 2 and d.pending_bytes == 3 * FRAME
    assert d.step(Input.START) is Action.START_READ and d.state is State.CATCHING_UP
    assert d.step(Input.START) is Action.NONE  # a reader is at work already
    # The reader: a whole page, then the tail with a full outbox, then with room.
    assert d.from_store(3) and not d.from_store(3) and d.last_seq == 3
    assert d.page_read(True, False) is Action.READ
    assert d.page_read(False, False) is Action.DRAIN_THEN_READ
    assert d.page_read(False, True) is Action.MERGE
    # 3 was read from the store; the buffered 3 is a duplicate, 9 shows a gap.
    assert d.merge() == (Action.READ, [transient(1)])
    assert d.state is State.CATCHING_UP and d.pending_bytes == 0 and d.last_seq == 3
    d.live(4, False, persistent(4), True)
    d.live(4, False, persistent(4), True)
    d.live(0, True, transient(2), True)
    d.live(5, False, persistent(5), True)
    assert d.merge() == (Action.GO_LIVE, [persistent(4), transient(2), persistent(5)])
    assert d.state is State.LIVE and d.last_seq == 5 and d.pending == []
    # Live.
    assert d.live(6, False, persistent(6), True) == (Input.NEXT, Action.DELIVER)
    assert d.last_seq == 6
    assert d.live(6, False, persistent(6), True) == (Input.DUPLICATE, Action.DROP)
    assert d.live(0, True, transient(3), True) == (Input.TRANSIENT, Action.PASS)
    assert d.live(0, True, transient(4), False) == (Input.TRANSIENT_FULL, Action.DROP)
    assert d.state is State.LIVE and d.last_seq == 6
    assert d.live(7, False, persistent(7), False) == (Input.FULL, Action.START_READ)
    assert d.state is State.CATCHING_UP and d.last_seq == 6 and d.pending_bytes == 0
    assert d.page_read(False, True) is Action.MERGE
    assert d.merge() == (Action.GO_LIVE, [])
    assert d.live(9, False, persistent(9), True) == (Input.GAP, Action.START_READ)
    assert d.step(Input.CANCEL) is Action.STOP_READ and d.state is State.CLOSED
    assert d.live(7, False, persistent(7), True) == (Input.NEXT, Action.DROP)
    assert d.step(Input.START) is Action.NONE and d.step(Input.CANCEL) is Action.NONE


def test_an_overflowing_buffer_is_dropped_and_the_store_read_again() -> None:
    d = Delivery(0, 2 * FRAME)
    d.step(Input.START)
    for seq in (1, 2):
        assert d.live(seq, False, persistent(seq), True)[1] is Action.BUFFER
    assert d.pending_bytes == 2 * FRAME and not d.overflowed
    d.live(3, False, persistent(3), True)
    assert d.overflowed and d.pending_bytes == 0  # freed at once
    d.live(0, True, b"t", True)  # even a small one: the merge would drop it anyway
    assert d.pending_bytes == 0
    assert d.page_read(False, True) is Action.MERGE
    assert d.merge() == (Action.READ, [])
    assert not d.overflowed and d.last_seq == 0 and d.state is State.CATCHING_UP


def test_closing_frees_the_buffer() -> None:
    for event in (Input.CANCEL, Input.ABORT):
        d = Delivery(0, 100)
        d.live(1, False, persistent(1), True)
        d.step(Input.START)
        d.live(2, False, persistent(2), True)
        d.step(event)
        assert d.state is State.CLOSED and d.pending == [] and d.pending_bytes == 0


def test_the_snapshot_may_move_the_position_while_buffering() -> None:
    d = Delivery(0, 100)
    for seq in (4, 5, 6):
        d.live(seq, False, persistent(seq), True)
    d.last_seq = 5  # what the snapshot covered
    d.step(Input.START)
    assert d.page_read(False, True) is Action.MERGE
    assert d.merge() == (Action.GO_LIVE, [persistent(6)])


# --- the oracle ----------------------------------------------------------------------------


@dataclass
class SimOutbox:
    """The peer's outbox: bounded like :class:`Outbox` (full at ``limit``; drained at half)."""

    limit: int
    queued: int = 0
    closed: bool = False
    got: list[bytes] = field(default_factory=list)

    @property
    def full(self) -> bool:
        return self.queued >= self.limit

    def push(self, data: bytes) -> None:
        if self.closed:
            return
        self.got.append(data)
        self.queued += len(data)


class Sim:
    """Plays :class:`Subscription`: feeds the inputs, performs the actions."""

    def __init__(self, history: int, start: int, limit: int, page: int) -> None:
        self.log = list(range(1, history + 1))
        self.start = start
        self.page = page
        self.outbox = SimOutbox(limit)
        self.d = Delivery(start, limit)
        self.reader: Generator[str, None, None] | None = None
        self.inflight: list[int] = []  # committed, not yet through the live channel
        self.transients = 0
        self.catchups: list[str] = []
        self.cancelled = False
        self.lossy = False  # the live channel lost an event
        self.late = 0  # how late in its await a store read sees the log
        self.offered = 0  # the highest seq offered live
        self.attached = False  # catch_up("attach") was called
        self.lossy_channel = False  # "publish" may lose events

    # The channel.

    def commit(self) -> None:
        self.log.append(len(self.log) + 1)
        self.inflight.append(len(self.log))

    def offer(self, seq: int, is_transient: bool = False) -> None:
        if is_transient:
            self.transients += 1
            data = transient(self.transients)
        else:
            data = persistent(seq)
            self.offered = max(self.offered, seq)
        cause, action = self.d.live(seq, is_transient, data, not self.outbox.full)
        if action is Action.DELIVER or action is Action.PASS:
            self.outbox.push(data)
        elif action is Action.START_READ:
            self.start_reader({Input.GAP: "gap", Input.FULL: "overflow"}[cause])
        else:
            assert action in (Action.DROP, Action.BUFFER)

    # Subscription.catch_up, cancel and the reader.

    def catch_up(self, reason: str) -> None:
        if self.d.step(Input.START) is Action.START_READ:
            self.start_reader(reason)

    def start_reader(self, reason: str) -> None:
        assert self.reader is None
        self.catchups.append(reason)
        self.reader = self.read()

    def cancel(self) -> None:
        self.cancelled = True
        if self.d.step(Input.CANCEL) is Action.STOP_READ:
            assert self.reader is not None
            reader, self.reader = self.reader, None
            reader.close()  # the task is cancelled at its await
        assert self.reader is None

    def step_reader(self) -> None:
        if self.reader is not None:
            next(self.reader, None)

    def wait_drained(self) -> Generator[str, None, None]:
        while not self.outbox.closed and self.outbox.queued > self.outbox.limit // 2:
            yield "drain"

    def read(self) -> Generator[str, None, None]:
        """Subscription._read, an await being a yield."""
        d, outbox = self.d, self.outbox
        action = Action.READ
        try:
            while not outbox.closed:
                if action is Action.READ:
                    after, called = d.last_seq, len(self.log)
                    yield "read"  # commits land while the read is on its way
                    # The read saw the log as it was at some moment of its await.
                    seen = called + self.late % (len(self.log) - called + 1)
                    events = [seq for seq in self.log[:seen] if seq > after][:self.page]
                    for seq in events:
                        if outbox.full:
                            yield from self.wait_drained()
                            if outbox.closed:
                                return
                        if d.from_store(seq):
                            outbox.push(persistent(seq))
                    action = d.page_read(len(events) >= self.page, not outbox.full)
                elif action is Action.DRAIN_THEN_READ:
                    yield from self.wait_drained()
                    action = Action.READ
                elif action is Action.MERGE:
                    action, frames = d.merge()
                    for data in frames:
                        outbox.push(data)
                    if action is Action.GO_LIVE:
                        return
                else:
                    raise AssertionError(action)
        finally:
            self.reader = None
            if d.state is State.CATCHING_UP:
                d.step(Input.ABORT)

    # The oracle.

    def delivered(self) -> list[int]:
        return [int(data[1:]) for data in self.outbox.got if data.startswith(b"e")]

    def check(self) -> None:
        seqs = self.delivered()
        # In order, no gap, no duplicate: a prefix of the log after the start.
        assert seqs == list(range(self.start + 1, self.start + 1 + len(seqs)))
        if not self.outbox.closed:
            assert self.d.last_seq == (seqs[-1] if seqs else self.start)
        tids = [int(data[1:]) for data in self.outbox.got if data.startswith(b"t")]
        assert tids == sorted(set(tids))  # transient events keep their order, once each
        assert self.d.pending_bytes <= self.outbox.limit
        # Pushed only below the limit, but for the merge of a buffer (itself at most limit).
        assert self.outbox.queued <= 2 * self.outbox.limit
        assert (self.reader is not None) == (self.d.state is State.CATCHING_UP)
        if self.d.state is State.LIVE:  # nothing seen live is left behind
            assert self.offered <= self.d.last_seq

    def settle(self) -> None:
        """Nothing more is late: everything reaches the peer.

        What is in flight arrives, unless the live channel is lossy: then it is lost, and the
        tail check (catch_up("stale")) finds what is missing. A lossless channel needs none.
        """
        while self.inflight:
            if self.lossy:
                self.inflight.clear()
            else:
                self.outbox.queued = 0
                self.offer(self.inflight.pop(0))
                self.check()
        for _ in range(10_000):
            self.outbox.queued = 0
            state = self.d.state
            if state is State.BUFFERING:
                self.catch_up("attach")
            elif state is State.CATCHING_UP:
                self.step_reader()
            elif state is State.LIVE and self.d.last_seq < len(self.log):
                assert self.lossy or self.outbox.closed, "stuck behind a lossless channel"
                self.catch_up("stale")  # Hub.check_tails
            else:
                break
            self.check()
        assert self.d.state in (State.LIVE, State.CLOSED)


# Op names, repeated by weight; each with a small integer argument.
OP_NAMES = [
    *["commit"] * 4,  # the store commits the next event; the live channel has it in flight
    *["live"] * 4,  # the n-th in flight arrives (0: in order; else out of order)
    "lose",  # the n-th in flight is lost (an at-most-once channel)
    "again",  # the event committed n before the head arrives again (a duplicate)
    "transient",  # a presence or typing event
    "fill",  # other frames fill the outbox
    *["drain"] * 3,  # the peer reads everything queued
    *["step"] * 6,  # the reader goes on: 1 + n awaits
    "stale",  # catch_up("stale") from the tail check
    "snapshot",  # the owner sets last_seq after its snapshot, before the reply
]
OPS = st.lists(st.tuples(st.sampled_from(OP_NAMES), st.integers(0, 3)), min_size=20,
               max_size=150)
# Where the reply is sent (catch_up("attach")), and whether the peer goes away or unsubscribes.
ATTACH = st.integers(0, 30)
ENDING = st.one_of(st.none(), st.tuples(st.sampled_from(["gone", "cancel"]),
                                        st.integers(0, 150)))


def with_attach(ops: list[tuple[str, int]], attach: int,
                ending: tuple[str, int] | None = None) -> list[tuple[str, int]]:
    ops = list(ops)
    ops.insert(min(attach, len(ops)), ("attach", 0))
    if ending is not None:
        ops.insert(min(ending[1], len(ops)), (ending[0], 0))
    return ops


def apply(sim: Sim, op: str, n: int) -> None:
    if op == "commit":
        sim.commit()
    elif op == "publish":  # an in-order channel: offered at once, or lost (n == 3, if lossy)
        sim.commit()
        seq = sim.inflight.pop()
        if sim.lossy_channel and n == 3:
            sim.lossy = True
        else:
            sim.offer(seq)
    elif op == "live" and sim.inflight:
        sim.offer(sim.inflight.pop(n % len(sim.inflight)))
    elif op == "lose" and sim.inflight:
        sim.inflight.pop(n % len(sim.inflight))
        sim.lossy = True
    elif op == "again" and sim.log:
        sim.offer(max(1, len(sim.log) - n))
    elif op == "transient":
        sim.offer(0, is_transient=True)
    elif op == "fill" and not sim.outbox.closed:
        sim.outbox.queued = max(sim.outbox.queued, sim.outbox.limit)
    elif op == "drain":
        sim.outbox.queued = 0
    elif op == "step":
        sim.late = n
        for _ in range(1 + n):
            sim.step_reader()
    elif op == "attach" and not sim.attached:
        sim.attached = True
        sim.catch_up("attach")
    elif op == "stale" and sim.attached:
        sim.catch_up("stale")  # the tail check asks live subscriptions only; any may
    elif op == "snapshot" and sim.d.state is State.BUFFERING:
        sim.d.last_seq = sim.start = len(sim.log)
    elif op == "gone":
        sim.outbox.closed = True
        sim.outbox.queued = 0
    elif op == "cancel":
        sim.cancel()
    sim.check()


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 12), st.integers(0, 12), st.sampled_from([1, 2, 3, 5, 100]),
       st.sampled_from([1, 2, 4, 10]), OPS, ATTACH, ENDING)
def test_delivery_is_the_log_after_the_start(history: int, start: int, frames: int, page: int,
                                             ops: list[tuple[str, int]], attach: int,
                                             ending: tuple[str, int] | None) -> None:
    sim = Sim(history, min(start, history), frames * FRAME, page)
    for op, n in with_attach(ops, attach, ending):
        apply(sim, op, n)
    if sim.cancelled or sim.outbox.closed:
        sim.settle()
        assert sim.d.state is State.CLOSED or not sim.cancelled
        return  # a prefix: checked at every step
    sim.settle()
    assert sim.d.state is State.LIVE
    assert sim.delivered() == sim.log[sim.start:]
    assert sim.d.last_seq == len(sim.log)
    assert set(sim.catchups) <= {"attach", "gap", "overflow", "stale"}


CHANNEL_OPS = st.lists(st.tuples(st.sampled_from([
    *["publish"] * 6,  # commit, and the live channel offers it at once (or loses it)
    *["step"] * 3, *["drain"] * 2, "fill", "transient", "stale",
]), st.integers(0, 3)), min_size=20, max_size=150)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 12), st.integers(0, 12), st.sampled_from([1, 2, 3, 5, 100]),
       st.sampled_from([1, 2, 4, 10]), CHANNEL_OPS, ATTACH, st.booleans())
def test_an_in_order_channel(history: int, start: int, frames: int, page: int,
                             ops: list[tuple[str, int]], attach: int, lossy: bool) -> None:
    """The live channel of one node (in order, exactly once) or of Redis pub/sub (in order, at
    most once: a publish with n == 3 is lost). Lossless, a subscription never sees a gap."""
    sim = Sim(history, min(start, history), frames * FRAME, page)
    sim.lossy_channel = lossy
    for op, n in with_attach(ops, attach):
        apply(sim, op, n)
    sim.settle()
    assert sim.delivered() == sim.log[sim.start:]
    if not sim.lossy:
        assert "gap" not in sim.catchups


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 40), st.sampled_from([1, 3, 7]), st.sampled_from([1, 2, 100]))
def test_a_peer_that_keeps_up_needs_one_catch_up(commits: int, page: int, frames: int) -> None:
    """Lossless, in order, a peer that keeps up: after the attach, every event goes live."""
    sim = Sim(5, 2, frames * FRAME, page)
    sim.catch_up("attach")
    while sim.d.state is State.CATCHING_UP:
        sim.step_reader()
        sim.outbox.queued = 0
    for _ in range(commits):
        sim.commit()
        sim.offer(sim.inflight.pop(0))
        sim.outbox.queued = 0
        sim.check()
    assert sim.catchups == ["attach"]
    assert sim.delivered() == sim.log[2:]


# --- Subscription, on an event loop ---------------------------------------------------------


class FakeStore:
    def __init__(self) -> None:
        self.log: list[Event] = []
        self.listeners: dict[str, Callable[[Event], None]] = {}
        self.reads = 0
        self.limits: list[int] = []  # of each read

    async def head(self, session: str) -> Any:
        return SimpleNamespace(last_seq=len(self.log))

    def commit(self, n: int = 1) -> list[Event]:
        new = [Event("s", "e1", len(self.log) + 1 + i, "message", {"i": i}, Sender("a"), 0)
               for i in range(n)]
        self.log.extend(new)
        return new

    async def read(self, session: str, after: int, limit: int) -> list[Event]:
        self.reads += 1
        self.limits.append(limit)
        await asyncio.sleep(0)
        return [e for e in self.log if e.seq > after][:limit]

    def listen(self, session: str, listener: Callable[[Event], None]) -> None:
        self.listeners[session] = listener

    def unlisten(self, session: str, listener: Callable[[Event], None]) -> None:
        del self.listeners[session]


class RecordingSink:
    """Writes at once while ``open``; otherwise the outbox's writer task waits on ``gate``."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.open = True
        self.gate = asyncio.Event()
        self.gate.set()

    async def send(self, data: bytes) -> None:
        await self.gate.wait()
        self.frames.append(data)

    async def send_many(self, frames: list[bytes]) -> None:
        await self.gate.wait()
        self.frames.extend(frames)

    def write_now(self, frames: list[bytes]) -> bool:
        if not self.open:
            return False
        self.frames.extend(frames)
        return True

    def abort(self) -> None:
        pass

    def seqs(self) -> list[int | None]:
        return [orjson.loads(f).get("seq") for f in self.frames]  # None: presence


class FakePeer:
    format = FORMAT_JSON

    def __init__(self, limit: int) -> None:
        self.sink = RecordingSink()
        self.outbox = Outbox(self.sink, limit, Metrics())


def make_hub(page: int = 3) -> tuple[Hub, FakeStore, Metrics]:
    store = FakeStore()
    metrics = Metrics()
    return Hub(cast(Any, store), metrics, catchup_page=page), store, metrics


def count(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def until(predicate: Callable[[], bool]) -> None:
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("timed out")


def fan_out(hub: Hub, events: list[Event]) -> None:
    for event in events:
        hub.channels["s"].on_event(event)


async def test_attach_catches_up_then_goes_live() -> None:
    hub, store, metrics = make_hub(page=3)
    store.commit(7)
    peer = FakePeer(1 << 20)
    sub = hub.subscribe(peer, "s", "e1", 2)
    assert sub.catching_up and sub.task is None
    fan_out(hub, store.commit())  # before the reply: buffered
    assert peer.sink.frames == []
    sub.catch_up("attach")
    await until(lambda: not sub.catching_up)
    assert sub.task is None and sub.delivery.state is State.LIVE
    assert peer.sink.seqs() == [3, 4, 5, 6, 7, 8]
    assert store.reads == 3  # 3-5, 6-8, the tail; the buffered 8 was a duplicate by then
    fan_out(hub, store.commit(2))
    await asyncio.sleep(0)
    assert peer.sink.seqs()[-2:] == [9, 10] and sub.last_seq == 10
    assert count(metrics, "tether_catchups_total", reason="attach") == 1
    assert metrics.hot.events_delivered == 8


async def test_catch_up_pages_of_large_events_stay_near_a_mebibyte() -> None:
    hub, store, _ = make_hub(page=50)
    body = "x" * (100 << 10)  # 50 events of 100 KiB would make a 5 MiB page
    store.log.extend(Event("s", "e1", seq, "message", {"b": body}, Sender("a"), 0)
                     for seq in range(1, 61))
    peer = FakePeer(64 << 20)
    sub = hub.subscribe(peer, "s", "e1", 0)
    sub.catch_up("attach")
    await until(lambda: not sub.catching_up)
    assert peer.sink.seqs() == list(range(1, 61))  # all of them, in order
    assert store.limits[0] == 50  # then as many as fit 1 MiB: 10 of these
    assert len(store.limits) > 2 and set(store.limits[1:]) == {10}
    # The session remembers: the next catch-up starts at that size.
    late = hub.subscribe(FakePeer(64 << 20), "s", "e1", 0)
    late.catch_up("attach")
    await until(lambda: not late.catching_up)
    assert store.limits[-1] == 10


async def test_a_first_page_holds_at_most_a_mebibyte_of_the_largest_events() -> None:
    store = FakeStore()
    hub = Hub(cast(Any, store), Metrics(), catchup_page=500, max_event_bytes=256 << 10)
    store.commit(1000)  # small ones: the first page is 4 events, the next ones 500
    peer = FakePeer(64 << 20)
    sub = hub.subscribe(peer, "s", "e1", 0)
    sub.catch_up("attach")
    await until(lambda: not sub.catching_up)
    assert peer.sink.seqs() == list(range(1, 1001))
    assert store.limits[:3] == [4, 500, 500]


async def test_a_gap_reads_the_store_and_transients_pass_through() -> None:
    hub, store, metrics = make_hub()
    sub = hub.subscribe(FakePeer(1 << 20), "s", "e1", 0)
    peer = cast(FakePeer, sub.peer)
    sub.catch_up("attach")
    await until(lambda: not sub.catching_up)
    first, _lost, third = store.commit(3)
    fan_out(hub, [first, third])  # the second is lost on the way
    assert sub.catching_up
    presence = Event("s", "e1", 0, "presence.update", {"member": "m"}, Sender("a"), 0, True)
    fan_out(hub, [presence])  # buffered while catching up, passed at the merge
    await until(lambda: not sub.catching_up)
    fan_out(hub, [presence])  # live: passed through
    await asyncio.sleep(0)
    assert peer.sink.seqs() == [1, 2, 3, None, None]
    assert count(metrics, "tether_catchups_total", reason="gap") == 1
    assert count(metrics, "tether_buffer_overflows_total") == 0


async def test_a_full_outbox_turns_to_the_store() -> None:
    event_bytes = len(encode_event(FORMAT_JSON, FakeStore().commit()[0]))
    hub, store, metrics = make_hub(page=2)
    peer = FakePeer(3 * event_bytes)
    sub = hub.subscribe(peer, "s", "e1", 0)
    sub.catch_up("attach")
    await until(lambda: not sub.catching_up)
    peer.sink.open = False  # the transport pauses
    peer.sink.gate.clear()
    presence = Event("s", "e1", 0, "presence.update", {}, Sender("a"), 0, True)
    for event in store.commit(3):
        fan_out(hub, [event])
    assert not sub.catching_up and peer.outbox.full
    fan_out(hub, [presence])  # an ephemeral event is dropped under pressure
    fan_out(hub, store.commit(12))  # the first one finds the outbox full
    assert sub.catching_up
    assert count(metrics, "tether_buffer_overflows_total") == 1
    assert count(metrics, "tether_catchups_total", reason="overflow") == 1
    for _ in range(5):  # let the reader take its turns: it reads, then waits to drain
        await asyncio.sleep(0)
    assert peer.outbox.full  # the reader waits for the peer to drain
    peer.sink.open = True
    peer.sink.gate.set()
    await until(lambda: not sub.catching_up)
    await peer.outbox.flush()
    assert peer.sink.seqs() == list(range(1, 16))


async def test_unsubscribe_stops_the_reader() -> None:
    hub, store, metrics = make_hub(page=1)
    store.commit(5)
    peer = FakePeer(1 << 20)
    sub = hub.subscribe(peer, "s", "e1", 0)
    sub.catch_up("attach")
    task = sub.task
    assert task is not None
    await asyncio.sleep(0)
    hub.unsubscribe(sub)
    assert sub.task is None and sub.delivery.state is State.CLOSED
    await asyncio.wait([task])
    assert task.cancelled()
    assert hub.channels == {} and store.listeners == {}
    sub.catch_up("stale")  # too late: nothing starts
    assert sub.task is None
    assert count(metrics, "tether_attachments") == 0


async def test_a_dead_peer_ends_the_reader() -> None:
    hub, store, _ = make_hub(page=2)
    store.commit(5)
    peer = FakePeer(1 << 20)
    sub = hub.subscribe(peer, "s", "e1", 0)
    peer.outbox.close()
    sub.catch_up("attach")
    await until(lambda: sub.task is None)
    assert sub.delivery.state is State.CLOSED and store.reads == 0
    fan_out(hub, store.commit())
    assert sub.delivery.pending == []


async def test_check_tails_heals_a_lost_last_event() -> None:
    hub, store, metrics = make_hub()
    peer = FakePeer(1 << 20)
    sub = hub.subscribe(peer, "s", "e1", 0)
    sub.catch_up("attach")
    await until(lambda: not sub.catching_up)
    fan_out(hub, store.commit(2)[:1])  # the second is lost
    await hub.check_tails()  # notes the head
    assert not sub.catching_up
    await hub.check_tails()  # still behind it: read the store
    await until(lambda: not sub.catching_up and sub.last_seq == 2)
    assert peer.sink.seqs() == [1, 2]
    assert count(metrics, "tether_catchups_total", reason="stale") == 1
