"""The WebSocket transport's own parts: frame headers written by hand, the upgrade refusals.

The protocol's behaviour end to end is in ``test_ws.py``; these check the pieces under it.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import aiohttp
import pytest

from tests.helpers import Peer, token
from tether.server import Server
from tether.server.hub import ws_frame


def parse_frames(data: bytes) -> list[tuple[int, bytes]]:
    """RFC 6455 server frames (unmasked): (first byte, payload) each."""
    frames = []
    i = 0
    while i < len(data):
        first, second = data[i], data[i + 1]
        assert second & 0x80 == 0, "server frames are not masked"
        n = second & 0x7F
        i += 2
        if n == 126:
            (n,) = struct.unpack("!H", data[i:i + 2])
            i += 2
        elif n == 127:
            (n,) = struct.unpack("!Q", data[i:i + 8])
            i += 8
        frames.append((first, data[i:i + n]))
        i += n
    return frames


@pytest.mark.parametrize("binary", [False, True])
def test_frame_headers_at_every_length_boundary(binary: bool) -> None:
    payloads = [b"x" * n for n in (0, 1, 125, 126, 127, 65535, 65536, 70000)]
    frames = parse_frames(b"".join(ws_frame(p, binary) for p in payloads))
    assert [p for _, p in frames] == payloads
    assert {first for first, _ in frames} == {0x80 | (2 if binary else 1)}


async def test_a_plain_get_is_refused_with_a_json_error(server: Server) -> None:
    async with aiohttp.ClientSession() as http:
        resp = await http.get(f"http://127.0.0.1:{server.port}/v1/ws")
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "invalid"


async def test_an_unsupported_subprotocol_is_refused_before_the_upgrade(server: Server) -> None:
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
            await http.ws_connect(f"http://127.0.0.1:{server.port}/v1/ws",
                                  protocols=["tether.v2.json"])
        assert caught.value.status == 400
        resp = await http.get(f"http://127.0.0.1:{server.port}/v1/ws", headers={
            "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Protocol": "graphql-ws"})
        assert resp.status == 400
        body = await resp.json()
        assert body["error"]["code"] == "invalid" and "tether.v1.json" in body["error"]["message"]


async def test_history_refuses_unknown_query_parameters_and_takes_cursor(
        server: Server) -> None:
    async with aiohttp.ClientSession() as http:
        auth = {"Authorization": f"Bearer {token()}"}
        url = f"http://127.0.0.1:{server.port}/v1/sessions/s/events"
        await http.post(url, json={"type": "message", "data": 1}, headers=auth)
        first = await (await http.get(url, headers=auth)).json()
        cursor = first["events"][0]["cursor"]
        resp = await http.get(url, params={"curser": cursor}, headers=auth)
        body = await resp.json()
        assert resp.status == 400 and "'curser'" in body["error"]["message"]
        assert "after" in body["error"]["message"] and "limit" in body["error"]["message"]
        by_alias = await (await http.get(url, params={"cursor": cursor}, headers=auth)).json()
        by_name = await (await http.get(url, params={"after": cursor}, headers=auth)).json()
        assert by_alias == by_name and by_alias["events"] == []


def _awaiting(coro: Any) -> list[str]:
    """The chain of coroutines ``coro`` awaits, outermost first, by qualified name."""
    names = []
    while coro is not None and hasattr(coro, "cr_code"):
        names.append(coro.cr_code.co_qualname)
        coro = coro.cr_await
    return names


@pytest.mark.parametrize("ws_engine", ["aiohttp", "picows"])
async def test_an_idle_connection_waits_in_one_tether_coroutine_at_most(
        server: Server, ws_engine: str) -> None:
    peer = await Peer.connect(server.port)
    await peer.hello()
    await peer.attach("s")
    chains = [_awaiting(task.get_coro()) for task in asyncio.all_tasks()]
    if ws_engine == "picows":
        # picows calls the connection once per frame: an idle one waits in no coroutine.
        assert not [c for c in chains if any(n.startswith(("PicowsSocket", "Connection"))
                                             for n in c)]
    else:
        # Every coroutine between aiohttp and ws.receive() stays suspended for the
        # connection's life (~0.3 KiB each): the endpoint's handler is the receive loop, and
        # the error middleware adds none of its own for it.
        (chain,) = [c for c in chains if "WebSocketEndpoint.handle" in c]
        handle = chain.index("WebSocketEndpoint.handle")
        assert chain[handle + 1] == "WebSocketResponse.receive"
        assert "error_middleware" not in chain and "_guarded" not in chain
    await peer.close()
