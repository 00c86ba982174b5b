"""Chains outlive connections: reconnect, restart (even SIGKILL), another node on Redis.

Each test runs a control loop on one connection and the same loop split across connections (or
nodes); the simulated model is deterministic, so equal outputs prove the split loop's model saw
the same full history.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx2
import orjson
import pytest
from openai import AsyncOpenAI

from tests.helpers import ServerProcess, token
from tests.responses.conftest import FAST, MODEL, TOOLS, Harness, parse_event
from tests.responses.test_sdk import TASK, next_response, tool_output

CONFIG_ENV = {"TETHER_RESPONSES_CONFIG": orjson.dumps({"models": {MODEL: FAST}}).decode()}


class Loop:
    """An agent loop that can move between connections: it carries the last id and the
    pending tool outputs, nothing else."""

    def __init__(self) -> None:
        self.previous: str | None = None
        self.pending: Any = TASK
        self.seen: list[tuple[Any, ...]] = []

    async def turn(self, client: AsyncOpenAI, final: bool = False) -> None:
        async with client.responses.connect() as conn:
            await conn.response.create(model=MODEL, input=self.pending, tools=TOOLS,
                                       tool_choice="none" if final else "auto",
                                       previous_response_id=self.previous)
            raws, event = await next_response(conn)
        assert event.type == "response.completed", raws[-1]
        response = event.response
        self.previous = response.id
        calls = [i for i in response.output if i.type == "function_call"]
        self.pending = [{"type": "function_call_output", "call_id": c.call_id,
                         "output": tool_output(c)} for c in calls]
        assert response.usage is not None
        self.seen.append((tuple((c.call_id, c.name, c.arguments) for c in calls),
                          response.output_text, response.usage.input_tokens))


def client_for(port: int, sub: str = "alice") -> AsyncOpenAI:
    return AsyncOpenAI(api_key=token(sub), base_url=f"http://127.0.0.1:{port}/v1",
                       max_retries=0, http_client=httpx2.AsyncClient(trust_env=False))


async def control_run(client: AsyncOpenAI, turns: int) -> list[tuple[Any, ...]]:
    loop = Loop()
    for i in range(turns):
        await loop.turn(client, final=i == turns - 1)
    return loop.seen


@pytest.mark.parametrize("source", ["node memory", "store"])
async def test_reconnect_mid_loop_continues(harness: Harness, source: str) -> None:
    client = harness.client()
    expected = await control_run(client, 5)
    loop = Loop()
    for i in range(5):  # a new connection for every turn
        if source == "store":
            harness.service.chains._cache.clear()
        await loop.turn(client, final=i == 4)
    await client.close()
    assert loop.seen == expected
    assert all(seen[0] for seen in expected[:4]) and expected[4][1]


async def test_restart_continues_from_the_store(
        make_harness: Callable[..., Awaitable[Harness]], tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'shared'}"
    first = await make_harness(url)
    client = first.client()
    expected = await control_run(client, 4)
    loop = Loop()
    await loop.turn(client)
    await loop.turn(client)
    await client.close()
    await first.server.stop()
    second = await make_harness(url)
    client = second.client()
    await loop.turn(client)
    await loop.turn(client, final=True)
    await client.close()
    assert loop.seen == expected


@pytest.mark.slow
def test_sigkill_then_continue(tmp_path: Path) -> None:
    """The response is committed before ``response.completed`` is sent: SIGKILL loses nothing
    the client was told about."""
    data = tmp_path / "data"
    data.mkdir()
    node = ServerProcess(data, env=CONFIG_ENV).start()
    try:
        async def before() -> tuple[list[Any], Loop]:
            client = client_for(node.port)
            expected = await control_run(client, 3)
            loop = Loop()
            await loop.turn(client)
            await loop.turn(client)
            await client.close()
            return expected, loop

        expected, loop = asyncio.run(before())
        node.kill()
        node.start()

        async def after() -> None:
            client = client_for(node.port)
            await loop.turn(client, final=True)
            await client.close()

        asyncio.run(after())
    finally:
        node.stop()
    assert loop.seen == expected


@pytest.mark.redis
@pytest.mark.slow
def test_another_node_continues_with_redis(tmp_path: Path, redis_url: str) -> None:
    nodes = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        nodes.append(ServerProcess(tmp_path / name, store=redis_url, env=CONFIG_ENV))
    try:
        for node in nodes:
            node.start()
        a, b = nodes

        async def scenario() -> None:
            client_a, client_b = client_for(a.port), client_for(b.port)
            expected = await control_run(client_a, 5)
            loop = Loop()
            for i, client in enumerate([client_a, client_b, client_a, client_b, client_b]):
                await loop.turn(client, final=i == 4)
            assert loop.seen == expected
            # Another subject asking node b for alice's chain learns nothing.
            bob = client_for(b.port, "bob")
            async with bob.responses.connect() as conn:
                await conn.response.create(model=MODEL, input="x",
                                           previous_response_id=loop.previous)
                raws, event = await next_response(conn)
            assert event.type == "error" and event.error.code == "previous_response_not_found"
            assert len(raws) == 1
            for client in (client_a, client_b, bob):
                await client.close()

        asyncio.run(scenario())
    finally:
        for node in nodes:
            node.stop()


async def test_store_false_stays_on_its_connection(harness: Harness) -> None:
    client = harness.client()
    async with client.responses.connect() as conn:
        await conn.response.create(model=MODEL, input="hi", store=False)
        _, event = await next_response(conn)
        rid = event.response.id
        await conn.response.create(model=MODEL, input="more", previous_response_id=rid)
        _, event = await next_response(conn)
        assert event.type == "response.completed"  # same connection: from memory
    async with client.responses.connect() as conn:
        await conn.response.create(model=MODEL, input="more", previous_response_id=rid)
        _, event = await next_response(conn)
        assert event.type == "error" and event.error.code == "previous_response_not_found"
    await client.close()


async def test_a_dropped_client_still_gets_its_response_stored(harness: Harness) -> None:
    """The socket closes right after response.created: the response completes anyway, is
    stored, and can be fetched and continued from a new connection."""
    from tests.responses.conftest import GateBackend

    gate = GateBackend()
    harness.service.models.register("gated", gate)
    sock = await harness.raw()
    await sock.create(model="gated", input="x", metadata={"gate": "g"})
    created = await sock.recv()
    assert created["type"] == "response.created"
    rid = created["response"]["id"]
    await sock.close()
    gate.open("g")
    # The response finishes in the background: wait for the server's task, not for a clock.
    if harness.service.tasks:
        await asyncio.wait(list(harness.service.tasks))
    client = harness.client()
    fetched = await client.responses.retrieve(rid)
    assert fetched.status == "completed" and fetched.output_text == "g"
    parse_event({"type": "response.completed", "sequence_number": 0,
                 "response": fetched.model_dump()})
    await client.close()
