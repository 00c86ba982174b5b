"""The Responses service of one node: settings, models, chains, metrics, open connections."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import Counter, Gauge

from tether.responses.backends import Models
from tether.responses.chains import Chains, Node
from tether.responses.config import ResponsesConfig, parse_inherit
from tether.responses.errors import ApiError, server_error, unauthorized
from tether.server.auth import Authenticator, AuthError, Grant
from tether.store.base import SessionStore, StoreError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger("tether.responses")

# Closing code when the node shuts down: "going away", which clients (the openai SDK's
# reconnecting mode among them) treat as recoverable.
GOING_AWAY = 1001
# What a token must allow (with "publish") to use the Responses API: a session-scoped token
# minted for one conversation does not grant model access.
GRANT_SESSION = "responses"


class ResponsesService:
    """What the Responses endpoints share: chains in the session store, the node's token
    verification and metrics registry, models, and the open sockets (closed at shutdown)."""

    def __init__(self, store: SessionStore, auth: Authenticator, registry: CollectorRegistry,
                 heartbeat: float, config: ResponsesConfig | None = None) -> None:
        self.auth = auth
        self.heartbeat = heartbeat
        self.config = config or ResponsesConfig.from_env()
        self.models = Models.from_specs(self.config.models)
        self.chains = Chains(store, self.config.node_cache)
        self.sockets: set[Any] = set()  # ResponsesSocket, typed loosely to avoid a cycle
        self.tasks: set[asyncio.Task[Any]] = set()  # responses still generating
        self.responses_total = Counter("tether_responses", "Responses finished, by transport "
                                       "and status", ["transport", "status"], registry=registry)
        self.errors_total = Counter("tether_responses_errors", "Responses API errors, by code",
                                    ["code"], registry=registry)
        self.connections_gauge = Gauge("tether_responses_connections",
                                       "Open Responses WebSocket connections", registry=registry)
        self.inflight_gauge = Gauge("tether_responses_inflight", "Responses generating now",
                                    registry=registry)

    # --- requests ---

    def authenticate(self, request: web.Request) -> Grant:
        """The caller's grant from ``Authorization: Bearer <tether token>`` (the openai SDK sends
        its ``api_key`` that way). The token must allow the session ``responses`` with the
        ``publish`` capability (``tether token --session responses --caps publish``)."""
        header = request.headers.get("Authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else None
        try:
            grant = self.auth.verify(token)
        except AuthError as exc:
            raise unauthorized(f"Incorrect API key provided: {exc.message}.") from None
        if not grant.allows(GRANT_SESSION, "publish"):
            raise ApiError(f"This token does not allow the Responses API: it needs the session "
                           f"'{GRANT_SESSION}' (or a pattern matching it, such as '*') with the "
                           "'publish' capability.", code="insufficient_permissions", status=403)
        return grant

    def inherit_for(self, request: web.Request) -> frozenset[str]:
        asked = request.query.get("inherit")
        if asked is None:
            return self.config.inherit
        try:
            return parse_inherit(asked)
        except ValueError as exc:
            raise ApiError(str(exc), code="invalid_value", param="inherit") from None

    async def find(self, sub: str, response_id: str) -> Node | None:
        try:
            return await self.chains.find(sub, response_id)
        except StoreError as exc:
            log.error("store failed reading a response chain", extra={"error": str(exc)})
            raise server_error("The response store is unavailable.") from None

    def count_error(self, error: ApiError) -> None:
        self.errors_total.labels(error.code or error.type).inc()

    def track(self, task: asyncio.Task[Any]) -> None:
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # --- lifecycle (aiohttp signals) ---

    async def on_shutdown(self, app: web.Application) -> None:
        for task in list(self.tasks):
            task.cancel()
        closes = [sock.close(GOING_AWAY, b"server shutting down") for sock in list(self.sockets)]
        if closes:
            await asyncio.wait([asyncio.ensure_future(c) for c in closes], timeout=2.0)

    async def on_cleanup(self, app: web.Application) -> None:
        with contextlib.suppress(Exception):
            await self.models.aclose()
