"""The tether server: WebSocket endpoint, HTTP API and SSE, auth, fan-out, metrics.

``Server`` and ``ServerConfig`` are loaded on first use: the features under this package
(and :mod:`tether.responses`, :mod:`tether.web`) import its leaf modules — ``auth``, ``keys``,
``sessions`` — and must not pull in the composition root (:mod:`tether.server.app`), which
imports them all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tether.server.app import Server
    from tether.server.config import ServerConfig

__all__ = ["Server", "ServerConfig"]


def __getattr__(name: str) -> Any:
    if name == "Server":
        from tether.server.app import Server

        return Server
    if name == "ServerConfig":
        from tether.server.config import ServerConfig

        return ServerConfig
    raise AttributeError(f"module 'tether.server' has no attribute {name!r}")
