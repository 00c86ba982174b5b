"""Latency: publish -> deliver at 10,000 events/s across 100 sessions, paced.

Each of 100 sessions has a publisher connection and a subscriber connection, all in this process.
A pacer sends publishes round-robin over the sessions at 10k/s in total (1 ms ticks, ~10 per
tick, each stamped with ``time.perf_counter_ns()`` in its data just before it is sent); the
subscriber takes the receive time in the frame callback. Latency = receive - send, one clock.

* tether: ``stream.append`` deltas ``{"stream", "text", "t"}``, committed to SQLite before
  delivery. Targets: p50 <= 250 us, p99 <= 1 ms.
* bare aiohttp (baseline): the same bytes relayed from ``/pub/i`` to ``/sub/i``, no store.
* bare aiohttp + ack (second baseline): the same relay that also answers every message with a
  short frame on ``/pub/i``, as tether answers every publish with ``published``: one more
  write per event, to another socket.
* machine floor (context): round trip of 100 bytes through a blocking TCP echo process on the
  server core, one every 1 ms. Publish -> deliver crosses the cores twice like a round trip, so
  nothing built on this machine's loopback and scheduler does better than this.

Run: ``python -m bench.latency`` (3 runs per system, ~1 min) or ``--quick``; ``--workers 1,2``
adds ``tether serve --workers 2`` as a system of its own (not pinned to the server core).
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common as c

SESSIONS = 100
RATE = 10_000.0  # events/s in total
TICK = 0.001


_ECHO = """
import socket, sys
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", int(sys.argv[1])))
server.listen()
while True:
    conn, _ = server.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while data := conn.recv(65536):
        conn.sendall(data)
    conn.close()
