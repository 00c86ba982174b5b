"""Settings of the Responses endpoint.

``TETHER_RESPONSES_CONFIG`` holds them as JSON, inline (starting with ``{``) or in a file
(a path), e.g.::

    {"models": {"tether-simulated": {"backend": "simulated", "ttft": 0.2},
                "llama": {"backend": "openai", "base_url": "http://127.0.0.1:8000/v1"}},
     "max_connection_seconds": 3600, "inherit": ["tools", "instructions"]}

Every key is optional; ``docs/responses.md`` lists them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import orjson

from tether.responses.backends import SIMULATED_MODEL

INHERITABLE = frozenset({"tools", "instructions"})
ENV = "TETHER_RESPONSES_CONFIG"


def _default_models() -> dict[str, dict[str, Any]]:
    return {SIMULATED_MODEL: {"backend": "simulated"}}


@dataclass
class ResponsesConfig:
    # Models by name ("*" = any other name); default: the simulation as "tether-simulated".
    models: dict[str, dict[str, Any]] = field(default_factory=_default_models)
    max_connection_seconds: float = 3600.0  # then websocket_connection_limit_reached
    lifetime_grace: float = 60.0  # seconds a started response may still finish at the limit
    max_inflight: int = 16  # responses generating at once per connection; more are queued
    max_lanes: int = 32  # distinct named stream_ids per connection
    max_queued: int = 1024  # creates waiting per connection before reading pauses
    max_message_bytes: int = 8 << 20  # a larger WebSocket message or HTTP body is refused
    connection_cache: int = 64  # finished responses each connection keeps in memory
    node_cache: int = 512  # stored responses this node keeps in memory for any connection
    # Fields a continuation takes from its previous response when the request omits them
    # (OpenAI carries neither over; a connection may also ask with ?inherit=tools,instructions).
    inherit: frozenset[str] = frozenset()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ResponsesConfig:
        config = cls()
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown responses settings: {sorted(unknown)}")
        for key, value in data.items():
            if key == "inherit":
                config.inherit = parse_inherit(value)
            elif key == "models":
                if not isinstance(value, dict):
                    raise ValueError("'models' must map model names to backend settings")
                config.models = value
            else:
                current = getattr(config, key)
                setattr(config, key, type(current)(value))
        return config

    @classmethod
    def from_env(cls) -> ResponsesConfig:
        text = os.environ.get(ENV, "").strip()
        if not text:
            return cls()
        if not text.startswith("{"):
            text = Path(text).read_text()
        data = orjson.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"{ENV} must be a JSON object")
        return cls.from_dict(data)


def parse_inherit(value: Any) -> frozenset[str]:
    """``"tools,instructions"`` or ``["tools"]`` → the set; unknown names are an error."""
    if value is None or value == "":
        return frozenset()
    names = value.split(",") if isinstance(value, str) else list(value)
    chosen = frozenset(str(n).strip() for n in names if str(n).strip())
    unknown = chosen - INHERITABLE
    if unknown:
        raise ValueError(f"cannot inherit {sorted(unknown)}: choose from {sorted(INHERITABLE)}")
    return chosen
