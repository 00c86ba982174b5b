"""The scenarios' agent as a LangGraph graph: a model node and a ToolNode, the same tools as the
native reference, approval and the front-end tool in LangGraph's idiom (``interrupt``)."""

import os
import warnings

from langchain_core.tools import BaseTool, tool
from langchain_openai import ChatOpenAI
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, create_react_agent, tools_condition
from langgraph.types import interrupt

from tether.agents.integrations.langgraph import serve


@tool
def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


@tool
def deploy(target: str) -> dict[str, str] | str:
    """Deploy to a target (needs approval)."""
    answer = interrupt({"name": "deploy", "arguments": {"target": target}})
    if answer["decision"] != "approve":
        return f"not deployed: {answer['decision']} by {answer['by']}"
    return {"deployed": answer["arguments"]["target"]}


@tool
def ask(q: str) -> str:
    """Ask the user a question."""
    return str(interrupt({"name": "ask", "arguments": {"q": q}}))


def chat_model() -> ChatOpenAI:
    return ChatOpenAI(model="tether-simulated", base_url=os.environ["OPENAI_BASE_URL"],
                      api_key=os.environ.get("OPENAI_API_KEY", "unused"), streaming=True,
                      use_responses_api=False)


def model_and_tools(tools: list[BaseTool]) -> StateGraph:
    """The usual hand-written agent graph: a model node and a ToolNode, in a loop."""
    model = chat_model().bind_tools(tools)

    async def call_model(state: MessagesState) -> MessagesState:
        return {"messages": [await model.ainvoke(state["messages"])]}

    builder = StateGraph(MessagesState)
    builder.add_node("model", call_model)
    builder.add_node("tools", ToolNode(tools))
    builder.add_edge(START, "model")
    builder.add_conditional_edges("model", tools_condition)
    builder.add_edge("tools", "model")
    return builder


tools: list[BaseTool] = [add, deploy, ask]
builder = model_and_tools(tools)
graph = builder.compile()

agent = serve(graph, name="langgraph", sessions=["fw-*"], client_tools=["ask"],
              coalesce_window=0.005)
merging = serve(graph, name="merging", sessions=["fw-*"], client_tools=["ask"], busy="merge",
                coalesce_window=0.005)
hasty = serve(graph, name="hasty", sessions=["fw-*"], client_tools=["ask"],
              approval_timeout=0.5, coalesce_window=0.005)
# A static breakpoint is not an approval: the run carries on past it.
paused = serve(builder.compile(interrupt_before=["tools"]), name="paused", sessions=["fw-*"],
               client_tools=["ask"], coalesce_window=0.005)

# The same tools in LangGraph's prebuilt agent (deprecated in favour of langchain's
# create_agent, which is not installed here, but still the graph many agents are built with).
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    react = create_react_agent(chat_model(), tools)

react_agent = serve(react, name="react", sessions=["fw-*"], client_tools=["ask"],
                    coalesce_window=0.005)


# The approval in the shape of LangChain's HumanInTheLoopMiddleware (its interrupt payload and
# resume value), here raised by the tool itself.
@tool("deploy")
def reviewed_deploy(target: str) -> dict[str, str] | str:
    """Deploy to a target (needs approval)."""
    request = {"action_requests": [{"name": "deploy", "args": {"target": target}}],
               "review_configs": [{"action_name": "deploy",
                                   "allowed_decisions": ["approve", "edit", "reject"]}]}
    decision = interrupt(request)["decisions"][0]
    if decision["type"] == "reject":
        return str(decision["message"])
    if decision["type"] == "edit":
        target = decision["edited_action"]["args"]["target"]
    return {"deployed": target}


hitl = model_and_tools([add, reviewed_deploy, ask])
hitl_agent = serve(hitl.compile(), name="hitl", sessions=["fw-*"], client_tools=["ask"],
                   coalesce_window=0.005)


# The agent as a subgraph of an outer graph: its tokens, tool calls and interrupts come from
# inside the subgraph.
outer = StateGraph(MessagesState)
outer.add_node("assistant", builder.compile())
outer.add_edge(START, "assistant")
nested_agent = serve(outer.compile(), name="nested", sessions=["fw-*"], client_tools=["ask"],
                     coalesce_window=0.005)
