"""No request does unbounded work in one step of the event loop, on a 100,000-event session.

What would hold the loop is reading (and then folding, encoding) a long log without yielding.
The test counts the events the store hands out to each request between two consecutive
iterations of the loop (a callback that re-schedules itself with ``call_soon`` runs once per
iteration) while the expensive requests run together: a bogus ``run.cancel`` (the run index
is built), an AG-UI resume at the end of the log (its prefix is folded), an attach from the
beginning (catch-up), an SSE stream from the beginning, a history page. Work is bounded per
step by construction: at most one store page (``catchup_page`` = 500 events; a history page
at most 1,000). This counts work rather than timing it, so it holds on a loaded machine; the
time such steps take shows in ``tether_event_loop_lag_seconds``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp

from tests.helpers import SECRET, Peer, token
from tether.protocol.events import Event, Sender
from tether.server import Server, ServerConfig
from tether.store.base import EncodedPage
from tether.store.sqlite import SqliteStore

EVENTS = 100_000
AUTH = {"Authorization": f"Bearer {token(caps=['subscribe', 'publish', 'approve'])}"}


class CountingStore(SqliteStore):
    """The real SQLite store, counting the events its reads return, per reading task."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.read_since_tick: dict[object, int] = {}

    async def read(self, session: str, after: int, limit: int) -> list[Event]:
        events = await super().read(session, after, limit)
        self._count(len(events))
        return events

    async def read_encoded(self, session: str, after: int, limit: int, fmt: str
                           ) -> EncodedPage:
        page = await super().read_encoded(session, after, limit, fmt)  # catch-up's reads
        self._count(len(page))
        return page

    def _count(self, events: int) -> None:
        task = asyncio.current_task()
        self.read_since_tick[task] = self.read_since_tick.get(task, 0) + events


class StepWatch:
    """Largest number of events one task (one request) read within one loop iteration."""

    def __init__(self, store: CountingStore) -> None:
        self.store = store
        self.most = 0
        self.running = True
        asyncio.get_running_loop().call_soon(self.tick)

    def tick(self) -> None:
        self.most = max(self.most, *self.store.read_since_tick.values(), 0)
        self.store.read_since_tick.clear()
        if self.running:
            asyncio.get_running_loop().call_soon(self.tick)


async def fill(store: SqliteStore, session: str) -> None:
    sender = Sender("loader")
    for start in range(0, EVENTS, 5000):
        await asyncio.gather(*(store.append_future(session, "message", {"i": i}, sender)
                               for i in range(start, start + 5000)))


async def drain_sse(resp: aiohttp.ClientResponse, events: int) -> None:
    seen = 0
    while seen < events:
        line = await asyncio.wait_for(resp.content.readline(), 60)
        assert line, "the stream ended"
        if line.startswith(b"id: "):
            seen += 1


async def test_no_request_reads_more_than_a_page_per_loop_step(tmp_path: Path) -> None:
    store = CountingStore(str(tmp_path / "data"))
    server = Server(ServerConfig(port=0, secret=SECRET, data_dir=tmp_path, catchup_page=500),
                    store=store)
    await server.start()
    try:
        await fill(store, "big")
        head = await store.head("big")
        watch = StepWatch(store)
        base = f"http://127.0.0.1:{server.port}/v1/sessions/big"
        async with aiohttp.ClientSession() as http:

            async def bogus_cancel() -> None:
                resp = await http.post(f"{base}/events", headers=AUTH,
                                       json={"type": "run.cancel", "data": {"run": "run_x"}})
                assert resp.status == 404

            async def agui_resume() -> None:
                resp = await http.get(f"{base}/agui", headers={
                    **AUTH, "Last-Event-ID": f"{head.epoch}:{head.last_seq}"})
                assert resp.status == 200
                await asyncio.wait_for(resp.content.readline(), 60)  # the opening comment
                resp.close()

            async def sse_from_start() -> None:
                resp = await http.get(f"{base}/stream", headers=AUTH)
                await drain_sse(resp, 20_000)
                resp.close()

            async def history() -> None:
                resp = await http.get(f"{base}/events", headers=AUTH,
                                      params={"limit": "1000"})
                assert len((await resp.json())["events"]) == 1000

            async def attach_from_start() -> None:
                peer = await Peer.connect(server.port)
                await peer.hello()
                reply: dict[str, Any] = await peer.attach("big", f"{head.epoch}:0")
                assert reply["resumed"] is True
                await peer.events("big", 20_000, timeout=60)
                await peer.close()

            await asyncio.gather(bogus_cancel(), agui_resume(), sse_from_start(), history(),
                                 attach_from_start())
            await bogus_cancel()  # the index is built now: answered without reading the log
        watch.running = False
        assert 0 < watch.most <= 1000, watch.most
    finally:
        await server.stop()
