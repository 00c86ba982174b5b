"""Experiment: decoding and validating a ``publish`` frame, three ways.

``python bench/experiments/frames.py``

The 156-byte ``stream.append`` publish of the benchmarks, as text (what aiohttp hands over for
a text frame) and as bytes, through:

* ``orjson + parse_client_frame``: the reference path (a dict, then the frame class by hand);
* ``msgspec Struct, data as Any``: one ``msgspec.json.Decoder`` call into a tagged Struct with
  the envelope's constraints (what msgspec alone can do; its integers beyond 64 bits differ
  from orjson's, so not adopted as is);
* ``msgspec Struct, data raw + orjson``: what the server uses (``frames.fast_publish``): the
  envelope validated by msgspec, ``data`` kept raw and decoded by orjson, so values are
  exactly orjson's.

CPU time per frame (µs), best of 5 rounds of 100,000.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import msgspec
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from tether.protocol.codec import JSON
from tether.protocol.frames import fast_publish, parse_client_frame

FRAME = orjson.dumps({"op": "publish", "id": 12, "session": "stream-1", "type": "stream.append",
                      "data": {"stream": "m1",
                               "text": "hello world, this is one token delta of a model stream "}})

_Session = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}\Z")]


class _AnyData(msgspec.Struct, kw_only=True, frozen=True, tag_field="op", tag="publish",
               forbid_unknown_fields=True):
    session: _Session
    type: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    data: Any = None
    id: int | Annotated[str, msgspec.Meta(max_length=64)] | None = None
    key: Annotated[str, msgspec.Meta(min_length=1, max_length=128)] | None = None
    transient: bool = False


class _Other(msgspec.Struct, frozen=True, tag_field="op", tag="\x00"):
    pass


_any_data = msgspec.json.Decoder(_AnyData | _Other).decode


def best(fn: Callable[[], object], n: int = 100_000, rounds: int = 5) -> float:
    times = []
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(n):
            fn()
        times.append((time.process_time() - start) / n * 1e6)
    return min(times)


def main() -> None:
    text = FRAME.decode()
    rows = [
        ("orjson + parse_client_frame", lambda d: parse_client_frame(JSON.decode(d))),
        ("msgspec Struct, data as Any", _any_data),
        ("msgspec Struct, data raw + orjson", fast_publish),
    ]
    print(f"publish frame of {len(FRAME)} bytes; µs of CPU per frame (best of 5 x 100,000)")
    print(f"{'path':36} {'str':>6} {'bytes':>6}")
    reference = None
    for name, fn in rows:
        s = best(lambda fn=fn: fn(text))
        b = best(lambda fn=fn: fn(FRAME))
        reference = reference or s
        print(f"{name:36} {s:6.2f} {b:6.2f}   {reference / s:.2f}x")


if __name__ == "__main__":
    main()
