"""One behaviour per operation, whatever the transport.

The same scenario of publishes (good, duplicate, refused) runs over the WebSocket protocol and
over HTTP, each into its own session; the outcomes and the resulting logs must be the same.
Then one log is read through every reading transport (WebSocket attach, HTTP history, SSE) and
the events must be the same.
"""

from __future__ import annotations

from typing import Any

import aiohttp

from tests.helpers import Peer, token
from tests.server.test_http import read_sse
from tether.server import Server

AUTH = {"Authorization": f"Bearer {token(caps=['subscribe', 'publish', 'presence', 'approve'])}"}

# (type, data, key, transient)
SCENARIO: list[tuple[str, Any, str | None, bool]] = [
    ("message", {"text": "hi"}, "k1", False),
    ("message", {"text": "hi"}, "k1", False),  # a retry: the original comes back
    ("stream.append", {"stream": "m1", "text": "Hel"}, None, False),
    ("stream.append", {"stream": "m1", "text": "lo"}, None, False),
    ("stream.end", {"stream": "m1"}, None, False),
    ("stream.append", {"stream": "m1", "text": "late"}, None, False),  # stream_closed
    ("run.state", {"run": "r"}, None, False),  # forbidden: only the server writes it
    ("run.cancel", {"run": "run_nobody"}, None, False),  # run_not_found
    ("run.bogus", {}, None, False),  # unknown_event_type
    ("message", "x" * 300_000, None, False),  # too_large
    ("typing", {"on": True}, None, True),  # transient: fanned out, not stored
    ("chat.reaction", {"emoji": "+1"}, "k2", False),
]


def outcome_of_frame(reply: dict[str, Any]) -> tuple[Any, ...]:
    if reply["op"] == "error":
        return ("error", reply["code"])
    return ("ok", reply["seq"], reply.get("duplicate", False))


def outcome_of_http(status: int, body: dict[str, Any]) -> tuple[Any, ...]:
    if status >= 400:
        return ("error", body["error"]["code"])
    return ("ok", body["seq"], body["duplicate"])


def log_view(events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(e["seq"], e["type"], e["data"], e["sender"]["sub"]) for e in events]


async def history(http: aiohttp.ClientSession, port: int, session: str) -> list[dict[str, Any]]:
    resp = await http.get(f"http://127.0.0.1:{port}/v1/sessions/{session}/events",
                          params={"limit": "1000"}, headers=AUTH)
    assert resp.status == 200
    return list((await resp.json())["events"])


async def test_publish_behaves_the_same_over_websocket_and_http(server: Server) -> None:
    peer = await Peer.connect(server.port)
    await peer.hello(AUTH["Authorization"][7:])
    ws_outcomes = []
    for type_, data, key, transient in SCENARIO:
        frame: dict[str, Any] = {"type": type_, "data": data, "transient": transient}
        if key:
            frame["key"] = key
        ws_outcomes.append(outcome_of_frame(await peer.publish("over-ws", **frame)))
    await peer.close()

    http_outcomes = []
    async with aiohttp.ClientSession() as http:
        for type_, data, key, transient in SCENARIO:
            body: dict[str, Any] = {"type": type_, "data": data, "transient": transient}
            if key:
                body["key"] = key
            resp = await http.post(
                f"http://127.0.0.1:{server.port}/v1/sessions/over-http/events", json=body,
                headers=AUTH)
            http_outcomes.append(outcome_of_http(resp.status, await resp.json()))
        ws_log = await history(http, server.port, "over-ws")
        http_log = await history(http, server.port, "over-http")

    assert ws_outcomes == http_outcomes
    assert [o[1] for o in ws_outcomes if o[0] == "error"] == [
        "stream_closed", "forbidden", "run_not_found", "unknown_event_type", "too_large"]
    assert log_view(ws_log) == log_view(http_log)
    assert [e["type"] for e in ws_log] == ["message", "stream.append", "stream.append",
                                           "stream.end", "chat.reaction"]
    assert ws_log[3]["data"]["text"] == "Hello"


async def test_one_log_reads_the_same_through_every_transport(server: Server) -> None:
    async with aiohttp.ClientSession() as http:
        for i in range(12):
            await http.post(f"http://127.0.0.1:{server.port}/v1/sessions/read/events",
                            json={"type": "message", "data": {"i": i}}, headers=AUTH)
        over_http = await history(http, server.port, "read")
        resp = await http.get(f"http://127.0.0.1:{server.port}/v1/sessions/read/stream",
                              headers=AUTH)
        over_sse = [m["data"] for m in await read_sse(resp, 12)]
        resp.close()
    peer = await Peer.connect(server.port)
    await peer.hello(AUTH["Authorization"][7:])
    attached = await peer.attach("read")
    assert attached["resumed"] is True
    over_ws = await peer.events("read", 12)
    await peer.close()
    assert len(over_http) == 12
    assert log_view(over_http) == log_view(over_sse) == log_view(over_ws)
    assert [e["cursor"] for e in over_http] == [e["cursor"] for e in over_ws]
