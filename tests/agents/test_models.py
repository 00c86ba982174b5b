"""Model adapters: the OpenAI-compatible adapter against a local Chat Completions server (the
upstream, not a mock of tether), and the simulated model's determinism."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web

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


class Upstream:
    """A small server speaking the streaming Chat Completions API."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append({"body": body, "auth": request.headers.get("Authorization")})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def send(chunk: dict[str, Any]) -> None:
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")

        base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": body["model"]}
        if body["messages"][-1]["role"] == "tool":
            for piece in ["The ", "answer ", "is 5."]:
                await send({**base, "choices": [{"index": 0, "delta": {"content": piece}}]})
            await send({**base, "choices": [{"index": 0, "delta": {},
                                             "finish_reason": "stop"}]})
        else:
            await send({**base, "choices": [{"index": 0, "delta": {"role": "assistant",
                "tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                "function": {"name": "add", "arguments": ""}}]}}]})
            for piece in ['{"a": 2', ', "b": 3}']:
                await send({**base, "choices": [{"index": 0, "delta": {"tool_calls": [
                    {"index": 0, "function": {"arguments": piece}}]}}]})
            await send({**base, "choices": [{"index": 0, "delta": {},
                                             "finish_reason": "tool_calls"}]})
        await resp.write(b"data: [DONE]\n\n")
        return resp


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[Upstream, str]]:
    up = Upstream()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", up.completions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield up, f"http://127.0.0.1:{port}/v1"
    await runner.cleanup()


ADD = ToolSpec("add", "Add two numbers", {"type": "object", "properties": {
    "a": {"type": "integer"}, "b": {"type": "integer"}}})


async def test_openai_adapter_streams_a_tool_call_then_text(upstream: tuple[Upstream, str]
                                                             ) -> None:
    up, base_url = upstream
    model = OpenAIChatModel("local-model", base_url=base_url, api_key="sk-test")
    chunks = [c async for c in model.stream([Message("user", "add 2 and 3")], [ADD])]
    calls = [c for c in chunks if isinstance(c, ToolCallDelta)]
    assert calls[0].id == "call_1" and calls[0].name == "add"
    assert "".join(c.arguments for c in calls) == '{"a": 2, "b": 3}'
    assert isinstance(chunks[-1], Finish) and chunks[-1].reason == "tool_calls"
    sent = up.requests[0]
    assert sent["auth"] == "Bearer sk-test"
    assert sent["body"]["stream"] is True and sent["body"]["tools"][0]["function"]["name"] == "add"

    history = [Message("user", "add 2 and 3"),
               Message("assistant", "", (ToolCall("call_1", "add", '{"a": 2, "b": 3}'),)),
               Message("tool", "5", tool_call_id="call_1")]
    chunks = [c async for c in model.stream(history, [ADD])]
    assert "".join(c.text for c in chunks if isinstance(c, TextDelta)) == "The answer is 5."
    assert up.requests[1]["body"]["messages"][1]["tool_calls"][0]["id"] == "call_1"
    assert up.requests[1]["body"]["messages"][2] == {"role": "tool", "content": "5",
                                                     "tool_call_id": "call_1"}
    await model.aclose()


async def test_openai_adapter_reports_upstream_errors(upstream: tuple[Upstream, str]) -> None:
    _, base_url = upstream
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
