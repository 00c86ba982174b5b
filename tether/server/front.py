"""The port's front: plain tether WebSockets on picows, everything else on aiohttp.

picows frames and parses WebSockets in C; on the relay job it costs 1.3–1.6× less CPU per
frame than aiohttp's WebSocket (``docs/benchmarks.md``, section 10). It does not do HTTP, nor
permessage-deflate. So one asyncio protocol, :class:`Front`, accepts every connection on the
port, reads its request head and hands the socket on:

- ``GET /v1/ws`` upgrades that offer a tether subprotocol and do not offer permessage-deflate
  (while the server offers it) go to picows, with a :class:`PicowsSocket` as the listener;
- everything else goes to aiohttp: HTTP, SSE, the web app, browsers' WebSockets (browsers always
  offer deflate), and upgrades that are refused (no or an unknown subprotocol), whose answers
  are aiohttp's and so stay exactly as documented.

The front only ever sees the head: once it has chosen, the transport's protocol is replaced and
every later byte goes straight to picows or aiohttp. Behind it, a :class:`PicowsSocket` is what a
:class:`~tether.server.connection.Connection` writes to and closes, as aiohttp's
``WebSocketResponse`` is on the other path; the contract suite runs against both.

picows builds each connection's protocol with arguments of ``picows.ws_create_server`` (2.3);
another picows version leaves every WebSocket on aiohttp (:data:`SUPPORTED`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import picows
from aiohttp import web
from picows import (
    WSAutoPingStrategy,
    WSCloseCode,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
)
from picows.picows import WSProtocol  # type: ignore[attr-defined]  # not in its stub

from tether.protocol.codec import CODECS, SUBPROTOCOLS
from tether.protocol.codes import CloseCode
from tether.server.connection import Connection, WebSocketEndpoint

log = logging.getLogger("tether.front")

SUPPORTED = picows.version.__version__.startswith("2.3.")

MAX_HEAD = 16384  # a longer head goes to aiohttp, which refuses it as HTTP
HEAD_TIMEOUT = 30.0  # seconds for a new connection to send its request head
CLOSE_TIMEOUT = 2.0  # seconds a server close waits for the peer's close frame
# picows' first read buffer per connection; it grows (doubling) for larger frames. Small:
# ten thousand idle sockets hold ten thousand of them.
READ_BUFFER = 2048

# The most one read hands picows (below: _BoundedReads).
MAX_READ = 65536

_SUBPROTOCOLS = frozenset(p.encode() for p in SUBPROTOCOLS)
_TEXT, _BINARY, _CONTINUATION, _CLOSE = (
    WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.CONTINUATION, WSMsgType.CLOSE)
# Closes picows sends on its own: a peer's protocol error (counted by the connection) or the
# heartbeat's missing pong (1001, not an error of the peer's frames).
_HEARTBEAT_CLOSE = 1001


def _int(code: WSCloseCode) -> int:
    return code.value if isinstance(code, WSCloseCode) else int(code)  # stub: Enum, run: IntEnum


def plain_upgrade(head: bytes, compression: bool) -> bool:
    """Whether a request head is an upgrade to ``/v1/ws`` that picows can take as it is.

    Anything unusual (another method or path, a malformed header line, no tether subprotocol
    offered, permessage-deflate offered while the server offers it) is False: aiohttp answers it.
    """
    request_line, _, headers = head.partition(b"\r\n")
    parts = request_line.split(b" ")
    if (len(parts) != 3 or parts[0] != b"GET" or parts[2] != b"HTTP/1.1"
            or parts[1].partition(b"?")[0] != b"/v1/ws"):
        return False
    upgrade = offered = False
    for line in headers.split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if not colon or name != name.strip():
            return False  # obsolete folding, or whitespace before the colon: aiohttp decides
        name = name.lower()
        if name == b"upgrade":
            upgrade = value.strip().lower() == b"websocket"
        elif name == b"sec-websocket-protocol":
            offered = offered or any(p.strip() in _SUBPROTOCOLS for p in value.split(b","))
        elif (name == b"sec-websocket-extensions" and compression
              and b"permessage-deflate" in value.lower()):
            return False
    return upgrade and offered


class Front(asyncio.Protocol):
    """Reads a connection's request head, then hands the socket to picows or to aiohttp."""

    __slots__ = ("choose", "head", "http", "timer", "transport", "websocket")

    def __init__(self, websocket: Callable[[], asyncio.BaseProtocol],
                 http: Callable[[], asyncio.BaseProtocol],
                 choose: Callable[[bytes], bool]) -> None:
        self.websocket = websocket
        self.http = http
        self.choose = choose
        self.head = bytearray()
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's: no asyncio subclass
        self.timer = asyncio.get_running_loop().call_later(HEAD_TIMEOUT, transport.abort)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0 and len(self.head) <= MAX_HEAD:
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        head = bytes(self.head)
        chosen = self.websocket() if end >= 0 and self.choose(head[:end]) else self.http()
        transport = self.transport
        assert transport is not None
        self.transport = None
        transport.set_protocol(chosen)
        chosen.connection_made(transport)
        if isinstance(chosen, asyncio.BufferedProtocol):
            view = memoryview(head)
            while view:
                buffer = memoryview(chosen.get_buffer(len(view)))
                n = min(len(buffer), len(view))
                buffer[:n] = view[:n]
                chosen.buffer_updated(n)
                view = view[n:]
        else:
            assert isinstance(chosen, asyncio.Protocol)
            chosen.data_received(head)

    def eof_received(self) -> bool:
        return False  # half a head and then EOF: close

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:  # closed before its head was complete: nobody to tell
            self.timer.cancel()
            self.timer = None


