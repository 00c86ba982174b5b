"""``GET /v1/responses`` upgraded to a WebSocket: OpenAI's Responses WebSocket mode.

One connection carries ``response.create`` events (the HTTP create body plus ``stream_id``,
``generate``) and receives each response's events, one JSON object per text frame.

* **Lanes.** ``stream_id`` names a lane; requests of a lane run FIFO, one at a time; lanes run
  concurrently. At most ``max_inflight`` (16) responses generate at once per connection — more
  wait their turn — and at most ``max_lanes`` (32) distinct named lanes may be used
  (``websocket_stream_limit_reached``; the default lane does not count).
* **Continuation.** ``previous_response_id`` is looked up in this connection's memory, then among
  this connection's responses still generating (the create waits for them), then in the node's
  memory, then in the session store — so it works after a reconnect, a restart, on another node.
* **Errors** are ``error`` events; the connection stays open, except at the end of its lifetime
  (``max_connection_seconds``): queued creates and any later one get
  ``websocket_connection_limit_reached``, responses already generating may finish (for
  ``lifetime_grace``), then the connection-level error is sent and the socket closed (1000).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from tether.responses import engine
from tether.responses.chains import Node
from tether.responses.errors import (
    ApiError,
    connection_limit,
    invalid_json,
    invalid_stream_id,
    invalid_value,
    previous_not_found,
    server_error,
    stream_limit,
    unauthorized,
)
from tether.responses.items import STREAM_ID, CreateRequest, new_response_id, parse_create
from tether.responses.service import ResponsesService
from tether.server.auth import Grant

log = logging.getLogger("tether.responses")

CLIENT_EVENTS = ("response.create",)


@dataclass(slots=True)
class Job:
    stream_id: str | None
    request: CreateRequest | None = None
    error: ApiError | None = None


class Lane:
    __slots__ = ("jobs", "stream_id", "task")

    def __init__(self, stream_id: str | None) -> None:
        self.stream_id = stream_id
        self.jobs: deque[Job] = deque()
        self.task: asyncio.Task[None] | None = None


class ResponsesSocket:
    """One Responses WebSocket connection."""

    def __init__(self, service: ResponsesService, ws: web.WebSocketResponse, grant: Grant,
                 inherit: frozenset[str]) -> None:
        self.service = service
        self.config = service.config
        self.ws = ws
        self.grant = grant
        self.inherit = inherit
        self.lanes: dict[str | None, Lane] = {}
        self.named: set[str] = set()
        self.inflight = asyncio.Semaphore(self.config.max_inflight)
        self.cache: OrderedDict[str, Node] = OrderedDict()
        self.pending: dict[str, asyncio.Future[Node | None]] = {}
        self.queued = 0
        self.room = asyncio.Event()
        self.room.set()
        self.expired = False
        self.gone = False
        self._send_lock = asyncio.Lock()
        self._ending: asyncio.Task[None] | None = None

    # --- sending ---

    async def send(self, event: dict[str, Any]) -> None:
        """Send one event as one text frame; a closed socket turns sending into a no-op."""
        if self.gone:
            return
        data = orjson.dumps(event)
        try:
            async with self._send_lock:
                await self.ws.send_frame(data, WSMsgType.TEXT)
        except (ConnectionError, RuntimeError):
            self.gone = True

    async def send_error(self, error: ApiError, stream_id: str | None = None) -> None:
        self.service.count_error(error)
        await self.send(error.event(stream_id))

    async def close(self, code: int, message: bytes) -> None:
        self.gone = True
        with contextlib.suppress(Exception):
            await self.ws.close(code=code, message=message)

    # --- receiving ---

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        lifetime = loop.call_later(self.config.max_connection_seconds, self._expire)
        try:
            async for msg in self.ws:
                if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    await self.on_message(msg.data)
                    if self.queued >= self.config.max_queued:
                        self.room.clear()
                        await self.room.wait()  # stop reading: TCP pushes back on the client
                elif msg.type == WSMsgType.ERROR:
                    break
        finally:
            lifetime.cancel()
            self.gone = True
            # Creates not started are dropped; responses generating finish (and are stored).
            for lane in self.lanes.values():
                lane.jobs.clear()
            self.queued = 0
            self.room.set()

    async def on_message(self, data: str | bytes) -> None:
        try:
            body = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            await self.send_error(invalid_json(str(exc)))
            return
        if not isinstance(body, dict):
            await self.send_error(ApiError("Each message must be a JSON object.",
                                           code="invalid_type"))
            return
        kind = body.get("type")
        if kind == "response.create":
            await self.on_create(body)
        elif kind == "response.steer":
            await self.send({"type": "response.steer.failed", "sequence_number": 0,
                             "error": {"type": "invalid_request_error",
                                       "code": "steering_not_supported",
                                       "message": "This server does not support steering: "
                                                  "send a response.create when the response "
                                                  "has ended."},
                             "steer": {"input": body.get("input") or [],
                                       "previous_response_id":
                                           str(body.get("previous_response_id") or "")}})
        elif kind is None:
            await self.send_error(ApiError("Missing required parameter: 'type'.",
                                           code="missing_required_parameter", param="type"))
        elif not isinstance(kind, str):
            await self.send_error(ApiError("Invalid type for 'type': expected a string.",
                                           code="invalid_type", param="type"))
        else:
            await self.send_error(invalid_value(
                "type", f"Invalid value: '{kind[:64]}'. Supported values are: "
                + ", ".join(f"'{t}'" for t in CLIENT_EVENTS) + "."))

    async def on_create(self, body: dict[str, Any]) -> None:
        stream_id = body.get("stream_id")
        if stream_id is not None and (not isinstance(stream_id, str)
                                      or not STREAM_ID.fullmatch(stream_id)):
            await self.send_error(invalid_stream_id())
            return
        if self.expired:
            await self.send_error(connection_limit(self.config.max_connection_seconds),
                                  stream_id)
            return
        if self.grant.exp is not None and time.time() >= self.grant.exp:
            await self.send_error(unauthorized("Your token has expired; connect again with a "
                                               "fresh one."))
            await self.close(1008, b"token expired")
            return
        lane = self.lanes.get(stream_id)
        if lane is None:
            if stream_id is not None:
                if len(self.named) >= self.config.max_lanes:
                    await self.send_error(stream_limit(self.config.max_lanes), stream_id)
                    return
                self.named.add(stream_id)
            lane = self.lanes[stream_id] = Lane(stream_id)
        job = Job(stream_id)
        try:
            job.request = parse_create({k: v for k, v in body.items()
                                        if k not in ("type", "stream_id")}, transport="ws")
        except ApiError as exc:
            job.error = exc  # reported in lane order
        lane.jobs.append(job)
        self.queued += 1
        if lane.task is None:
            lane.task = asyncio.get_running_loop().create_task(self._work(lane))
            self.service.track(lane.task)

    # --- lanes ---

    async def _work(self, lane: Lane) -> None:
        try:
            while lane.jobs:
                job = lane.jobs.popleft()
                self.queued -= 1
                if self.queued < self.config.max_queued:
                    self.room.set()
                try:
                    await self._run(job)
                except ApiError as exc:
                    await self.send_error(exc, job.stream_id)
                except Exception:
                    log.exception("response failed")
                    await self.send_error(server_error(), job.stream_id)
        finally:
            lane.task = None

    async def _previous(self, response_id: str) -> Node | None:
        node = self.cache.get(response_id)
        if node is not None:
            self.cache.move_to_end(response_id)
            return node
        waiting = self.pending.get(response_id)
        if waiting is not None:  # still generating on this connection (another lane)
            return await asyncio.shield(waiting)
        return await self.service.find(self.grant.sub, response_id)

    def _remember(self, node: Node) -> None:
        self.cache[node.id] = node
        self.cache.move_to_end(node.id)
        while len(self.cache) > self.config.connection_cache:
            self.cache.popitem(last=False)

    async def _run(self, job: Job) -> None:
        if job.error is not None:
            raise job.error
        request = job.request
        assert request is not None
        parent = None
        if request.previous_response_id is not None:
            parent = await self._previous(request.previous_response_id)
            if parent is None:
                raise previous_not_found(request.previous_response_id)
        plan = engine.plan(request, parent, self.inherit, self.service.models.get)
        stream_id = job.stream_id
        # Resolving the parent above may wait; a slot is taken only to generate, so a create
        # waiting for its parent never holds up the one it waits for.
        async with self.inflight:
            chain = parent.id[5:21] if parent is not None else None
            turn = engine.Turn(new_response_id(chain), self.grant.sub, plan)
            future: asyncio.Future[Node | None] = asyncio.get_running_loop().create_future()
            sequence = 0

            async def emit(event: dict[str, Any]) -> None:
                nonlocal sequence
                event["sequence_number"] = sequence
                sequence += 1
                if stream_id is not None:
                    event["stream_id"] = stream_id
                await self.send(event)

            def created() -> None:
                self.pending[turn.id] = future

            self.service.inflight_gauge.inc()
            node: Node | None = None
            try:
                node = await engine.run(turn, self.service.chains, emit, created)
                self._remember(node)
                self.service.responses_total.labels("ws", turn.status).inc()
            finally:
                self.service.inflight_gauge.dec()
                self.pending.pop(turn.id, None)
                if not future.done():
                    future.set_result(node)

    # --- lifetime ---

    def _expire(self) -> None:
        self.expired = True
        self._ending = asyncio.get_running_loop().create_task(self._end_of_life())

    async def _end_of_life(self) -> None:
        error = connection_limit(self.config.max_connection_seconds)
        for lane in self.lanes.values():
            while lane.jobs:
                job = lane.jobs.popleft()
                self.queued -= 1
                await self.send_error(error, job.stream_id)
        self.room.set()
        running = [lane.task for lane in self.lanes.values() if lane.task is not None]
        if running:
            _, late = await asyncio.wait(running, timeout=self.config.lifetime_grace)
            for task in late:
                task.cancel()
        await self.send_error(error)
        await self.close(1000, b"connection limit reached")


async def handle(service: ResponsesService, request: web.Request) -> web.StreamResponse:
    """The WebSocket upgrade: authenticate first (an HTTP error, not a socket), then serve."""
    grant = service.authenticate(request)
    inherit = service.inherit_for(request)
    ws = web.WebSocketResponse(heartbeat=service.heartbeat or None,
                               max_msg_size=service.config.max_message_bytes, compress=True,
                               autoping=True)
    await ws.prepare(request)
    sock = ResponsesSocket(service, ws, grant, inherit)
    service.sockets.add(sock)
    service.connections_gauge.inc()
    try:
        await sock.run()
    finally:
        service.connections_gauge.dec()
        service.sockets.discard(sock)
    return ws
