"""The store protocols: what every store does, and what each must guarantee.

A store is two things, declared as two protocols:

* :class:`SessionStore` -- the log and its live fan-out: ``append``/``append_future``,
  ``read``, ``head``, ``trim``, ``listen``/``unlisten``, ``publish_transient``, plus
  lifecycle (``start``, ``close``) and the :class:`Retention` it applies. The log is the
  truth; live fan-out is only a shortcut for reading it, so the two belong together.
* :class:`PresenceStore` -- who is attached right now: ``set_presence``, ``clear_presence``,
  ``presence``. Presence is soft state with a TTL, never part of the log, and shares nothing
  with it but the session id, so it is a separate concern.

Every concrete store (memory, sqlite, redis) implements both, and :class:`Store` names that
combination; it is what :func:`tether.store.open_store` returns and what a server holds. Code
that only needs one side should ask for that protocol. Each store module asserts statically
(``type[Store]``) that its class conforms, so ``mypy`` fails if one drifts from the protocols.

Capabilities that differ between stores are declared members, not probed: ``live_is_lossy``
is True when live fan-out may drop events (Redis pub/sub is at-most-once), which tells the
server to check subscriptions' tails against the log periodically.

Guarantees (checked by ``tests/store/test_contract.py`` against every implementation):

* ``append`` returns only after the event is committed; its ``seq`` is the session's previous
  ``seq`` + 1 (gapless, assigned at commit) within the session's current epoch.
* Listeners see committed events only, in seq order, after the commit.
* An idempotency key seen for (session, sender subject) within the window returns the original
  event with ``duplicate=True`` and appends nothing.
* ``stream.end`` is stored with ``data.text`` set to the concatenation of the stream's
  ``stream.append`` texts, byte for byte; appending to or ending a closed stream raises
  :class:`StreamClosedError`.
* Retention trims the oldest events by count and age; ``head().first_seq`` tells readers
  whether their cursor is still covered.
* Presence entries expire ``ttl`` seconds after their last ``set_presence``.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from tether.protocol.codes import ErrorCode, TetherError
from tether.protocol.encoded import FORMATS
from tether.protocol.events import STREAM_APPEND, STREAM_END, Event, Sender


class StoreError(TetherError):
    """The store could not serve a request (I/O, connection, corruption). Temporary."""

    code = ErrorCode.STORE_UNAVAILABLE


class StreamClosedError(TetherError):
    """An append to, or an end of, a stream that has already ended."""

    code = ErrorCode.STREAM_CLOSED


@dataclass(frozen=True, slots=True)
class Head:
    """Where a session's log stands: its epoch, last seq and oldest retained seq.

    ``first_seq == last_seq + 1`` when nothing is retained (a new or fully trimmed session).
    """

    epoch: str
    last_seq: int
    first_seq: int


@dataclass(frozen=True, slots=True)
class Appended:
    event: Event
    duplicate: bool


@dataclass(frozen=True, slots=True)
class Retention:
    """How long a store keeps events and idempotency keys."""

    max_events: int = 100_000  # per session
    max_age: float = 30 * 86400.0  # seconds
    idempotency_window: float = 3600.0  # seconds


Listener = Callable[[Event], None]


@runtime_checkable
class SessionStore(Protocol):
    """The log and its live fan-out: one interface for memory, sqlite and redis."""

    retention: Retention
    # True when listeners may miss events (an at-most-once live channel such as Redis
    # pub/sub): the server then checks each channel's tail against the log periodically.
    live_is_lossy: bool

    async def start(self) -> None:
        """Open files or connections. Must be called before any other method."""

    async def close(self) -> None:
        """Flush pending commits and release resources."""

    async def append(self, session: str, type: str, data: Any, sender: Sender,
                     key: str | None = None) -> Appended:
        """Commit one event and return it with its seq; see the module docstring."""
        ...

    def append_future(self, session: str, type: str, data: Any, sender: Sender,
                      key: str | None = None) -> asyncio.Future[Appended]:
        """``append`` without a coroutine: the future resolves at commit (the hot path)."""
        ...

    async def read(self, session: str, after: int, limit: int) -> list[Event]:
        """Up to ``limit`` committed events with ``seq > after``, in seq order."""
        ...

    async def head(self, session: str) -> Head:
        """The session's epoch and bounds; creates the epoch for a new session."""
        ...

    async def trim(self) -> int:
        """Apply retention now; return the number of events removed."""
        ...

    async def publish_transient(self, event: Event) -> None:
        """Fan ``event`` out to listeners (on every node) without storing it."""

    def listen(self, session: str, listener: Listener) -> None:
        """Call ``listener`` with every committed and transient event of ``session``."""

    def unlisten(self, session: str, listener: Listener) -> None:
        """Stop calling ``listener``; unknown listeners are ignored."""


