"""The port's front (``tether.server.front``): which connections picows takes, and the head."""

from __future__ import annotations

import asyncio

import pytest

from tether.server import Server, front
from tether.server.front import plain_upgrade

UPGRADE = (b"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
           b"Sec-WebSocket-Protocol: tether.v1.json")


@pytest.mark.parametrize(("head", "compression", "plain"), [
    (UPGRADE, True, True),
    (UPGRADE.replace(b"/v1/ws", b"/v1/ws?x=1"), True, True),
    (UPGRADE.replace(b"tether.v1.json", b"chat, tether.v1.msgpack"), True, True),
    (UPGRADE.replace(b"Upgrade: websocket", b"upgrade: WebSocket"), True, True),
    # permessage-deflate offered: aiohttp negotiates it, unless the server does not offer it
    (UPGRADE + b"\r\nSec-WebSocket-Extensions: permessage-deflate", True, False),
    (UPGRADE + b"\r\nSec-WebSocket-Extensions: permessage-deflate", False, True),
    # refusals stay aiohttp's: none or only unknown subprotocols offered
    (UPGRADE.replace(b"\r\nSec-WebSocket-Protocol: tether.v1.json", b""), True, False),
    (UPGRADE.replace(b"tether.v1.json", b"chat"), True, False),
    # another path, method or version, no upgrade, odd header lines: aiohttp decides
    (UPGRADE.replace(b"/v1/ws", b"/v1/wss"), True, False),
    (UPGRADE.replace(b"GET", b"POST"), True, False),
    (UPGRADE.replace(b"HTTP/1.1", b"HTTP/1.0"), True, False),
    (UPGRADE.replace(b"Upgrade: websocket", b"Upgrade: h2c"), True, False),
    (UPGRADE.replace(b"Host: x", b"Host : x"), True, False),
    (UPGRADE.replace(b"Host: x", b" folded"), True, False),
    (b"GET /healthz HTTP/1.1\r\nHost: x", True, False),
])
def test_which_heads_picows_takes(head: bytes, compression: bool, plain: bool) -> None:
    assert plain_upgrade(head, compression) is plain


async def test_a_head_that_never_ends_is_dropped(server: Server,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(front, "HEAD_TIMEOUT", 0.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /v1/ws HTTP/1.1\r\nHost: x\r\n")  # and nothing more
    assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, nothing answered
    writer.close()


async def test_an_oversized_head_is_answered_by_http(server: Server) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (front.MAX_HEAD + 10)
                 + b"\r\n\r\n")
    status = await asyncio.wait_for(reader.readline(), 10)
    assert status.split(b" ")[1].startswith(b"4"), status  # aiohttp refuses the header
    writer.close()


async def test_http_and_websockets_share_the_port(server: Server) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"HTTP/1.1 200")
    writer.close()
