"""Two `tether serve` nodes on one redis-server, and on one 3-master Redis Cluster: a
subscriber on node 1 follows a publisher on node 2; node 1 is killed with SIGKILL; the
subscriber resumes on node 2 with no gap and no duplicate. Also with ``--workers 2`` per node
(on Redis, each worker is a node of its own; node 1's whole process group is killed)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.helpers import Peer, ServerProcess

pytestmark = [pytest.mark.redis, pytest.mark.slow]

TOTAL = 1000
KILL_AT = 300


@pytest.mark.parametrize("redis", ["redis", "redis-cluster"])
@pytest.mark.parametrize("workers", [1, 2])
async def test_subscriber_moves_to_the_other_node_without_gap(
        tmp_path: Path, request: pytest.FixtureRequest, workers: int, redis: str) -> None:
    redis_url = request.getfixturevalue("redis_url" if redis == "redis" else "redis_cluster_url")
    nodes = []
    for name in ("node1", "node2"):
        data = tmp_path / name
        data.mkdir()
        nodes.append(ServerProcess(data, store=redis_url, extra=["--node", name],
                                   workers=workers).start())
    node1, node2 = nodes
    seen: list[dict[str, Any]] = []
    killed = asyncio.Event()
    resumed_on: list[int] = []

    async def subscriber() -> None:
        cursor: str | None = None
        port = node1.port
        while len(seen) < TOTAL:
            peer = await Peer.connect(port)
            try:
                await peer.hello()
                attached = await peer.attach("shared", cursor)
                assert attached["op"] == "attached" and attached["resumed"] is True, attached
                resumed_on.append(port)
                while len(seen) < TOTAL:
                    frame = await peer.recv(timeout=30)
                    if frame.get("op") != "event":
                        continue
                    seen.append(frame)
                    cursor = frame["cursor"]
                    if len(seen) == KILL_AT:
                        node1.kill()
                        killed.set()
            except (ConnectionError, aiohttp.ClientError, OSError):
                port = node2.port  # a load balancer would send us to a live node
            finally:
                with contextlib.suppress(Exception):
                    await peer.close()

    async def publisher() -> None:
        peer = await Peer.connect(node2.port)
        await peer.hello()
        for i in range(TOTAL):
            reply = await peer.publish("shared", "message", {"i": i}, key=f"k{i}")
            assert reply["op"] == "published", reply
        await peer.close()

    try:
        await asyncio.wait_for(asyncio.gather(subscriber(), publisher()), 120)
    finally:
        for node in nodes:
            node.stop()
    assert killed.is_set()
    assert resumed_on == [node1.port, node2.port]
    assert [e["seq"] for e in seen] == list(range(1, TOTAL + 1))
    assert [e["data"]["i"] for e in seen] == list(range(TOTAL))
