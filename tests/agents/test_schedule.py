"""Schedules post into sessions nobody is attached to; webhooks call back, signed, retried."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from tests.agents.test_runs import until_event
from tests.helpers import Peer, token
from tether.server import Server

ADMIN = {"Authorization": f"Bearer {token(caps=['subscribe', 'publish', 'admin'])}"}


def url(server: Server, path: str) -> str:
    return f"http://127.0.0.1:{server.port}{path}"


async def test_scheduled_run_waits_in_the_log_for_the_next_attach(agent_server: Server) -> None:
    async with aiohttp.ClientSession() as http:
        resp = await http.post(url(agent_server, "/v1/sessions/s/schedules"),
                               json={"every": 0.2, "input": {"text": "scheduled check"}},
                               headers=ADMIN)
        assert resp.status == 201
        schedule = await resp.json()
        listed = await (await http.get(url(agent_server, "/v1/sessions/s/schedules"),
                                       headers=ADMIN)).json()
        assert [s["id"] for s in listed["schedules"]] == [schedule["id"]]

    # Nobody is attached. Wait for a scheduled run to finish, on the server's own log.
    done = asyncio.Event()

    def on_event(event: Any) -> None:
        if event.type == "run.state" and event.data.get("state") == "completed":
            done.set()

    agent_server.store.listen("s", on_event)
    await asyncio.wait_for(done.wait(), 20)
    agent_server.store.unlisten("s", on_event)
    async with aiohttp.ClientSession() as http:
        resp = await http.delete(url(agent_server, f"/v1/sessions/s/schedules/{schedule['id']}"),
                                 headers=ADMIN)
        assert resp.status == 200

    # A later attach replays it from the log.
    peer = await Peer.connect(agent_server.port)
    await peer.hello()
    await peer.attach("s")
    created = await until_event(peer, "run.created")
    assert created["data"]["trigger"] == "schedule"
    assert created["data"]["input"] == {"text": "scheduled check"}
    await until_event(peer, "stream.end")
    await until_event(peer, "run.state", state="completed")
    await peer.close()


@pytest.mark.parametrize("body", [
    {},
    {"every": 5, "cron": "* * * * *"},
    {"every": "soon"},
    {"every": 0},
    {"cron": "every tuesday"},
    {"cron": "61 * * * *"},
    {"cron": 5},
])
async def test_malformed_schedules_are_refused_and_write_nothing(agent_server: Server,
                                                                 body: dict[str, Any]) -> None:
    head = (await agent_server.store.head("tether.runs")).last_seq
    async with aiohttp.ClientSession() as http:
        resp = await http.post(url(agent_server, "/v1/sessions/s/schedules"), json=body,
                               headers=ADMIN)
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "invalid"
    assert (await agent_server.store.head("tether.runs")).last_seq == head


async def test_webhook_is_signed_and_retried(agent_server: Server) -> None:
    agent_server.scheduler.retry_base = 0.01
    calls: list[tuple[bytes, str]] = []
    got = asyncio.Event()

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        calls.append((body, request.headers.get("X-Tether-Signature", "")))
        if len(calls) == 1:
            return web.Response(status=503)  # the first attempt fails: must be retried
        if orjson.loads(body)["state"] == "completed":
            got.set()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with aiohttp.ClientSession() as http:
            resp = await http.put(url(agent_server, "/v1/sessions/s/webhook"), headers=ADMIN,
                                  json={"url": f"http://127.0.0.1:{port}/hook",
                                        "secret": "hook-secret"})
            assert resp.status == 200
            refused = await http.put(url(agent_server, "/v1/sessions/s/webhook"),
                                     headers={"Authorization": f"Bearer {token()}"},
                                     json={"url": "http://127.0.0.1:1/x"})
            assert refused.status == 403
        peer = await Peer.connect(agent_server.port)
        await peer.hello()
        await peer.publish("s", "message", {"text": "hello"})
        await asyncio.wait_for(got.wait(), 20)
        await peer.close()
    finally:
        await runner.cleanup()
    states = [orjson.loads(body)["state"] for body, _ in calls]
    assert states.count("completed") == 2  # the failed attempt, then its retry
    for body, signature in calls:
        expected = hmac.new(b"hook-secret", body, hashlib.sha256).hexdigest()
        assert signature == f"sha256={expected}"
