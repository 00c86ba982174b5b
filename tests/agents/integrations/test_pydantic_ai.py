"""The scenarios against a Pydantic AI agent served with ``tether serve --agent``, plus what is
particular to it: resuming from its checkpointed message history after a SIGKILL (a tool run
before the kill is not run again, a steer sent while waiting reaches the model), a run cut off
mid-stream, a front-end tool's error, memory across runs, and the example."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.agents.integrations import scenarios
from tests.agents.integrations.scenarios import Served, connect, read_log, states
from tests.agents.test_runs import until_event

pytestmark = pytest.mark.slow
SPEC = "tests.agents.integrations.pydantic_ai_agent:agent"
EXAMPLE = Path(__file__).parents[3] / "examples" / "agents" / "pydantic_ai_agent.py"


@pytest.mark.parametrize("scenario", [
    scenarios.streaming, scenarios.server_tool, scenarios.approval_across_sigkill,
    scenarios.rejection, scenarios.client_tool, scenarios.cancel, scenarios.steer])
async def test_pydantic_ai(serve_agent: Any, scenario: Any) -> None:
    await scenario(serve_agent(SPEC))


@pytest.mark.parametrize("scenario", [
    scenarios.streaming, scenarios.server_tool, scenarios.approval_across_sigkill,
    scenarios.client_tool])
async def test_example(serve_agent: Any, scenario: Any) -> None:
    """The example runs as documented (served from its file path)."""
    await scenario(serve_agent(f"{EXAMPLE}:agent"))


@pytest.mark.parametrize("spec,scenario", [
    ("dynamic", scenarios.approval_across_sigkill), ("dynamic", scenarios.rejection),
    ("with_client_tools", scenarios.client_tool)])
async def test_other_idioms(serve_agent: Any, spec: str, scenario: Any) -> None:
    """An approval a tool asks for itself (``ApprovalRequired``); a front-end tool given to
    ``serve(client_tools=...)``."""
    await scenario(serve_agent(f"tests.agents.integrations.pydantic_ai_agent:{spec}"))


def tool_contents(served: Served) -> list[str]:
    return [str(m["content"]) for m in served.upstream.requests[-1]["messages"]
            if m["role"] == "tool"]


async def test_resumes_from_its_history_after_sigkill(serve_agent: Any) -> None:
    """``add`` runs, then ``deploy`` waits for an approval; the server is SIGKILLed and a steer
    arrives meanwhile. The restarted run resumes from the checkpoint: ``add`` is not run again,
    the model sees both results and the steer."""
    served = serve_agent(SPEC)
    session = "fw-resume"
    peer = await connect(served.port, session)
    await peer.publish(session, "message", {"text": "please add and deploy"})
    request = (await until_event(peer, "approval.request", name="deploy"))["data"]
    await until_event(peer, "run.state", state="awaiting_approval")
    reply = await peer.publish(session, "run.steer", {"run": request["run"],
                                                      "text": "then add again"})
    assert reply["op"] == "published", reply
    await peer.close()
    served.server.kill()
    served.server.start()
    approver = await connect(served.port, session)
    await approver.publish(session, "approval.decision", {
        "run": request["run"], "call": request["call"], "decision": "approve"})
    await until_event(approver, "run.state", run=request["run"], state="completed")
    await approver.close()
    events = await read_log(served.port, session)
    scenarios.assert_clean(events)
    adds = [e for e in events if e["type"] == "tool.call" and e["data"]["name"] == "add"]
    # Once before the kill; once more because the steer asked for it, after the restart.
    assert len(adds) == 2
    kill_point = next(i for i, e in enumerate(events) if e["type"] == "approval.decision")
    assert sum(1 for e in events[kill_point:] if e["type"] == "tool.call"
               and e["data"]["name"] == "add") == 1
    contents = tool_contents(served)
    assert contents[0] == "5" and "staging" in contents[1] and contents[2] == "5"
    users = [m["content"] for m in served.upstream.requests[-1]["messages"]
             if m["role"] == "user"]
    assert users == ["please add and deploy", "then add again"]
    assert states(events, request["run"]) == ["running", "awaiting_approval", "running",
                                              "completed"]


async def test_cut_off_mid_stream(serve_agent: Any) -> None:
    """A run SIGKILLed while it streams ends that stream as ``restarted`` and answers again
    from the same history."""
    served = serve_agent(SPEC)
    await scenarios.restart_mid_stream(served, "fw-cut")
    assert [m["content"] for m in served.upstream.requests[-1]["messages"]] == ["hello there"]


async def test_client_tool_error(serve_agent: Any) -> None:
    """A front-end tool's error reaches the model as the tool's failure."""
    served = serve_agent(SPEC)
    session = "fw-client-error"
    peer = await connect(served.port, session, tools=["ask"])
    await peer.publish(session, "message", {"text": "please ask"})
    call = (await until_event(peer, "tool.call", name="ask"))["data"]
    await peer.publish(session, "tool.result", {"run": call["run"], "call": call["call"],
                                                "error": "the user left"})
    await until_event(peer, "run.state", run=call["run"], state="completed")
    await peer.close()
    assert "the user left" in tool_contents(served)[-1]


async def test_memory_across_runs(serve_agent: Any) -> None:
    """A later run of the session sees the earlier turns: the message, the tool call and its
    result, the answer."""
    served = serve_agent(SPEC)
    session = "fw-memory"
    peer = await connect(served.port, session)
    await peer.publish(session, "message", {"text": "please add"})
    run = (await until_event(peer, "run.created"))["data"]["run"]
    await until_event(peer, "run.state", run=run, state="completed")
    await peer.publish(session, "message", {"text": "thanks"})
    second = (await until_event(peer, "run.created"))["data"]["run"]
    await until_event(peer, "run.state", run=second, state="completed")
    await peer.close()
    events = await read_log(served.port, session)
    answer = next(e["data"]["text"] for e in events if e["type"] == "stream.end")
    call = next(e["data"]["call"] for e in events if e["type"] == "tool.call")
    sent = served.upstream.requests[-1]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool", "assistant", "user"]
    assert sent[0]["content"] == "please add" and sent[4]["content"] == "thanks"
    assert sent[1]["tool_calls"][0]["id"] == call and sent[2]["content"] == "5"
    assert sent[3]["content"] == answer


async def test_checkpoint_holds_the_runs_own_messages(serve_agent: Any) -> None:
    """A checkpoint holds the run's own messages, not the session's earlier turns (the log
    has those): after a SIGKILL the run rebuilds its whole history from both."""
    served = serve_agent(SPEC)
    session = "fw-memory-resume"
    peer = await connect(served.port, session)
    await peer.publish(session, "message", {"text": "please add"})
    run = (await until_event(peer, "run.created"))["data"]["run"]
    await until_event(peer, "run.state", run=run, state="completed")
    await peer.publish(session, "message", {"text": "please deploy"})
    request = (await until_event(peer, "approval.request", name="deploy"))["data"]
    await peer.close()
    served.server.kill()
    served.server.start()
    approver = await connect(served.port, session)
    await approver.publish(session, "approval.decision", {
        "run": request["run"], "call": request["call"], "decision": "approve"})
    await until_event(approver, "run.state", run=request["run"], state="completed")
    await approver.close()
    events = await read_log(served.port, session)
    checkpoint = next(e["data"]["state"] for e in events if e["type"] == "run.checkpoint"
                      and e["data"]["run"] == request["run"])
    assert checkpoint["base"] == "log"
    assert checkpoint["messages"][0]["parts"][0]["content"] == "please deploy"
    sent = served.upstream.requests[-1]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool", "assistant", "user",
                                         "assistant", "tool"]
    assert sent[0]["content"] == "please add" and sent[4]["content"] == "please deploy"
    assert "staging" in sent[6]["content"]
