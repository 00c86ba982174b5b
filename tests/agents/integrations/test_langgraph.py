"""The scenarios against a LangGraph graph served by tether, and the checkpointer that keeps
LangGraph's checkpoints in the session log."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.agents.integrations import scenarios
from tests.agents.test_runs import APPROVER, until_event
from tests.helpers import ServerProcess, token
from tests.server.test_workers import peers_on_each_worker
from tether.agents.upstream import SimulatedUpstream

SPEC = "tests.agents.integrations.langgraph_agent:agent"
EXAMPLE = Path(__file__).parents[3] / "examples" / "agents" / "langgraph_agent.py"


@pytest.mark.slow
@pytest.mark.parametrize("scenario", [
    scenarios.streaming, scenarios.server_tool, scenarios.approval_across_sigkill,
    scenarios.rejection, scenarios.client_tool, scenarios.cancel, scenarios.steer])
async def test_langgraph(serve_agent: Any, scenario: Any) -> None:
    await scenario(serve_agent(SPEC))


@pytest.mark.slow
@pytest.mark.parametrize("scenario", [scenarios.streaming, scenarios.server_tool])
async def test_a_compiled_graph_is_served_as_it_is(serve_agent: Any, scenario: Any) -> None:
    """``--agent module:graph``: the graph object itself, detected by its type."""
    await scenario(serve_agent("tests.agents.integrations.langgraph_agent:graph"))


@pytest.mark.slow
@pytest.mark.parametrize("scenario", [
    scenarios.streaming, scenarios.server_tool, scenarios.approval_across_sigkill,
    scenarios.client_tool])
async def test_example(serve_agent: Any, scenario: Any) -> None:
    """examples/agents/langgraph_agent.py runs as documented (the graph, served by its path;
    its front-end tool says ``"target": "client"``)."""
    await scenario(serve_agent(f"{EXAMPLE}:agent"))


@pytest.mark.slow
@pytest.mark.parametrize("scenario", [
    scenarios.streaming, scenarios.server_tool, scenarios.approval_across_sigkill,
    scenarios.rejection, scenarios.client_tool, scenarios.steer])
async def test_prebuilt_react_agent(serve_agent: Any, scenario: Any) -> None:
    """``create_react_agent``'s graph (a tool call per ``Send``) maps the same way."""
    await scenario(serve_agent("tests.agents.integrations.langgraph_agent:react_agent"))


@pytest.mark.slow
@pytest.mark.parametrize("scenario", [scenarios.approval_across_sigkill, scenarios.rejection])
async def test_human_in_the_loop_middleware_shape(serve_agent: Any, scenario: Any) -> None:
    """An interrupt shaped as LangChain's HumanInTheLoopMiddleware asks (``action_requests``)
    is answered as it expects (``decisions``)."""
    await scenario(serve_agent("tests.agents.integrations.langgraph_agent:hitl_agent"))


@pytest.mark.slow
@pytest.mark.parametrize("spec", [SPEC, "tests.agents.integrations.langgraph_agent:hitl_agent",
                                  "tests.agents.integrations.langgraph_agent:nested_agent"])
async def test_an_approval_with_edited_arguments(serve_agent: Any, spec: str) -> None:
    """The approver's edited arguments reach the tool (``arguments`` of the resume value, or
    an ``edit`` decision), and the recorded call shows them."""
    served = serve_agent(spec)
    session = "fw-edit"
    peer = await scenarios.connect(served.port, session)
    await peer.publish(session, "message", {"text": "please deploy"})
    request = (await until_event(peer, "approval.request", name="deploy"))["data"]
    reply = await peer.publish(session, "approval.decision", {
        "run": request["run"], "call": request["call"], "decision": "approve",
        "arguments": {"target": "production"}})
    assert reply["op"] == "published", reply
    call = (await until_event(peer, "tool.call", call=request["call"]))["data"]
    assert call["arguments"] == {"target": "production"}
    result = (await until_event(peer, "tool.result", call=request["call"]))["data"]
    assert result["result"] == {"deployed": "production"}
    await until_event(peer, "run.state", run=request["run"], state="completed")
    await peer.close()


