from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.helpers import SECRET
from tether.server import Server, ServerConfig
from tether.store import MemoryStore, Retention


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    config = ServerConfig(port=0, secret=SECRET, data_dir=tmp_path, heartbeat=5)
    srv = Server(config, store=MemoryStore(Retention(max_events=5000)))
    await srv.start()
    yield srv
    await srv.stop()
