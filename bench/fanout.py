"""Fan-out: 100 subscribers on one session, one publisher at full speed.

Figure: delivered events/s, summed over the subscribers, with the publisher keeping a bounded
number of publishes in flight (each acknowledgement releases the next one).

* tether: 100 connections hello + attach to one session; the publisher publishes
  ``stream.append`` deltas (~80 bytes of data) and counts ``published`` replies (sent after the
  SQLite commit). SQLite store in a temp dir.
* bare aiohttp (baseline, target >= 3.5x): the publisher's ~80-byte frames are written, encoded
  once, to 100 listening connections, then acknowledged; no store, no envelope.
* bare picows (baseline, target >= 1.0x): the same on picows (``bench/baselines.py
  picows-broadcast``), a WebSocket stack in Cython with a callback per frame.
* python-socketio (baseline, target >= 5x): ASGI app under uvicorn; ``pub`` events are emitted to
  a room of 100 clients, then acknowledged.

Run: ``python -m bench.fanout`` (3 runs per system, ~1 min) or ``--quick``; ``--workers 1,2``
adds ``tether serve --workers 2`` as a system of its own (not pinned to the server core: it is
there to use every core).
"""

from __future__ import annotations

import asyncio
import functools
import sys
import time
from pathlib import Path
from typing import Any

import orjson

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common as c

SUBSCRIBERS = 100
WINDOW = 256  # publishes in flight
SESSION = "fanout"
DATA = {"stream": "m1", "text": c.DELTA_TEXT}


async def measure(server: c.Proc, subs: list[Any], pub: c.WindowedPublisher,
                  warmup: float, duration: float, profile: str | None = None
                  ) -> dict[str, Any]:
    pub.start()
    await asyncio.sleep(warmup)
    spy = c.start_profile(server, profile, duration)
    e0, a0 = sum(s.events for s in subs), pub.acked
    cpu0, own0, t0 = server.cpu_seconds(), time.process_time(), time.perf_counter()
    await asyncio.sleep(duration)
    e1, a1 = sum(s.events for s in subs), pub.acked
    cpu1, own1, t1 = server.cpu_seconds(), time.process_time(), time.perf_counter()
    pub.stop()
    if spy is not None:
        spy.wait()
    elapsed = t1 - t0
    # Everything acknowledged must reach every subscriber.
    try:
        await c.wait_until(lambda: pub.inflight == 0, 30, what="publish acks")
        await c.wait_until(lambda: min(s.events for s in subs) >= pub.acked, 30,
                           what="delivery to every subscriber")
        complete = True
    except TimeoutError:
        complete = False
    return {
        "delivered_per_s": (e1 - e0) / elapsed,
        "published_per_s": (a1 - a0) / elapsed,
        "server_cpu": (cpu1 - cpu0) / elapsed,
        # Per second of server CPU: steadier than the rate on a shared, noisy machine.
        "delivered_per_cpu_s": (e1 - e0) / max(cpu1 - cpu0, 1e-9),
        "client_cpu": (own1 - own0) / elapsed,
        "complete": complete,
        "published_total": pub.acked,
    }


async def run_tether(warmup: float, duration: float, profile: str | None = None,
                     workers: int = 1) -> dict[str, Any]:
    with c.tether_server(workers=workers) as server:
        async def subscriber() -> c.Conn:
            conn: c.Conn = await c.connect(server.port)
            await conn.hello()
            await conn.attach(SESSION)
            return conn

        subs = await c.gather_limited([subscriber() for _ in range(SUBSCRIBERS)], 20)
        conn: c.Conn = await c.connect(server.port)
        await conn.hello()
        payload = orjson.dumps({"op": "publish", "session": SESSION, "type": "stream.append",
                                "data": DATA})
        pub = c.WindowedPublisher(conn, payload, WINDOW)
        result = await measure(server, subs, pub, warmup, duration, profile)
        errors = conn.errors + [e for s in subs for e in s.errors]
        if errors:
            raise RuntimeError(f"tether answered errors: {errors[:3]}")
        for s in [*subs, conn]:
            s.close()
    return result


async def run_bare(warmup: float, duration: float, mode: str = "broadcast") -> dict[str, Any]:
    with c.bare_server(mode) as server:
        subs = await c.gather_limited(
            [c.connect(server.port, "/sub", None, c.CountingConn) for _ in range(SUBSCRIBERS)],
            20)
        conn = await c.connect(server.port, "/pub", None, c.CountingConn)
        await asyncio.sleep(0.2)  # the server registers subscribers after the handshake
        pub = c.WindowedPublisher(conn, orjson.dumps(DATA), WINDOW, hook="on_event")
        result = await measure(server, subs, pub, warmup, duration)
        for s in [*subs, conn]:
            s.close()
    return result


async def run_socketio(warmup: float, duration: float) -> dict[str, Any]:
    with c.bare_server("socketio") as server:
        async def subscriber() -> c.SocketIOConn:
            conn = await c.socketio_connect(server.port)
            conn.send_bytes(b'420["join"]')
            await c.wait_until(lambda: conn.acks >= 1, 30, what="socket.io join")
            return conn

        subs = await c.gather_limited([subscriber() for _ in range(SUBSCRIBERS)], 20)
        conn = await c.socketio_connect(server.port)
        payload = b'421["pub",' + orjson.dumps(DATA) + b"]"
        pub = c.WindowedPublisher(conn, payload, WINDOW)
        result = await measure(server, subs, pub, warmup, duration)
        for s in [*subs, conn]:
            s.close()
    return result