@pytest.mark.slow
async def test_with_busy_merge_a_message_is_input_of_the_active_run(serve_agent: Any) -> None:
    """``busy="merge"``: a message sent while a run streams is fed to that run, as a steer."""
    served = serve_agent("tests.agents.integrations.langgraph_agent:merging")
    served.upstream.tokens_per_second = 50.0
    served.upstream.answer_tokens = 60
    session = "fw-merge"
    peer = await scenarios.connect(served.port, session)
    await peer.publish(session, "message", {"text": "hello there"})
    first = (await until_event(peer, "stream.append"))["data"]
    await peer.publish(session, "message", {"text": "now add"})
    call = (await until_event(peer, "tool.call", name="add"))["data"]
    assert call["run"] == first["run"]
    await until_event(peer, "run.state", run=first["run"], state="completed")
    await peer.close()
    events = await scenarios.read_log(served.port, session)
    assert [e["type"] for e in events].count("run.created") == 1
    assert user_texts(served.upstream.requests[-1]) == ["hello there", "now add"]


@pytest.mark.slow
@pytest.mark.parametrize("scenario", [
    scenarios.streaming, scenarios.server_tool, scenarios.approval_across_sigkill,
    scenarios.client_tool, scenarios.cancel])
async def test_an_agent_inside_a_subgraph(serve_agent: Any, scenario: Any) -> None:
    """The same agent as a subgraph node of an outer graph maps the same way."""
    await scenario(serve_agent("tests.agents.integrations.langgraph_agent:nested_agent"))


@pytest.mark.slow
async def test_an_expired_approval_is_a_refusal(serve_agent: Any) -> None:
    """``approval_timeout``: nobody decides in time, the decision is ``expired``, the tool
    does not run and the model is told."""
    served = serve_agent("tests.agents.integrations.langgraph_agent:hasty")
    session = "fw-expire"
    peer = await scenarios.connect(served.port, session)
    await peer.publish(session, "message", {"text": "please deploy"})
    request = (await until_event(peer, "approval.request", name="deploy"))["data"]
    assert request["expires_at"] is not None
    decision = (await until_event(peer, "approval.decision", call=request["call"]))["data"]
    assert decision["decision"] == "expired"
    result = (await until_event(peer, "tool.result", call=request["call"]))["data"]
    assert result["error"].startswith("expired")
    await until_event(peer, "run.state", run=request["run"], state="completed")
    await peer.close()
    tool = [m for m in served.upstream.requests[-1]["messages"] if m["role"] == "tool"]
    assert "not deployed: expired" in tool[-1]["content"]


@pytest.mark.slow
async def test_a_front_end_tools_error_reaches_the_model(serve_agent: Any) -> None:
    served = serve_agent(SPEC)
    session = "fw-client-error"
    peer = await scenarios.connect(served.port, session, tools=["ask"])
    await peer.publish(session, "message", {"text": "please ask"})
    call = (await until_event(peer, "tool.call", name="ask"))["data"]
    reply = await peer.publish(session, "tool.result", {
        "run": call["run"], "call": call["call"], "error": "the user closed the dialog"})
    assert reply["op"] == "published", reply
    await until_event(peer, "run.state", run=call["run"], state="completed")
    await peer.close()
    events = await scenarios.read_log(served.port, session)
    scenarios.assert_clean(events)
    assert [e["data"].get("error") for e in events if e["type"] == "tool.result"] == [
        "the user closed the dialog"]
    tool = [m for m in served.upstream.requests[-1]["messages"] if m["role"] == "tool"]
    assert "the user closed the dialog" in tool[-1]["content"]


@pytest.mark.slow
async def test_a_static_breakpoint_is_passed(serve_agent: Any) -> None:
    """``interrupt_before=["tools"]`` (LangGraph's debugging breakpoint) does not stop a
    served run: it carries on and calls the tool."""
    await scenarios.server_tool(serve_agent("tests.agents.integrations.langgraph_agent:paused"))


def user_texts(request: dict[str, Any]) -> list[str]:
    return [str(m["content"]) for m in request["messages"] if m["role"] == "user"]


