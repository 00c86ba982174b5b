"""The Redis store against a Redis Cluster: the client, its slot map, and the sharded commit path.

A cluster store is chosen by the URL ``redis+cluster://[user:password@]host:port[,host:port...]``
(``rediss+cluster://`` for TLS; the query string takes the options of ``redis://``). The hosts
are seeds: the client discovers every master from the first that answers.

Plain commands and single-session scripts go through redis-py's ``RedisCluster``, which routes
each by its key's slot and follows ``MOVED``/``ASK`` itself. The commit path still packs its
``EVALSHA`` calls itself (``commit.py``), but a script may only touch keys of one slot, so a
flush groups its sessions by slot (each session's keys share the slot of its ``{S}`` hash tag),
packs one call per slot (split at ``MAX_SCRIPT_EVENTS``), and pipelines the calls of every
master on that flusher's connection to it, all masters at once.

A redirection or a cluster that is not ready means the script did not run, so resending is
safe and cannot commit twice: ``MOVED`` refreshes the slot map and resends to the new owner,
``ASK`` resends once to the importing node after ``ASKING``, ``TRYAGAIN``/``CLUSTERDOWN`` and
an uncovered slot wait a little, refresh, and resend (``TRYAGAIN`` is what a script gets while its
slot migrates and its keys are split between the two masters, so this lasts as long as the
migration, up to ``REDIRECT_TIMEOUT``; then the callers get a StoreError). A
lost connection is what it is on one Redis: the outcome of the unread calls is unknown, their
callers get a :class:`StoreError`, and the next flush starts from a refreshed slot map.

Failover: a master that dies loses its connections, so the calls in flight on them fail as
above; then it refuses new ones, and since nothing was sent, those calls wait and resend like
``CLUSTERDOWN``, refreshing the slot map each round, until a replica has taken the slots over
(within ``REDIRECT_TIMEOUT``). Redis replicates asynchronously: an event the master
acknowledged just before it died may be missing on the replica that replaces it, unless the
URL asks for ``wait_replicas`` (``commit.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from typing import Any
from urllib.parse import quote

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    RedisClusterException,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tether.store.base import StoreError
from tether.store.redis.client import RedisClient, is_cluster_url
from tether.store.redis.commit import (
    FLUSH_CONNECTIONS,
    MAX_SCRIPT_EVENTS,
    CommitQueue,
    NotSentError,
    Op,
)
from tether.store.redis.keys import KEY_CACHE_SIZE
from tether.store.redis.scripts import APPEND_SHARDED, CLUSTER_SCRIPTS

log = logging.getLogger("tether.store.redis")

# How long a flush keeps resending calls answered MOVED, ASK, TRYAGAIN or CLUSTERDOWN.
REDIRECT_TIMEOUT = 10.0
# The wait before resending after TRYAGAIN/CLUSTERDOWN: doubled each round, up to the cap.
REDIRECT_BACKOFF = 0.01
REDIRECT_BACKOFF_MAX = 0.5

_ASKING = [b"*1\r\n$6\r\nASKING\r\n"]


def parse_cluster_url(url: str) -> tuple[str, list[tuple[str, int]]]:
    """A ``redis+cluster://`` URL as a ``redis://`` URL of its first seed, and every seed."""
    scheme, sep, rest = url.partition("://")
    if not sep or not is_cluster_url(url):
        raise ValueError(f"not a Redis Cluster URL: {url!r}")
    plain = scheme.removesuffix("+cluster")
    netloc, slash, tail = rest.partition("/")
    query_at = netloc.find("?")
    if query_at >= 0:  # redis+cluster://h:p?opt=1
        netloc, slash, tail = netloc[:query_at], "/", netloc[query_at:]
    userinfo, at, hosts = netloc.rpartition("@")
    seeds: list[tuple[str, int]] = []
    for item in hosts.split(","):
        host, colon, port = item.strip().rpartition(":")
        if not colon:
            host, port = item.strip(), "6379"
        host = host.strip("[]")
        if not host or not port.isdigit():
            raise ValueError(f"bad host:port {item!r} in {url!r}")
        seeds.append((host, int(port)))
    first = seeds[0]
    host = f"[{first[0]}]" if ":" in first[0] else first[0]
    return f"{plain}://{userinfo}{at}{quote(host, safe='[]:')}:{first[1]}{slash}{tail}", seeds