#: One page of a session's log as wire frames: (seq, the event's frame), in seq order.
EncodedPage = list[tuple[int, bytes]]


@runtime_checkable
class EncodedReader(Protocol):
    """A store that builds catch-up frames from its stored bytes (SQLite, the shared store).

    Optional: :func:`read_encoded` serves every other store by decoding and encoding.
    """

    async def read_encoded(self, session: str, after: int, limit: int, fmt: str
                           ) -> EncodedPage:
        """``read(session, after, limit)`` as frames of wire format ``fmt``.

        ``fmt`` is one of :data:`tether.protocol.encoded.FORMATS`. Each frame is byte for
        byte what :func:`tether.protocol.encoded.encode_reference` makes of the event that
        ``read`` returns (its ``tether.unreadable`` placeholder included), for every event the
        store committed itself.
        """
        ...


async def read_encoded(store: SessionStore, session: str, after: int, limit: int, fmt: str,
                       encode: Callable[[Event], bytes]) -> EncodedPage:
    """A page of ``session`` after ``after`` as frames of ``fmt``: built by the store from its
    stored bytes when it can (:class:`EncodedReader`), else read and ``encode``-d one by one.
    """
    # What EncodedReader's runtime check would test, without its cost on every catch-up read.
    reader: Callable[[str, int, int, str], Awaitable[EncodedPage]] | None = getattr(
        store, "read_encoded", None)
    if reader is not None and fmt in FORMATS:
        return await reader(session, after, limit, fmt)
    return [(event.seq, encode(event)) for event in await store.read(session, after, limit)]


@runtime_checkable
class PresenceStore(Protocol):
    """Who is attached to a session now: soft state with a TTL, kept beside the log."""

    async def set_presence(self, session: str, member: str, info: dict[str, Any],
                           ttl: float) -> None:
        """Record ``member`` as present for ``ttl`` seconds (refresh by calling again)."""

    async def clear_presence(self, session: str, member: str) -> None:
        """Remove ``member`` from the session's presence."""

    async def presence(self, session: str) -> list[dict[str, Any]]:
        """Present members' info, expired entries excluded."""
        ...


@runtime_checkable
class Store(SessionStore, PresenceStore, Protocol):
    """A complete store: the log with its fan-out, and presence (every concrete store)."""


def now_ms() -> int:
    return int(time.time() * 1000)


