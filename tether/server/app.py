"""The composition root: the one place that names every feature of a tether node.

:class:`Server` builds the shared services (store, metrics, token verification, hub, run
manager, scheduler, session service), puts each under its typed key
(:mod:`tether.server.keys`), and asks each feature to install itself on the aiohttp
application. Features know the keys, never this module. One lifecycle: aiohttp's —
``cleanup_ctx`` entries start in order and stop in reverse, ``on_shutdown`` ends open
deliveries; ``start()`` and ``stop()`` only run that application.

Adding a transport is a module with an ``install(app)`` that reads the services it needs from
the keys, and one line in :meth:`Server._make_app`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.log import server_logger as aiohttp_server_log

from tether import responses
from tether.agents import http as agents_http
from tether.agents.runner import RunManager
from tether.agents.schedule import Scheduler
from tether.server import agui, aisdk, connection, durable_streams, front, http
from tether.server.auth import Authenticator
from tether.server.config import ServerConfig, node_id
from tether.server.connection import WS_ENDPOINT, Connection
from tether.server.hub import Hub
from tether.server.keys import AUTH, CONFIG, HUB, METRICS, NODE, RUNS, SCHEDULER, SESSIONS, STORE
from tether.server.metrics import Metrics
from tether.server.sessions import SessionService
from tether.server.sse import SseStream
from tether.store import open_store
from tether.store.base import Store
from tether.web import routes as web_routes

log = logging.getLogger("tether.server")

# How long stop() lets request handlers finish after their deliveries were ended.
SHUTDOWN_GRACE = 5.0


class _MalformedHttp(logging.Filter):
    """aiohttp logs a traceback at ERROR for every request it cannot parse (it has already
    answered 400): that is a client's mistake, not a server failure. Count it in
    ``tether_errors_total{code="bad_http"}`` and log it at debug instead."""

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self.metrics = metrics

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and record.levelno >= logging.ERROR:
            self.metrics.errors.labels("bad_http").inc()
            log.debug("malformed HTTP request: %s", exc)
            return False
        return True


class Server:
    """One tether node. ``await start()`` binds; ``await stop()`` closes every connection."""

    def __init__(self, config: ServerConfig | None = None, store: Store | None = None,
                 ) -> None:
        self.config = config = config or ServerConfig()
        self.metrics = Metrics()
        self.store = store or open_store(config.resolved_store_url(), config.retention,
                                         on_batch=self.metrics.batch_size.observe)
        self.auth = Authenticator.from_config(config)
        self.hub = Hub(self.store, self.metrics, config.catchup_page, config.max_event_bytes)
        self.node_id = config.node_id or node_id(config.data_dir)
        self.runs = RunManager(self.store, self.node_id, lease_seconds=config.lease_seconds)
        self.scheduler = Scheduler(self.runs)
        self.runs.on_change = self.scheduler.on_run_change  # webhooks hear run transitions
        self.sessions = SessionService(config, self.store, self.store, self.hub, self.runs,
                                       self.metrics)
        self.app = self._make_app()
        self._runner: web.AppRunner | None = None
        self._front: front.PicowsFront | None = None
        self._listener: asyncio.Server | None = None
        self.port = config.port

    def _make_app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_frame_bytes)
        app[CONFIG] = self.config
        app[METRICS] = self.metrics
        app[STORE] = self.store
        app[AUTH] = self.auth
        app[HUB] = self.hub
        app[NODE] = self.node_id
        app[RUNS] = self.runs
        app[SCHEDULER] = self.scheduler
        app[SESSIONS] = self.sessions
        app.cleanup_ctx.append(self._core)
        app.cleanup_ctx.append(self.auth.lifespan)  # JWKS URLs fetched before binding
        http.install(app)  # first: its error middleware covers every feature's handlers
        connection.install(app)
        agui.install(app)
        aisdk.install(app)
        durable_streams.install(app)
        agents_http.install(app)
        responses.install(app)
        web_routes.install(app)
        app.on_shutdown.append(self._end_deliveries)
        return app

    async def _core(self, app: web.Application) -> AsyncIterator[None]:
        """The store, and the node's periodic work, for the application's lifetime."""
        await self.store.start()
        config = self.config
        periodic: list[tuple[float, Callable[[], Awaitable[Any]], str]] = [
            (config.presence_ttl / 3, self.sessions.refresh_presence_all, "presence refresh"),
            (config.trim_interval, self._trim, "retention"),
            (1.0, self._expire_tokens, "token expiry"),
        ]
        if self.store.live_is_lossy:
            periodic.append((config.tail_check_interval, self.hub.check_tails, "tail check"))
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(_every(interval, action, name))
                 for interval, action, name in periodic]
        tasks.append(loop.create_task(_watch_loop(self.metrics)))
        malformed = _MalformedHttp(self.metrics)
        aiohttp_server_log.addFilter(malformed)
        try:
            yield
        finally:
            aiohttp_server_log.removeFilter(malformed)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.store.close()

    async def _expire_tokens(self) -> None:
        self.sessions.expire_tokens()

    async def _trim(self) -> None:
        removed = await self.store.trim()
        if removed:
            log.info("retention removed %d events", removed)

    async def _end_deliveries(self, app: web.Application) -> None:
        # Sockets get 4000 (reconnect), SSE streams end; waits briefly for close handshakes.
        await self.sessions.shutdown()
        await self.app[WS_ENDPOINT].shutdown()  # sockets still before their hello
        if self._front is not None:
            await self._front.shutdown()

    # --- running ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                                     shutdown_timeout=SHUTDOWN_GRACE)
        await self._runner.setup()
        config = self.config
        try:
            if config.ws_engine == "picows" and front.SUPPORTED:
                await self._listen_behind_front(self._runner)
            else:
                # Workers of one port (tether serve --workers) each bind it with SO_REUSEPORT.
                site = web.TCPSite(self._runner, config.host, config.port, reuse_address=True,
                                   reuse_port=config.reuse_port or None, backlog=4096)
                await site.start()
        except BaseException:
            await self._runner.cleanup()
            raise
        # With port 0 the OS picks the port; read it back from the bound socket.
        addresses = ([s.getsockname() for s in self._listener.sockets]
                     if self._listener is not None else self._runner.addresses)
        if addresses:
            self.port = int(addresses[0][1])
        log.info("tether listening", extra={"host": self.config.host, "port": self.port,
                                            "store": self.config.resolved_store_url(),
                                            "node": self.node_id})

    async def _listen_behind_front(self, runner: web.AppRunner) -> None:
        """Bind the port with the front (tether/server/front.py): plain WebSockets to picows,
        the rest to aiohttp's request handler, as its own site would."""
        http_server = runner.server
        assert http_server is not None
        self._front = picows_front = front.PicowsFront(self.app[WS_ENDPOINT], http_server)
        config = self.config
        self._listener = await asyncio.get_running_loop().create_server(
            picows_front.protocol, config.host, config.port, reuse_address=True,
            reuse_port=config.reuse_port or None, backlog=4096)

    async def stop(self) -> None:
        """Stop accepting, end every delivery (4000 on sockets), stop runs, close the store."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- views for operators and tests ------------------------------------------------------

    @property
    def url(self) -> str:
        return f"ws://{self.config.host}:{self.port}"

    @property
    def secret(self) -> str:
        return self.auth.secret

    @property
    def connections(self) -> set[Connection]:
        """Open WebSocket connections."""
        return self.app[WS_ENDPOINT].connections

    @property
    def streams(self) -> list[SseStream]:
        """Open SSE streams (``…/stream`` and AG-UI)."""
        return [live for live in self.sessions.live if isinstance(live, SseStream)]


async def _watch_loop(metrics: Metrics, interval: float = 0.25) -> None:
    """Observe how late a timer fires: work that holds the loop shows as lag."""
    loop = asyncio.get_running_loop()
    while True:
        start = loop.time()
        await asyncio.sleep(interval)
        metrics.loop_lag.observe(max(0.0, loop.time() - start - interval))


async def _every(interval: float, action: Callable[[], Awaitable[Any]], name: str) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await action()
        except Exception:
            log.exception("%s failed", name)
