"""Live fan-out, bounded outbound buffers and catch-up from the store.

The log is the truth: every delivery is a read of a session's log from a cursor, and the live
path is only a shortcut for that read. A :class:`Subscription` is one peer's position in one
session. It is *live* while each committed event arrives exactly after the previous one and the
peer's :class:`Outbox` has room; otherwise it *catches up*: it buffers live events (bounded),
reads the store from its last delivered seq page by page, waiting for the peer to drain between
pages, then merges the buffer, dedupes by seq and turns live again. The same mechanism serves
resume after a disconnect, a late joiner, a slow consumer and a gap in an at-most-once live
channel (Redis pub/sub).

What to do is decided by :class:`Delivery`, a state machine without I/O: a literal table
``(State, Input) -> (State, Action)`` (:data:`TABLE`). :class:`Subscription` feeds it inputs and
performs the actions it returns: push to the outbox, run the reader task that reads the store,
wait for the outbox to drain.

Each event is encoded once per wire format; every subscriber of that format gets the same bytes.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from functools import partial
from typing import Protocol

import orjson

from tether.protocol.codec import JSON, MSGPACK
from tether.protocol.encoded import FORMAT_JSON as FORMAT_JSON
from tether.protocol.encoded import FORMAT_JSON_WS as FORMAT_JSON_WS
from tether.protocol.encoded import FORMAT_SSE as FORMAT_SSE
from tether.protocol.encoded import ws_frame as ws_frame
from tether.protocol.events import PRESENCE_JOIN, PRESENCE_LEAVE, PRESENCE_UPDATE, Event
from tether.protocol.frames import event_frame, presence_frame
from tether.server.metrics import Metrics
from tether.store.base import SessionStore, read_encoded
from tether.store.readable import placeholder

log = logging.getLogger("tether.hub")

# JSON, JSON with the WebSocket header and SSE are also what a store can build from its stored
# bytes (tether/protocol/encoded.py), hence one definition of their names.
FORMAT_MSGPACK = "msgpack"
# The same frames with their WebSocket header already on (server frames are unmasked: a 2-10
# byte header, then the payload): the header and the copy that joins it to the payload are
# made once per event, not once per subscriber. For sockets that write frames themselves;
# permessage-deflate must compress each payload, so a compressing socket uses the plain ones.
FORMAT_MSGPACK_WS = "msgpack+ws"

_BATCH_BYTES = 256 << 10  # at most this much per transport write from one outbox
# A catch-up page is counted in events (``catchup_page``), and then kept near this many bytes:
# 500 events of 10 KB would be a 5 MB page, held by the store (and, with --workers, by the
# sequencer's answer and its frame) for a peer whose outbox takes 1 MiB at a time.
_PAGE_BYTES = 1 << 20

_PRESENCE_ACTIONS = {PRESENCE_JOIN: "join", PRESENCE_LEAVE: "leave", PRESENCE_UPDATE: "update"}


def _frame_for(event: Event) -> dict[str, object]:
    action = _PRESENCE_ACTIONS.get(event.type) if event.transient else None
    if action is not None:
        return presence_frame(event.session, action, [event.data])
    return event_frame(event)


def encode_event(fmt: str, event: Event) -> bytes:
    """The bytes of ``event`` in wire format ``fmt``.

    An event that cannot be encoded (one stored before publish validation refused such data)
    goes out as its ``tether.unreadable`` placeholder: one bad event never stops a reader.
    """
    try:
        return _encode(fmt, event)
    except (TypeError, ValueError, OverflowError) as exc:
        if event.transient:
            raise  # nothing to stand in for; the channel drops it
        return _encode(fmt, placeholder(event, f"not encodable: {exc}"))


def _encode(fmt: str, event: Event) -> bytes:
    frame = _frame_for(event)
    if fmt == FORMAT_JSON_WS:
        return ws_frame(JSON.encode(frame), False)
    if fmt == FORMAT_JSON:
        return JSON.encode(frame)
    if fmt == FORMAT_MSGPACK_WS:
        return ws_frame(MSGPACK.encode(frame), True)
    if fmt == FORMAT_MSGPACK:
        return MSGPACK.encode(frame)
    body = orjson.dumps(frame)
    if event.transient:
        return b"event: " + str(frame["op"]).encode() + b"\ndata: " + body + b"\n\n"
    return b"id: " + f"{event.epoch}:{event.seq}".encode() + b"\ndata: " + body + b"\n\n"


class Sink(Protocol):
    """Where an :class:`Outbox` writes: a WebSocket, an SSE response."""

    async def send(self, data: bytes) -> None:
        """Write one frame, waiting for the transport."""
        ...

    async def send_many(self, frames: list[bytes]) -> None:
        """Write several frames, at best in one transport write, waiting for the transport."""
        ...

    def write_now(self, frames: list[bytes]) -> bool:
        """Write ``frames`` synchronously if the transport takes them without waiting.

        False, with nothing written, when it cannot (transport paused by backpressure, frames
        to compress one by one, or a sink that never writes synchronously); an exception when
        the peer is gone.
        """
        ...

    def abort(self) -> None:
        """Drop the peer: a write failed or it cannot keep up."""
        ...


class _Flusher:
    """One loop callback per iteration for every outbox that queued frames in it.

    A fan-out burst or a group commit touches many outboxes in one iteration; each writes
    once at the end of it, and the loop runs one callback for all of them, not one each.
    """

    __slots__ = ("loop", "pending", "scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pending: list[Outbox] = []
        self.scheduled = False

    def add(self, outbox: Outbox) -> None:
        self.pending.append(outbox)
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.run)

    def run(self) -> None:
        self.scheduled = False
        pending, self.pending = self.pending, []
        for outbox in pending:
            outbox._flush()


_flusher: _Flusher | None = None


def _flusher_for(loop: asyncio.AbstractEventLoop) -> _Flusher:
    global _flusher
    if _flusher is None or _flusher.loop is not loop:
        _flusher = _Flusher(loop)  # one loop per process; a new one (tests) gets its own
    return _flusher


class Outbox:
    """One peer's outbound queue, bounded in bytes.

    What is queued in one loop iteration goes out in one transport write at the end of the
    iteration (a fan-out burst or a group commit costs each peer one syscall, not one per
    frame; :class:`_Flusher` runs them all from one callback). When the sink cannot write
    synchronously — its transport is paused by TCP backpressure, or frames must be
    compressed one by one — a writer task drains the queue, awaiting the transport. Idle
    peers hold no task and no queue.
    """

    __slots__ = ("_drain_waiters", "_flusher", "_loop", "_scheduled", "_writer", "closed",
                 "limit", "metrics", "queue", "sink", "size")

    def __init__(self, sink: Sink, limit: int, metrics: Metrics) -> None:
        self.sink = sink
        self.limit = limit
        self.metrics = metrics
        self.queue: list[bytes] | None = None
        self.size = 0
        self.closed = False
        self._loop = asyncio.get_running_loop()
        self._flusher = _flusher_for(self._loop)
        self._scheduled = False
        self._writer: asyncio.Task[None] | None = None
        # Made when a producer first waits for room: an idle peer's outbox holds no list.
        self._drain_waiters: list[asyncio.Future[None]] | None = None

    @property
    def full(self) -> bool:
        return self.size >= self.limit

    def push(self, data: bytes) -> None:
        if self.closed:
            return
        queue = self.queue
        if queue is None:
            queue = self.queue = []
        queue.append(data)
        self.size += len(data)
        if self._writer is None and not self._scheduled:
            self._scheduled = True
            self._flusher.add(self)

    def _write_frames(self, frames: list[bytes], size: int) -> bool:
        """Hand ``frames`` to the sink synchronously; False if it cannot take them now.

        A failed write means the peer is gone: the outbox closes (and counts as written).
        """
        try:
            if not self.sink.write_now(frames):
                return False
        except Exception as exc:
            log.debug("outbox write failed: %r", exc)
            self.close()
            self.sink.abort()
            return True
        hot = self.metrics.hot
        hot.frames_out += len(frames)
        hot.bytes_out += size
        return True

    def _flush(self) -> None:
        self._scheduled = False
        queue = self.queue
        if self._writer is not None or self.closed or not queue:
            return
        if self._write_frames(queue, self.size):
            self.queue = None
            self.size = 0
            if self._drain_waiters:
                self._wake()
            return
        self._writer = self._loop.create_task(self._write())

    async def _write(self) -> None:
        hot = self.metrics.hot
        queue = self.queue
        sink = self.sink
        try:
            while queue:
                # Everything queued goes out in one write (up to a bound).
                count = size = 0
                for data in queue:
                    count += 1
                    size += len(data)
                    if size >= _BATCH_BYTES:
                        break
                frames = queue[:count]
                del queue[:count]
                self.size -= size
                if count > 1:
                    await sink.send_many(frames)
                else:
                    await sink.send(frames[0])
                hot.frames_out += count
                hot.bytes_out += size
                if self._drain_waiters and self.size <= self.limit // 2:
                    self._wake()
        except Exception as exc:  # the peer went away mid-write
            log.debug("outbox write failed: %r", exc)
            self.close()
            self.sink.abort()
        finally:
            self._writer = None
            self._wake()

    def _wake(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    async def wait_drained(self) -> None:
        """Return once the queue is at most half full, or the outbox closed."""
        while not self.closed and self.size > self.limit // 2:
            waiter = asyncio.get_running_loop().create_future()
            if self._drain_waiters is None:
                self._drain_waiters = []
            self._drain_waiters.append(waiter)
            await waiter

    async def flush(self) -> None:
        """Wait until everything queued so far has been written."""
        if self._scheduled:
            await asyncio.sleep(0)  # let the scheduled write run
        if self._writer is not None:
            await asyncio.wait([self._writer])

    def close(self) -> None:
        self.closed = True
        self.queue = None
        self.size = 0
        self._wake()


class Peer(Protocol):
    """A connection as the hub sees it."""

    outbox: Outbox
    format: str


class State(enum.Enum):
    """Where a subscription stands."""

    BUFFERING = "buffering"  # subscribed, the attach reply not sent yet: live events wait
    CATCHING_UP = "catching_up"  # a reader goes through the store; live events wait
    LIVE = "live"  # each live event is delivered as it arrives
    CLOSED = "closed"  # unsubscribed, or the peer is gone: nothing more goes out


class Input(enum.Enum):
    """What happens to a subscription."""

    # A live event from the channel, against last_seq and the outbox (Delivery.classify):
    NEXT = "next"  # seq == last_seq + 1, the outbox has room
    DUPLICATE = "duplicate"  # seq <= last_seq: delivered already
    GAP = "gap"  # seq > last_seq + 1: the live channel lost something
    FULL = "full"  # seq == last_seq + 1, but the outbox is full
    TRANSIENT = "transient"  # presence, typing (no seq); the outbox has room
    TRANSIENT_FULL = "transient_full"  # the same, the outbox is full
    # From whoever owns the subscription (Subscription.catch_up):
    START = "start"  # the attach reply is sent, or a live tail is stale: read the store
    # From the reader, after a page of the store (Delivery.page_read):
    PAGE_FULL = "page_full"  # a whole page: there is more to read
    TAIL = "tail"  # a short page: the log's tail, and the outbox has room
    TAIL_FULL = "tail_full"  # the log's tail, but the outbox is full
    # From the reader, merging the buffer at the tail (Delivery.merge):
    MERGED = "merged"  # the buffer continued the log without a gap
    MERGE_GAP = "merge_gap"  # the buffer shows a gap: the rest is in the store
    MERGE_OVERFLOW = "merge_overflow"  # the buffer overflowed and was dropped
    # Endings:
    ABORT = "abort"  # the reader stopped by itself: the peer is gone or the read failed
    CANCEL = "cancel"  # unsubscribed


class Action(enum.Enum):
    """What the I/O side does for an input."""

    DELIVER = "deliver"  # push the live event; it is now last_seq
    PASS = "pass"  # push the transient event
    DROP = "drop"  # nothing: the event is delivered already, ephemeral, or unwanted
    BUFFER = "buffer"  # nothing: Delivery.live() kept the event in its bounded buffer
    START_READ = "start_read"  # start the reader task (counts a catch-up)
    READ = "read"  # the reader reads the page after last_seq (next page, or again)
    DRAIN_THEN_READ = "drain_then_read"  # the reader waits for the outbox to drain, then READ
    MERGE = "merge"  # the reader calls Delivery.merge() and pushes what it returns
    GO_LIVE = "go_live"  # the reader ends: the subscription is live
    STOP_READ = "stop_read"  # cancel the reader task
    NONE = "none"  # nothing to do
    INVALID = "invalid"  # this input cannot happen in this state: Delivery.step raises


_B, _C, _L, _X = State.BUFFERING, State.CATCHING_UP, State.LIVE, State.CLOSED
_I, _A = Input, Action

#: Every (state, input) pair -> (next state, action). Total: see tests/server/test_hub.py.
TABLE: dict[tuple[State, Input], tuple[State, Action]] = {
    # A live event. Live: deliver in order; a gap or a full outbox turns to the store.
    (_L, _I.NEXT): (_L, _A.DELIVER),  # the hot path; Subscription.offer inlines it
    (_L, _I.DUPLICATE): (_L, _A.DROP),
    (_L, _I.GAP): (_C, _A.START_READ),  # "gap"; the event itself comes from the store
    (_L, _I.FULL): (_C, _A.START_READ),  # "overflow"
    (_L, _I.TRANSIENT): (_L, _A.PASS),
    (_L, _I.TRANSIENT_FULL): (_L, _A.DROP),  # ephemeral: dropped rather than queued
    # Before the reply and while reading, everything waits in the buffer (merged at the tail).
    (_B, _I.NEXT): (_B, _A.BUFFER),
    (_B, _I.DUPLICATE): (_B, _A.BUFFER),  # last_seq may still move: the snapshot sets it
    (_B, _I.GAP): (_B, _A.BUFFER),
    (_B, _I.FULL): (_B, _A.BUFFER),
    (_B, _I.TRANSIENT): (_B, _A.BUFFER),
    (_B, _I.TRANSIENT_FULL): (_B, _A.BUFFER),
    (_C, _I.NEXT): (_C, _A.BUFFER),
    (_C, _I.DUPLICATE): (_C, _A.BUFFER),
    (_C, _I.GAP): (_C, _A.BUFFER),
    (_C, _I.FULL): (_C, _A.BUFFER),
    (_C, _I.TRANSIENT): (_C, _A.BUFFER),
    (_C, _I.TRANSIENT_FULL): (_C, _A.BUFFER),
    (_X, _I.NEXT): (_X, _A.DROP),
    (_X, _I.DUPLICATE): (_X, _A.DROP),
    (_X, _I.GAP): (_X, _A.DROP),
    (_X, _I.FULL): (_X, _A.DROP),
    (_X, _I.TRANSIENT): (_X, _A.DROP),
    (_X, _I.TRANSIENT_FULL): (_X, _A.DROP),
    # catch_up(): after the attach reply ("attach"), or a stale live tail ("stale").
    (_B, _I.START): (_C, _A.START_READ),
    (_C, _I.START): (_C, _A.NONE),  # a reader is at work already
    (_L, _I.START): (_C, _A.START_READ),
    (_X, _I.START): (_X, _A.NONE),
    # The reader read a page and pushed what it had not delivered yet.
    (_C, _I.PAGE_FULL): (_C, _A.READ),
    (_C, _I.TAIL): (_C, _A.MERGE),
    (_C, _I.TAIL_FULL): (_C, _A.DRAIN_THEN_READ),  # read again: more may have come meanwhile
    (_B, _I.PAGE_FULL): (_B, _A.INVALID),  # no reader before START
    (_B, _I.TAIL): (_B, _A.INVALID),
    (_B, _I.TAIL_FULL): (_B, _A.INVALID),
    (_L, _I.PAGE_FULL): (_L, _A.INVALID),  # the reader ended when the subscription went live
    (_L, _I.TAIL): (_L, _A.INVALID),
    (_L, _I.TAIL_FULL): (_L, _A.INVALID),
    (_X, _I.PAGE_FULL): (_X, _A.NONE),  # a reader cancelled mid-way: nothing more
    (_X, _I.TAIL): (_X, _A.NONE),
    (_X, _I.TAIL_FULL): (_X, _A.NONE),
    # The reader merged the buffer at the tail.
    (_C, _I.MERGED): (_L, _A.GO_LIVE),
    (_C, _I.MERGE_GAP): (_C, _A.READ),
    (_C, _I.MERGE_OVERFLOW): (_C, _A.READ),
    (_B, _I.MERGED): (_B, _A.INVALID),
    (_B, _I.MERGE_GAP): (_B, _A.INVALID),
    (_B, _I.MERGE_OVERFLOW): (_B, _A.INVALID),
    (_L, _I.MERGED): (_L, _A.INVALID),
    (_L, _I.MERGE_GAP): (_L, _A.INVALID),
    (_L, _I.MERGE_OVERFLOW): (_L, _A.INVALID),
    (_X, _I.MERGED): (_X, _A.NONE),
    (_X, _I.MERGE_GAP): (_X, _A.NONE),
    (_X, _I.MERGE_OVERFLOW): (_X, _A.NONE),
    # Endings. The buffer is freed on entering CLOSED.
    (_C, _I.ABORT): (_X, _A.NONE),  # the reader is ending by itself
    (_B, _I.ABORT): (_B, _A.INVALID),
    (_L, _I.ABORT): (_L, _A.INVALID),
    (_X, _I.ABORT): (_X, _A.NONE),
    (_B, _I.CANCEL): (_X, _A.NONE),
    (_C, _I.CANCEL): (_X, _A.STOP_READ),
    (_L, _I.CANCEL): (_X, _A.NONE),
    (_X, _I.CANCEL): (_X, _A.NONE),
}

# An idle subscription keeps no buffer: this one is shared and never appended to.
_NO_PENDING: list[tuple[int | None, bytes]] = []


class DeliveryError(RuntimeError):
    """An input that cannot happen in the current state: a bug in the I/O side."""


class Delivery:
    """The decisions of one subscription, without I/O: no asyncio, no store, no outbox.

    Holds the position (``last_seq``: the last seq delivered) and the buffer of live events
    that arrive while the subscription is not live (bounded by ``limit`` bytes; on overflow it
    is dropped and the store is read instead). :meth:`step` moves along :data:`TABLE` and
    returns the action; the other methods turn what happened into an input and keep the
    position and the buffer up to date.
    """

    __slots__ = ("last_seq", "limit", "overflowed", "pending", "pending_bytes", "state")

    def __init__(self, last_seq: int, limit: int) -> None:
        self.state = State.BUFFERING
        self.last_seq = last_seq
        self.limit = limit
        self.pending = _NO_PENDING  # (seq, bytes); seq None for a transient event
        self.pending_bytes = 0
        self.overflowed = False

    def step(self, event: Input) -> Action:
        """Take ``event``: move to the next state, return what to do."""
        state, action = TABLE[self.state, event]
        if action is Action.INVALID:
            raise DeliveryError(f"{event.name} while {self.state.name}")
        self.state = state
        if state is State.CLOSED:
            self._drop_pending()
        return action

    @staticmethod
    def classify(last_seq: int, seq: int, transient: bool, room: bool) -> Input:
        """The input for a live event ``seq`` at position ``last_seq``."""
        if transient:
            return Input.TRANSIENT if room else Input.TRANSIENT_FULL
        if seq <= last_seq:
            return Input.DUPLICATE
        if seq != last_seq + 1:
            return Input.GAP
        return Input.NEXT if room else Input.FULL

    def live(self, seq: int, transient: bool, data: bytes, room: bool) -> tuple[Input, Action]:
        """A live event; ``room``: the outbox is not full.

        DELIVER moves ``last_seq`` to it, BUFFER keeps it. The input tells why a START_READ.
        """
        event = self.classify(self.last_seq, seq, transient, room)
        action = self.step(event)
        if action is Action.DELIVER:
            self.last_seq = seq
        elif action is Action.BUFFER:
            self._buffer(None if transient else seq, data)
        return event, action

    def _buffer(self, seq: int | None, data: bytes) -> None:
        if self.overflowed:
            return  # dropped at the merge anyway
        size = len(data)
        if self.pending_bytes + size > self.limit:
            # Free it now: the store has all of it, and what follows (read at the tail).
            self.pending, self.pending_bytes, self.overflowed = _NO_PENDING, 0, True
            return
        if self.pending is _NO_PENDING:
            self.pending = []
        self.pending.append((seq, data))
        self.pending_bytes += size

    def _drop_pending(self) -> None:
        self.pending, self.pending_bytes, self.overflowed = _NO_PENDING, 0, False

    def from_store(self, seq: int) -> bool:
        """An event the reader read: True if it is to be pushed (``last_seq`` moves to it)."""
        if seq <= self.last_seq:
            return False
        self.last_seq = seq
        return True

    def page_read(self, whole: bool, room: bool) -> Action:
        """The reader pushed a page: ``whole`` if it held as many events as asked for."""
        if whole:
            return self.step(Input.PAGE_FULL)
        return self.step(Input.TAIL if room else Input.TAIL_FULL)

    def merge(self) -> tuple[Action, list[bytes]]:
        """At the log's tail: the buffered events that continue the log, to push in order.

        Dedupes by seq; transient events go along. Stops at a gap (MERGE_GAP: read the store
        again); an overflowed buffer gives nothing (MERGE_OVERFLOW). The buffer is emptied.
        """
        out: list[bytes] = []
        last = self.last_seq
        if self.overflowed:
            event = Input.MERGE_OVERFLOW
        else:
            event = Input.MERGED
            for seq, data in self.pending:
                if seq is None:
                    out.append(data)
                elif seq == last + 1:
                    out.append(data)
                    last = seq
                elif seq > last:
                    event = Input.MERGE_GAP
                    break
        action = self.step(event)
        self.last_seq = last
        self._drop_pending()
        return action, out


_LIVE = State.LIVE
_DELIVER = Action.DELIVER
_CATCHUP_REASONS = {Input.GAP: "gap", Input.FULL: "overflow"}


class Subscription:
    """One peer's position in one session: the I/O side of a :class:`Delivery`.

    Starts buffering; the owner sends its reply (attached), then calls ``catch_up("attach")``.
    """

    __slots__ = ("channel", "delivery", "epoch", "peer", "session", "task")

    def __init__(self, channel: Channel, peer: Peer, epoch: str, last_seq: int) -> None:
        self.channel = channel
        self.session = channel.session
        self.peer = peer
        self.epoch = epoch
        self.delivery = Delivery(last_seq, peer.outbox.limit)
        self.task: asyncio.Task[None] | None = None  # the reader, while catching up

    @property
    def last_seq(self) -> int:
        """The last seq delivered (or covered by the snapshot the owner sent)."""
        return self.delivery.last_seq

    @last_seq.setter
    def last_seq(self, seq: int) -> None:
        self.delivery.last_seq = seq

    @property
    def catching_up(self) -> bool:
        return self.delivery.state is not _LIVE

    def offer(self, event: Event, data: bytes) -> None:
        """A live event; called by the channel in commit order."""
        delivery = self.delivery
        outbox = self.peer.outbox
        seq = event.seq
        if (delivery.state is _LIVE and seq == delivery.last_seq + 1
                and outbox.size < outbox.limit and not event.transient):
            # TABLE[LIVE, NEXT] -> (LIVE, DELIVER), inlined: the fan-out hot path.
            outbox.push(data)
            delivery.last_seq = seq
            self.channel.hub.metrics.hot.events_delivered += 1
            return
        cause, action = delivery.live(seq, event.transient, data, outbox.size < outbox.limit)
        if action is _DELIVER:
            outbox.push(data)
            self.channel.hub.metrics.hot.events_delivered += 1
        elif action is Action.PASS:
            outbox.push(data)
        elif action is Action.START_READ:
            if cause is Input.FULL:
                self.channel.hub.metrics.overflows.inc()
            self._start_reader(_CATCHUP_REASONS[cause])

    def catch_up(self, reason: str) -> None:
        """Read the store after ``last_seq`` (buffering live events), then turn live."""
        if self.delivery.step(Input.START) is Action.START_READ:
            self._start_reader(reason)

    def _start_reader(self, reason: str) -> None:
        self.channel.hub.metrics.catchups.labels(reason).inc()
        self.task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        """The reader: performs READ, DRAIN_THEN_READ and MERGE until GO_LIVE."""
        hub = self.channel.hub
        hot = hub.metrics.hot
        delivery = self.delivery
        outbox = self.peer.outbox
        fmt = self.peer.format
        encode = partial(encode_event, fmt)
        action = Action.READ
        channel = self.channel
        try:
            while not outbox.closed:
                if action is Action.READ:
                    # The store builds JSON and SSE frames from its stored bytes when it can
                    # (SQLite, the shared store): no decode and encode per event.
                    limit = channel.page
                    page = await read_encoded(hub.store, self.session, delivery.last_seq,
                                              limit, fmt, encode)
                    size = 0
                    for seq, data in page:
                        size += len(data)
                        if outbox.full:
                            await outbox.wait_drained()
                            if outbox.closed:
                                return
                        if delivery.from_store(seq):
                            outbox.push(data)
                            hot.events_delivered += 1
                    action = delivery.page_read(len(page) >= limit, not outbox.full)
                    if page:  # the next page: as many events of this size as fit _PAGE_BYTES
                        channel.page = max(1, min(hub.catchup_page,
                                                  _PAGE_BYTES * len(page) // max(1, size)))
                    # One page per loop step: a store whose reads do not suspend (SQLite)
                    # must not turn a long catch-up into one long step for everybody else.
                    await asyncio.sleep(0)
                elif action is Action.DRAIN_THEN_READ:
                    await outbox.wait_drained()
                    action = Action.READ
                elif action is Action.MERGE:
                    before = delivery.last_seq
                    action, frames = delivery.merge()
                    for data in frames:
                        outbox.push(data)
                    hot.events_delivered += delivery.last_seq - before
                    if action is Action.GO_LIVE:
                        return
                elif action is Action.NONE:  # closed meanwhile
                    return
                else:
                    raise DeliveryError(f"the reader cannot {action.name}")
        except Exception:
            log.exception("catch-up of %s failed", self.session)
            outbox.close()
            outbox.sink.abort()
        finally:
            self.task = None
            if delivery.state is State.CATCHING_UP:  # the peer is gone, or the read failed
                delivery.step(Input.ABORT)

    def cancel(self) -> None:
        """Stop delivering (unsubscribed)."""
        if self.delivery.step(Input.CANCEL) is Action.STOP_READ and self.task is not None:
            self.task.cancel()
            self.task = None


class Channel:
    """All local subscriptions of one session, fed by one store listener."""

    __slots__ = ("hub", "observed_head", "page", "session", "subs")

    def __init__(self, hub: Hub, session: str) -> None:
        self.hub = hub
        self.session = session
        self.subs: list[Subscription] = []
        self.observed_head = 0  # the log's head at the previous tail check
        # Events per catch-up page, kept near _PAGE_BYTES by the pages read so far (one
        # session's events are of a size, mostly).
        self.page = hub.first_page

    def on_event(self, event: Event) -> None:
        hub = self.hub
        if not event.transient:
            hub.metrics.hot.observe_latency(max(0.0, time.time() - event.time / 1000))
        encoded: dict[str, bytes] = {}
        for sub in tuple(self.subs):
            fmt = sub.peer.format
            data = encoded.get(fmt)
            if data is None:
                try:
                    data = encoded[fmt] = encode_event(fmt, event)
                except (TypeError, ValueError, OverflowError):
                    # A transient event (presence) no format can carry: nobody gets it,
                    # and no bystander is closed over it.
                    log.warning("dropped a transient %s of %s: not encodable", event.type,
                                self.session)
                    return
            sub.offer(event, data)


class Hub:
    """Session channels of this node."""

    def __init__(self, store: SessionStore, metrics: Metrics, catchup_page: int = 500,
                 max_event_bytes: int | None = None) -> None:
        """``max_event_bytes``: a session's first catch-up page holds as many of the largest
        events as fit ``_PAGE_BYTES`` (one more small read at worst); later pages are sized
        by what was read. None: the first page is ``catchup_page`` events."""
        self.store = store
        self.metrics = metrics
        self.catchup_page = catchup_page
        self.first_page = catchup_page if max_event_bytes is None else max(
            1, min(catchup_page, _PAGE_BYTES // max(1, max_event_bytes)))
        self.channels: dict[str, Channel] = {}

    def subscribe(self, peer: Peer, session: str, epoch: str, last_seq: int) -> Subscription:
        """Register ``peer`` (buffering); call ``sub.catch_up('attach')`` after replying."""
        channel = self.channels.get(session)
        if channel is None:
            channel = self.channels[session] = Channel(self, session)
            self.store.listen(session, channel.on_event)
        sub = Subscription(channel, peer, epoch, last_seq)
        channel.subs.append(sub)
        self.metrics.attached.inc()
        return sub

    async def check_tails(self) -> None:
        """Heal a lost *last* event of an at-most-once live channel.

        A lost event in the middle shows as a gap at the next one; a lost last event shows
        nothing. So, periodically: a live subscription still behind the head that the previous
        check saw has had a whole interval for that event to arrive, and reads the store.
        """
        for channel in list(self.channels.values()):
            head = await self.store.head(channel.session)
            for sub in tuple(channel.subs):
                delivery = sub.delivery
                if delivery.state is _LIVE and delivery.last_seq < channel.observed_head:
                    sub.catch_up("stale")
            channel.observed_head = head.last_seq

    def unsubscribe(self, sub: Subscription) -> None:
        sub.cancel()
        channel = sub.channel
        if sub in channel.subs:
            channel.subs.remove(sub)
            self.metrics.attached.dec()
        if not channel.subs and self.channels.get(channel.session) is channel:
            del self.channels[channel.session]
            self.store.unlisten(channel.session, channel.on_event)
