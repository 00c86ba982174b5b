"""Experiment: an Outbox that writes everything queued for a peer in one ``transport.write``.

Today ``Outbox._write`` awaits ``send_frame`` once per frame, so every event costs one
``write()`` syscall per subscriber, and a writer task is created whenever the queue was empty.
Here ``push`` schedules one ``call_soon`` flush per peer per loop iteration; the flush frames the
queued payloads itself (server frames are unmasked: a 2-10 byte header + payload) and writes
them joined. It falls back to the original task-based writer when the peer negotiated
compression or its transport is paused (backpressure), so flow control is unchanged.

``BENCH_TETHER_WRAPPER=bench/experiments/coalesced_outbox.py python -m bench.fanout``
"""

from __future__ import annotations

import asyncio
import struct
import sys
from typing import Any

from tether.server import connection, hub

_H1 = struct.Struct("!BB").pack
_H2 = struct.Struct("!BBH").pack
_H3 = struct.Struct("!BBQ").pack


def _frame(payload: bytes, opcode: int) -> bytes:
    n = len(payload)
    first = 0x80 | opcode
    if n < 126:
        return _H1(first, n) + payload
    if n < 65536:
        return _H2(first, 126, n) + payload
    return _H3(first, 127, n) + payload


class CoalescingOutbox(hub.Outbox):
    __slots__ = ("_flush_handle",)

    def __init__(self, sink: Any, limit: int, metrics: Any) -> None:
        super().__init__(sink, limit, metrics)
        self._flush_handle: asyncio.Handle | None = None

    def push(self, data: bytes) -> None:
        if self.closed:
            return
        self.queue.append(data)
        self.size += len(data)
        if self._writer is None and self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        if self._writer is not None or self.closed or not self.queue:
            return
        writer = getattr(getattr(self.sink, "ws", None), "_writer", None)
        transport = getattr(writer, "transport", None)
        if (transport is None or writer.compress or transport.is_closing()
                or writer.protocol._paused):
            self._writer = asyncio.get_running_loop().create_task(self._write())
            return
        opcode = int(self.sink.opcode)
        frames = [_frame(data, opcode) for data in self.queue]
        transport.write(b"".join(frames))
        hot = self.metrics.hot
        hot.frames_out += len(frames)
        hot.bytes_out += self.size
        self.queue.clear()
        self.size = 0
        self._wake()


hub.Outbox = CoalescingOutbox  # type: ignore[misc]
connection.Outbox = CoalescingOutbox  # type: ignore[misc]

if __name__ == "__main__":
    from tether.cli import main

    sys.exit(main(sys.argv[1:]))
