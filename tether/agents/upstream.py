"""The simulated model behind the OpenAI Chat Completions wire: ``tether simulated-model``.

Agents written with a framework (the OpenAI Agents SDK, Pydantic AI, LangGraph with
``langchain-openai``) talk to their model through an OpenAI client. To run them with no API key
and no network, point that client here: ``POST /v1/chat/completions`` answers, streaming or
not, with :class:`~tether.agents.models.SimulatedModel`'s deterministic text. It is a
stand-in, not a model: it understands nothing.

Tools follow a keyword script, so a conversation can exercise tool calls on purpose: every word
of the latest user message that is the name of a tool offered in the request is one call, made
in order, one per model step, each after the previous one's result came back. Arguments come
from ``arguments[name]`` when given, otherwise from the tool's JSON schema (its defaults, else
a plain value of each property's type).
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from aiohttp import web

from tether.agents.models import (
    Finish,
    Message,
    ScriptedCall,
    SimulatedModel,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    ToolSpec,
)

_PLAIN: dict[str, Any] = {"string": "demo", "integer": 2, "number": 2, "boolean": True,
                          "array": [], "object": {}}


def example_arguments(schema: Mapping[str, Any]) -> dict[str, Any]:
    """Arguments that satisfy a simple JSON schema: defaults, else a plain value per type."""
    properties = schema.get("properties") or {}
    out: dict[str, Any] = {}
    for name, prop in properties.items():
        if not isinstance(prop, dict):
            continue
        if "default" in prop:
            out[name] = prop["default"]
        elif prop.get("enum"):
            out[name] = prop["enum"][0]
        else:
            kind = prop.get("type")
            if isinstance(kind, list):
                kind = next((k for k in kind if k != "null"), "string")
            if kind is None and isinstance(prop.get("anyOf"), list) and prop["anyOf"]:
                kind = prop["anyOf"][0].get("type")
            out[name] = _PLAIN.get(str(kind), "demo")
    return out


class KeywordScript:
    """Call each tool the latest user message names, in order, one per model step."""

    def __init__(self, tools: Sequence[dict[str, Any]],
                 arguments: Mapping[str, dict[str, Any]]) -> None:
        self.schemas = {t["name"]: t.get("parameters") or {} for t in tools}
        self.arguments = arguments

    def __call__(self, messages: Sequence[Message]) -> ScriptedCall | None:
        turn = max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)
        if turn < 0:
            return None
        words = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", messages[turn].content)
        wanted = [w for w in words if w in self.schemas]
        made = sum(len(m.tool_calls) for m in messages[turn + 1:] if m.role == "assistant")
        if made >= len(wanted):
            return None
        name = wanted[made]
        given = self.arguments.get(name)
        return ScriptedCall(name, dict(given) if given is not None
                            else example_arguments(self.schemas[name]))


def _content(value: Any) -> str:
    """A message's content as text (OpenAI clients may send a list of content parts)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(str(p.get("text", "")) for p in value if isinstance(p, dict))
    return ""


def parse_messages(raw: Sequence[Any]) -> list[Message]:
    messages = []
    for m in raw:
        if not isinstance(m, dict):
            continue
        calls = tuple(ToolCall(str(c.get("id", "")), str(c["function"].get("name", "")),
                               str(c["function"].get("arguments", "")))
                      for c in m.get("tool_calls") or () if isinstance(c, dict)
                      and isinstance(c.get("function"), dict))
        role = str(m.get("role", "user"))
        messages.append(Message("system" if role == "developer" else role,
                                _content(m.get("content")), calls, m.get("tool_call_id")))
    return messages


