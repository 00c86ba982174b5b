"""HTTP routes of agent runs and schedules: start a run, schedules, the session's webhook.

A feature over the shared services (:mod:`tether.server.keys`): the run manager, the scheduler
and the session service; requests are read with the helpers of :mod:`tether.server.http`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from tether.agents.schedule import parse_schedule
from tether.protocol.codes import ErrorCode, RequestError
from tether.server.http import (
    caller_for,
    json_body,
    json_object,
    json_response,
    query,
    session_param,
)
from tether.server.keys import RUNS, SCHEDULER, SESSIONS


async def post_run(request: web.Request) -> web.Response:
    """Start a run of the session's agent (or the named one) with the given input."""
    session = session_param(request)
    query(request, "token")
    caller = caller_for(request, session, "publish")
    body = await json_object(request)
    name = body.get("agent")
    if name is not None and not isinstance(name, str):
        raise RequestError(ErrorCode.INVALID, "'agent' must be a string")
    run, agent = await request.app[SESSIONS].start_run(caller, session, name, body.get("input"))
    return json_response({"run": run, "session": session, "agent": agent}, 201)


async def post_schedule(request: web.Request) -> web.Response:
    """Start runs on a timer: ``{"every": seconds}`` or ``{"cron": "*/5 * * * *"}``."""
    session = session_param(request)
    query(request, "token")
    caller_for(request, session, "publish")
    schedule = parse_schedule(session, await json_body(request))
    await request.app[SCHEDULER].add(schedule)
    return json_response(schedule.to_dict(), 201)


async def get_schedules(request: web.Request) -> web.Response:
    session = session_param(request)
    query(request, "token")
    caller_for(request, session, "subscribe")
    schedules = request.app[SCHEDULER].schedules.values()
    return json_response({"schedules": [s.to_dict() for s in schedules
                                        if s.session == session]})


async def delete_schedule(request: web.Request) -> web.Response:
    session = session_param(request)
    query(request, "token")
    caller_for(request, session, "publish")
    await request.app[SCHEDULER].remove(session, request.match_info["schedule"])
    return json_response({"deleted": request.match_info["schedule"]})


async def put_webhook(request: web.Request) -> web.Response:
    """``{"url": ..., "secret": ...}`` (or ``{"url": null}`` to remove it)."""
    session = session_param(request)
    query(request, "token")
    caller_for(request, session, "admin")
    body = await json_object(request)
    url, secret = body.get("url"), body.get("secret")
    if url is not None and (not isinstance(url, str)
                            or not url.startswith(("http://", "https://"))):
        raise RequestError(ErrorCode.INVALID, "'url' must be an http(s) URL or null")
    if secret is not None and not isinstance(secret, str):
        raise RequestError(ErrorCode.INVALID, "'secret' must be a string")
    await request.app[SCHEDULER].set_webhook(session, url, secret)
    return json_response({"session": session, "url": url})


def install(app: web.Application) -> None:
    """Serve the run and schedule routes; the runs and the scheduler start with the app."""
    app.router.add_post("/v1/sessions/{session}/runs", post_run)
    app.router.add_post("/v1/sessions/{session}/schedules", post_schedule)
    app.router.add_get("/v1/sessions/{session}/schedules", get_schedules)
    app.router.add_delete("/v1/sessions/{session}/schedules/{schedule}", delete_schedule)
    app.router.add_put("/v1/sessions/{session}/webhook", put_webhook)
    app.cleanup_ctx.append(_lifetime)


async def _lifetime(app: web.Application) -> AsyncIterator[None]:
    runs, scheduler = app[RUNS], app[SCHEDULER]
    await runs.start()
    await scheduler.start()
    yield
    await scheduler.stop()
    await runs.stop()
