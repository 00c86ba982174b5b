"""A user-space link emulator: an asyncio TCP proxy that rate-limits and delays each direction.

``tc netem`` needs privileges and a kernel this machine does not give; this does the part that
matters for an agent loop over a slow link. Each direction is a serial link: a segment (1460
bytes, an Ethernet MSS) leaves when the link is free and takes ``len / rate`` to transmit, then
arrives ``rtt / 2`` later (propagation). Segments queue behind each other, so a 2 MB request
on a 2 Mbit/s uplink takes 8 s whatever the client's socket buffers say, and the response
cannot start before the server has the last byte.

It also counts the TCP payload bytes in each direction (HTTP headers, WebSocket framing and
bodies; not TCP/IP headers), which is how the benchmark measures "bytes sent". With no rate and
no delay it is a plain counting pass-through.

Not modelled: TCP slow start and window limits (which only make a long upload slower on a real
high-latency link, i.e. favour the stateless baseline here), loss, jitter.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass

SEGMENT = 1460


@dataclass(frozen=True)
class LinkProfile:
    name: str
    up_mbit: float | None = None  # client → server, Mbit/s (None: unlimited)
    down_mbit: float | None = None  # server → client
    rtt_ms: float = 0.0

    def describe(self) -> str:
        if self.up_mbit is None and self.down_mbit is None and not self.rtt_ms:
            return "loopback"
        up = f"{self.up_mbit:g}" if self.up_mbit else "∞"
        down = f"{self.down_mbit:g}" if self.down_mbit else "∞"
        return f"{up} Mbit/s up, {down} Mbit/s down, {self.rtt_ms:g} ms RTT"


class Counters:
    __slots__ = ("down", "up")

    def __init__(self) -> None:
        self.up = 0
        self.down = 0


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                mbit: float | None, delay: float, counters: Counters, direction: str) -> None:
    """Copy one direction through an emulated serial link."""
    loop = asyncio.get_running_loop()
    rate = mbit * 1e6 / 8 if mbit else None  # bytes per second
    if rate is None and delay <= 0:
        try:
            while data := await reader.read(65536):
                setattr(counters, direction, getattr(counters, direction) + len(data))
                writer.write(data)
                await writer.drain()
        finally:
            with contextlib.suppress(Exception):
                writer.write_eof()
        return
    queue: deque[tuple[float, bytes]] = deque()
    ready = asyncio.Event()
    done = False

    async def deliver() -> None:
        while True:
            while not queue:
                if done:
                    with contextlib.suppress(Exception):
                        writer.write_eof()
                    return
                ready.clear()
                await ready.wait()
            due = queue[0][0]
            now = loop.time()
            if due > now:
                await asyncio.sleep(due - now)
            now = loop.time() + 0.0005
            batch = []
            while queue and queue[0][0] <= now:
                batch.append(queue.popleft()[1])
            writer.write(b"".join(batch))
            await writer.drain()

    sender = loop.create_task(deliver())
    link_free = loop.time()
    try:
        while data := await reader.read(65536):
            setattr(counters, direction, getattr(counters, direction) + len(data))
            for i in range(0, len(data), SEGMENT):
                segment = data[i:i + SEGMENT]
                start = max(loop.time(), link_free)
                link_free = start + (len(segment) / rate if rate else 0.0)
                queue.append((link_free + delay, segment))
            ready.set()
    finally:
        done = True
        ready.set()
        with contextlib.suppress(Exception):
            await sender


class LinkEmulator:
    """``await start()``, point clients at ``port``; ``counters`` add up both directions of every
    connection made through it."""

    def __init__(self, target_port: int, profile: LinkProfile) -> None:
        self.target_port = target_port
        self.profile = profile
        self.counters = Counters()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[object]] = set()

    async def start(self) -> LinkEmulator:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def _handle(self, client_r: asyncio.StreamReader,
                      client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        delay = self.profile.rtt_ms / 2000
        counters = self.counters
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await asyncio.gather(
                _pipe(client_r, server_w, self.profile.up_mbit, delay, counters, "up"),
                _pipe(server_r, client_w, self.profile.down_mbit, delay, counters, "down"),
                return_exceptions=True)
        except asyncio.CancelledError:
            pass  # stop() ends connections the client left open
        finally:
            for w in (client_w, server_w):
                w.close()
            self._tasks.discard(task)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
