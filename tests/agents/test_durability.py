"""Runs survive SIGKILL: a run awaiting approval keeps waiting across a restart and completes
when the decision arrives; a run cut off mid-stream ends that stream visibly and runs its step
again."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.agents.test_runs import APPROVER, until_event
from tests.helpers import Peer, ServerProcess, token

pytestmark = pytest.mark.slow


async def connect(port: int, cursor: str | None = None) -> Peer:
    while True:
        try:
            peer = await Peer.connect(port)
            break
        except (aiohttp.ClientError, OSError):
            await asyncio.sleep(0.05)
    await peer.hello(token(caps=APPROVER))
    attached = await peer.attach("demo-1", cursor)
    assert attached["op"] == "attached" and attached["resumed"] is True
    return peer


def log_is_clean(events: list[dict[str, Any]]) -> None:
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1))
    keys = [(e["type"], str(e["data"])) for e in events
            if e["type"] in ("run.created", "approval.request", "approval.decision",
                             "tool.result")]
    assert len(keys) == len(set(keys)), "a run event was written twice"


async def read_log(port: int) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as http:
        resp = await http.get(f"http://127.0.0.1:{port}/v1/sessions/demo-1/events",
                              params={"limit": "1000"},
                              headers={"Authorization": f"Bearer {token()}"})
        return list((await resp.json())["events"])


async def test_run_awaiting_approval_survives_sigkill(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, extra=["--agent", "tests.agents.fast_demo:agent"]).start()
    try:
        peer = await connect(server.port)
        await peer.publish("demo-1", "message", {"text": "please send the report"})
        request = await until_event(peer, "approval.request")
        await until_event(peer, "run.state", state="awaiting_approval")
        await peer.close()
        server.kill()
        server.start()
        # A new client on the restarted server approves; the run picks up and completes.
        approver = await connect(server.port)
        data = request["data"]
        reply = await approver.publish("demo-1", "approval.decision", {
            "run": data["run"], "call": data["call"], "decision": "approve"})
        assert reply["op"] == "published", reply
        result = await until_event(approver, "tool.result", run=data["run"])
        assert result["data"]["result"]["status"] == "sent"
        await until_event(approver, "run.state", run=data["run"], state="completed")
        await approver.close()
        events = await read_log(server.port)
        log_is_clean(events)
        states = [e["data"]["state"] for e in events if e["type"] == "run.state"]
        assert states == ["running", "awaiting_approval", "running", "completed"]
    finally:
        server.stop()


async def test_run_cut_off_mid_stream_restarts_its_step(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, extra=["--agent", "tests.agents.fast_demo:slow"]).start()
    try:
        peer = await connect(server.port)
        await peer.publish("demo-1", "message", {"text": "tell me something"})
        first = await until_event(peer, "stream.append")
        await peer.close()
        server.kill()
        server.start()
        watcher = await connect(server.port)
        run = first["data"]["run"]
        await until_event(watcher, "run.state", run=run, state="completed")
        await watcher.close()
        events = await read_log(server.port)
        log_is_clean(events)
        ends = [e["data"] for e in events if e["type"] == "stream.end"]
        assert ends[0]["interrupted"] == "restarted"  # the cut-off stream, visibly marked
        assert ends[-1].get("interrupted") is None and ends[-1]["text"]
        assert ends[0]["stream"] != ends[-1]["stream"]
        assert "restart" in [e["data"]["trigger"] for e in events if e["type"] == "run.state"]
    finally:
        server.stop()
