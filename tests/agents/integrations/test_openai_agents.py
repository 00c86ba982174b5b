"""The scenarios against an OpenAI Agents SDK agent served by tether, and what the SDK's own
state and memory look like in the log after them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.agents.integrations import scenarios
from tests.agents.integrations.scenarios import Served, connect, read_log
from tests.agents.test_runs import until_event

pytestmark = pytest.mark.slow
SPEC = "tests.agents.integrations.openai_agents_agent:agent"
EXAMPLE = Path(__file__).parents[3] / "examples" / "agents" / "openai_agents_agent.py"


@pytest.mark.parametrize("scenario", [
    scenarios.streaming, scenarios.server_tool, scenarios.approval_across_sigkill,
    scenarios.rejection, scenarios.client_tool, scenarios.cancel, scenarios.steer])
async def test_openai_agents(serve_agent: Any, scenario: Any) -> None:
    await scenario(serve_agent(SPEC))


@pytest.mark.parametrize("scenario", [scenarios.streaming, scenarios.server_tool,
                                      scenarios.approval_across_sigkill])
async def test_example(serve_agent: Any, scenario: Any) -> None:
    """examples/agents/openai_agents_agent.py runs as documented (served by its path)."""
    await scenario(serve_agent(f"{EXAMPLE}:agent"))


def memory(events: list[dict[str, Any]], session: str) -> list[dict[str, Any]]:
    """The SDK session's items: the fold of the ``tether.items`` events."""
    items: list[dict[str, Any]] = []
    for e in events:
        data = e["data"]
        if e["type"] != "tether.items" or data.get("memory") != session:
            continue
        if data.get("clear"):
            items.clear()
        if data.get("pop"):
            del items[len(items) - data["pop"]:]
        items += data.get("add") or []
    return items


def shape(items: list[dict[str, Any]]) -> list[str]:
    """Each item as role or type, with the tool's name for calls."""
    out = []
    for item in items:
        kind = item.get("type") or "message"
        if kind == "message":
            out.append(str(item["role"]))
        elif kind == "function_call":
            out.append(f"call:{item['name']}")
        else:
            out.append(kind)
    return out


def index(events: list[dict[str, Any]], type_: str, **data: Any) -> int:
    return next(i for i, e in enumerate(events) if e["type"] == type_
                and all(e["data"].get(k) == v for k, v in data.items()))


async def test_approval_resumes_from_the_sdk_state(serve_agent: Any) -> None:
    """After the SIGKILL the run goes on from the checkpointed RunState: the model is not
    asked again for the call, and the memory holds each item once."""
    served: Served = serve_agent(SPEC)
    await scenarios.approval_across_sigkill(served)
    events = await read_log(served.port, "fw-approve")
    assert len(served.upstream.requests) == 2  # the call, then the answer after its result
    checkpoints = [e for e in events if e["type"] == "run.checkpoint"]
    assert len(checkpoints) == 1 and "state" in checkpoints[0]["data"]["state"]
    call = events[index(events, "approval.request")]["data"]["call"]
    order = [index(events, t, call=call) for t in ("approval.request", "approval.decision",
                                                   "tool.call", "tool.result")]
    assert order == sorted(order)
    assert shape(memory(events, "fw-approve")) == ["user", "call:deploy",
                                                   "function_call_output", "assistant"]


async def test_memory_across_runs_and_restarts(serve_agent: Any) -> None:
    """A second run of the session (on a restarted server) sees the first turn: the SDK's
    memory is read back from the log."""
    served: Served = serve_agent(SPEC)
    session = "fw-memory"
    peer = await connect(served.port, session)
    await peer.publish(session, "message", {"text": "please add"})
    first = await until_event(peer, "run.created")
    await until_event(peer, "run.state", run=first["data"]["run"], state="completed")
    await peer.close()
    served.server.kill()
    served.server.start()
    peer = await connect(served.port, session)  # it gets the log again: the first run too
    await peer.publish(session, "message", {"text": "thanks"})
    while (second := await until_event(peer, "run.created"))["data"]["input"]["text"] \
            != "thanks":
        pass
    await until_event(peer, "run.state", run=second["data"]["run"], state="completed")
    await peer.close()
    sent = served.upstream.requests[-1]["messages"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "tool", "assistant",
                                         "user"]
    assert sent[1]["content"] == "please add" and sent[3]["content"] == "5"
    events = await read_log(served.port, session)
    assert shape(memory(events, session)) == ["user", "call:add", "function_call_output",
                                              "assistant", "user", "assistant"]