class _BoundedReads(asyncio.BufferedProtocol):
    """picows with reads of at most :data:`MAX_READ` bytes.

    picows doubles its read buffer whenever a read leaves it 90 % full, and never shrinks it;
    the buffer it offers is all its free space. A peer that sends faster than it is read (a
    flood, or only a fast publisher on loopback) would so grow it to what the kernel holds
    for the socket, megabytes per connection for the connection's life. Offered at most
    ``MAX_READ`` bytes per read, picows stops doubling near 2 × ``MAX_READ`` (or at the size
    of the largest frame it was sent, which ``max_frame_bytes`` bounds). One slice per read,
    nothing per frame.
    """

    __slots__ = ("inner",)

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        buffer: memoryview = self.inner.get_buffer(sizehint)
        return buffer[:MAX_READ] if len(buffer) > MAX_READ else buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.inner.buffer_updated(nbytes)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()  # type: ignore[no-any-return]

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class _PicowsLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """picows' log, quieter: it logs every disconnect at INFO and a peer's bad framing at
    ERROR; tether counts those in its metrics (``tether_errors_total{code="ws_protocol"|
    "frame_too_large"}``), so they go to DEBUG. (An adapter, not a ``Logger``: picows would
    make a child logger per connection, which no filter of ours would see.)"""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if level < logging.WARNING or str(msg).startswith(
                ("WS parser error", "on_ws_frame raised WSProtocolError")):
            level = logging.DEBUG
        super().log(level, msg, *args, **kwargs)


_picows_log = _PicowsLog(logging.getLogger("tether.picows"))


