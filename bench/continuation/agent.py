"""One agent loop, two transports.

The loop: send the task; while the model calls a tool, run it (the seeded tool output stands in)
and send the result; after ``calls`` tool calls, ask for the answer (``tool_choice: "none"``).
So ``calls`` tool calls make ``calls + 1`` requests.

* **stateless HTTP** (``POST /v1/responses``, SSE): every request carries the instructions, the
  tools and the whole history so far — the task, every output item, every tool output — as a
  client without continuation must. ``store: false``: it needs no server state.
* **WebSocket continuation** (``/v1/responses``): one socket; each request carries
  ``previous_response_id`` and only the new tool output. ``ws`` lets the continuation take tools
  and instructions from the previous response (tether's ``?inherit=tools,instructions``);
  ``ws-strict`` re-sends them every time, as OpenAI's semantics require.

Both run against the same server, backend and script; the bytes are counted by the link
emulator, the times on this side of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp
import orjson

from bench.continuation.link import Counters
from bench.continuation.workload import INSTRUCTIONS, TASK, TOOLS, Workload

TERMINAL = (b"response.completed", b"response.failed", b"response.incomplete")
DELTAS = ("response.output_text.delta", "response.function_call_arguments.delta")


@dataclass
class TurnStats:
    turn: int
    up_bytes: int
    down_bytes: int
    ttft: float | None  # seconds from sending to the first delta
    e2e: float  # seconds from sending to the terminal event
    server_cpu: float  # server process CPU seconds during the turn
    tool: str | None  # the tool the model called (None: the final answer)
    tool_output_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunResult:
    transport: str
    turns: list[TurnStats]
    connect_seconds: float  # the WebSocket handshake (0 for HTTP: its TCP connect is free here)
    connect_up: int
    connect_down: int

    @property
    def up_bytes(self) -> int:
        return self.connect_up + sum(t.up_bytes for t in self.turns)

    @property
    def down_bytes(self) -> int:
        return self.connect_down + sum(t.down_bytes for t in self.turns)

    @property
    def e2e(self) -> float:
        return self.connect_seconds + sum(t.e2e for t in self.turns)

    @property
    def ttft_mean(self) -> float:
        values = [t.ttft for t in self.turns if t.ttft is not None]
        return sum(values) / len(values) if values else 0.0

    @property
    def server_cpu(self) -> float:
        return sum(t.server_cpu for t in self.turns)

    def summary(self) -> dict[str, Any]:
        return {"transport": self.transport, "requests": len(self.turns),
                "up_bytes": self.up_bytes, "down_bytes": self.down_bytes,
                "e2e_seconds": round(self.e2e, 4), "ttft_mean_seconds": round(self.ttft_mean, 4),
                "server_cpu_seconds": round(self.server_cpu, 4),
                "connect_seconds": round(self.connect_seconds, 4)}


class Meter:
    """Bytes through the link and server CPU, between two points of the loop."""

    def __init__(self, counters: Counters, cpu: Callable[[], float]) -> None:
        self.counters = counters
        self.cpu = cpu
        self.mark()

    def mark(self) -> None:
        self.t0 = time.perf_counter()
        self.up0 = self.counters.up
        self.down0 = self.counters.down
        self.cpu0 = self.cpu()

    def elapsed(self) -> tuple[float, int, int, float]:
        return (time.perf_counter() - self.t0, self.counters.up - self.up0,
                self.counters.down - self.down0, self.cpu() - self.cpu0)


def _outcome(response: dict[str, Any]) -> list[dict[str, Any]]:
    if response.get("status") != "completed":
        raise RuntimeError(f"response ended {response.get('status')}: {response.get('error')}")
    return [item for item in response["output"] if item["type"] == "function_call"]


def _answer(workload: Workload, turn: int, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"type": "function_call_output", "call_id": call["call_id"],
             "output": workload.tool_output(turn, call["name"])} for call in calls]


async def run_stateless(base_url: str, token: str, model: str, calls: int, workload: Workload,
                        counters: Counters, cpu: Callable[[], float]) -> RunResult:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    history: list[dict[str, Any]] = [{"role": "user", "content": TASK}]
    stats: list[TurnStats] = []
    async with aiohttp.ClientSession(auto_decompress=False) as http:
        for turn in range(calls + 1):
            body = {"model": model, "instructions": INSTRUCTIONS, "tools": TOOLS,
                    "input": history, "tool_choice": "none" if turn == calls else "auto",
                    "stream": True, "store": False}
            meter = Meter(counters, cpu)
            ttft = None
            response: dict[str, Any] | None = None
            async with http.post(f"{base_url}/responses", data=orjson.dumps(body),
                                 headers=headers) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
                async for line in resp.content:
                    if not line.startswith(b"data: "):
                        continue
                    if ttft is None and b'.delta"' in line[:80]:
                        ttft = time.perf_counter() - meter.t0
                    if any(kind in line[:60] for kind in TERMINAL):
                        response = orjson.loads(line[6:])["response"]
                        break
            e2e, up, down, server_cpu = meter.elapsed()
            assert response is not None
            called = _outcome(response)
            answers = _answer(workload, turn, called)
            history += response["output"] + answers
            stats.append(TurnStats(turn, up, down, ttft, e2e, server_cpu,
                                   called[0]["name"] if called else None,
                                   sum(len(a["output"]) for a in answers)))
    return RunResult("http-stateless", stats, 0.0, 0, 0)


async def run_websocket(base_url: str, token: str, model: str, calls: int, workload: Workload,
                        counters: Counters, cpu: Callable[[], float], *,
                        strict: bool, deflate: bool = False) -> RunResult:
    headers = {"Authorization": f"Bearer {token}"}
    url = f"{base_url}/responses" + ("" if strict else "?inherit=tools,instructions")
    stats: list[TurnStats] = []
    async with aiohttp.ClientSession() as http:
        meter = Meter(counters, cpu)
        # compress=0: the openai SDK does not negotiate permessage-deflate by default either;
        # with ``deflate`` the client offers it as the SDK does with
        # websocket_connection_options={"compression": "deflate"}, and both directions compress.
        async with http.ws_connect(url, headers=headers, compress=15 if deflate else 0,
                                   max_msg_size=0,
                                   autoping=True) as ws:
            connect_seconds, connect_up, connect_down, _ = meter.elapsed()
            previous: str | None = None
            pending: list[dict[str, Any]] = [{"role": "user", "content": TASK}]
            for turn in range(calls + 1):
                event: dict[str, Any] = {"type": "response.create", "model": model,
                                         "input": pending}
                if previous is None or strict:
                    event["instructions"] = INSTRUCTIONS
                    event["tools"] = TOOLS
                if previous is not None:
                    event["previous_response_id"] = previous
                if turn == calls:
                    event["tool_choice"] = "none"
                meter.mark()
                await ws.send_str(orjson.dumps(event).decode())
                ttft = None
                response: dict[str, Any] | None = None
                while response is None:
                    msg = await ws.receive()
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        raise RuntimeError(f"socket ended: {msg}")
                    head = msg.data[:80]
                    if ttft is None and '.delta"' in head:
                        ttft = time.perf_counter() - meter.t0
                    if head.startswith('{"type":"error"'):
                        raise RuntimeError(msg.data)
                    if any(kind.decode() in head for kind in TERMINAL):
                        response = orjson.loads(msg.data)["response"]
                e2e, up, down, server_cpu = meter.elapsed()
                called = _outcome(response)
                pending = _answer(workload, turn, called)
                previous = response["id"]
                stats.append(TurnStats(turn, up, down, ttft, e2e, server_cpu,
                                       called[0]["name"] if called else None,
                                       sum(len(a["output"]) for a in pending)))
    name = "ws-strict" if strict else "ws-deflate" if deflate else "ws-continuation"
    return RunResult(name, stats, connect_seconds,
                     connect_up, connect_down)
