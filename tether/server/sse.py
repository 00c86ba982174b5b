"""One open ``text/event-stream`` response, for every transport that streams over SSE.

:class:`SseStream` is the SSE counterpart of a WebSocket connection: a hub peer (its outbox is
fed by the hub), a :class:`~tether.server.sessions.Live` delivery (the service ends it when its
token expires — with an ``error`` event, code ``token_expired`` — and at shutdown), and the
keep-alive loop that also notices a client that went away. ``…/stream``, AG-UI and any later
SSE transport differ only in the bytes they push.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import orjson
from aiohttp import web

from tether.protocol.codes import TetherError
from tether.protocol.cursor import Cursor
from tether.server.hub import FORMAT_SSE, Outbox
from tether.server.sessions import Attachment, Caller, Catchup, SessionService

if TYPE_CHECKING:
    from tether.server.config import ServerConfig
    from tether.server.metrics import Metrics

log = logging.getLogger("tether.sse")

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}


class SseSink:
    """Writes an outbox's bytes to one streaming response."""

    __slots__ = ("response",)

    def __init__(self, response: web.StreamResponse) -> None:
        self.response = response

    async def send(self, data: bytes) -> None:
        await self.response.write(data)

    async def send_many(self, frames: list[bytes]) -> None:
        await self.response.write(b"".join(frames))

    def write_now(self, frames: list[bytes]) -> bool:
        return False  # aiohttp's response writes are awaited; the outbox's writer task does it

    def abort(self) -> None:
        transport = self.response._req.transport if self.response._req else None
        if transport is not None:
            transport.abort()


class SseStream:
    """An SSE response being served; see the module docstring.

    ``format`` is the hub's SSE encoding; a transport that re-encodes (AG-UI) gives its own
    outbox class.
    """

    format = FORMAT_SSE

    def __init__(self, request: web.Request, service: SessionService, caller: Caller,
                 config: ServerConfig, metrics: Metrics,
                 outbox: Callable[[SseSink], Outbox] | None = None) -> None:
        self.request = request
        self.service = service
        self.caller: Caller | None = caller
        self.config = config
        self.metrics = metrics
        self.response = web.StreamResponse(headers=SSE_HEADERS)
        sink = SseSink(self.response)
        self.outbox: Outbox = (outbox(sink) if outbox is not None
                               else Outbox(sink, config.outbound_buffer_bytes, metrics))
        self.task: asyncio.Task[object] | None = None
        self._ended = asyncio.Event()
        service.limits.open(caller.sender.sub, "streams")  # raises before anything is sent
        self._counted = True

    async def attach(self, session: str, cursor: Cursor | None,
                     catchup: Catchup = Catchup.SNAPSHOT) -> Attachment:
        """Attach this stream to ``session``; refused, it is an HTTP error (nothing was sent)."""
        assert self.caller is not None
        try:
            return await self.service.attach(self.caller, self, session, cursor,
                                             catchup=catchup)
        except BaseException:
            self.close()
            raise

    async def deliver(self, attachment: Attachment,
                      prelude: Callable[[], Awaitable[None]]) -> web.StreamResponse:
        """Start the response, send the transport's ``prelude``, then the session's events
        until the client leaves, the token expires or the node stops; always detaches."""
        try:
            await self.open()
            await prelude()
            attachment.start()
            await self.serve()
        except TetherError as exc:  # the response has begun: end it, the client resumes
            log.warning("%s of %s ended: %s", type(self).__name__, attachment.session, exc)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.service.detach(attachment.subscription)
            self.close()
        return self.response

    async def open(self) -> None:
        """Send the response headers and start counting this stream as open."""
        await self.response.prepare(self.request)
        self.task = asyncio.current_task()
        self.service.live.add(self)
        self.metrics.hot.connections_sse += 1

    async def serve(self) -> None:
        """Keep the stream open until the client leaves, the outbox fails or the stream ends.

        Comment lines every heartbeat keep proxies from timing the stream out and reveal a
        dead client.
        """
        transport = self.request.transport
        ticks = 0
        with contextlib.suppress(ConnectionResetError, asyncio.CancelledError):
            while (not self.outbox.closed and not self._ended.is_set()
                   and transport is not None and not transport.is_closing()):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._ended.wait(), 1.0)
                ticks += 1
                if ticks >= self.config.heartbeat:
                    ticks = 0
                    self.outbox.push(b": keep-alive\n\n")
            # Let what was queued before the end (an expiry's error event) go out.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self.outbox.flush()

    def close(self) -> None:
        """Stop counting the stream; the caller unsubscribes it from the hub."""
        if self.task is not None and self in self.service.live:
            self.service.live.discard(self)
            self.metrics.hot.connections_sse -= 1
        if self._counted and self.caller is not None:
            self._counted = False
            self.service.limits.close(self.caller.sender.sub, "streams")
        self.outbox.close()

    # --- sessions.Live ---

    def expiry_message(self) -> bytes:
        """What the stream says last when its token expires (documented in protocol.md)."""
        body = {"code": "token_expired", "message": "token expired"}
        return b"event: error\ndata: " + orjson.dumps(body) + b"\n\n"

    def expire(self) -> None:
        if self._ended.is_set():
            return
        self.metrics.closes.labels("token_expired").inc()
        self.push_message(self.expiry_message())
        self._ended.set()

    def push_message(self, data: bytes) -> None:
        """Queue a message of the stream's own (not a hub event)."""
        self.outbox.push(data)

    async def shutdown(self) -> None:
        self._ended.set()
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()
