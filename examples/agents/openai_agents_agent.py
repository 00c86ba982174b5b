"""An OpenAI Agents SDK agent served by tether, unchanged but for one front-end tool.

    tether simulated-model &          # or any OpenAI-compatible Chat Completions endpoint
    export OPENAI_BASE_URL=http://127.0.0.1:8766/v1 OPENAI_API_KEY=unused
    tether serve --agent examples/agents/openai_agents_agent.py:agent --sessions 'chat-*'

Say "add", "deploy" (waits for an approval anyone with `approve` gives, from any device, even
after a restart) or "ask" (answered by a browser that declared the tool) in a chat-* session.
"""

import os

from agents import Agent, OpenAIChatCompletionsModel, function_tool
from openai import AsyncOpenAI

from tether.agents.integrations.openai_agents import client_function_tool


@function_tool
def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


@function_tool(needs_approval=True)
def deploy(target: str) -> dict[str, str]:
    """Deploy the current build to a target."""
    return {"deployed": target}


@client_function_tool
def ask(q: str) -> str:
    """Ask the user a question; their browser answers."""
    raise NotImplementedError  # never runs here: a tether client answers


model = OpenAIChatCompletionsModel(
    model=os.environ.get("OPENAI_MODEL", "tether-simulated"),
    openai_client=AsyncOpenAI(
        base_url=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8766/v1"),
        api_key=os.environ.get("OPENAI_API_KEY", "unused")))

agent = Agent(name="assistant", instructions="You are a helpful assistant.", model=model,
              tools=[add, deploy, ask])
