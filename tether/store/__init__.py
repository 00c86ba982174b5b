"""Session stores: the log with its live fan-out (``SessionStore``) and presence beside it
(``PresenceStore``); every store implements both (``Store``). See ``base.py``."""

from collections.abc import Callable

from tether.store.base import (
    Appended,
    Head,
    PresenceStore,
    Retention,
    SessionStore,
    Store,
    StoreError,
    StreamClosedError,
)
from tether.store.memory import MemoryStore

__all__ = [
    "Appended",
    "Head",
    "MemoryStore",
    "PresenceStore",
    "Retention",
    "SessionStore",
    "Store",
    "StoreError",
    "StreamClosedError",
    "open_store",
]


def open_store(url: str, retention: Retention | None = None, *,
               on_batch: Callable[[int], None] | None = None) -> Store:
    """Open a store from a URL: ``memory://``, ``sqlite:///path/to/dir``, ``redis://host:port/0``,
    or ``redis+cluster://host:port[,host:port...]`` for a Redis Cluster.

    ``on_batch`` hears the size of every commit of a batching store (sqlite, redis).
    """
    if url.startswith("memory:"):
        return MemoryStore(retention)
    if url.startswith("sqlite:"):
        from tether.store.sqlite import SqliteStore

        return SqliteStore(url.removeprefix("sqlite://"), retention, on_batch=on_batch)
    if url.startswith(("redis:", "rediss:", "unix:", "redis+cluster:", "rediss+cluster:")):
        from tether.store.redis import RedisStore

        return RedisStore(url, retention, on_batch=on_batch)
    raise ValueError(f"unknown store URL {url!r}: use memory://, sqlite:///DIR, "
                     "redis://HOST or redis+cluster://HOST:PORT[,HOST:PORT...]")
