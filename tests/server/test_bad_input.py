"""Bad input never costs data: every malformed request gets its documented answer, is counted,
and leaves the log and the other clients intact."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
import msgpack
import pytest

from tests.helpers import BOTH_WS_ENGINES, SECRET, Peer, RawSocketPeer, token
from tether.protocol.codec import MSGPACK_SUBPROTOCOL
from tether.protocol.codes import CloseCode
from tether.server import Server
from tether.server.auth import issue_token

# The WebSocket contract holds on both engines (tether/server/front.py).
pytestmark = BOTH_WS_ENGINES


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for a server-side effect that follows what the client already saw."""
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.005)
    await asyncio.wait_for(poll(), timeout)


async def close_code_of(peer: RawSocketPeer) -> int | None:
    """Read until the server closes the socket: the code it closed with."""
    with pytest.raises(ConnectionError):
        while True:
            await peer.recv()
    return peer.close_code


def counted(server: Server, code: str) -> float:
    return float(server.metrics.errors.labels(code)._value.get())


@pytest.fixture
async def bystander(server: Server):  # type: ignore[no-untyped-def]
    """A well-behaved client on the same server, with one committed event."""
    peer = await Peer.connect(server.port)
    await peer.hello()
    await peer.attach("s")
    await peer.publish("s", "message", "before")
    await peer.events("s", 1)
    yield peer
    # Unaffected: it still publishes and receives, and the log holds exactly its events.
    reply = await peer.publish("s", "message", "after")
    assert reply["op"] == "published"
    assert [e["data"] for e in await peer.events("s", 1)] == ["after"]
    assert [e.data for e in await server.store.read("s", 0, 100)] == ["before", "after"]
    await peer.close()


REQUEST_ERRORS = [
    # (raw frame sent after hello, expected error code)
    ('{"op": "publish", "session": "s", "type": "message", "data": ', "bad_frame"),
    ("[1, 2, 3]", "bad_frame"),
    ('{"op": "teleport", "id": 7}', "unknown_frame"),
    ('{"id": 8}', "bad_frame"),
    ('{"op": "attach", "id": 9, "session": "s", "cursor": "not-a-cursor"}', "bad_cursor"),
    ('{"op": "attach", "id": 9, "session": "s", "cursor": 42}', "bad_cursor"),
    ('{"op": "attach", "id": 10, "session": "bad session id!"}', "invalid"),
    ('{"op": "publish", "id": 11, "session": "s", "type": "run.explode", "data": 1}',
     "unknown_event_type"),
    ('{"op": "publish", "id": 12, "session": "s", "type": "9lives", "data": 1}', "invalid"),
    ('{"op": "publish", "id": 13, "session": "s", "type": "stream.append", "data": {}}',
     "invalid"),
    ('{"op": "publish", "id": 14, "session": "s", "type": "message", "transient": "yes"}',
     "invalid"),
    ('{"op": "detach", "id": 15, "session": "never-attached"}', "not_attached"),
    ('{"op": "ack", "id": 16, "session": "s", "cursor": "AAAAAAAA:1"}', "not_attached"),
    ('{"op": "hello", "id": 17, "token": "again"}', "invalid"),
]


@pytest.mark.parametrize(("raw", "code"), REQUEST_ERRORS)
async def test_request_errors_keep_the_connection(server: Server, bystander: Peer, raw: str,
                                                  code: str) -> None:
    peer = await Peer.connect(server.port)
    await peer.hello()
    before = counted(server, code)
    await peer.ws.send_str(raw)
    error = await peer.expect("error")
    assert error["code"] == code and error["message"]
    assert counted(server, code) == before + 1
    assert (await peer.request({"op": "ping"}, "pong"))["op"] == "pong"
    await peer.close()


async def test_malformed_msgpack(server: Server, bystander: Peer) -> None:
    peer = await Peer.connect(server.port, MSGPACK_SUBPROTOCOL)
    await peer.hello()
    await peer.ws.send_bytes(b"\xc1\xff\x00garbage")
    assert (await peer.expect("error"))["code"] == "bad_frame"
    await peer.ws.send_bytes(msgpack.packb([1, 2]))
    assert (await peer.expect("error"))["code"] == "bad_frame"
    await peer.ws.send_str('{"op": "ping"}')  # text on a binary codec
    assert (await peer.expect("error"))["code"] == "bad_frame"
    await peer.close()


async def test_publish_before_hello(server: Server, bystander: Peer) -> None:
    peer = await Peer.connect(server.port)
    reply = await peer.publish("s", "message", "sneaky")
    assert reply["code"] == "not_ready"
    reply = await peer.attach("s")
    assert reply["code"] == "not_ready"
    assert counted(server, "not_ready") >= 2
    await peer.close()


async def test_oversized_frame_closes_with_1009(server: Server, bystander: Peer) -> None:
    server.config.max_frame_bytes = 64 << 10
    peer = await Peer.connect(server.port)
    await peer.hello()
    # The server's aiohttp limit was fixed at connection time from the config; exceed it.
    await peer.ws.send_str('{"op":"publish","session":"s","type":"message","data":"'
                           + "x" * (2 << 20) + '"}')
    with pytest.raises(ConnectionError):
        while True:
            await peer.recv()
    assert peer.close_code == 1009
    await until(lambda: counted(server, "frame_too_large") == 1)
    await peer.close()