class SimulatedUpstream:
    """``POST /v1/chat/completions`` answered by the simulated model. Requests are kept in
    :attr:`requests` (the tests read what a framework sent)."""

    def __init__(self, *, seed: int = 0, ttft: float = 0.0, tokens_per_second: float = 0.0,
                 answer_tokens: int = 24,
                 arguments: Mapping[str, dict[str, Any]] | None = None) -> None:
        self.seed = seed
        self.ttft = ttft
        self.tokens_per_second = tokens_per_second
        self.answer_tokens = answer_tokens
        self.arguments = dict(arguments or {})
        self.requests: list[dict[str, Any]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        return app

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": "tether-simulated", "object": "model", "owned_by": "tether"}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json(loads=orjson.loads)
        except ValueError:
            return _error(400, "the body is not JSON")
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return _error(400, "'messages' must be a list")
        self.requests.append(body)
        tools = [t["function"] for t in body.get("tools") or ()
                 if isinstance(t, dict) and isinstance(t.get("function"), dict)
                 and isinstance(t["function"].get("name"), str)]
        model = SimulatedModel(seed=self.seed, ttft=self.ttft,
                               tokens_per_second=self.tokens_per_second,
                               answer_tokens=self.answer_tokens,
                               script=KeywordScript(tools, self.arguments),
                               name=str(body.get("model") or "tether-simulated"))
        specs = [ToolSpec(t["name"], str(t.get("description", "")), t.get("parameters") or {})
                 for t in tools]
        chunks = model.stream(parse_messages(body["messages"]), specs)
        base = {"id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": model.name}
        if not body.get("stream"):
            return await self._whole(base, chunks)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)

        async def send(choices: list[dict[str, Any]], **extra: Any) -> None:
            chunk = {**base, "choices": choices, **extra}
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")

        await send([{"index": 0, "delta": {"role": "assistant", "content": ""}}])
        usage: dict[str, Any] = {}
        async for chunk in chunks:
            if isinstance(chunk, TextDelta):
                await send([{"index": 0, "delta": {"content": chunk.text}}])
            elif isinstance(chunk, ToolCallDelta):
                call: dict[str, Any] = {"index": chunk.index,
                                        "function": {"arguments": chunk.arguments}}
                if chunk.id is not None:
                    call.update(id=chunk.id, type="function")
                    call["function"]["name"] = chunk.name
                await send([{"index": 0, "delta": {"tool_calls": [call]}}])
            elif isinstance(chunk, Finish):
                usage = _usage(chunk.usage)
                await send([{"index": 0, "delta": {}, "finish_reason": chunk.reason}])
        if (body.get("stream_options") or {}).get("include_usage"):
            await send([], usage=usage)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def _whole(self, base: dict[str, Any], chunks: Any) -> web.Response:
        text: list[str] = []
        calls: dict[int, dict[str, Any]] = {}
        finish = Finish("stop", {})
        async for chunk in chunks:
            if isinstance(chunk, TextDelta):
                text.append(chunk.text)
            elif isinstance(chunk, ToolCallDelta):
                call = calls.setdefault(chunk.index, {"id": "", "type": "function",
                                                      "function": {"name": "",
                                                                   "arguments": ""}})
                call["id"] = chunk.id or call["id"]
                call["function"]["name"] = chunk.name or call["function"]["name"]
                call["function"]["arguments"] += chunk.arguments
            elif isinstance(chunk, Finish):
                finish = chunk
        message: dict[str, Any] = {"role": "assistant", "content": "".join(text) or None}
        if calls:
            message["tool_calls"] = [calls[i] for i in sorted(calls)]
        return web.json_response({**base, "object": "chat.completion", "choices": [
            {"index": 0, "message": message, "finish_reason": finish.reason}],
            "usage": _usage(finish.usage)}, dumps=lambda v: orjson.dumps(v).decode())


def _usage(usage: Mapping[str, Any]) -> dict[str, int]:
    prompt = int(usage.get("input_tokens", 0))
    completion = int(usage.get("output_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error"}},
                             status=status)


async def serve(host: str, port: int, upstream: SimulatedUpstream | None = None
                ) -> web.AppRunner:
    """Start the simulated upstream on ``host:port`` (``0``: any free port)."""
    runner = web.AppRunner((upstream or SimulatedUpstream()).app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