def socketio_available() -> str | None:
    try:
        import socketio  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        return f"not installed ({exc.name}); pip install python-socketio uvicorn"
    return None


async def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=None, help="measured seconds per run")
    p.add_argument("--no-socketio", action="store_true")
    c.add_profile_option(p)
    p.add_argument("--workers", default="1", metavar="N[,N...]",
                   help="tether serve --workers counts to measure (default 1), e.g. 1,2")
    args = p.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    duration = args.duration or (2.0 if args.quick else 3.0)
    warmup = 0.5 if args.quick else 0.7
    systems: dict[str, Any] = {"tether": functools.partial(run_tether, workers=counts[0])}
    for n in counts[1:]:
        systems[f"tether --workers {n}"] = functools.partial(run_tether, workers=n)
    systems["bare aiohttp"] = run_bare
    systems["bare picows"] = functools.partial(run_bare, mode="picows-broadcast")
    skipped: dict[str, str] = {}
    reason = "disabled by --no-socketio" if args.no_socketio else socketio_available()
    if reason:
        skipped["python-socketio"] = reason
    else:
        systems["python-socketio"] = run_socketio
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in systems}
    for i in range(c.runs(args)):
        for name, run in systems.items():  # interleaved so drift hits every system alike
            background = c.settle()
            if name == "tether" and i == 0 and args.profile:
                r = await run_tether(warmup, duration, args.profile, counts[0])
            else:
                r = await run(warmup, duration)
            r["background_busy"] = background
            results[name].append(r)
            print(f"run {i + 1} {name}: {r['delivered_per_s']:,.0f} delivered/s "
                  f"({r['published_per_s']:,.0f} publishes/s, server CPU "
                  f"{r['server_cpu']:.0%}, client CPU {r['client_cpu']:.0%})", flush=True)
    summary = {name: {key: c.median([r[key] for r in rs])
                      for key in ("delivered_per_s", "published_per_s", "server_cpu",
                                  "client_cpu", "delivered_per_cpu_s")}
               for name, rs in results.items()}
    tether = summary["tether"]["delivered_per_s"]
    ratios = {f"tether / {name}": tether / s["delivered_per_s"]
              for name, s in summary.items() if not name.startswith("tether")}
    per_cpu = summary["tether"]["delivered_per_cpu_s"]
    cpu_ratios = {f"tether / {name}": per_cpu / s["delivered_per_cpu_s"]
                  for name, s in summary.items() if not name.startswith("tether")}
    for n in counts[1:]:  # --workers N against the same baselines
        mine = summary[f"tether --workers {n}"]
        ratios.update({f"tether --workers {n} / {name}":
                       mine["delivered_per_s"] / s["delivered_per_s"]
                       for name, s in summary.items() if not name.startswith("tether")})
    targets = {"tether / bare aiohttp": 3.5, "tether / bare picows": 1.0,
               "tether / python-socketio": 5.0}
    rows = []
    for name, s in summary.items():
        ratio = tether / s["delivered_per_s"]
        cpu_ratio = per_cpu / s["delivered_per_cpu_s"]
        rows.append([name, s["delivered_per_s"], s["published_per_s"], f"{s['server_cpu']:.0%}",
                     f"{s['client_cpu']:.0%}", s["delivered_per_cpu_s"],
                     "" if name.startswith("tether") else f"{ratio:.2f}x",
                     "" if name.startswith("tether") else f"{cpu_ratio:.2f}x",
                     "yes" if all(r["complete"] for r in results[name]) else "NO"])
    print()
    print(f"fan-out: {SUBSCRIBERS} subscribers, 1 publisher, {WINDOW} in flight, "
          f"median of {c.runs(args)} x {duration:g}s")
    print(c.table(["system", "delivered/s", "publishes/s", "server CPU", "client CPU",
                   "per server CPU-s", "tether is", "per CPU-s", "complete"], rows))
    for name, reason in skipped.items():
        print(f"{name}: skipped, {reason}")
    for key, ratio in ratios.items():
        if key.startswith("tether --workers"):
            print(f"{key}: {ratio:.2f}x")
    verdicts = {}
    for key, target in targets.items():
        if key in ratios:
            verdicts[key] = {"ratio": ratios[key], "target": target,
                             "met": ratios[key] >= target}
            print(f"target {key} >= {target:g}x: {ratios[key]:.2f}x "
                  f"{'MET' if ratios[key] >= target else 'MISSED'}")
    path = c.write_results("fanout", {
        "config": {"subscribers": SUBSCRIBERS, "window": WINDOW, "duration": duration,
                   "warmup": warmup, "runs": c.runs(args), "data_bytes": len(orjson.dumps(DATA)),
                   "socketio_ws": __import__("bench.baselines").baselines.socketio_ws_impl()},
        "runs": results, "summary": summary, "ratios": ratios, "ratios_per_cpu_s": cpu_ratios,
        "targets": verdicts,
        "skipped": skipped})
    print(f"\nwrote {path.relative_to(c.ROOT)}")


if __name__ == "__main__":
    c.setup()
    asyncio.run(main())
