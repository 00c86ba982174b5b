"""One WebSocket connection: hello, attach/resume, publish, presence, limits.

The frame handlers here decide; :mod:`tether.server.hub` delivers. A request that fails is
answered with an ``error`` frame and the connection stays open; only authentication, protocol
abuse and shutdown close it, with a code from :class:`~tether.protocol.codes.CloseCode`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import struct
import time
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import WSMsgType, web

from tether.protocol.codec import Codec, DecodeError
from tether.protocol.codes import CloseCode, ErrorCode, RequestError
from tether.protocol.cursor import Cursor, epoch_belongs
from tether.protocol.events import (
    CONTROL_TYPES,
    PRESENCE_JOIN,
    PRESENCE_LEAVE,
    PRESENCE_UPDATE,
    SERVER_TYPES,
    STREAM_APPEND,
    STREAM_END,
    Event,
    Sender,
    check_event_type,
    check_stream_data,
)
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
    event_frame,
    parse_client_frame,
    presence_frame,
    published_frame,
    welcome_frame,
)
from tether.server.auth import AuthError, Grant
from tether.server.hub import FORMAT_JSON, FORMAT_MSGPACK, Outbox, Subscription
from tether.store.base import Appended, Head, StoreError, StreamClosedError, now_ms

if TYPE_CHECKING:
    from tether.server.app import Server

log = logging.getLogger("tether.connection")

_LEN2 = struct.Struct("!BBH")
_LEN3 = struct.Struct("!BBQ")


class WsSink:
    __slots__ = ("first_byte", "opcode", "ws")

    def __init__(self, ws: web.WebSocketResponse, binary: bool) -> None:
        self.ws = ws
        self.opcode = WSMsgType.BINARY if binary else WSMsgType.TEXT
        self.first_byte = 0x80 | int(self.opcode)  # FIN + opcode

    async def send(self, data: bytes) -> None:
        await self.ws.send_frame(data, self.opcode)

    def write_now(self, frames: list[bytes]) -> bool:
        """Frame and write ``frames`` at once, if the transport can take them without waiting.

        False (nothing written) when it cannot: compression negotiated, or the transport is
        paused by backpressure; the outbox then drains through :meth:`send_many`.
        """
        writer = self.ws._writer
        if self.ws.compress or writer is None or writer.protocol._paused:
            return False
        if writer.transport.is_closing():
            raise ConnectionResetError("transport closing")
        writer.transport.write(self._frame(frames))
        return True

    def _frame(self, frames: list[bytes]) -> bytes:
        # Server frames are unmasked: a header, then the payload.
        parts: list[bytes] = []
        first = self.first_byte
        for data in frames:
            n = len(data)
            if n < 126:
                parts.append(bytes((first, n)))
            elif n < 65536:
                parts.append(_LEN2.pack(first, 126, n))
            else:
                parts.append(_LEN3.pack(first, 127, n))
            parts.append(data)
        return b"".join(parts)

    async def send_many(self, frames: list[bytes]) -> None:
        """Write several frames with one transport write.

        A fan-out burst leaves many frames queued per connection; framing them here and
        handing the transport one buffer costs one syscall instead of one per frame. With
        permessage-deflate the frames must go through aiohttp's compressor, one by one.
        """
        writer = self.ws._writer
        if self.ws.compress or writer is None or writer.transport.is_closing():
            for data in frames:
                await self.ws.send_frame(data, self.opcode)
            return
        writer.transport.write(self._frame(frames))
        protocol = writer.protocol
        if protocol._paused:
            await protocol._drain_helper()

    def abort(self) -> None:
        if not self.ws.closed:
            asyncio.get_running_loop().create_task(
                self.ws.close(code=CloseCode.SLOW_CONSUMER, message=b"write failed"))


class TokenBucket:
    __slots__ = ("capacity", "rate", "stamp", "tokens")

    def __init__(self, rate: float, capacity: int) -> None:
        self.rate = rate
        self.capacity = float(capacity)
        self.tokens = float(capacity)
        self.stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def resume_decision(cursor: Cursor | None, head: Head) -> tuple[bool, int, str | None]:
    """Whether an attach at ``cursor`` resumes, the seq to continue after, and why not.

    ``cursor`` must already be known to belong to this session.
    """
    if cursor is None:
        if head.first_seq <= 1:
            return True, 0, None
        return False, head.last_seq, "history_trimmed"
    if cursor.epoch != head.epoch:
        return False, head.last_seq, "epoch_changed"
    if cursor.seq > head.last_seq:
        raise RequestError(ErrorCode.BAD_CURSOR, "cursor is ahead of the session's log")
    if cursor.seq < head.first_seq - 1:
        return False, head.last_seq, "cursor_expired"
    return True, cursor.seq, None


async def build_snapshot(server: Server, session: str, head: Head) -> tuple[list[Any], int]:
    """The recent history, compacted (deltas of ended streams dropped), and its last seq."""
    limit = server.config.snapshot_events
    after = max(head.first_seq - 1, head.last_seq - limit)
    events = await server.store.read(session, after, limit)
    ended = {e.stream for e in events if e.type == STREAM_END}
    kept = [e for e in events if not (e.type == STREAM_APPEND and e.stream in ended)]
    last = events[-1].seq if events else head.last_seq
    return [event_frame(e) for e in kept], max(last, head.last_seq)


class Connection:
    """Server side of one WebSocket."""

    # Slots: ten thousand idle connections are ten thousand of these.
    __slots__ = ("_closing", "_hello_timer", "acked", "bucket", "codec", "device",
                 "errors_in_row", "format", "grant", "id", "inflight", "outbox",
                 "presence_state", "remote", "sender", "server", "subs", "tools", "ws")

    def __init__(self, server: Server, ws: web.WebSocketResponse, codec: Codec,
                 remote: str) -> None:
        self.server = server
        self.ws = ws
        self.codec = codec
        self.remote = remote
        self.format = FORMAT_MSGPACK if codec.binary else FORMAT_JSON
        self.outbox = Outbox(WsSink(ws, codec.binary), server.config.outbound_buffer_bytes,
                             server.metrics)
        self.id = secrets.token_hex(6)
        self.grant: Grant | None = None
        self.sender: Sender | None = None
        self.device = ""
        self.tools: tuple[str, ...] = ()
        self.subs: dict[str, Subscription] = {}
        self.presence_state: dict[str, dict[str, Any]] = {}
        self.acked: dict[str, Cursor] | None = None  # made on first ack
        self.inflight: set[asyncio.Future[Appended]] | None = None  # made on first publish
        self.errors_in_row = 0
        config = server.config
        self.bucket = TokenBucket(config.publish_rate, config.publish_burst)
        self._hello_timer: asyncio.TimerHandle | None = None
        self._closing: asyncio.Task[bool] | None = None

    # --- plumbing -------------------------------------------------------------------------

    def send(self, frame: dict[str, Any]) -> None:
        self.outbox.push(self.codec.encode(frame))

    def send_error(self, rid: RequestId, code: ErrorCode, message: str,
                   session: str | None = None) -> None:
        self.server.metrics.errors.labels(str(code)).inc()
        self.send(error_frame(rid, code, message, temporary=code in (
            ErrorCode.RATE_LIMITED, ErrorCode.STORE_UNAVAILABLE), session=session))
        self.errors_in_row += 1
        if self.errors_in_row >= self.server.config.max_errors_in_row:
            self.close(CloseCode.TOO_MANY_ERRORS)

    def close(self, code: CloseCode, reason: str = "") -> None:
        self.server.metrics.closes.labels(str(int(code))).inc()
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

    # --- the receive loop -------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._hello_timer = loop.call_later(self.server.config.hello_timeout, self._hello_timeout)
        hot = self.server.metrics.hot
        ws = self.ws
        try:
            while True:
                msg = await ws.receive()
                if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    hot.frames_in += 1
                    hot.bytes_in += len(msg.data)
                    await self._on_data(msg.data)
                elif msg.type == WSMsgType.ERROR:
                    # aiohttp closed the socket already: oversized frame (1009) or bad framing.
                    too_large = getattr(msg.data, "code", None) == 1009 or ws.close_code == 1009
                    code = "frame_too_large" if too_large else "ws_protocol"
                    self.server.metrics.errors.labels(code).inc()
                    log.info("connection %s error: %s", self.id, msg.data)
                    break
                else:  # CLOSE, CLOSING, CLOSED
                    break
        finally:
            if self._closing is not None:
                await asyncio.wait([self._closing], timeout=2.0)
            await self._cleanup()

    async def _on_data(self, data: bytes | str) -> None:
        try:
            raw = self.codec.decode(data)
        except DecodeError as exc:
            self.send_error(None, ErrorCode.BAD_FRAME, str(exc))
            return
        try:
            frame = parse_client_frame(raw)
        except FrameError as exc:
            self.send_error(exc.request_id, exc.code, exc.message, raw.get("session")
                            if isinstance(raw.get("session"), str) else None)
            return
        try:
            await self._dispatch(frame)
        except RequestError as exc:
            session = getattr(frame, "session", None)
            self.send_error(frame.id, exc.code, exc.message, session)

    async def _dispatch(self, frame: ClientFrame) -> None:
        if isinstance(frame, Publish):
            await self._publish(frame)
        elif isinstance(frame, Hello):
            await self._hello(frame)
        elif self.grant is None:
            raise RequestError(ErrorCode.NOT_READY, "send hello first")
        elif isinstance(frame, Attach):
            await self._attach(frame)
        elif isinstance(frame, Ack):
            self._ack(frame)
        elif isinstance(frame, Detach):
            await self._detach(frame)
        elif isinstance(frame, PresenceSet):
            await self._presence_set(frame)
        else:  # Ping
            self.send({"op": "pong", "id": frame.id, "time": now_ms()})
        self.errors_in_row = 0

    def _hello_timeout(self) -> None:
        if self.grant is None:
            self.close(CloseCode.HELLO_TIMEOUT)

    # --- handlers ---------------------------------------------------------------------------

    async def _hello(self, frame: Hello) -> None:
        if self.grant is not None:
            raise RequestError(ErrorCode.INVALID, "hello was already sent on this connection")
        try:
            grant = self.server.verify(frame.token)
        except AuthError as exc:
            self.server.metrics.errors.labels(exc.close_code.name.lower()).inc()
            log.info("connection %s refused: %s", self.id, exc.message)
            self.close(exc.close_code, exc.message)
            return
        self.grant = grant
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        client = frame.client or f"c-{secrets.token_hex(6)}"
        self.sender = Sender(grant.sub, client, frame.kind)
        self.device = frame.device
        self.tools = frame.tools
        config = self.server.config
        # Expiry is enforced by the server's once-a-second sweep (Server.expire_tokens): one
        # timer for all connections instead of one each.
        self.send(welcome_frame(frame.id, self.id, grant.sub, client, sorted(grant.caps),
                                config.heartbeat, {
                                    "max_frame_bytes": config.max_frame_bytes,
                                    "max_event_bytes": config.max_event_bytes,
                                    "max_sessions": config.max_sessions_per_connection,
                                    "publish_rate": config.publish_rate,
                                }))

    def _require(self, session: str, cap: str) -> Grant:
        grant = self.grant
        if grant is None:
            raise RequestError(ErrorCode.NOT_READY, "send hello first")
        if not grant.allows(session, cap):
            raise RequestError(ErrorCode.FORBIDDEN,
                               f"token does not allow {cap!r} on session {session!r}")
        return grant

    async def _attach(self, frame: Attach) -> None:
        session = frame.session
        grant = self._require(session, "subscribe")
        server = self.server
        if session not in self.subs and len(self.subs) >= server.config.max_sessions_per_connection:
            raise RequestError(ErrorCode.TOO_MANY_SESSIONS,
                               f"at most {server.config.max_sessions_per_connection} sessions "
                               "per connection")
        cursor = frame.cursor
        if cursor is not None and not epoch_belongs(cursor.epoch, session):
            raise RequestError(ErrorCode.BAD_CURSOR, "cursor belongs to another session")
        try:
            head = await server.store.head(session)
        except StoreError as exc:
            raise RequestError(ErrorCode.STORE_UNAVAILABLE, str(exc)) from None
        resumed, after, reason = resume_decision(cursor, head)
        # Only now that the new attach can proceed does it replace an existing one.
        old = self.subs.pop(session, None)
        if old is not None:
            server.hub.unsubscribe(old)
        # Subscribe before reading anything so no commit can fall between history and live.
        sub = server.hub.subscribe(self, session, head.epoch, after)
        self.subs[session] = sub
        try:
            snapshot: dict[str, Any] | None = None
            if not resumed:
                events, last = await build_snapshot(server, session, head)
                sub.last_seq = last
                snapshot = {"events": events, "presence": []}
            if cursor is not None or not resumed:
                server.metrics.resumes.labels("true" if resumed else "false").inc()
            members: list[dict[str, Any]] = []
            if grant.allows(session, "presence"):
                info = self._member_info(session, frame.presence or {})
                self.presence_state[session] = info
                await server.store.set_presence(session, self._member_id(),
                                                info, server.config.presence_ttl)
                await server.publish_presence(session, PRESENCE_JOIN, info)
            members = await server.store.presence(session)
        except StoreError as exc:
            server.hub.unsubscribe(sub)
            self.subs.pop(session, None)
            raise RequestError(ErrorCode.STORE_UNAVAILABLE, str(exc)) from None
        if snapshot is not None:
            snapshot["presence"] = members
        self.send(attached_frame(frame.id, session,
                                 Cursor(head.epoch, after if resumed else sub.last_seq),
                                 resumed, snapshot, reason))
        self.send(presence_frame(session, "list", members))
        sub.catch_up("attach")

    def _member_id(self) -> str:
        assert self.sender is not None
        return f"{self.sender.sub}/{self.sender.client}/{self.id}"

    def _member_info(self, session: str, state: dict[str, Any]) -> dict[str, Any]:
        assert self.sender is not None
        return {"member": self._member_id(), "sub": self.sender.sub,
                "client": self.sender.client, "device": self.device, "kind": self.sender.kind,
                "tools": list(self.tools), "state": state, "since": now_ms()}

    async def _detach(self, frame: Detach) -> None:
        sub = self.subs.pop(frame.session, None)
        if sub is None:
            raise RequestError(ErrorCode.NOT_ATTACHED, f"not attached to {frame.session!r}")
        self.server.hub.unsubscribe(sub)
        await self._leave(frame.session)
        self.send({"op": "detached", "id": frame.id, "session": frame.session})

    async def _leave(self, session: str) -> None:
        info = self.presence_state.pop(session, None)
        if info is None:
            return
        try:
            await self.server.store.clear_presence(session, info["member"])
            await self.server.publish_presence(session, PRESENCE_LEAVE, info)
        except StoreError as exc:
            log.warning("presence leave of %s failed: %s", session, exc)

    def _ack(self, frame: Ack) -> None:
        sub = self.subs.get(frame.session)
        if sub is None:
            raise RequestError(ErrorCode.NOT_ATTACHED, f"not attached to {frame.session!r}")
        if frame.cursor.epoch != sub.epoch or frame.cursor.seq > sub.last_seq:
            raise RequestError(ErrorCode.BAD_CURSOR, "ack of a cursor that was not delivered")
        if self.acked is None:
            self.acked = {}
        self.acked[frame.session] = frame.cursor

    async def _presence_set(self, frame: PresenceSet) -> None:
        self._require(frame.session, "presence")
        info = self.presence_state.get(frame.session)
        if info is None:
            raise RequestError(ErrorCode.NOT_ATTACHED, f"not attached to {frame.session!r}")
        info["state"] = frame.state
        try:
            await self.server.store.set_presence(frame.session, info["member"], info,
                                                 self.server.config.presence_ttl)
            await self.server.publish_presence(frame.session, PRESENCE_UPDATE, info)
        except StoreError as exc:
            raise RequestError(ErrorCode.STORE_UNAVAILABLE, str(exc)) from None
        self.send(presence_frame(frame.session, "set", [info], rid=frame.id))

    async def _publish(self, frame: Publish) -> None:
        if self.grant is None:
            raise RequestError(ErrorCode.NOT_READY, "send hello first")
        self._require(frame.session, "publish")
        if not self.bucket.take():
            raise RequestError(ErrorCode.RATE_LIMITED,
                               f"more than {self.server.config.publish_rate:g} publishes/s")
        validate_event(frame.type, frame.data, self.server.config.max_event_bytes,
                       frame.transient)
        assert self.sender is not None
        if frame.type in CONTROL_TYPES:
            # Control frames skip the publish queue: a cancel must not wait behind data.
            try:
                appended = await self.server.runs.control(frame.session, frame.type,
                                                          frame.data, self.sender, self.grant)
            except StoreError as exc:
                raise RequestError(ErrorCode.STORE_UNAVAILABLE, str(exc)) from None
            self.send(published_frame(frame.id, appended.event, appended.duplicate))
            return
        if frame.transient:
            event = Event(frame.session, "", 0, frame.type, frame.data, self.sender, now_ms(),
                          transient=True)
            try:
                await self.server.store.publish_transient(event)
            except StoreError as exc:
                raise RequestError(ErrorCode.STORE_UNAVAILABLE, str(exc)) from None
            self.server.metrics.published_transient.inc()
            self.send(published_frame(frame.id, event, False))
            return
        # Commit concurrently so one connection can have many publishes in one group commit;
        # bounded so a flood pauses reading (TCP backpressure) instead of growing memory.
        inflight = self.inflight
        if inflight is None:
            inflight = self.inflight = set()
        elif len(inflight) >= self.server.config.max_inflight_publishes:
            await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
        try:
            future = self.server.store.append_future(frame.session, frame.type, frame.data,
                                                     self.sender, frame.key)
        except StoreError as exc:
            raise RequestError(ErrorCode.STORE_UNAVAILABLE, str(exc)) from None
        # A done-callback, not a task per publish: the reply is a few dict operations.
        inflight.add(future)
        future.add_done_callback(functools.partial(self._committed, frame))

    def _committed(self, frame: Publish, future: asyncio.Future[Appended]) -> None:
        if self.inflight is not None:
            self.inflight.discard(future)
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            if isinstance(exc, StreamClosedError):
                self.send_error(frame.id, ErrorCode.STREAM_CLOSED, str(exc), frame.session)
            elif isinstance(exc, StoreError):
                self.send_error(frame.id, ErrorCode.STORE_UNAVAILABLE, str(exc), frame.session)
            else:  # data the store cannot encode (MessagePack bytes, say)
                self.send_error(frame.id, ErrorCode.INVALID, f"event not stored: {exc}",
                                frame.session)
            return
        appended = future.result()
        self.server.metrics.published_stored.inc()
        self.send(published_frame(frame.id, appended.event, appended.duplicate))
        if not appended.duplicate and appended.event.type == "message":
            # A person's message may start a run.
            task = asyncio.get_running_loop().create_task(
                self.server.runs.on_committed(appended.event))
            self.server.background(task)

    async def _cleanup(self) -> None:
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        for sub in self.subs.values():
            self.server.hub.unsubscribe(sub)
        sessions = list(self.subs)
        self.subs.clear()
        self.outbox.close()
        for session in sessions:
            await self._leave(session)

    async def refresh_presence(self) -> None:
        for session, info in list(self.presence_state.items()):
            await self.server.store.set_presence(session, info["member"], info,
                                                 self.server.config.presence_ttl)


def validate_event(event_type: str, data: Any, max_bytes: int, transient: bool) -> None:
    """Raise :class:`RequestError` unless the event may be published."""
    problem = check_event_type(event_type)
    if problem is not None:
        code = (ErrorCode.UNKNOWN_EVENT_TYPE if "reserved namespace" in problem
                else ErrorCode.INVALID)
        raise RequestError(code, problem)
    if event_type in SERVER_TYPES:
        raise RequestError(ErrorCode.FORBIDDEN, f"only the server writes {event_type!r} events")
    if event_type in CONTROL_TYPES and transient:
        raise RequestError(ErrorCode.INVALID, "run control events cannot be transient")
    if event_type in (STREAM_APPEND, STREAM_END):
        if transient:
            raise RequestError(ErrorCode.INVALID, "stream events cannot be transient")
        problem = check_stream_data(event_type, data)
        if problem is not None:
            raise RequestError(ErrorCode.INVALID, problem)
    try:
        size = len(orjson.dumps(data))
    except TypeError as exc:
        raise RequestError(ErrorCode.INVALID, f"data is not JSON-compatible: {exc}") from None
    if size > max_bytes:
        raise RequestError(ErrorCode.TOO_LARGE,
                           f"event data is {size} bytes, more than {max_bytes}")
