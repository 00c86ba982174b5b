"""The live channel of a cluster store: sharded pub/sub, one connection per master.

The append script fans out with ``SPUBLISH`` on the session's channel, which carries the
session's ``{S}`` hash tag, so a committed batch is published on the master that owns the
session's slot, and only there. A listener's node therefore ``SSUBSCRIBE``\\ s each channel on
the master that owns its slot: one :class:`_Shard` (a connection, a reader and a writer task)
per master that holds channels of this node, plus one per master from the start.

Slots move (resharding, failover). The master that gives a slot away ends its subscriptions
with an ``SUNSUBSCRIBE`` we did not ask for; a ``SSUBSCRIBE`` sent to a master that no longer
owns the slot is answered ``MOVED``; a master that went away drops its connection. Each case
refreshes the slot map and moves the affected channels to their owner (:meth:`_reconcile`).
Events published meanwhile are missed, as across any reconnect: the store's live channel is
lossy by contract, and the server heals gaps from the log.

Commits wait for ``SSUBSCRIBE`` confirmations exactly as for ``SUBSCRIBE`` (``pubsub.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from tether.protocol.events import Event
from tether.store.base import StoreError
from tether.store.redis.cluster import ClusterClient
from tether.store.redis.keys import KeySpace
from tether.store.redis.pubsub import (
    RECONNECT_MAX,
    RECONNECT_MIN,
    LiveChannel,
    write_subscriptions,
)

log = logging.getLogger("tether.store.redis")


class _Shard:
    """The sharded pub/sub connection of this node to one master."""

    def __init__(self, owner: ShardedLiveChannel, node: ClusterNode) -> None:
        self.owner = owner
        self.node = node
        self.name: str = node.name
        self.channels: set[bytes] = set()  # channels this node wants from this master
        self.unsubscribing: dict[bytes, int] = {}  # SUNSUBSCRIBEs sent, not yet answered
        self.waiters: dict[bytes, deque[asyncio.Future[None]]] = {}
        self.ops: deque[tuple[bytes, bytes]] = deque()
        self.wake = asyncio.Event()
        self.ready = asyncio.Event()
        self.conn: AbstractConnection | None = None
        self.failures = 0
        self.last_rx = 0.0
        self.task = asyncio.create_task(self._run(), name=f"tether-redis-shard-{self.name}")

    # -- subscriptions -----------------------------------------------------------------------

    def subscribe(self, channel: bytes) -> None:
        self.channels.add(channel)
        if self.conn is not None:
            self._expect(channel)
            self.ops.append((b"SSUBSCRIBE", channel))
            self.wake.set()

    def unsubscribe(self, channel: bytes) -> None:
        self.channels.discard(channel)
        if self.conn is not None:
            self.unsubscribing[channel] = self.unsubscribing.get(channel, 0) + 1
            self.ops.append((b"SUNSUBSCRIBE", channel))
            self.wake.set()

    def _expect(self, channel: bytes) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.setdefault(channel, deque()).append(future)
        self.owner.unconfirmed.add(future)

    def _release(self) -> None:
        for waiters in self.waiters.values():
            for future in waiters:
                self.owner.unconfirmed.discard(future)
                if not future.done():
                    future.set_result(None)
        self.waiters.clear()

    # -- the connection ----------------------------------------------------------------------

    async def _run(self) -> None:
        delay = RECONNECT_MIN
        loop = asyncio.get_running_loop()
        while not self.owner.closing:
            conn = self.owner.client.node_connection(
                self.node, socket_timeout=None, socket_keepalive=True)
            writer: asyncio.Task[None] | None = None
            connect: Callable[[], Awaitable[None]] = conn.connect
            try:
                await connect()
                self.ops.clear()
                self.unsubscribing.clear()
                self._release()
                self.conn = conn
                channels = sorted(self.channels)
                for channel in channels:
                    self._expect(channel)
                if channels:
                    # Channels of different slots may not share one SSUBSCRIBE.
                    await conn.send_packed_command(
                        conn.pack_commands([(b"SSUBSCRIBE", c) for c in channels]),
                        check_health=False)
                if self.failures:
                    log.warning("redis pub/sub to %s reconnected; resubscribed %d channels",
                                self.name, len(channels))
                self.failures, delay = 0, RECONNECT_MIN
                self.ready.set()
                self.last_rx = loop.time()
                writer = asyncio.create_task(self._writer(conn))
                while True:
                    try:
                        reply = await conn.read_response(disable_decoding=True,
                                                         timeout=math.inf)
                    except ResponseError as exc:
                        # MOVED (or CLUSTERDOWN) for an SSUBSCRIBE: the slot map changed.
                        self.last_rx = loop.time()
                        log.info("redis pub/sub on %s: %s", self.name, exc)
                        self.owner.reconcile_soon()
                        continue
                    self.last_rx = loop.time()
                    self._on_reply(reply)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.owner.closing:
                    break
                self.failures += 1
                log.warning("redis pub/sub to %s failed (%s); retrying in %.2fs",
                            self.name, exc, delay)
                # The master may be gone for good (failover): its channels may belong
                # elsewhere now.
                self.owner.reconcile_soon()
            finally:
                self.conn = None
                self.ready.clear()
                if writer is not None:
                    writer.cancel()
                    with contextlib.suppress(BaseException):
                        await writer
                self._release()
                with contextlib.suppress(Exception):
                    await conn.disconnect(nowait=True)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX)

    async def _writer(self, conn: AbstractConnection) -> None:
        await write_subscriptions(conn, self.wake, self.ops, lambda: self.last_rx,
                                  f"redis pub/sub to {self.name}")

    def _on_reply(self, reply: Any) -> None:
        if not isinstance(reply, list) or len(reply) < 3:
            return  # PONG
        kind, channel = reply[0], reply[1]
        if kind == b"smessage":
            self.owner.deliver(channel, reply[2])
        elif kind == b"ssubscribe":
            waiters = self.waiters.get(channel)
            if waiters:
                future = waiters.popleft()
                self.owner.unconfirmed.discard(future)
                if not future.done():
                    future.set_result(None)
        elif kind == b"sunsubscribe":
            pending = self.unsubscribing.get(channel, 0)
            if pending:
                if pending == 1:
                    del self.unsubscribing[channel]
                else:
                    self.unsubscribing[channel] = pending - 1
            elif channel in self.channels:
                # Not ours: the master gave the channel's slot away.
                self.owner.reconcile_soon()

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(BaseException):
            await self.task
        self._release()


class ShardedLiveChannel(LiveChannel):
    """Listeners of this node, fed from the sessions' shard channels on their masters."""

    _client: ClusterClient

    def __init__(self, client: ClusterClient, keys: KeySpace) -> None:
        super().__init__(client, keys)
        self.client = client
        self._shards: dict[str, _Shard] = {}
        self._where: dict[bytes, _Shard] = {}  # channel -> the shard subscribed to it
        self._reconciling: asyncio.Task[None] | None = None

    @property
    def closing(self) -> bool:
        return self._closing

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        for node in self.client.masters():
            self._shard(node)

    async def connected(self) -> None:
        """Wait until a connection to every master known at start is up."""
        await asyncio.gather(*(shard.ready.wait() for shard in list(self._shards.values())))

    async def close(self) -> None:
        self._closing = True
        if self._reconciling is not None:
            self._reconciling.cancel()
            with contextlib.suppress(BaseException):
                await self._reconciling
        await asyncio.gather(*(shard.close() for shard in self._shards.values()))
        for future in self.unconfirmed:
            if not future.done():
                future.set_result(None)
        self.unconfirmed.clear()

    # -- the SessionStore side ---------------------------------------------------------------

    async def publish_transient(self, event: Event) -> None:
        await self.subscribed()
        payload = orjson.dumps([1, event.epoch, event.time, event.seq, [[
            event.type, [event.sender.sub, event.sender.client, event.sender.kind],
            event.data]]])
        try:
            await self.client.cluster_client().execute_command(
                "SPUBLISH", self._keys.of(event.session).channel, payload)
        except (RedisError, RedisClusterException, OSError) as exc:
            raise StoreError(f"redis: {exc}") from exc

    def _queue_sub(self, command: bytes, channel: bytes) -> None:
        # LiveChannel.listen/unlisten keep self._channels and call this for the first
        # listener and after the last one of a session.
        if command == b"SUBSCRIBE":
            self._place(channel)
        else:
            shard = self._where.pop(channel, None)
            if shard is not None:
                shard.unsubscribe(channel)

    def deliver(self, channel: bytes, message: bytes) -> None:
        self._deliver(channel, message)

    # -- routing -----------------------------------------------------------------------------

    def _shard(self, node: ClusterNode) -> _Shard:
        shard = self._shards.get(node.name)
        if shard is None:
            shard = self._shards[node.name] = _Shard(self, node)
        return shard

    def _place(self, channel: bytes) -> None:
        """Subscribe ``channel`` on the master of its slot (by the slot map as it is)."""
        try:
            node = self.client.owner(self.client.slot(channel))
        except RedisClusterException:
            # No owner now: the next reconcile places it.
            self.reconcile_soon()
            return
        shard = self._shard(node)
        self._where[channel] = shard
        shard.subscribe(channel)

    def reconcile_soon(self) -> None:
        if self._closing:
            return
        if self._reconciling is None or self._reconciling.done():
            self._reconciling = asyncio.create_task(self._reconcile())

    async def _reconcile(self) -> None:
        """Refresh the slot map and move every channel to the master that owns it now."""
        delay = RECONNECT_MIN
        while not self._closing:
            await self.client.refresh()
            unplaced = False
            for channel in list(self._channels):
                try:
                    node = self.client.owner(self.client.slot(channel))
                except RedisClusterException:
                    unplaced = True
                    continue
                shard = self._where.get(channel)
                if shard is not None and shard.name == node.name:
                    continue
                if shard is not None:
                    shard.unsubscribe(channel)
                target = self._shard(node)
                self._where[channel] = target
                target.subscribe(channel)
            # Connections to masters that serve nothing of ours and are gone from the map.
            masters = {node.name for node in self.client.masters()}
            for name, shard in list(self._shards.items()):
                if name not in masters and not shard.channels:
                    del self._shards[name]
                    await shard.close()
            if not unplaced:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX)
