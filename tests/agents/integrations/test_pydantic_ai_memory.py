"""The Pydantic AI agent's memory is the session log: earlier turns derived from the events a
real store holds, sent to a model as Pydantic AI messages."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic_ai import Agent as PydanticAgent
from pydantic_ai import ModelMessagesTypeAdapter
from pydantic_ai.messages import ModelRequest, ModelResponse, ToolCallPart, ToolReturnPart
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider

from tether.agents.integrations.pydantic_ai import earlier_turns, serve
from tether.agents.runner import Run, RunManager
from tether.agents.state import RunRecord
from tether.agents.upstream import SimulatedUpstream
from tether.agents.upstream import serve as serve_upstream
from tether.protocol.events import Sender
from tether.store.base import SessionStore

ALICE = Sender("alice", "c1")
AGENT = Sender("agent:memory", "node", "agent")
SESSION = "chat-memory"


async def write(store: SessionStore, type_: str, data: Any, sender: Sender = AGENT) -> int:
    return (await store.append(SESSION, type_, data, sender)).event.seq


async def log_of(store: SessionStore) -> tuple[RunManager, Run]:
    """A session with two finished runs (a tool call, a refused approval, a steer, a call cut
    off), the message of the current run, and one queued after it."""
    await write(store, "message", {"text": "please add"}, ALICE)
    await write(store, "run.created", {"run": "run_1", "agent": "memory", "trigger": "message",
                                       "input": {"text": "please add", "message_seq": 1}})
    await write(store, "tool.call", {"run": "run_1", "call": "call_a", "name": "add",
                                     "arguments": {"a": 2, "b": 3}, "target": "server"})
    await write(store, "tool.result", {"run": "run_1", "call": "call_a", "result": 5})
    await write(store, "run.steer", {"run": "run_1", "text": "and deploy"}, ALICE)
    await write(store, "approval.request", {"run": "run_1", "call": "call_d", "name": "deploy",
                                            "arguments": {"target": "prod"}})
    await write(store, "tool.result", {"run": "run_1", "call": "call_d",
                                       "error": "reject by bob"})
    await write(store, "tool.call", {"run": "run_1", "call": "call_cut", "name": "add",
                                     "arguments": {"a": 1, "b": 1}, "target": "server"})
    await write(store, "stream.append", {"stream": "run_1.0", "run": "run_1",
                                         "text": "Five, and no deploy."})
    await write(store, "stream.end", {"stream": "run_1.0", "run": "run_1", "role": "assistant"})
    own = await write(store, "message", {"text": "what did we do?"}, ALICE)
    created = await write(store, "run.created", {
        "run": "run_2", "agent": "memory", "trigger": "message",
        "input": {"text": "what did we do?", "message_seq": own}})
    later = await write(store, "message", {"text": "and later?"}, ALICE)
    await write(store, "run.created", {"run": "run_3", "agent": "memory", "trigger": "message",
                                       "input": {"text": "and later?", "message_seq": later}})
    await write(store, "run.steer", {"run": "run_2", "text": "mine, not history"}, ALICE)
    manager = RunManager(store, "node")  # type: ignore[arg-type]  # presence is not used
    record = RunRecord("run_2", "memory", input={"text": "what did we do?", "message_seq": own},
                       created_seq=created)
    agent = serve(PydanticAgent("test"), sessions=[SESSION], name="memory")
    return manager, Run(manager, SESSION, record, agent, await manager.session_log(SESSION))


async def test_earlier_turns_from_the_log(store: SessionStore) -> None:
    _, run = await log_of(store)
    turns = earlier_turns(run)
    assert [type(m) for m in turns] == [ModelRequest, ModelResponse, ModelRequest, ModelResponse,
                                        ModelRequest, ModelResponse]
    assert turns[0].parts[0].content == "please add"
    call = turns[1].parts[0]
    assert isinstance(call, ToolCallPart) and call.tool_call_id == "call_a"
    assert call.args_as_dict() == {"a": 2, "b": 3}
    result = turns[2].parts[0]
    assert isinstance(result, ToolReturnPart) and result.content == 5
    assert turns[2].parts[1].content == "and deploy"  # a steer is the user's input
    refused = turns[4].parts[0]
    assert isinstance(refused, ToolReturnPart) and refused.content == {"error": "reject by bob"}
    assert turns[5].parts[0].content == "Five, and no deploy."
    # The call cut off has no result, so it is left out; the run's own input and steer, and
    # the message queued after it, are not history.
    everything = str(turns)
    for left_out in ("call_cut", "what did we do?", "mine, not history", "and later?"):
        assert left_out not in everything
    # Pydantic AI's own serialisation takes them (as a checkpoint does).
    dumped = ModelMessagesTypeAdapter.dump_python(turns, mode="json")
    assert ModelMessagesTypeAdapter.validate_python(dumped) == turns


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
async def test_a_model_takes_the_history(store: SessionStore) -> None:
    """The derived history is a valid Chat Completions conversation: an agent run sends it."""
    _, run = await log_of(store)
    upstream = SimulatedUpstream()
    runner = await serve_upstream("127.0.0.1", 0, upstream)
    try:
        port = runner.addresses[0][1]
        model = OpenAIChatModel("tether-simulated", provider=OpenAIProvider(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="unused"))
        result = await PydanticAgent(model).run(run.input_text(),
                                                message_history=earlier_turns(run))
    finally:
        await runner.cleanup()
    assert result.output
    sent = upstream.requests[-1]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool", "user", "assistant",
                                         "tool", "assistant", "user"]
    assert sent[-1]["content"] == "what did we do?"