async def test_restart_mid_answer_runs_the_step_again(serve_agent: Any) -> None:
    """A SIGKILL while the model streams: the cut stream ends ``restarted``, the items the
    step wrote to the memory are dropped, and the step runs again to completion."""
    session = "fw-restart"
    events, _ = await scenarios.restart_mid_stream(serve_agent(SPEC), session)
    assert shape(memory(events, session)) == ["user", "assistant"]


async def test_steer_is_a_follow_up_turn(serve_agent: Any) -> None:
    """The steer is the user input of a turn after the first answer, in the memory too."""
    served: Served = serve_agent(SPEC)
    await scenarios.steer(served)
    events = await read_log(served.port, "fw-steer")
    assert shape(memory(events, "fw-steer")) == ["user", "assistant", "user", "call:add",
                                                 "function_call_output", "assistant"]
    assert memory(events, "fw-steer")[2]["content"] == "now add"


async def test_client_tool_given_as_a_tether_spec(serve_agent: Any) -> None:
    """serve(client_tools=[client_tool(...)]) offers a tether spec to the SDK agent."""
    await scenarios.client_tool(serve_agent(
        "tests.agents.integrations.openai_agents_agent:with_specs"))


async def test_client_tool_waits_across_sigkill(serve_agent: Any) -> None:
    """A front-end call waits in the log through a SIGKILL; the answer given to the
    restarted server reaches the model, and the model was asked for the call once."""
    served: Served = serve_agent(SPEC)
    session = "fw-client-kill"
    peer = await connect(served.port, session, tools=["ask"])
    await peer.publish(session, "message", {"text": "please ask"})
    call = (await until_event(peer, "tool.call", name="ask"))["data"]
    await until_event(peer, "run.state", state="awaiting_tool")
    await peer.close()
    served.server.kill()
    served.server.start()
    peer = await connect(served.port, session, tools=["ask"])
    reply = await peer.publish(session, "tool.result", {
        "run": call["run"], "call": call["call"], "result": "teal"})
    assert reply["op"] == "published", reply
    await until_event(peer, "run.state", run=call["run"], state="completed")
    await peer.close()
    assert len(served.upstream.requests) == 2
    tool_messages = [m for m in served.upstream.requests[-1]["messages"] if m["role"] == "tool"]
    assert tool_messages[-1]["content"] == "teal"
    events = await read_log(served.port, session)
    scenarios.assert_clean(events)
    assert shape(memory(events, session)) == ["user", "call:ask", "function_call_output",
                                              "assistant"]


async def test_edited_arguments_are_not_run(serve_agent: Any) -> None:
    """The SDK cannot run a call with other arguments than the model's: an approval that
    edits them is recorded as a refusal, and the tool does not run."""
    served: Served = serve_agent(SPEC)
    session = "fw-edit"
    peer = await connect(served.port, session)
    await peer.publish(session, "message", {"text": "please deploy"})
    request = (await until_event(peer, "approval.request", name="deploy"))["data"]
    reply = await peer.publish(session, "approval.decision", {
        "run": request["run"], "call": request["call"], "decision": "approve",
        "arguments": {"target": "production"}})
    assert reply["op"] == "published", reply
    result = (await until_event(peer, "tool.result", call=request["call"]))["data"]
    assert "edited arguments" in result["error"] and "result" not in result
    await until_event(peer, "run.state", run=request["run"], state="completed")
    await peer.close()
    events = await read_log(served.port, session)
    assert not any(e["type"] == "tool.call" and e["data"]["call"] == request["call"]
                   for e in events)
    tool_messages = [m for m in served.upstream.requests[-1]["messages"] if m["role"] == "tool"]
    assert "not run" in tool_messages[-1]["content"]