class PicowsSocket(WSListener):
    """One WebSocket served by picows: the :class:`Connection`'s socket and its outbox's sink.

    picows hands over each frame synchronously. A publish is handled there and then; any other
    request may await (attach reads the store), and the frames after it must wait their turn:
    they queue in ``backlog`` while reading is paused, as aiohttp's receive loop would leave
    them in its queue.
    """

    __slots__ = ("_backlog", "_by_us", "_drain", "_fragments", "_paused", "_task", "_text",
                 "conn", "front", "raw", "subprotocol", "transport")

    def __init__(self, front: PicowsFront, subprotocol: str) -> None:
        self.front = front
        self.subprotocol = subprotocol
        self.conn: Connection | None = None
        self.transport: WSTransport | None = None
        self.raw: asyncio.Transport | None = None
        self._fragments: bytearray | None = None
        self._text = False  # the kind of the fragmented message in progress
        self._backlog: collections.deque[bytes | str] | None = None
        self._task: asyncio.Task[None] | None = None
        self._paused = False
        self._drain: asyncio.Future[None] | None = None
        self._by_us = False  # the close frame that went out was tether's (not picows')

    # --- picows' callbacks --------------------------------------------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.raw = transport.underlying_transport
        endpoint = self.front.endpoint
        refusal = endpoint.admit()
        if refusal is not None:
            self.front.background(self.close(code=CloseCode.TRY_AGAIN_LATER, message=refusal))
            return
        conn = self.conn = Connection(endpoint.service, endpoint.auth, endpoint.config,
                                      endpoint.metrics, self, CODECS[self.subprotocol], self,
                                      True)
        endpoint.connections.add(conn)
        endpoint.metrics.hot.connections_ws += 1
        conn.begin()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if frame.rsv1 or frame.rsv2 or frame.rsv3:
            # No extension is negotiated on this path (deflate goes to aiohttp): RFC 6455 5.2.
            self._protocol_error(WSCloseCode.PROTOCOL_ERROR, "reserved bits set")
        elif kind is _TEXT or kind is _BINARY:
            if self._fragments is not None:
                self._protocol_error(WSCloseCode.PROTOCOL_ERROR, "a new message inside another")
            elif frame.fin:
                self._complete(kind is _TEXT, frame.get_payload_as_bytes())
            else:
                self._text = kind is _TEXT
                self._fragments = bytearray(frame.get_payload_as_memoryview())
        elif kind is _CONTINUATION:
            fragments = self._fragments
            if fragments is None:
                self._protocol_error(WSCloseCode.PROTOCOL_ERROR, "a continuation of nothing")
                return
            fragments += frame.get_payload_as_memoryview()
            if len(fragments) > self.front.endpoint.config.max_frame_bytes:
                self._protocol_error(WSCloseCode.MESSAGE_TOO_BIG, "message too big")
            elif frame.fin:
                self._fragments = None
                self._complete(self._text, bytes(fragments))
        elif kind is _CLOSE:
            if not transport.is_close_frame_sent:
                code = frame.get_close_code()  # echoed; a close without a code gets 1000
                transport.send_close(code if code != WSCloseCode.NO_INFO else WSCloseCode.OK)
            transport.disconnect()
        # PING is answered by picows (auto-pong), PONG consumed by its heartbeat.

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)  # the writer wakes and finds the transport closing
        conn = self.conn
        if conn is None:
            return
        handshake = transport.close_handshake
        if (handshake is not None and handshake.sent is not None and not handshake.recv_then_sent
                and not self._by_us and _int(handshake.sent.code) != _HEARTBEAT_CLOSE):
            conn.protocol_error(handshake.sent)  # picows refused the peer's framing
        endpoint = self.front.endpoint
        endpoint.connections.discard(conn)
        endpoint.metrics.hot.connections_ws -= 1
        self.front.background(self._end(conn))

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        drain = self._drain
        if drain is not None:
            self._drain = None
            if not drain.done():
                drain.set_result(None)

    # --- the receive side ---------------------------------------------------------------------

    def _complete(self, text: bool, payload: bytes) -> None:
        """A whole message: text is handed on as ``str``, as aiohttp does (so a binary codec
        refuses a text frame whatever it holds), and must be UTF-8 (RFC 6455: else 1007)."""
        if not text:
            self._message(payload)
            return
        try:
            text_data = payload.decode()
        except UnicodeDecodeError:
            self._protocol_error(WSCloseCode.INVALID_TEXT, "text frame is not UTF-8")
            return
        self._message(text_data)

    def _message(self, data: bytes | str) -> None:
        conn = self.conn
        if conn is None:
            return  # refused by admission: closing
        hot = self.front.endpoint.metrics.hot
        hot.frames_in += 1
        hot.bytes_in += len(data)
        if self._backlog is not None:
            self._backlog.append(data)
            return
        pending = conn.on_data(data)
        if pending is not None:
            self._backlog = collections.deque()
            assert self.raw is not None
            self.raw.pause_reading()
            self._task = asyncio.get_running_loop().create_task(self._run(conn, pending))

    async def _run(self, conn: Connection, pending: Coroutine[Any, Any, None]) -> None:
        """Await one request, then handle the frames that came meanwhile, in order."""
        backlog = self._backlog
        assert backlog is not None
        try:
            await pending
            while backlog:
                pending_next = conn.on_data(backlog.popleft())
                if pending_next is not None:
                    await pending_next
        finally:
            self._backlog = None
            self._task = None
            raw = self.raw
            if raw is not None and not raw.is_closing():
                raw.resume_reading()

    def _protocol_error(self, code: WSCloseCode, reason: str) -> None:
        transport = self.transport
        assert transport is not None
        self._fragments = None
        if transport.is_close_frame_sent:
            return
        transport.send_close(code, reason.encode())
        self._by_us = True  # counted here, not at the disconnect
        if self.conn is not None:
            self.conn.protocol_error(reason)
        # The peer may still answer the close; it has CLOSE_TIMEOUT to.
        asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, transport.disconnect)

    async def _end(self, conn: Connection) -> None:
        task = self._task
        if task is not None:
            with contextlib.suppress(BaseException):
                await task
        await conn.end()

    # --- ServerSocket (what Connection closes) --------------------------------------------------

    @property
    def closed(self) -> bool:
        transport = self.transport
        return transport is None or transport.is_close_frame_sent or transport.is_disconnected

    @property
    def close_code(self) -> int | None:
        transport = self.transport
        handshake = transport.close_handshake if transport is not None else None
        if handshake is None:
            return None
        info = handshake.sent if handshake.sent is not None else handshake.recv
        return None if info is None else _int(info.code)

    async def close(self, *, code: int = 1000, message: bytes = b"") -> bool:
        transport = self.transport
        if transport is None or self.closed:
            return False
        self._by_us = True
        transport.send_close(code, message)  # type: ignore[arg-type]  # any int code goes
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await transport.wait_disconnected()
        transport.disconnect(graceful=False)
        return True

    # --- Sink (what the Connection's outbox writes to) ----------------------------------------

    async def send(self, data: bytes) -> None:
        await self.send_many([data])

    def write_now(self, frames: list[bytes]) -> bool:
        raw = self.raw
        if self._paused or raw is None:
            return False
        if raw.is_closing():
            raise ConnectionResetError("transport closing")
        raw.write(frames[0] if len(frames) == 1 else b"".join(frames))
        return True

    async def send_many(self, frames: list[bytes]) -> None:
        raw = self.raw
        if raw is None or raw.is_closing():
            raise ConnectionResetError("transport closing")
        raw.write(b"".join(frames))
        if self._paused:
            if self._drain is None:
                self._drain = asyncio.get_running_loop().create_future()
            await self._drain

    def abort(self) -> None:
        if not self.closed:
            self.front.background(self.close(code=CloseCode.SLOW_CONSUMER,
                                             message=b"write failed"))


