"""/healthz tells a store that cannot commit, and the failure is logged once per change."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.helpers import SECRET, token
from tether.protocol.events import Sender
from tether.server import Server, ServerConfig
from tether.store import MemoryStore
from tether.store.base import Appended, StoreError


class FullDisk(MemoryStore):
    """A real MemoryStore whose commits fail while ``full`` (reads keep working)."""

    full = False

    async def append(self, session: str, type: str, data: Any, sender: Sender,
                     key: str | None = None) -> Appended:
        if self.full:
            raise StoreError("database or disk is full")
        return await super().append(session, type, data, sender, key)

    def append_future(self, session: str, type: str, data: Any, sender: Sender,
                      key: str | None = None) -> Any:
        if self.full:
            raise StoreError("database or disk is full")
        return super().append_future(session, type, data, sender, key)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    srv = Server(ServerConfig(port=0, secret=SECRET, data_dir=tmp_path,
                              store_unhealthy_after=0.0), store=FullDisk())
    await srv.start()
    yield srv
    await srv.stop()


async def test_healthz_reports_failing_commits_once_and_recovers(
        server: Server, caplog: pytest.LogCaptureFixture) -> None:
    store = server.store
    assert isinstance(store, FullDisk)
    url = f"http://127.0.0.1:{server.port}"
    async with aiohttp.ClientSession() as http:
        assert (await http.get(f"{url}/healthz")).status == 200
        store.full = True
        with caplog.at_level(logging.INFO, logger="tether.sessions"):
            resp = await http.post(f"{url}/v1/sessions/s/events", json={"type": "message"},
                                   headers={"Authorization": f"Bearer {token()}"})
            assert resp.status == 503
            assert (await resp.json())["error"]["code"] == "store_unavailable"
            for _ in range(3):
                resp = await http.get(f"{url}/healthz")
                assert resp.status == 503 and "full" in (await resp.json())["store"]
            store.full = False
            assert (await http.get(f"{url}/healthz")).status == 200
        failures = [r for r in caplog.records if "cannot commit" in r.getMessage()]
        recoveries = [r for r in caplog.records if "commits again" in r.getMessage()]
        assert len(failures) == 1 and len(recoveries) == 1
