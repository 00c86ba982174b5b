"""The live channel of the Redis store: pub/sub delivery of committed and transient events.

Listeners get events only from pub/sub, on this node as on every other, so every node sees
one order: the one the append script published in. One reader task on one connection
subscribes each session's channel while the session has listeners here; a writer task sends
(un)subscribes in call order and PINGs an idle connection to notice a silent loss.

A listener added before an append must hear it, so a commit waits (at most
``SUBSCRIBE_WAIT``) for the SUBSCRIBE replies of listeners added before it
(:attr:`LiveChannel.unconfirmed`, :meth:`LiveChannel.subscribed`).

Pub/sub is at-most-once: across a reconnect events may be missed. That is why the store
declares ``live_is_lossy = True``: the server heals gaps from the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, MutableSequence
from typing import Any

import orjson
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import RedisError

from tether.protocol.events import Event
from tether.store.base import Listener, Listeners, StoreError
from tether.store.redis.client import RedisClient
from tether.store.redis.codec import decode_sender
from tether.store.redis.keys import KeySpace

log = logging.getLogger("tether.store.redis")

# A commit waits at most this long for SUBSCRIBEs issued before it, so a dead pub/sub
# connection cannot stall commits.
SUBSCRIBE_WAIT = 2.0
PING_INTERVAL = 15.0
RECONNECT_MIN = 0.05
RECONNECT_MAX = 2.0


class LiveChannel:
    """Listeners of this node, fed from the sessions' pub/sub channels."""

    def __init__(self, client: RedisClient, keys: KeySpace) -> None:
        self._client = client
        self._keys = keys
        self._listeners = Listeners()
        self._channels: dict[bytes, str] = {}
        self._sub_ops: deque[tuple[bytes, bytes]] = deque()
        self._sub_wake = asyncio.Event()
        self._sub_waiters: dict[bytes, deque[asyncio.Future[None]]] = {}
        # SUBSCRIBEs sent and not yet confirmed; commits wait for them (module docstring).
        self.unconfirmed: set[asyncio.Future[None]] = set()
        self._conn: AbstractConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._last_rx = 0.0
        self._closing = False

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="tether-redis-pubsub")

    async def connected(self) -> None:
        """Wait until the pub/sub connection is up."""
        await self._ready.wait()

    def stopping(self) -> None:
        """Stop reconnecting: the store is closing."""
        self._closing = True

    async def close(self) -> None:
        self._closing = True
        for future in self.unconfirmed:
            if not future.done():
                future.set_result(None)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task

    async def subscribed(self) -> None:
        """Wait (at most ``SUBSCRIBE_WAIT``) for the SUBSCRIBEs sent so far to be confirmed."""
        if self.unconfirmed:
            await asyncio.wait(set(self.unconfirmed), timeout=SUBSCRIBE_WAIT)

    # -- the SessionStore side ---------------------------------------------------------------

    async def publish_transient(self, event: Event) -> None:
        await self.subscribed()
        payload = orjson.dumps([1, event.epoch, event.time, event.seq, [[
            event.type, [event.sender.sub, event.sender.client, event.sender.kind],
            event.data]]])
        try:
            await self._client.redis().publish(self._keys.of(event.session).channel, payload)
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis: {exc}") from exc

    def listen(self, session: str, listener: Listener) -> None:
        first = not self._listeners.has(session)
        self._listeners.add(session, listener)
        if first:
            channel = self._keys.of(session).channel
            self._channels[channel] = session
            self._queue_sub(b"SUBSCRIBE", channel)

    def unlisten(self, session: str, listener: Listener) -> None:
        if not self._listeners.has(session):
            return
        self._listeners.remove(session, listener)
        if not self._listeners.has(session):
            channel = self._keys.of(session).channel
            if self._channels.pop(channel, None) is not None:
                self._queue_sub(b"UNSUBSCRIBE", channel)

    # -- subscriptions -----------------------------------------------------------------------

    def _queue_sub(self, command: bytes, channel: bytes) -> None:
        if self._conn is None:
            return  # the (re)connect subscribes to every channel in self._channels
        if command == b"SUBSCRIBE":
            self._expect_subscribe(channel)
        self._sub_ops.append((command, channel))
        self._sub_wake.set()

    def _expect_subscribe(self, channel: bytes) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sub_waiters.setdefault(channel, deque()).append(future)
        self.unconfirmed.add(future)

    def _release_waiters(self) -> None:
        for future in self.unconfirmed:
            if not future.done():
                future.set_result(None)
        self.unconfirmed.clear()
        self._sub_waiters.clear()

    # -- the connection ----------------------------------------------------------------------

    async def _run(self) -> None:
        """Connect, subscribe, read; on failure reconnect with backoff until closing."""
        delay = RECONNECT_MIN
        loop = asyncio.get_running_loop()
        failures = 0
        while not self._closing:
            conn = self._client.connection(socket_timeout=None, socket_keepalive=True)
            writer: asyncio.Task[None] | None = None
            connect: Callable[[], Awaitable[None]] = conn.connect
            try:
                await connect()
                self._sub_ops.clear()
                self._release_waiters()
                self._conn = conn
                self._ready.set()
                channels = list(self._channels)
                for channel in channels:
                    self._expect_subscribe(channel)
                if channels:
                    await conn.send_command(b"SUBSCRIBE", *channels, check_health=False)
                if failures:
                    log.warning("redis pub/sub reconnected; resubscribed %d channels",
                                len(channels))
                failures, delay = 0, RECONNECT_MIN
                self._last_rx = loop.time()
                writer = asyncio.create_task(self._writer(conn))
                while True:
                    reply = await conn.read_response(disable_decoding=True, timeout=math.inf)
                    self._last_rx = loop.time()
                    self._on_reply(reply)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._closing:
                    break
                failures += 1
                log.warning("redis pub/sub connection failed (%s); retrying in %.2fs",
                            exc, delay)
            finally:
                self._conn = None
                self._ready.clear()
                if writer is not None:
                    writer.cancel()
                    with contextlib.suppress(BaseException):
                        await writer
                self._release_waiters()
                with contextlib.suppress(Exception):
                    await conn.disconnect(nowait=True)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX)

    async def _writer(self, conn: AbstractConnection) -> None:
        await write_subscriptions(conn, self._sub_wake, self._sub_ops,
                                  lambda: self._last_rx, "redis pub/sub")

    def _on_reply(self, reply: Any) -> None:
        if not isinstance(reply, list) or len(reply) < 3:
            return  # PONG outside subscribed mode
        kind = reply[0]
        if kind == b"message":
            self._deliver(reply[1], reply[2])
        elif kind == b"subscribe":
            waiters = self._sub_waiters.get(reply[1])
            if waiters:
                future = waiters.popleft()
                self.unconfirmed.discard(future)
                if not future.done():
                    future.set_result(None)

    def _deliver(self, channel: bytes, message: bytes) -> None:
        session = self._channels.get(channel)
        if session is None:
            return
        try:
            transient, epoch, time, first, payloads = orjson.loads(message)
            events = [
                Event(session, epoch, first + i, raw[0], raw[2], decode_sender(raw[1]), time,
                      transient=bool(transient))
                for i, raw in enumerate(payloads)
            ]
        except (ValueError, TypeError, IndexError) as exc:
            log.warning("dropping malformed message on %r: %s", channel, exc)
            return
        for event in events:
            try:
                self._listeners.dispatch(event)
            except Exception:
                log.exception("listener failed on %s seq %d", session, event.seq)


async def write_subscriptions(conn: AbstractConnection, wake: asyncio.Event,
                              ops: MutableSequence[tuple[bytes, bytes]],
                              last_rx: Callable[[], float], name: str) -> None:
    """Send a pub/sub connection's (un)subscribes in call order (``ops``, on ``wake``), and
    PING it when idle to notice a silent loss; on a failure, close it (its reader then
    reconnects). Shared by the single Redis's channel and each cluster master's."""
    loop = asyncio.get_running_loop()
    try:
        while True:
            try:
                await asyncio.wait_for(wake.wait(), PING_INTERVAL)
            except TimeoutError:
                if loop.time() - last_rx() > 3 * PING_INTERVAL:
                    raise ConnectionError("no reply to PING") from None
                await conn.send_command(b"PING", check_health=False)
                continue
            wake.clear()
            commands = list(ops)
            ops.clear()
            if commands:
                await conn.send_packed_command(conn.pack_commands(commands),
                                               check_health=False)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.warning("%s write failed: %s", name, exc)
        # Closing the socket ends the reader's read, which then reconnects.
        await conn.disconnect(nowait=True)
