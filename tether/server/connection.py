"""The WebSocket transport (``/v1/ws``): one :class:`Connection` per socket.

A thin layer over :class:`~tether.server.sessions.SessionService`: it decodes frames with the
negotiated codec, turns each into a service call, and encodes the outcome. A request that fails
is answered with an ``error`` frame and the connection stays open; only authentication,
protocol abuse and shutdown close it, with a code from :class:`~tether.protocol.codes.CloseCode`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Coroutine
from typing import Any, Protocol

from aiohttp import WSMsgType, web
from aiohttp._websocket.writer import WebSocketWriter

from tether.protocol.codec import CODECS, JSON, SUBPROTOCOLS, Codec, DecodeError
from tether.protocol.codes import CloseCode, ErrorCode, RequestError, TetherError
from tether.protocol.cursor import Cursor
from tether.protocol.events import Sender
from tether.protocol.frames import (
    Ack,
    Attach,
    ClientFrame,
    Detach,
    FrameError,
    Hello,
    PresenceSet,
    Publish,
    RequestId,
    attached_frame,
    error_frame,
    fast_publish,
    parse_client_frame,
    presence_frame,
    published_frame,
    welcome_frame,
)
from tether.server.admission import Admission
from tether.server.auth import Authenticator, AuthError
from tether.server.config import ServerConfig
from tether.server.deflate import websocket_response
from tether.server.http import error_response, unguarded
from tether.server.hub import (
    FORMAT_JSON,
    FORMAT_JSON_WS,
    FORMAT_MSGPACK,
    FORMAT_MSGPACK_WS,
    Outbox,
    Sink,
    Subscription,
    ws_frame,
)
from tether.server.keys import AUTH, CONFIG, METRICS, SESSIONS
from tether.server.metrics import Metrics
from tether.server.sessions import (
    Caller,
    SessionService,
    TokenBucket,
    as_error,
    new_connection_id,
)
from tether.store.base import Appended, now_ms

log = logging.getLogger("tether.connection")


class ServerSocket(Protocol):
    """The server side of one WebSocket, as a :class:`Connection` sees it.

    aiohttp's ``WebSocketResponse`` is one; :class:`~tether.server.front.PicowsSocket` the
    other (plain sockets on picows, see ``docs/architecture.md``).
    """

    @property
    def closed(self) -> bool:
        """A close frame went out, or the socket is gone."""
        ...

    @property
    def close_code(self) -> int | None:
        """The code of the close, once there was one."""
        ...

    async def close(self, *, code: int = 1000, message: bytes = b"") -> bool:
        """Send a close frame and wait (briefly) for the peer's; False if already closed."""
        ...


class WsSink:
    """Where a connection's outbox writes, on aiohttp.

    ``framed``: the outbox holds whole frames (header included, see ``FORMAT_JSON_WS``), which
    go to the transport as they are; otherwise payloads, which aiohttp frames and compresses.
    """

    __slots__ = ("framed", "opcode", "ws")

    def __init__(self, ws: web.WebSocketResponse, binary: bool, framed: bool) -> None:
        self.ws = ws
        self.opcode = WSMsgType.BINARY if binary else WSMsgType.TEXT
        self.framed = framed

    async def send(self, data: bytes) -> None:
        if not self.framed:
            await self.ws.send_frame(data, self.opcode)
            return
        await self.send_many([data])

    def write_now(self, frames: list[bytes]) -> bool:
        """Write ``frames`` at once, if the transport can take them without waiting.

        False (nothing written) when it cannot: frames to compress, or the transport paused
        by backpressure; the outbox then drains through :meth:`send_many`.
        """
        writer = self.ws._writer
        if not self.framed or writer is None or writer.protocol._paused:
            return False
        if writer.transport.is_closing():
            raise ConnectionResetError("transport closing")
        writer.transport.write(frames[0] if len(frames) == 1 else b"".join(frames))
        return True

    async def send_many(self, frames: list[bytes]) -> None:
        """Write several frames with one transport write.

        A fan-out burst leaves many frames queued per connection; handing the transport one
        buffer costs one syscall instead of one per frame. With permessage-deflate the
        frames must go through aiohttp's compressor, one by one.
        """
        writer = self.ws._writer
        if not self.framed:
            for data in frames:
                await self.ws.send_frame(data, self.opcode)
            return
        if writer is None or writer.transport.is_closing():
            raise ConnectionResetError("transport closing")
        writer.transport.write(b"".join(frames))
        protocol = writer.protocol
        if protocol._paused:
            await protocol._drain_helper()

    def abort(self) -> None:
        if not self.ws.closed:
            asyncio.get_running_loop().create_task(
                self.ws.close(code=CloseCode.SLOW_CONSUMER, message=b"write failed"))


