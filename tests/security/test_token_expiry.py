"""Streams end when their token expires, on every transport (not only the WebSocket)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.helpers import SECRET, Peer, token
from tether.server import Server, ServerConfig
from tether.store import MemoryStore


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    srv = Server(ServerConfig(port=0, secret=SECRET, data_dir=tmp_path), store=MemoryStore())
    await srv.start()
    yield srv
    await srv.stop()


async def next_data(resp: aiohttp.ClientResponse) -> tuple[str | None, bytes]:
    """The next SSE message with data: (event name, data)."""
    event = None
    while True:
        raw = await asyncio.wait_for(resp.content.readline(), 10)
        assert raw, "the stream ended"
        line = raw.rstrip(b"\n")
        if line.startswith(b"event: "):
            event = line[7:].decode()
        elif line.startswith(b"data: "):
            return event, line[6:]


async def test_sse_and_ag_ui_streams_end_at_token_expiry(server: Server) -> None:
    short = token(ttl=2)
    base = f"http://127.0.0.1:{server.port}/v1/sessions/s"
    async with aiohttp.ClientSession() as http:
        sse = await http.get(f"{base}/stream?token={short}")
        agui = await http.get(f"{base}/agui?token={short}")
        assert sse.status == 200 and agui.status == 200
        assert (await next_data(sse))[0] == "attached"
        event, data = await next_data(sse)  # nothing is published: the next is the expiry
        assert event == "error" and orjson.loads(data)["code"] == "token_expired"
        assert (await asyncio.wait_for(sse.content.read(), 10)).strip() == b""  # it ends
        event, data = await next_data(agui)
        assert orjson.loads(data) == {"type": "RUN_ERROR", "message": "token expired",
                                      "code": "token_expired"}
        assert (await asyncio.wait_for(agui.content.read(), 10)).strip() == b""
    assert server.streams == []


async def test_a_websocket_closes_with_4501_at_token_expiry(server: Server) -> None:
    peer = await Peer.connect(server.port)
    await peer.hello(token(ttl=2))
    await peer.attach("s")
    while True:
        try:
            await peer.recv(10)
        except ConnectionError:
            break
    assert peer.close_code == 4501
    await peer.close()
