"""The continuation benchmark's parts work: the link emulator shapes and counts, and both agent
loops run the same script to the end (bytes only; no clock is asserted on)."""

from __future__ import annotations

import asyncio

import pytest

from bench.continuation.agent import run_stateless, run_websocket
from bench.continuation.link import LinkEmulator, LinkProfile
from bench.continuation.workload import Workload
from tests.helpers import token
from tests.responses.conftest import MODEL, Harness


@pytest.mark.parametrize("profile", [LinkProfile("loopback"),
                                     LinkProfile("shaped", 50.0, 100.0, 4.0)])
async def test_both_loops_run_through_the_emulator(harness: Harness,
                                                   profile: LinkProfile) -> None:
    workload = Workload(seed=1)
    results = {}
    for transport in ("http-stateless", "ws-continuation", "ws-strict"):
        link = await LinkEmulator(harness.port, profile).start()
        url = f"http://127.0.0.1:{link.port}/v1"
        if transport == "http-stateless":
            result = await run_stateless(url, token(), MODEL, 3, workload, link.counters,
                                         lambda: 0.0)
        else:
            result = await run_websocket(url, token(), MODEL, 3, workload, link.counters,
                                         lambda: 0.0, strict=transport == "ws-strict")
        await link.stop()
        # (the counters also saw the closing handshake, after the measured turns)
        assert 0 < result.up_bytes <= link.counters.up
        assert 0 < result.down_bytes <= link.counters.down
        results[transport] = result
    http, ws, strict = (results[t] for t in ("http-stateless", "ws-continuation", "ws-strict"))
    for run in (http, ws, strict):  # the same script: three calls, then the answer
        assert [t.tool for t in run.turns][-1] is None
        assert all(t.tool for t in run.turns[:-1]) and len(run.turns) == 4
        assert all(t.ttft is not None for t in run.turns)
    assert [t.tool_output_bytes for t in ws.turns] == [t.tool_output_bytes for t in http.turns]
    ups = [t.up_bytes for t in http.turns]
    assert ups == sorted(ups)  # the stateless request grows every turn
    for h, w, s in zip(http.turns[1:], ws.turns[1:], strict.turns[1:], strict=True):
        assert w.up_bytes < s.up_bytes < h.up_bytes
    assert ws.up_bytes < strict.up_bytes < http.up_bytes


async def test_the_emulator_delivers_everything_in_order() -> None:
    received = bytearray()
    done = asyncio.Event()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            received.extend(data)
        writer.close()
        done.set()

    server = await asyncio.start_server(sink, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    link = await LinkEmulator(port, LinkProfile("slow", 80.0, 80.0, 2.0)).start()
    payload = bytes(range(256)) * 400  # 100 KB: many segments
    _, writer = await asyncio.open_connection("127.0.0.1", link.port)
    writer.write(payload)
    await writer.drain()
    writer.write_eof()
    await done.wait()
    writer.close()
    await link.stop()
    server.close()
    assert bytes(received) == payload and link.counters.up == len(payload)
