"""Before/after in the same run: a benchmark's tether measurement, alternating two trees.

``python bench/experiments/ab.py streams --before REV [--after REV] --runs 5``

Exports ``tether/`` at each revision (``git archive``; the working tree when ``--after`` is
left out) into a temporary folder and runs the benchmark's own ``run_tether`` (or
``run_system("tether")`` for latency) for each in turn, A B A B …, through
``bench/experiments/tree.py``, with the benchmark's bare baseline measured between them. Prints
per-run figures and medians, and the after/before ratio of each. Drift hits both sides alike,
which is the point on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from bench import common as c

WRAPPER = str(Path(__file__).resolve().parent / "tree.py")


def export(rev: str, into: Path) -> Path:
    data = subprocess.run(["git", "-C", str(c.ROOT), "archive", rev, "tether"],
                          check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into


async def measure(bench: str, duration: float, rate: float) -> dict[str, Any]:
    if bench == "streams":
        from bench import streams
        r = await streams.run_tether(1.0, duration)
        bare = await streams.run_bare(1.0, duration)
        return {"durable_per_s": r["durable_per_s"], "durable_per_cpu_s": r["durable_per_cpu_s"],
                "server_cpu": r["server_cpu"], "bare_per_s": bare["relayed_per_s"],
                "bare_per_cpu_s": bare["relayed_per_s"] / max(bare["server_cpu"], 1e-9),
                "vs_bare": r["durable_per_s"] / bare["relayed_per_s"],
                "cpu_vs_bare": (bare["relayed_per_s"] / max(bare["server_cpu"], 1e-9))
                / r["durable_per_cpu_s"]}
    if bench == "fanout":
        from bench import fanout
        r = await fanout.run_tether(0.7, duration)
        bare = await fanout.run_bare(0.7, duration)
        return {"delivered_per_s": r["delivered_per_s"],
                "delivered_per_cpu_s": r["delivered_per_cpu_s"], "server_cpu": r["server_cpu"],
                "bare_per_s": bare["delivered_per_s"],
                "vs_bare": r["delivered_per_s"] / bare["delivered_per_s"]}
    if bench == "latency":
        from bench import latency
        r = await latency.run_system("tether", 1.0, duration, rate)
        bare = await latency.run_system("bare aiohttp", 1.0, duration, rate)
        return {"p50_us": r["p50_us"], "p99_us": r["p99_us"],
                "cpu_us_per_event": r["server_cpu_us_per_event"],
                "bare_p99_us": bare["p99_us"],
                "bare_cpu_us_per_event": bare["server_cpu_us_per_event"],
                "p99_vs_bare": r["p99_us"] / bare["p99_us"],
                "cpu_vs_bare": r["server_cpu_us_per_event"] / bare["server_cpu_us_per_event"]}
    if bench == "resume":
        from bench import resume
        rounds = max(10, int(duration * 10))  # ~0.1 s a round
        tok = c.token()
        t = await resume.run_tether(rounds, tok)
        bare_times, bare_cpu = await resume.run_bare(rounds, t["frame_bytes"])
        ws, bare = resume.stats(t["ws"]), resume.stats(bare_times)
        return {"p50_ms": ws["p50_ms"], "p99_ms": ws["p99_ms"], "mean_ms": ws["mean_ms"],
                "cpu_ms": t["cpu_ms_per_resume"], "bare_p50_ms": bare["p50_ms"],
                "bare_p99_ms": bare["p99_ms"], "bare_cpu_ms": bare_cpu,
                "p50_vs_bare": ws["p50_ms"] / bare["p50_ms"],
                "p99_vs_bare": ws["p99_ms"] / bare["p99_ms"],
                "cpu_vs_bare": t["cpu_ms_per_resume"] / max(bare_cpu, 1e-9)}
    raise SystemExit(f"unknown benchmark {bench!r}")


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bench", choices=["streams", "fanout", "latency", "resume"])
    p.add_argument("--before", required=True, help="git revision measured as 'before'")
    p.add_argument("--after", default=None, help="git revision (default: the working tree)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--duration", type=float, default=3.0,
                   help="seconds per measurement (resume: 10 rounds a second, at least 10)")
    p.add_argument("--rate", type=float, default=10_000.0, help="latency: events/s")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp:
        trees = {"before": str(export(args.before, Path(tmp) / "before"))}
        trees["after"] = (str(export(args.after, Path(tmp) / "after")) if args.after
                          else str(c.ROOT))
        results: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
        os.environ["BENCH_TETHER_WRAPPER"] = WRAPPER
        for i in range(args.runs):
            for side in ("before", "after") if i % 2 == 0 else ("after", "before"):
                os.environ["BENCH_TREE"] = trees[side]
                c.settle()
                r = await measure(args.bench, args.duration, args.rate)
                results[side].append(r)
                print(f"run {i + 1} {side}: " + ", ".join(
                    f"{k} {v:,.2f}" if v < 100 else f"{k} {v:,.0f}" for k, v in r.items()),
                    flush=True)
    print()
    keys = list(results["before"][0])
    rows = []
    for k in keys:
        b = c.median([r[k] for r in results["before"]])
        a = c.median([r[k] for r in results["after"]])
        rows.append([k, b, a, f"{a / b:.2f}x" if b else ""])
    print(f"{args.bench}: before {args.before}, after {args.after or 'working tree'}, "
          f"median of {args.runs} runs each")
    print(c.table(["figure", "before", "after", "after / before"], rows))


if __name__ == "__main__":
    c.setup()
    asyncio.run(main())
