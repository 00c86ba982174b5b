"""One store shared by the worker processes of one machine: a host and its clients.

``tether serve --workers N`` runs one *sequencer* process that owns the real store (the
embedded SQLite store by default) and N worker processes that serve the port. Each worker
holds a :class:`SharedStore`: a :class:`~tether.store.base.Store` whose every call travels over
one Unix stream socket to the :class:`StoreHost` in the sequencer, which answers from the real
store. Workers are to the host what nodes are to Redis, so what already works across nodes —
run leases by idempotency key, presence, resume from any node — works across workers unchanged.

Why the log's guarantees hold:

* **One sequencer per session.** Only the host's store assigns seqs, in its group commit, so
  seqs stay gapless and a cursor means the same on every worker.
* **Commit before deliver.** The host answers an append and pushes the event to listening
  workers only from the store's own commit callbacks, which run after the commit.
* **A listener added before an append hears it.** A worker's messages travel in call order on
  one socket, and the host handles them in that order: a ``listen`` sent before a ``read`` is
  registered before the read runs, so no committed event can fall between history and live.
  The host's pushes are not lossy while the socket is up (``live_is_lossy = False``); when it
  goes down the worker's store fails every call and the worker stops (its clients reconnect
  and resume from their cursors).

Wire format, both ways: frames of a 4-byte big-endian length and a JSON array of messages,
each message a JSON array whose first item is its kind. Everything a loop iteration sends goes
out as one frame, so a burst of appends costs one ``write()`` and one ``orjson.loads`` on each
side (group commit's batching, carried over the socket). Requests carry an id; the host sends
back ``_OK`` / ``_ERR`` answers, ``_EVENT`` pushes of committed or transient events to listening
workers, and ``_OK_EVENT``, the answer to an append of a session the worker listens to, which
is also that event's push (sent where the push would be, so the commit order holds).

Catch-up pages (``read_encoded``) come back as the frames the host's store joins from its
stored bytes, in one JSON string with their seqs and lengths: the worker encodes the string
once and slices it, with no event decoded or encoded on either side.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import orjson

from tether.protocol.encoded import (
    FORMAT_JSON,
    FORMAT_JSON_WS,
    FORMAT_SSE,
    FORMATS,
    ws_frame,
)
from tether.protocol.events import STREAM_END, Event, Sender
from tether.store.base import (
    Appended,
    EncodedPage,
    Head,
    Listener,
    Listeners,
    Retention,
    Store,
    StoreError,
    StreamClosedError,
    read_encoded,
)
from tether.store.readable import reference_frame

log = logging.getLogger("tether.store.shared")

# Client → host.
_APPEND, _READ, _HEAD, _TRIM, _LISTEN, _UNLISTEN, _TRANSIENT = 0, 1, 2, 3, 4, 5, 6
_SET_PRESENCE, _CLEAR_PRESENCE, _PRESENCE = 7, 8, 9
_READ_ENCODED = 10
_JOIN_PRESENCE = 11  # set a member, then list the session's members: one round trip
# Host → client.
_OK, _ERR, _EVENT, _OK_EVENT = 0, 1, 2, 3
# Error codes of an _ERR reply.
_CLOSED, _STORE, _OTHER = 0, 1, 2

# A frame larger than this is a broken peer, not a message (the largest request is one event,
# bounded by the server's max frame size; the largest reply is one page of a catch-up read).
MAX_FRAME = 1 << 30
# What one side holds for a peer that does not read before it gives up on the connection.
MAX_BUFFERED = 256 << 20
# How long close() waits for replies to what was already sent.
CLOSE_WAIT = 10.0


class _Senders(dict[tuple[str, str, str], Sender]):
    """Senders by (sub, client, kind), made once: a frozen dataclass costs a microsecond to
    build, and a connection's events come from few senders. Bounded: cleared when full."""

    def get_sender(self, sub: str, client: str, kind: str) -> Sender:
        key = (sub, client, kind)
        sender = self.get(key)
        if sender is None:
            if len(self) >= 4096:
                self.clear()
            sender = self[key] = Sender(sub, client, kind)
        return sender


def _frame(messages: list[bytes]) -> bytes:
    body = b"[" + b",".join(messages) + b"]"
    return len(body).to_bytes(4, "big") + body


