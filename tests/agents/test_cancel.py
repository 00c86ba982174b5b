"""A cancel reaches the run wherever it is: queued behind another run, or driven by another
node than the one the cancel was published on."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.agents.conftest import make_agent
from tests.agents.test_runs import APPROVER, device, events_until_final, until_event
from tests.helpers import SECRET, Peer, token
from tether.server import Server, ServerConfig


async def test_a_queued_run_that_is_cancelled_never_starts(agent_server: Server) -> None:
    a = await device(agent_server)
    await a.publish("s", "message", {"text": "deploy"})
    request = await until_event(a, "approval.request")
    first = request["data"]["run"]
    await until_event(a, "run.state", run=first, state="awaiting_approval")
    await a.publish("s", "message", {"text": "and then this"})  # queued behind the first
    second = (await until_event(a, "run.created", trigger="message"))["data"]["run"]
    reply = await a.publish("s", "run.cancel", {"run": second, "reason": "never mind"})
    assert reply["op"] == "published", reply
    cancelled = await until_event(a, "run.state", run=second, state="cancelled")
    assert cancelled["data"]["by"]["sub"] == "alice"
    again = await a.publish("s", "run.cancel", {"run": second})
    assert again["op"] == "error" and again["code"] == "run_finished"
    await a.publish("s", "approval.decision", {"run": first, "call": request["data"]["call"],
                                               "decision": "approve"})
    await until_event(a, "run.state", run=first, state="completed")
    log = await agent_server.store.read("s", 0, 10_000)
    states = [e.data["state"] for e in log
              if e.type == "run.state" and e.data["run"] == second]
    assert states == ["cancelled"]  # it never ran
    await a.close()


@pytest.fixture
async def two_nodes(tmp_path: Path, redis_url: str) -> AsyncIterator[tuple[Server, Server]]:
    servers = []
    for node in ("node1", "node2"):
        (tmp_path / node).mkdir()
        server = Server(ServerConfig(port=0, secret=SECRET, data_dir=tmp_path / node,
                                     store_url=redis_url, node_id=node))
        server.runs.register(make_agent(tokens_per_second=100, answer_tokens=2000))
        await server.start()
        servers.append(server)
    yield servers[0], servers[1]
    for server in servers:
        await server.stop()


@pytest.mark.redis
async def test_a_cancel_published_on_another_node_stops_the_run(
        two_nodes: tuple[Server, Server]) -> None:
    node1, node2 = two_nodes
    driver = await device(node1)
    await driver.publish("s", "message", {"text": "talk a lot"})
    delta = await until_event(driver, "stream.append")
    run = delta["data"]["run"]
    assert node1.runs.runs.get(run) is not None  # driven on node 1
    elsewhere = await Peer.connect(node2.port)
    await elsewhere.hello(token("bob", caps=APPROVER))
    await elsewhere.attach("s")
    reply = await elsewhere.publish("s", "run.cancel", {"run": run, "reason": "stop"})
    assert reply["op"] == "published", reply
    seen = await events_until_final(driver)
    final = seen[-1]
    assert final["data"]["run"] == run and final["data"]["state"] == "cancelled"
    assert final["data"]["by"]["sub"] == "bob"
    ended = [e for e in seen if e["type"] == "stream.end" and e["data"]["run"] == run]
    assert ended and ended[-1]["data"]["interrupted"] == "cancelled"
    assert node1.runs.runs.get(run) is None
    await driver.close()
    await elsewhere.close()