class Connection:
    """Server side of one WebSocket."""

    # Slots: ten thousand idle connections are ten thousand of these.
    __slots__ = (
        "_closing",
        "_hello_timer",
        "_room",
        "acked",
        "auth",
        "caller",
        "codec",
        "config",
        "errors_in_row",
        "fast_json",
        "format",
        "framed",
        "id",
        "inflight",
        "metrics",
        "outbox",
        "service",
        "subs",
        "ws",
    )

    def __init__(self, service: SessionService, auth: Authenticator, config: ServerConfig,
                 metrics: Metrics, ws: ServerSocket, codec: Codec, sink: Sink,
                 framed: bool) -> None:
        """``framed``: ``sink`` takes whole frames (header included), built once per event for
        all its subscribers (``FORMAT_JSON_WS``); otherwise payloads, framed by the sink."""
        self.service = service
        self.auth = auth
        self.config = config
        self.metrics = metrics
        self.ws = ws
        self.codec = codec
        self.framed = framed
        if framed:
            self.format = FORMAT_MSGPACK_WS if codec.binary else FORMAT_JSON_WS
        else:
            self.format = FORMAT_MSGPACK if codec.binary else FORMAT_JSON
        self.outbox = Outbox(sink, config.outbound_buffer_bytes, metrics)
        self.id = new_connection_id()
        self.caller: Caller | None = None  # set by hello
        self.subs: dict[str, Subscription] = {}
        self.acked: dict[str, Cursor] | None = None  # made on first ack
        self.inflight = 0  # publishes handed to the service, not answered yet
        self._room: asyncio.Future[None] | None = None  # a publish waiting for inflight room
        self.fast_json = codec is JSON  # publish frames take the msgspec path (frames.py)
        self.errors_in_row = 0
        self._hello_timer: asyncio.TimerHandle | None = None
        self._closing: asyncio.Task[bool] | None = None

    # --- plumbing -------------------------------------------------------------------------

    def send(self, frame: dict[str, Any]) -> None:
        data = self.codec.encode(frame)
        self.outbox.push(ws_frame(data, self.codec.binary) if self.framed else data)

    def send_error(self, rid: RequestId, error: TetherError, session: str | None = None) -> None:
        self.metrics.errors.labels(str(error.code)).inc()
        self.send(error_frame(rid, error.code, error.message, temporary=error.temporary,
                              session=session, retry_after=error.retry_after))
        if error.temporary:
            return  # a pipelining client that is rate limited is slowed down, never closed
        self.errors_in_row += 1
        if self.errors_in_row >= self.config.max_errors_in_row:
            self.close(CloseCode.TOO_MANY_ERRORS)

    def close(self, code: CloseCode, reason: str = "") -> None:
        self.metrics.closes.labels(str(int(code))).inc()
        message = (reason or code.name.lower()).encode()[:120]
        if not self.ws.closed and self._closing is None:
            # The receive loop awaits this before its handler returns; otherwise aiohttp would
            # tear the transport down before the close frame is written.
            self._closing = asyncio.get_running_loop().create_task(self._close(code, message))

    async def _close(self, code: CloseCode, message: bytes) -> bool:
        # Frames already queued (the error that caused the close, say) go out first; nothing
        # may follow the close frame.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await self.outbox.flush()
        self.outbox.close()
        return await self.ws.close(code=code, message=message)

    # --- the service's view of this connection (sessions.Live) -------------------------------

    def expire(self) -> None:
        self.close(CloseCode.TOKEN_EXPIRED, "token expired")

    async def shutdown(self) -> None:
        if not self.ws.closed:
            self.metrics.closes.labels(str(int(CloseCode.SHUTDOWN))).inc()
            await self.ws.close(code=CloseCode.SHUTDOWN, message=b"server shutting down")

    # --- the receive loop (run by WebSocketEndpoint.handle) ---------------------------------

    def begin(self) -> None:
        """The socket is open: ``hello`` must come within ``hello_timeout``."""
        self._hello_timer = asyncio.get_running_loop().call_later(
            self.config.hello_timeout, self._hello_timeout)

    def protocol_error(self, error: object) -> None:
        """The transport closed the socket already: oversized frame (1009) or bad framing."""
        too_large = getattr(error, "code", None) == 1009 or self.ws.close_code == 1009
        self.metrics.errors.labels("frame_too_large" if too_large else "ws_protocol").inc()
        log.info("connection %s error: %s", self.id, error)

    async def end(self) -> None:
        """The receive loop is over: let a close in progress finish, then clean up."""
        if self._closing is not None:
            await asyncio.wait([self._closing], timeout=2.0)
        await self._cleanup()

    def on_data(self, data: bytes | str) -> Coroutine[Any, Any, None] | None:
        """Handle one frame: a publish at once, anything else as a coroutine to await."""
        frame: ClientFrame | None = fast_publish(data) if self.fast_json else None
        if frame is None:
            try:
                raw = self.codec.decode(data)
            except DecodeError as exc:
                self.send_error(None, RequestError(ErrorCode.BAD_FRAME, str(exc)))
                return None
            try:
                frame = parse_client_frame(raw)
            except FrameError as exc:
                session = raw.get("session")
                self.send_error(exc.request_id, exc,
                                session if isinstance(session, str) else None)
                return None
        if isinstance(frame, Publish):
            if self.inflight >= self.config.max_inflight_publishes:
                return self._publish_when_room(frame)
            self._publish(frame)
            return None
        return self._dispatch(frame)

    async def _dispatch(self, frame: ClientFrame) -> None:
        try:
            await self._handle(frame)
        except TetherError as exc:  # the one place errors become frames (and _publish)
            self.send_error(frame.id, exc, getattr(frame, "session", None))
        except Exception:
            # A bug in one request's handling answers that request; the connection and every
            # other subscriber carry on.
            log.exception("connection %s: %s frame failed", self.id, type(frame).__name__)
            self.send_error(frame.id, RequestError(ErrorCode.INTERNAL, "internal error"),
                            getattr(frame, "session", None))
        else:
            self.errors_in_row = 0

    async def _handle(self, frame: ClientFrame) -> None:
        if isinstance(frame, Hello):
            self._hello(frame)
        elif self.caller is None:
            raise RequestError(ErrorCode.NOT_READY, "send hello first")
        elif isinstance(frame, Attach):
            await self._attach(self.caller, frame)
        elif isinstance(frame, Ack):
            self._ack(frame)
        elif isinstance(frame, Detach):
            await self._detach(self.caller, frame)
        elif isinstance(frame, PresenceSet):
            info = await self.service.update_presence(self.caller, frame.session, frame.state)
            self.send(presence_frame(frame.session, "set", [info], rid=frame.id))
        else:  # Ping
            self.send({"op": "pong", "id": frame.id, "time": now_ms()})

    def _hello_timeout(self) -> None:
        if self.caller is None:
            self.close(CloseCode.HELLO_TIMEOUT)

    # --- handlers ---------------------------------------------------------------------------

    def _hello(self, frame: Hello) -> None:
        if self.caller is not None:
            raise RequestError(ErrorCode.INVALID, "hello was already sent on this connection")
        try:
            grant = self.auth.verify(frame.token)
        except AuthError as exc:
            self.metrics.errors.labels(exc.close_code.name.lower()).inc()
            log.info("connection %s refused: %s", self.id, exc.message)
            self.close(exc.close_code, exc.message)
            return
        try:
            self.service.limits.open(grant.sub, "connections")
        except RequestError as exc:
            self.metrics.errors.labels(str(exc.code)).inc()
            self.close(CloseCode.TOO_MANY_CONNECTIONS, exc.message)
            return
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        client = frame.client or f"c-{new_connection_id()}"
        self.caller = Caller(grant, Sender(grant.sub, client, frame.kind), self.id,
                             frame.device, frame.tools)
        # Expiry is enforced by the service's once-a-second sweep (SessionService.live): one
        # timer for all connections instead of one each.
        self.service.live.add(self)
        config = self.config
        self.send(welcome_frame(frame.id, self.id, grant.sub, client, sorted(grant.caps),
                                config.heartbeat, {
                                    "max_frame_bytes": config.max_frame_bytes,
                                    "max_event_bytes": config.max_event_bytes,
                                    "max_sessions": config.max_sessions_per_connection,
                                    "publish_rate": config.publish_rate,
                                }))

    async def _attach(self, caller: Caller, frame: Attach) -> None:
        session = frame.session
        limit = self.config.max_sessions_per_connection
        if session not in self.subs and len(self.subs) >= limit:
            raise RequestError(ErrorCode.TOO_MANY_SESSIONS,
                               f"at most {limit} sessions per connection")
        service = self.service
        attachment = await service.attach(caller, self, session, frame.cursor,
                                          replacing=self.subs.pop(session, None))
        self.subs[session] = attachment.subscription
        try:
            members = await service.join(caller, session, frame.presence or {})
        except BaseException:
            service.detach(self.subs.pop(session))
            raise
        snapshot = None
        if attachment.snapshot is not None:
            snapshot = {"events": attachment.snapshot, "presence": members}
        self.send(attached_frame(frame.id, session, attachment.cursor, attachment.resumed,
                                 snapshot, attachment.reason))
        self.send(presence_frame(session, "list", members))
        attachment.start()

    async def _detach(self, caller: Caller, frame: Detach) -> None:
        sub = self.subs.pop(frame.session, None)
        if sub is None:
            raise RequestError(ErrorCode.NOT_ATTACHED, f"not attached to {frame.session!r}")
        self.service.detach(sub)
        await self.service.leave(caller, frame.session)
        self.send({"op": "detached", "id": frame.id, "session": frame.session})

    def _ack(self, frame: Ack) -> None:
        sub = self.subs.get(frame.session)
        if sub is None:
            raise RequestError(ErrorCode.NOT_ATTACHED, f"not attached to {frame.session!r}")
        if frame.cursor.epoch != sub.epoch or frame.cursor.seq > sub.last_seq:
            raise RequestError(ErrorCode.BAD_CURSOR, "ack of a cursor that was not delivered")
        if self.acked is None:
            self.acked = {}
        self.acked[frame.session] = frame.cursor

    def _publish(self, frame: Publish) -> None:
        """Hand a publish to the service; the reply is sent from a done-callback.

        Commits run concurrently so one connection can have many publishes in one group
        commit, up to ``max_inflight_publishes`` (then reading pauses: TCP backpressure
        instead of memory). Neither a task nor a coroutine per publish.
        """
        try:
            caller = self.caller
            if caller is None:
                raise RequestError(ErrorCode.NOT_READY, "send hello first")
            if caller.bucket is None:  # made on the first publish: most connections never do
                caller.bucket = TokenBucket(self.config.publish_rate, self.config.publish_burst)
            self.service.publish(caller, frame.session, frame.type, frame.data, frame.key,
                                 frame.transient, reply=functools.partial(self._committed, frame))
        except TetherError as exc:
            self.send_error(frame.id, exc, frame.session)
            return
        except Exception:
            log.exception("connection %s: publish failed", self.id)
            self.send_error(frame.id, RequestError(ErrorCode.INTERNAL, "internal error"),
                            frame.session)
            return
        self.inflight += 1
        self.errors_in_row = 0

    async def _publish_when_room(self, frame: Publish) -> None:
        while self.inflight >= self.config.max_inflight_publishes:
            room = self._room = asyncio.get_running_loop().create_future()
            await room
        self._publish(frame)

    def _committed(self, frame: Publish, future: asyncio.Future[Appended]) -> None:
        self.inflight -= 1
        room = self._room
        if room is not None:
            self._room = None
            if not room.done():
                room.set_result(None)
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            if not isinstance(exc, TetherError):
                log.error("publish to %s failed", frame.session, exc_info=exc)
            self.send_error(frame.id, as_error(exc), frame.session)
            return
        appended = future.result()
        self.send(published_frame(frame.id, appended.event, appended.duplicate))

    async def _cleanup(self) -> None:
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        self.service.live.discard(self)
        if self.caller is not None:
            self.service.limits.close(self.caller.sender.sub, "connections")
        for sub in self.subs.values():
            self.service.detach(sub)
        sessions = list(self.subs)
        self.subs.clear()
        self.outbox.close()
        if self.caller is not None:
            for session in sessions:
                await self.service.leave(self.caller, session)