class StreamText:
    """Open token streams of one store: the text so far, and which streams have ended.

    Stores that keep state in process (memory, sqlite) use this to fill in ``stream.end``.
    ``load`` answers a cache miss from the log (after a restart, or after eviction), returning
    the texts of the stream's appends and whether it has ended. Both caches are bounded, least
    recently used first out, since the log can always answer again.
    """

    def __init__(self, load: Callable[[str, str], tuple[list[str], bool]],
                 max_entries: int = 10_000) -> None:
        self._load = load
        self._max = max_entries
        self._open: OrderedDict[tuple[str, str], list[str]] = OrderedDict()
        self._closed: OrderedDict[tuple[str, str], None] = OrderedDict()

    def _parts(self, key: tuple[str, str]) -> list[str]:
        parts = self._open.get(key)
        if parts is not None:
            self._open.move_to_end(key)
            return parts
        if key in self._closed:
            raise StreamClosedError(f"stream {key[1]!r} has ended")
        texts, closed = self._load(*key)
        if closed:
            self._remember_closed(key)
            raise StreamClosedError(f"stream {key[1]!r} has ended")
        self._open[key] = texts
        if len(self._open) > self._max:
            self._open.popitem(last=False)
        return texts

    def _remember_closed(self, key: tuple[str, str]) -> None:
        self._closed[key] = None
        if len(self._closed) > self._max:
            self._closed.popitem(last=False)

    def prepare(self, session: str, type: str, data: Any) -> Any:
        """Check a stream event before commit; return the data to store."""
        if type == STREAM_APPEND:
            self._parts((session, data["stream"]))
            return data
        if type == STREAM_END:
            parts = self._parts((session, data["stream"]))
            return {**data, "text": "".join(parts)}
        return data

    def committed(self, session: str, type: str, data: Any) -> None:
        """Record a committed stream event (after :meth:`prepare` admitted it)."""
        key = (session, data["stream"]) if type in (STREAM_APPEND, STREAM_END) else None
        if key is None:
            return
        if type == STREAM_APPEND:
            parts = self._open.get(key)
            if parts is None:  # evicted between prepare and commit: reload on next use
                return
            parts.append(data["text"])
        else:
            self._open.pop(key, None)
            self._remember_closed(key)

    def forget(self) -> None:
        """Drop cached state (after a failed commit); it reloads from the log."""
        self._open.clear()
        self._closed.clear()


class Listeners:
    """Per-session listener registry with snapshot-safe dispatch."""

    def __init__(self) -> None:
        self._by_session: dict[str, list[Listener]] = {}

    def add(self, session: str, listener: Listener) -> None:
        self._by_session.setdefault(session, []).append(listener)

    def remove(self, session: str, listener: Listener) -> None:
        listeners = self._by_session.get(session)
        if listeners and listener in listeners:
            listeners.remove(listener)
            if not listeners:
                del self._by_session[session]

    def has(self, session: str) -> bool:
        return session in self._by_session

    def sessions(self) -> list[str]:
        return list(self._by_session)

    def dispatch(self, event: Event) -> None:
        listeners = self._by_session.get(event.session)
        if listeners:
            for listener in tuple(listeners):
                try:
                    listener(event)
                except Exception as exc:  # one broken listener must not starve the others
                    asyncio.get_running_loop().call_exception_handler(
                        {"message": f"listener of {event.session!r} failed", "exception": exc})


class InProcessFanout:
    """Live fan-out kept in this process: for stores that serve one node.

    Dispatch is a direct call after commit, so no listener can miss an event: stores built on
    this set ``live_is_lossy = False``.
    """

    def __init__(self) -> None:
        self._listeners = Listeners()

    async def publish_transient(self, event: Event) -> None:
        self._listeners.dispatch(event)

    def listen(self, session: str, listener: Listener) -> None:
        self._listeners.add(session, listener)

    def unlisten(self, session: str, listener: Listener) -> None:
        self._listeners.remove(session, listener)


class InProcessPresence:
    """Presence kept in this process (a :class:`PresenceStore`): for stores that serve one node."""

    def __init__(self) -> None:
        self._presence: dict[str, dict[str, tuple[dict[str, Any], float]]] = {}

    async def set_presence(self, session: str, member: str, info: dict[str, Any],
                           ttl: float) -> None:
        self._presence.setdefault(session, {})[member] = (info, time.monotonic() + ttl)

    async def clear_presence(self, session: str, member: str) -> None:
        members = self._presence.get(session)
        if members is not None:
            members.pop(member, None)
            if not members:
                del self._presence[session]

    async def presence(self, session: str) -> list[dict[str, Any]]:
        members = self._presence.get(session)
        if not members:
            return []
        now = time.monotonic()
        for member in [m for m, (_, expires) in members.items() if expires <= now]:
            del members[member]
        return [info for info, _ in members.values()]
