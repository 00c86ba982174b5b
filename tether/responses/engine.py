"""One response: rebuild the history, stream the model, emit OpenAI's events, store the result.

The same routine serves the WebSocket mode and the HTTP baseline; a transport only decides how
an event travels (a text frame, or an SSE message) through the ``emit`` callback, which never
raises: a client that went away stops receiving, but the response still completes and, with
``store``, is committed, so it can be fetched or continued later.

Event order (OpenAI's): ``response.created``, ``response.in_progress``; per output item
``response.output_item.added``, then for a message ``response.content_part.added``,
``response.output_text.delta``…, ``response.output_text.done``, ``response.content_part.done``,
or for a function call ``response.function_call_arguments.delta``…, ``…arguments.done``; then
``response.output_item.done``; finally ``response.completed``, ``response.failed`` or
``response.incomplete``. The terminal event is sent only after the store committed the response.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from tether.agents.models import (
    Finish,
    Message,
    ModelError,
    TextDelta,
    ToolCallDelta,
)
from tether.responses.backends import Backend
from tether.responses.chains import Chains, Node
from tether.responses.errors import ApiError, invalid_value
from tether.responses.items import (
    CreateRequest,
    Item,
    check_tool_outputs,
    new_id,
    to_messages,
    tool_specs,
)
from tether.store.base import StoreError

log = logging.getLogger("tether.responses")

Emit = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(slots=True)
class Plan:
    """What a create resolves to once its previous response and model are known."""

    request: CreateRequest
    parent: Node | None
    model: str
    backend: Backend
    tools: list[Item]
    instructions: str | None


def plan(request: CreateRequest, parent: Node | None, inherit: frozenset[str],
         lookup: Callable[[str], Backend | None]) -> Plan:
    """Resolve model, tools and instructions (inheriting what the connection asked for)."""
    previous = parent.response if parent is not None else {}
    model = request.model or previous.get("model")
    if not model:
        raise ApiError("Missing required parameter: 'model'.", code="missing_required_parameter",
                       param="model")
    backend = lookup(model)
    if backend is None:
        raise ApiError(f"The requested model '{model}' does not exist.", code="model_not_found",
                       param="model")
    tools = request.tools
    if tools is None:
        tools = list(previous.get("tools") or []) if "tools" in inherit else []
    instructions = request.instructions
    if not request.has_instructions and "instructions" in inherit:
        instructions = previous.get("instructions")
    choice = request.tool_choice
    if isinstance(choice, dict) and not any(t["name"] == choice["name"] for t in tools):
        raise invalid_value("tool_choice", f"Tool choice '{choice['name']}' not found in "
                            "'tools' parameter.")
    if choice == "required" and not tools:
        raise invalid_value("tool_choice", "Tool choice 'required' needs at least one tool.")
    return Plan(request, parent, model, backend, tools, instructions)


def usage_of(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {"input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens}


@dataclass
class Turn:
    """The mutable state of one response while it streams."""

    id: str
    sub: str
    plan: Plan
    created_at: int = field(default_factory=lambda: int(time.time()))
    status: str = "in_progress"
    output: list[Item] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    incomplete: dict[str, Any] | None = None
    completed_at: int | None = None

    def response(self) -> dict[str, Any]:
        """The Response object as it stands (``output`` copied: events must not change)."""
        request = self.plan.request
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": self.status,
            "background": False,
            "completed_at": self.completed_at,
            "error": self.error,
            "incomplete_details": self.incomplete,
            "instructions": self.plan.instructions,
            "max_output_tokens": request.max_output_tokens,
            "max_tool_calls": None,
            "model": self.plan.model,
            "output": [dict(item) for item in self.output],
            "parallel_tool_calls": request.parallel_tool_calls,
            "previous_response_id": request.previous_response_id,
            "reasoning": {"effort": None, "summary": None},
            "service_tier": "default",
            "store": request.store,
            "temperature": 1.0 if request.temperature is None else request.temperature,
            "text": {"format": {"type": "text"}},
            "tool_choice": request.tool_choice,
            "tools": self.plan.tools,
            "top_p": 1.0 if request.top_p is None else request.top_p,
            "truncation": "disabled",
            "usage": self.usage,
            "user": request.user,
            "metadata": request.metadata,
        }


class _Items:
    """Output items being streamed: at most one open message, any number of open calls."""

    def __init__(self, turn: Turn, emit: Emit) -> None:
        self.turn = turn
        self.emit = emit
        self.message: tuple[int, Item] | None = None  # (output index, item)
        self.calls: dict[int, tuple[int, Item]] = {}  # model's call index → (output index, item)
        self.text_tokens = 0

    async def text(self, delta: str) -> None:
        if self.calls:
            await self.close_calls("completed")
        if self.message is None:
            item: Item = {"id": new_id("msg_"), "type": "message", "status": "in_progress",
                          "role": "assistant", "content": []}
            index = len(self.turn.output)
            self.turn.output.append(item)
            self.message = (index, item)
            await self.emit({"type": "response.output_item.added", "output_index": index,
                             "item": {**item, "content": []}})
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            item["content"].append(part)
            await self.emit({"type": "response.content_part.added", "item_id": item["id"],
                             "output_index": index, "content_index": 0, "part": dict(part)})
        index, item = self.message
        item["content"][0]["text"] += delta
        self.text_tokens += 1
        await self.emit({"type": "response.output_text.delta", "item_id": item["id"],
                         "output_index": index, "content_index": 0, "delta": delta,
                         "logprobs": []})

    async def call(self, delta: ToolCallDelta) -> None:
        if self.message is not None:
            await self.close_message("completed")
        entry = self.calls.get(delta.index)
        if entry is None:
            item: Item = {"id": new_id("fc_"), "type": "function_call", "status": "in_progress",
                          "arguments": "", "call_id": delta.id or new_id("call_", 12),
                          "name": delta.name or ""}
            entry = (len(self.turn.output), item)
            self.turn.output.append(item)
            self.calls[delta.index] = entry
            await self.emit({"type": "response.output_item.added", "output_index": entry[0],
                             "item": dict(item)})
        index, item = entry
        if delta.name and not item["name"]:
            item["name"] = delta.name
        if delta.arguments:
            item["arguments"] += delta.arguments
            await self.emit({"type": "response.function_call_arguments.delta",
                             "item_id": item["id"], "output_index": index,
                             "delta": delta.arguments})

    async def close_message(self, status: str) -> None:
        if self.message is None:
            return
        index, item = self.message
        self.message = None
        part = item["content"][0]
        await self.emit({"type": "response.output_text.done", "item_id": item["id"],
                         "output_index": index, "content_index": 0, "text": part["text"],
                         "logprobs": []})
        await self.emit({"type": "response.content_part.done", "item_id": item["id"],
                         "output_index": index, "content_index": 0, "part": dict(part)})
        item["status"] = status
        await self.emit({"type": "response.output_item.done", "output_index": index,
                         "item": {**item, "content": [dict(part)]}})

    async def close_calls(self, status: str) -> None:
        for index, item in sorted(self.calls.values(), key=lambda entry: entry[0]):
            await self.emit({"type": "response.function_call_arguments.done",
                             "item_id": item["id"], "output_index": index,
                             "name": item["name"], "arguments": item["arguments"]})
            item["status"] = status
            await self.emit({"type": "response.output_item.done", "output_index": index,
                             "item": dict(item)})
        self.calls = {}

    async def close(self, status: str) -> None:
        await self.close_message(status)
        await self.close_calls(status)


INCOMPLETE_REASONS = {"length": "max_output_tokens", "content_filter": "content_filter"}


async def run(turn: Turn, chains: Chains, emit: Emit,
              on_created: Callable[[], None] | None = None) -> Node:
    """Generate ``turn`` to its end and return the finished node (stored when asked)."""
    plan = turn.plan
    request = plan.request
    # Validate the conversation before announcing the response.
    history: Sequence[Message] = plan.parent.messages() if plan.parent is not None else ()
    new_messages = to_messages(request.input)
    check_tool_outputs(history, new_messages)
    if on_created is not None:
        on_created()
    snapshot = turn.response()
    await emit({"type": "response.created", "response": snapshot})
    await emit({"type": "response.in_progress", "response": snapshot})
    items = _Items(turn, emit)
    if request.generate:
        messages: list[Message] = []
        if plan.instructions:
            messages.append(Message("system", plan.instructions))
        messages.extend(history)
        messages.extend(new_messages)
        specs = tool_specs(plan.tools)  # with tool_choice "none" the model may not call
        model = plan.backend.model(plan.model, request, specs)
        finish: Finish | None = None
        truncated = False
        try:
            async for chunk in model.stream(messages, specs):
                if isinstance(chunk, TextDelta):
                    if chunk.text:
                        await items.text(chunk.text)
                    if (request.max_output_tokens is not None
                            and items.text_tokens >= request.max_output_tokens):
                        truncated = True
                        break
                elif isinstance(chunk, ToolCallDelta):
                    await items.call(chunk)
                elif isinstance(chunk, Finish):
                    finish = chunk
        except (ModelError, httpx.HTTPError, OSError, ValueError) as exc:
            log.warning("model failed", extra={"response": turn.id, "error": repr(exc)})
            turn.status = "failed"
            turn.error = {"code": "server_error", "message": f"The model failed: {exc}"
                          if isinstance(exc, ModelError) else "The model could not be reached."}
        except Exception:  # a bug in an adapter: still a failed response, never a hung one
            log.exception("model failed", extra={"response": turn.id})
            turn.status = "failed"
            turn.error = {"code": "server_error", "message": "The model failed."}
        if turn.status != "failed":
            reason = "length" if truncated else (finish.reason if finish else "stop")
            if reason in INCOMPLETE_REASONS:
                turn.status = "incomplete"
                turn.incomplete = {"reason": INCOMPLETE_REASONS[reason]}
            elif reason == "error":
                turn.status = "failed"
                turn.error = {"code": "server_error", "message": "The model stopped on an error."}
            else:
                turn.status = "completed"
        await items.close("completed" if turn.status == "completed" else "incomplete")
        usage = finish.usage if finish is not None else {}
        input_tokens = usage.get("input_tokens", usage.get("prompt_tokens"))
        output_tokens = usage.get("output_tokens", usage.get("completion_tokens"))
        if not isinstance(input_tokens, int):
            input_tokens = sum(len(m.content) // 4 + 1 for m in messages)
        if not isinstance(output_tokens, int):
            output_tokens = items.text_tokens + len([i for i in turn.output
                                                     if i["type"] == "function_call"])
        turn.usage = usage_of(input_tokens, output_tokens)
    else:  # generate: false, a warm-up: the chain grows by the input, nothing is generated
        turn.status = "completed"
        turn.usage = usage_of(0, 0)
    turn.completed_at = int(time.time())
    final = turn.response()
    node = Node(turn.id, turn.sub, plan.parent, request.input, final, stored=request.store)
    if request.store:
        try:
            await chains.persist(node)
            chains.remember(node)
        except StoreError as exc:  # still continuable on this connection; say so in the logs
            node.stored = False
            log.error("could not store response", extra={"response": turn.id,
                                                          "error": str(exc)})
    await emit({"type": f"response.{turn.status}", "response": final})
    return node
