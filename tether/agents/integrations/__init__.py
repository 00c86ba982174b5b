"""Agents written with a framework, served as durable tether runs.

Each module adapts one framework's agent to :class:`~tether.agents.agent.Agent` (it overrides
``recover`` and ``respond``), so its runs live in a session like native runs: token streams,
tool calls, approvals that wait in the log and survive a restart, cancel and steer from any
device. The frameworks are optional dependencies (``pip install 'tether[openai-agents]'``,
``tether[pydantic-ai]``, ``tether[langgraph]``); a module imports its framework only when used.

:func:`adapt` recognises a framework object by its type, which is how ``tether serve --agent
module:object`` accepts one directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tether.agents.agent import Agent

# The top-level package of a framework object's type → the adapter module that serves it.
_ADAPTERS = {
    "agents": "tether.agents.integrations.openai_agents",
    "pydantic_ai": "tether.agents.integrations.pydantic_ai",
    "langgraph": "tether.agents.integrations.langgraph",
}


def framework_of(obj: Any) -> str | None:
    """The framework ``obj`` belongs to (a key of the adapters), or None."""
    for cls in type(obj).__mro__:
        top = cls.__module__.split(".")[0]
        if top in _ADAPTERS:
            return top
    return None


def adapt(obj: Any, *, sessions: Sequence[str] = ("*",), name: str | None = None
          ) -> Agent | None:
    """A tether agent serving the framework agent ``obj`` on ``sessions``; None when ``obj``
    is not an agent of a framework tether knows."""
    framework = framework_of(obj)
    if framework is None:
        return None
    import importlib

    module = importlib.import_module(_ADAPTERS[framework])
    agent: Agent = module.serve(obj, sessions=sessions, name=name)
    return agent
