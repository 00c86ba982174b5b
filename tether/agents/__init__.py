"""Agent runs: the run state machine, agents, tools, model adapters, the run manager."""

from tether.agents.agent import Agent, BusyPolicy
from tether.agents.models import OpenAIChatModel, SimulatedModel
from tether.agents.runner import Run, RunManager
from tether.agents.state import RunState
from tether.agents.tools import Tool, client_tool, tool

__all__ = ["Agent", "BusyPolicy", "OpenAIChatModel", "Run", "RunManager", "RunState",
           "SimulatedModel", "Tool", "client_tool", "tool"]