class _Framed(asyncio.Protocol):
    """Length-prefixed frames in, batched frames out (one write per loop iteration)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.senders = _Senders()
        self._buffer = bytearray()
        self._out: list[bytes] = []
        self._flush_handle: asyncio.Handle | None = None
        self._loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        end = len(buffer)
        frames: list[Any] = []
        while end - start >= 4:
            size = int.from_bytes(buffer[start:start + 4], "big")
            if size > MAX_FRAME:
                self.fail(f"frame of {size} bytes")
                return
            if end - start - 4 < size:
                break
            try:
                frames.append(orjson.loads(memoryview(buffer)[start + 4:start + 4 + size]))
            except orjson.JSONDecodeError as exc:
                self.fail(f"undecodable frame: {exc}")
                return
            start += 4 + size
        if start:
            del buffer[:start]
        for messages in frames:
            self.received(messages)

    def received(self, messages: list[Any]) -> None:
        raise NotImplementedError

    def fail(self, reason: str) -> None:
        log.error("shared store connection: %s; closing it", reason)
        if self.transport is not None:
            self.transport.abort()  # close() would wait to send what the peer does not read

    def send(self, message: bytes) -> None:
        self._out.append(message)
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self.flush)

    def schedule_flush(self) -> None:
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_handle = None
        out, self._out = self._out, []
        transport = self.transport
        if out and transport is not None and not transport.is_closing():
            transport.write(_frame(out))
            if transport.get_write_buffer_size() > MAX_BUFFERED:
                # The peer stopped reading (a stalled worker): bound our memory. A worker that
                # loses its host stops, its clients resume elsewhere, and it is restarted.
                self.fail(f"the peer has not read {MAX_BUFFERED >> 20} MiB")


# -- the host (in the sequencer process) -------------------------------------------------------

class StoreHost:
    """Serves one :class:`~tether.store.base.Store` to :class:`SharedStore` clients."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.connections: set[HostConnection] = set()
        # session → the connections whose worker listens to it; one store listener each.
        self._interest: dict[str, set[HostConnection]] = {}
        self._listeners: dict[str, Listener] = {}

    async def serve(self, sock: socket.socket) -> HostConnection:
        """Serve a client on ``sock`` (one end of a socketpair, or an accepted socket)."""
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_unix_connection(lambda: HostConnection(self), sock=sock)
        self.connections.add(protocol)
        return protocol

    async def close(self) -> None:
        """Close every client connection (the store itself is the caller's)."""
        for conn in list(self.connections):
            conn.flush()
            if conn.transport is not None:
                conn.transport.close()
        self.connections.clear()

    # -- fan-out -----------------------------------------------------------------------------

    def listen(self, conn: HostConnection, session: str) -> None:
        conns = self._interest.get(session)
        if conns is None:
            conns = self._interest[session] = set()
            listener = self._listeners[session] = self._make_listener(conns)
            self.store.listen(session, listener)
        conns.add(conn)

    def unlisten(self, conn: HostConnection, session: str) -> None:
        conns = self._interest.get(session)
        if conns is None:
            return
        conns.discard(conn)
        if not conns:
            del self._interest[session]
            self.store.unlisten(session, self._listeners.pop(session))

    @staticmethod
    def _make_listener(conns: set[HostConnection]) -> Listener:
        dumps = orjson.dumps

        def on_event(event: Event) -> None:
            # Encoded once for every worker that listens; the worker that appended it gets it
            # with its answer instead (_OK_EVENT), here, so that it keeps the commit order.
            message: bytes | None = None
            for conn in conns:
                answering = conn.answering
                if answering and id(event) in answering:
                    conn.answer_with_event(*answering.pop(id(event)))
                    continue
                if message is None:
                    sender = event.sender
                    message = dumps([_EVENT, event.session, event.epoch, event.seq, event.type,
                                     event.data, sender.sub, sender.client, sender.kind,
                                     event.time, event.transient])
                conn.send(message)

        return on_event

    def closed(self, conn: HostConnection) -> None:
        self.connections.discard(conn)
        for session in list(conn.sessions):
            self.unlisten(conn, session)
        conn.sessions.clear()


def _error(rid: int, exc: BaseException) -> bytes:
    code = _CLOSED if isinstance(exc, StreamClosedError) else \
        _STORE if isinstance(exc, StoreError) else _OTHER
    return orjson.dumps([_ERR, rid, code, str(exc) or type(exc).__name__])


def _event_row(event: Event) -> list[Any]:
    sender = event.sender
    return [event.seq, event.type, event.data, sender.sub, sender.client, sender.kind,
            event.time]


