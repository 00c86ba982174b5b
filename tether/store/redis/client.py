"""The Redis store's connection: one redis-py client, plus raw connections made from its pool.

Plain commands and script calls (reads, heads, presence, trim, transient publishes) go through
the redis-py client, which pools connections and retries a dropped idle one. The hot paths do
not: each commit flusher (``commit.py``) and the pub/sub reader (``pubsub.py``) own one raw
connection, built here with the client's settings, and speak RESP on it directly.

RESP2 keeps replies (and pub/sub messages) plain arrays, which is what the hot paths parse.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import NoScriptError, RedisError

from tether.store.base import StoreError
from tether.store.redis.scripts import SCRIPTS, Script

# URL schemes of a Redis Cluster (``cluster.py``).
CLUSTER_SCHEMES = ("redis+cluster:", "rediss+cluster:")


# The default of ``wait_timeout`` (milliseconds).
WAIT_TIMEOUT = 1000


def is_cluster_url(url: str) -> bool:
    return url.startswith(CLUSTER_SCHEMES)


def split_store_options(url: str) -> tuple[str, int, int]:
    """``url`` without the store's own query options, and their values.

    ``wait_replicas=N`` acknowledges a commit only once N replicas have it (``WAIT`` after
    each pipeline of commits, ``commit.py``), waiting at most ``wait_timeout`` ms (default
    1000); the other options are redis-py's.
    """
    parts = urlsplit(url)
    kept: list[tuple[str, str]] = []
    replicas, timeout = 0, WAIT_TIMEOUT
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name not in ("wait_replicas", "wait_timeout"):
            kept.append((name, value))
            continue
        if not value.isdigit():
            raise ValueError(f"{name} must be a whole number, not {value!r}")
        if name == "wait_replicas":
            replicas = int(value)
        elif int(value) > 0:  # WAIT's 0 would block for ever
            timeout = int(value)
        else:
            raise ValueError("wait_timeout must be at least 1 (milliseconds)")
    if len(kept) == len(parse_qsl(parts.query, keep_blank_values=True)):
        return url, replicas, timeout
    return urlunsplit(parts._replace(query=urlencode(kept))), replicas, timeout


class RedisClient:
    """The store's redis-py client: opened by :meth:`open`, refused once closing."""

    # Whether the client is a Redis Cluster's (``cluster.ClusterClient``).
    cluster = False

    def __init__(self, url: str) -> None:
        self.url = url
        # The URL redis-py connects with, and how many replicas a commit waits for.
        self.connect_url, self.wait_replicas, self.wait_timeout = split_store_options(url)
        self._client: aioredis.Redis | RedisCluster | None = None
        self.closing = False

    async def open(self) -> None:
        """Connect and load every script; a StoreError if Redis is unavailable."""
        # A few quick retries ride over a dropped idle connection without stalling callers
        # when Redis is really down.
        client = aioredis.Redis.from_url(
            self.connect_url, protocol=2, decode_responses=False, health_check_interval=0,
            retry=Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.25), 2),
        )
        try:
            pipe = client.pipeline(transaction=False)
            for script in SCRIPTS:
                pipe.script_load(script.source)
            await pipe.execute()
        except (RedisError, OSError) as exc:
            await client.aclose()
            raise StoreError(f"redis at {self.safe_url()} is unavailable: {exc}") from exc
        self._client = client

    async def close(self) -> None:
        self.closing = True
        if self._client is not None:
            await self._client.aclose()

    def safe_url(self) -> str:
        """The URL without credentials, for messages."""
        scheme, sep, rest = self.url.partition("://")
        return f"{scheme}{sep}{rest.rpartition('@')[2]}"

    def connection(self, **overrides: Any) -> AbstractConnection:
        """A new raw connection with the client's settings (not connected yet)."""
        assert isinstance(self._client, aioredis.Redis)
        pool = self._client.connection_pool
        kwargs = {**pool.connection_kwargs, "health_check_interval": 0, **overrides}
        connection: AbstractConnection = pool.connection_class(**kwargs)
        return connection

    def redis(self) -> aioredis.Redis | RedisCluster:
        """The client for plain commands; a StoreError before start or once closing."""
        if self._client is None or self.closing:
            raise StoreError("store is not started" if not self.closing else "store is closed")
        return self._client

    async def eval(self, script: Script, keys: Sequence[bytes | str],
                   args: Sequence[bytes | str | int]) -> Any:
        """``EVALSHA`` ``script``, or ``EVAL`` it if the server lost it."""
        client = self.redis()
        execute: Callable[..., Awaitable[Any]] = client.execute_command
        try:
            try:
                return await execute("EVALSHA", script.sha, len(keys), *keys, *args)
            except NoScriptError:
                # The server restarted, its script cache was flushed, or it is a promoted
                # replica (Redis 7 does not replicate SCRIPT LOAD). EVAL caches the script on
                # the node that serves the keys, which a SCRIPT LOAD routed by a cluster
                # client's node map may miss while that map is stale.
                return await execute("EVAL", script.source, len(keys), *keys, *args)
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis: {exc}") from exc
