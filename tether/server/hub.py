"""Live fan-out, bounded outbound buffers and catch-up from the store.

The log is the truth: every delivery is a read of a session's log from a cursor, and the live
path is only a shortcut for that read. A :class:`Subscription` is one peer's position in one
session. It is *live* while each committed event arrives exactly after the previous one and the
peer's :class:`Outbox` has room; otherwise it *catches up*: it buffers live events (bounded),
reads the store from its last delivered seq page by page, waiting for the peer to drain between
pages, then merges the buffer, dedupes by seq and turns live again. The same mechanism serves
resume after a disconnect, a late joiner, a slow consumer and a gap in an at-most-once live
channel (Redis pub/sub).

Each event is encoded once per wire format; every subscriber of that format gets the same bytes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Protocol

import orjson

from tether.protocol.codec import JSON, MSGPACK
from tether.protocol.events import PRESENCE_JOIN, PRESENCE_LEAVE, PRESENCE_UPDATE, Event
from tether.protocol.frames import event_frame, presence_frame
from tether.server.metrics import Metrics
from tether.store.base import SessionStore

log = logging.getLogger("tether.hub")

FORMAT_JSON = "json"
FORMAT_MSGPACK = "msgpack"
FORMAT_SSE = "sse"

_NO_PENDING: list[tuple[Event, bytes]] = []  # shared, never appended to
_BATCH_BYTES = 256 << 10  # at most this much per transport write from one outbox

_PRESENCE_ACTIONS = {PRESENCE_JOIN: "join", PRESENCE_LEAVE: "leave", PRESENCE_UPDATE: "update"}


def _frame_for(event: Event) -> dict[str, object]:
    action = _PRESENCE_ACTIONS.get(event.type) if event.transient else None
    if action is not None:
        return presence_frame(event.session, action, [event.data])
    return event_frame(event)


def encode_event(fmt: str, event: Event) -> bytes:
    """The bytes of ``event`` in wire format ``fmt``."""
    frame = _frame_for(event)
    if fmt == FORMAT_JSON:
        return JSON.encode(frame)
    if fmt == FORMAT_MSGPACK:
        return MSGPACK.encode(frame)
    body = orjson.dumps(frame)
    if event.transient:
        return b"event: " + str(frame["op"]).encode() + b"\ndata: " + body + b"\n\n"
    return b"id: " + f"{event.epoch}:{event.seq}".encode() + b"\ndata: " + body + b"\n\n"


class Sink(Protocol):
    async def send(self, data: bytes) -> None: ...

    def abort(self) -> None: ...


class Outbox:
    """One peer's outbound queue, bounded in bytes.

    What is queued in one loop iteration goes out in one transport write from a ``call_soon``
    callback (a fan-out burst costs each peer one syscall, not one per frame). When the sink
    cannot write synchronously — its transport is paused by TCP backpressure, or frames must
    be compressed one by one — a writer task drains the queue, awaiting the transport. Idle
    peers hold no task and no queue.
    """

    __slots__ = ("_drain_waiters", "_loop", "_scheduled", "_writer", "closed", "limit",
                 "metrics", "queue", "sink", "size")

    def __init__(self, sink: Sink, limit: int, metrics: Metrics) -> None:
        self.sink = sink
        self.limit = limit
        self.metrics = metrics
        self.queue: deque[bytes] | None = None
        self.size = 0
        self.closed = False
        self._loop = asyncio.get_running_loop()
        self._scheduled = False
        self._writer: asyncio.Task[None] | None = None
        self._drain_waiters: list[asyncio.Future[None]] = []

    @property
    def full(self) -> bool:
        return self.size >= self.limit

    def push(self, data: bytes) -> None:
        if self.closed:
            return
        queue = self.queue
        if queue is None:
            # Nothing waiting: write this frame now, a loop iteration sooner. What follows in
            # the same iteration (a fan-out burst) is queued and written together.
            if self._writer is None and not self._scheduled and self._write_now(data):
                return
            queue = self.queue = deque()
        queue.append(data)
        self.size += len(data)
        if self._writer is None and not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def _write_frames(self, frames: list[bytes], size: int) -> bool:
        """Hand ``frames`` to the sink synchronously; False if it cannot take them now.

        A failed write means the peer is gone: the outbox closes (and counts as written).
        """
        write_now = getattr(self.sink, "write_now", None)
        if write_now is None:
            return False
        try:
            if not write_now(frames):
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

    def _write_now(self, data: bytes) -> bool:
        if not self._write_frames([data], len(data)):
            return False
        # Make the next frames of this iteration wait for one batched write.
        self._scheduled = True
        self._loop.call_soon(self._flush)
        return True

    def _flush(self) -> None:
        self._scheduled = False
        queue = self.queue
        if self._writer is not None or self.closed or not queue:
            return
        if self._write_frames(list(queue), self.size):
            self.queue = None
            self.size = 0
            if self._drain_waiters:
                self._wake()
            return
        self._writer = self._loop.create_task(self._write())

    async def _write(self) -> None:
        hot = self.metrics.hot
        queue = self.queue
        send_many = getattr(self.sink, "send_many", None)
        try:
            while queue:
                if send_many is not None and len(queue) > 1:
                    # Everything queued goes out in one write (up to a bound).
                    frames: list[bytes] = []
                    size = 0
                    while queue and size < _BATCH_BYTES:
                        data = queue.popleft()
                        frames.append(data)
                        size += len(data)
                    self.size -= size
                    await send_many(frames)
                    hot.frames_out += len(frames)
                    hot.bytes_out += size
                else:
                    data = queue.popleft()
                    self.size -= len(data)
                    await self.sink.send(data)
                    hot.frames_out += 1
                    hot.bytes_out += len(data)
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
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait_drained(self) -> None:
        """Return once the queue is at most half full, or the outbox closed."""
        while not self.closed and self.size > self.limit // 2:
            waiter = asyncio.get_running_loop().create_future()
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


class Subscription:
    """One peer's position in one session; see the module docstring."""

    __slots__ = ("catching_up", "channel", "epoch", "last_seq", "peer", "pending",
                 "pending_bytes", "pending_overflow", "session", "task")

    def __init__(self, channel: Channel, peer: Peer, epoch: str, last_seq: int) -> None:
        self.channel = channel
        self.session = channel.session
        self.peer = peer
        self.epoch = epoch
        self.last_seq = last_seq
        # Starts buffering: the caller sends its reply (attached) first, then catch_up().
        self.catching_up = True
        self.pending: list[tuple[Event, bytes]] = []
        self.pending_bytes = 0
        self.pending_overflow = False
        self.task: asyncio.Task[None] | None = None

    def offer(self, event: Event, data: bytes) -> None:
        """A live event; called by the channel in commit order."""
        outbox = self.peer.outbox
        if self.catching_up:
            if self.pending_bytes + len(data) <= outbox.limit:
                if self.pending is _NO_PENDING:
                    self.pending = []
                self.pending.append((event, data))
                self.pending_bytes += len(data)
            else:
                self.pending_overflow = True
            return
        if event.transient:
            if not outbox.full:  # ephemeral: dropped rather than queued under pressure
                outbox.push(data)
            return
        seq = event.seq
        if seq <= self.last_seq:
            return
        if seq != self.last_seq + 1:
            self.catch_up("gap")
            return
        if outbox.full:
            self.channel.hub.metrics.overflows.inc()
            self.catch_up("overflow")
            return
        outbox.push(data)
        self.last_seq = seq
        self.channel.hub.metrics.hot.events_delivered += 1

    def catch_up(self, reason: str) -> None:
        """Switch to catch-up: buffer live events, read the store after ``last_seq``."""
        self.catching_up = True
        if self.task is None:
            self.channel.hub.metrics.catchups.labels(reason).inc()
            self.task = asyncio.get_running_loop().create_task(self._catch_up())

    async def _catch_up(self) -> None:
        hub = self.channel.hub
        outbox = self.peer.outbox
        try:
            while not outbox.closed:
                events = await hub.store.read(self.session, self.last_seq, hub.catchup_page)
                for event in events:
                    if event.seq <= self.last_seq:
                        continue
                    if outbox.full:
                        await outbox.wait_drained()
                        if outbox.closed:
                            return
                    outbox.push(encode_event(self.peer.format, event))
                    self.last_seq = event.seq
                    hub.metrics.hot.events_delivered += 1
                if len(events) >= hub.catchup_page:
                    continue
                if outbox.full:
                    await outbox.wait_drained()
                    continue
                if self._merge_pending():
                    self.catching_up = False
                    return
        except Exception:
            log.exception("catch-up of %s failed", self.session)
            outbox.close()
            self.peer.outbox.sink.abort()
        finally:
            self.task = None

    def _merge_pending(self) -> bool:
        """At the log's tail: deliver buffered live events. False if the store must be re-read."""
        pending, overflowed = self.pending, self.pending_overflow
        # An idle live subscription keeps no buffer around.
        self.pending, self.pending_bytes, self.pending_overflow = _NO_PENDING, 0, False
        if overflowed:
            return False
        outbox = self.peer.outbox
        for event, data in pending:
            if event.transient:
                outbox.push(data)
                continue
            if event.seq <= self.last_seq:
                continue
            if event.seq != self.last_seq + 1:
                return False  # a gap: what is missing is in the store, read it
            outbox.push(data)
            self.last_seq = event.seq
            self.channel.hub.metrics.hot.events_delivered += 1
        return True

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None
        self.pending = _NO_PENDING


class Channel:
    """All local subscriptions of one session, fed by one store listener."""

    __slots__ = ("hub", "observed_head", "session", "subs")

    def __init__(self, hub: Hub, session: str) -> None:
        self.hub = hub
        self.session = session
        self.subs: list[Subscription] = []
        self.observed_head = 0  # the log's head at the previous tail check

    def on_event(self, event: Event) -> None:
        hub = self.hub
        if not event.transient:
            hub.metrics.latency.observe(max(0.0, time.time() - event.time / 1000))
        encoded: dict[str, bytes] = {}
        for sub in tuple(self.subs):
            fmt = sub.peer.format
            data = encoded.get(fmt)
            if data is None:
                data = encoded[fmt] = encode_event(fmt, event)
            sub.offer(event, data)


class Hub:
    """Session channels of this node."""

    def __init__(self, store: SessionStore, metrics: Metrics, catchup_page: int = 500) -> None:
        self.store = store
        self.metrics = metrics
        self.catchup_page = catchup_page
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
                if not sub.catching_up and sub.last_seq < channel.observed_head:
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