"""


def machine_floor(samples: int = 1000, gap: float = 0.001) -> dict[str, float]:
    """Round trips (us) through a blocking echo process pinned to the server core."""
    port = c.free_port()
    proc = subprocess.Popen(c.pinned([sys.executable, "-c", _ECHO, str(port)]))
    try:
        c.wait_for_port(port, 10, proc)
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            payload = b"x" * 100
            rtts = []
            for _ in range(samples):
                start = time.perf_counter_ns()
                sock.sendall(payload)
                got = 0
                while got < len(payload):
                    got += len(sock.recv(65536))
                rtts.append(time.perf_counter_ns() - start)
                time.sleep(gap)
    finally:
        proc.terminate()
        proc.wait(10)
    return {"p50_us": c.percentile(rtts, 50) / 1000, "p99_us": c.percentile(rtts, 99) / 1000}


class Recorder:
    """Collects latencies (ns) while ``on`` is set."""

    def __init__(self, tether: bool) -> None:
        self.samples: list[int] = []
        self.on = False
        self.received = 0
        self.tether = tether

    def __call__(self, data: bytes) -> None:
        now = time.perf_counter_ns()
        self.received += 1
        if self.on:
            msg = orjson.loads(data)
            sent = msg["data"]["t"] if self.tether else msg["t"]
            self.samples.append(now - sent)


async def pace(senders: list[Any], make: Any, rate: float, seconds: float) -> int:
    """Send ``rate``/s round-robin over ``senders`` for ``seconds``; returns the count sent."""
    n = 0
    count = len(senders)
    start = time.perf_counter()
    end = start + seconds
    while True:
        now = time.perf_counter()
        if now >= end:
            return n
        due = int((now - start) * rate)
        while n < due:
            senders[n % count].transport.send(c.TEXT, make(n % count, time.perf_counter_ns()))
            n += 1
        await asyncio.sleep(TICK)


async def run_system(name: str, warmup: float, duration: float, rate: float,
                     profile: str | None = None) -> dict[str, Any]:
    tether = name.startswith("tether")
    workers = int(name.rsplit(" ", 1)[1]) if name.startswith("tether --workers") else 1
    server = (c.tether_server(workers=workers) if tether
              else c.bare_server("relay", *(["--ack"] if name.endswith("+ ack") else [])))
    with server:
        recorder = Recorder(tether)

        async def pair(i: int) -> tuple[Any, Any]:
            if tether:
                sub = await c.connect(server.port)
                await sub.hello()
                await sub.attach(f"lat-{i}")
                pub = await c.connect(server.port)
                await pub.hello()
            else:
                sub = await c.connect(server.port, f"/sub/{i}", None, c.CountingConn)
                pub = await c.connect(server.port, f"/pub/{i}", None, c.CountingConn)
            sub.on_event = recorder
            return sub, pub

        pairs = await c.gather_limited([pair(i) for i in range(SESSIONS)], 20)
        pubs = [p for _, p in pairs]
        await asyncio.sleep(0.2)
        text = c.DELTA_TEXT
        if tether:
            heads = [b'{"op":"publish","session":"lat-%d","type":"stream.append","data":' % i
                     for i in range(SESSIONS)]

            def make(i: int, t: int) -> bytes:
                return heads[i] + orjson.dumps({"stream": "m1", "text": text, "t": t}) + b"}"
        else:
            def make(i: int, t: int) -> bytes:
                return orjson.dumps({"stream": "m1", "text": text, "t": t})

        await pace(pubs, make, rate, warmup)
        recorder.on = True
        spy = c.start_profile(server, profile, duration)
        window = c.CpuWindow(server, workers).start()
        cpu0, own0 = server.cpu_seconds(), time.process_time()
        t0 = time.perf_counter()
        sent = await pace(pubs, make, rate, duration)
        elapsed = time.perf_counter() - t0
        cpu1, own1 = server.cpu_seconds(), time.process_time()
        cpu = window.stop(sent)
        await asyncio.sleep(0.3)
        recorder.on = False
        if spy is not None:
            spy.wait()
        errors = [e for s, p in pairs for e in s.errors + p.errors]
        if errors:
            raise RuntimeError(f"{name} answered errors: {errors[:3]}")
        for s, p in pairs:
            s.close()
            p.close()
    samples = recorder.samples
    us = 1000.0
    return {"p50_us": c.percentile(samples, 50) / us, "p90_us": c.percentile(samples, 90) / us,
            "p99_us": c.percentile(samples, 99) / us, "p999_us": c.percentile(samples, 99.9) / us,
            "max_us": max(samples) / us if samples else float("nan"),
            "samples": len(samples), "sent_per_s": sent / elapsed,
            "server_cpu": (cpu1 - cpu0) / elapsed, "client_cpu": (own1 - own0) / elapsed,
            "server_cpu_us_per_event": (cpu1 - cpu0) / max(sent, 1) * 1e6, "cpu": cpu}


async def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=None, help="measured seconds per run")
    p.add_argument("--rate", type=float, default=RATE, help="events/s in total (default 10,000)")
    c.add_profile_option(p)
    p.add_argument("--workers", default="1", metavar="N[,N...]",
                   help="tether serve --workers counts to measure (default 1), e.g. 1,2")
    args = p.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    rate = args.rate
    duration = args.duration or (2.0 if args.quick else 4.0)
    warmup = 0.5 if args.quick else 1.0
    systems = ["tether" if counts[0] == 1 else f"tether --workers {counts[0]}",
               *(f"tether --workers {n}" for n in counts[1:]), "bare aiohttp + ack",
               "bare aiohttp"]
    results: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    floors: list[dict[str, float]] = []
    for i in range(c.runs(args)):
        for name in systems:
            background = c.settle()
            r = await run_system(name, warmup, duration, rate,
                                 args.profile if i == 0 and name == "tether" else None)
            r["background_busy"] = background
            results[name].append(r)
            print(f"run {i + 1} {name}: p50 {r['p50_us']:.0f} us, p99 {r['p99_us']:.0f} us, "
                  f"p99.9 {r['p999_us']:.0f} us ({r['samples']:,} samples at "
                  f"{r['sent_per_s']:,.0f}/s, server CPU {r['server_cpu']:.0%})", flush=True)
        floors.append(machine_floor())
        print(f"run {i + 1} machine floor (TCP round trip): p50 {floors[-1]['p50_us']:.0f} us, "
              f"p99 {floors[-1]['p99_us']:.0f} us", flush=True)
    keys = ("p50_us", "p90_us", "p99_us", "p999_us", "max_us", "sent_per_s", "server_cpu",
            "client_cpu", "server_cpu_us_per_event")
    summary = {name: {k: c.median([r[k] for r in rs]) for k in keys}
               for name, rs in results.items()}
    floor = {k: c.median([f[k] for f in floors]) for k in ("p50_us", "p99_us")}
    t, b = summary[systems[0]], summary["bare aiohttp"]
    ratios = {"p50": t["p50_us"] / b["p50_us"], "p99": t["p99_us"] / b["p99_us"]}
    targets = {"p50_us": 250.0, "p99_us": 1000.0}
    verdicts = {k: {"value": t[k], "target": v, "met": t[k] <= v} for k, v in targets.items()}
    print()
    print(f"publish -> deliver latency: {SESSIONS} sessions, {rate:,.0f} events/s in total, "
          f"median of {c.runs(args)} x {duration:g}s")
    rows = [[name, s["p50_us"], s["p90_us"], s["p99_us"], s["p999_us"], s["max_us"],
             s["sent_per_s"], f"{s['server_cpu']:.0%}", s["server_cpu_us_per_event"]]
            for name, s in summary.items()]
    for name in systems[:-1]:
        mine = summary[name]
        rows.append([f"{name} / bare", f"{mine['p50_us'] / b['p50_us']:.1f}x", "",
                     f"{mine['p99_us'] / b['p99_us']:.1f}x", "", "", "", "",
                     f"{mine['server_cpu_us_per_event'] / b['server_cpu_us_per_event']:.2f}x"])
    rows.append(["machine floor (TCP RTT)", floor["p50_us"], "", floor["p99_us"], "", "", "",
                 "", ""])
    print(c.table(["system", "p50 us", "p90 us", "p99 us", "p99.9 us", "max us", "events/s",
                   "server CPU", "CPU us/event"], rows))
    cpu = {name: c.cpu_summary([r["cpu"] for r in rs]) for name, rs in results.items()}
    print()
    print(c.table(["system", "process", "busy", "CPU us per event"],
                  [row for name, s in cpu.items() for row in c.cpu_rows(name, s)]))
    for k, v in verdicts.items():
        print(f"target {k.removesuffix('_us')} <= {v['target']:,.0f} us: {v['value']:,.0f} us "
              f"{'MET' if v['met'] else 'MISSED'}")
    name = "latency" if rate == RATE else f"latency-{rate:g}"
    path = c.write_results(name, {
        "config": {"sessions": SESSIONS, "rate": rate, "tick": TICK, "duration": duration,
                   "warmup": warmup, "runs": c.runs(args)},
        "runs": results, "summary": summary, "cpu": cpu, "ratios": ratios,
        "targets": verdicts,
        "machine_floor": {"runs": floors, "median": floor}})
    print(f"\nwrote {path.relative_to(c.ROOT)}")


if __name__ == "__main__":
    c.setup()
    asyncio.run(main())
