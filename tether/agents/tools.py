"""Tools an agent can call: server tools (Python callables), front-end tools, approvals.

A server tool's JSON schema comes from its signature and docstring::

    @tool
    def weather(city: str, units: str = "metric") -> dict[str, Any]:
        \"\"\"Current weather for a city.\"\"\"

    @tool(requires_approval=True)
    async def send_email(to: str, body: str) -> str: ...

A front-end tool runs in a client that declared it (in ``hello.tools`` or presence); the run
only describes it::

    confirm = client_tool("confirm", "Ask the user to confirm", {"type": "object", ...})
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin, overload

from tether.agents.models import ToolSpec

_JSON_TYPES: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean",
                               dict: "object", list: "array", type(None): "null"}


def _schema(annotation: Any) -> dict[str, Any]:
    origin = get_origin(annotation)
    if annotation in _JSON_TYPES:
        return {"type": _JSON_TYPES[annotation]}
    if origin is Literal:
        return {"enum": list(get_args(annotation))}
    if origin in (list, tuple, set, frozenset):
        args = get_args(annotation)
        return {"type": "array", **({"items": _schema(args[0])} if args else {})}
    if origin is dict:
        return {"type": "object"}
    if origin in (typing.Union, types.UnionType):
        options = [_schema(a) for a in get_args(annotation)]
        return {"anyOf": options}
    return {}


@dataclass(frozen=True)
class Tool:
    """A tool the model may call. ``function`` is None for a front-end tool."""

    name: str
    description: str
    parameters: dict[str, Any]
    function: Callable[..., Any] | None = None
    requires_approval: bool = False
    timeout: float | None = None  # front-end tools: seconds before the call fails

    @property
    def spec(self) -> ToolSpec:
        return ToolSpec(self.name, self.description, self.parameters)

    @property
    def client_side(self) -> bool:
        return self.function is None

    async def call(self, arguments: dict[str, Any]) -> Any:
        assert self.function is not None, "front-end tools run in a client"
        result = self.function(**arguments)
        if inspect.isawaitable(result):
            result = await result
        return result


def schema_of(function: Callable[..., Any]) -> dict[str, Any]:
    """A JSON schema for ``function``'s keyword arguments, from its type hints."""
    hints = typing.get_type_hints(function)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for name, param in inspect.signature(function).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        properties[name] = _schema(hints.get(name, Any))
        if param.default is inspect.Parameter.empty:
            required.append(name)
        else:
            properties[name]["default"] = param.default
    return {"type": "object", "properties": properties, "required": required,
            "additionalProperties": False}


@overload
def tool(function: Callable[..., Any], /) -> Tool: ...


@overload
def tool(*, name: str | None = None, requires_approval: bool = False
         ) -> Callable[[Callable[..., Any]], Tool]: ...


def tool(function: Callable[..., Any] | None = None, /, *, name: str | None = None,
         requires_approval: bool = False) -> Tool | Callable[[Callable[..., Any]], Tool]:
    """Make a server tool of a function (sync or async)."""

    def make(fn: Callable[..., Any]) -> Tool:
        doc = inspect.getdoc(fn) or ""
        return Tool(name or fn.__name__, doc.split("\n\n")[0].strip(), schema_of(fn), fn,
                    requires_approval)

    return make(function) if function is not None else make


def client_tool(name: str, description: str, parameters: dict[str, Any], *,
                timeout: float | None = 300.0, requires_approval: bool = False) -> Tool:
    """Describe a front-end tool: run by a client that declared ``name``."""
    return Tool(name, description, parameters, None, requires_approval, timeout)

