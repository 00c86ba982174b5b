"""The scenarios' agent written with Pydantic AI, in its own idioms: ``add`` a plain tool,
``deploy`` a tool with ``requires_approval=True``, ``ask`` an external (front-end) tool of an
``ExternalToolset``; the model behind OpenAI Chat Completions at ``OPENAI_BASE_URL``."""

import os

from pydantic_ai import Agent, ApprovalRequired, ExternalToolset, RunContext, ToolDefinition
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider

from tether.agents import client_tool
from tether.agents.integrations.pydantic_ai import serve

model = OpenAIChatModel("tether-simulated", provider=OpenAIProvider(
    base_url=os.environ["OPENAI_BASE_URL"], api_key=os.environ.get("OPENAI_API_KEY")))

browser = ExternalToolset([ToolDefinition(
    name="ask", description="Ask the user a question",
    parameters_json_schema={"type": "object", "properties": {"q": {"type": "string"}},
                            "required": ["q"]})])

agent = Agent(model, name="pydantic-ai-test", toolsets=[browser])


@agent.tool_plain
def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


@agent.tool_plain(requires_approval=True)
def deploy(target: str) -> dict[str, str]:
    """Deploy to a target (needs approval)."""
    return {"deployed": target}


# The approval asked from inside the tool (``ApprovalRequired``), as a tool that decides at
# call time whether it needs one does.
dynamic = Agent(model, name="pydantic-ai-dynamic")


@dynamic.tool(name="deploy")
def deploy_once_approved(ctx: RunContext[None], target: str) -> dict[str, str]:
    """Deploy to a target (needs approval)."""
    if not ctx.tool_call_approved:
        raise ApprovalRequired
    return {"deployed": target}


# A front-end tool given to tether's serve() rather than declared on the agent.
with_client_tools = serve(Agent(model, name="pydantic-ai-client-tools"), sessions=["fw-*"],
                          client_tools=[client_tool("ask", "Ask the user a question", {
                              "type": "object", "properties": {"q": {"type": "string"}},
                              "required": ["q"]})])
