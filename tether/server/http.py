"""HTTP API: publish, history pages, SSE with ``Last-Event-ID`` resume, health, metrics.

Errors are JSON bodies ``{"error": {"code": ..., "message": ...}}`` with the status from
:data:`~tether.protocol.codes.HTTP_STATUS`.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tether.agents.schedule import parse_schedule
from tether.protocol.codes import HTTP_STATUS, ErrorCode, RequestError
from tether.protocol.cursor import Cursor, CursorError, epoch_belongs
from tether.protocol.events import (
    CONTROL_TYPES,
    STREAM_APPEND,
    STREAM_END,
    Event,
    Sender,
    valid_session_id,
)
from tether.protocol.frames import attached_frame, event_frame
from tether.server.auth import AuthError, Grant, verify_token
from tether.server.connection import build_snapshot, resume_decision, validate_event
from tether.server.hub import FORMAT_SSE, Outbox
from tether.store.base import StoreError, StreamClosedError, now_ms

if TYPE_CHECKING:
    from tether.server.app import Server

SERVER_KEY: web.AppKey[Server] = web.AppKey("tether_server")


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def error_response(server: Server, code: ErrorCode, message: str) -> web.Response:
    server.metrics.errors.labels(str(code)).inc()
    return json_response({"error": {"code": str(code), "message": message}}, HTTP_STATUS[code])


def _grant(server: Server, request: web.Request, session: str, cap: str) -> Grant:
    header = request.headers.get("Authorization", "")
    token = header[7:] if header.lower().startswith("bearer ") else request.query.get("token")
    try:
        grant = verify_token(server.secret, token)
    except AuthError as exc:
        raise RequestError(ErrorCode.UNAUTHORIZED, exc.message) from None
    if not grant.allows(session, cap):
        raise RequestError(ErrorCode.FORBIDDEN, f"token does not allow {cap!r} on {session!r}")
    return grant


def _session(request: web.Request) -> str:
    session = request.match_info["session"]
    if not valid_session_id(session):
        raise RequestError(ErrorCode.INVALID, "invalid session id")
    return session


def _cursor(text: str | None, session: str) -> Cursor | None:
    if not text:
        return None
    try:
        cursor = Cursor.parse(text)
    except CursorError as exc:
        raise RequestError(ErrorCode.BAD_CURSOR, str(exc)) from None
    if not epoch_belongs(cursor.epoch, session):
        raise RequestError(ErrorCode.BAD_CURSOR, "cursor belongs to another session")
    return cursor


def handle_errors(
    handler: Any,
) -> Any:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        server = request.app[SERVER_KEY]
        try:
            return await handler(server, request)  # type: ignore[no-any-return]
        except RequestError as exc:
            return error_response(server, exc.code, exc.message)
        except StoreError as exc:
            return error_response(server, ErrorCode.STORE_UNAVAILABLE, str(exc))

    return wrapped


@handle_errors
async def post_event(server: Server, request: web.Request) -> web.Response:
    session = _session(request)
    grant = _grant(server, request, session, "publish")
    raw = await request.read()
    if len(raw) > server.config.max_frame_bytes:
        raise RequestError(ErrorCode.TOO_LARGE, "request body too large")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RequestError(ErrorCode.BAD_FRAME, f"malformed JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError(ErrorCode.INVALID, "body must be a JSON object")
    event_type = body.get("type")
    key = body.get("key")
    transient = body.get("transient", False)
    if not isinstance(event_type, str):
        raise RequestError(ErrorCode.INVALID, "'type' must be a string")
    if key is not None and (not isinstance(key, str) or not 0 < len(key) <= 128):
        raise RequestError(ErrorCode.INVALID, "'key' must be a string of 1–128 characters")
    if not isinstance(transient, bool):
        raise RequestError(ErrorCode.INVALID, "'transient' must be a boolean")
    data = body.get("data")
    validate_event(event_type, data, server.config.max_event_bytes, transient)
    sender = Sender(grant.sub, request.headers.get("X-Tether-Client", "http"), "human")
    if event_type in CONTROL_TYPES:
        appended = await server.runs.control(session, event_type, data, sender, grant)
        return json_response({"seq": appended.event.seq, "cursor": str(appended.event.cursor),
                              "duplicate": appended.duplicate}, 201)
    if transient:
        event = Event(session, "", 0, event_type, data, sender, now_ms(), transient=True)
        await server.store.publish_transient(event)
        return json_response({"seq": 0, "cursor": None, "duplicate": False, "transient": True})
    try:
        appended = await server.store.append(session, event_type, data, sender, key)
    except StreamClosedError as exc:
        raise RequestError(ErrorCode.STREAM_CLOSED, str(exc)) from None
    server.metrics.published_stored.inc()
    if not appended.duplicate:
        await server.runs.on_committed(appended.event)
    ev = appended.event
    return json_response({"seq": ev.seq, "cursor": str(ev.cursor),
                          "duplicate": appended.duplicate},
                         200 if appended.duplicate else 201)


@handle_errors
async def get_events(server: Server, request: web.Request) -> web.Response:
    session = _session(request)
    _grant(server, request, session, "subscribe")
    cursor = _cursor(request.query.get("after"), session)
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        raise RequestError(ErrorCode.INVALID, "'limit' must be an integer") from None
    if not 1 <= limit <= 1000:
        raise RequestError(ErrorCode.INVALID, "'limit' must be between 1 and 1000")
    compact = request.query.get("compact", "").lower() in ("1", "true", "yes")
    head = await server.store.head(session)
    resumed, after, reason = resume_decision(cursor, head)
    if not resumed:
        after = head.first_seq - 1  # continuity lost: serve what is retained, and say so
    events = await server.store.read(session, after, limit)
    if compact:
        ended = {e.stream for e in events if e.type == STREAM_END}
        events = [e for e in events if not (e.type == STREAM_APPEND and e.stream in ended)]
    last = events[-1].seq if events else after
    body: dict[str, Any] = {
        "session": session,
        "events": [event_frame(e) for e in events],
        "cursor": str(Cursor(head.epoch, last)),
        "head": str(Cursor(head.epoch, head.last_seq)),
        "more": last < head.last_seq,
        "resumed": resumed,
    }
    if reason:
        body["reason"] = reason
    return json_response(body)


class SseSink:
    __slots__ = ("response",)

    def __init__(self, response: web.StreamResponse) -> None:
        self.response = response

    async def send(self, data: bytes) -> None:
        await self.response.write(data)

    def abort(self) -> None:
        transport = self.response._req.transport if self.response._req else None
        if transport is not None:
            transport.abort()


class SsePeer:
    format = FORMAT_SSE

    def __init__(self, server: Server, response: web.StreamResponse) -> None:
        self.outbox = Outbox(SseSink(response), server.config.outbound_buffer_bytes,
                             server.metrics)


@handle_errors
async def get_stream(server: Server, request: web.Request) -> web.StreamResponse:
    session = _session(request)
    _grant(server, request, session, "subscribe")
    cursor = _cursor(request.headers.get("Last-Event-ID") or request.query.get("after"), session)
    head = await server.store.head(session)
    resumed, after, reason = resume_decision(cursor, head)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    peer = SsePeer(server, response)
    sub = server.hub.subscribe(peer, session, head.epoch, after)
    server.metrics.hot.connections_sse += 1
    try:
        snapshot = None
        if not resumed:
            events, sub.last_seq = await build_snapshot(server, session, head)
            snapshot = {"events": events, "presence": await server.store.presence(session)}
        if cursor is not None or not resumed:
            server.metrics.resumes.labels("true" if resumed else "false").inc()
        attached = attached_frame(None, session, Cursor(head.epoch, sub.last_seq), resumed,
                                  snapshot, reason)
        peer.outbox.push(b"event: attached\ndata: " + orjson.dumps(attached) + b"\n\n")
        sub.catch_up("attach")
        # Comment lines keep proxies from timing the stream out and reveal a dead client.
        task = asyncio.current_task()
        assert task is not None
        server.streams.add(task)
        transport = request.transport
        ticks = 0
        while not peer.outbox.closed and transport is not None and not transport.is_closing():
            await asyncio.sleep(1.0)
            ticks += 1
            if ticks >= server.config.heartbeat:
                ticks = 0
                peer.outbox.push(b": keep-alive\n\n")
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        server.streams.discard(asyncio.current_task())
        server.metrics.hot.connections_sse -= 1
        server.hub.unsubscribe(sub)
        peer.outbox.close()
    return response


@handle_errors
async def post_run(server: Server, request: web.Request) -> web.Response:
    """Start a run of the session's agent (or the named one) with the given input."""
    session = _session(request)
    _grant(server, request, session, "publish")
    try:
        body = orjson.loads(await request.read() or b"{}")
    except orjson.JSONDecodeError as exc:
        raise RequestError(ErrorCode.BAD_FRAME, f"malformed JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError(ErrorCode.INVALID, "body must be a JSON object")
    name = body.get("agent")
    if name is not None and not isinstance(name, str):
        raise RequestError(ErrorCode.INVALID, "'agent' must be a string")
    agent = server.runs.agent_for(session, name)
    if agent is None:
        raise RequestError(ErrorCode.NOT_FOUND, f"no agent serves {session!r}"
                        + (f" under the name {name!r}" if name else ""))
    run = await server.runs.create_run(session, agent, body.get("input"), "api")
    return json_response({"run": run, "session": session, "agent": agent.name}, 201)


async def _json_body(request: web.Request) -> Any:
    try:
        return orjson.loads(await request.read() or b"{}")
    except orjson.JSONDecodeError as exc:
        raise RequestError(ErrorCode.BAD_FRAME, f"malformed JSON: {exc}") from None


@handle_errors
async def post_schedule(server: Server, request: web.Request) -> web.Response:
    """Start runs on a timer: ``{"every": seconds}`` or ``{"cron": "*/5 * * * *"}``."""
    session = _session(request)
    _grant(server, request, session, "publish")
    schedule = parse_schedule(session, await _json_body(request))
    await server.scheduler.add(schedule)
    return json_response(schedule.to_dict(), 201)


@handle_errors
async def get_schedules(server: Server, request: web.Request) -> web.Response:
    session = _session(request)
    _grant(server, request, session, "subscribe")
    return json_response({"schedules": [s.to_dict() for s in server.scheduler.schedules.values()
                                        if s.session == session]})


@handle_errors
async def delete_schedule(server: Server, request: web.Request) -> web.Response:
    session = _session(request)
    _grant(server, request, session, "publish")
    await server.scheduler.remove(session, request.match_info["schedule"])
    return json_response({"deleted": request.match_info["schedule"]})


@handle_errors
async def put_webhook(server: Server, request: web.Request) -> web.Response:
    """``{"url": ..., "secret": ...}`` (or ``{"url": null}`` to remove it)."""
    session = _session(request)
    _grant(server, request, session, "admin")
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise RequestError(ErrorCode.INVALID, "body must be a JSON object")
    url, secret = body.get("url"), body.get("secret")
    if url is not None and (not isinstance(url, str)
                            or not url.startswith(("http://", "https://"))):
        raise RequestError(ErrorCode.INVALID, "'url' must be an http(s) URL or null")
    if secret is not None and not isinstance(secret, str):
        raise RequestError(ErrorCode.INVALID, "'secret' must be a string")
    await server.scheduler.set_webhook(session, url, secret)
    return json_response({"session": session, "url": url})


async def healthz(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    try:
        await asyncio.wait_for(server.store.head("tether.healthz"), 2.0)
    except (StoreError, TimeoutError) as exc:
        return json_response({"status": "unavailable", "store": str(exc)}, 503)
    return json_response({"status": "ok", "node": server.node_id,
                          "connections": server.metrics.hot.connections_ws})


async def metrics(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    return web.Response(body=generate_latest(server.metrics.registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/sessions/{session}/events", post_event)
    app.router.add_get("/v1/sessions/{session}/events", get_events)
    app.router.add_get("/v1/sessions/{session}/stream", get_stream)
    from tether.server import agui  # it imports this module, so not at the top
    app.router.add_get("/v1/sessions/{session}/agui", agui.get_agui)
    app.router.add_post("/v1/sessions/{session}/runs", post_run)
    app.router.add_post("/v1/sessions/{session}/schedules", post_schedule)
    app.router.add_get("/v1/sessions/{session}/schedules", get_schedules)
    app.router.add_delete("/v1/sessions/{session}/schedules/{schedule}", delete_schedule)
    app.router.add_put("/v1/sessions/{session}/webhook", put_webhook)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)


