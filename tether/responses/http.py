"""HTTP side of the Responses API: the stateless baseline and retrieval.

* ``POST /v1/responses`` — one response per request; ``"stream": true`` streams the same events
  as Server-Sent Events (``event: <type>`` / ``data: <json>``), otherwise the finished Response
  object is the body. A client without continuation sends its whole history as ``input`` every
  time; ``previous_response_id`` also works here (looked up in the node's memory, then the store).
* ``GET /v1/responses/{id}`` — a stored response of the caller's subject.
* ``GET /v1/responses`` with a WebSocket upgrade — the WebSocket mode (:mod:`.websocket`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from tether.responses import engine, websocket
from tether.responses.errors import (
    ApiError,
    invalid_json,
    previous_not_found,
    response_not_found,
    server_error,
)
from tether.responses.items import chain_of, new_response_id, parse_create
from tether.responses.service import ResponsesService
from tether.server.keys import AUTH, CONFIG, METRICS, STORE

RESPONSES_KEY: web.AppKey[ResponsesService] = web.AppKey("tether.responses")

Handler = Callable[[ResponsesService, web.Request], Awaitable[web.StreamResponse]]


def error_response(service: ResponsesService, error: ApiError) -> web.Response:
    service.count_error(error)
    return web.Response(body=orjson.dumps(error.http_body()), status=error.status,
                        content_type="application/json")


def openai_errors(handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        service = request.app[RESPONSES_KEY]
        try:
            return await handler(service, request)
        except ApiError as exc:
            return error_response(service, exc)

    return wrapped


async def read_body(service: ResponsesService, request: web.Request) -> Any:
    limit = service.config.max_message_bytes
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(f"The request body is larger than {limit} bytes.", code="invalid_value",
                       status=413)
    body = bytearray()  # one growing buffer: no list of chunks joined into a second copy
    async for chunk in request.content.iter_any():
        if len(body) + len(chunk) > limit:
            raise ApiError(f"The request body is larger than {limit} bytes.",
                           code="invalid_value", status=413)
        body += chunk
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise invalid_json(str(exc)) from None


@openai_errors
async def get_responses(service: ResponsesService, request: web.Request) -> web.StreamResponse:
    probe = web.WebSocketResponse()
    if not probe.can_prepare(request).ok:
        raise ApiError("GET /v1/responses expects a WebSocket upgrade (the WebSocket mode); "
                       "create responses over HTTP with POST.", code="invalid_request",
                       status=400)
    return await websocket.handle(service, request)


@openai_errors
async def post_response(service: ResponsesService, request: web.Request) -> web.StreamResponse:
    grant = service.authenticate(request)
    inherit = service.inherit_for(request)
    create = parse_create(await read_body(service, request), transport="http")
    parent = None
    if create.previous_response_id is not None:
        parent = await service.find(grant.sub, create.previous_response_id)
        if parent is None:
            raise previous_not_found(create.previous_response_id)
    plan = engine.plan(create, parent, inherit, service.models.get)
    chain = chain_of(parent.id) if parent is not None else None
    turn = engine.Turn(new_response_id(chain), grant.sub, plan)
    if not create.stream:
        final: dict[str, Any] = {}

        async def keep(event: dict[str, Any]) -> None:
            if event["type"] in ("response.completed", "response.failed",
                                 "response.incomplete"):
                final.update(event["response"])

        await _run(service, turn, keep)
        if final.get("status") == "failed":
            raise server_error(str((final.get("error") or {}).get("message")
                                   or "The response failed."))
        return web.Response(body=orjson.dumps(final), content_type="application/json")

    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    gone = False
    sequence = 0
    prepared = False

    async def emit(event: dict[str, Any]) -> None:
        nonlocal gone, sequence, prepared
        event["sequence_number"] = sequence
        sequence += 1
        if gone:
            return
        try:
            if not prepared:  # after validation: a refused request is a JSON error, not SSE
                prepared = True
                await response.prepare(request)
            await response.write(b"event: " + event["type"].encode() + b"\ndata: "
                                 + orjson.dumps(event) + b"\n\n")
        except (ConnectionError, RuntimeError):
            gone = True  # the response still completes and, with store, is kept

    await _run(service, turn, emit)
    if not gone:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await response.write_eof()
    return response


async def _run(service: ResponsesService, turn: engine.Turn,
               emit: engine.Emit) -> None:
    service.inflight_gauge.inc()
    try:
        await engine.run(turn, service.chains, emit)
    finally:
        service.inflight_gauge.dec()
    service.responses_total.labels("http", turn.status).inc()


@openai_errors
async def get_response(service: ResponsesService, request: web.Request) -> web.StreamResponse:
    grant = service.authenticate(request)
    response_id = request.match_info["response_id"]
    node = await service.find(grant.sub, response_id)
    if node is None:
        raise response_not_found(response_id)
    return web.Response(body=orjson.dumps(node.response), content_type="application/json")


def install(app: web.Application, service: ResponsesService | None = None) -> None:
    """Serve the Responses API on ``app`` (a tether server's application)."""
    if service is None:
        service = ResponsesService(app[STORE], app[AUTH], app[METRICS].registry,
                                   app[CONFIG].heartbeat)
    app[RESPONSES_KEY] = service
    app.router.add_get("/v1/responses", get_responses)
    app.router.add_post("/v1/responses", post_response)
    app.router.add_get("/v1/responses/{response_id}", get_response)
    app.on_shutdown.append(service.on_shutdown)
    app.on_cleanup.append(service.on_cleanup)
