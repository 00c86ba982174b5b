"""The WebSocket endpoint end to end, on a real socket, spoken by a raw peer."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
import orjson
import pytest
from aiohttp import web

from tests.helpers import BOTH_WS_ENGINES, Peer, RawSocketPeer, token
from tether.protocol.codec import MSGPACK_SUBPROTOCOL
from tether.protocol.codes import CloseCode
from tether.protocol.cursor import Cursor, new_epoch
from tether.protocol.events import Event
from tether.server import Server

# The WebSocket contract holds on both engines (tether/server/front.py).
pytestmark = BOTH_WS_ENGINES


async def test_publish_is_acknowledged_and_fanned_out_with_the_same_bytes(server: Server) -> None:
    peers = [await Peer.connect(server.port) for _ in range(3)]
    for p in peers:
        await p.hello()
        attached = await p.attach("demo")
        assert attached["resumed"] is True and attached["cursor"].endswith(":0")
    published = await peers[0].publish("demo", "message", {"text": "hi"})
    assert published["seq"] == 1 and published["duplicate"] is False
    raws = []
    for p in peers:
        (event,) = await p.events("demo", 1)
        assert event["cursor"] == published["cursor"]
        assert event["data"] == {"text": "hi"} and event["sender"]["sub"] == "alice"
        raws.append(event)
    assert raws[0] == raws[1] == raws[2]
    for p in peers:
        await p.close()


async def test_resume_from_cursor_delivers_exactly_the_missed_events(server: Server) -> None:
    writer = await Peer.connect(server.port)
    await writer.hello()
    cursors = [(await writer.publish("s", "message", i))["cursor"] for i in range(10)]
    reader = await Peer.connect(server.port)
    await reader.hello()
    attached = await reader.attach("s", cursors[4])
    assert attached["resumed"] is True and attached["cursor"] == cursors[4]
    missed = await reader.events("s", 5)
    assert [e["data"] for e in missed] == [5, 6, 7, 8, 9]
    await writer.publish("s", "message", 10)
    (live,) = await reader.events("s", 1)
    assert live["seq"] == 11
    await writer.close()
    await reader.close()


async def test_resume_across_live_traffic_has_no_gap_and_no_duplicate(server: Server) -> None:
    writer = await Peer.connect(server.port)
    await writer.hello()
    for i in range(20):
        await writer.publish("s", "message", i)
    reader = await Peer.connect(server.port)
    await reader.hello()
    head = (await writer.publish("s", "message", 20))["cursor"]
    epoch = head.split(":")[0]

    async def publish_more() -> None:
        for i in range(21, 45):
            await writer.send({"op": "publish", "session": "s", "type": "message", "data": i})

    # Attach while publishes are in flight: history and live overlap and must merge.
    task = asyncio.create_task(publish_more())
    await reader.attach("s", f"{epoch}:3")
    await task
    events = await reader.events("s", 45 - 3)
    assert [e["seq"] for e in events] == list(range(4, 46))
    await writer.close()
    await reader.close()


async def test_cursor_older_than_retention_is_resumed_false_with_snapshot(server: Server) -> None:
    writer = await Peer.connect(server.port)
    await writer.hello()
    first = (await writer.publish("s", "message", 0))["cursor"]
    for i in range(1, 80):  # the fixture keeps 50 events
        await writer.publish("s", "message", i)
    reader = await Peer.connect(server.port)
    await reader.hello()
    attached = await reader.attach("s", first)
    assert attached["resumed"] is False
    assert attached["reason"] == "cursor_expired"
    snapshot = attached["snapshot"]
    assert snapshot["events"][-1]["seq"] == 80
    assert attached["cursor"].endswith(":80")
    assert any(m["sub"] == "alice" for m in snapshot["presence"])
    await writer.publish("s", "message", 80)
    (live,) = await reader.events("s", 1)
    assert live["seq"] == 81
    assert server.metrics.resumes.labels("false")._value.get() >= 1
    await writer.close()
    await reader.close()


async def test_cursor_from_another_epoch_is_resumed_false(server: Server) -> None:
    peer = await Peer.connect(server.port)
    await peer.hello()
    await peer.publish("s", "message", "x")
    stale = str(Cursor(new_epoch("s"), 1))
    attached = await peer.attach("s", stale)
    assert attached["resumed"] is False and attached["reason"] == "epoch_changed"
    assert [e["data"] for e in attached["snapshot"]["events"]] == ["x"]
    await peer.close()


async def test_cursor_from_another_session_is_an_error_not_data(server: Server) -> None:
    peer = await Peer.connect(server.port)
    await peer.hello()
    other = (await peer.publish("other", "message", "secret"))["cursor"]
    reply = await peer.attach("s", other)
    assert reply["op"] == "error" and reply["code"] == "bad_cursor"
    ahead = await peer.attach("other", other.split(":")[0] + ":99")
    assert ahead["op"] == "error" and ahead["code"] == "bad_cursor"
    # The connection is kept and works.
    assert (await peer.attach("other", other))["resumed"] is True
    await peer.close()


async def test_token_stream_compacts_into_the_end_event(server: Server) -> None:
    peer = await Peer.connect(server.port)
    await peer.hello()
    deltas = ["Hel", "lo ", "wör", "ld 🎉"]
    for d in deltas:
        await peer.publish("s", "stream.append", {"stream": "m1", "text": d})
    end = await peer.publish("s", "stream.end", {"stream": "m1"})
    assert end["op"] == "published"
    late = await peer.publish("s", "stream.append", {"stream": "m1", "text": "x"})
    assert late["op"] == "error" and late["code"] == "stream_closed"
    watcher = await Peer.connect(server.port)
    await watcher.hello()
    attached = await watcher.attach("s", str(Cursor(new_epoch("s"), 1)))  # force a snapshot
    events = attached["snapshot"]["events"]
    assert [e["type"] for e in events] == ["stream.end"]
    assert events[0]["data"]["text"].encode() == "".join(deltas).encode()
    await peer.close()
    await watcher.close()


async def test_msgpack_codec_round_trip(server: Server) -> None:
    peer = await Peer.connect(server.port, MSGPACK_SUBPROTOCOL)
    await peer.hello()
    await peer.attach("s")
    reply = await peer.publish("s", "message", {"n": [1, 2, 3], "t": "ü"})
    assert reply["op"] == "published"
    (event,) = await peer.events("s", 1)
    assert event["data"] == {"n": [1, 2, 3], "t": "ü"}
    await peer.close()


async def test_several_sessions_on_one_connection(server: Server) -> None:
    peer = await Peer.connect(server.port)
    await peer.hello()
    await peer.attach("a")
    await peer.attach("b")
    await peer.publish("a", "message", "to a")
    await peer.publish("b", "message", "to b")
    assert [e["data"] for e in await peer.events("a", 1)] == ["to a"]
    assert [e["data"] for e in await peer.events("b", 1)] == ["to b"]
    detached = await peer.request({"op": "detach", "session": "a"}, "detached")
    assert detached["op"] == "detached"
    await peer.publish("a", "message", "unseen")
    await peer.publish("b", "message", "seen")
    assert [e["data"] for e in await peer.events("b", 1)] == ["seen"]
    assert not [f for f in peer.frames if f.get("op") == "event" and f["session"] == "a"]
    await peer.close()


async def test_presence_join_update_leave(server: Server) -> None:
    alice = await Peer.connect(server.port)
    await alice.hello(client="alice-laptop", device="laptop")
    await alice.attach("s")
    bob = await Peer.connect(server.port)
    await bob.hello(token("bob"), client="bob-phone")
    await bob.attach("s")
    joined = await alice.expect("presence", action="join")
    if joined["members"][0]["sub"] == "alice":  # her own join, fanned out to her too
        joined = await alice.expect("presence", action="join")
    assert joined["members"][0]["sub"] == "bob"
    await bob.request({"op": "presence.set", "session": "s", "state": {"typing": True}},
                      "presence")
    update = await alice.expect("presence", action="update")
    assert update["members"][0]["state"] == {"typing": True}
    await bob.close()
    left = await alice.expect("presence", action="leave")
    assert left["members"][0]["client"] == "bob-phone"
    await alice.close()


async def test_transient_events_are_fanned_out_not_stored(server: Server) -> None:
    a = await Peer.connect(server.port)
    await a.hello()
    await a.attach("s")
    b = await Peer.connect(server.port)
    await b.hello()
    await b.attach("s")
    reply = await a.publish("s", "typing", {"on": True}, transient=True)
    assert reply["op"] == "published" and reply["cursor"] is None
    event = await b.expect("event", type="typing")
    assert event["transient"] is True
    assert (await server.store.head("s")).last_seq == 0
    await a.close()
    await b.close()


async def test_session_limit_and_rate_limit(server: Server) -> None:
    server.config.max_sessions_per_connection = 2
    server.config.publish_burst = 5
    server.config.publish_rate = 0.001
    peer = await Peer.connect(server.port)
    await peer.hello()
    await peer.attach("a")
    await peer.attach("b")
    reply = await peer.attach("c")
    assert reply["code"] == "too_many_sessions"
    codes = [(await peer.publish("a", "message", i)).get("code") for i in range(7)]
    assert codes[:5] == [None] * 5
    assert codes[5:] == ["rate_limited", "rate_limited"]
    await peer.close()


async def test_no_subprotocol_is_closed_with_documented_code(server: Server) -> None:
    # Offering only unsupported ones is refused before the upgrade (test_connection.py).
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"http://127.0.0.1:{server.port}/v1/ws")
        msg = await ws.receive()
        assert msg.type == aiohttp.WSMsgType.CLOSE
        assert ws.close_code == CloseCode.UNSUPPORTED_CODEC


async def test_hello_timeout_closes(server: Server) -> None:
    server.config.hello_timeout = 0.05
    peer = await Peer.connect(server.port)
    with pytest.raises(ConnectionError):
        await peer.recv()
    assert peer.close_code == CloseCode.HELLO_TIMEOUT
    await peer.close()


async def test_shutdown_closes_with_reconnect_code(server: Server) -> None:
    peer = await Peer.connect(server.port)
    await peer.hello()
    stopping = asyncio.create_task(server.stop())
    with contextlib.suppress(ConnectionError):
        while True:
            await peer.recv()
    await stopping
    assert peer.close_code == CloseCode.SHUTDOWN
    await peer.close()


async def test_peer_that_misses_pongs_is_dropped(server: Server) -> None:
    server.config.heartbeat = 0.2
    peer = await Peer.connect(server.port, autoping=False)
    await peer.hello()
    # Never answer pings: the server must give up on this peer.
    with pytest.raises(ConnectionError):
        while True:
            msg = await asyncio.wait_for(peer.ws.receive(), 10)
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                            aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.ERROR):
                raise ConnectionError
    await peer.close()
    assert not server.connections


async def test_peer_that_answers_pings_stays_and_its_socket_stays_compact(
        server: Server) -> None:
    server.config.heartbeat = 0.2
    peer = await Peer.connect(server.port, autoping=False)
    await peer.hello()
    pings = 0
    while pings < 3:
        msg = await asyncio.wait_for(peer.ws.receive(), 10)
        assert msg.type == aiohttp.WSMsgType.PING, msg
        pings += 1
        await peer.ws.pong(msg.data)
    (conn,) = server.connections
    assert not conn.ws.closed
    if isinstance(conn.ws, web.WebSocketResponse):
        # The heartbeat's per-ping state lives in slots: set in the instance's attributes, it
        # would move an idle socket's 29 attributes from CPython's compact shared-key array
        # to a 1.5 KiB dictionary at its first ping (deflate.LeanWebSocketResponse).
        assert not {"_pong_response_cb", "_ping_task"} & set(vars(conn.ws))
    await peer.close()


async def test_token_expiry_closes_a_live_connection(server: Server) -> None:
    peer = await Peer.connect(server.port)
    await peer.hello(token(ttl=1))
    with pytest.raises(ConnectionError):
        while True:
            await peer.recv()
    assert peer.close_code == CloseCode.TOKEN_EXPIRED
    await peer.close()


async def test_too_many_errors_in_a_row_closes(server: Server) -> None:
    server.config.max_errors_in_row = 5
    peer = await Peer.connect(server.port)
    await peer.hello()
    for _ in range(5):
        await peer.ws.send_str("nonsense")
    with pytest.raises(ConnectionError):
        while True:
            await peer.recv()
    assert peer.close_code == CloseCode.TOO_MANY_ERRORS
    await peer.close()


async def test_a_lost_live_event_is_healed_from_the_log(server: Server) -> None:
    """An at-most-once live channel (Redis pub/sub) may drop events; the log may not."""
    peer = await Peer.connect(server.port)
    await peer.hello()
    await peer.attach("s")
    channel = server.hub.channels["s"]
    deliver = channel.on_event
    dropped: list[int] = []

    def lossy(event: Event) -> None:
        if event.seq in (2, 5):  # lose one in the middle and the last one
            dropped.append(event.seq)
            return
        deliver(event)

    server.store.unlisten("s", deliver)
    server.store.listen("s", lossy)
    writer = await Peer.connect(server.port)
    await writer.hello()
    for i in range(5):
        await writer.publish("s", "message", i)
    got = await peer.events("s", 4)  # seq 2 is healed at the gap, seq 5 not yet
    assert [e["seq"] for e in got] == [1, 2, 3, 4]
    await server.hub.check_tails()  # first pass: notes the head
    await server.hub.check_tails()  # second pass: still behind it, read the store
    (last,) = await peer.events("s", 1)
    assert last["seq"] == 5 and dropped == [2, 5]
    server.store.unlisten("s", lossy)
    await peer.close()
    await writer.close()


async def test_a_fragmented_message_is_one_request(server: Server) -> None:
    peer = await RawSocketPeer.connect(server.port)
    await peer.send({"op": "hello", "id": 1, "token": token()})
    assert (await peer.recv())["op"] == "welcome"
    body = orjson.dumps({"op": "publish", "id": 2, "session": "s", "type": "message",
                         "data": {"text": "é" * 100}})
    cut = body.index("é".encode()) + 1  # inside a UTF-8 sequence: only the whole is text
    await peer.send_frame(0x1, body[:10], fin=False)
    await peer.send_frame(0x0, body[10:cut], fin=False)
    await peer.send_frame(0x0, body[cut:])
    reply = await peer.recv()
    assert reply["op"] == "published" and reply["id"] == 2 and reply["seq"] == 1
    (event,) = await server.store.read("s", 0, 10)
    assert event.data == {"text": "é" * 100}
    peer.close()


async def test_pipelined_requests_are_answered_in_order(server: Server) -> None:
    """Requests written back to back (one TCP write) are handled one after another: what
    follows hello is handled after it (else: not_ready), a publish behind an attach waits for
    the attach, which awaits the store. (Replies to publishes come at their commit.)"""
    peer = await RawSocketPeer.connect(server.port)
    frames = [{"op": "hello", "id": 1, "token": token()},
              {"op": "attach", "id": 2, "session": "s"},
              {"op": "publish", "id": 3, "session": "s", "type": "message", "data": 1},
              {"op": "ping", "id": 4},
              {"op": "publish", "id": 5, "session": "s", "type": "message", "data": 2}]
    payloads = [orjson.dumps(f) for f in frames]
    await peer.send_frames([(0x1, p) for p in payloads])
    replies: list[tuple[int, str]] = []
    while len(replies) < 5:
        frame = await peer.recv()
        if "id" in frame:
            replies.append((frame["id"], frame["op"]))
    assert replies[:2] == [(1, "welcome"), (2, "attached")]
    assert dict(replies) == {1: "welcome", 2: "attached", 3: "published", 4: "pong",
                             5: "published"}
    assert [e.data for e in await server.store.read("s", 0, 10)] == [1, 2]
    peer.close()


async def test_shutdown_closes_a_socket_before_its_hello(server: Server) -> None:
    peer = await Peer.connect(server.port)
    await server.stop()
    with pytest.raises(ConnectionError):
        await peer.recv()
    assert peer.close_code == CloseCode.SHUTDOWN
    await peer.close()
