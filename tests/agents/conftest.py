from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.helpers import SECRET
from tether.agents.agent import Agent
from tether.agents.models import ScriptedCall, SimulatedModel, call_tools_in_order
from tether.agents.tools import client_tool, tool
from tether.server import Server, ServerConfig


@tool
def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


@tool(requires_approval=True)
def deploy(target: str) -> dict[str, str]:
    """Deploy to a target (needs approval)."""
    return {"deployed": target}


ask = client_tool("ask", "Ask the user", {"type": "object",
                                          "properties": {"q": {"type": "string"}}})

CALLS = {
    "add": ScriptedCall("add", {"a": 2, "b": 3}),
    "deploy": ScriptedCall("deploy", {"target": "staging"}),
    "ask": ScriptedCall("ask", {"q": "which color?"}),
}


def script(messages):  # type: ignore[no-untyped-def]
    turn = max(i for i, m in enumerate(messages) if m.role == "user")
    wanted = [CALLS[w] for w in messages[turn].content.split() if w in CALLS]
    return call_tools_in_order(wanted)(messages)


def make_agent(tokens_per_second: float = 0.0, answer_tokens: int = 30) -> Agent:
    return Agent("tester", SimulatedModel(seed=1, ttft=0.0, tokens_per_second=tokens_per_second,
                                          answer_tokens=answer_tokens, script=script),
                 tools=[add, deploy, ask], coalesce_window=0.005, coalesce_bytes=64)


@pytest.fixture
async def agent_server(tmp_path: Path) -> AsyncIterator[Server]:
    config = ServerConfig(port=0, secret=SECRET, data_dir=tmp_path, store_url="memory://")
    srv = Server(config)
    srv.runs.register(make_agent())
    await srv.start()
    yield srv
    await srv.stop()
