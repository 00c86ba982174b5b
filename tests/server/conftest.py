from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.helpers import SECRET
from tether.server import Server, ServerConfig
from tether.store import MemoryStore, Retention


@pytest.fixture
def ws_engine() -> str:
    """What serves plain WebSockets (tether/server/front.py); the modules of the WebSocket
    contract parametrize it to run on both (tests.helpers.BOTH_WS_ENGINES)."""
    return "picows"


@pytest.fixture
async def server(tmp_path: Path, ws_engine: str) -> AsyncIterator[Server]:
    config = ServerConfig(port=0, secret=SECRET, data_dir=tmp_path, heartbeat=5,
                          ws_engine=ws_engine)
    srv = Server(config, store=MemoryStore(Retention(max_events=50)))
    await srv.start()
    yield srv
    await srv.stop()
