"""What every framework integration must do, written once: each framework's test module runs
these against ``tether serve --agent`` with its own agent (same tools: ``add`` a server tool,
``deploy`` a tool needing approval, ``ask`` a front-end tool) on the simulated upstream.

The upstream calls each tool the latest user message names (see
:mod:`tether.agents.upstream`), so a message picks the path a run takes.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import aiohttp

from tests.agents.test_runs import APPROVER, until_event
from tests.helpers import Peer, ServerProcess, token
from tether.agents.upstream import SimulatedUpstream

ARGUMENTS = {"add": {"a": 2, "b": 3}, "deploy": {"target": "staging"},
             "ask": {"q": "which color?"}}


@dataclass
class Served:
    server: ServerProcess
    upstream: SimulatedUpstream

    @property
    def port(self) -> int:
        return self.server.port


async def connect(port: int, session: str, tools: list[str] | None = None) -> Peer:
    while True:  # the server may be restarting
        try:
            peer = await Peer.connect(port)
            break
        except (aiohttp.ClientError, OSError):
            await asyncio.sleep(0.05)
    await peer.hello(token(caps=APPROVER), **({"tools": tools} if tools else {}))
    attached = await peer.attach(session)
    assert attached["op"] == "attached", attached
    return peer


async def read_log(port: int, session: str) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as http:
        resp = await http.get(f"http://127.0.0.1:{port}/v1/sessions/{session}/events",
                              params={"limit": "1000"},
                              headers={"Authorization": f"Bearer {token()}"})
        assert resp.status == 200
        return list((await resp.json())["events"])


def assert_clean(events: list[dict[str, Any]]) -> None:
    """Gapless seqs, and no run event written twice."""
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1))
    once = [(e["type"], str(e["data"])) for e in events
            if e["type"] in ("run.created", "approval.request", "approval.decision",
                             "tool.call", "tool.result")]
    assert len(once) == len(set(once)), "a run event was written twice"


def streamed_text(events: list[dict[str, Any]], stream: str) -> str:
    return "".join(e["data"]["text"] for e in events
                   if e["type"] == "stream.append" and e["data"]["stream"] == stream)


def states(events: list[dict[str, Any]], run: str) -> list[str]:
    return [e["data"]["state"] for e in events
            if e["type"] == "run.state" and e["data"]["run"] == run]


async def streaming(served: Served, session: str = "fw-stream") -> None:
    """A message starts a run whose answer streams as coalesced deltas and ends as one text."""
    peer = await connect(served.port, session)
    await peer.publish(session, "message", {"text": "hello there"})
    created = await until_event(peer, "run.created")
    run = created["data"]["run"]
    await until_event(peer, "run.state", run=run, state="completed")
    await peer.close()
    events = await read_log(served.port, session)
    assert_clean(events)
    ends = [e for e in events if e["type"] == "stream.end" and e["data"].get("run") == run]
    assert len(ends) == 1 and ends[0]["data"]["text"]
    assert ends[0]["data"]["text"] == streamed_text(events, ends[0]["data"]["stream"])
    assert states(events, run) == ["running", "completed"]


async def server_tool(served: Served, session: str = "fw-tool") -> None:
    """The framework's tool call and its result are ``tool.call`` / ``tool.result``, and the
    model gets the result."""
    peer = await connect(served.port, session)
    await peer.publish(session, "message", {"text": "please add"})
    call = await until_event(peer, "tool.call", name="add")
    assert call["data"]["arguments"] == {"a": 2, "b": 3}
    assert call["data"]["target"] == "server"
    result = await until_event(peer, "tool.result", call=call["data"]["call"])
    assert result["data"]["result"] in (5, "5")
    await until_event(peer, "run.state", run=call["data"]["run"], state="completed")
    await peer.close()
    tool_messages = [m for m in served.upstream.requests[-1]["messages"] if m["role"] == "tool"]
    assert tool_messages and "5" in str(tool_messages[-1]["content"])
    assert_clean(await read_log(served.port, session))


async def approval_across_sigkill(served: Served, session: str = "fw-approve") -> None:
    """A tool needing approval waits in the log; the server is SIGKILLed; a new connection
    to the restarted server approves; the run carries on and completes."""
    peer = await connect(served.port, session)
    await peer.publish(session, "message", {"text": "please deploy"})
    request = await until_event(peer, "approval.request", name="deploy")
    await until_event(peer, "run.state", state="awaiting_approval")
    await peer.close()
    served.server.kill()
    served.server.start()
    approver = await connect(served.port, session)
    data = request["data"]
    assert data["arguments"] == {"target": "staging"}
    reply = await approver.publish(session, "approval.decision", {
        "run": data["run"], "call": data["call"], "decision": "approve"})
    assert reply["op"] == "published", reply
    result = await until_event(approver, "tool.result", run=data["run"])
    assert result["data"]["result"] == {"deployed": "staging"}
    await until_event(approver, "run.state", run=data["run"], state="completed")
    await approver.close()
    events = await read_log(served.port, session)
    assert_clean(events)
    assert states(events, data["run"]) == ["running", "awaiting_approval", "running",
                                           "completed"]


async def rejection(served: Served, session: str = "fw-reject") -> None:
    """A rejected call is not run; the model is told, and the run completes."""
    peer = await connect(served.port, session)
    await peer.publish(session, "message", {"text": "please deploy"})
    request = (await until_event(peer, "approval.request", name="deploy"))["data"]
    reply = await peer.publish(session, "approval.decision", {
        "run": request["run"], "call": request["call"], "decision": "reject"})
    assert reply["op"] == "published", reply
    await until_event(peer, "run.state", run=request["run"], state="completed")
    await peer.close()
    events = await read_log(served.port, session)
    assert not any(e["type"] == "tool.result" and "result" in e["data"]
                   and e["data"]["call"] == request["call"] for e in events)


async def client_tool(served: Served, session: str = "fw-client") -> None:
    """A front-end tool is a ``tool.call`` for the clients; a client's result reaches the
    model."""
    peer = await connect(served.port, session, tools=["ask"])
    await peer.publish(session, "message", {"text": "please ask"})
    call = (await until_event(peer, "tool.call", name="ask"))["data"]
    assert call["target"] == "client" and call["arguments"] == {"q": "which color?"}
    reply = await peer.publish(session, "tool.result", {
        "run": call["run"], "call": call["call"], "result": "teal"})
    assert reply["op"] == "published", reply
    await until_event(peer, "run.state", run=call["run"], state="completed")
    await peer.close()
    tool_messages = [m for m in served.upstream.requests[-1]["messages"] if m["role"] == "tool"]
    assert tool_messages and "teal" in str(tool_messages[-1]["content"])


async def cancel(served: Served, session: str = "fw-cancel") -> None:
    """A cancel from another connection stops the framework run mid-stream: its stream ends
    marked ``cancelled`` and nothing of the run follows."""
    served.upstream.tokens_per_second = 50.0
    served.upstream.answer_tokens = 400
    peer = await connect(served.port, session)
    other = await connect(served.port, session)
    await peer.publish(session, "message", {"text": "hello there"})
    first = (await until_event(peer, "stream.append"))["data"]
    reply = await other.publish(session, "run.cancel", {"run": first["run"]})
    assert reply["op"] == "published", reply
    await until_event(peer, "run.state", run=first["run"], state="cancelled")
    await peer.close()
    await other.close()
    events = await read_log(served.port, session)
    assert_clean(events)
    at = next(i for i, e in enumerate(events) if e["type"] == "run.cancel")
    assert not any(e["type"] == "stream.append" for e in events[at:])
    ends = [e for e in events if e["type"] == "stream.end" and e["data"]["run"] == first["run"]]
    assert [e["data"].get("interrupted") for e in ends] == ["cancelled"]
    assert states(events, first["run"])[-1] == "cancelled"


async def steer(served: Served, session: str = "fw-steer") -> None:
    """A steer while the run streams is new user input: the model sees it (here it asks
    for ``add``, so the run calls the tool) before the run completes."""
    served.upstream.tokens_per_second = 50.0
    served.upstream.answer_tokens = 60
    peer = await connect(served.port, session)
    await peer.publish(session, "message", {"text": "hello there"})
    first = (await until_event(peer, "stream.append"))["data"]
    reply = await peer.publish(session, "run.steer", {"run": first["run"], "text": "now add"})
    assert reply["op"] == "published", reply
    call = await until_event(peer, "tool.call", name="add")
    assert call["data"]["run"] == first["run"]
    await until_event(peer, "run.state", run=first["run"], state="completed")
    await peer.close()
    users = [m for r in served.upstream.requests for m in r["messages"] if m["role"] == "user"]
    assert any("now add" in str(m["content"]) for m in users)
    assert_clean(await read_log(served.port, session))


async def restart_mid_stream(served: Served, session: str = "fw-restart"
                             ) -> tuple[list[dict[str, Any]], str]:
    """A SIGKILL while the model streams: the restarted server ends the cut stream as
    ``restarted``, runs the step again and completes the run. Returns the log and the run,
    for what a framework checks besides (its memory, what the model was sent)."""
    served.upstream.tokens_per_second = 50.0
    served.upstream.answer_tokens = 400
    peer = await connect(served.port, session)
    await peer.publish(session, "message", {"text": "hello there"})
    first = (await until_event(peer, "stream.append"))["data"]
    await peer.close()
    served.server.kill()
    served.upstream.tokens_per_second = 0.0
    served.upstream.answer_tokens = 12
    served.server.start()
    peer = await connect(served.port, session)
    await until_event(peer, "run.state", run=first["run"], state="completed")
    await peer.close()
    events = await read_log(served.port, session)
    assert_clean(events)
    ends = [e["data"] for e in events if e["type"] == "stream.end"
            and e["data"]["run"] == first["run"]]
    assert [e.get("interrupted") for e in ends] == ["restarted", None]
    assert ends[-1]["text"] == streamed_text(events, ends[-1]["stream"])
    assert states(events, first["run"]) == ["running", "running", "completed"]
    return events, first["run"]
