"""Session stores: the log, live fan-out and presence behind one protocol."""

from tether.store.base import (
    Appended,
    Head,
    Retention,
    SessionStore,
    StoreError,
    StreamClosedError,
)
from tether.store.memory import MemoryStore

__all__ = [
    "Appended",
    "Head",
    "MemoryStore",
    "Retention",
    "SessionStore",
    "StoreError",
    "StreamClosedError",
    "open_store",
]


def open_store(url: str, retention: Retention | None = None) -> SessionStore:
    """Open a store from a URL: ``memory://``, ``sqlite:///path/to/dir``, ``redis://host:port/0``."""
    if url.startswith("memory:"):
        return MemoryStore(retention)
    if url.startswith("sqlite:"):
        from tether.store.sqlite import SqliteStore

        return SqliteStore(url.removeprefix("sqlite://"), retention)
    if url.startswith(("redis:", "rediss:", "unix:")):
        from tether.store.redis import RedisStore

        return RedisStore(url, retention)
    raise ValueError(f"unknown store URL {url!r}: use memory://, sqlite:///DIR or redis://HOST")