class PicowsFront:
    """The listening side: builds a :class:`Front` per accepted socket, and owns what the
    picows sockets need from the server (the endpoint, their closing tasks)."""

    def __init__(self, endpoint: WebSocketEndpoint, http: web.Server) -> None:
        self.endpoint = endpoint
        self.http = http
        self._tasks: set[asyncio.Task[Any]] = set()

    def protocol(self) -> Front:
        return Front(self._websocket, self.http, self._choose)

    def _choose(self, head: bytes) -> bool:
        return plain_upgrade(head, self.endpoint.config.compression)

    def _websocket(self) -> asyncio.BaseProtocol:
        config = self.endpoint.config
        heartbeat = config.heartbeat
        # The arguments picows.ws_create_server (2.3) gives each connection's protocol.
        return _BoundedReads(WSProtocol(
            None, None, False,  # host and port, path, client side
            self._listener, _picows_log,
            True,  # disconnect when the listener raises
            None,  # handshake timeout: the head is here already (Front's HEAD_TIMEOUT)
            heartbeat > 0, heartbeat or 20.0, heartbeat / 2 or 10.0,
            WSAutoPingStrategy.PING_WHEN_IDLE,
            True,  # answer pings
            config.max_frame_bytes,
            None,  # extra headers
            READ_BUFFER))

    def _listener(self, request: WSUpgradeRequest) -> WSUpgradeResponseWithListener:
        offered = [p.strip() for value in request.headers.getall("Sec-WebSocket-Protocol", ())
                   for p in value.split(",")]
        chosen = next(p for p in offered if p in CODECS)  # the front checked there is one
        response = WSUpgradeResponse.create_101_response(
            extra_headers={"Sec-WebSocket-Protocol": chosen})
        return WSUpgradeResponseWithListener(response, PicowsSocket(self, chosen))

    def background(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("picows socket task failed", exc_info=task.exception())

    async def shutdown(self) -> None:
        """Wait, briefly, for the picows sockets' cleanup (after the endpoint closed them)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=CLOSE_TIMEOUT * 2)
