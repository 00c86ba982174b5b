"""The web app and the browser SDK, served by ``tether serve``.

:func:`add_web_routes` registers ``/`` (the app), ``/sdk/tether.js`` (the SDK), the app's
static files, ``/v1/web/*`` and the loopback-only ``POST /v1/dev/login``. See docs/web.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiohttp import web

__all__ = ["add_web_routes"]


def add_web_routes(app: web.Application) -> None:
    """Register the web app, the SDK and the dev login on a tether server's ``app``."""
    # Imported here: the routes use the server's modules, which import this package.
    from tether.web.routes import add_routes

    add_routes(app)
