"""The ``response.create`` body: validation, input items, and their conversion to model messages.

Items keep OpenAI's shapes (they are stored and echoed as given, normalised): messages
(``role`` + ``content`` as a string or a list of text parts), ``function_call``,
``function_call_output`` and ``reasoning`` (kept in the chain, not shown to the model). A chain's
history is the concatenation of every response's input items and output items; the model sees
it as Chat-style :class:`~tether.agents.models.Message` objects.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tether.agents.models import Message, ToolCall, ToolSpec
from tether.responses.errors import ApiError, invalid_type, invalid_value, missing

Item = dict[str, Any]

RESPONSE_ID = re.compile(r"resp_[0-9a-f]{32}")  # used with fullmatch
STREAM_ID = re.compile(r"[A-Za-z0-9_.\-]{1,256}")
TOOL_NAME = re.compile(r"[A-Za-z0-9_\-]{1,64}")
ROLES = {"user", "system", "developer", "assistant"}
TEXT_PARTS = {"input_text", "output_text", "text"}
TOOL_CHOICE_MODES = {"none", "auto", "required"}

# Fields of the HTTP create body that change nothing here (accepted so clients need not strip
# them). Anything not listed and not handled below is ignored as well, for forward
# compatibility, except the few that ask for something this server does not do.
UNSUPPORTED_WHEN_SET = ("conversation", "prompt", "background")


def new_id(prefix: str, nbytes: int = 16) -> str:
    return prefix + secrets.token_hex(nbytes)


def new_response_id(chain: str | None = None) -> str:
    """``resp_`` + 16 hex of the chain (the root's, inherited) + 16 hex of its own."""
    return "resp_" + (chain or secrets.token_hex(8)) + secrets.token_hex(8)


def chain_of(response_id: str) -> str | None:
    """The chain part of a response id, or None when the id is not one of ours."""
    return response_id[5:21] if RESPONSE_ID.fullmatch(response_id) else None


@dataclass(slots=True)
class CreateRequest:
    """A validated ``response.create`` (WebSocket) or ``POST /v1/responses`` (HTTP) body."""

    model: str | None
    input: list[Item]
    instructions: str | None = None
    has_instructions: bool = False
    tools: list[Item] | None = None  # None: not given
    tool_choice: str | dict[str, Any] = "auto"
    previous_response_id: str | None = None
    store: bool = True
    metadata: dict[str, str] = field(default_factory=dict)
    generate: bool = True
    stream: bool = False
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None
    parallel_tool_calls: bool = True
    user: str | None = None


def _opt_str(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise invalid_type(key, "a string")
    return value


def _opt_bool(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid_type(key, "a boolean")
    return value


def _opt_number(body: dict[str, Any], key: str, low: float, high: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid_type(key, "a number")
    if not low <= value <= high:
        raise invalid_value(key, f"'{key}' must be between {low:g} and {high:g}.")
    return float(value)


def parse_create(body: Any, *, transport: str) -> CreateRequest:
    """Validate a create body. ``transport`` is ``"ws"`` or ``"http"``."""
    if not isinstance(body, dict):
        raise ApiError("The request body must be a JSON object.", code="invalid_type")
    for key in UNSUPPORTED_WHEN_SET:
        if body.get(key) not in (None, False):
            raise invalid_value(key, f"'{key}' is not supported by this server.")
    if transport == "http" and body.get("stream_id") is not None:
        raise ApiError("Unknown parameter: 'stream_id' (WebSocket only).",
                       code="unknown_parameter", param="stream_id")
    model = _opt_str(body, "model")
    previous = _opt_str(body, "previous_response_id")
    if model is None and previous is None:
        raise missing("model")
    if model is not None and not model:
        raise invalid_value("model", "'model' must not be empty.")
    request = CreateRequest(model=model, input=parse_input(body.get("input")),
                            previous_response_id=previous)
    if "instructions" in body:
        request.has_instructions = True
        request.instructions = _opt_str(body, "instructions")
    if body.get("tools") is not None:
        request.tools = parse_tools(body["tools"])
    if body.get("tool_choice") is not None:
        request.tool_choice = parse_tool_choice(body["tool_choice"])
    request.store = _opt_bool(body, "store", True)
    request.generate = _opt_bool(body, "generate", True)
    request.stream = _opt_bool(body, "stream", False)
    request.parallel_tool_calls = _opt_bool(body, "parallel_tool_calls", True)
    request.temperature = _opt_number(body, "temperature", 0, 2)
    request.top_p = _opt_number(body, "top_p", 0, 1)
    max_tokens = body.get("max_output_tokens")
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
            raise invalid_type("max_output_tokens", "an integer")
        if max_tokens < 1:
            raise invalid_value("max_output_tokens", "'max_output_tokens' must be at least 1.")
        request.max_output_tokens = max_tokens
    request.user = _opt_str(body, "user")
    metadata = body.get("metadata")
    if metadata is not None:
        if (not isinstance(metadata, dict) or len(metadata) > 16
                or not all(isinstance(k, str) and isinstance(v, str) and len(k) <= 64
                           and len(v) <= 512 for k, v in metadata.items())):
            raise invalid_value("metadata", "'metadata' must be an object of at most 16 "
                                "string keys (≤ 64 chars) and string values (≤ 512 chars).")
        request.metadata = dict(metadata)
    return request


# Bounds on the shape of one request. Memory per request follows the number of objects more
# than the bytes (a 7.5 MiB body of 140,000 tiny items cost ~110 MiB): with these, a body at
# the size limit costs a few times its size, and a refused one only its parse.
MAX_INPUT_ITEMS = 10_000
MAX_CONTENT_PARTS = 1_000


def parse_input(value: Any) -> list[Item]:
    if value is None:
        return []
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    if not isinstance(value, list):
        raise invalid_type("input", "a string or an array of input items")
    if len(value) > MAX_INPUT_ITEMS:
        raise invalid_value("input", f"'input' has {len(value)} items; at most "
                                     f"{MAX_INPUT_ITEMS} are accepted in one request.")
    return [parse_item(item, f"input[{i}]") for i, item in enumerate(value)]


def _text_of(content: Any, param: str) -> str:
    """The text of a message's content (a string, or a list of text parts)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid_type(param, "a string or an array of content parts")
    if len(content) > MAX_CONTENT_PARTS:
        raise invalid_value(param, f"'{param}' has {len(content)} content parts; at most "
                                   f"{MAX_CONTENT_PARTS} are accepted.")
    texts = []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        if not isinstance(part, dict):
            raise invalid_type(where, "an object")
        kind = part.get("type")
        if kind in TEXT_PARTS:
            text = part.get("text")
            if not isinstance(text, str):
                raise invalid_type(f"{where}.text", "a string")
            texts.append(text)
        elif kind == "refusal":
            refusal = part.get("refusal")
            if not isinstance(refusal, str):
                raise invalid_type(f"{where}.refusal", "a string")
            texts.append(refusal)
        else:
            raise invalid_value(f"{where}.type", f"Content part type {kind!r} is not supported "
                                "by this server: use input_text or output_text.")
    return "".join(texts)


def parse_item(item: Any, param: str) -> Item:
    if not isinstance(item, dict):
        raise invalid_type(param, "an object")
    kind = item.get("type")
    if kind is None and "role" in item:
        kind = "message"
    if kind == "message":
        role = item.get("role")
        if role not in ROLES:
            raise invalid_value(f"{param}.role", "'role' must be one of 'user', 'system', "
                                "'developer' or 'assistant'.")
        if "content" not in item:
            raise missing(f"{param}.content")
        _text_of(item["content"], f"{param}.content")
        return {**item, "type": "message"}
    if kind == "function_call":
        for key in ("call_id", "name", "arguments"):
            if not isinstance(item.get(key), str):
                raise invalid_type(f"{param}.{key}", "a string")
        return dict(item)
    if kind == "function_call_output":
        if not isinstance(item.get("call_id"), str):
            raise invalid_type(f"{param}.call_id", "a string")
        if "output" not in item:
            raise missing(f"{param}.output")
        _text_of(item["output"], f"{param}.output")
        return dict(item)
    if kind == "reasoning":
        return dict(item)
    raise invalid_value(f"{param}.type", f"Input item type {kind!r} is not supported by this "
                        "server: use message, function_call, function_call_output or reasoning.")


def parse_tools(value: Any) -> list[Item]:
    if not isinstance(value, list):
        raise invalid_type("tools", "an array")
    tools: list[Item] = []
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise invalid_type(where, "an object")
        if tool.get("type") != "function":
            raise invalid_value(f"{where}.type", f"Tool type {tool.get('type')!r} is not "
                                "supported by this server: only 'function' tools are.")
        name = tool.get("name")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise invalid_value(f"{where}.name", "A function name must be 1–64 letters, digits, "
                                "underscores or hyphens.")
        parameters = tool.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise invalid_type(f"{where}.parameters", "an object")
        description = tool.get("description")
        if description is not None and not isinstance(description, str):
            raise invalid_type(f"{where}.description", "a string")
        strict = tool.get("strict")
        tools.append({"type": "function", "name": name, "description": description,
                      "parameters": parameters if parameters is not None
                      else {"type": "object", "properties": {}},
                      "strict": True if strict is None else bool(strict)})
    return tools


def parse_tool_choice(value: Any) -> str | dict[str, Any]:
    if isinstance(value, str):
        if value not in TOOL_CHOICE_MODES:
            raise invalid_value("tool_choice", "'tool_choice' must be 'none', 'auto', "
                                "'required' or a function choice.")
        return value
    if (isinstance(value, dict) and value.get("type") == "function"
            and isinstance(value.get("name"), str)):
        return {"type": "function", "name": value["name"]}
    raise invalid_value("tool_choice", "'tool_choice' must be 'none', 'auto', 'required' or "
                        "{'type': 'function', 'name': ...}.")


def tool_specs(tools: Sequence[Item]) -> list[ToolSpec]:
    return [ToolSpec(t["name"], t.get("description") or "", t["parameters"]) for t in tools]


def to_messages(items: Iterable[Item]) -> list[Message]:
    """Chat-style messages for ``items`` (consecutive function calls join one assistant turn)."""
    messages: list[Message] = []
    joinable = False  # the last message is an assistant turn that function calls may join
    for item in items:
        kind = item.get("type")
        if kind == "message":
            role = item["role"]
            messages.append(Message("system" if role == "developer" else role,
                                    _text_of(item["content"], "content")))
            joinable = role == "assistant"
        elif kind == "function_call":
            call = ToolCall(item["call_id"], item["name"], item["arguments"])
            if joinable:
                last = messages[-1]
                messages[-1] = Message("assistant", last.content, (*last.tool_calls, call))
            else:
                messages.append(Message("assistant", "", (call,)))
                joinable = True
        elif kind == "function_call_output":
            messages.append(Message("tool", _text_of(item["output"], "output"),
                                    tool_call_id=item["call_id"]))
            joinable = False
        # reasoning items stay in the chain but are not shown to the model
    return messages


def check_tool_outputs(history: Sequence[Message], new: Sequence[Message]) -> None:
    """Every tool output must answer a function call made earlier in the conversation."""
    outputs = [m.tool_call_id for m in new if m.role == "tool"]
    if not outputs:
        return
    calls = {c.id for m in (*history, *new) for c in m.tool_calls}
    for call_id in outputs:
        if call_id not in calls:
            raise ApiError(f"No tool call found for function call output with call_id "
                           f"{call_id}.", code=None, param="input")
