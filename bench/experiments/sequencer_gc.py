"""Experiment: the ``--workers`` sequencer with the garbage collector set as a worker's.

A worker (and a single-process server) freezes its start-up objects and raises the
young-generation threshold to 20,000 once it serves (``tether/cli.py``); the supervisor, which
is the sequencer that owns SQLite, kept Python's defaults (700, 10, 10). Per event the
sequencer allocates a decoded message, a sender lookup, an ``Event``, an ``Appended``, a
partial and the answer's list: at the default threshold a young collection runs every few
dozen events. This wrapper applies the workers' settings to the supervisor process (the
workers, started with ``-m tether``, are not wrapped) and counts its collections.

``BENCH_TETHER_WRAPPER=bench/experiments/sequencer_gc.py python -m bench.streams --workers 2``
(``BENCH_SEQUENCER_GC=default`` keeps Python's settings but still counts, for the A side).
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

_pauses: list[float] = []
_start = [0.0]


def _time(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _start[0] = time.perf_counter()
    else:
        _pauses.append(time.perf_counter() - _start[0])


def _report() -> None:
    if _pauses:
        ordered = sorted(_pauses)
        print(f"sequencer gc: {len(ordered)} collections, {sum(ordered) * 1e3:.1f} ms in all, "
              f"p99 {ordered[int(len(ordered) * 0.99)] * 1e6:.0f} us, max "
              f"{ordered[-1] * 1e6:.0f} us", file=sys.stderr, flush=True)


if __name__ == "__main__":
    from tether.cli import main
    from tether.server import workers

    if os.environ.get("BENCH_SEQUENCER_GC", "worker") != "default":
        started = workers.run_supervisor

        def run_supervisor(*args: Any, **kwargs: Any) -> int:
            on_started = args[3]

            def wrapped(supervisor: Any) -> None:
                gc.collect()
                gc.freeze()
                gc.set_threshold(20_000, 20, 20)
                on_started(supervisor)

            return started(*args[:3], wrapped, *args[4:], **kwargs)

        workers.run_supervisor = run_supervisor  # type: ignore[assignment]
    gc.callbacks.append(_time)
    atexit.register(_report)
    sys.exit(main(sys.argv[1:]))
