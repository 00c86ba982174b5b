"""A Pydantic AI agent, served as durable tether runs with no change to the agent.

    pip install 'tether[pydantic-ai]'
    tether simulated-model &    # a stand-in model on :8766, or set OPENAI_BASE_URL, OPENAI_API_KEY
    tether serve --agent examples/agents/pydantic_ai_agent.py:agent --sessions 'chat-*'

Then say "please add", "please deploy" (waits for an approval in the session) or "please ask"
(a question a browser answers) in a session named chat-something.
"""

import os

from pydantic_ai import Agent, ExternalToolset, ToolDefinition
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider

model = OpenAIChatModel(
    os.environ.get("OPENAI_MODEL", "tether-simulated"),
    provider=OpenAIProvider(base_url=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8766/v1"),
                            api_key=os.environ.get("OPENAI_API_KEY", "unused")),
)

# A tool the browser runs: Pydantic AI defers it; tether asks the clients and waits for one.
browser = ExternalToolset([ToolDefinition(
    name="ask", description="Ask the user a question",
    parameters_json_schema={"type": "object", "properties": {"q": {"type": "string"}},
                            "required": ["q"]})])

agent = Agent(model, instructions="You are a helpful assistant.", toolsets=[browser])


@agent.tool_plain
def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


@agent.tool_plain(requires_approval=True)
def deploy(target: str) -> dict[str, str]:
    """Deploy to a target: someone with the approve capability decides, from any device."""
    return {"deployed": target}