class WebSocketEndpoint:
    """``GET /v1/ws``: upgrades, negotiates the codec, runs a :class:`Connection` per socket."""

    def __init__(self, service: SessionService, auth: Authenticator, config: ServerConfig,
                 metrics: Metrics) -> None:
        self.service = service
        self.auth = auth
        self.config = config
        self.metrics = metrics
        self.connections: set[Connection] = set()
        self.admission = (Admission(config.max_connect_rate, config.max_connect_burst)
                          if config.max_connect_rate > 0 else None)

    @unguarded
    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Upgrade, then be the connection's receive loop until it closes.

        This coroutine stays suspended for the connection's life, and so does each one that
        awaits another on the way to ``ws.receive()``: ~0.3 KiB each per idle connection. So
        the loop runs here, not in a coroutine of its own, and the error middleware does not
        wrap this handler (:func:`~tether.server.http.unguarded`): errors before the upgrade
        are answered here.
        """
        upgraded = await self._upgrade(request)
        if not isinstance(upgraded, tuple):
            return upgraded
        conn, ws = upgraded
        hot = self.metrics.hot
        self.connections.add(conn)
        hot.connections_ws += 1
        conn.begin()
        try:
            while True:
                msg = await ws.receive()
                if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    hot.frames_in += 1
                    hot.bytes_in += len(msg.data)
                    # A publish is handled synchronously; only other requests (and a publish
                    # that must wait for room) give a coroutine to await.
                    pending = conn.on_data(msg.data)
                    if pending is not None:
                        await pending
                    # While it waits for the next frame, an idle connection keeps neither this
                    # frame nor the finished request's coroutine (~0.5 KiB per connection).
                    del msg, pending
                elif msg.type == WSMsgType.ERROR:
                    conn.protocol_error(msg.data)
                    break
                else:  # CLOSE, CLOSING, CLOSED
                    break
        finally:
            try:
                await conn.end()
            finally:
                hot.connections_ws -= 1
                self.connections.discard(conn)
        return ws

    async def _upgrade(self, request: web.Request,
                       ) -> tuple[Connection, web.WebSocketResponse] | web.StreamResponse:
        """The WebSocket handshake: a :class:`Connection`, or the response that refused it."""
        config = self.config
        ws = websocket_response(  # permessage-deflate as configured: see deflate.py
            config,
            protocols=SUBPROTOCOLS,
            heartbeat=config.heartbeat or None,
            max_msg_size=config.max_frame_bytes,
            autoping=True,
        )
        if not ws.can_prepare(request).ok:
            return error_response(request, ErrorCode.INVALID, "expected a WebSocket upgrade")
        offered = [p.strip() for p in
                   request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        if offered and not set(offered) & set(SUBPROTOCOLS):
            # Completing the handshake with no subprotocol would make standard clients fail
            # the connection as 1006, which reads as "retry": refuse the upgrade instead.
            self.metrics.errors.labels("unsupported_codec").inc()
            return error_response(request, ErrorCode.INVALID,
                                  f"unsupported subprotocol {offered[0][:40]!r}: offer "
                                  + " or ".join(SUBPROTOCOLS))
        await ws.prepare(request)
        codec = CODECS.get(ws.ws_protocol or "")
        if codec is None:
            self.metrics.errors.labels("unsupported_codec").inc()
            await ws.close(code=CloseCode.UNSUPPORTED_CODEC,
                           message=b"offer tether.v1.json or tether.v1.msgpack")
            return ws
        refusal = self.admit()
        if refusal is not None:
            await ws.close(code=CloseCode.TRY_AGAIN_LATER, message=refusal)
            return ws
        # Written past aiohttp's writer only when that writer would add nothing: no
        # compression (its own, or a writer subclass that compresses).
        writer = ws._writer
        framed = writer is not None and type(writer) is WebSocketWriter and not writer.compress
        return Connection(self.service, self.auth, config, self.metrics, ws, codec,
                          WsSink(ws, codec.binary, framed), framed), ws

    async def shutdown(self) -> None:
        """Close the sockets the session service did not (those before their hello) with the
        reconnect code, as it closed the others."""
        await asyncio.gather(*(conn.shutdown() for conn in list(self.connections)))

    def admit(self) -> bytes | None:
        """None, or the close message of a socket shed by the admission rate (close 4003)."""
        if self.admission is None:
            return None
        delay = self.admission.retry_after()
        if not delay:
            return None
        # Shed before hello: the token check and attach are the costly part.
        self.metrics.closes.labels(str(int(CloseCode.TRY_AGAIN_LATER))).inc()
        return f"retry_after={delay:.2f}".encode()


WS_ENDPOINT: web.AppKey[WebSocketEndpoint] = web.AppKey("tether.ws")


def install(app: web.Application) -> None:
    """Serve the WebSocket protocol at ``/v1/ws`` (needs the shared services in ``app``)."""
    endpoint = WebSocketEndpoint(app[SESSIONS], app[AUTH], app[CONFIG], app[METRICS])
    app[WS_ENDPOINT] = endpoint
    app.router.add_get("/v1/ws", endpoint.handle)
