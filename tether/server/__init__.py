"""The tether server: WebSocket endpoint, HTTP API and SSE, auth, fan-out, metrics."""

from tether.server.app import Server
from tether.server.config import ServerConfig

__all__ = ["Server", "ServerConfig"]
