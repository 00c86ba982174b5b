"""Server wrapper: run ``tether serve`` from another source tree (``BENCH_TREE``).

``bench/experiments/ab.py`` exports a commit's ``tether/`` with ``git archive`` and points this
wrapper at it, so a change and the code before it are measured in the same run.
"""

from __future__ import annotations

import os
import sys

tree = os.environ.get("BENCH_TREE")
if tree:
    sys.path.insert(0, tree)  # before the editable install's path

if __name__ == "__main__":
    import tether
    from tether.cli import main

    if tree and not str(tether.__file__).startswith(tree):
        raise SystemExit(f"tether was not imported from {tree}: {tether.__file__}")
    sys.exit(main(sys.argv[1:]))