# A page of frames crosses the socket as one JSON string: the worker gets the host's bytes
# back with one orjson.loads and one encode, not an Event per frame. So only text formats
# travel; the worker puts the WebSocket header on itself.
_TEXT_FORMATS = (FORMAT_JSON, FORMAT_SSE)


def _page_text(page: EncodedPage) -> list[Any]:
    frames = [frame for _, frame in page]
    return [[seq for seq, _ in page], [len(frame) for frame in frames],
            b"".join(frames).decode()]


class HostConnection(_Framed):
    """One worker's connection to the host."""

    def __init__(self, host: StoreHost) -> None:
        super().__init__()
        self.host = host
        self.sessions: set[str] = set()
        self.pending: set[asyncio.Future[Any]] = set()
        # Appends committed for a worker that listens to their session, by id(event): answered
        # when the store's dispatch of the same commit reaches them, in commit order (flush
        # answers any that dispatch did not reach).
        self.answering: dict[int, tuple[int, Event]] = {}

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.host.closed(self)

    def flush(self) -> None:
        if self.answering:
            for rid, event in self.answering.values():
                self.send(orjson.dumps([_OK, rid, event.epoch, event.seq, event.time, False,
                                        _event_row(event)]))
            self.answering.clear()
        super().flush()

    def answer_with_event(self, rid: int, event: Event) -> None:
        sender = event.sender
        self.send(orjson.dumps([_OK_EVENT, rid, event.session, event.epoch, event.seq,
                                event.type, event.data, sender.sub, sender.client, sender.kind,
                                event.time]))

    def received(self, messages: list[Any]) -> None:
        store = self.host.store
        # The SQLite store answers at commit with a plain call: no future per append.
        append_callback = getattr(store, "append_callback", None)
        sender_of = self.senders.get_sender
        for message in messages:
            kind = message[0]
            try:
                if kind == _APPEND:
                    _, rid, session, type_, data, sub, client, kind_, key = message
                    if append_callback is not None:
                        append_callback(session, type_, data, sender_of(sub, client, kind_), key,
                                        partial(self._appended, rid, type_, True))
                    else:
                        future = store.append_future(session, type_, data,
                                                     sender_of(sub, client, kind_), key)
                        future.add_done_callback(partial(self._appended_future, rid, type_))
                elif kind == _LISTEN:
                    session = message[1]
                    if session not in self.sessions:
                        self.sessions.add(session)
                        self.host.listen(self, session)
                elif kind == _UNLISTEN:
                    session = message[1]
                    if session in self.sessions:
                        self.sessions.discard(session)
                        self.host.unlisten(self, session)
                elif kind == _READ:
                    _, rid, session, after, limit = message
                    self._later(rid, store.read(session, after, limit),
                                lambda events: [events[0].epoch if events else "",
                                                [_event_row(e) for e in events]])
                elif kind == _READ_ENCODED:
                    _, rid, session, after, limit, fmt = message
                    if fmt not in _TEXT_FORMATS:
                        raise ValueError(f"no text format {fmt!r}")
                    self._later(rid, read_encoded(store, session, after, limit, fmt,
                                                  partial(reference_frame, fmt)), _page_text)
                elif kind == _HEAD:
                    _, rid, session = message
                    self._later(rid, store.head(session),
                                lambda head: [head.epoch, head.last_seq, head.first_seq])
                elif kind == _TRANSIENT:
                    _, session, epoch, seq, type_, data, sub, client, kind_, time = message
                    event = Event(session, epoch, seq, type_, data, sender_of(sub, client, kind_),
                                  time, transient=True)
                    self._later(None, store.publish_transient(event), None)
                elif kind == _TRIM:
                    self._later(message[1], store.trim(), None)
                elif kind == _SET_PRESENCE:
                    _, rid, session, member, info, ttl = message
                    self._later(rid, store.set_presence(session, member, info, ttl), None)
                elif kind == _CLEAR_PRESENCE:
                    _, rid, session, member = message
                    self._later(rid, store.clear_presence(session, member), None)
                elif kind == _PRESENCE:
                    _, rid, session = message
                    self._later(rid, store.presence(session), None)
                elif kind == _JOIN_PRESENCE:
                    _, rid, session, member, info, ttl = message
                    self._later(rid, _join_presence(store, session, member, info, ttl), None)
                else:
                    raise ValueError(f"unknown message kind {kind!r}")
            except Exception as exc:
                rid = message[1] if len(message) > 1 and isinstance(message[1], int) else None
                if rid is not None and kind not in (_LISTEN, _UNLISTEN, _TRANSIENT):
                    self.send(_error(rid, exc))
                else:
                    log.warning("shared store: bad message from a worker: %s", exc)

    def _appended_future(self, rid: int, type_: str, future: asyncio.Future[Appended]
                         ) -> None:
        if future.cancelled():
            self._appended(rid, type_, False, StoreError("append cancelled"))
        else:
            self._appended(rid, type_, False, future.exception() or future.result())

    def _appended(self, rid: int, type_: str, before_dispatch: bool,
                  answer: Appended | BaseException) -> None:
        """Answer an append. ``before_dispatch``: called at commit, before the store hands the
        event to listeners (``append_callback``), so a worker that listens to the session can
        have the event with its answer, once, instead of an answer and a push."""
        try:
            if not isinstance(answer, Appended):
                self.send(_error(rid, answer))
                return
            event = answer.event
            if before_dispatch and not answer.duplicate and event.session in self.sessions:
                self.answering[id(event)] = (rid, event)  # see on_event
                self.schedule_flush()
            elif answer.duplicate or event.type == STREAM_END or event.type != type_:
                # The client cannot rebuild these from its request: send the whole event.
                self.send(orjson.dumps([_OK, rid, event.epoch, event.seq, event.time,
                                        answer.duplicate, _event_row(event)]))
            else:
                self.send(orjson.dumps([_OK, rid, event.epoch, event.seq, event.time]))
        except Exception as exc:  # called from the store's commit: never raise into it
            log.exception("shared store: cannot answer an append: %s", exc)

    def _later(self, rid: int | None, awaitable: Any, encode: Callable[[Any], Any] | None
               ) -> None:
        future = asyncio.ensure_future(awaitable)
        self.pending.add(future)

        def done(future: asyncio.Future[Any]) -> None:
            self.pending.discard(future)
            if future.cancelled():
                if rid is not None:
                    self.send(_error(rid, StoreError("request cancelled")))
                return
            exc = future.exception()
            if rid is None:
                if exc is not None:
                    log.warning("shared store: request failed: %s", exc)
                return
            if exc is not None:
                self.send(_error(rid, exc))
                return
            result = future.result()
            value = encode(result) if encode is not None else result
            try:
                self.send(orjson.dumps([_OK, rid, value]))
            except TypeError as exc:  # data nested too deep to frame once more
                self.send(_error(rid, StoreError(f"reply not encodable: {exc}")))

        future.add_done_callback(done)


