"""Before/after of ``bench.connections``' memory per idle connection, in one run.

``python -m bench.experiments.ab_connections --before REV [--after REV] --rounds 2``

Exports ``tether/`` at each revision (the working tree when ``--after`` is left out) and runs
``bench.connections``' own measurement for bare aiohttp, before and after in turn (B A B …
with bare between them), through ``bench/experiments/tree.py``; prints KiB per connection and
each one's ratio to the bare run next to it. No publish phase and a short rest by default: the
memory figures are the point.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from bench import common as c
from bench import connections
from bench.experiments.ab import WRAPPER, export


def tether_at(tree: Path | None, args: Any) -> dict[str, Any]:
    if tree is None:
        return connections.run("tether", args, False)
    os.environ["BENCH_TREE"] = str(tree)
    try:
        return connections.run("tether", args, False, WRAPPER)
    finally:
        os.environ.pop("BENCH_TREE", None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True)
    p.add_argument("--after", default=None, help="a revision (default: the working tree)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--connections", type=int, default=15_000)
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--rest", type=float, default=5.0)
    args = p.parse_args()
    ns = argparse.Namespace(connections=args.connections, workers=1, clients=args.clients,
                            heartbeat=15.0, rest=args.rest, rate=0.0, publish_seconds=0.0,
                            concurrency=100)
    c.setup()
    with tempfile.TemporaryDirectory() as tmp:
        before = export(args.before, Path(tmp) / "before")
        after = export(args.after, Path(tmp) / "after") if args.after else None
        rows = []
        for i in range(args.rounds):
            order = [("before", before), ("after", after)]
            if i % 2:
                order.reverse()
            for name, tree in order:
                c.settle()
                bare = connections.run("bare", ns, False)["kib_per_conn"]
                c.settle()
                r = tether_at(tree, ns)
                rows.append([name, r["connections"], r["kib_per_conn"], bare,
                             r["kib_per_conn"] / bare, r["kib_per_conn_after_rest"]])
                print(rows[-1], flush=True)
    print(c.table(["tree", "conns", "KiB/conn", "bare KiB/conn", "vs bare", "after rest"],
                  rows))


if __name__ == "__main__":
    main()
