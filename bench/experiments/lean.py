"""Experiment: the suggested hot-path changes together, measured before anyone makes them.

* the coalesced outbox of :mod:`bench.experiments.coalesced_outbox` (one write per peer per
  loop iteration instead of one per frame, and no writer task per burst);
* prometheus children bound once instead of ``labels(...)`` per publish, and the delivery
  latency histogram observed for one event in 16 instead of every event;
* ``gc.freeze()`` after startup and a first-generation threshold of 20,000 instead of 700.

``BENCH_TETHER_WRAPPER=bench/experiments/lean.py python -m bench.streams``
"""

from __future__ import annotations

import functools
import gc
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import coalesced_outbox  # noqa: F401 - installs the coalescing Outbox

from tether.server import metrics

_original_init = metrics.Metrics.__init__


class _Sampled:
    """Observes one value in ``every``."""

    def __init__(self, histogram: Any, every: int = 16) -> None:
        self._histogram = histogram
        self._every = every
        self._n = 0

    def observe(self, value: float) -> None:
        self._n += 1
        if self._n % self._every == 0:
            self._histogram.observe(value)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._histogram, name)


def _init(self: Any) -> None:
    _original_init(self)
    for name in ("published", "errors", "closes", "resumes", "catchups"):
        counter = getattr(self, name, None)
        if counter is not None and hasattr(counter, "labels"):
            counter.labels = functools.lru_cache(maxsize=256)(counter.labels)
    if hasattr(self, "latency"):
        self.latency = _Sampled(self.latency)


metrics.Metrics.__init__ = _init  # type: ignore[method-assign]

if __name__ == "__main__":
    import tether.server.app  # noqa: F401 - import everything before freezing
    from tether.cli import main

    gc.set_threshold(20_000, 10, 10)
    gc.collect()
    gc.freeze()
    sys.exit(main(sys.argv[1:]))
