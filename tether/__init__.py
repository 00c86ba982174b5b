"""tether: durable sessions over WebSocket for AI agents and the people who follow them.

The top-level package exports the client SDK; the server lives in :mod:`tether.server`.

The SDK is loaded on first use (``from tether import Client`` works as usual): ``tether
serve`` runs as ``python -m tether``, which imports this package first, and a restarting server
should be listening before it pays for the client's imports (aiohttp's client side) that it
never uses (``docs/scaling.md``, "Reconnect storms").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tether.client import (
        AttachError,
        Client,
        ClientClosed,
        ConnectionFailed,
        ConnectionState,
        Cursor,
        PublishError,
        RequestFailed,
        Sender,
        Session,
        SessionClosed,
        SessionEvent,
        SessionItem,
        SessionState,
        Snapshot,
        Stream,
        SyncClient,
        SyncSession,
        TetherError,
    )

__all__ = [
    "AttachError",
    "Client",
    "ClientClosed",
    "ConnectionFailed",
    "ConnectionState",
    "Cursor",
    "PublishError",
    "RequestFailed",
    "Sender",
    "Session",
    "SessionClosed",
    "SessionEvent",
    "SessionItem",
    "SessionState",
    "Snapshot",
    "Stream",
    "SyncClient",
    "SyncSession",
    "TetherError",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        import tether.client

        return getattr(tether.client, name)
    raise AttributeError(f"module 'tether' has no attribute {name!r}")
