"""SIGKILL the server mid-stream: every acknowledged event survives exactly once, in order.

A real ``tether serve`` process on SQLite; a publisher sending 2,000 events one at a time,
each waiting for its ``published``; a subscriber reading. The server is killed with SIGKILL at
several points chosen by the subscriber's progress (so the publisher is wherever it happens to
be, often with a publish in flight), restarted on the same data, and both sides reconnect:
the publisher re-sends its unacknowledged publish with the same idempotency key, the subscriber
resumes from its last cursor.

The same runs against ``--workers 2`` (a sequencer owning the SQLite store, two workers on the
port): once killing the whole process group, once killing only the worker that serves the
subscriber (the supervisor restarts it; both sides reconnect, perhaps to the other worker).
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.helpers import Peer, ServerProcess

pytestmark = pytest.mark.slow

TOTAL = 2000
KILL_AT = (250, 900, 1500)  # subscriber progress at which the server is killed


async def connect(port: int) -> Peer:
    while True:
        try:
            peer = await Peer.connect(port)
            await peer.hello()
            return peer
        except (aiohttp.ClientError, ConnectionError, OSError):
            await asyncio.sleep(0.05)


async def publisher(server: ServerProcess, acked: dict[int, int], restarted: asyncio.Event
                    ) -> None:
    peer = await connect(server.port)
    i = 0
    while i < TOTAL:
        try:
            reply = await peer.publish("crash", "message", {"i": i}, key=f"k{i}")
        except (ConnectionError, aiohttp.ClientError, TimeoutError, OSError):
            with contextlib.suppress(Exception):
                await peer.close()
            await restarted.wait()
            peer = await connect(server.port)
            continue  # the same i, the same key: a commit before the crash is not repeated
        assert reply["op"] == "published", reply
        acked[i] = reply["seq"]
        i += 1
    await peer.close()


async def subscriber(server: ServerProcess, seen: list[dict[str, Any]],
                     kill: asyncio.Queue[tuple[int, int]]) -> None:
    cursor: str | None = None
    kills = list(KILL_AT)
    while len(seen) < TOTAL:
        peer = await connect(server.port)
        try:
            attached = await peer.attach("crash", cursor)
            assert attached["op"] == "attached" and attached["resumed"] is True, attached
            while len(seen) < TOTAL:
                frame = await peer.recv(timeout=30)
                if frame.get("op") != "event":
                    continue
                seen.append(frame)
                cursor = frame["cursor"]
                if kills and len(seen) == kills[0]:
                    kills.pop(0)
                    await kill.put((len(seen), peer.ws.get_extra_info("sockname")[1]))
        except (ConnectionError, aiohttp.ClientError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                await peer.close()


@pytest.mark.parametrize("workers, victim", [(1, "server"), (2, "server"), (2, "worker")])
async def test_sigkill_mid_stream_loses_no_acknowledged_event(tmp_path: Path, workers: int,
                                                              victim: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    server = ServerProcess(data, workers=workers).start()
    acked: dict[int, int] = {}
    seen: list[dict[str, Any]] = []
    kill: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
    restarted = asyncio.Event()
    kills: list[int] = []

    async def killer() -> None:
        for _ in KILL_AT:
            progress, subscriber_port = await kill.get()
            if victim == "worker":
                # The worker serving the subscriber; its supervisor starts another.
                server.kill_worker(server.worker_of(subscriber_port))
                kills.append(progress)
                continue
            restarted.clear()
            server.kill()
            kills.append(progress)
            server.start()
            restarted.set()

    try:
        restarted.set()
        tasks = [asyncio.create_task(c) for c in (
            publisher(server, acked, restarted), subscriber(server, seen, kill), killer())]
        await asyncio.wait_for(asyncio.gather(*tasks), 240)
    finally:
        server.stop()
    assert kills == list(KILL_AT)
    assert len(acked) == TOTAL
    seqs = [e["seq"] for e in seen]
    assert seqs == list(range(1, TOTAL + 1)), "gap or duplicate in delivery"
    assert [e["data"]["i"] for e in seen] == list(range(TOTAL)), "order or duplicate publish"
    assert all(seen[seq - 1]["data"]["i"] == i for i, seq in acked.items())
