"""``RedisStore``: the parts of this package behind one :class:`~tether.store.base.Store`.

The class itself keeps the lifecycle and the log's reads (``read``, ``head``, ``trim``) and
hands the rest to one part each: appends to :class:`CommitQueue`, live fan-out to
:class:`LiveChannel`, presence to :class:`RedisPresence`. They share one
:class:`RedisClient` and one :class:`KeySpace`. The hot path costs one plain call more than a
single class would: ``append_future`` forwards to the commit queue, with no await or task.

Retention: XADD trims with ``MAXLEN ~`` (whole stream nodes, cheap); ``trim()`` trims every
session in ``P:sessions`` exactly, by count, then by age from the oldest entries with
``XTRIM MINID``. Idempotency keys and ended-stream markers expire on their own (``PX``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, RedisError

from tether.protocol.events import Event, Sender
from tether.store.base import Appended, Head, Listener, Retention, Store, StoreError
from tether.store.readable import checked, undecodable
from tether.store.redis.client import RedisClient, is_cluster_url
from tether.store.redis.codec import decode_sender, seq_of
from tether.store.redis.commit import CommitQueue
from tether.store.redis.keys import KeySpace
from tether.store.redis.presence import RedisPresence
from tether.store.redis.pubsub import SUBSCRIBE_WAIT, LiveChannel
from tether.store.redis.scripts import HEAD, READ, TRIM

# Sessions trimmed per pipeline by trim().
TRIM_PIPELINE = 100


class RedisStore:
    """A :class:`~tether.store.base.Store` on Redis streams, scripts and pub/sub."""

    # Pub/sub is at-most-once: the server heals gaps from the Stream (Hub.check_tails).
    live_is_lossy = True

    def __init__(self, url: str, retention: Retention | None = None, *,
                 on_batch: Callable[[int], None] | None = None,
                 prefix: str = "tether") -> None:
        self.url = url
        self.retention = retention or Retention()
        self.prefix = prefix
        self._keys = KeySpace(prefix)
        self._client: RedisClient
        self._live: LiveChannel
        self._commits: CommitQueue
        if is_cluster_url(url):
            from tether.store.redis.cluster import ClusterClient, ClusterCommitQueue
            from tether.store.redis.shards import ShardedLiveChannel

            cluster = ClusterClient(url)
            self._client = cluster
            self._live = ShardedLiveChannel(cluster, self._keys)
            self._commits = ClusterCommitQueue(cluster, self._keys, self._live,
                                               self.retention, on_batch)
        else:
            self._client = RedisClient(url)
            self._live = LiveChannel(self._client, self._keys)
            self._commits = CommitQueue(self._client, self._keys, self._live, self.retention,
                                        on_batch)
        self._presence = RedisPresence(self._client, self._keys)
        self._closing = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        await self._client.open()
        self._commits.start()
        self._live.start()
        # A listener registered right after start must hear the very first commits, so the
        # pub/sub connection has to be up before anything can be appended.
        try:
            await asyncio.wait_for(self._live.connected(), SUBSCRIBE_WAIT * 5)
        except TimeoutError:
            await self.close()
            raise StoreError(
                f"redis at {self._client.safe_url()}: pub/sub did not connect") from None

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._client.closing = True
        self._live.stopping()
        await self._commits.close()  # commits what is queued
        await self._live.close()
        await self._commits.disconnect()
        with contextlib.suppress(Exception):
            await self._client.close()

    # -- log ---------------------------------------------------------------------------------

    async def append(self, session: str, type: str, data: Any, sender: Sender,
                     key: str | None = None) -> Appended:
        return await self._commits.append_future(session, type, data, sender, key)

    def append_future(self, session: str, type: str, data: Any, sender: Sender,
                      key: str | None = None) -> asyncio.Future[Appended]:
        """Queue an append for the next batch; the future resolves at commit."""
        return self._commits.append_future(session, type, data, sender, key)

    async def read(self, session: str, after: int, limit: int) -> list[Event]:
        if limit <= 0:
            return []
        keys = self._keys.of(session)
        result = await self._client.eval(READ, (keys.meta, keys.log),
                                         (f"({max(after, 0)}-0", limit))
        if not result:
            return []
        epoch = result[0].decode()
        events = []
        for entry_id, fields in result[1]:
            seq, time = seq_of(entry_id), int(fields[1])
            try:
                raw = orjson.loads(fields[3])
                event = Event(session, epoch, seq, raw[0], raw[2], decode_sender(raw[1]), time)
            except (orjson.JSONDecodeError, IndexError, TypeError, KeyError) as exc:
                placeholder = Event(session, epoch, seq, "unknown", None, Sender(""), time)
                events.append(undecodable(placeholder, exc))
                continue
            events.append(checked(event, fields[3]))
        return events

    async def head(self, session: str) -> Head:
        keys = self._keys.of(session)
        epoch, last_seq, first_seq = await self._client.eval(
            HEAD, (keys.meta, keys.log), (self._keys.candidate(session)[0],))
        self._keys.epoch_taken(session, epoch)
        if session not in self._keys.registered:
            try:
                await self._client.redis().sadd(self._keys.sessions, session)
            except (RedisError, OSError) as exc:
                raise StoreError(f"redis: {exc}") from exc
            self._keys.registered.add(session)
        return Head(epoch.decode(), int(last_seq), int(first_seq))

    async def trim(self) -> int:
        client = self._client.redis()
        removed = 0
        args = (self.retention.max_events, max(0, math.floor(self.retention.max_age * 1000)))
        try:
            batch: list[str] = []
            async for member in client.sscan_iter(self._keys.sessions, count=TRIM_PIPELINE):
                batch.append(member.decode())
                if len(batch) >= TRIM_PIPELINE:
                    removed += await self._trim_sessions(client, batch, args)
                    batch = []
            if batch:
                removed += await self._trim_sessions(client, batch, args)
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis: {exc}") from exc
        return removed

    async def _trim_sessions(self, client: aioredis.Redis | RedisCluster, sessions: list[str],
                             args: tuple[int, int]) -> int:
        if self._client.cluster:
            # A cluster pipeline refuses scripts: one call per session, all at once.
            counts = await asyncio.gather(*(
                self._client.eval(TRIM, (self._keys.of(session).log,), args)
                for session in sessions))
            return sum(int(count) for count in counts)
        # Scripts are loaded at start; reload once if the server lost them since.
        for attempt in range(2):
            pipe = client.pipeline(transaction=False)
            for session in sessions:
                pipe.evalsha(TRIM.sha, 1, self._keys.of(session).log, *args)
            results = await pipe.execute(raise_on_error=False)
            if attempt == 0 and any(isinstance(r, NoScriptError) for r in results):
                await client.script_load(TRIM.source)
                continue
            break
        removed = 0
        for result in results:
            if isinstance(result, Exception):
                raise result
            removed += int(result)
        return removed

    # -- live fan-out (pubsub.py) ------------------------------------------------------------

    async def publish_transient(self, event: Event) -> None:
        await self._live.publish_transient(event)

    def listen(self, session: str, listener: Listener) -> None:
        self._live.listen(session, listener)

    def unlisten(self, session: str, listener: Listener) -> None:
        self._live.unlisten(session, listener)

    # -- presence (presence.py) --------------------------------------------------------------

    async def set_presence(self, session: str, member: str, info: dict[str, Any],
                           ttl: float) -> None:
        await self._presence.set_presence(session, member, info, ttl)

    async def clear_presence(self, session: str, member: str) -> None:
        await self._presence.clear_presence(session, member)

    async def presence(self, session: str) -> list[dict[str, Any]]:
        return await self._presence.presence(session)


if TYPE_CHECKING:
    # mypy fails here if RedisStore stops conforming to SessionStore or PresenceStore.
    _conforms: type[Store] = RedisStore
