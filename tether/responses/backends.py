"""Which model serves a ``model`` name: the built-in simulation or an OpenAI-compatible upstream.

Both reuse the adapters of :mod:`tether.agents.models`. A backend builds one
:class:`~tether.agents.models.Model` per response, shaped by that request (tools, tool choice,
sampling settings); the model then streams from the full history tether rebuilt from the chain.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from tether.agents.models import (
    Message,
    Model,
    OpenAIChatModel,
    ScriptedCall,
    SimulatedModel,
    ToolSpec,
)
from tether.responses.items import CreateRequest

SIMULATED_MODEL = "tether-simulated"


class Backend(Protocol):
    def model(self, name: str, request: CreateRequest, tools: Sequence[ToolSpec]) -> Model:
        """A model for one response."""
        ...

    async def aclose(self) -> None: ...


# --- the simulation ---------------------------------------------------------------------------

_WORDS = ("session", "cursor", "retry", "socket", "config", "handler", "store", "token",
          "parser", "router", "queue", "buffer", "worker", "schema", "client", "server")


def fake_arguments(parameters: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """Plausible arguments for a JSON-schema object (deterministic for a seeded ``rng``)."""
    out: dict[str, Any] = {}
    properties = parameters.get("properties") if isinstance(parameters, dict) else None
    if not isinstance(properties, dict):
        return out
    for name, schema in properties.items():
        kind = schema.get("type") if isinstance(schema, dict) else None
        enum = schema.get("enum") if isinstance(schema, dict) else None
        if isinstance(enum, list) and enum:
            out[name] = rng.choice(enum)
        elif kind == "integer":
            out[name] = rng.randint(1, 400)
        elif kind == "number":
            out[name] = round(rng.uniform(0, 100), 2)
        elif kind == "boolean":
            out[name] = rng.random() < 0.5
        elif kind == "array":
            out[name] = []
        elif kind == "object":
            out[name] = {}
        elif "path" in name or "file" in name:
            out[name] = f"src/{rng.choice(_WORDS)}/{rng.choice(_WORDS)}_{rng.randint(1, 40)}.py"
        else:
            out[name] = rng.choice(_WORDS)
    return out


@dataclass
class SimulatedBackend:
    """The deterministic simulated LLM: no network, no weights, a stand-in for benchmarks.

    With ``tool_choice: "auto"`` it calls the offered function tools in turn, up to
    ``tool_calls_per_turn`` calls after the last user message (``None``: no limit), then
    answers with text; ``"required"`` or a named function always calls; ``"none"`` never does.
    ``input_token_cost`` seconds per input token model prompt processing, over the whole
    history every time (as a model without a prompt cache).
    """

    seed: int = 0
    ttft: float = 0.05
    tokens_per_second: float = 65.0
    answer_tokens: int = 40
    input_token_cost: float = 0.0
    tool_calls_per_turn: int | None = 1

    def model(self, name: str, request: CreateRequest, tools: Sequence[ToolSpec]) -> Model:
        choice = request.tool_choice
        limit = self.tool_calls_per_turn
        seed = self.seed

        def script(messages: Sequence[Message]) -> ScriptedCall | None:
            if not tools or choice == "none":
                return None
            turn_start = max((i for i, m in enumerate(messages) if m.role == "user"),
                             default=-1)
            made = sum(len(m.tool_calls) for m in messages[turn_start + 1:])
            if isinstance(choice, dict):
                spec = next(t for t in tools if t.name == choice["name"])
            elif choice == "required" or limit is None or made < limit:
                spec = tools[made % len(tools)]
            else:
                return None
            rng = random.Random(f"{seed}:{len(messages)}:{spec.name}")
            return ScriptedCall(spec.name, fake_arguments(spec.parameters, rng))

        return SimulatedModel(seed=seed, ttft=self.ttft, tokens_per_second=self.tokens_per_second,
                              answer_tokens=self.answer_tokens, script=script,
                              input_token_cost=self.input_token_cost, name=name)

    async def aclose(self) -> None:
        return None


# --- OpenAI-compatible Chat Completions -------------------------------------------------------


class OpenAIChatBackend:
    """Full-history Chat Completions requests to an upstream next to the model (vLLM, llama.cpp's
    server, Ollama, OpenAI…). ``model`` renames the model upstream (default: the name asked)."""

    def __init__(self, base_url: str, *, api_key: str | None = None, model: str | None = None,
                 timeout: float = 300.0, include_usage: bool = True,
                 params: dict[str, Any] | None = None) -> None:
        self.base_url = base_url
        self.api_key = api_key
        self.upstream_model = model
        self.include_usage = include_usage
        self.params = params or {}
        self._client = httpx.AsyncClient(timeout=timeout)

    def model(self, name: str, request: CreateRequest, tools: Sequence[ToolSpec]) -> Model:
        params: dict[str, Any] = dict(self.params)
        if request.temperature is not None:
            params["temperature"] = request.temperature
        if request.top_p is not None:
            params["top_p"] = request.top_p
        if request.max_output_tokens is not None:
            params["max_tokens"] = request.max_output_tokens
        if request.user is not None:
            params["user"] = request.user
        if tools:
            choice = request.tool_choice
            params["tool_choice"] = ({"type": "function", "function": {"name": choice["name"]}}
                                     if isinstance(choice, dict) else choice)
            params["parallel_tool_calls"] = request.parallel_tool_calls
        if self.include_usage:
            params["stream_options"] = {"include_usage": True}
        return OpenAIChatModel(self.upstream_model or name, base_url=self.base_url,
                               api_key=self.api_key, client=self._client, **params)

    async def aclose(self) -> None:
        await self._client.aclose()


def backend_from_spec(name: str, spec: dict[str, Any]) -> Backend:
    """A backend from its configuration (see ``docs/responses.md``)."""
    kind = spec.get("backend", "simulated")
    if kind == "simulated":
        known = {"seed", "ttft", "tokens_per_second", "answer_tokens", "input_token_cost",
                 "tool_calls_per_turn"}
        unknown = set(spec) - known - {"backend"}
        if unknown:
            raise ValueError(f"model {name!r}: unknown simulated settings {sorted(unknown)}")
        return SimulatedBackend(**{k: v for k, v in spec.items() if k in known})
    if kind == "openai":
        base_url = spec.get("base_url")
        if not isinstance(base_url, str):
            raise ValueError(f"model {name!r}: an 'openai' backend needs 'base_url'")
        api_key = spec.get("api_key")
        if api_key is None and spec.get("api_key_env"):
            api_key = os.environ.get(str(spec["api_key_env"]))
        return OpenAIChatBackend(base_url, api_key=api_key, model=spec.get("model"),
                                 timeout=float(spec.get("timeout", 300.0)),
                                 include_usage=bool(spec.get("include_usage", True)),
                                 params=dict(spec.get("params") or {}))
    raise ValueError(f"model {name!r}: unknown backend {kind!r} (simulated or openai)")


class Models:
    """Model name → backend; ``"*"`` serves any other name."""

    def __init__(self, backends: dict[str, Backend] | None = None) -> None:
        self.backends: dict[str, Backend] = dict(backends or {})

    @classmethod
    def from_specs(cls, specs: dict[str, dict[str, Any]]) -> Models:
        return cls({name: backend_from_spec(name, spec) for name, spec in specs.items()})

    def register(self, name: str, backend: Backend) -> None:
        self.backends[name] = backend

    def get(self, name: str) -> Backend | None:
        return self.backends.get(name) or self.backends.get("*")

    async def aclose(self) -> None:
        for backend in self.backends.values():
            await backend.aclose()