# -- the client (in each worker) ---------------------------------------------------------------

_Decode = Callable[[Any], Any]


class _Appended:
    """Decodes the reply to one append, from what the request already holds."""

    __slots__ = ("data", "sender", "session", "type")

    def __init__(self, session: str, type: str, data: Any, sender: Sender) -> None:
        self.session = session
        self.type = type
        self.data = data
        self.sender = sender

    def __call__(self, reply: list[Any]) -> Appended:
        if len(reply) == 5:  # committed as sent: only the seq, epoch and time are new
            _, _, epoch, seq, time = reply
            return Appended(Event(self.session, epoch, seq, self.type, self.data, self.sender,
                                  time), False)
        _, _, epoch, seq, time, duplicate, row = reply
        return Appended(_event(self.session, epoch, row), bool(duplicate))


def _none(_: Any) -> None:
    return None


class _ClientConnection(_Framed):
    def __init__(self, store: SharedStore) -> None:
        super().__init__()
        self.store = store

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.store._lost(exc)

    def received(self, messages: list[Any]) -> None:
        store = self.store
        waiting = store._waiting
        dispatch = store._listeners.dispatch
        sender_of = self.senders.get_sender
        for message in messages:
            kind = message[0]
            if kind == _EVENT:
                (_, session, epoch, seq, type_, data, sub, client, kind_, time,
                 transient) = message
                dispatch(Event(session, epoch, seq, type_, data, sender_of(sub, client, kind_),
                               time, transient))
                continue
            if kind == _OK_EVENT:  # the answer to an append, and its push to our listeners
                (_, rid, session, epoch, seq, type_, data, sub, client, kind_, time) = message
                event = Event(session, epoch, seq, type_, data, sender_of(sub, client, kind_),
                              time)
                entry = waiting.pop(rid, None)
                if entry is not None and not entry[0].done():
                    entry[0].set_result(Appended(event, False))
                dispatch(event)
                continue
            entry = waiting.pop(message[1], None)
            if entry is None:
                continue
            future, decode = entry
            if future.done():
                continue
            if kind == _OK:
                try:
                    future.set_result(decode(message))
                except Exception as exc:  # a malformed reply fails its request only
                    future.set_exception(StoreError(f"bad reply from the store host: {exc}"))
            else:
                _, _, code, text = message
                error: Exception = StreamClosedError(text) if code == _CLOSED else \
                    StoreError(text)
                future.set_exception(error)


