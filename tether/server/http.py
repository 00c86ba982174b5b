"""The HTTP transport: publish, history pages, SSE with ``Last-Event-ID`` resume, health, metrics.

Like the WebSocket endpoint, a thin layer over :class:`~tether.server.sessions.SessionService`.
Errors are JSON bodies ``{"error": {"code": ..., "message": ...}}`` with the status from
:data:`~tether.protocol.codes.HTTP_STATUS`, written in one place: :func:`error_middleware`.
The helpers here (:func:`caller_for`, :func:`session_param`, :func:`json_object`, …) are what
every HTTP feature uses to read a request.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tether.protocol.codes import HTTP_STATUS, ErrorCode, RequestError, TetherError
from tether.protocol.cursor import Cursor
from tether.protocol.events import Sender
from tether.protocol.frames import attached_frame, event_frame
from tether.server.keys import AUTH, CONFIG, METRICS, NODE, SESSIONS, STORE
from tether.server.sessions import Caller, parse_cursor, parse_session
from tether.server.sse import SseStream

log = logging.getLogger("tether.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


_UNGUARDED = "_tether_answers_own_errors"

_H = TypeVar("_H", bound=Callable[..., Awaitable[web.StreamResponse]])


def unguarded(handler: _H) -> _H:
    """Mark a handler that answers its own errors: :func:`error_middleware` hands aiohttp the
    handler's coroutine itself instead of awaiting it in a coroutine of its own.

    For a WebSocket that matters: every coroutine between aiohttp and the receive loop stays
    suspended for the connection's life, and this one would cost ~0.4 KiB per idle connection.
    """
    setattr(handler, _UNGUARDED, True)
    return handler


@web.middleware
def error_middleware(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
    """Turn a :class:`TetherError` raised by any handler (before its response started) into
    the JSON error body, counted in ``tether_errors_total``; except for :func:`unguarded`
    handlers, which are not wrapped at all."""
    if getattr(request.match_info.handler, _UNGUARDED, False):
        return handler(request)
    return _guarded(request, handler)


async def _guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except TetherError as exc:
        response = error_response(request, exc.code, exc.message)
        if exc.retry_after is not None:
            response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
        return response
    except web.HTTPRequestEntityTooLarge:
        return error_response(request, ErrorCode.TOO_LARGE, "request body too large")
    except web.HTTPException:
        raise  # aiohttp's own answers (404 of an unknown path, 405, …)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return error_response(request, ErrorCode.INTERNAL, "internal error")


def error_response(request: web.Request, code: ErrorCode, message: str) -> web.Response:
    request.app[METRICS].errors.labels(str(code)).inc()
    return json_response({"error": {"code": str(code), "message": message}}, HTTP_STATUS[code])


def bearer_token(request: web.Request) -> str | None:
    """``Authorization: Bearer …``, else ``?token=`` (for EventSource, which sends no header)."""
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.query.get("token")


def caller_for(request: web.Request, session: str, cap: str) -> Caller:
    """The request's caller, checked for ``cap`` on ``session``."""
    grant = request.app[AUTH].verify(bearer_token(request))
    caller = Caller(grant, Sender(grant.sub, request.headers.get("X-Tether-Client", "http"),
                                  "human"), connection="http")
    caller.require(session, cap)
    return caller


def query(request: web.Request, *allowed: str) -> dict[str, str]:
    """The request's query parameters, refusing unknown ones (a typo would otherwise be
    ignored silently). ``cursor`` is accepted wherever ``after`` is: the SDK and the CLI call
    the position a cursor."""
    params = dict(request.query)
    if "cursor" in params and "after" in allowed:
        if "after" in params:
            raise RequestError(ErrorCode.INVALID, "give 'after' or its alias 'cursor', not both")
        params["after"] = params.pop("cursor")
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        valid = ", ".join(sorted({*allowed, "cursor"} if "after" in allowed else allowed))
        raise RequestError(ErrorCode.INVALID, f"unknown query parameter {unknown[0]!r}; "
                                              f"this endpoint takes: {valid}")
    return params


def session_param(request: web.Request) -> str:
    return parse_session(request.match_info["session"])


async def json_body(request: web.Request, default: bytes = b"{}") -> Any:
    raw = await request.read()
    try:
        return orjson.loads(raw or default)
    except orjson.JSONDecodeError as exc:
        raise RequestError(ErrorCode.BAD_FRAME, f"malformed JSON: {exc}") from None


async def json_object(request: web.Request) -> dict[str, Any]:
    body = await json_body(request)
    if not isinstance(body, dict):
        raise RequestError(ErrorCode.INVALID, "body must be a JSON object")
    return body


