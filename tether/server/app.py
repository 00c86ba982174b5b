"""The tether server: an aiohttp application assembling store, hub, connections and HTTP API."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from tether.agents.runner import RunManager
from tether.agents.schedule import Scheduler
from tether.protocol.codec import CODECS, SUBPROTOCOLS
from tether.protocol.codes import CloseCode
from tether.protocol.events import SYSTEM, Event
from tether.responses import add_responses_routes
from tether.server.auth import Grant, load_secret, verify_token
from tether.server.config import ServerConfig
from tether.server.connection import Connection
from tether.server.http import SERVER_KEY, add_routes
from tether.server.hub import Hub
from tether.server.metrics import Metrics
from tether.store import SessionStore, open_store
from tether.web import add_web_routes

log = logging.getLogger("tether.server")


def node_id(data_dir: Path) -> str:
    """This node's id, kept in the data folder so a restarted node reclaims its own runs."""
    path = data_dir / "node"
    with contextlib.suppress(OSError):
        return path.read_text().strip()
    node = "node-" + secrets.token_hex(4)
    with contextlib.suppress(OSError):
        data_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(node + "\n")
    return node


class Server:
    """One tether node. ``await start()`` binds; ``await stop()`` closes every connection."""

    def __init__(self, config: ServerConfig | None = None, store: SessionStore | None = None,
                 ) -> None:
        self.config = config or ServerConfig()
        self.metrics = Metrics()
        self.store = store or self._open_store()
        self.secret = load_secret(self.config.secret, self.config.data_dir)
        self.hub = Hub(self.store, self.metrics, self.config.catchup_page)
        self.node_id = self.config.node_id or node_id(self.config.data_dir)
        self.runs = RunManager(self.store, self.node_id,
                               lease_seconds=self.config.lease_seconds)
        self.scheduler = Scheduler(self.runs)
        self.connections: set[Connection] = set()
        self.streams: set[asyncio.Task[Any]] = set()  # SSE handlers, cancelled on stop
        self._background: set[asyncio.Task[Any]] = set()
        self._grants: dict[str, Grant] = {}  # verified tokens (bounded)
        self.app = self._make_app()
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.port = self.config.port

    def _open_store(self) -> SessionStore:
        return open_store(self.config.resolved_store_url(), self.config.retention,
                          on_batch=self.metrics.batch_size.observe)

    def _make_app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_frame_bytes)
        app[SERVER_KEY] = self
        app.router.add_get("/v1/ws", self._websocket)
        add_routes(app)
        add_responses_routes(app)
        add_web_routes(app)
        return app

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        config = self.config
        ws = web.WebSocketResponse(
            protocols=SUBPROTOCOLS,
            heartbeat=config.heartbeat or None,
            max_msg_size=config.max_frame_bytes,
            compress=config.compression,
            autoping=True,
        )
        if not ws.can_prepare(request).ok:
            return web.json_response(
                {"error": {"code": "invalid", "message": "expected a WebSocket upgrade"}},
                status=400)
        await ws.prepare(request)
        codec = CODECS.get(ws.ws_protocol or "")
        if codec is None:
            self.metrics.errors.labels("unsupported_codec").inc()
            await ws.close(code=CloseCode.UNSUPPORTED_CODEC,
                           message=b"offer tether.v1.json or tether.v1.msgpack")
            return ws
        conn = Connection(self, ws, codec, request.remote or "")
        self.connections.add(conn)
        self.metrics.hot.connections_ws += 1
        try:
            await conn.run()
        finally:
            self.metrics.hot.connections_ws -= 1
            self.connections.discard(conn)
        return ws

    def verify(self, token: str | None) -> Grant:
        """Verify a token, remembering verified ones: reconnect storms re-send the same few."""
        if token:
            cached = self._grants.get(token)
            if cached is not None and (cached.exp is None or cached.exp > time.time()):
                return cached
        grant = verify_token(self.secret, token)
        assert token is not None
        if len(self._grants) >= 10_000:
            self._grants.pop(next(iter(self._grants)))
        self._grants[token] = grant
        return grant

    async def expire_tokens(self) -> None:
        """Close connections whose token has expired (4501)."""
        now = time.time()
        for conn in list(self.connections):
            grant = conn.grant
            if grant is not None and grant.exp is not None and grant.exp <= now:
                conn.close(CloseCode.TOKEN_EXPIRED, "token expired")

    def background(self, task: asyncio.Task[Any]) -> None:
        """Keep a reference to a fire-and-forget task until it ends (and log its failure)."""
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    async def publish_presence(self, session: str, kind: str, info: dict[str, Any]) -> None:
        await self.store.publish_transient(
            Event(session, "", 0, kind, info, SYSTEM, int(time.time() * 1000), transient=True))

    async def _periodic(self, interval: float, action: Any, name: str) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await action()
            except Exception:
                log.exception("%s failed", name)

    async def _refresh_presence(self) -> None:
        for conn in list(self.connections):
            await conn.refresh_presence()

    async def _trim(self) -> None:
        removed = await self.store.trim()
        if removed:
            log.info("retention removed %d events", removed)

    async def start(self) -> None:
        await self.store.start()
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port,
                           reuse_address=True, backlog=4096)
        await site.start()
        # With port 0 the OS picks the port; read it back from the bound socket.
        bound = site._server
        if isinstance(bound, asyncio.Server) and bound.sockets:
            self.port = int(bound.sockets[0].getsockname()[1])
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._periodic(self.config.presence_ttl / 3,
                                            self._refresh_presence, "presence refresh")),
            loop.create_task(self._periodic(self.config.trim_interval, self._trim, "retention")),
            loop.create_task(self._periodic(1.0, self.expire_tokens, "token expiry")),
        ]
        await self.runs.start()
        await self.scheduler.start()
        if getattr(self.store, "live_is_lossy", False):
            self._tasks.append(loop.create_task(self._periodic(
                self.config.tail_check_interval, self.hub.check_tails, "tail check")))
        log.info("tether listening", extra={"host": self.config.host, "port": self.port,
                                            "store": self.config.resolved_store_url(),
                                            "node": self.node_id})

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.scheduler.stop()
        await self.runs.stop()
        # Stop accepting first: a client reconnecting during shutdown must be refused, not
        # handed a connection that nobody will close.
        if self._runner is not None:
            for site in list(self._runner.sites):
                await site.stop()
        for stream in list(self.streams):
            stream.cancel()
        closes = [conn.ws.close(code=CloseCode.SHUTDOWN, message=b"server shutting down")
                  for conn in list(self.connections) if not conn.ws.closed]
        if closes:
            self.metrics.closes.labels(str(int(CloseCode.SHUTDOWN))).inc(len(closes))
            # Wait (briefly) for the close handshakes so clients see 4000, not a dropped socket.
            await asyncio.wait([asyncio.ensure_future(c) for c in closes], timeout=2.0)
        if self._runner is not None:
            await self._runner.cleanup()
        await self.store.close()

    @property
    def url(self) -> str:
        return f"ws://{self.config.host}:{self.port}"
