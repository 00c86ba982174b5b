"""``python -m bench.continuation``: see :mod:`bench.continuation.run`."""

from bench.continuation.run import main

raise SystemExit(main())
