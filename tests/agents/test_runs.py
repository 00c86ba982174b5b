"""Runs end to end over real sockets: streaming, tools, approvals, cancel, two devices."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.helpers import Peer, token
from tether.server import Server

APPROVER = ["subscribe", "publish", "presence", "approve"]


async def device(server: Server, sub: str = "alice", caps: list[str] | None = None) -> Peer:
    peer = await Peer.connect(server.port)
    await peer.hello(token(sub, caps=caps or APPROVER))
    await peer.attach("s")
    return peer


async def until_event(peer: Peer, type: str, **data: Any) -> dict[str, Any]:
    """The next event of ``type`` whose data matches, including frames already buffered."""
    def matches(frame: dict[str, Any]) -> bool:
        return (frame.get("op") == "event" and frame["type"] == type
                and all(frame["data"].get(k) == v for k, v in data.items()))

    for i, frame in enumerate(peer.frames):
        if matches(frame):
            del peer.frames[:i + 1]
            return frame
    peer.frames = []
    while True:
        frame = await peer.recv()
        if matches(frame):
            peer.frames.remove(frame)
            return frame


async def events_until_final(peer: Peer) -> list[dict[str, Any]]:
    """Every event frame up to the run's final state."""
    got: list[dict[str, Any]] = []
    buffered = [f for f in peer.frames if f.get("op") == "event"]
    peer.frames = []
    while True:
        frame = buffered.pop(0) if buffered else await peer.recv()
        if frame.get("op") != "event":
            continue
        got.append(frame)
        if frame["type"] == "run.state" and frame["data"]["state"] in (
                "completed", "failed", "cancelled"):
            return got


async def test_message_starts_a_streamed_run_seen_identically_by_two_devices(
        agent_server: Server) -> None:
    a, b = await device(agent_server), await device(agent_server, "bob")
    await a.publish("s", "message", {"text": "hello add"})
    seen_a, seen_b = await events_until_final(a), await events_until_final(b)
    assert seen_a == seen_b
    types = [e["type"] for e in seen_a]
    assert types[:3] == ["message", "run.created", "run.state"]
    assert "tool.call" in types and "tool.result" in types
    result = next(e for e in seen_a if e["type"] == "tool.result")
    assert result["data"]["result"] == 5
    deltas = [e["data"]["text"] for e in seen_a if e["type"] == "stream.append"]
    end = [e for e in seen_a if e["type"] == "stream.end"][-1]
    assert "".join(deltas) == end["data"]["text"] and end["data"]["role"] == "assistant"
    assert seen_a[-1]["data"]["state"] == "completed"
    await a.close()
    await b.close()


async def test_approval_from_another_device_and_exactly_one_decision(
        agent_server: Server) -> None:
    a, b = await device(agent_server), await device(agent_server, "bob")
    await a.publish("s", "message", {"text": "please deploy"})
    request = await until_event(b, "approval.request")
    run, call = request["data"]["run"], request["data"]["call"]
    await until_event(b, "run.state", state="awaiting_approval")
    decision = {"run": run, "call": call, "decision": "approve",
                "arguments": {"target": "production"}}
    # Both devices decide at once: exactly one decision counts.
    reply, late = await asyncio.gather(
        b.publish("s", "approval.decision", decision),
        a.publish("s", "approval.decision", {**decision, "decision": "reject"}))
    assert reply["op"] == "published"
    assert late["op"] == "error" and late["code"] in ("already_decided", "unknown_call")
    result = await until_event(a, "tool.result", run=run)
    assert result["data"]["result"] == {"deployed": "production"}  # the edited arguments
    decided = await until_event(b, "approval.decision", run=run)
    assert decided["data"]["by"]["sub"] == "bob"
    await until_event(a, "run.state", state="completed")
    await a.close()
    await b.close()


async def test_front_end_tool_first_answer_wins(agent_server: Server) -> None:
    a, b = await device(agent_server), await device(agent_server, "bob")
    await a.publish("s", "message", {"text": "ask me"})
    call = await until_event(a, "tool.call", name="ask")
    assert call["data"]["target"] == "client"
    run, call_id = call["data"]["run"], call["data"]["call"]
    await until_event(a, "run.state", state="awaiting_tool")
    first, second = await asyncio.gather(
        b.publish("s", "tool.result", {"run": run, "call": call_id, "result": "blue"}),
        a.publish("s", "tool.result", {"run": run, "call": call_id, "result": "red"}))
    assert first["op"] == "published"
    assert second["op"] == "error" and second["code"] in ("already_decided", "unknown_call")
    result = await until_event(a, "tool.result", run=run)
    assert result["data"]["result"] == "blue"
    await until_event(a, "run.state", state="completed")
    await a.close()
    await b.close()


async def test_cancel_from_another_device_mid_stream(agent_server: Server) -> None:
    agent_server.runs.agents[0].model.tokens_per_second = 200  # type: ignore[attr-defined]
    agent_server.runs.agents[0].model.answer_tokens = 2000  # type: ignore[attr-defined]
    a, b = await device(agent_server), await device(agent_server, "bob")
    await a.publish("s", "message", {"text": "talk a lot"})
    delta = await until_event(b, "stream.append")
    reply = await b.publish("s", "run.cancel", {"run": delta["data"]["run"]})
    assert reply["op"] == "published"
    seen = await events_until_final(a)
    cancel_seq = reply["seq"]
    after = [e for e in seen if e["seq"] > cancel_seq]
    assert [e["type"] for e in after] == ["run.state"]
    assert after[0]["data"]["state"] == "cancelled"
    ended = [e for e in seen if e["type"] == "stream.end"]
    assert ended and ended[-1]["data"]["interrupted"] == "cancelled"
    assert ended[-1]["seq"] < cancel_seq
    await a.close()
    await b.close()


