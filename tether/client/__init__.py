"""The tether Python SDK: :class:`Client` (asyncio), :class:`SyncClient` (blocking), the items
they deliver and the errors they raise.

Layout follows python-websockets: :mod:`tether.client.protocol` is the pure state machine (no
I/O), :mod:`tether.client.client` the asyncio layer on aiohttp, :mod:`tether.client.sync` the
thread-backed blocking wrapper.
"""

from tether.client.client import Client, ConnectionState, Session, SessionState, Stream, ws_url
from tether.client.errors import (
    AttachError,
    ClientClosed,
    ConnectionFailed,
    PublishError,
    RequestFailed,
    SessionClosed,
    TetherError,
)
from tether.client.protocol import (
    SNAPSHOT_TYPE,
    SessionEvent,
    SessionItem,
    Snapshot,
    backoff_delay,
)
from tether.client.sync import SyncClient, SyncSession
from tether.protocol.cursor import Cursor
from tether.protocol.events import Sender

__all__ = [
    "SNAPSHOT_TYPE",
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
    "backoff_delay",
    "ws_url",
]
