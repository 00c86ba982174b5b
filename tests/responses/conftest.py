"""Fixtures for the Responses API: an in-process tether server, the official openai SDK as the
client, a raw WebSocket peer for what the SDK will not send, and small model backends."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import httpx2
import orjson
import pytest
from openai import AsyncOpenAI
from openai.types.responses.responses_server_event import ResponsesServerEvent
from pydantic import TypeAdapter

from tests.helpers import SECRET, token
from tether.agents.models import Chunk, Finish, Message, Model, TextDelta, ToolSpec
from tether.responses import RESPONSES_KEY, ResponsesService, SimulatedBackend
from tether.responses.items import CreateRequest
from tether.server.app import Server
from tether.server.config import ServerConfig

MODEL = "tether-simulated"
TERMINAL = ("response.completed", "response.failed", "response.incomplete")
SERVER_EVENTS: TypeAdapter[Any] = TypeAdapter(ResponsesServerEvent)

TOOLS: list[dict[str, Any]] = [
    {"type": "function", "name": "read_file", "description": "Read a file of the repository",
     "parameters": {"type": "object", "properties": {"path": {"type": "string"}},
                    "required": ["path"]}},
    {"type": "function", "name": "run_tests", "description": "Run the test suite",
     "parameters": {"type": "object", "properties": {"target": {"type": "string"},
                                                     "verbose": {"type": "boolean"}}}},
]

# Fast and deterministic: no time-to-first-token, no pacing.
FAST = {"ttft": 0, "tokens_per_second": 0, "answer_tokens": 8, "tool_calls_per_turn": None}


def parse_event(data: str | bytes | dict[str, Any]) -> Any:
    """Validate one server event against the openai SDK's own types (not just construct it)."""
    raw = orjson.loads(data) if isinstance(data, str | bytes) else data
    return SERVER_EVENTS.validate_python(raw)


class Harness:
    """An in-process tether server with the Responses API."""

    def __init__(self, server: Server) -> None:
        self.server = server

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def service(self) -> ResponsesService:
        return self.server.app[RESPONSES_KEY]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def client(self, sub: str = "alice") -> AsyncOpenAI:
        return AsyncOpenAI(api_key=token(sub), base_url=self.base_url, max_retries=0,
                           http_client=httpx2.AsyncClient(trust_env=False))

    async def raw(self, sub: str | None = "alice", query: str = "") -> RawSocket:
        return await RawSocket.connect(self.port, None if sub is None else token(sub), query)


_SERIAL = itertools.count()


async def start_harness(tmp_path: Path, store_url: str | None = None,
                        **settings: Any) -> Harness:
    data = tmp_path / f"data-{next(_SERIAL)}"
    server = Server(ServerConfig(host="127.0.0.1", port=0, data_dir=data, secret=SECRET,
                                 store_url=store_url or f"sqlite://{data}", heartbeat=30))
    service = server.app[RESPONSES_KEY]
    service.models.register(MODEL, SimulatedBackend(**FAST))
    for key, value in settings.items():
        setattr(service.config, key, value)
    await server.start()
    return Harness(server)


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h = await start_harness(tmp_path)
    yield h
    await h.server.stop()


@pytest.fixture
async def make_harness(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Harness]]]:
    """Start more servers (each with its own data folder unless given a store URL)."""
    started: list[Harness] = []

    async def make(store_url: str | None = None, **settings: Any) -> Harness:
        h = await start_harness(tmp_path, store_url, **settings)
        started.append(h)
        return h

    yield make
    for h in started:
        await h.server.stop()


