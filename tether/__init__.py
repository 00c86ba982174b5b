"""tether: durable sessions over WebSocket for AI agents and the people who follow them.

The top-level package exports the client SDK; the server lives in :mod:`tether.server`.
"""

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
