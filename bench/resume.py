"""Resume: a client reconnects after 1,000 events were published while it was away.

Each round: the attached client disconnects; a publisher commits 1,000 ``stream.append`` deltas
to the session; the client reconnects (TCP + WebSocket handshake, ``hello``, ``attach`` with the
cursor of the last event it had) and receives the 1,000 missed events, checked for order and
gaps. Figure: time from the start of the connect to the 1,000th event, p50 / p99 over the
rounds. Target: p99 <= 50 ms. Also the server's CPU per resume (from /proc, 10 ms ticks summed
over the rounds), which a loaded machine disturbs less than the wall-clock figures.

Baselines in the same run:

* bare aiohttp: a server that writes 1,000 pre-encoded frames, each as long as a tether event
  frame, on connect; time from connect start to the 1,000th frame (no auth, store or cursor).
* tether HTTP history: ``GET /v1/sessions/{id}/events?after=CURSOR&limit=1000`` on a new TCP
  connection, to the parsed JSON body with the same 1,000 events.

Run: ``python -m bench.resume`` (3 runs x 50 rounds, ~30 s) or ``--quick``.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common as c

MISSED = 1000
SESSION = "resume"
DATA = {"stream": "m1", "text": c.DELTA_TEXT}


class Receiver:
    """Counts event frames; resolves ``done`` at the ``expect``-th and keeps the first and last."""

    def __init__(self, expect: int) -> None:
        self.expect = expect
        self.count = 0
        self.first = b""
        self.last = b""
        self.at = 0.0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def __call__(self, data: bytes) -> None:
        self.count += 1
        if self.count == 1:
            self.first = data
        if self.count == self.expect:
            self.at = time.perf_counter()
            self.last = data
            if not self.done.done():
                self.done.set_result(None)


async def run_tether(rounds: int, tok: str) -> dict[str, Any]:
    ws_times: list[float] = []
    http_times: list[float] = []
    cpu = 0.0
    frame_bytes = 0
    with c.tether_server() as server:
        pub_conn: c.Conn = await c.connect(server.port)
        await pub_conn.hello(tok)
        payload = orjson.dumps({"op": "publish", "session": SESSION, "type": "stream.append",
                                "data": DATA})
        conn: c.Conn = await c.connect(server.port)
        await conn.hello(tok)
        cursor = (await conn.attach(SESSION))["cursor"]
        http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                     headers={"Authorization": f"Bearer {tok}"})
        url = f"http://127.0.0.1:{server.port}/v1/sessions/{SESSION}/events"
        try:
            for _ in range(rounds):
                conn.close()
                await conn.disconnected
                pub = c.WindowedPublisher(pub_conn, payload, 256, limit=MISSED)
                pub.start()
                await asyncio.wait_for(pub.done, 60)
                head_seq = orjson.loads(pub.last_ack)["seq"]
                after_seq = int(cursor.rsplit(":", 1)[1])

                receiver = Receiver(MISSED)
                cpu0 = server.cpu_seconds()
                start = time.perf_counter()
                conn = await c.connect(server.port)
                conn.on_event = receiver
                await conn.hello(tok)
                attached = await conn.attach(SESSION, cursor)
                await asyncio.wait_for(receiver.done, 30)
                ws_times.append(receiver.at - start)
                cpu += server.cpu_seconds() - cpu0
                first, last = orjson.loads(receiver.first), orjson.loads(receiver.last)
                if not attached["resumed"] or first["seq"] != after_seq + 1 or \
                        last["seq"] != after_seq + MISSED or head_seq != last["seq"]:
                    raise RuntimeError(f"bad resume: {attached}, {first['seq']}..{last['seq']}"
                                       f" after {after_seq}, head {head_seq}")
                frame_bytes = len(receiver.last)

                start = time.perf_counter()
                async with http.get(url, params={"after": cursor, "limit": str(MISSED)}) as resp:
                    body = orjson.loads(await resp.read())
                http_times.append(time.perf_counter() - start)
                if resp.status != 200 or len(body["events"]) != MISSED or \
                        body["events"][-1]["seq"] != last["seq"]:
                    raise RuntimeError(f"bad history page: {resp.status} {str(body)[:200]}")
                cursor = last["cursor"]
        finally:
            await http.close()
            conn.close()
            pub_conn.close()
    return {"ws": ws_times, "http": http_times, "frame_bytes": frame_bytes,
            "cpu_ms_per_resume": cpu * 1000 / rounds}


async def run_bare(rounds: int, frame_bytes: int) -> tuple[list[float], float]:
    """The rounds' times, and the server's CPU milliseconds per round."""
    times = []
    cpu = 0.0
    with c.bare_server("push", "--frames", str(MISSED), "--size", str(frame_bytes)) as server:
        for _ in range(rounds):
            receiver = Receiver(MISSED)
            start = time.perf_counter()

            def factory(receiver: Receiver = receiver) -> c.CountingConn:
                conn = c.CountingConn()
                conn.on_event = receiver  # frames may arrive with the handshake's answer
                return conn

            cpu0 = server.cpu_seconds()
            conn = await c.connect(server.port, "/ws", None, factory)
            await asyncio.wait_for(receiver.done, 30)
            times.append(receiver.at - start)
            cpu += server.cpu_seconds() - cpu0
            conn.close()
            await conn.disconnected
    return times, cpu * 1000 / rounds


def stats(times: list[float]) -> dict[str, float]:
    ms = [t * 1000 for t in times]
    return {"p50_ms": c.percentile(ms, 50), "p99_ms": c.percentile(ms, 99),
            "mean_ms": sum(ms) / len(ms), "max_ms": max(ms)}


async def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=None)
    args = p.parse_args()
    rounds = args.rounds or (15 if args.quick else 50)
    tok = c.token()
    systems = ("tether resume (WebSocket)", "tether HTTP history", "bare aiohttp push")
    samples: dict[str, list[list[float]]] = {s: [] for s in systems}
    per_run: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    frame_bytes = 0
    cpu: dict[str, list[float]] = {"tether": [], "bare": []}
    for i in range(c.runs(args)):
        background = c.settle()
        t = await run_tether(rounds, tok)
        frame_bytes = t["frame_bytes"]
        b, bare_cpu = await run_bare(rounds, frame_bytes)
        cpu["tether"].append(t["cpu_ms_per_resume"])
        cpu["bare"].append(bare_cpu)
        for name, times in zip(systems, (t["ws"], t["http"], b), strict=True):
            samples[name].append(times)
            per_run[name].append({**stats(times), "background_busy": background})
        print(f"run {i + 1}: " + ", ".join(
            f"{n} p50 {per_run[n][-1]['p50_ms']:.1f} ms p99 {per_run[n][-1]['p99_ms']:.1f} ms"
            for n in systems) + f"; server CPU per resume {cpu['tether'][-1]:.1f} ms, bare "
            f"{bare_cpu:.1f} ms", flush=True)
    summary = {n: {k: c.median([r[k] for r in rs]) for k in ("p50_ms", "p99_ms", "mean_ms")}
               for n, rs in per_run.items()}
    pooled = {n: stats([t for run in runs for t in run]) for n, runs in samples.items()}
    ws, bare = summary[systems[0]], summary[systems[2]]
    ratios = {"p50 vs bare": ws["p50_ms"] / bare["p50_ms"],
              "p99 vs bare": ws["p99_ms"] / bare["p99_ms"],
              "p50 vs HTTP history": ws["p50_ms"] / summary[systems[1]]["p50_ms"]}
    target = 50.0
    met = ws["p99_ms"] <= target
    print()
    print(f"resume after {MISSED:,} missed events: {rounds} rounds x {c.runs(args)} runs "
          f"(frames of {frame_bytes} bytes); per-run percentiles, median of runs")
    rows = [[n, s["p50_ms"], s["p99_ms"], s["mean_ms"], pooled[n]["p99_ms"],
             f"{s['p50_ms'] / bare['p50_ms']:.1f}x"] for n, s in summary.items()]
    print(c.table(["path", "p50 ms", "p99 ms", "mean ms", "pooled p99 ms", "p50 vs bare"],
                  rows))
    print(f"target p99 <= {target:g} ms: {ws['p99_ms']:.1f} ms {'MET' if met else 'MISSED'}")
    cpu_tether, cpu_bare = c.median(cpu["tether"]), c.median(cpu["bare"])
    print(f"server CPU per resume (median of runs): tether {cpu_tether:.1f} ms, bare push "
          f"{cpu_bare:.1f} ms ({cpu_tether / max(cpu_bare, 1e-9):.2f}x)")
    path = c.write_results("resume", {
        "config": {"missed": MISSED, "rounds": rounds, "runs": c.runs(args),
                   "frame_bytes": frame_bytes},
        "runs": per_run, "samples_ms": {n: [[t * 1000 for t in r] for r in runs]
                                        for n, runs in samples.items()},
        "summary": summary, "pooled": pooled, "ratios": ratios,
        "server_cpu_ms_per_resume": cpu,
        "target": {"p99_ms": target, "value": ws["p99_ms"], "met": met}})
    print(f"\nwrote {path.relative_to(c.ROOT)}")


if __name__ == "__main__":
    c.setup()
    asyncio.run(main())