async def post_event(request: web.Request) -> web.Response:
    session = session_param(request)
    query(request, "token")
    caller = caller_for(request, session, "publish")
    if request.content_length is not None \
            and request.content_length > request.app[CONFIG].max_frame_bytes:
        raise RequestError(ErrorCode.TOO_LARGE, "request body too large")
    body = await json_object(request)
    event_type = body.get("type")
    key = body.get("key")
    transient = body.get("transient", False)
    if not isinstance(event_type, str):
        raise RequestError(ErrorCode.INVALID, "'type' must be a string")
    if key is not None and (not isinstance(key, str) or not 0 < len(key) <= 128):
        raise RequestError(ErrorCode.INVALID, "'key' must be a string of 1–128 characters")
    if not isinstance(transient, bool):
        raise RequestError(ErrorCode.INVALID, "'transient' must be a boolean")
    appended = await request.app[SESSIONS].publish(caller, session, event_type,
                                                   body.get("data"), key, transient)
    event = appended.event
    if event.transient:
        return json_response({"seq": 0, "cursor": None, "duplicate": False, "transient": True})
    return json_response({"seq": event.seq, "cursor": str(event.cursor),
                          "duplicate": appended.duplicate}, 200 if appended.duplicate else 201)


async def get_events(request: web.Request) -> web.Response:
    session = session_param(request)
    caller = caller_for(request, session, "subscribe")
    params = query(request, "after", "limit", "compact", "token")
    cursor = parse_cursor(params.get("after"), session)
    try:
        limit = int(params.get("limit", "100"))
    except ValueError:
        raise RequestError(ErrorCode.INVALID, "'limit' must be an integer") from None
    if not 1 <= limit <= 1000:
        raise RequestError(ErrorCode.INVALID, "'limit' must be between 1 and 1000")
    compact = params.get("compact", "").lower() in ("1", "true", "yes")
    page = await request.app[SESSIONS].history(caller, session, cursor, limit, compact)
    body: dict[str, Any] = {
        "session": session,
        "events": [event_frame(e) for e in page.events],
        "cursor": str(page.cursor),
        "head": str(Cursor(page.head.epoch, page.head.last_seq)),
        "more": page.more,
        "resumed": page.resumed,
    }
    if page.reason:
        body["reason"] = page.reason
    return json_response(body)


async def get_stream(request: web.Request) -> web.StreamResponse:
    """The session as SSE: ``attached`` first, then every event; resumable by cursor."""
    session = session_param(request)
    caller = caller_for(request, session, "subscribe")
    params = query(request, "after", "token")
    cursor = parse_cursor(request.headers.get("Last-Event-ID") or params.get("after"), session)
    service = request.app[SESSIONS]
    stream = SseStream(request, service, caller, request.app[CONFIG], request.app[METRICS])
    # Errors up to here are HTTP errors; the response starts only once the attach succeeded.
    attachment = await stream.attach(session, cursor)

    async def prelude() -> None:
        snapshot = None
        if attachment.snapshot is not None:
            snapshot = {"events": attachment.snapshot,
                        "presence": await service.members(session)}
        attached = attached_frame(None, session, attachment.cursor, attachment.resumed,
                                  snapshot, attachment.reason)
        stream.outbox.push(b"event: attached\ndata: " + orjson.dumps(attached) + b"\n\n")

    return await stream.deliver(attachment, prelude)


async def healthz(request: web.Request) -> web.Response:
    """200 while the store commits; 503 with the reason once commits have failed for
    ``store_unhealthy_after`` seconds (a store that reads but cannot write is not healthy)."""
    healthy, reason = await request.app[SESSIONS].check_store()
    if not healthy:
        return json_response({"status": "unavailable", "store": reason}, 503)
    try:
        await asyncio.wait_for(request.app[STORE].head("tether.healthz"), 2.0)
    except (TetherError, TimeoutError) as exc:
        return json_response({"status": "unavailable", "store": str(exc)}, 503)
    return json_response({"status": "ok", "node": request.app[NODE],
                          "connections": request.app[METRICS].hot.connections_ws})


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(request.app[METRICS].registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


def install(app: web.Application) -> None:
    """Serve the sessions HTTP API, SSE, ``/healthz`` and ``/metrics`` on ``app``."""
    app.middlewares.append(error_middleware)
    app.router.add_post("/v1/sessions/{session}/events", post_event)
    app.router.add_get("/v1/sessions/{session}/events", get_events)
    app.router.add_get("/v1/sessions/{session}/stream", get_stream)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