class ClusterClient(RedisClient):
    """The store's redis-py cluster client, with the slot map the hot paths route by."""

    cluster = True

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self._cluster: RedisCluster | None = None
        self._refreshing: asyncio.Task[None] | None = None
        self._slots: dict[bytes, int] = {}

    async def open(self) -> None:
        """Discover the cluster and load every script on every master."""
        first, seeds = parse_cluster_url(self.connect_url)
        try:
            client = RedisCluster.from_url(
                first, startup_nodes=[ClusterNode(host, port) for host, port in seeds[1:]],
                protocol=2, decode_responses=False, health_check_interval=0)
        except (RedisError, ValueError) as exc:
            raise StoreError(f"redis cluster at {self.safe_url()}: {exc}") from exc
        try:
            await client.initialize()
            for script in CLUSTER_SCRIPTS:
                # SCRIPT LOAD goes to every master.
                await client.script_load(script.source)
        except (RedisError, OSError) as exc:
            await client.aclose()
            raise StoreError(
                f"redis cluster at {self.safe_url()} is unavailable: {exc}") from exc
        self._cluster = client
        self._client = client

    async def close(self) -> None:
        self.closing = True
        if self._refreshing is not None:
            self._refreshing.cancel()
            with contextlib.suppress(BaseException):
                await self._refreshing
        await super().close()

    def cluster_client(self) -> RedisCluster:
        if self._cluster is None or self.closing:
            raise StoreError("store is not started" if not self.closing else "store is closed")
        return self._cluster

    # -- the slot map ------------------------------------------------------------------------

    def slot(self, key: bytes) -> int:
        """The slot of ``key`` (cached: callers pass a session's meta key)."""
        slot = self._slots.get(key)
        if slot is None:
            if len(self._slots) >= KEY_CACHE_SIZE:
                self._slots.clear()
            slot = self._slots[key] = key_slot(key)
        return slot

    def owner(self, slot: int) -> ClusterNode:
        """The master that serves ``slot`` by the slot map; SlotNotCoveredError if none."""
        assert self._cluster is not None
        node: ClusterNode = self._cluster.nodes_manager.get_node_from_slot(slot)
        return node

    def masters(self) -> list[ClusterNode]:
        assert self._cluster is not None
        return list(self._cluster.get_primaries())

    async def refresh(self) -> None:
        """Reload the slot map from the cluster; concurrent callers share one reload."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.create_task(self._reload())
        await asyncio.shield(self._refreshing)

    async def _reload(self) -> None:
        try:
            await self.cluster_client().nodes_manager.initialize()
        except (RedisError, OSError, StoreError) as exc:
            log.warning("redis cluster: refreshing the slot map failed: %s", exc)

    def node_connection(self, node: ClusterNode, **overrides: Any) -> AbstractConnection:
        """A new raw connection to ``node`` with the client's settings (not connected yet)."""
        kwargs = {**node.connection_kwargs, "health_check_interval": 0, **overrides}
        connection: AbstractConnection = node.connection_class(**kwargs)
        return connection

    def connection(self, **overrides: Any) -> AbstractConnection:
        raise RedisClusterException("a cluster store connects to a node: use node_connection")


