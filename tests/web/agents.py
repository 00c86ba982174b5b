"""Agents for the browser tests: the demo agent with a longer answer, so a test can refresh,
go offline or press Stop while it streams (120 tokens at 24 tok/s: about 5 s)."""

from tether.agents.agent import Agent
from tether.agents.demo import current_time, demo_script, pick_color, publish_report
from tether.agents.models import SimulatedModel

slow = Agent(
    "demo",
    SimulatedModel(seed=7, ttft=0.2, tokens_per_second=24, answer_tokens=120,
                   script=demo_script),
    instructions="The demo agent, slowed down for browser tests.",
    tools=[current_time, pick_color, publish_report],
    sessions=("demo*", "chat-*"),
)
