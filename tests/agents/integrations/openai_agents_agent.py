"""The scenarios' agent written with the OpenAI Agents SDK: ``add`` a server tool, ``deploy``
needing approval (the SDK's own ``needs_approval``), ``ask`` a front-end tool."""

import os

from agents import Agent, OpenAIChatCompletionsModel, function_tool
from openai import AsyncOpenAI

from tether.agents import client_tool as tether_client_tool
from tether.agents.integrations.openai_agents import client_function_tool, serve


@function_tool
def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


@function_tool(needs_approval=True)
def deploy(target: str) -> dict[str, str]:
    """Deploy to a target (needs approval)."""
    return {"deployed": target}


@client_function_tool
def ask(q: str) -> str:
    """Ask the user a question."""
    raise NotImplementedError  # answered by a browser


model = OpenAIChatCompletionsModel(
    model="tether-simulated",
    openai_client=AsyncOpenAI(base_url=os.environ["OPENAI_BASE_URL"],
                              api_key=os.environ.get("OPENAI_API_KEY", "unused")))
agent = Agent(name="helper", instructions="You help with arithmetic and deployments.",
              model=model, tools=[add, deploy, ask])

# The same agent with ``ask`` given as a tether client_tool spec instead (serve(client_tools=)).
with_specs = serve(Agent(name="helper", model=model, tools=[add, deploy]), sessions=["fw-*"],
                   name="helper", client_tools=[tether_client_tool(
                       "ask", "Ask the user a question", {
                           "type": "object", "properties": {"q": {"type": "string"}},
                           "required": ["q"]})])

# The same agent whose approvals expire after a second.
expiring = serve(Agent(name="helper", model=model, tools=[add, deploy]), sessions=["fw-*"],
                 name="helper", approval_timeout=1.0)
