"""Model adapters: the OpenAI-compatible adapter against a local Chat Completions server (the
upstream, not a mock of tether: ``tests.helpers.ChatUpstream``), and the simulated model."""

from __future__ import annotations

import re

import pytest

from tests.helpers import ChatUpstream
from tether.agents.models import (
    SIMULATED_CLOSERS,
    SIMULATED_TEXT,
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


def _answer(seed: int, convo: list[Message], tokens: int = 60) -> str:
    return "".join(SimulatedModel(seed=seed, answer_tokens=tokens).answer(convo))


def test_simulated_answers_depend_only_on_the_seed_and_the_conversation() -> None:
    hello = [Message("user", "hello")]
    assert _answer(7, hello) == _answer(7, [Message("user", "hello")])
    answers = {_answer(seed, hello) for seed in range(12)}
    assert len(answers) > 1, "the seed picks where the answer starts"
    longer = [*hello, Message("assistant", "hi"), Message("user", "hello")]
    assert _answer(7, longer) == _answer(7, list(longer))
    assert len({_answer(7, [Message("user", f"question {i}")]) for i in range(12)}) > 1


@pytest.mark.parametrize("tokens", [1, 2, 3, 5, 8, 12, 40, 60, 120, 2000])
def test_simulated_answers_are_sentences_from_the_built_in_text(tokens: int) -> None:
    split = re.compile(r"(?<=\.)\s+(?=[A-Z])")
    known = {s for paragraph in SIMULATED_TEXT for s in split.split(paragraph)}
    known |= {*SIMULATED_CLOSERS, "Simulated.", "Simulated answer."}
    for seed in range(6):
        convo = [Message("system", "be brief"), Message("user", f"hello {seed}")]
        pieces = SimulatedModel(seed=seed, answer_tokens=tokens).answer(convo)
        assert len(pieces) == tokens  # one word per token, as many as asked
        assert all(p.strip() and " " not in p.strip() for p in pieces)
        text = "".join(pieces)
        assert text[0].isupper() and text.endswith(".")
        sentences = split.split(text)
        assert all(s[0].isupper() and s.endswith(".") for s in sentences), text
        assert set(sentences) <= known, text  # whole sentences of the text, nothing shuffled


async def test_simulated_model_streams_its_sentences_token_by_token() -> None:
    convo = [Message("user", "hello")]
    model = SimulatedModel(seed=7, ttft=0, tokens_per_second=0, answer_tokens=30)
    chunks = [c async for c in model.stream(convo, [])]
    deltas = [c.text for c in chunks if isinstance(c, TextDelta)]
    assert deltas == model.answer(convo) and len(deltas) == 30
    assert isinstance(chunks[-1], Finish) and chunks[-1].usage["output_tokens"] == 30
