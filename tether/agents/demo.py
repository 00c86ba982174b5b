"""The demo agent: answers with the **simulated** model and shows every run feature.

It serves sessions named ``demo*`` and ``chat-*``. What it does depends on words in the
message, so each feature can be tried on its own:

* ``time`` → a server tool (``current_time``), then an answer;
* ``color`` → a front-end tool (``pick_color``) that a browser or SDK client runs;
* ``report`` → a tool that needs approval (``publish_report``);
* ``tools`` or ``demo`` → all three, in that order;
* anything else → a plain streamed answer: a few sentences about tether from the simulated
  model's built-in text (it does not read the message).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

from tether.agents.agent import Agent
from tether.agents.models import Message, ScriptedCall, SimulatedModel
from tether.agents.tools import client_tool, tool


@tool
def current_time(timezone: str = "UTC") -> dict[str, str]:
    """The current time on the server."""
    now = datetime.datetime.now(datetime.UTC)
    return {"time": now.isoformat(timespec="seconds"), "timezone": timezone}


@tool(requires_approval=True)
def publish_report(title: str, audience: str = "team") -> dict[str, str]:
    """Publish a report to an audience (needs a person's approval first)."""
    return {"published": title, "audience": audience, "status": "sent"}


pick_color = client_tool(
    "pick_color", "Ask the person in the browser to pick a color",
    {"type": "object", "properties": {"prompt": {"type": "string"}}, "required": ["prompt"]},
    timeout=300.0,
)

_CALLS = {
    "time": ScriptedCall("current_time", {"timezone": "UTC"}),
    "color": ScriptedCall("pick_color", {"prompt": "Which color should the chart use?"}),
    "report": ScriptedCall("publish_report", {"title": "Weekly summary", "audience": "team"}),
}


def demo_script(messages: Sequence[Message]) -> ScriptedCall | None:
    """Per user turn: the calls its words ask for, each once, in a fixed order."""
    turn = max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)
    if turn < 0:
        return None
    words = messages[turn].content.lower()
    wanted = [name for name in _CALLS if name in words]
    if "tools" in words or "demo" in words:
        wanted = list(_CALLS)
    made = sum(len(m.tool_calls) for m in messages[turn + 1:] if m.role == "assistant")
    return _CALLS[wanted[made]] if made < len(wanted) else None


def demo_agent(*, tokens_per_second: float = 65.0, ttft: float = 0.3, seed: int = 7) -> Agent:
    return Agent(
        "demo",
        SimulatedModel(seed=seed, ttft=ttft, tokens_per_second=tokens_per_second,
                       answer_tokens=60, script=demo_script),
        instructions="You are the tether demo agent, running on a simulated model.",
        tools=[current_time, pick_color, publish_report],
        sessions=("demo*", "chat-*"),
    )
