"""permessage-deflate as tether negotiates and runs it (tether/server/deflate.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import websockets
from aiohttp import WSMsgType
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory

from tests.helpers import SECRET, Peer, token
from tether.server import Server, ServerConfig, deflate
from tether.server.deflate import DeflateSettings, negotiate
from tether.store import MemoryStore

SETTINGS = DeflateSettings()


@pytest.mark.parametrize(("offer", "header"), [
    ("permessage-deflate; client_max_window_bits",
     "permessage-deflate; server_max_window_bits=10; client_no_context_takeover; "
     "client_max_window_bits=10"),
    ("permessage-deflate",
     "permessage-deflate; server_max_window_bits=10; client_no_context_takeover"),
    ("permessage-deflate; server_max_window_bits=9; client_max_window_bits=12",
     "permessage-deflate; server_max_window_bits=9; client_no_context_takeover; "
     "client_max_window_bits=10"),
    ("permessage-deflate; server_no_context_takeover",
     "permessage-deflate; server_max_window_bits=10; server_no_context_takeover; "
     "client_no_context_takeover"),
    # The first offer cannot be met (zlib has no 256-byte window): the second is taken.
    ("permessage-deflate; server_max_window_bits=8, permessage-deflate",
     "permessage-deflate; server_max_window_bits=10; client_no_context_takeover"),
    ("x-webkit-deflate-frame, permessage-deflate; client_max_window_bits=15",
     "permessage-deflate; server_max_window_bits=10; client_no_context_takeover; "
     "client_max_window_bits=10"),
])
def test_negotiation_accepts(offer: str, header: str) -> None:
    agreement = negotiate(offer, SETTINGS)
    assert agreement is not None
    assert agreement.header == header


@pytest.mark.parametrize("offer", [
    None, "", "x-webkit-deflate-frame", "permessage-deflate; server_max_window_bits",
    "permessage-deflate; server_max_window_bits=20", "permessage-deflate; bogus",
    "permessage-deflate; client_max_window_bits=7",
    "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
])
def test_negotiation_declines(offer: str | None) -> None:
    assert negotiate(offer, SETTINGS) is None


def test_the_installed_aiohttp_runs_tethers_deflate() -> None:
    # If this fails after an aiohttp upgrade, deflate.py's hooks need checking against it.
    assert deflate.SUPPORTED


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="window bits"):
        DeflateSettings(window_bits=8)
    with pytest.raises(ValueError, match="memory level"):
        DeflateSettings(mem_level=0)


async def _request(ws: Any, frame: dict[str, Any], reply: str) -> dict[str, Any]:
    await ws.send(json.dumps(frame))
    while True:
        got = json.loads(await ws.recv())
        if got.get("id") == frame["id"] and got.get("op") in (reply, "error"):
            assert got["op"] == reply, got
            return got


async def test_token_stream_through_websockets_client(server: Server) -> None:
    """The websockets library (the openai SDK's client) negotiates, sends compressed
    fragmented and whole messages, and reads every event back intact."""
    url = f"ws://127.0.0.1:{server.port}/v1/ws"
    async with websockets.connect(url, subprotocols=["tether.v1.json"],  # type: ignore[list-item]
                                  compression="deflate") as ws:
        header = ws.response.headers["Sec-WebSocket-Extensions"]
        assert "server_max_window_bits=10" in header
        assert "client_no_context_takeover" in header
        await _request(ws, {"op": "hello", "id": 1, "token": token()}, "welcome")
        await _request(ws, {"op": "attach", "id": 2, "session": "s"}, "attached")
        texts = [f" token {i} " * (1 + i % 7) for i in range(200)] + ["x" * 30_000]
        for i, text in enumerate(texts):
            frame = json.dumps({"op": "publish", "id": 10 + i, "session": "s",
                                "type": "stream.append", "data": {"stream": "r",
                                                                  "text": text}})
            if i % 50 == 0:  # a fragmented compressed message
                await ws.send([frame[:40], frame[40:90], frame[90:]])
            else:
                await ws.send(frame)
        got: list[str] = []
        while len(got) < len(texts):
            msg = json.loads(await ws.recv())
            if msg.get("op") == "event":
                got.append(msg["data"]["text"])
        assert got == texts


async def test_aiohttp_client_and_idle_release(tmp_path: Path) -> None:
    """aiohttp's client compresses its frames too; after two quiet heartbeats the server has
    dropped its compressor, and the next frames still decode on the client.

    The peer answers pings by hand (autoping off) so the test can count them."""
    config = ServerConfig(port=0, secret=SECRET, data_dir=tmp_path, heartbeat=0.4)
    server = Server(config, store=MemoryStore())
    await server.start()
    peer = await Peer.connect(server.port, compress=15, autoping=False)
    try:
        await peer.hello()
        await peer.attach("s")
        await peer.publish("s", "message", {"text": "before " * 40})
        assert (await peer.events("s", 1))[0]["data"]["text"] == "before " * 40
        conn = next(c for c in server.connections if c.ws.compress)
        writer: Any = conn.ws._writer
        assert writer._compressobj is not None
        pings = 0
        while writer._compressobj is not None:
            # Two heartbeat pings with nothing sent in between release it.
            msg = await peer.ws.receive(10)
            assert msg.type is WSMsgType.PING, msg
            await peer.ws.pong(msg.data)
            pings += 1
            assert pings <= 2
        await peer.send({"op": "publish", "id": 99, "session": "s", "type": "message",
                         "data": {"text": "after " * 40}})
        while True:  # pings may come first
            msg = await peer.ws.receive(10)
            if msg.type is WSMsgType.PING:
                await peer.ws.pong(msg.data)
                continue
            frame = json.loads(msg.data)
            if frame.get("op") == "event":
                assert frame["data"]["text"] == "after " * 40
                break
    finally:
        await peer.close()
        await server.stop()


async def test_oversized_compressed_message_closes_1009(server: Server) -> None:
    url = f"ws://127.0.0.1:{server.port}/v1/ws"
    limit = server.config.max_frame_bytes
    # Highly compressible: small on the wire, past the limit once inflated.
    big = json.dumps({"op": "publish", "id": 1, "session": "s", "type": "m",
                      "data": "a" * (limit + 10)})
    factory = ClientPerMessageDeflateFactory(client_max_window_bits=True)
    async with websockets.connect(url, subprotocols=["tether.v1.json"],  # type: ignore[list-item]
                                  extensions=[factory], compression=None,
                                  max_size=None) as ws:
        await _request(ws, {"op": "hello", "id": 0, "token": token()}, "welcome")
        await ws.send(big)
        with pytest.raises(websockets.ConnectionClosed) as info:
            while True:
                await ws.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009


async def test_compression_off_negotiates_nothing(tmp_path: Path) -> None:
    config = ServerConfig(port=0, secret=SECRET, data_dir=tmp_path, compression=False)
    server = Server(config, store=MemoryStore())
    await server.start()
    try:
        url = f"ws://127.0.0.1:{server.port}/v1/ws"
        async with websockets.connect(url, subprotocols=["tether.v1.json"],  # type: ignore[list-item]
                                      compression="deflate") as ws:
            assert "Sec-WebSocket-Extensions" not in ws.response.headers
            await _request(ws, {"op": "hello", "id": 1, "token": token()}, "welcome")
    finally:
        await server.stop()
