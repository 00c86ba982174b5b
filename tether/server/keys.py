"""The shared services of one node, as typed keys of the aiohttp application.

This module is a leaf: it imports nothing of tether at run time, so any feature may import it
without pulling in the composition root (:mod:`tether.server.app`). The root puts each
service under its key; a feature's ``install(app)`` and its handlers read them back with
``request.app[SESSIONS]``. Nothing reaches back to the whole server object.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from tether.agents.runner import RunManager
    from tether.agents.schedule import Scheduler
    from tether.server.auth import Authenticator
    from tether.server.config import ServerConfig
    from tether.server.hub import Hub
    from tether.server.metrics import Metrics
    from tether.server.sessions import SessionService
    from tether.store.base import SessionStore

CONFIG: web.AppKey[ServerConfig] = web.AppKey("tether.config")
METRICS: web.AppKey[Metrics] = web.AppKey("tether.metrics")
STORE: web.AppKey[SessionStore] = web.AppKey("tether.store")
AUTH: web.AppKey[Authenticator] = web.AppKey("tether.auth")
HUB: web.AppKey[Hub] = web.AppKey("tether.hub")
SESSIONS: web.AppKey[SessionService] = web.AppKey("tether.sessions")
RUNS: web.AppKey[RunManager] = web.AppKey("tether.runs")
SCHEDULER: web.AppKey[Scheduler] = web.AppKey("tether.scheduler")
NODE: web.AppKey[str] = web.AppKey("tether.node")
