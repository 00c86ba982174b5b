"""Model adapters: the OpenAI-compatible adapter against a local Chat Completions server (the
upstream, not a mock of tether: ``tests.helpers.ChatUpstream``), and the simulated model."""

from __future__ import annotations

import pytest

from tests.helpers import ChatUpstream
from tether.agents.models import (
    Finish,
    Message,
    OpenAIChatModel,
    ScriptedCall,
    SimulatedModel,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    ToolSpec,
    call_tools_in_order,
)

ADD = ToolSpec("add", "Add two numbers", {"type": "object", "properties": {
    "a": {"type": "integer"}, "b": {"type": "integer"}}})


async def test_openai_adapter_streams_a_tool_call_then_text(
        chat_upstream: tuple[ChatUpstream, str]) -> None:
    up, base_url = chat_upstream
    model = OpenAIChatModel("local-model", base_url=base_url, api_key="sk-test")
    chunks = [c async for c in model.stream([Message("user", "add 2 and 3")], [ADD])]
    calls = [c for c in chunks if isinstance(c, ToolCallDelta)]
    assert calls[0].id == "call_up1" and calls[0].name == "add"
    assert "".join(c.arguments for c in calls) == '{"a": 2, "b": 3}'
    assert isinstance(chunks[-1], Finish) and chunks[-1].reason == "tool_calls"
    assert up.auth[0] == "Bearer sk-test"
    sent = up.requests[0]
    assert sent["stream"] is True and sent["tools"][0]["function"]["name"] == "add"

    history = [Message("user", "add 2 and 3"),
               Message("assistant", "", (ToolCall("call_up1", "add", '{"a": 2, "b": 3}'),)),
               Message("tool", "5", tool_call_id="call_up1")]
    chunks = [c async for c in model.stream(history, [ADD])]
    assert "".join(c.text for c in chunks if isinstance(c, TextDelta)) == "The sum is 5."
    assert isinstance(chunks[-1], Finish) and chunks[-1].usage["prompt_tokens"] == 11
    assert up.requests[1]["messages"][1]["tool_calls"][0]["id"] == "call_up1"
    assert up.requests[1]["messages"][2] == {"role": "tool", "content": "5",
                                             "tool_call_id": "call_up1"}
    await model.aclose()


async def test_openai_adapter_reports_upstream_errors(
        chat_upstream: tuple[ChatUpstream, str]) -> None:
    _, base_url = chat_upstream
    from tether.agents.models import ModelError

    model = OpenAIChatModel("m", base_url=base_url + "/nope")
    with pytest.raises(ModelError):
        async for _ in model.stream([Message("user", "x")], []):
            pass
    await model.aclose()


async def test_simulated_model_is_deterministic_and_scripted() -> None:
    model = SimulatedModel(seed=3, ttft=0, tokens_per_second=0, answer_tokens=12,
                           script=call_tools_in_order([ScriptedCall("add", {"a": 1, "b": 2})]))
    convo = [Message("user", "hi")]
    first = [c async for c in model.stream(convo, [ADD])]
    assert isinstance(first[0], ToolCallDelta) and first[0].name == "add"
    text = [c async for c in SimulatedModel(seed=3, ttft=0, tokens_per_second=0,
                                            answer_tokens=12).stream(convo, [])]
    again = [c async for c in SimulatedModel(seed=3, ttft=0, tokens_per_second=0,
                                             answer_tokens=12).stream(convo, [])]
    assert text == again and len([c for c in text if isinstance(c, TextDelta)]) == 12
