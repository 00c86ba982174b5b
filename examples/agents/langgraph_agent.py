"""A LangGraph agent served by tether as it is: a model node, a ToolNode, and interrupt().

    tether simulated-model &          # or any OpenAI-compatible Chat Completions endpoint
    export OPENAI_BASE_URL=http://127.0.0.1:8766/v1 OPENAI_API_KEY=unused
    tether serve --agent examples/agents/langgraph_agent.py:agent --sessions 'chat-*'

Say "add", "deploy" (waits for an approval anyone with `approve` gives, from any device, even
after a restart) or "ask" (answered by a browser that declared the tool) in a chat-* session.
The session is the graph's thread: its checkpoints live in the session's log.
"""

import os

from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition
from langgraph.types import interrupt


@tool
def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


@tool
def deploy(target: str) -> dict[str, str] | str:
    """Deploy the current build to a target."""
    answer = interrupt({"name": "deploy", "arguments": {"target": target}})  # an approval
    if answer["decision"] != "approve":
        return f"not deployed ({answer['decision']} by {answer['by']})"
    return {"deployed": answer["arguments"]["target"]}  # the approver may have edited it


@tool
def ask(q: str) -> str:
    """Ask the user a question; their browser answers."""
    return str(interrupt({"name": "ask", "arguments": {"q": q}, "target": "client"}))


tools = [add, deploy, ask]
model = ChatOpenAI(model=os.environ.get("OPENAI_MODEL", "tether-simulated"),
                   base_url=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8766/v1"),
                   api_key=os.environ.get("OPENAI_API_KEY", "unused"),
                   streaming=True, use_responses_api=False).bind_tools(tools)


async def call_model(state: MessagesState) -> MessagesState:
    return {"messages": [await model.ainvoke(state["messages"])]}


builder = StateGraph(MessagesState)
builder.add_node("model", call_model)
builder.add_node("tools", ToolNode(tools))
builder.add_edge(START, "model")
builder.add_conditional_edges("model", tools_condition)
builder.add_edge("tools", "model")
agent = builder.compile()  # no checkpointer: tether gives it one in its store
