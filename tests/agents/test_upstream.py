"""The simulated model behind Chat Completions, read by the official ``openai`` client."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from openai import AsyncOpenAI

from tether.agents.upstream import SimulatedUpstream, example_arguments, serve

ADD = {"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                        "parameters": {"type": "object", "properties": {
                                            "a": {"type": "integer"},
                                            "b": {"type": "integer", "default": 7}}}}}


@pytest.fixture
async def client() -> AsyncIterator[tuple[AsyncOpenAI, SimulatedUpstream, str]]:
    upstream = SimulatedUpstream(answer_tokens=10)
    runner = await serve("127.0.0.1", 0, upstream)
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    async with AsyncOpenAI(base_url=url, api_key="unused") as openai:
        yield openai, upstream, url
    await runner.cleanup()


async def test_streams_text_and_usage(client: tuple[AsyncOpenAI, SimulatedUpstream, str]
                                      ) -> None:
    openai, _, _ = client
    stream = await openai.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hello"}], stream=True,
        stream_options={"include_usage": True})
    text, finish, usage = "", None, None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    assert len(text.split()) == 10 and finish == "stop"
    assert usage is not None and usage.completion_tokens == 10


async def test_calls_each_named_tool_then_answers(
        client: tuple[AsyncOpenAI, SimulatedUpstream, str]) -> None:
    openai, _, _ = client
    messages: list[dict[str, object]] = [{"role": "user", "content": "please add, then add"}]
    for _ in range(2):
        reply = await openai.chat.completions.create(model="m", messages=messages,
                                                     tools=[ADD])
        call = reply.choices[0].message.tool_calls[0]
        assert call.function.name == "add"
        assert call.function.arguments == '{"a":2,"b":7}'
        messages += [{"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": "add",
                                                             "arguments": "{}"}}]},
                     {"role": "tool", "tool_call_id": call.id, "content": "9"}]
    reply = await openai.chat.completions.create(model="m", messages=messages,
                                                 tools=[ADD])
    assert reply.choices[0].finish_reason == "stop" and reply.choices[0].message.content


async def test_a_tool_not_offered_is_not_called(
        client: tuple[AsyncOpenAI, SimulatedUpstream, str]) -> None:
    openai, _, _ = client
    reply = await openai.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "please add"}])
    assert reply.choices[0].message.tool_calls is None


async def test_bad_bodies_are_400_with_a_json_error(
        client: tuple[AsyncOpenAI, SimulatedUpstream, str]) -> None:
    _, upstream, url = client
    async with aiohttp.ClientSession() as http:
        for body in (b"{", b"[]", b'{"messages": 3}'):
            resp = await http.post(f"{url}/chat/completions", data=body)
            assert resp.status == 400
            assert "message" in (await resp.json())["error"]
    assert upstream.requests == []


def test_example_arguments_follow_the_schema() -> None:
    schema = {"properties": {"s": {"type": "string"}, "n": {"type": ["null", "number"]},
                             "e": {"enum": ["x", "y"]}, "d": {"type": "integer", "default": 4},
                             "u": {"anyOf": [{"type": "boolean"}, {"type": "null"}]}}}
    assert example_arguments(schema) == {"s": "demo", "n": 2, "e": "x", "d": 4, "u": True}
