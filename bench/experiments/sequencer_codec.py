"""Experiment: what decoding and re-encoding an event's data costs the ``--workers`` sequencer.

An append crosses the Unix socket from a worker to the sequencer as a JSON message that holds
the event's ``data`` (the worker already decoded and validated it); the sequencer decodes the
whole frame, encodes ``data`` again for the SQLite row, and encodes it a third time in the
answer that carries the event back to a worker that listens to the session. Passing ``data``
through undecoded would save those steps and nothing else, so their cost is the most it could
win. This times each, with and without ``data`` (the same message otherwise), per message, on
one core, in this process.

``python bench/experiments/sequencer_codec.py``
"""

from __future__ import annotations

import sys
import timeit
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from bench import common as c

DATA = {"stream": "m1", "text": c.DELTA_TEXT}
BATCH = 50  # messages per frame: a busy sequencer reads frames of tens of appends


def per_call(fn: object, number: int = 20_000, per: int = 1) -> float:
    """Best of 5 repeats, in microseconds per call (divided by ``per``)."""
    return min(timeit.repeat(fn, number=number, repeat=5)) / number / per * 1e6  # type: ignore[arg-type]


def main() -> None:
    c.pin_self()
    request = [0, 123456, "stream-42", "stream.append", DATA, "bench", "c-1234567", "agent", None]
    bare_request = [*request[:4], None, *request[5:]]
    frame = b"[" + b",".join([orjson.dumps(request)] * BATCH) + b"]"
    bare_frame = b"[" + b",".join([orjson.dumps(bare_request)] * BATCH) + b"]"
    answer = [3, 123456, "stream-42", "3f2a9c1d0b7e", 1234, "stream.append", DATA, "bench",
              "c-1234567", "agent", 1764680000000]
    bare_answer = [3, 123456, "3f2a9c1d0b7e", 1234, 1764680000000]
    encoded, bare_encoded = orjson.dumps(answer), orjson.dumps(bare_answer)
    rows = [
        ["sequencer: decode an append (in a frame of 50)",
         per_call(lambda: orjson.loads(frame), per=BATCH),
         per_call(lambda: orjson.loads(bare_frame), per=BATCH)],
        ["sequencer: encode the row's data blob", per_call(lambda: orjson.dumps(DATA)), 0.0],
        ["sequencer: encode the answer with the event",
         per_call(lambda: orjson.dumps(answer)), per_call(lambda: orjson.dumps(bare_answer))],
        ["worker: decode that answer", per_call(lambda: orjson.loads(encoded)),
         per_call(lambda: orjson.loads(bare_encoded))],
    ]
    for row in rows:
        row.append(row[1] - row[2])
    seq = sum(r[3] for r in rows[:3])
    print(c.table(["step, per event", "with data, us", "without, us", "data's share, us"],
                  rows))
    print(f"at most {seq:.2f} us of sequencer CPU per event and {rows[3][3]:.2f} us of a "
          f"worker's would be saved by passing data through undecoded")


if __name__ == "__main__":
    main()