async def test_oversized_fragmented_message_closes_with_1009(server: Server,
                                                            bystander: Peer) -> None:
    server.config.max_frame_bytes = 64 << 10
    peer = await RawSocketPeer.connect(server.port)
    await peer.send({"op": "hello", "id": 1, "token": token()})
    assert (await peer.recv())["op"] == "welcome"
    # Each fragment is within the limit; the message they make is not.
    await peer.send_frame(0x1, b'{"op":"publish","session":"s","type":"message","data":"',
                          fin=False)
    for _ in range(2):
        await peer.send_frame(0x0, b"x" * (40 << 10), fin=False)
    assert await close_code_of(peer) == 1009
    await until(lambda: counted(server, "frame_too_large") == 1)
    peer.close()


async def test_text_that_is_not_utf8_closes_with_1007(server: Server, bystander: Peer) -> None:
    peer = await RawSocketPeer.connect(server.port)
    await peer.send_frame(0x1, b'{"op":"ping","id":"\xff"}')
    assert await close_code_of(peer) == 1007
    await until(lambda: counted(server, "ws_protocol") == 1)
    peer.close()


async def test_reserved_bits_without_an_extension_close_with_1002(server: Server,
                                                                  bystander: Peer) -> None:
    peer = await RawSocketPeer.connect(server.port)  # offers no permessage-deflate
    await peer.send_frame(0x40 | 0x1, b'{"op":"ping","id":1}')  # RSV1: "compressed"
    assert await close_code_of(peer) == 1002
    await until(lambda: counted(server, "ws_protocol") == 1)
    peer.close()


async def test_oversized_event_is_a_request_error(server: Server, bystander: Peer) -> None:
    server.config.max_event_bytes = 1000
    peer = await Peer.connect(server.port)
    await peer.hello()
    reply = await peer.publish("s", "message", "x" * 2000)
    assert reply["code"] == "too_large"
    await peer.close()


@pytest.mark.parametrize(("tok", "close_code", "counter"), [
    (None, CloseCode.UNAUTHORIZED, "unauthorized"),
    ("not.a.jwt", CloseCode.UNAUTHORIZED, "unauthorized"),
    (issue_token("wrong-secret-" + "y" * 32, "mallory", ["*"], ["admin"]),
     CloseCode.UNAUTHORIZED, "unauthorized"),
    (issue_token(SECRET, "alice", ["*"], ["subscribe"], ttl=-10), CloseCode.TOKEN_EXPIRED,
     "token_expired"),
])
async def test_bad_tokens_are_refused_with_documented_codes(
    server: Server, bystander: Peer, tok: str | None, close_code: int, counter: str
) -> None:
    peer = await Peer.connect(server.port)
    before = counted(server, counter)
    await peer.send({"op": "hello", "id": 1, "token": tok})
    with pytest.raises(ConnectionError):
        while True:
            await peer.recv()
    assert peer.close_code == close_code
    await until(lambda: counted(server, counter) == before + 1)
    await peer.close()


async def test_forged_token_with_edited_claims(server: Server, bystander: Peer) -> None:
    header, _, signature = token("alice", ["s"], ["subscribe"]).split(".")
    import base64

    import orjson
    claims = base64.urlsafe_b64encode(orjson.dumps(
        {"sub": "alice", "sessions": ["*"], "caps": ["admin"]})).rstrip(b"=").decode()
    peer = await Peer.connect(server.port)
    await peer.send({"op": "hello", "id": 1, "token": f"{header}.{claims}.{signature}"})
    with pytest.raises(ConnectionError):
        while True:
            await peer.recv()
    assert peer.close_code == CloseCode.UNAUTHORIZED
    await peer.close()


async def test_missing_capability_is_an_error_frame(server: Server, bystander: Peer) -> None:
    peer = await Peer.connect(server.port)
    await peer.hello(token("reader", ["s"], ["subscribe"]))
    await peer.attach("s")
    reply = await peer.publish("s", "message", "nope")
    assert reply["code"] == "forbidden"
    reply = await peer.attach("elsewhere")
    assert reply["code"] == "forbidden"
    assert (await peer.request({"op": "ping"}, "pong"))["op"] == "pong"
    await peer.close()


HTTP_CASES = [
    (b"{not json", "bad_frame", 400),
    (b"[]", "invalid", 400),
    (b'{"type": 5}', "invalid", 400),
    (b'{"type": "tool.unknown", "data": 1}', "unknown_event_type", 400),
    (b'{"type": "message", "key": ""}', "invalid", 400),
]


@pytest.mark.parametrize(("body", "code", "status"), HTTP_CASES)
async def test_http_publish_with_bad_body(server: Server, bystander: Peer, body: bytes,
                                          code: str, status: int) -> None:
    before = counted(server, code)
    async with aiohttp.ClientSession() as http:
        resp = await http.post(f"http://127.0.0.1:{server.port}/v1/sessions/s/events",
                               data=body, headers={"Authorization": f"Bearer {token()}"})
        assert resp.status == status
        assert (await resp.json())["error"]["code"] == code
    assert counted(server, code) == before + 1


async def test_http_without_token(server: Server, bystander: Peer) -> None:
    async with aiohttp.ClientSession() as http:
        resp = await http.post(f"http://127.0.0.1:{server.port}/v1/sessions/s/events",
                               json={"type": "message"})
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == "unauthorized"
