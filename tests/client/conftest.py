"""Fixtures for client tests: a real in-process server on a free port, tokens, helpers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from tether.client import Client, Session, SessionEvent, SessionItem
from tether.server import Server, ServerConfig
from tether.server.auth import issue_token
from tether.store import MemoryStore

SECRET = "x" * 32
ALL_CAPS = ["subscribe", "publish", "presence"]


def token(sub: str = "alice", sessions: list[str] | None = None,
          caps: list[str] | None = None, ttl: float | None = 3600.0) -> str:
    return issue_token(SECRET, sub, sessions or ["*"], caps or ALL_CAPS, ttl)


def make_server(tmp_path: Path, store: MemoryStore | None = None, port: int = 0,
                **config: object) -> Server:
    cfg = ServerConfig(port=port, store_url="memory://", secret=SECRET, data_dir=tmp_path,
                       **config)  # type: ignore[arg-type]
    return Server(cfg, store=store)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    srv = make_server(tmp_path)
    await srv.start()
    yield srv
    await srv.stop()


def client_for(srv: Server, **options: object) -> Client:
    options.setdefault("token", token())
    options.setdefault("backoff_base", 0.02)
    options.setdefault("backoff_cap", 0.2)
    return Client(f"ws://127.0.0.1:{srv.port}", **options)  # type: ignore[arg-type]


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for a condition the code under test makes true (a safety timeout, not a timing)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


async def take(session: Session, n: int, timeout: float = 10.0) -> list[SessionItem]:
    """The next ``n`` items of ``session``."""
    items: list[SessionItem] = []
    async with asyncio.timeout(timeout):
        async for item in session:
            items.append(item)
            if len(items) == n:
                break
    return items


async def take_events(session: Session, n: int, timeout: float = 10.0) -> list[SessionEvent]:
    """The next ``n`` durable events, skipping transient ones (presence is not an event)."""
    events: list[SessionEvent] = []
    async with asyncio.timeout(timeout):
        async for item in session:
            if isinstance(item, SessionEvent) and not item.transient:
                events.append(item)
                if len(events) == n:
                    break
    return events


async def drop_connections(srv: Server, client: Client | None = None,
                           code: int = 4000) -> int:
    """Close the server side of ``client``'s connection (every connection when ``None``)."""
    dropped = 0
    for conn in list(srv.connections):
        if client is None or (conn.caller is not None
                              and conn.caller.sender.client == client.client_id):
            await conn.ws.close(code=code, message=b"test drop")
            dropped += 1
    return dropped


@contextlib.asynccontextmanager
async def fake_server(
        handler: Callable[[web.WebSocketResponse], Awaitable[None]]) -> AsyncIterator[int]:
    """A scripted WebSocket peer at ``/v1/ws``, for behaviour a real server will not show;
    yields its port. ``handler`` gets each prepared (JSON subprotocol) socket."""

    async def endpoint(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=["tether.v1.json"])
        await ws.prepare(request)
        await handler(ws)
        return ws

    app = web.Application()
    app.router.add_get("/v1/ws", endpoint)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()
