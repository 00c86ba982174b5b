"""AG-UI over SSE: a run's events as AG-UI events, validated with ag_ui's own models; resume."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from ag_ui.core import Event as AguiEvent
from ag_ui.encoder import EventEncoder
from pydantic import TypeAdapter

from tests.agents.conftest import add, deploy, make_agent
from tests.helpers import SECRET, token
from tether.agents.agent import Agent
from tether.agents.runner import Run
from tether.protocol.cursor import new_epoch
from tether.server import Server, ServerConfig
from tether.server.agui import Translator

APPROVER = ["subscribe", "publish", "approve"]
ADAPTER: TypeAdapter[Any] = TypeAdapter(AguiEvent)
ENCODER = EventEncoder()


class Scripted(Agent):
    """Text, a server tool, shared state, a tool that needs approval, more text."""

    async def respond(self, run: Run) -> None:
        async with run.stream_text() as text:
            for word in ("Let ", "me ", "add ", "and ", "deploy."):
                text.write(word)
                await text.drain()  # one stream.append per word
        await run.call_tool("call_add", "add", '{"a": 2, "b": 3}')
        await run.set_state({"sum": 5})
        await run.emit("run.delta", {"run": run.id, "delta": [
            {"op": "replace", "path": "/sum", "value": 6}]})
        await run.call_tool("call_deploy", "deploy", '{"target": "staging"}')
        async with run.stream_text() as text:
            text.write("Deployed.")


# A tight outbound buffer sends live delivery through overflow and catch-up from the store.
@pytest.fixture(params=[1 << 20, 256], ids=["roomy", "tight"])
async def server(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Server]:
    config = ServerConfig(port=0, secret=SECRET, data_dir=tmp_path, store_url="memory://",
                          outbound_buffer_bytes=request.param)
    srv = Server(config)
    srv.runs.register(Scripted("scripted", tools=[add, deploy], sessions=["s"]))
    srv.runs.register(make_agent())  # every other session
    await srv.start()
    yield srv
    await srv.stop()


def validated(obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` parsed with ag_ui's model for its type; it must be what AG-UI itself encodes."""
    model = ADAPTER.validate_python(obj)
    assert type(model).__name__.upper().replace("EVENT", "") == obj["type"].replace("_", "")
    assert not model.model_extra, model.model_extra  # no misspelt field slipped through
    encoded = ENCODER.encode(model)
    assert encoded.startswith("data: ") and encoded.endswith("\n\n")
    assert orjson.loads(encoded[6:]) == obj
    return obj


