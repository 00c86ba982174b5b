"""The blocking SyncClient, driven from a worker thread while the server runs on the test loop."""

from __future__ import annotations

import asyncio

import pytest

import tether
from tether.client import ConnectionFailed, ConnectionState, SessionEvent
from tether.server import Server

from .conftest import token


async def test_sync_client_round_trip(server: Server) -> None:
    url = f"ws://127.0.0.1:{server.port}"

    def script() -> tuple[list[str | None], list[SessionEvent], str | None]:
        with tether.SyncClient(url, token=token(), backoff_base=0.02) as client:
            assert client.state is ConnectionState.CONNECTED
            session = client.attach("demo")
            cursors = [session.publish("message", {"i": i}) for i in range(3)]
            events: list[SessionEvent] = []
            for item in session.events(timeout=5):
                assert isinstance(item, SessionEvent)
                events.append(item)
                if item.cursor == cursors[-1]:
                    break
            assert session.presence
            session.set_presence({"busy": True})
            session.detach()
            assert list(session.events(timeout=1)) == []  # detached: ends at once
            return cursors, events, session.cursor

    cursors, events, last = await asyncio.to_thread(script)
    assert [e.cursor for e in events] == cursors
    assert [e.data for e in events] == [{"i": i} for i in range(3)]
    assert last == cursors[-1]


async def test_sync_events_stop_after_the_idle_timeout(server: Server) -> None:
    url = f"ws://127.0.0.1:{server.port}"

    def script() -> list[object]:
        with tether.SyncClient(url, token=token()) as client:
            session = client.attach("quiet")
            return list(session.events(timeout=0.05))  # nothing published: stops, no error

    assert await asyncio.to_thread(script) == []


async def test_sync_client_refused_token_raises(server: Server) -> None:
    url = f"ws://127.0.0.1:{server.port}"

    def script() -> None:
        with tether.SyncClient(url, token="bad"):
            pass

    with pytest.raises(ConnectionFailed):
        await asyncio.to_thread(script)
