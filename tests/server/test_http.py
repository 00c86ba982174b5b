"""HTTP API: publish, history pages, SSE with Last-Event-ID resume, health and metrics."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson

from tests.helpers import Peer, token
from tether.server import Server

AUTH = {"Authorization": f"Bearer {token()}"}


async def publish(http: aiohttp.ClientSession, port: int, session: str, body: dict[str, Any]
                  ) -> tuple[int, dict[str, Any]]:
    resp = await http.post(f"http://127.0.0.1:{port}/v1/sessions/{session}/events", json=body,
                           headers=AUTH)
    return resp.status, await resp.json()


async def test_http_publish_is_delivered_on_websocket_and_idempotent(server: Server) -> None:
    peer = await Peer.connect(server.port)
    await peer.hello()
    await peer.attach("s")
    async with aiohttp.ClientSession() as http:
        status, body = await publish(http, server.port, "s",
                                     {"type": "message", "data": {"t": 1}, "key": "k1"})
        assert status == 201 and body["seq"] == 1 and body["duplicate"] is False
        status, again = await publish(http, server.port, "s",
                                      {"type": "message", "data": {"t": 1}, "key": "k1"})
        assert status == 200 and again["duplicate"] is True and again["cursor"] == body["cursor"]
    (event,) = await peer.events("s", 1)
    assert event["cursor"] == body["cursor"] and event["data"] == {"t": 1}
    await peer.close()


async def test_history_pages_follow_the_cursor(server: Server) -> None:
    async with aiohttp.ClientSession() as http:
        for i in range(25):
            await publish(http, server.port, "s", {"type": "message", "data": i})
        seen: list[int] = []
        after = ""
        while True:
            resp = await http.get(f"http://127.0.0.1:{server.port}/v1/sessions/s/events",
                                  params={"after": after, "limit": "10"}, headers=AUTH)
            page = await resp.json()
            assert page["resumed"] is True
            seen += [e["data"] for e in page["events"]]
            after = page["cursor"]
            if not page["more"]:
                break
        assert seen == list(range(25))
        assert page["head"] == page["cursor"]


async def test_history_compact_drops_ended_stream_deltas(server: Server) -> None:
    async with aiohttp.ClientSession() as http:
        for text in ["a", "b", "c"]:
            await publish(http, server.port, "s",
                          {"type": "stream.append", "data": {"stream": "m", "text": text}})
        await publish(http, server.port, "s", {"type": "stream.end", "data": {"stream": "m"}})
        resp = await http.get(f"http://127.0.0.1:{server.port}/v1/sessions/s/events",
                              params={"compact": "true"}, headers=AUTH)
        events = (await resp.json())["events"]
        assert [(e["type"], e["data"]["text"]) for e in events] == [("stream.end", "abc")]


async def read_sse(resp: aiohttp.ClientResponse, count: int) -> list[dict[str, Any]]:
    """Parse ``count`` SSE messages carrying events (with an id)."""
    messages: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    while len(messages) < count:
        line = (await asyncio.wait_for(resp.content.readline(), 10)).decode().rstrip("\n")
        if not line:
            if "id" in current:
                messages.append(current)
            current = {}
        elif line.startswith("id: "):
            current["id"] = line[4:]
        elif line.startswith("data: "):
            current["data"] = orjson.loads(line[6:])
        elif line.startswith("event: "):
            current["event"] = line[7:]
    return messages


async def test_sse_stream_resumes_with_last_event_id(server: Server) -> None:
    async with aiohttp.ClientSession() as http:
        for i in range(5):
            await publish(http, server.port, "s", {"type": "message", "data": i})
        url = f"http://127.0.0.1:{server.port}/v1/sessions/s/stream?token={token()}"
        resp = await http.get(url)
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        first = await read_sse(resp, 3)
        assert [m["data"]["data"] for m in first] == [0, 1, 2]
        assert first[2]["id"] == first[2]["data"]["cursor"]
        resp.close()
        resp = await http.get(url, headers={"Last-Event-ID": first[2]["id"]})
        await publish(http, server.port, "s", {"type": "message", "data": 5})
        rest = await read_sse(resp, 3)
        assert [m["data"]["data"] for m in rest] == [3, 4, 5]
        resp.close()


async def test_sse_refuses_bad_token_and_foreign_cursor(server: Server) -> None:
    async with aiohttp.ClientSession() as http:
        resp = await http.get(f"http://127.0.0.1:{server.port}/v1/sessions/s/stream")
        assert resp.status == 401
        _, other = await publish(http, server.port, "other", {"type": "message"})
        resp = await http.get(f"http://127.0.0.1:{server.port}/v1/sessions/s/stream",
                              headers={**AUTH, "Last-Event-ID": other["cursor"]})
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "bad_cursor"


async def test_healthz_and_metrics(server: Server) -> None:
    peer = await Peer.connect(server.port)
    await peer.hello()
    await peer.attach("s")
    await peer.publish("s", "message", 1)
    await peer.events("s", 1)
    async with aiohttp.ClientSession() as http:
        resp = await http.get(f"http://127.0.0.1:{server.port}/healthz")
        assert resp.status == 200 and (await resp.json())["status"] == "ok"
        text = await (await http.get(f"http://127.0.0.1:{server.port}/metrics")).text()
    for name in ("tether_connections{transport=\"ws\"} 1.0", "tether_frames_total",
                 "tether_bytes_total", "tether_publish_deliver_seconds_bucket",
                 "tether_store_batch_size", "tether_buffer_overflows_total",
                 "tether_events_delivered_total"):
        assert name in text, name
    await peer.close()
