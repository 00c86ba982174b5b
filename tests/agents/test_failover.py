"""With the Redis store, runs are leased to a node; when that node dies another picks the run
up: a run awaiting approval on node 1 completes on node 2 after node 1 is killed."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from tests.agents.test_runs import APPROVER, until_event
from tests.helpers import Peer, ServerProcess, token

pytestmark = [pytest.mark.redis, pytest.mark.slow]


async def connect(port: int) -> Peer:
    peer = await Peer.connect(port)
    await peer.hello(token(caps=APPROVER))
    attached = await peer.attach("demo-failover")
    assert attached["op"] == "attached"
    return peer


async def test_a_dead_nodes_run_is_picked_up_by_another(tmp_path: Path, redis_url: str) -> None:
    env = {"TETHER_LEASE_SECONDS": "1"}
    nodes = []
    for name in ("node1", "node2"):
        (tmp_path / name).mkdir()
        nodes.append(ServerProcess(tmp_path / name, store=redis_url, env=env, extra=[
            "--node", name, "--agent", "tests.agents.fast_demo:agent"]).start())
    node1, node2 = nodes
    try:
        on_node1 = await connect(node1.port)
        await on_node1.publish("demo-failover", "message", {"text": "send the report"})
        request = await until_event(on_node1, "approval.request")
        await until_event(on_node1, "run.state", state="awaiting_approval")
        await on_node1.close()
        node1.kill()

        on_node2 = await connect(node2.port)
        data = request["data"]
        reply = await on_node2.publish("demo-failover", "approval.decision", {
            "run": data["run"], "call": data["call"], "decision": "approve"})
        assert reply["op"] == "published", reply
        done = await until_event(on_node2, "run.state", run=data["run"], state="completed")
        assert done["sender"]["client"] == "node2"  # the run finished on the surviving node
        async with aiohttp.ClientSession() as http:
            resp = await http.get(
                f"http://127.0.0.1:{node2.port}/v1/sessions/demo-failover/events",
                params={"limit": "1000"}, headers={"Authorization": f"Bearer {token()}"})
            events = (await resp.json())["events"]
        results = [e for e in events if e["type"] == "tool.result"]
        assert len(results) == 1 and results[0]["data"]["result"]["status"] == "sent"
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    finally:
        for node in nodes:
            node.stop()
