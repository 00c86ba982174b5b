"""Experiment: run the server unchanged, but report the time spent in the garbage collector.

At exit (SIGTERM from the benchmark) it prints one ``GCSTATS`` line to stderr, which the
benchmarks keep in the server log (``BENCH_KEEP_LOGS=1`` prints it): collections and seconds
per generation, and the event-loop thread's CPU time, so the GC's share of it is visible.
With ``GC_THRESHOLD=a,b,c`` it also sets the collector's thresholds and freezes the objects
allocated at startup (``gc.freeze()``), to measure that remedy.

``BENCH_KEEP_LOGS=1 BENCH_TETHER_WRAPPER=bench/experiments/gc_stats.py python -m bench.streams``
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
import time
from typing import Any

_stats = {0: [0, 0.0], 1: [0, 0.0], 2: [0, 0.0]}
_started = [0.0]


def _callback(phase: str, info: dict[str, Any]) -> None:
    # CPU time of this (the event loop's) thread: not inflated when the machine is busy.
    if phase == "start":
        _started[0] = time.thread_time()
    else:
        entry = _stats[info["generation"]]
        entry[0] += 1
        entry[1] += time.thread_time() - _started[0]


def _report() -> None:
    cpu = time.thread_time()
    spent = sum(t for _, t in _stats.values())
    parts = " ".join(f"gen{g}: {n} in {t:.3f}s" for g, (n, t) in _stats.items())
    sys.stderr.write(f"GCSTATS event-loop thread CPU {cpu:.2f}s, in GC {spent:.2f}s "
                     f"({spent / max(cpu, 1e-9):.0%}); {parts}; thresholds {gc.get_threshold()}\n")


if __name__ == "__main__":
    from tether.cli import main

    if os.environ.get("GC_THRESHOLD"):
        import tether.server.app  # noqa: F401 - import everything before freezing

        gc.set_threshold(*(int(v) for v in os.environ["GC_THRESHOLD"].split(",")))
        gc.collect()
        gc.freeze()
    gc.callbacks.append(_callback)
    atexit.register(_report)
    sys.exit(main(sys.argv[1:]))