class SharedStore:
    """A :class:`~tether.store.base.Store` served by a :class:`StoreHost` over ``sock``.

    ``on_lost`` is called once if the connection to the host ends while the store is open:
    every call then fails with :class:`StoreError`, and the worker should stop.
    """

    live_is_lossy = False  # pushes travel on a reliable socket; its loss stops the worker

    def __init__(self, sock: socket.socket, retention: Retention | None = None, *,
                 on_lost: Callable[[], None] | None = None) -> None:
        self.retention = retention or Retention()
        self._sock: socket.socket | None = sock
        self._on_lost = on_lost
        self._conn: _ClientConnection | None = None
        self._listeners = Listeners()
        self._waiting: dict[int, tuple[asyncio.Future[Any], _Decode]] = {}
        self._next_id = 0
        self._closing = False
        self._lost_reason: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self._conn is not None:
            return
        if self._sock is None:
            raise StoreError("the shared store cannot be reopened")
        loop = self._loop = asyncio.get_running_loop()
        store = self
        _, self._conn = await loop.create_unix_connection(lambda: _ClientConnection(store),
                                                          sock=self._sock)
        self._sock = None
        for session in self._listeners.sessions():  # listeners added before start
            self._send(orjson.dumps([_LISTEN, session]))

    async def close(self) -> None:
        conn = self._conn
        if conn is None or self._closing:
            return
        self._closing = True
        conn.flush()
        waiting = [future for future, _ in self._waiting.values() if not future.done()]
        if waiting:
            await asyncio.wait(waiting, timeout=CLOSE_WAIT)
        if conn.transport is not None:
            conn.transport.close()
        self._conn = None

    def _lost(self, exc: Exception | None) -> None:
        self._lost_reason = f"the connection to the store host was lost ({exc or 'closed'})"
        waiting, self._waiting = self._waiting, {}
        for future, _ in waiting.values():
            if not future.done():
                future.set_exception(StoreError(self._lost_reason))
        if not self._closing:
            self._conn = None
            log.error("shared store: %s", self._lost_reason)
            if self._on_lost is not None:
                self._on_lost()

    def _connection(self) -> _ClientConnection:
        conn = self._conn
        if conn is None or conn.transport is None:
            raise StoreError(self._lost_reason or "the shared store is not open")
        return conn

    def _send(self, message: bytes) -> None:
        self._connection().send(message)

    def _request(self, build: Callable[[int], list[Any]], decode: _Decode
                 ) -> asyncio.Future[Any]:
        conn = self._connection()
        rid = self._next_id = self._next_id + 1
        loop = self._loop or asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        try:
            message = orjson.dumps(build(rid))
        except TypeError as exc:  # not encodable: this request fails, nothing is sent
            future.set_exception(exc)
            return future
        self._waiting[rid] = (future, decode)
        conn.send(message)
        return future

    # -- log ---------------------------------------------------------------------------------

    async def append(self, session: str, type: str, data: Any, sender: Sender,
                     key: str | None = None) -> Appended:
        return await self.append_future(session, type, data, sender, key)

    def append_future(self, session: str, type: str, data: Any, sender: Sender,
                      key: str | None = None) -> asyncio.Future[Appended]:
        """Sent with everything else of this loop iteration; resolves at the host's commit.

        The hot path: ``_request`` written out, with no closure per call.
        """
        conn = self._conn
        if conn is None or conn.transport is None:
            raise StoreError(self._lost_reason or "the shared store is not open")
        rid = self._next_id = self._next_id + 1
        loop = self._loop or asyncio.get_running_loop()
        future: asyncio.Future[Appended] = loop.create_future()
        try:
            message = orjson.dumps([_APPEND, rid, session, type, data, sender.sub,
                                    sender.client, sender.kind, key])
        except TypeError as exc:  # not encodable: this append fails, nothing is sent
            future.set_exception(exc)
            return future
        self._waiting[rid] = (future, _Appended(session, type, data, sender))
        conn.send(message)
        return future

    async def read(self, session: str, after: int, limit: int) -> list[Event]:
        if limit <= 0:
            return []
        epoch, rows = await self._request(lambda rid: [_READ, rid, session, after, limit],
                                          _value)
        return [_event(session, epoch, row) for row in rows]

    async def read_encoded(self, session: str, after: int, limit: int, fmt: str
                           ) -> EncodedPage:
        """``read`` as frames of ``fmt``, which the host builds from the stored bytes."""
        if fmt not in FORMATS:
            raise ValueError(f"no stored-bytes encoding for format {fmt!r}")
        if limit <= 0:
            return []
        wire = FORMAT_SSE if fmt == FORMAT_SSE else FORMAT_JSON
        seqs, sizes, text = await self._request(
            lambda rid: [_READ_ENCODED, rid, session, after, limit, wire], _value)
        data = text.encode()
        header = fmt == FORMAT_JSON_WS
        page: EncodedPage = []
        at = 0
        for seq, size in zip(seqs, sizes, strict=True):
            frame = data[at:at + size]
            at += size
            page.append((seq, ws_frame(frame, False) if header else frame))
        return page

    async def head(self, session: str) -> Head:
        epoch, last_seq, first_seq = await self._request(
            lambda rid: [_HEAD, rid, session], _value)
        return Head(epoch, last_seq, first_seq)

    async def trim(self) -> int:
        return int(await self._request(lambda rid: [_TRIM, rid], _value))

    # -- live fan-out ------------------------------------------------------------------------

    async def publish_transient(self, event: Event) -> None:
        sender = event.sender
        self._send(orjson.dumps([_TRANSIENT, event.session, event.epoch, event.seq,
                                 event.type, event.data, sender.sub, sender.client,
                                 sender.kind, event.time]))

    def listen(self, session: str, listener: Listener) -> None:
        first = not self._listeners.has(session)
        self._listeners.add(session, listener)
        if first and self._conn is not None:
            self._send(orjson.dumps([_LISTEN, session]))

    def unlisten(self, session: str, listener: Listener) -> None:
        if not self._listeners.has(session):
            return
        self._listeners.remove(session, listener)
        if not self._listeners.has(session) and self._conn is not None \
                and self._conn.transport is not None:
            self._send(orjson.dumps([_UNLISTEN, session]))

    # -- presence ----------------------------------------------------------------------------

    async def set_presence(self, session: str, member: str, info: dict[str, Any],
                           ttl: float) -> None:
        await self._request(lambda rid: [_SET_PRESENCE, rid, session, member, info, ttl],
                            _none)

    async def clear_presence(self, session: str, member: str) -> None:
        await self._request(lambda rid: [_CLEAR_PRESENCE, rid, session, member], _none)

    async def presence(self, session: str) -> list[dict[str, Any]]:
        members: list[dict[str, Any]] = await self._request(
            lambda rid: [_PRESENCE, rid, session], _value)
        return members

    async def join_presence(self, session: str, member: str, info: dict[str, Any],
                            ttl: float) -> list[dict[str, Any]]:
        """``set_presence``, then ``presence``, in one round trip to the host.

        Every attach with presence does both: a reconnect storm's re-attaches are bound by
        the CPU of the workers and the host, and each round trip is a write and a wake-up on
        both sides.
        """
        members: list[dict[str, Any]] = await self._request(
            lambda rid: [_JOIN_PRESENCE, rid, session, member, info, ttl], _value)
        return members


async def _join_presence(store: Store, session: str, member: str, info: dict[str, Any],
                         ttl: float) -> list[dict[str, Any]]:
    await store.set_presence(session, member, info, ttl)
    return await store.presence(session)


def _value(reply: list[Any]) -> Any:
    return reply[2]


def _event(session: str, epoch: str, row: list[Any]) -> Event:
    seq, type_, data, sub, client, kind, time = row
    return Event(session, epoch, seq, type_, data, Sender(sub, client, kind), time)


if TYPE_CHECKING:
    # mypy fails here if SharedStore stops conforming to SessionStore or PresenceStore.
    _conforms: type[Store] = SharedStore