async def test_bad_control_events_write_nothing(agent_server: Server) -> None:
    a = await device(agent_server)
    reader = await device(agent_server, "carol", ["subscribe", "publish"])
    await a.publish("s", "message", {"text": "deploy"})
    request = await until_event(a, "approval.request")
    run, call = request["data"]["run"], request["data"]["call"]
    await until_event(a, "run.state", state="awaiting_approval")
    head = (await agent_server.store.head("s")).last_seq
    cases = [
        (reader, "approval.decision", {"run": run, "call": call, "decision": "approve"},
         "forbidden"),
        (a, "tool.result", {"run": run, "call": "nope", "result": 1}, "unknown_call"),
        (a, "approval.decision", {"run": "run_missing", "call": call, "decision": "approve"},
         "run_not_found"),
        (a, "approval.decision", {"run": run, "call": call, "decision": "maybe"}, "invalid"),
        (a, "run.state", {"run": run, "state": "completed"}, "forbidden"),
        (a, "tool.call", {"run": run}, "forbidden"),
    ]
    for peer, type_, data, code in cases:
        reply = await peer.publish("s", type_, data)
        assert reply["op"] == "error" and reply["code"] == code, (type_, reply)
    assert (await agent_server.store.head("s")).last_seq == head
    await a.publish("s", "approval.decision", {"run": run, "call": call, "decision": "reject"})
    await until_event(a, "run.state", state="completed")
    head = (await agent_server.store.head("s")).last_seq
    finished = await a.publish("s", "approval.decision",
                               {"run": run, "call": call, "decision": "approve"})
    assert finished["code"] == "run_finished"
    assert (await agent_server.store.head("s")).last_seq == head
    await a.close()
    await reader.close()


async def test_runs_started_over_http_and_queued_behind_the_active_one(
        agent_server: Server) -> None:
    import aiohttp

    a = await device(agent_server)
    async with aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{agent_server.port}/v1/sessions/s/runs"
        headers = {"Authorization": f"Bearer {token()}"}
        first = await (await http.post(url, json={"input": {"text": "ask"}},
                                       headers=headers)).json()
        second = await (await http.post(url, json={"input": {"text": "hi"}},
                                        headers=headers)).json()
        missing = await http.post(url, json={"agent": "nobody"}, headers=headers)
        assert missing.status == 404
    call = await until_event(a, "tool.call", run=first["run"])
    await a.publish("s", "tool.result", {"run": first["run"], "call": call["data"]["call"],
                                         "result": "green"})
    await until_event(a, "run.state", run=first["run"], state="completed")
    started = await until_event(a, "run.state", run=second["run"], state="running")
    assert started["data"]["trigger"] == "start"
    await until_event(a, "run.state", run=second["run"], state="completed")
    await a.close()


class RecordingModel:
    """Wraps a model and keeps the conversations it was asked to continue."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.name = "recording"
        self.seen: list[list[str]] = []

    def stream(self, messages: Any, tools: Any) -> Any:
        self.seen.append([f"{m.role}:{m.content}" for m in messages])
        return self.model.stream(messages, tools)


async def test_busy_policy_interrupt_cancels_the_active_run(agent_server: Server) -> None:
    from tether.agents.agent import BusyPolicy

    agent = agent_server.runs.agents[0]
    agent.busy = BusyPolicy.INTERRUPT
    agent.model.tokens_per_second = 200  # type: ignore[attr-defined]
    agent.model.answer_tokens = 2000  # type: ignore[attr-defined]
    a = await device(agent_server)
    await a.publish("s", "message", {"text": "talk a lot"})
    first = await until_event(a, "stream.append")
    await a.publish("s", "message", {"text": "no, this instead"})
    cancelled = await until_event(a, "run.state", run=first["data"]["run"], state="cancelled")
    assert cancelled["data"]["by"]["sub"] == "tether"
    created = await until_event(a, "run.created")
    assert created["data"]["input"]["text"] == "no, this instead"
    await a.close()


async def test_busy_policy_merge_and_steer_reach_the_active_run(agent_server: Server) -> None:
    from tether.agents.agent import BusyPolicy

    agent = agent_server.runs.agents[0]
    agent.busy = BusyPolicy.MERGE
    recording = RecordingModel(agent.model)
    agent.model = recording
    a = await device(agent_server)
    await a.publish("s", "message", {"text": "ask first"})
    call = await until_event(a, "tool.call", name="ask")
    run, call_id = call["data"]["run"], call["data"]["call"]
    await until_event(a, "run.state", state="awaiting_tool")
    await a.publish("s", "message", {"text": "also consider this"})  # merged, no new run
    steer = await a.publish("s", "run.steer", {"run": run, "text": "and be brief"})
    assert steer["op"] == "published"
    await a.publish("s", "tool.result", {"run": run, "call": call_id, "result": "red"})
    await until_event(a, "run.state", run=run, state="completed")
    last = recording.seen[-1]
    assert "user:also consider this" in last and "user:and be brief" in last
    assert last.index("user:also consider this") < last.index("user:and be brief")
    runs = [e for e in await agent_server.store.read("s", 0, 1000) if e.type == "run.created"]
    assert len(runs) == 1
    await a.close()


async def test_front_end_tool_call_names_the_clients_that_declared_it(
        agent_server: Server) -> None:
    a = await Peer.connect(agent_server.port)
    await a.hello(token(caps=APPROVER), tools=["ask"])
    await a.attach("s")
    b = await device(agent_server, "bob")  # declares no tools
    await a.publish("s", "message", {"text": "ask"})
    call = await until_event(b, "tool.call", name="ask")
    members = call["data"]["clients"]
    assert len(members) == 1 and members[0].startswith("alice/")
    await a.close()
    await b.close()
