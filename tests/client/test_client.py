"""The asyncio client against a real in-process server."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohttp import WSMsgType, web

import tether
from tether.client import (
    AttachError,
    Client,
    ClientClosed,
    ConnectionFailed,
    ConnectionState,
    PublishError,
    SessionClosed,
    SessionEvent,
    Snapshot,
    ws_url,
)
from tether.protocol.codes import CloseCode
from tether.protocol.cursor import new_epoch
from tether.server import Server
from tether.store import MemoryStore

from .conftest import (
    SECRET,
    client_for,
    drop_connections,
    fake_server,
    make_server,
    take,
    take_events,
    token,
    until,
)


def test_package_exports() -> None:
    assert tether.Client is Client
    assert {"SyncClient", "Cursor", "SessionEvent", "Snapshot", "ConnectionState",
            "PublishError", "ConnectionFailed"} <= set(tether.__all__)


def test_url_normalisation() -> None:
    assert ws_url("ws://h:1") == "ws://h:1/v1/ws"
    assert ws_url("ws://h:1/") == "ws://h:1/v1/ws"
    assert ws_url("wss://h/v1/ws") == "wss://h/v1/ws"
    assert ws_url("ws://h:1/custom/ws?x=1") == "ws://h:1/custom/ws?x=1"
    with pytest.raises(ValueError):
        ws_url("ftp://h")


@pytest.mark.parametrize("codec", ["json", "msgpack"])
async def test_publish_and_iterate_round_trip(server: Server, codec: str) -> None:
    async with client_for(server, codec=codec) as client:
        assert client.state is ConnectionState.CONNECTED
        session = await client.attach("demo")
        assert session.resumed is True and session.cursor is None
        cursors = [await session.publish("message", {"text": f"hi {i}"}) for i in range(3)]
        events = await take_events(session, 3)
        assert [e.seq for e in events] == [1, 2, 3]
        assert [e.cursor for e in events] == cursors
        assert [e.data for e in events] == [{"text": f"hi {i}"} for i in range(3)]
        assert events[0].sender.sub == "alice" and events[0].sender.client == client.client_id
        assert session.cursor == cursors[-1]
        assert session.presence  # this client is present


async def test_two_clients_see_the_same_events(server: Server) -> None:
    async with client_for(server) as a, client_for(server, token=token("bob")) as b:
        sa = await a.attach("room")
        sb = await b.attach("room")
        for i in range(5):
            await (sa if i % 2 else sb).publish("message", {"i": i})
        ea, eb = await asyncio.gather(take_events(sa, 5), take_events(sb, 5))
        assert ea == eb
        assert [e.data["i"] for e in ea] == list(range(5))
        assert {e.sender.sub for e in ea} == {"alice", "bob"}


async def test_attach_from_a_saved_cursor_resumes_after_it(server: Server) -> None:
    async with client_for(server) as client:
        session = await client.attach("demo")
        for i in range(4):
            await session.publish("message", {"i": i})
        saved = (await take_events(session, 2))[-1].cursor
    async with client_for(server) as client:
        session = await client.attach("demo", cursor=saved)
        assert session.resumed is True
        assert [e.seq for e in await take_events(session, 2)] == [3, 4]


async def test_reconnect_after_the_server_drops_the_socket(server: Server) -> None:
    states: list[ConnectionState] = []
    async with client_for(server) as sub, client_for(server) as pub:
        sub.on_state(states.append)
        s = await sub.attach("demo")
        p = await pub.attach("demo")
        got: list[SessionEvent] = []
        for round_ in range(4):
            for i in range(5):
                await p.publish("message", {"n": round_ * 5 + i})
            got += await take_events(s, 5)
            assert await drop_connections(server, sub) == 1
        await p.publish("message", {"n": 20})
        got += await take_events(s, 1)
        assert [e.seq for e in got] == list(range(1, 22))  # no gap, no duplicate
        assert [e.data["n"] for e in got] == list(range(21))
        assert states.count(ConnectionState.RECONNECTING) == 4
        assert s.resumed is True


async def test_reconnect_to_a_restarted_server_with_the_same_store(tmp_path: Path) -> None:
    store = MemoryStore()
    srv = make_server(tmp_path, store=store)
    await srv.start()
    port = srv.port
    async with client_for(srv) as client:
        session = await client.attach("demo")
        for i in range(3):
            await session.publish("message", {"i": i})
        await srv.stop()
        srv = make_server(tmp_path, store=store, port=port)
        await srv.start()
        # Published while the client is away or reconnecting; it waits for the new server.
        cursor = await session.publish("message", {"i": 3})
        events = await take_events(session, 4)
        assert [e.seq for e in events] == [1, 2, 3, 4]
        assert events[-1].cursor == cursor
    await srv.stop()


async def test_publish_whose_reply_is_lost_is_not_duplicated(
        server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server commits, then the connection dies before ``published`` goes out."""
    real_append = server.store.append_future
    calls = 0
    closing: list[asyncio.Future[Any]] = []

    def append_then_die(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        future = real_append(*args, **kwargs)
        if calls == 1:
            def die(_: Any) -> None:
                for conn in list(server.connections):
                    conn.outbox.close()  # the reply (and the live event) are never written
                    closing.append(asyncio.ensure_future(conn.ws.close(code=CloseCode.SHUTDOWN)))
            future.add_done_callback(die)
        return future

    monkeypatch.setattr(server.store, "append_future", append_then_die)
    async with client_for(server) as client:
        session = await client.attach("demo")
        cursor = await session.publish("message", {"once": True})
        assert calls == 2  # re-sent after the reconnect, with the same key
        await session.publish("message", {"after": True})
        events = await take_events(session, 2)
        assert [e.data for e in events] == [{"once": True}, {"after": True}]
        assert events[0].cursor == cursor
    assert [e.seq for e in await server.store.read("demo", 0, 10)] == [1, 2]


async def test_publish_with_explicit_key_is_idempotent(server: Server) -> None:
    async with client_for(server) as client:
        session = await client.attach("demo")
        first = await session.publish("message", {"v": 1}, key="order-42")
        second = await session.publish("message", {"v": 2}, key="order-42")
        assert first == second
        assert len(await server.store.read("demo", 0, 10)) == 1


async def test_client_side_drop_right_after_sending_a_publish(server: Server) -> None:
    """The client loses the socket right after writing a publish, before reading anything."""
    async with client_for(server) as client:
        session = await client.attach("demo")
        conn = client._conn
        assert conn is not None
        real_send = conn.ws.send_str

        async def send_then_drop(data: str, compress: int | None = None) -> None:
            await real_send(data)
            if '"publish"' in data:
                client._drop(conn, "test: dropped after send")

        conn.ws.send_str = send_then_drop  # type: ignore[method-assign]
        cursor = await session.publish("message", {"x": 1})
        await session.publish("message", {"x": 2})
        events = await take_events(session, 2)
        assert [e.data for e in events] == [{"x": 1}, {"x": 2}]
        assert events[0].cursor == cursor
    assert len(await server.store.read("demo", 0, 10)) == 2


async def test_unauthorized_token_stops_without_retry(server: Server) -> None:
    states: list[ConnectionState] = []
    client = client_for(server, token="not-a-jwt")
    client.on_state(states.append)
    with pytest.raises(ConnectionFailed) as info:
        async with client:
            pass
    assert info.value.code == CloseCode.UNAUTHORIZED
    assert ConnectionState.RECONNECTING not in states
    assert client.state is ConnectionState.CLOSED
    forged = tether.server.auth.issue_token("y" * 32, "eve", ["*"], ["subscribe"])
    with pytest.raises(ConnectionFailed) as info:
        async with client_for(server, token=forged):
            pass
    assert info.value.code == CloseCode.UNAUTHORIZED


async def test_expired_fixed_token_stops_but_a_token_callable_is_asked_again(
        server: Server) -> None:
    expired = token(ttl=-60)
    with pytest.raises(ConnectionFailed) as info:
        async with client_for(server, token=expired):
            pass
    assert info.value.code == CloseCode.TOKEN_EXPIRED

    issued: list[str] = []

    async def fresh_token() -> str:
        issued.append(expired if not issued else token())
        return issued[-1]

    states: list[ConnectionState] = []
    client = client_for(server, token=fresh_token)
    client.on_state(states.append)
    async with client:
        assert len(issued) == 2 and ConnectionState.RECONNECTING in states
        session = await client.attach("demo")
        await session.publish("message", {})


async def test_sync_token_callable_and_session_drop_kept_across_reconnects(
        server: Server) -> None:
    calls = 0

    def get_token() -> str:
        nonlocal calls
        calls += 1
        return token()

    async with client_for(server, token=get_token) as client:
        await client.attach("demo")
        await drop_connections(server, client)
        await until(lambda: calls == 2 and client.state is ConnectionState.CONNECTED)


async def test_max_attempts_gives_up_when_nothing_listens(tmp_path: Path) -> None:
    srv = make_server(tmp_path)
    await srv.start()
    port = srv.port
    await srv.stop()
    client = Client(f"ws://127.0.0.1:{port}", token=token(), backoff_base=0.001,
                    backoff_cap=0.01, max_attempts=2)
    with pytest.raises(ConnectionFailed, match="gave up after 3 attempts"):
        await client.connect()
    await client.close()


async def test_connection_failure_reaches_iterators_and_pending_calls(
        server: Server) -> None:
    client = client_for(server, max_attempts=0)
    async with client:
        session = await client.attach("demo")
        await drop_connections(server, client, code=CloseCode.TOO_MANY_ERRORS)
        with pytest.raises(ConnectionFailed) as info:
            await take(session, 1)
        assert info.value.code == CloseCode.TOO_MANY_ERRORS
        with pytest.raises(ConnectionFailed):
            await session.publish("message", {})


async def test_forbidden_attach_and_publish_errors(server: Server) -> None:
    reader = token("r", sessions=["demo"], caps=["subscribe"])
    async with client_for(server, token=reader) as client:
        with pytest.raises(AttachError) as attach_info:
            await client.attach("elsewhere")
        assert attach_info.value.code == "forbidden"
        session = await client.attach("demo")
        with pytest.raises(PublishError) as info:
            await session.publish("message", {})
        assert info.value.code == "forbidden"
    async with client_for(server) as client:
        session = await client.attach("demo")
        with pytest.raises(PublishError) as info:
            await session.publish("tether.nope", {})
        assert info.value.code == "unknown_event_type"
        assert await session.publish("message", {"still": "works"})


async def test_bad_cursor_is_rejected_before_sending(server: Server) -> None:
    async with client_for(server) as client:
        with pytest.raises(ValueError):
            await client.attach("demo", cursor="garbage")
        session = await client.attach("demo")
        cursor = await session.publish("message", {})
        assert cursor is not None
        await session.detach()
        ahead = cursor.replace(":1", ":99")  # well-formed, this epoch, beyond the log's head
        with pytest.raises(AttachError) as info:
            await client.attach("demo", cursor=ahead)
        assert info.value.code == "bad_cursor"
        assert "demo" not in client.sessions
        elsewhere = f"{new_epoch('other')}:1"  # another session's cursor
        with pytest.raises(AttachError) as info:
            await client.attach("demo", cursor=elsewhere)
        assert info.value.code == "bad_cursor"


async def test_rate_limited_publishes_are_retried(tmp_path: Path) -> None:
    srv = make_server(tmp_path, publish_rate=50.0, publish_burst=1)
    await srv.start()
    try:
        async with client_for(srv) as client:
            session = await client.attach("demo")
            cursors = await asyncio.gather(*(session.publish("message", {"i": i})
                                             for i in range(5)))
            assert len(set(cursors)) == 5
            events = await take_events(session, 5)
            assert sorted(e.data["i"] for e in events) == list(range(5))
            assert [e.seq for e in events] == [1, 2, 3, 4, 5]
    finally:
        await srv.stop()


async def test_epoch_change_is_surfaced_as_a_snapshot(server: Server) -> None:
    async with client_for(server) as client:
        session = await client.attach("demo")
        await session.publish("message", {"a": 1})
        await take_events(session, 1)
    stale = f"{new_epoch('demo')}:5"  # a cursor of an earlier incarnation of this session
    async with client_for(server) as client:
        session = await client.attach("demo", cursor=stale)
        assert session.resumed is False
        (snap,) = await take(session, 1)
        assert isinstance(snap, Snapshot)
        assert snap.reason == "epoch_changed" and snap.previous == stale
        assert [e.data for e in snap.events] == [{"a": 1}]
        assert session.cursor == snap.cursor
        await session.publish("message", {"a": 2})
        (event,) = await take_events(session, 1)
        assert event.seq == 2


async def test_log_lost_while_connected_yields_a_snapshot_mid_stream(tmp_path: Path) -> None:
    srv = make_server(tmp_path)
    await srv.start()
    port = srv.port
    async with client_for(srv) as client:
        session = await client.attach("demo")
        await session.publish("message", {"old": 1})
        await take_events(session, 1)
        await srv.stop()
        srv = make_server(tmp_path, port=port)  # a new, empty store: the old log is gone
        await srv.start()
        other = client_for(srv)
        async with other:
            await (await other.attach("demo")).publish("message", {"new": 1})
        await session.publish("message", {"new": 2})
        items = []
        async with asyncio.timeout(10):
            async for item in session:
                items.append(item)
                if item.data == {"new": 2}:
                    break
        snap = items[0]
        assert isinstance(snap, Snapshot) and snap.reason == "epoch_changed"
        assert snap.previous is not None and snap.previous.endswith(":1")
        assert snap.type == "tether.snapshot" and snap.epoch != snap.previous.split(":")[0]
        # Whether {"new": 1} landed in the snapshot or after it depends on who was first;
        # either way it is seen once, and the events after the snapshot continue from it.
        seen = [e.data for e in snap.events] + [i.data for i in items[1:]]
        assert seen == [{"new": 1}, {"new": 2}]
        assert [i.seq for i in items[1:]] == list(range(snap.seq + 1, snap.seq + len(items)))
    await srv.stop()


async def test_transient_events_are_delivered_and_marked(server: Server) -> None:
    async with client_for(server) as client:
        session = await client.attach("demo")
        assert await session.publish("typing", {"on": True}, transient=True) is None
        await session.publish("message", {})
        items = await take(session, 2)
        assert isinstance(items[0], SessionEvent) and items[0].transient
        assert items[0].cursor is None and items[0].type == "typing"
        assert isinstance(items[1], SessionEvent) and items[1].seq == 1
        assert session.cursor == items[1].cursor


async def test_stream_helper(server: Server) -> None:
    async with client_for(server, kind="agent") as client:
        session = await client.attach("demo")
        async with session.stream("s1") as stream:
            await stream.append("Hel")
            await stream.append("lo")
        events = await take_events(session, 3)
        assert [e.type for e in events] == ["stream.append", "stream.append", "stream.end"]
        assert events[-1].data == {"stream": "s1", "text": "Hello"}
        assert events[-1].stream == "s1" and events[-1].sender.kind == "agent"
        with pytest.raises(PublishError) as info:
            await stream.append("more")
        assert info.value.code == "stream_closed"


async def test_presence(server: Server) -> None:
    async with client_for(server) as a, client_for(server, token=token("bob")) as b:
        sa = await a.attach("room")
        changes: list[tuple[str, list[str]]] = []
        sa.on_presence(lambda s, action, members: changes.append(
            (action, [m["sub"] for m in members])))
        sb = await b.attach("room", presence={"status": "here"})
        await until(lambda: any(m["sub"] == "bob" for m in sa.presence.values()))
        await sb.set_presence({"status": "typing"})
        await until(lambda: any(m["state"] == {"status": "typing"}
                                for m in sa.presence.values()))
        await sb.detach()
        await until(lambda: all(m["sub"] != "bob" for m in sa.presence.values()))
        assert ("join", ["bob"]) in changes and ("leave", ["bob"]) in changes
        assert ("update", ["bob"]) in changes


async def test_presence_state_is_restored_after_a_reconnect(server: Server) -> None:
    async with client_for(server) as a, client_for(server, token=token("bob")) as b:
        sa = await a.attach("room")
        sb = await b.attach("room")
        await sb.set_presence({"mood": "ok"})
        await until(lambda: any(m["sub"] == "bob" for m in sa.presence.values()))
        (before,) = [k for k, m in sa.presence.items() if m["sub"] == "bob"]
        await drop_connections(server, b)

        def restored() -> bool:
            bobs = [(k, m["state"]) for k, m in sa.presence.items() if m["sub"] == "bob"]
            return len(bobs) == 1 and bobs[0][0] != before and bobs[0][1] == {"mood": "ok"}

        await until(restored)  # the old member left, the new one joined with the same state


async def test_detach_ends_iteration_and_forbids_publishing(server: Server) -> None:
    async with client_for(server) as client:
        session = await client.attach("demo")
        await session.publish("message", {})
        await until(lambda: session.buffered >= 1)
        await session.detach()
        items = [i async for i in session]  # drains what was queued, then stops
        assert any(isinstance(i, SessionEvent) and i.seq == 1 for i in items)
        with pytest.raises(SessionClosed):
            await session.publish("message", {})
        again = await client.attach("demo", cursor=session.cursor)
        assert again is not session and again.resumed


async def test_close_ends_iterators_and_fails_later_calls(server: Server) -> None:
    client = client_for(server)
    await client.connect()
    session = await client.attach("demo")
    iterating = asyncio.ensure_future(take(session, 5))
    await until(lambda: session._queue.waiting == 1)
    await client.close()
    assert await iterating == []
    assert client.state is ConnectionState.CLOSED
    with pytest.raises(ClientClosed):
        await session.publish("message", {})
    with pytest.raises(ClientClosed):
        await client.attach("other")


async def test_state_iterator(server: Server) -> None:
    client = client_for(server)
    seen: list[ConnectionState] = []

    async def watch() -> None:
        async for state in client.states():
            seen.append(state)

    watcher = asyncio.ensure_future(watch())
    await asyncio.sleep(0)  # let it register before anything changes
    async with client:
        await client.attach("demo")
        await drop_connections(server, client)
        await until(lambda: seen[-1:] == [ConnectionState.CONNECTED]
                    and ConnectionState.RECONNECTING in seen)
    await asyncio.wait_for(watcher, 5)
    assert seen[0] is ConnectionState.CONNECTING
    assert seen[-1] is ConnectionState.CLOSED


# --- backpressure ------------------------------------------------------------------------


async def test_a_full_queue_pauses_reading_instead_of_growing(server: Server) -> None:
    async with client_for(server, queue_size=4) as sub, client_for(server) as pub:
        session = await sub.attach("demo")
        publisher = await pub.attach("demo")
        for i in range(40):
            await publisher.publish("message", {"i": i})
        await until(lambda: sub.reading_paused)
        assert session.buffered <= 4
        events = await take_events(session, 40)
        assert [e.seq for e in events] == list(range(1, 41))
        assert session.buffered <= 4


async def test_publishing_without_iterating_does_not_deadlock(server: Server) -> None:
    async with client_for(server, queue_size=4) as client:
        session = await client.attach("demo")
        cursors = [await session.publish("message", {"i": i}) for i in range(30)]
        assert session.buffered <= 4
        events = await take_events(session, 30)
        assert [e.cursor for e in events] == cursors


async def test_an_unread_session_does_not_starve_another(server: Server) -> None:
    async with client_for(server, queue_size=4) as client, client_for(server) as pub:
        ignored = await client.attach("ignored")
        read = await client.attach("read")
        p_ignored = await pub.attach("ignored")
        p_read = await pub.attach("read")
        for i in range(20):
            await p_ignored.publish("message", {"i": i})
        for i in range(10):
            await p_read.publish("message", {"i": i})
        assert [e.seq for e in await take_events(read, 10)] == list(range(1, 11))
        assert ignored.buffered <= 4
        assert [e.seq for e in await take_events(ignored, 20)] == list(range(1, 21))


# --- heartbeat ----------------------------------------------------------------------------


async def test_silent_server_gets_a_ping_then_the_socket_is_dropped() -> None:
    """A server that welcomes, then never sends anything again (a wedged proxy, say)."""
    hellos = 0
    pinged = asyncio.Event()
    second_hello = asyncio.Event()

    async def silent(ws: web.WebSocketResponse) -> None:
        nonlocal hellos
        async for msg in ws:
            if msg.type is not WSMsgType.TEXT:
                continue
            frame = msg.json()
            if frame["op"] == "hello":
                hellos += 1
                if hellos == 2:
                    second_hello.set()
                await ws.send_json({"op": "welcome", "id": frame["id"], "heartbeat": 0})
            elif frame["op"] == "ping":
                pinged.set()  # and never answer

    async with fake_server(silent) as port, \
            Client(f"ws://127.0.0.1:{port}", token="t", heartbeat_timeout=0.1,
                   ws_heartbeat=None, backoff_base=0.01, close_timeout=0.2):
        await asyncio.wait_for(pinged.wait(), 10)
        await asyncio.wait_for(second_hello.wait(), 10)


async def test_hello_timeout_is_retried_because_the_hello_was_lost() -> None:
    """A node shutting down stops reading and times the hello out (4502, a "stop" code): this
    client always sent hello, so it retries instead of giving up."""
    connections = 0

    async def lossy(ws: web.WebSocketResponse) -> None:
        nonlocal connections
        connections += 1
        if connections == 1:
            await ws.close(code=CloseCode.HELLO_TIMEOUT, message=b"hello_timeout")
            return
        async for msg in ws:
            frame = msg.json()
            if frame["op"] == "hello":
                await ws.send_json({"op": "welcome", "id": frame["id"], "heartbeat": 15})

    states: list[ConnectionState] = []
    async with fake_server(lossy) as port:
        client = Client(f"ws://127.0.0.1:{port}", token="t", backoff_base=0.01)
        client.on_state(states.append)
        async with client:
            assert connections == 2
            assert states == [ConnectionState.RECONNECTING, ConnectionState.CONNECTED]


async def test_an_idle_connection_is_pinged_and_the_pong_counts_as_traffic(
        tmp_path: Path) -> None:
    srv = make_server(tmp_path, heartbeat=0)  # no WebSocket pings from the server either
    await srv.start()
    try:
        async with client_for(srv, heartbeat_timeout=0.25) as client:
            session = await client.attach("demo")
            pongs = 0
            real = client._proto.receive

            def count(frame: dict[str, Any]) -> Any:
                nonlocal pongs
                pongs += frame.get("op") == "pong"
                return real(frame)

            client._proto.receive = count  # type: ignore[method-assign]
            await until(lambda: pongs >= 3)
            assert await session.publish("message", {})
    finally:
        await srv.stop()


async def test_secret_constant_matches_server(server: Server) -> None:
    assert server.secret == SECRET
