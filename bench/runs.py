"""Agent runs: token coalescing, cancel latency, run start latency.

An in-process server (uvloop, memory store) with an agent on the built-in **simulated** model;
the clients are raw WebSocket peers in the same process. Each figure is measured against its
own baseline in the same run:

* coalescing — ``stream.append`` events written per 1,000 tokens with the default coalescing
  (20 ms or 256 bytes) against one event per token (coalescing off);
* cancel latency — from sending ``run.cancel`` to the last delta received after it and to the
  ``run.state cancelled`` event, with the model at 1,000 tok/s (reported, not asserted);
* run start latency — from the user message's ``published`` to the first delta delivered,
  minus the simulated model's time to first token.

    python -m bench.runs [--quick]
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench.common import parser, percentile, runs, setup, table, write_results
from tether.agents.agent import Agent
from tether.agents.models import SimulatedModel
from tether.server import Server, ServerConfig
from tether.server.auth import issue_token

SECRET = "bench-secret-" + "x" * 32


class Peer:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.next_id = 0

    async def send(self, frame: dict[str, Any]) -> None:
        self.next_id += 1
        await self.ws.send_bytes(orjson.dumps({**frame, "id": self.next_id}))

    async def recv(self) -> dict[str, Any]:
        msg = await self.ws.receive()
        return orjson.loads(msg.data)  # type: ignore[no-any-return]

    async def until(self, predicate: Any) -> dict[str, Any]:
        while True:
            frame = await self.recv()
            if predicate(frame):
                return frame


async def connect(http: aiohttp.ClientSession, port: int, session: str) -> Peer:
    ws = await http.ws_connect(f"http://127.0.0.1:{port}/v1/ws", protocols=["tether.v1.json"])
    peer = Peer(ws)
    token = issue_token(SECRET, "bench", ["*"], ["subscribe", "publish"], 3600)
    await peer.send({"op": "hello", "token": token})
    await peer.until(lambda f: f["op"] == "welcome")
    await peer.send({"op": "attach", "session": session})
    await peer.until(lambda f: f["op"] == "attached")
    return peer


def is_event(type_: str, **data: Any) -> Any:
    return lambda f: (f["op"] == "event" and f["type"] == type_
                      and all(f["data"].get(k) == v for k, v in data.items()))


async def with_server(agent: Agent, body: Any) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(ServerConfig(port=0, secret=SECRET, data_dir=Path(tmp),
                                     store_url="memory://", compression=False,
                                     publish_rate=1e9, publish_burst=10**9))
        server.runs.register(agent)
        await server.start()
        try:
            async with aiohttp.ClientSession() as http:
                return await body(server, http)
        finally:
            await server.stop()


async def coalescing(tokens: int, tokens_per_second: float, coalesce: bool) -> dict[str, Any]:
    model = SimulatedModel(seed=1, ttft=0.0, tokens_per_second=tokens_per_second,
                           answer_tokens=tokens)
    agent = Agent("bench", model, coalesce_bytes=256 if coalesce else 1)

    async def body(server: Server, http: aiohttp.ClientSession) -> dict[str, Any]:
        peer = await connect(http, server.port, "s")
        await peer.send({"op": "publish", "session": "s", "type": "message",
                         "data": {"text": "go"}})
        deltas = 0
        while True:
            frame = await peer.recv()
            if frame["op"] == "event" and frame["type"] == "stream.append":
                deltas += 1
            if frame["op"] == "event" and frame["type"] == "stream.end":
                return {"events": deltas, "per_1000_tokens": deltas * 1000 / tokens}

    result: dict[str, Any] = await with_server(agent, body)
    return result


async def cancel_latency(rounds: int) -> dict[str, Any]:
    model = SimulatedModel(seed=1, ttft=0.0, tokens_per_second=1000, answer_tokens=100_000)
    agent = Agent("bench", model)
    to_last_delta: list[float] = []
    to_cancelled: list[float] = []
    late: list[int] = []

    async def body(server: Server, http: aiohttp.ClientSession) -> None:
        starter = await connect(http, server.port, "s")
        stopper = await connect(http, server.port, "s")
        for _ in range(rounds):
            await starter.send({"op": "publish", "session": "s", "type": "message",
                                "data": {"text": "talk"}})
            delta = await stopper.until(is_event("stream.append"))
            for _ in range(20):  # let it stream for a moment
                await stopper.until(is_event("stream.append"))
            sent = time.perf_counter()
            await stopper.send({"op": "publish", "session": "s", "type": "run.cancel",
                                "data": {"run": delta["data"]["run"]}})
            last = sent
            after = 0
            while True:
                frame = await stopper.recv()
                if frame["op"] == "event" and frame["type"] == "stream.append":
                    last, after = time.perf_counter(), after + 1
                if frame["op"] == "event" and frame["type"] == "run.state" \
                        and frame["data"]["state"] == "cancelled":
                    to_cancelled.append(time.perf_counter() - sent)
                    break
            to_last_delta.append(last - sent)
            late.append(after)

    await with_server(agent, body)
    return {"to_last_delta_ms_p50": percentile(to_last_delta, 50) * 1000,
            "to_last_delta_ms_max": max(to_last_delta) * 1000,
            "to_cancelled_ms_p50": percentile(to_cancelled, 50) * 1000,
            "to_cancelled_ms_p99": percentile(to_cancelled, 99) * 1000,
            "deltas_after_cancel_sent_max": max(late)}


async def start_latency(rounds: int, ttft: float) -> dict[str, Any]:
    model = SimulatedModel(seed=1, ttft=ttft, tokens_per_second=0, answer_tokens=5)
    agent = Agent("bench", model)
    samples: list[float] = []

    async def body(server: Server, http: aiohttp.ClientSession) -> None:
        peer = await connect(http, server.port, "s")
        for _ in range(rounds):
            await peer.send({"op": "publish", "session": "s", "type": "message",
                             "data": {"text": "hi"}})
            await peer.until(lambda f: f["op"] == "published")
            committed = time.perf_counter()
            await peer.until(is_event("stream.append"))
            samples.append(time.perf_counter() - committed - ttft)
            await peer.until(is_event("run.state", state="completed"))

    await with_server(agent, body)
    return {"p50_ms": percentile(samples, 50) * 1000, "p99_ms": percentile(samples, 99) * 1000,
            "mean_ms": statistics.fmean(samples) * 1000}


async def main() -> None:
    args = parser(__doc__ or "").parse_args()
    setup()
    repeat = runs(args)
    tokens = 1000
    rows = []
    results: dict[str, Any] = {"coalescing": []}
    for tps in (65.0, 1000.0):
        if args.quick and tps == 65.0:
            continue
        on = [await coalescing(tokens, tps, True) for _ in range(repeat)]
        off = [await coalescing(tokens, tps, False) for _ in range(repeat)]
        on_med = statistics.median(r["per_1000_tokens"] for r in on)
        off_med = statistics.median(r["per_1000_tokens"] for r in off)
        rows.append([f"{tps:g} tok/s", off_med, on_med, off_med / on_med])
        results["coalescing"].append({"tokens_per_second": tps, "off": off_med, "on": on_med,
                                      "ratio": off_med / on_med})
    print("events written per 1,000 tokens (simulated model)")
    print(table(["model speed", "coalescing off", "coalescing on", "ratio"], rows))

    cancel = await cancel_latency(5 if args.quick else 20)
    results["cancel"] = cancel
    print("\ncancel → no further deltas (model at 1,000 tok/s, target 100 ms, reported)")
    print(table(["to last delta p50 ms", "to last delta max ms", "to cancelled p50 ms",
                 "to cancelled p99 ms", "deltas after cancel sent (max)"],
                [[cancel["to_last_delta_ms_p50"], cancel["to_last_delta_ms_max"],
                  cancel["to_cancelled_ms_p50"], cancel["to_cancelled_ms_p99"],
                  cancel["deltas_after_cancel_sent_max"]]]))

    start = await start_latency(10 if args.quick else 50, ttft=0.05)
    results["run_start"] = start
    print("\nrun start: message committed → first delta delivered, minus the model's TTFT")
    print(table(["p50 ms", "p99 ms", "mean ms"],
                [[start["p50_ms"], start["p99_ms"], start["mean_ms"]]]))
    print(f"\nwrote {write_results('runs', results)}")


if __name__ == "__main__":
    asyncio.run(main())
