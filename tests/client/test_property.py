"""Property: whatever interleaving of publishes, dropped sockets, subscriber restarts (from a
saved cursor) and server restarts, every subscriber sees every event exactly once, in seq order.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tether.client import Client, Session, SessionEvent
from tether.server import Server
from tether.store import MemoryStore

from .conftest import client_for, drop_connections, make_server

DATA = Path(tempfile.mkdtemp(prefix="tether-client-prop-"))
SUBSCRIBERS = 3

operation = st.one_of(
    st.tuples(st.just("publish"), st.integers(1, 6)),
    st.tuples(st.just("drop"), st.integers(0, SUBSCRIBERS - 1)),
    st.tuples(st.just("restart"), st.integers(0, SUBSCRIBERS - 1)),
    st.tuples(st.just("restart_server"), st.just(0)),
)


class Subscriber:
    """A subscriber that persists its cursor and may be restarted from it at any moment."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: list[SessionEvent] = []
        self.client: Client | None = None
        self.session: Session | None = None
        self.reader: asyncio.Task[None] | None = None
        self.saw_end = asyncio.Event()

    async def start(self, server: Server, queue_size: int) -> None:
        cursor = self.session.cursor if self.session is not None else None
        self.client = client_for(server, queue_size=queue_size, client_id=self.name)
        await self.client.connect()
        self.session = await self.client.attach("prop", cursor=cursor)
        self.reader = asyncio.ensure_future(self._read(self.session))

    async def _read(self, session: Session) -> None:
        async for item in session:
            assert isinstance(item, SessionEvent), item  # never a snapshot: nothing is lost
            if item.transient:
                continue
            self.seen.append(item)
            if item.type == "end":
                self.saw_end.set()

    async def stop(self) -> None:
        assert self.reader is not None and self.client is not None
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)
        await self.client.close()


async def stop_listening_then_stop(server: Server) -> None:
    """``Server.stop`` closes the connections it knows, then stops listening: a client that
    reconnects in between gets a connection nobody closes, whose frames aiohttp ignores during
    shutdown, until the WebSocket heartbeat kills it (~22 s). Stop listening first."""
    runner = server._runner
    if runner is not None:
        for site in list(runner.sites):
            await site.stop()
    await server.stop()


async def scenario(ops: list[tuple[str, int]], queue_size: int) -> None:
    store = MemoryStore()
    server = make_server(DATA, store=store, hello_timeout=0.5)
    await server.start()
    port = server.port
    subs = [Subscriber(f"sub-{i}") for i in range(SUBSCRIBERS)]
    for sub in subs:
        await sub.start(server, queue_size)
    publisher = client_for(server)
    await publisher.connect()
    pub = await publisher.attach("prop")
    published = 0
    try:
        for op, arg in ops:
            if op == "publish":
                await asyncio.gather(*(pub.publish("message", {"n": published + i})
                                       for i in range(arg)))
                published += arg
            elif op == "drop":
                await drop_connections(server, subs[arg].client)
            elif op == "restart":
                await subs[arg].stop()
                await subs[arg].start(server, queue_size)
            else:
                await stop_listening_then_stop(server)
                # A client may reconnect into the old node's last moments, which then drops
                # its hello and closes it after hello_timeout: keep that short.
                server = make_server(DATA, store=store, port=port, hello_timeout=0.5)
                await server.start()
        await pub.publish("end", {})
        published += 1
        async with asyncio.timeout(20):
            for sub in subs:
                await sub.saw_end.wait()
        for sub in subs:
            assert [e.seq for e in sub.seen] == list(range(1, published + 1)), sub.name
            assert sorted(e.data.get("n", -1) for e in sub.seen[:-1]) == \
                list(range(published - 1))
    finally:
        for sub in subs:
            await sub.stop()
        await publisher.close()
        await server.stop()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(operation, max_size=10), queue_size=st.sampled_from([2, 4, 1024]))
def test_every_subscriber_sees_every_event_once_in_order(
        ops: list[tuple[str, int]], queue_size: int) -> None:
    asyncio.run(scenario(ops, queue_size))
