"""Experiment: picows against aiohttp as the WebSocket layer, on tether's per-event job.

``python bench/experiments/picows_ws.py [--runs 3] [--duration 3]``

The token-streams load of ``bench/streams.py`` (100 publishers with 32 in flight, 100
subscribers, 80-byte deltas, each forwarded to its session's subscriber and acknowledged: the
three frames of a durable delta) against the bare relay on aiohttp (``bench/baselines.py relay
--ack``, the streams baseline) and the same relay on picows (``picows-relay --ack``), A B A B.
Figure: relayed deltas/s and deltas per second of server CPU, whose ratio is what the
WebSocket layer alone would change in tether's per-event budget. A third system runs the picows
relay behind ``bench/baselines.py``'s front protocol, on one port with an aiohttp application
(checked with a ``GET /healthz`` on that port before each run): what keeping one port costs.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

import aiohttp
import orjson

from bench import common as c
from bench.streams import DATA, SESSIONS, WINDOW


async def relay(mode: str, warmup: float, duration: float) -> dict[str, Any]:
    with c.bare_server(mode, "--ack") as server:
        if mode == "front-relay":
            # The front's point: HTTP on the same port still reaches aiohttp.
            async with aiohttp.ClientSession() as http, http.get(
                    f"http://127.0.0.1:{server.port}/healthz") as response:
                if response.status != 200 or (await response.json()) != {"status": "ok"}:
                    raise RuntimeError(f"front: /healthz answered {response.status}")
        async def pair(i: int) -> tuple[Any, c.WindowedPublisher]:
            sub = await c.connect(server.port, f"/sub/{i}", None, c.CountingConn)
            conn = await c.connect(server.port, f"/pub/{i}", None, c.CountingConn)
            return sub, c.WindowedPublisher(conn, orjson.dumps(DATA), WINDOW, hook="on_event")

        pairs = await c.gather_limited([pair(i) for i in range(SESSIONS)], 20)
        await asyncio.sleep(0.2)
        pubs = [p for _, p in pairs]
        for pub in pubs:
            pub.start()
        await asyncio.sleep(warmup)
        a0, e0 = sum(p.acked for p in pubs), sum(s.events for s, _ in pairs)
        cpu0, t0 = server.cpu_seconds(), time.perf_counter()
        await asyncio.sleep(duration)
        a1, e1 = sum(p.acked for p in pubs), sum(s.events for s, _ in pairs)
        cpu1, t1 = server.cpu_seconds(), time.perf_counter()
        for pub in pubs:
            pub.stop()
        for s, p in pairs:
            s.close()
            p.conn.close()
    relayed = min(a1 - a0, e1 - e0)
    return {"relayed_per_s": relayed / (t1 - t0), "server_cpu": (cpu1 - cpu0) / (t1 - t0),
            "per_cpu_s": relayed / max(cpu1 - cpu0, 1e-9),
            "cpu_us_per_delta": (cpu1 - cpu0) / max(relayed, 1) * 1e6}


async def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=3.0)
    args = p.parse_args()
    modes = {"aiohttp": "relay", "picows": "picows-relay",
             "picows behind a front": "front-relay"}
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in modes}
    for i in range(c.runs(args)):
        for name, mode in modes.items():
            c.settle()
            r = await relay(mode, 1.0, args.duration)
            results[name].append(r)
            print(f"run {i + 1} {name}: {r['relayed_per_s']:,.0f} deltas/s, server CPU "
                  f"{r['server_cpu']:.0%}, {r['cpu_us_per_delta']:.1f} µs of CPU per delta",
                  flush=True)
    summary = {name: {k: c.median([r[k] for r in rs]) for k in rs[0]}
               for name, rs in results.items()}
    a, b = summary["aiohttp"], summary["picows"]
    print()
    print(c.table(["relay + ack", "deltas/s", "server CPU", "per CPU-s", "CPU µs/delta"], [
        [name, s["relayed_per_s"], f"{s['server_cpu']:.0%}", s["per_cpu_s"],
         f"{s['cpu_us_per_delta']:.1f}"] for name, s in summary.items()]))
    f = summary["picows behind a front"]
    print(f"picows / aiohttp: {b['relayed_per_s'] / a['relayed_per_s']:.2f}x deltas/s, "
          f"{b['per_cpu_s'] / a['per_cpu_s']:.2f}x per CPU-s; behind the front "
          f"{f['relayed_per_s'] / a['relayed_per_s']:.2f}x deltas/s, "
          f"{f['per_cpu_s'] / a['per_cpu_s']:.2f}x per CPU-s")
    print(f"wrote {c.write_results('picows_ws', {'machine': c.machine(), 'runs': results})}")


if __name__ == "__main__":
    c.setup()
    asyncio.run(main())
