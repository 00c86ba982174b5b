"""Experiment: the server with aiohttp's own permessage-deflate instead of tether's.

aiohttp gives every connection that accepts deflate a 32 KiB-window, memory-level-8 compressor
and (once the client compresses a frame) a 32 KiB-window decompressor for the life of the
socket. ``bench.connections`` runs this as the "before" of its compression figures:

``BENCH_TETHER_WRAPPER=bench/experiments/aiohttp_deflate.py python -m bench.connections ...``
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    import tether.server.deflate
    from tether.cli import main

    tether.server.deflate.SUPPORTED = False  # websocket_response falls back to aiohttp's deflate
    sys.exit(main(sys.argv[1:]))
