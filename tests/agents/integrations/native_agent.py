"""The reference for the scenarios: a native tether agent on the same upstream and tools."""

import os

from tether.agents import Agent, OpenAIChatModel, client_tool, tool


@tool
def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


@tool(requires_approval=True)
def deploy(target: str) -> dict[str, str]:
    """Deploy to a target (needs approval)."""
    return {"deployed": target}


ask = client_tool("ask", "Ask the user a question", {
    "type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]})

agent = Agent("native", OpenAIChatModel("tether-simulated", base_url=os.environ["OPENAI_BASE_URL"],
                                        api_key=os.environ.get("OPENAI_API_KEY")),
              tools=[add, deploy, ask], sessions=["fw-*"], coalesce_window=0.005)