class Reader:
    """One GET …/agui, parsed message by message; every AG-UI event is validated."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.comments: list[str] = []

    @classmethod
    async def open(cls, http: aiohttp.ClientSession, port: int, session: str = "s",
                   last: str | None = None, query: str = "") -> Reader:
        headers = {"Authorization": f"Bearer {token()}"}
        if last is not None:
            headers["Last-Event-ID"] = last
        resp = await http.get(f"http://127.0.0.1:{port}/v1/sessions/{session}/agui{query}",
                              headers=headers)
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        return cls(resp)

    async def next(self) -> tuple[str | None, dict[str, Any]]:
        ident: str | None = None
        data: dict[str, Any] | None = None
        while True:
            line = (await self.resp.content.readline()).decode()
            assert line, "the stream ended"
            line = line.rstrip("\n")
            if not line:
                if data is not None:
                    return ident, validated(data)
                continue
            if line.startswith(":"):
                self.comments.append(line)
            elif line.startswith("id: "):
                ident = line[4:]
            elif line.startswith("data: "):
                data = orjson.loads(line[6:])

    async def take(self, count: int) -> list[tuple[str | None, dict[str, Any]]]:
        return [await self.next() for _ in range(count)]

    async def until(self, type_: str, **match: Any) -> list[tuple[str | None, dict[str, Any]]]:
        """Events up to and including the first of ``type_`` whose fields match."""
        got = []
        while True:
            got.append(await self.next())
            event = got[-1][1]
            if event["type"] == type_ and all(event.get(k) == v for k, v in match.items()):
                return got

    def close(self) -> None:
        self.resp.close()


async def start_run(http: aiohttp.ClientSession, port: int, session: str = "s") -> str:
    resp = await http.post(f"http://127.0.0.1:{port}/v1/sessions/{session}/runs",
                           json={"input": {"text": "go"}},
                           headers={"Authorization": f"Bearer {token()}"})
    assert resp.status == 201
    return str((await resp.json())["run"])


async def post_event(http: aiohttp.ClientSession, port: int, type_: str, data: Any,
                     caps: list[str] | None = None, session: str = "s") -> int:
    resp = await http.post(f"http://127.0.0.1:{port}/v1/sessions/{session}/events",
                           json={"type": type_, "data": data},
                           headers={"Authorization": f"Bearer {token(caps=caps)}"})
    return resp.status


EXPECTED = [
    "RUN_STARTED",
    "TEXT_MESSAGE_START", "TEXT_MESSAGE_CONTENT", "TEXT_MESSAGE_CONTENT",
    "TEXT_MESSAGE_CONTENT", "TEXT_MESSAGE_CONTENT", "TEXT_MESSAGE_CONTENT",
    "TEXT_MESSAGE_END",
    "TOOL_CALL_START", "TOOL_CALL_ARGS", "TOOL_CALL_END", "TOOL_CALL_RESULT",
    "STATE_SNAPSHOT", "STATE_DELTA",
    "TOOL_CALL_START", "TOOL_CALL_ARGS", "TOOL_CALL_END", "TOOL_CALL_RESULT",
    "TEXT_MESSAGE_START", "TEXT_MESSAGE_CONTENT", "TEXT_MESSAGE_END",
    "RUN_FINISHED",
]


async def test_a_run_streams_as_ag_ui_and_every_resume_point_continues_exactly(
        server: Server) -> None:
    async with aiohttp.ClientSession() as http:
        full = await Reader.open(http, server.port)  # live, never interrupted
        cut = await Reader.open(http, server.port)  # interrupted mid-event, then resumed
        run = await start_run(http, server.port)
        gate = await full.until("TOOL_CALL_END", toolCallId="call_deploy")
        head = await cut.take(2)  # RUN_STARTED and TEXT_MESSAGE_START: half of one append
        cut.close()
        cut = await Reader.open(http, server.port, last=head[-1][0])
        # Nothing goes on until someone with the approve capability decides.
        decision = {"run": run, "call": "call_deploy", "decision": "approve"}
        assert await post_event(http, server.port, "approval.decision", decision) == 403
        assert await post_event(http, server.port, "approval.decision", decision,
                                APPROVER) == 201
        events = gate + await full.until("RUN_FINISHED")
        tail = await cut.until("RUN_FINISHED")
        full.close()
        cut.close()

        types = [e["type"] for _, e in events]
        assert types == EXPECTED
        assert head + tail == events
        ids = [i for i, _ in events]
        assert all(ids) and len(set(ids)) == len(ids)
        by_type = [e for _, e in events]
        started, finished = by_type[0], by_type[-1]
        assert started == {"type": "RUN_STARTED", "threadId": "s", "runId": run,
                           "protocolVersion": "1.0", "timestamp": started["timestamp"]}
        assert finished["runId"] == run and finished["threadId"] == "s"
        assert "outcome" not in finished

        # The text is the stream.end text, message by message.
        log = await server.store.read("s", 0, 1000)
        ends = {e.data["stream"]: e.data["text"] for e in log if e.type == "stream.end"}
        for stream, text in ends.items():
            deltas = [e["delta"] for e in by_type if e["type"] == "TEXT_MESSAGE_CONTENT"
                      and e["messageId"] == stream]
            assert "".join(deltas) == text
        assert list(ends) == [f"{run}.0", f"{run}.1"]
        assert ends[f"{run}.0"] == "Let me add and deploy."

        add_start, deploy_start = (e for e in by_type if e["type"] == "TOOL_CALL_START")
        assert add_start["toolCallName"] == "add"
        assert add_start["parentMessageId"] == f"{run}.0"  # the text just before it
        assert add_start["metadata"] == {"tether": {"target": "server"}}
        assert deploy_start["metadata"] == {"tether": {"approval": "requested"}}
        assert "parentMessageId" not in deploy_start
        args = [e["delta"] for e in by_type if e["type"] == "TOOL_CALL_ARGS"]
        assert [orjson.loads(a) for a in args] == [{"a": 2, "b": 3}, {"target": "staging"}]
        results = [e for e in by_type if e["type"] == "TOOL_CALL_RESULT"]
        assert [(r["toolCallId"], r["messageId"], orjson.loads(r["content"]), r["role"])
                for r in results] == [("call_add", "call_add.result", 5, "tool"),
                                      ("call_deploy", "call_deploy.result",
                                       {"deployed": "staging"}, "tool")]
        snapshot, delta = (e for e in by_type if e["type"].startswith("STATE_"))
        assert snapshot["snapshot"] == {"sum": 5}
        assert delta["delta"] == [{"op": "replace", "path": "/sum", "value": 6}]

        # From the log after the fact (catch-up, not live): the same stream.
        again = await Reader.open(http, server.port)
        assert await again.until("RUN_FINISHED") == events
        assert again.comments[0].startswith(": tether resumed=true")
        again.close()
        # Every resume point: the events after it, once each.
        for k in range(1, len(events)):
            resumed = await Reader.open(http, server.port, last=ids[k - 1])
            assert await resumed.until("RUN_FINISHED") == events[k:], k
            resumed.close()
        # A plain cursor means after that whole event; ?after= works like the header.
        call_add = ids[types.index("TOOL_CALL_START")]
        assert call_add is not None and call_add.endswith(".0")
        plain = await Reader.open(http, server.port, query=f"?after={call_add[:-2]}")
        assert (await plain.take(1))[0][1]["type"] == "TOOL_CALL_RESULT"
        plain.close()


async def test_resume_from_another_epoch_starts_over_and_says_so(server: Server) -> None:
    async with aiohttp.ClientSession() as http:
        full = await Reader.open(http, server.port)
        run = await start_run(http, server.port)
        events = await full.until("TOOL_CALL_END", toolCallId="call_deploy")
        full.close()
        stale = f"{new_epoch('s')}:{len(events)}.0"  # this session, an older incarnation
        reader = await Reader.open(http, server.port, last=stale)
        ident, resync = await reader.next()
        assert ident is None
        assert resync["type"] == "CUSTOM" and resync["name"] == "tether.resync"
        assert resync["value"]["reason"] == "epoch_changed"
        assert await reader.until("TOOL_CALL_END", toolCallId="call_deploy") == events
        assert "reason=epoch_changed" in reader.comments[0]
        assert await post_event(http, server.port, "approval.decision",
                                {"run": run, "call": "call_deploy", "decision": "reject"},
                                APPROVER) == 201
        rest = await reader.until("RUN_FINISHED")
        result = next(e for _, e in rest if e["type"] == "TOOL_CALL_RESULT")
        assert orjson.loads(result["content"]) == {"error": "reject by alice"}
        reader.close()


async def test_cancel_mid_stream_ends_the_message_and_finishes_cancelled(
        server: Server) -> None:
    model = server.runs.agents[1].model
    model.tokens_per_second = 200  # type: ignore[attr-defined]
    model.answer_tokens = 2000  # type: ignore[attr-defined]
    async with aiohttp.ClientSession() as http:
        reader = await Reader.open(http, server.port, session="c")
        run = await start_run(http, server.port, session="c")
        await reader.until("TEXT_MESSAGE_CONTENT")
        assert await post_event(http, server.port, "run.cancel", {"run": run},
                                session="c") == 201
        rest = await reader.until("RUN_FINISHED")
        assert [e["type"] for _, e in rest[-2:]] == ["TEXT_MESSAGE_END", "RUN_FINISHED"]
        assert rest[-1][1]["outcome"] == {"type": "cancelled"}
        reader.close()


async def test_auth_and_bad_cursors_are_refused(server: Server) -> None:
    url = f"http://127.0.0.1:{server.port}/v1/sessions/s/agui"
    async with aiohttp.ClientSession() as http:
        assert (await http.get(url)).status == 401
        assert (await http.get(url, headers={"Authorization": "Bearer nope"})).status == 401
        publisher = token(caps=["publish"])
        assert (await http.get(f"{url}?token={publisher}")).status == 403
        other = token(sessions=["other"])
        assert (await http.get(f"{url}?token={other}")).status == 403
        good = token()
        head = await server.store.head("s")
        foreign = (await server.store.head("elsewhere")).epoch
        for bad in ("garbage", f"{head.epoch}:1.x", f"{head.epoch}:x.1", f"{foreign}:0",
                    f"{head.epoch}:99", f"{head.epoch}:99.0"):
            resp = await http.get(f"{url}?token={good}", headers={"Last-Event-ID": bad})
            assert resp.status == 400, bad
            assert (await resp.json())["error"]["code"] == "bad_cursor"


async def test_a_disconnect_ends_the_handler(server: Server) -> None:
    async with aiohttp.ClientSession() as http:
        reader = await Reader.open(http, server.port)
        assert len(server.streams) == 1
        handler = next(iter(server.streams)).task
        assert handler is not None
        reader.close()
        await handler
        assert not server.streams
        assert server.hub.channels == {}


# --- the translator alone -------------------------------------------------------------------

def run_through(events: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    translator = Translator("t")
    return [validated(e) for i, (type_, data) in enumerate(events)
            for e in translator.translate(type_, data, i)]


def test_a_run_cancelled_or_failed_while_queued_is_still_framed() -> None:
    out = run_through([("run.created", {"run": "r1", "agent": "a"}),
                       ("run.state", {"run": "r1", "state": "cancelled", "trigger": "cancel"}),
                       ("run.state", {"run": "r2", "state": "failed", "error": "boom"})])
    assert [e["type"] for e in out] == ["RUN_STARTED", "RUN_FINISHED", "RUN_STARTED",
                                        "RUN_ERROR"]
    assert out[1]["outcome"] == {"type": "cancelled"}
    assert out[3]["message"] == "boom" and out[3]["code"] == "failed"


def test_streams_open_once_skip_empty_deltas_and_are_closed_by_the_run_end() -> None:
    out = run_through([
        ("stream.append", {"stream": "early", "text": "x", "run": "r"}),  # run not started
        ("run.state", {"run": "r", "state": "running", "trigger": "start"}),
        ("stream.append", {"stream": "m", "text": "", "run": "r"}),
        ("stream.append", {"stream": "m", "text": "hi", "run": "r"}),
        ("stream.append", {"stream": "free", "text": "no run"}),
        ("stream.end", {"stream": "never", "run": "r", "text": ""}),
        ("message", {"text": "a person"}),
        ("run.state", {"run": "r", "state": "failed", "error": "model down"}),
        ("stream.end", {"stream": "m", "run": "r", "text": "hi"}),  # after the end: ignored
        ("run.state", {"run": "r", "state": "running", "trigger": "restart"}),
    ])
    assert [(e["type"], e.get("delta")) for e in out] == [
        ("RUN_STARTED", None), ("TEXT_MESSAGE_START", None), ("TEXT_MESSAGE_CONTENT", "hi"),
        ("TEXT_MESSAGE_END", None), ("RUN_ERROR", None)]


def test_an_approved_call_is_announced_once_and_only_the_first_call_has_a_parent() -> None:
    out = run_through([
        ("run.state", {"run": "r", "state": "running", "trigger": "start"}),
        ("stream.append", {"stream": "m", "text": "hi", "run": "r"}),
        ("stream.end", {"stream": "m", "run": "r", "text": "hi"}),
        ("tool.call", {"run": "r", "call": "c1", "name": "add", "arguments": {"a": 1},
                       "target": "server"}),
        ("tool.result", {"run": "r", "call": "c1", "result": 1}),
        ("approval.request", {"run": "r", "call": "c2", "name": "deploy", "arguments": {}}),
        ("approval.decision", {"run": "r", "call": "c2", "decision": "approve"}),
        ("tool.call", {"run": "r", "call": "c2", "name": "deploy", "arguments": {},
                       "target": "server"}),
        ("tool.result", {"run": "r", "call": "c2", "error": "failed"}),
        ("run.delta", {"run": "r", "delta": "not a patch"}),
        ("run.state", {"run": "r", "state": "completed"}),
    ])
    starts = [e for e in out if e["type"] == "TOOL_CALL_START"]
    assert [(s["toolCallId"], s.get("parentMessageId")) for s in starts] == [
        ("c1", "m"), ("c2", None)]
    assert [e["type"] for e in out].count("TOOL_CALL_END") == 2
    assert out[-2]["content"] == '{"error":"failed"}'
    assert out[-1]["type"] == "RUN_FINISHED"