@pytest.mark.slow
async def test_earlier_turns_are_the_threads_memory(serve_agent: Any) -> None:
    """The session is the graph's thread: a second run sees the first turn."""
    served = serve_agent(SPEC)
    session = "fw-memory"
    peer = await scenarios.connect(served.port, session)
    for text in ("first words", "please add"):
        await peer.publish(session, "message", {"text": text})
        run = (await until_event(peer, "run.created"))["data"]["run"]
        await until_event(peer, "run.state", run=run, state="completed")
    await peer.close()
    last = served.upstream.requests[-1]["messages"]
    assert user_texts(served.upstream.requests[-1]) == ["first words", "please add"]
    assert [m["role"] for m in last] == ["user", "assistant", "user", "assistant", "tool"]


@pytest.mark.slow
async def test_a_step_cut_off_by_sigkill_runs_again_from_the_checkpoint(
        serve_agent: Any) -> None:
    """SIGKILL while the model streams: the restarted server ends the cut stream as
    ``restarted`` and runs the step again from the graph's checkpoint — the input is not fed
    twice — and the run completes."""
    served = serve_agent(SPEC)
    await scenarios.restart_mid_stream(served)
    assert user_texts(served.upstream.requests[-1]) == ["hello there"]


@pytest.mark.slow
async def test_a_call_left_unanswered_by_a_cancel_is_closed_for_the_next_run(
        serve_agent: Any) -> None:
    """A run cancelled while its tool call waits for approval leaves that call unanswered in
    the thread; the next run answers it first, so the model gets a valid conversation."""
    served = serve_agent(SPEC)
    session = "fw-dangling"
    peer = await scenarios.connect(served.port, session)
    await peer.publish(session, "message", {"text": "please deploy"})
    request = (await until_event(peer, "approval.request", name="deploy"))["data"]
    await peer.publish(session, "run.cancel", {"run": request["run"]})
    await until_event(peer, "run.state", run=request["run"], state="cancelled")
    await peer.publish(session, "message", {"text": "hello again"})
    run = (await until_event(peer, "run.created"))["data"]["run"]
    await until_event(peer, "run.state", run=run, state="completed")
    await peer.close()
    last = served.upstream.requests[-1]["messages"]
    calls = [c["id"] for m in last for c in m.get("tool_calls") or ()]
    answered = [m["tool_call_id"] for m in last if m["role"] == "tool"]
    assert calls and calls == answered
    assert "not run" in next(m["content"] for m in last if m["role"] == "tool")


@pytest.mark.slow
async def test_a_waiting_run_survives_its_workers_death(
        tmp_path: Path, upstream: tuple[SimulatedUpstream, str]) -> None:
    """Two workers share the store: the worker driving a graph that waits for an approval is
    SIGKILLed, the approval comes through the other, and the run resumes from the graph's
    checkpoint (read from the shared log by whichever worker claims it) and completes, once."""
    server = ServerProcess(tmp_path / "data", workers=2, extra=["--agent", SPEC, "--sessions",
                                                                "fw-*"],
                           env={"TETHER_LEASE_SECONDS": "1", "OPENAI_BASE_URL": upstream[1],
                                "OPENAI_API_KEY": "sk-test"})
    (tmp_path / "data").mkdir()
    server.start()
    try:
        peers = await peers_on_each_worker(server, token(caps=APPROVER))
        session = "fw-workers"
        for peer in peers.values():
            assert (await peer.attach(session))["op"] == "attached"
        (driver_pid, driver), (_, other) = peers.items()
        await driver.publish(session, "message", {"text": "please deploy"})  # runs there
        request = (await until_event(other, "approval.request", name="deploy"))["data"]
        await until_event(other, "run.state", state="awaiting_approval")
        await driver.close()
        server.kill_worker(driver_pid)
        reply = await other.publish(session, "approval.decision", {
            "run": request["run"], "call": request["call"], "decision": "approve"})
        assert reply["op"] == "published", reply
        result = (await until_event(other, "tool.result", call=request["call"]))["data"]
        assert result["result"] == {"deployed": "staging"}
        await until_event(other, "run.state", run=request["run"], state="completed")
        await other.close()
        events = await scenarios.read_log(server.port, session)
        scenarios.assert_clean(events)
        assert scenarios.states(events, request["run"]) == [
            "running", "awaiting_approval", "running", "completed"]
    finally:
        server.stop()
