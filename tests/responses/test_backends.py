"""Backends: an OpenAI-compatible Chat Completions upstream gets the full history rebuilt from the
chain; the simulation follows tool_choice; configuration from the environment."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from tests.helpers import ChatUpstream
from tests.responses.conftest import Harness
from tether.agents.models import Message, ToolCall
from tether.responses import OpenAIChatBackend, ResponsesConfig, SimulatedBackend
from tether.responses.backends import Models
from tether.responses.config import parse_inherit
from tether.responses.items import CreateRequest, parse_create, to_messages

ADD = [{"type": "function", "name": "add", "description": "Add two integers",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                                                        "b": {"type": "integer"}}}}]


async def test_chat_upstream_receives_the_full_history(
        harness: Harness, chat_upstream: tuple[ChatUpstream, str]) -> None:
    up, base_url = chat_upstream
    harness.service.models.register("local-llm", OpenAIChatBackend(
        base_url, api_key="sk-upstream", model="llama-upstream"))
    sock = await harness.raw()
    await sock.create(model="local-llm", input="add 2 and 3", tools=ADD,
                      instructions="Use the tools.", stream_id="m")
    first = await sock.response("m")
    done = first[-1]
    assert done["type"] == "response.completed", done
    call = done["response"]["output"][0]
    assert call["type"] == "function_call" and call["name"] == "add"
    assert call["call_id"] == "call_up1" and call["arguments"] == '{"a": 2, "b": 3}'
    assert done["response"]["usage"]["input_tokens"] == 11
    # The continuation sends only the tool output; tether sends the upstream everything.
    await sock.create(model="local-llm", previous_response_id=done["response"]["id"],
                      tools=ADD, instructions="Use the tools.", stream_id="m",
                      input=[{"type": "function_call_output", "call_id": "call_up1",
                              "output": "5"}])
    second = await sock.response("m")
    assert second[-1]["response"]["output"][0]["content"][0]["text"] == "The sum is 5."
    await sock.close()
    body = up.requests[1]
    assert body["model"] == "llama-upstream" and body["stream"] is True
    assert body["messages"] == [
        {"role": "system", "content": "Use the tools."},
        {"role": "user", "content": "add 2 and 3"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_up1", "type": "function",
             "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
        {"role": "tool", "content": "5", "tool_call_id": "call_up1"},
    ]
    assert body["tools"][0]["function"]["name"] == "add"
    assert body["tool_choice"] == "auto"


async def test_upstream_failure_is_a_failed_response(harness: Harness) -> None:
    harness.service.models.register("down", OpenAIChatBackend("http://127.0.0.1:9/v1",
                                                              timeout=2.0))
    sock = await harness.raw()
    await sock.create(model="down", input="x")
    events = await sock.response()
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["error"]["code"] == "server_error"
    await sock.close()


async def test_max_output_tokens_gives_an_incomplete_response(harness: Harness) -> None:
    sock = await harness.raw()
    await sock.create(input="x", max_output_tokens=3)
    events = await sock.response()
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert sum(e["type"] == "response.output_text.delta" for e in events) == 3
    await sock.close()


async def test_inherit_tools_and_instructions_when_asked(harness: Harness) -> None:
    sock = await harness.raw(query="?inherit=tools,instructions")
    await sock.create(input="go", tools=ADD, instructions="Be brief.")
    first = (await sock.response())[-1]["response"]
    call = first["output"][0]
    await sock.create(previous_response_id=first["id"], model=None,
                      input=[{"type": "function_call_output", "call_id": call["call_id"],
                              "output": "5"}])
    second = (await sock.response())[-1]["response"]
    assert second["tools"] == first["tools"] and second["instructions"] == "Be brief."
    assert second["model"] == first["model"]
    await sock.close()
    plain = await harness.raw()  # by default, as OpenAI: nothing carried over
    await plain.create(previous_response_id=first["id"], input="again")
    third = (await plain.response())[-1]["response"]
    assert third["tools"] == [] and third["instructions"] is None
    await plain.close()


def test_simulation_follows_tool_choice() -> None:
    sim = SimulatedBackend(ttft=0, tokens_per_second=0, tool_calls_per_turn=2)

    def script_call(choice: Any, history: list[Message]) -> Any:
        request = CreateRequest(model="m", input=[], tool_choice=choice)
        from tether.responses.items import tool_specs

        model = sim.model("m", request, tool_specs(parse_create(
            {"model": "m", "tools": ADD}, transport="ws").tools or []))
        script = model.script  # type: ignore[attr-defined]
        return script(history)

    user = [Message("user", "hi")]
    assert script_call("auto", user).name == "add"
    assert script_call("none", user) is None
    two_calls = [*user, Message("assistant", "", (ToolCall("c1", "add", "{}"),)),
                 Message("tool", "1", tool_call_id="c1"),
                 Message("assistant", "", (ToolCall("c2", "add", "{}"),)),
                 Message("tool", "1", tool_call_id="c2")]
    assert script_call("auto", two_calls) is None  # its per-turn limit
    assert script_call("required", two_calls).name == "add"
    args = script_call("auto", user).arguments
    assert isinstance(args["a"], int) and isinstance(args["b"], int)


def test_items_become_chat_messages() -> None:
    request = parse_create({"model": "m", "input": [
        {"role": "developer", "content": "rules"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"},
                                                         {"type": "input_text", "text": "b"}]},
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "let me look", "annotations": []}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "function_call_output", "call_id": "c1", "output": "one"},
        {"type": "function_call_output", "call_id": "c2",
         "output": [{"type": "input_text", "text": "two"}]},
    ]}, transport="http")
    assert to_messages(request.input) == [
        Message("system", "rules"), Message("user", "ab"),
        Message("assistant", "let me look", (ToolCall("c1", "f", "{}"),
                                             ToolCall("c2", "g", "{}"))),
        Message("tool", "one", tool_call_id="c1"), Message("tool", "two", tool_call_id="c2"),
    ]


def test_configuration_from_the_environment(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Any) -> None:
    settings = {"models": {"sim": {"backend": "simulated", "ttft": 0.5},
                           "*": {"backend": "openai", "base_url": "http://127.0.0.1:1/v1"}},
                "max_connection_seconds": 120, "inherit": "tools"}
    monkeypatch.setenv("TETHER_RESPONSES_CONFIG", orjson.dumps(settings).decode())
    config = ResponsesConfig.from_env()
    assert config.max_connection_seconds == 120.0 and config.inherit == {"tools"}
    models = Models.from_specs(config.models)
    sim = models.get("sim")
    assert isinstance(sim, SimulatedBackend) and sim.ttft == 0.5
    assert isinstance(models.get("anything-else"), OpenAIChatBackend)
    path = tmp_path / "responses.json"
    path.write_text(orjson.dumps({"max_lanes": 4}).decode())
    monkeypatch.setenv("TETHER_RESPONSES_CONFIG", str(path))
    assert ResponsesConfig.from_env().max_lanes == 4
    with pytest.raises(ValueError):
        ResponsesConfig.from_dict({"no_such_setting": 1})
    with pytest.raises(ValueError):
        parse_inherit("tools,model")
    with pytest.raises(ValueError):
        Models.from_specs({"x": {"backend": "quantum"}})
