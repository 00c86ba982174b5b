"""Stateless HTTP vs WebSocket continuation: bytes, time to first token, end-to-end time, server
CPU, per turn and in total, over loopback and over an emulated slow link.

    python -m bench.continuation                     # 5, 20, 50 tool calls; loopback + "plane"
    python -m bench.continuation --calls 20 --links plane

The server under test is ``python -m tether serve`` in a subprocess (pinned to core 0 when the
machine has two), with the built-in simulated model configured through
``TETHER_RESPONSES_CONFIG``; the clients and the link emulator run here (core 1). Results go to
``bench/continuation/results/continuation.json`` and a table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import psutil

from bench.continuation.agent import RunResult, run_stateless, run_websocket
from bench.continuation.link import LinkEmulator, LinkProfile
from bench.continuation.workload import Workload
from tether.server.auth import issue_token

ROOT = Path(__file__).resolve().parent.parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
SECRET = "bench-continuation-" + "x" * 32
MODEL = "tether-simulated"
TRANSPORTS = ("http-stateless", "ws-continuation", "ws-deflate", "ws-strict")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def can_pin() -> bool:
    return ((os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
            and hasattr(os, "sched_setaffinity"))


class ServerUnderTest:
    def __init__(self, model: dict[str, Any], store: str | None) -> None:
        self.model = model
        self.store = store
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="tether-bench-continuation-"))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServerUnderTest:
        cmd = [sys.executable, "-m", "tether", "serve", "--port", str(self.port),
               "--data", str(self.dir / "data"), "--secret", SECRET, "--log-level", "warning",
               "--agent", "none"]
        if self.store:
            cmd += ["--store", self.store]
        if can_pin():
            cmd = ["taskset", "-c", "0", *cmd]
        env = {**os.environ, "PYTHONPATH": str(ROOT),
               "TETHER_RESPONSES_CONFIG": orjson.dumps({"models": {MODEL: self.model}}).decode()}
        self.log = open(self.dir / "server.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log, env=env, cwd=ROOT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port),
                                                                        timeout=0.2):
                break
            if self.proc.poll() is not None:
                raise RuntimeError((self.dir / "server.log").read_text())
            time.sleep(0.05)
        self.ps = psutil.Process(self.proc.pid)  # taskset execs the server: same pid
        return self

    def cpu(self) -> float:
        times = self.ps.cpu_times()
        return float(times.user + times.system)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


async def one_run(transport: str, server: ServerUnderTest, profile: LinkProfile, calls: int,
                  workload: Workload, token: str) -> RunResult:
    link = await LinkEmulator(server.port, profile).start()
    base_url = f"http://127.0.0.1:{link.port}/v1"
    cpu: Callable[[], float] = server.cpu
    try:
        if transport == "http-stateless":
            return await run_stateless(base_url, token, MODEL, calls, workload, link.counters,
                                       cpu)
        return await run_websocket(base_url, token, MODEL, calls, workload, link.counters, cpu,
                                   strict=transport == "ws-strict",
                                   deflate=transport == "ws-deflate")
    finally:
        await link.stop()


def pct_less(new: float, base: float) -> float:
    return 100.0 * (1 - new / base) if base else 0.0


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'link':<9} {'calls':>5} {'transport':<16} {'client→server':>14} "
            f"{'server→client':>14} {'TTFT mean':>10} {'end-to-end':>11} {'server CPU':>11} "
            f"{'sent':>7} {'time':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['link']:<9} {r['calls']:>5} {r['transport']:<16} "
            f"{r['up_bytes'] / 1024:>11.1f} KB {r['down_bytes'] / 1024:>11.1f} KB "
            f"{r['ttft_mean_seconds'] * 1000:>7.0f} ms {r['e2e_seconds']:>9.2f} s "
            f"{r['server_cpu_seconds']:>9.2f} s "
            + (f"{-r['sent_less_pct']:>+6.1f}% {-r['time_less_pct']:>+6.1f}%"
               if r["transport"] != "http-stateless" else f"{'':>7} {'':>7}"))
    return "\n".join(lines)


def per_turn_table(runs: list[dict[str, Any]], link: str, calls: int) -> str:
    """Stateless against continuation, turn by turn, for one link and loop length."""
    by = {r["transport"]: r["per_turn"] for r in runs
          if r["link"] == link and r["calls"] == calls}
    base, cont = by.get("http-stateless"), by.get("ws-continuation")
    if not base or not cont:
        return ""
    head = (f"{link}, {calls} calls, per turn   client→server KB      TTFT ms        "
            f"end-to-end ms    server CPU ms\n"
            f"{'turn':>4} {'tool':<10} {'output KB':>9}  {'http':>8} {'ws':>7}  {'http':>6} "
            f"{'ws':>6}  {'http':>7} {'ws':>7}  {'http':>6} {'ws':>6}")
    lines = [head]
    for b, c in zip(base, cont, strict=True):
        lines.append(
            f"{b['turn']:>4} {b['tool'] or 'answer':<10} {b['tool_output_bytes'] / 1024:>9.1f}  "
            f"{b['up_bytes'] / 1024:>8.1f} {c['up_bytes'] / 1024:>7.1f}  "
            f"{(b['ttft'] or 0) * 1000:>6.0f} {(c['ttft'] or 0) * 1000:>6.0f}  "
            f"{b['e2e'] * 1000:>7.0f} {c['e2e'] * 1000:>7.0f}  "
            f"{b['server_cpu'] * 1000:>6.0f} {c['server_cpu'] * 1000:>6.0f}")
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    model = {"ttft": args.ttft, "tokens_per_second": args.tps, "answer_tokens": 40,
             "input_token_cost": args.input_token_cost, "tool_calls_per_turn": None,
             "seed": args.seed}
    profiles = {"loopback": LinkProfile("loopback"),
                "plane": LinkProfile("plane", args.up_mbit, args.down_mbit, args.rtt_ms)}
    workload = Workload(seed=args.seed)
    token = issue_token(SECRET, "bench", ["*"], ["publish"], 24 * 3600)
    server = ServerUnderTest(model, args.store).start()
    rows: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    try:
        for transport in args.transports:  # warm up imports, caches and the first connection
            await one_run(transport, server, profiles["loopback"], 2, workload, token)
        for link_name in args.links:
            profile = profiles[link_name]
            for calls in args.calls:
                baseline: RunResult | None = None
                for transport in args.transports:
                    result = await one_run(transport, server, profile, calls, workload, token)
                    summary = result.summary()
                    row = {"link": link_name, "calls": calls, **summary}
                    if transport == "http-stateless":
                        baseline = result
                    elif baseline is not None:
                        row["sent_less_pct"] = round(pct_less(result.up_bytes,
                                                              baseline.up_bytes), 2)
                        row["time_less_pct"] = round(pct_less(result.e2e, baseline.e2e), 2)
                        row["ttft_less_pct"] = round(pct_less(result.ttft_mean,
                                                              baseline.ttft_mean), 2)
                    rows.append(row)
                    runs.append({**row, "profile": profile.describe(),
                                 "per_turn": [t.to_dict() for t in result.turns]})
                    print(f"  {link_name:<9} {calls:>3} calls  {transport:<16} "
                          f"{summary['up_bytes'] / 1024:9.1f} KB sent  "
                          f"{summary['e2e_seconds']:7.2f} s", flush=True)
    finally:
        server.stop()
    targets = []
    for row in rows:
        if row["transport"] == "ws-continuation" and row["calls"] == 20:
            targets.append({"link": row["link"], "target": "client-sent bytes ≥ 90% less",
                            "value_pct": row["sent_less_pct"],
                            "met": row["sent_less_pct"] >= 90.0})
            if row["link"] == "plane":
                targets.append({"link": row["link"], "target": "end-to-end time ≥ 40% less",
                                "value_pct": row["time_less_pct"],
                                "met": row["time_less_pct"] >= 40.0})
        if row["transport"] == "ws-deflate" and row["calls"] == 20:
            targets.append({"link": row["link"], "target": "deflate: client-sent bytes ≥ 95% less",
                            "value_pct": row["sent_less_pct"],
                            "met": row["sent_less_pct"] >= 95.0})
            if row["link"] == "plane":
                targets.append({"link": row["link"],
                                "target": "deflate: end-to-end time ≥ 45% less",
                                "value_pct": row["time_less_pct"],
                                "met": row["time_less_pct"] >= 45.0})
    return {
        "benchmark": "continuation",
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpus": os.cpu_count(), "pinned": can_pin()},
        "model": {"name": MODEL, **model},
        "links": {name: profiles[name].describe() for name in args.links},
        "workload": {"seed": args.seed, "tool_output_bytes": [workload.min_bytes,
                                                              workload.max_bytes]},
        "store": args.store or "sqlite (default)",
        "summary": rows,
        "targets": targets,
        "runs": runs,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.continuation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", default="5,20,50",
                   help="tool calls per agent loop, comma-separated (default 5,20,50)")
    p.add_argument("--links", default="loopback,plane", help="loopback, plane (default both)")
    p.add_argument("--transports", default=",".join(TRANSPORTS),
                   help=f"comma-separated, from {', '.join(TRANSPORTS)}")
    p.add_argument("--up-mbit", type=float, default=2.0, help="plane uplink (default 2 Mbit/s)")
    p.add_argument("--down-mbit", type=float, default=10.0,
                   help="plane downlink (default 10 Mbit/s)")
    p.add_argument("--rtt-ms", type=float, default=100.0, help="plane round trip (default 100)")
    p.add_argument("--ttft", type=float, default=0.2,
                   help="simulated time to first token, s (default 0.2)")
    p.add_argument("--tps", type=float, default=100.0,
                   help="simulated tokens per second (default 100)")
    p.add_argument("--input-token-cost", type=float, default=2e-6,
                   help="simulated prompt processing, s per input token of the whole history "
                        "(default 2e-6: 500k tokens/s)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--store", default=None, help="store URL for the server (default sqlite)")
    p.add_argument("--out", default=str(RESULTS / "continuation.json"))
    args = p.parse_args(argv)
    args.calls = [int(c) for c in args.calls.split(",") if c]
    args.links = [name for name in args.links.split(",") if name]
    args.transports = [t for t in args.transports.split(",") if t]
    for name in args.links:
        if name not in ("loopback", "plane"):
            p.error(f"unknown link {name!r}")
    for t in args.transports:
        if t not in TRANSPORTS:
            p.error(f"unknown transport {t!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if can_pin():
        os.sched_setaffinity(0, {1})
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    report = asyncio.run(main_async(args))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    shown = 20 if 20 in args.calls else max(args.calls)
    for link in args.links:
        text = per_turn_table(report["runs"], link, shown)
        if text:
            print()
            print(text)
    print()
    print(table(report["summary"]))
    print()
    for target in report["targets"]:
        print(f"{'MET ' if target['met'] else 'MISSED'}  {target['link']:<9} 20 calls: "
              f"{target['target']}: {target['value_pct']:.1f}%")
    print(f"\nwrote {out}")
    return 0
