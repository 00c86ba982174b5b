"""TetherSession, the OpenAI Agents SDK ``Session`` kept in a tether session's log, against
every store; and the SDK itself running with it (no tether server) on the simulated model."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from agents import Agent, OpenAIChatCompletionsModel, Runner, SessionSettings, function_tool
from openai import AsyncOpenAI

from tether.agents.integrations.openai_agents import MEMORY, TetherSession
from tether.agents.upstream import SimulatedUpstream, serve
from tether.protocol.events import SERVER_TYPES
from tether.store.base import SessionStore


def user(text: str) -> Any:
    return {"role": "user", "content": text}


async def test_items_are_events_of_the_session(store: SessionStore) -> None:
    memory = TetherSession(store, "chat-1")
    assert await memory.get_items() == []
    await memory.add_items([user("a"), user("b")])
    await memory.add_items([user("c")])
    assert await memory.get_items() == [user("a"), user("b"), user("c")]
    assert await memory.get_items(limit=2) == [user("b"), user("c")]
    events = await store.read("chat-1", 0, 100)
    assert [e.type for e in events] == [MEMORY, MEMORY]
    assert events[0].data == {"memory": "chat-1", "add": [user("a"), user("b")]}
    assert MEMORY in SERVER_TYPES  # no client can forge the memory


async def test_pop_and_clear(store: SessionStore) -> None:
    memory = TetherSession(store, "chat-2")
    assert await memory.pop_item() is None
    await memory.add_items([user("a"), user("b")])
    assert await memory.pop_item() == user("b")
    assert await memory.get_items() == [user("a")]
    await memory.clear_session()
    assert await memory.get_items() == []
    await memory.add_items([user("c")])
    # Another reader (another node, a restart) folds the same log to the same items.
    assert await TetherSession(store, "chat-2").get_items() == [user("c")]


async def test_memories_and_other_events_share_a_session(store: SessionStore) -> None:
    from tether.protocol.events import Sender

    one = TetherSession(store, "chat-3")
    two = TetherSession(store, "chat-3", memory="planner",
                        session_settings=SessionSettings(limit=1))
    await one.add_items([user("for one")])
    await store.append("chat-3", "message", {"text": "hi"}, Sender("alice", "c1", "user"))
    await two.add_items([user("x"), user("y")])
    assert await one.get_items() == [user("for one")]
    assert await two.get_items() == [user("y")]  # the settings' limit
    assert await two.get_items(limit=5) == [user("x"), user("y")]


async def test_rewind_drops_a_cut_off_step(store: SessionStore) -> None:
    earlier = TetherSession(store, "chat-4", run="run_a")
    await earlier.add_items([user("first run")])
    memory = TetherSession(store, "chat-4", run="run_b")
    await memory.add_items([user("before the checkpoint")])
    checkpoint = (await store.head("chat-4")).last_seq
    await memory.add_items([user("cut"), user("off")])
    assert await memory.rewind("run_b", checkpoint) == 2
    assert await memory.get_items() == [user("first run"), user("before the checkpoint")]
    assert await memory.rewind("run_b", checkpoint) == 0  # nothing more: no event written
    assert await memory.rewind("run_b", 0) == 1  # never past another run's items
    assert await memory.get_items() == [user("first run")]


async def test_close_calls_answers_calls_without_output(store: SessionStore) -> None:
    memory = TetherSession(store, "chat-6", run="run_c")
    call: Any = {"type": "function_call", "call_id": "c1", "name": "deploy", "arguments": "{}"}
    done: Any = {"type": "function_call", "call_id": "c0", "name": "add", "arguments": "{}"}
    await memory.add_items([user("go"), done, {"type": "function_call_output", "call_id": "c0",
                                               "output": "5"}, call])
    assert await memory.close_calls("not run") == 1
    assert (await memory.get_items())[-1] == {"type": "function_call_output", "call_id": "c1",
                                              "output": "not run"}
    assert await memory.close_calls("not run") == 0


@pytest.fixture
async def model() -> AsyncIterator[tuple[OpenAIChatCompletionsModel, SimulatedUpstream]]:
    up = SimulatedUpstream(seed=3, answer_tokens=8, arguments={"add": {"a": 2, "b": 3}})
    runner = await serve("127.0.0.1", 0, up)
    base = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    yield OpenAIChatCompletionsModel(model="tether-simulated", openai_client=AsyncOpenAI(
        base_url=base, api_key="sk-test")), up
    await runner.cleanup()


async def test_the_sdk_remembers_through_it(
        store: SessionStore, model: tuple[OpenAIChatCompletionsModel, SimulatedUpstream]
) -> None:
    """Runner.run with session=TetherSession: a second run (another Session object, as after
    a restart) sends the first turn to the model."""
    import agents

    agents.set_tracing_disabled(True)

    @function_tool
    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    agent = Agent(name="calc", model=model[0], tools=[add])
    first = await Runner.run(agent, "please add", session=TetherSession(store, "chat-5"))
    assert first.final_output
    await Runner.run(agent, "thanks", session=TetherSession(store, "chat-5"))
    sent = model[1].requests[-1]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool", "assistant", "user"]
    assert sent[2]["content"] == "5" and sent[3]["content"] == first.final_output


def test_tether_imports_the_module_without_the_sdk() -> None:
    """The SDK is an optional dependency: only serving an agent imports it."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['agents'] = None; "
            "import tether.agents.integrations.openai_agents")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_serve_refuses_what_cannot_map() -> None:
    from tether.agents import client_tool, tool
    from tether.agents.integrations.openai_agents import function_tool_of
    from tether.agents.integrations.openai_agents import serve as serve_agent

    with pytest.raises(ValueError, match="mid-turn"):
        serve_agent(Agent(name="a"), busy="merge")

    @tool
    def add(a: int, b: int) -> int:
        return a + b

    with pytest.raises(ValueError, match="server tool"):
        function_tool_of(add)
    ask = function_tool_of(client_tool("ask", "Ask", {"type": "object", "properties": {}}))
    assert ask.name == "ask" and ask.needs_approval is True


def test_a_client_function_tool_stays_one_when_copied() -> None:
    """The SDK may copy tools (dataclasses.replace): the front-end mark is the invoker."""
    import dataclasses

    from tether.agents.integrations.openai_agents import ClientAnswer, client_function_tool

    @client_function_tool(timeout=30.0)
    def ask(q: str) -> str:
        """Ask the user a question."""
        raise NotImplementedError

    assert ask.name == "ask" and ask.description == "Ask the user a question."
    assert ask.params_json_schema["required"] == ["q"] and ask.needs_approval is True
    copied = dataclasses.replace(ask, description="Ask")
    assert isinstance(copied.on_invoke_tool, ClientAnswer)
    assert copied.on_invoke_tool.timeout == 30.0
