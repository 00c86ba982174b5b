"""Run every benchmark, one after the other, then print one summary of figures and targets.

Run: ``python -m bench.run_all`` (~5 min) or ``--quick`` (~2 min); ``--only fanout,latency``
picks some. Each benchmark also prints its own table and writes ``bench/results/NAME.json``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common as c

BENCHMARKS = ["fanout", "streams", "latency", "memory", "resume", "redis_store"]


def _load(name: str) -> dict[str, Any] | None:
    path = c.RESULTS / f"{name}.json"
    if not path.exists():
        return None
    data: dict[str, Any] = orjson.loads(path.read_bytes())
    return data


def _verdict(met: bool | None) -> str:
    return "-" if met is None else ("met" if met else "MISSED")


def summary_rows() -> list[list[Any]]:
    rows: list[list[Any]] = []
    r = _load("fanout")
    if r:
        s = r["summary"]
        for key, target in (("bare aiohttp", 1.0), ("python-socketio", 5.0)):
            if key in s:
                ratio = s["tether"]["delivered_per_s"] / s[key]["delivered_per_s"]
                rows.append(["fanout", "delivered events/s", s["tether"]["delivered_per_s"],
                             key, s[key]["delivered_per_s"], f"{ratio:.2f}x",
                             f">= {target:g}x", _verdict(ratio >= target)])
            else:
                rows.append(["fanout", "delivered events/s", s["tether"]["delivered_per_s"],
                             key, "skipped", "", f">= {target:g}x", "-"])
    r = _load("streams")
    if r:
        s = r["summary"]
        rows.append(["streams", "durable deltas/s", s["durable_per_s"], "raw SQLite 100/txn",
                     s["sqlite_100_per_txn"], f"{r['ratio_to_sqlite']:.2f}x", ">= 100,000/s",
                     _verdict(r["target"]["met"])])
        if "bare_relay_per_s" in s:
            rows.append(["streams", "durable deltas/s", s["durable_per_s"],
                         "bare aiohttp relay+ack", s["bare_relay_per_s"],
                         f"{s['durable_per_s'] / s['bare_relay_per_s']:.2f}x", "", ""])
    r = _load("latency")
    if r:
        t, b = r["summary"]["tether"], r["summary"]["bare aiohttp"]
        for q, target in (("p50", 250), ("p99", 1000)):
            rows.append(["latency", f"{q} us", t[f"{q}_us"], "bare aiohttp relay",
                         b[f"{q}_us"], f"{r['ratios'][q]:.1f}x", f"<= {target:,} us",
                         _verdict(r["targets"][f"{q}_us"]["met"])])
    r = _load("memory")
    if r:
        s = r["summary"]
        own, bare = s["tether own session"], s["bare aiohttp"]
        rows.append(["memory", "KiB per idle conn", own["kib_per_conn"], "bare aiohttp",
                     bare["kib_per_conn"], f"{own['kib_per_conn'] / bare['kib_per_conn']:.2f}x",
                     "<= 16 KiB", _verdict(r["target"]["met"])])
    r = _load("resume")
    if r:
        s = r["summary"]
        ws, bare = s["tether resume (WebSocket)"], s["bare aiohttp push"]
        rows.append(["resume", "p99 ms", ws["p99_ms"], "bare aiohttp push", bare["p99_ms"],
                     f"{ws['p99_ms'] / bare['p99_ms']:.1f}x", "<= 50 ms",
                     _verdict(r["target"]["met"])])
    r = _load("redis_store")
    if r:
        s, base = r["summary"], r["baseline"]
        head = s[r["config"]["headline"]]["events_per_s"]
        single = base["XADD one at a time"]
        rows.append(["redis_store", "events/s", head, "one XADD at a time", single,
                     f"{head / single:.1f}x", ">= 100,000/s", _verdict(r["target"]["met"])])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", default="", help="comma-separated subset of " + ",".join(BENCHMARKS))
    p.add_argument("--summary", action="store_true",
                   help="only print the summary of the results already in bench/results")
    args = p.parse_args()
    names = [n for n in args.only.split(",") if n] or BENCHMARKS
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        p.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    failed = []
    if not args.summary:
        for name in names:
            print(f"\n=== bench.{name} ===", flush=True)
            start = time.monotonic()
            code = subprocess.call([sys.executable, "-m", f"bench.{name}",
                                    *(["--quick"] if args.quick else [])],
                                   cwd=c.ROOT, env=c.child_env())
            print(f"(bench.{name}: {time.monotonic() - start:.0f} s, exit {code})", flush=True)
            if code:
                failed.append(name)
    print("\n=== summary (bench/results/*.json) ===")
    print(c.table(["benchmark", "figure", "tether", "baseline", "baseline figure", "ratio",
                   "target", "verdict"], summary_rows()))
    if failed:
        print(f"failed: {', '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