async def test_steer_before_an_approval_survives_sigkill(serve_agent: Any) -> None:
    """A steer sent while the model prepares a call that needs approval is kept with the
    checkpoint: after the SIGKILL and the approval, it is the next turn's input."""
    served: Served = serve_agent(SPEC)
    session = "fw-steer-approve"
    served.upstream.ttft = 0.3  # the model takes a moment: the steer usually comes first
    peer = await connect(served.port, session)
    await peer.publish(session, "message", {"text": "please deploy"})
    created = (await until_event(peer, "run.created"))["data"]
    reply = await peer.publish(session, "run.steer", {"run": created["run"], "text": "now add"})
    assert reply["op"] == "published", reply
    request = (await until_event(peer, "approval.request", name="deploy"))["data"]
    await until_event(peer, "run.state", state="awaiting_approval")
    await peer.close()
    served.server.kill()
    served.upstream.ttft = 0.0
    served.server.start()
    peer = await connect(served.port, session)
    await peer.publish(session, "approval.decision", {
        "run": request["run"], "call": request["call"], "decision": "approve"})
    await until_event(peer, "tool.call", name="add", run=request["run"])
    await until_event(peer, "run.state", run=request["run"], state="completed")
    await peer.close()
    events = await read_log(served.port, session)
    scenarios.assert_clean(events)
    assert shape(memory(events, session)) == [
        "user", "call:deploy", "function_call_output", "assistant",
        "user", "call:add", "function_call_output", "assistant"]


async def test_a_call_left_unanswered_is_closed_for_the_next_run(serve_agent: Any) -> None:
    """A run cancelled while it waits for an approval leaves a call without output in the
    memory; the next run answers it first, so the model gets each call with its answer."""
    served: Served = serve_agent(SPEC)
    session = "fw-unanswered"
    peer = await connect(served.port, session)
    await peer.publish(session, "message", {"text": "please deploy"})
    request = (await until_event(peer, "approval.request", name="deploy"))["data"]
    await peer.publish(session, "run.cancel", {"run": request["run"]})
    await until_event(peer, "run.state", run=request["run"], state="cancelled")
    await peer.publish(session, "message", {"text": "hello again"})
    while (second := await until_event(peer, "run.created"))["data"]["run"] == request["run"]:
        pass
    await until_event(peer, "run.state", run=second["data"]["run"], state="completed")
    await peer.close()
    sent = served.upstream.requests[-1]["messages"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "tool", "user"]
    assert "Not run" in sent[3]["content"]


async def test_an_expired_approval_is_a_refusal(serve_agent: Any) -> None:
    """serve(approval_timeout=...): nobody decides in time, tether records the expiry, the
    SDK is told the call was not run, and the run completes."""
    served: Served = serve_agent("tests.agents.integrations.openai_agents_agent:expiring")
    session = "fw-expire"
    peer = await connect(served.port, session)
    await peer.publish(session, "message", {"text": "please deploy"})
    request = (await until_event(peer, "approval.request", name="deploy"))["data"]
    assert request["expires_at"]
    decision = (await until_event(peer, "approval.decision", call=request["call"]))["data"]
    assert decision["decision"] == "expired"
    result = (await until_event(peer, "tool.result", call=request["call"]))["data"]
    assert result["error"] == "expired by tether"
    await until_event(peer, "run.state", run=request["run"], state="completed")
    await peer.close()
    tool_messages = [m for m in served.upstream.requests[-1]["messages"] if m["role"] == "tool"]
    assert "expired by tether" in tool_messages[-1]["content"]
