"""Hostile input as an outsider sends it: real server, raw sockets and HTTP."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import msgpack
import pytest

from tests.helpers import SECRET, Peer, nested, token
from tether.protocol.codec import MSGPACK_SUBPROTOCOL
from tether.server import Server, ServerConfig
from tether.store import MemoryStore

AUTH = {"Authorization": f"Bearer {token()}"}


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    # Refills of one token per 20 s: a bucket emptied by a test stays empty however slowly the
    # machine runs the test's next request.
    config = ServerConfig(port=0, secret=SECRET, data_dir=tmp_path, subject_publish_rate=0.05,
                          subject_publish_burst=20, subject_streams=2,
                          subject_connections=3, subject_presence_rate=0.05,
                          subject_presence_burst=3)
    srv = Server(config, store=MemoryStore())
    await srv.start()
    yield srv
    await srv.stop()


async def test_a_deeply_nested_event_is_refused_and_the_session_stays_readable(
        server: Server) -> None:
    base = f"http://127.0.0.1:{server.port}/v1/sessions/s"
    async with aiohttp.ClientSession() as http:
        resp = await http.post(f"{base}/events", json={"type": "message", "data": nested(250)},
                               headers=AUTH)
        assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid"
        resp = await http.post(f"{base}/events", json={"type": "message", "data": nested(30)},
                               headers=AUTH)
        assert resp.status == 201
        history = await http.get(f"{base}/events", headers=AUTH)
        assert history.status == 200 and len((await history.json())["events"]) == 1
    peer = await Peer.connect(server.port)
    await peer.hello()
    reply = await peer.publish("s", data=nested(250))
    assert reply["op"] == "error" and reply["code"] == "invalid"
    await peer.attach("s")
    assert (await peer.events("s", 1))[0]["data"] == nested(30)
    await peer.close()


async def test_messagepack_only_presence_cannot_close_json_bystanders(server: Server) -> None:
    binary = await Peer.connect(server.port, MSGPACK_SUBPROTOCOL)
    await binary.hello()
    await binary.attach("p")
    reply = await binary.request({"op": "presence.set", "session": "p",
                                  "state": {"blob": b"\x00\x01"}}, "presence")
    assert reply["op"] == "error" and reply["code"] == "invalid"
    reply = await binary.request({"op": "presence.set", "session": "p",
                                  "state": {"big": "x" * 10_000}}, "presence")
    assert reply["op"] == "error" and reply["code"] == "too_large"
    bystander = await Peer.connect(server.port)
    await bystander.hello(token("bob"))
    attached = await bystander.attach("p")
    assert attached["op"] == "attached"
    await binary.publish("p", data={"text": "still here"})
    (event,) = await bystander.events("p", 1)
    assert event["data"] == {"text": "still here"}
    await binary.close()
    await bystander.close()
    assert msgpack  # the codec under test


async def test_limits_hold_per_subject_across_connections_and_http(server: Server) -> None:
    peers = [await Peer.connect(server.port) for _ in range(4)]
    for peer in peers[:3]:
        assert (await peer.hello(token("mallory")))["op"] == "welcome"
    with pytest.raises(ConnectionError):  # a fourth connection of the same subject
        await peers[3].hello(token("mallory"))
    assert peers[3].close_code == 4002
    refused = 0
    for i in range(60):  # burst 20 for the subject, whatever the connection
        reply = await peers[i % 3].publish("s", data=i)
        if reply["op"] == "error":
            assert reply["code"] == "rate_limited" and reply["retry_after"] >= 1
            refused += 1
    assert refused > 0
    async with aiohttp.ClientSession() as http:
        resp = await http.post(f"http://127.0.0.1:{server.port}/v1/sessions/s/events",
                               json={"type": "message"},
                               headers={"Authorization": f"Bearer {token('mallory')}"})
        assert resp.status == 429 and "Retry-After" in resp.headers
        streams = [await http.get(f"http://127.0.0.1:{server.port}/v1/sessions/s/stream",
                                  headers={"Authorization": f"Bearer {token('mallory')}"})
                   for _ in range(3)]
        assert [r.status for r in streams] == [200, 200, 429]
        for r in streams:
            r.close()
        # Another subject is not affected.
        resp = await http.post(f"http://127.0.0.1:{server.port}/v1/sessions/s/events",
                               json={"type": "message"}, headers=AUTH)
        assert resp.status == 201
    await peers[0].attach("s")
    presence = [await peers[0].request({"op": "presence.set", "session": "s", "state": {}},
                                       "presence") for _ in range(6)]
    assert any(p["op"] == "error" and p["code"] == "rate_limited" for p in presence)
    for peer in peers:
        await peer.close()


@pytest.mark.parametrize("cursor", ["AAAAAAAAAAAAAA:\u00b2", "AAAAAAAAAAAAAA:1\n", "x:\u0661"])
async def test_cursors_with_unicode_digits_or_newlines_are_bad_cursors(
        server: Server, cursor: str) -> None:
    async with aiohttp.ClientSession() as http:
        resp = await http.get(f"http://127.0.0.1:{server.port}/v1/sessions/s/events",
                              params={"after": cursor}, headers=AUTH)
        assert resp.status == 400 and (await resp.json())["error"]["code"] == "bad_cursor"
    peer = await Peer.connect(server.port)
    await peer.hello()
    reply = await peer.attach("s", cursor)
    assert reply["op"] == "error" and reply["code"] == "bad_cursor"
    assert (await peer.request({"op": "ping"}, "pong"))["op"] == "pong"  # still open
    await peer.close()


async def test_a_session_id_with_a_trailing_newline_is_invalid(server: Server) -> None:
    async with aiohttp.ClientSession() as http:
        resp = await http.post(f"http://127.0.0.1:{server.port}/v1/sessions/demo%0A/events",
                               json={"type": "message"}, headers=AUTH)
        assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid"


@pytest.mark.parametrize("header", ["Forwarded", "X-Forwarded-For", "X-Real-IP"])
async def test_the_dev_login_refuses_proxied_requests(server: Server, header: str) -> None:
    async with aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{server.port}/v1/dev/login"
        resp = await http.post(url, json={"name": "eve"}, headers={header: "203.0.113.9"})
        assert resp.status == 404
        assert "proxy" in (await resp.json())["error"]["message"]
        resp = await http.post(url, json={"name": "eve"})
        assert resp.status == 200


async def test_an_application_event_with_an_odd_run_field_logs_nothing(
        server: Server, caplog: pytest.LogCaptureFixture) -> None:
    peer = await Peer.connect(server.port)
    await peer.hello()
    reply = await peer.publish("s", "run.cancel", {"run": "run_x"})  # builds the run index
    assert reply["code"] == "run_not_found"
    with caplog.at_level(logging.ERROR):
        for odd in ({}, [], 1, None):
            assert (await peer.publish("s", data={"run": odd}))["op"] == "published"
        assert (await peer.request({"op": "ping"}, "pong"))["op"] == "pong"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    await peer.close()


async def test_malformed_http_is_counted_not_logged_as_an_error(
        server: Server, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        for raw in (b"GET /v1/sessions/\xc3\xa9/events HTTP/1.1\r\nHost: x\r\n\r\n",
                    b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n"):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(raw)
            status = await asyncio.wait_for(reader.readline(), 10)
            assert status.split()[1] == b"400"
            writer.close()
        async with aiohttp.ClientSession() as http:
            metrics = await (await http.get(f"http://127.0.0.1:{server.port}/metrics")).text()
    assert 'tether_errors_total{code="bad_http"} 2.0' in metrics
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("forged", ["ds.create", "ds.close", "ds.producer", "ds.message"])
async def test_clients_cannot_forge_a_durable_streams_record(server: Server, forged: str) -> None:
    peer = await Peer.connect(server.port)
    await peer.hello()
    reply = await peer.publish("s", forged, {"content_type": "application/json"})
    assert reply["op"] == "error" and reply["code"] == "forbidden"
    reply = await peer.publish("s", "ds.unknown", {})
    assert reply["op"] == "error" and reply["code"] == "unknown_event_type"
    await peer.close()