class RawSocket:
    """A WebSocket peer speaking the Responses protocol by hand."""

    def __init__(self, http: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.http = http
        self.ws = ws
        self.close_code: int | None = None

    @classmethod
    async def connect(cls, port: int, tok: str | None, query: str = "") -> RawSocket:
        http = aiohttp.ClientSession()
        headers = {"Authorization": f"Bearer {tok}"} if tok else {}
        try:
            ws = await http.ws_connect(f"http://127.0.0.1:{port}/v1/responses{query}",
                                       headers=headers, compress=0)
        except BaseException:
            await http.close()
            raise
        return cls(http, ws)

    async def send(self, event: dict[str, Any]) -> None:
        await self.ws.send_str(orjson.dumps(event).decode())

    async def create(self, stream_id: str | None = None, **body: Any) -> None:
        event: dict[str, Any] = {"type": "response.create", "model": MODEL, **body}
        if stream_id is not None:
            event["stream_id"] = stream_id
        await self.send(event)

    async def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        msg = await asyncio.wait_for(self.ws.receive(), timeout)
        if msg.type == aiohttp.WSMsgType.CLOSE:
            self.close_code = int(msg.data)
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                        aiohttp.WSMsgType.CLOSING):
            raise ConnectionError(f"closed with {self.close_code}")
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        event: dict[str, Any] = orjson.loads(msg.data)
        parse_event(event)  # every frame must be one of the SDK's server events
        return event

    async def until(self, predicate: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        """Events up to and including the first that matches."""
        got = []
        while True:
            event = await self.recv()
            got.append(event)
            if predicate(event):
                return got

    async def response(self, stream_id: str | None = None) -> list[dict[str, Any]]:
        """Every event of the next response of a lane (or one error), up to its end."""
        events = await self.until(lambda e: e.get("stream_id") == stream_id
                                  and (e["type"] in TERMINAL or e["type"] == "error"))
        return [e for e in events if e.get("stream_id") == stream_id]

    async def close(self) -> None:
        await self.ws.close()
        await self.http.close()


def check_response_events(events: Sequence[dict[str, Any]]) -> None:
    """One response's events follow OpenAI's grammar, numbered 0, 1, 2… without gaps."""
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    types = [e["type"] for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] in TERMINAL
    rid = events[0]["response"]["id"]
    assert events[-1]["response"]["id"] == rid
    i = 2
    output_index = 0
    while types[i] != types[-1]:
        assert types[i] == "response.output_item.added"
        assert events[i]["output_index"] == output_index
        item = events[i]["item"]
        i += 1
        if item["type"] == "message":
            assert types[i] == "response.content_part.added"
            i += 1
            text = ""
            while types[i] == "response.output_text.delta":
                text += events[i]["delta"]
                i += 1
            assert types[i:i + 2] == ["response.output_text.done", "response.content_part.done"]
            assert events[i]["text"] == text
            i += 2
        else:
            assert item["type"] == "function_call"
            arguments = ""
            while types[i] == "response.function_call_arguments.delta":
                arguments += events[i]["delta"]
                i += 1
            assert types[i] == "response.function_call_arguments.done"
            assert events[i]["arguments"] == arguments
            i += 1
        assert types[i] == "response.output_item.done"
        assert events[i]["item"]["id"] == item["id"]
        assert events[-1]["response"]["output"][output_index] == events[i]["item"]
        i += 1
        output_index += 1
    assert len(events[-1]["response"]["output"]) == output_index


# --- model backends for tests -----------------------------------------------------------------


class GatedModel:
    def __init__(self, backend: GateBackend, key: str) -> None:
        self.name = "gated"
        self.backend = backend
        self.key = key

    async def stream(self, messages: Sequence[Message], tools: Sequence[ToolSpec]
                     ) -> AsyncIterator[Chunk]:
        self.backend.started.put_nowait(self.key)
        await self.backend.gate(self.key).wait()
        yield TextDelta(self.key)
        yield Finish("stop", {"input_tokens": 1, "output_tokens": 1})


class GateBackend:
    """A model that holds each response until the test opens its gate (``metadata.gate``)."""

    def __init__(self) -> None:
        self.started: asyncio.Queue[str] = asyncio.Queue()
        self._gates: dict[str, asyncio.Event] = {}

    def gate(self, key: str) -> asyncio.Event:
        return self._gates.setdefault(key, asyncio.Event())

    def open(self, key: str) -> None:
        self.gate(key).set()

    def model(self, name: str, request: CreateRequest, tools: Sequence[ToolSpec]) -> Model:
        return GatedModel(self, request.metadata.get("gate", "?"))

    async def aclose(self) -> None:
        return None


class RecordingBackend:
    """The simulation, remembering the conversations it was given."""

    def __init__(self) -> None:
        self.inner = SimulatedBackend(**FAST)
        self.conversations: list[list[Message]] = []

    def model(self, name: str, request: CreateRequest, tools: Sequence[ToolSpec]) -> Model:
        inner = self.inner.model(name, request, tools)
        seen = self.conversations

        class Recorder:
            def __init__(self) -> None:
                self.name = name

            async def stream(self, messages: Sequence[Message], tools: Sequence[ToolSpec]
                             ) -> AsyncIterator[Chunk]:
                seen.append(list(messages))
                async for chunk in inner.stream(messages, tools):
                    yield chunk

        return Recorder()

    async def aclose(self) -> None:
        return None