class ClusterCommitQueue(CommitQueue):
    """The commit queue of a cluster store: one script call per slot, pipelined per master."""

    script = APPEND_SHARDED
    _client: ClusterClient

    def __init__(self, client: ClusterClient, *args: Any, **kwargs: Any) -> None:
        super().__init__(client, *args, **kwargs)
        self._links: list[dict[str, AbstractConnection]] = []
        self._stale_map = False

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for n in range(FLUSH_CONNECTIONS):
            links: dict[str, AbstractConnection] = {}
            self._links.append(links)
            self._flushers.append(asyncio.create_task(
                self._flush_loop(functools.partial(self._flush_sharded, links)),
                name=f"tether-redis-flush-{n}"))
        self._open = True

    async def disconnect(self) -> None:
        for links in self._links:
            for conn in links.values():
                with contextlib.suppress(Exception):
                    await conn.disconnect()

    def _link(self, links: dict[str, AbstractConnection], node: ClusterNode
              ) -> AbstractConnection:
        conn = links.get(node.name)
        if conn is None:
            conn = links[node.name] = self._client.node_connection(node, socket_keepalive=True)
        return conn

    async def _flush_sharded(self, links: dict[str, AbstractConnection],
                             batch: dict[str, list[Op]]) -> None:
        if self._live.unconfirmed:
            await self._live.subscribed()
        if self._stale_map:
            self._stale_map = False
            await self._client.refresh()
        # One call per slot: a script may not touch keys of two slots.
        by_slot: dict[int, list[tuple[str, list[Op]]]] = {}
        slot_of, keys_of = self._client.slot, self._keys_of
        for session, ops in batch.items():
            live = [op for op in ops if not op.future.done()]
            if live:
                by_slot.setdefault(slot_of(keys_of(session).meta), []).append((session, live))
        calls: list[tuple[int, list[tuple[str, list[Op]]]]] = []
        for slot, items in by_slot.items():
            segments: list[tuple[str, list[Op]]] = []
            size = 0
            for session, live in items:
                while live:
                    room = MAX_SCRIPT_EVENTS - size
                    segments.append((session, live[:room]))
                    size += min(room, len(live))
                    live = live[room:]
                    if size >= MAX_SCRIPT_EVENTS:
                        calls.append((slot, segments))
                        segments, size = [], 0
            if segments:
                calls.append((slot, segments))
        if not calls:
            return
        registered = self._keys.registered
        unregistered = [s for s in batch if s not in registered]
        register = (asyncio.ensure_future(self._register(unregistered))
                    if unregistered else None)
        try:
            await self._send(links, calls)
        finally:
            if register is not None:
                await register

    async def _register(self, sessions: list[str]) -> None:
        """Add sessions to ``P:sessions`` (its own slot: a plain command of its own)."""
        try:
            await self._client.cluster_client().sadd(self._keys.sessions, *sessions)
        except (RedisError, OSError, StoreError) as exc:
            log.warning("redis cluster: registering sessions failed: %s", exc)
            return
        self._keys.registered.update(sessions)

    async def _send(self, links: dict[str, AbstractConnection],
                    calls: list[tuple[int, list[tuple[str, list[Op]]]]]) -> None:
        """Run every call on the master of its slot, resending the ones redirected; answer
        each call's callers as soon as it has its outcome."""
        commands = [self._pack_call(call) for _, call in calls]
        results: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        asking: dict[int, tuple[str, int]] = {}
        deadline = asyncio.get_running_loop().time() + REDIRECT_TIMEOUT
        backoff = REDIRECT_BACKOFF
        while True:
            groups: dict[str, tuple[ClusterNode, list[int]]] = {}
            for i in todo:
                try:
                    node = (self._asked_node(asking[i]) if i in asking
                            else self._client.owner(calls[i][0]))
                except RedisClusterException as exc:  # the slot is not covered
                    results[i] = ClusterDownError(str(exc))
                    continue
                groups.setdefault(node.name, (node, []))[1].append(i)
            packed: list[tuple[list[list[bytes]], list[int | None]]] = []
            for _, indexes in groups.values():
                node_commands: list[list[bytes]] = []
                owners: list[int | None] = []  # the call each reply answers (None: ASKING)
                for i in indexes:
                    if i in asking:
                        node_commands.append(_ASKING)
                        owners.append(None)
                    node_commands.append(commands[i])
                    owners.append(i)
                packed.append((node_commands, owners))
            replies = await asyncio.gather(*(
                self._execute(self._link(links, node), node_commands)
                for (node, _), (node_commands, _) in zip(groups.values(), packed, strict=True)))
            for (_, owners), node_results in zip(packed, replies, strict=True):
                for owner, result in zip(owners, node_results, strict=True):
                    if owner is not None:
                        results[owner] = result
            sent, todo, asking = todo, [], {}
            refresh = wait = False
            for i in sent:
                result = results[i]
                if isinstance(result, MovedError):
                    refresh = True
                elif isinstance(result, AskError):
                    asking[i] = result.node_addr
                elif isinstance(result, (TryAgainError, ClusterDownError, NotSentError)):
                    # NotSentError: the master is unreachable; it may be failing over.
                    refresh = wait = True
                else:
                    if isinstance(result, (RedisConnectionError, RedisTimeoutError, OSError)):
                        # A master may have failed over: route the next flush from a
                        # fresh slot map.
                        self._stale_map = True
                    self._answer(calls[i][1], result)
                    continue
                todo.append(i)
            if not todo:
                return
            if asyncio.get_running_loop().time() > deadline:
                for i in todo:
                    self._answer(calls[i][1], results[i])
                return
            if wait:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, REDIRECT_BACKOFF_MAX)
            if refresh:
                await self._client.refresh()

    def _answer(self, call: list[tuple[str, list[Op]]], result: Any) -> None:
        self._resolve(call, result)
        if self._on_batch is not None:
            self._on_batch(sum(len(ops) for _, ops in call))

    def _asked_node(self, address: tuple[str, int]) -> ClusterNode:
        host, port = address
        cluster = self._client.cluster_client()
        node: ClusterNode | None = cluster.get_node(host=host, port=port)
        if node is None:
            node = ClusterNode(host, port, **cluster.nodes_manager.connection_kwargs)
        return node
