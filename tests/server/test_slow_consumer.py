"""A client that stops reading while 50 MB are published: the server's memory stays bounded by
its configured buffer, and the client, once it reads again, receives everything in order. Also
with ``--workers 2`` (the memory of every process of the server counted together)."""

from __future__ import annotations

import asyncio
import base64
import os
import struct
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest

from tests.helpers import Peer, ServerProcess, token

pytestmark = pytest.mark.slow

EVENT_BYTES = 10_000
TOTAL_BYTES = 50 * 1024 * 1024
COUNT = TOTAL_BYTES // EVENT_BYTES
BUFFER = 1 << 20


class RawSocketPeer:
    """A WebSocket client on a plain stream: when it stops reading, nothing reads for it, so
    the kernel buffers fill and the server feels real backpressure."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> RawSocketPeer:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 16)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write((f"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                      "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: tether.v1.json\r\n"
                      "\r\n").encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    async def send(self, frame: dict[str, Any]) -> None:
        payload = orjson.dumps(frame)
        mask = os.urandom(4)
        header = bytes([0x81])
        n = len(payload)
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack("!Q", n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.writer.write(header + mask + masked)
        await self.writer.drain()

    async def recv(self) -> dict[str, Any]:
        while True:
            b0, b1 = await self.reader.readexactly(2)
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
            payload = await self.reader.readexactly(n)
            opcode = b0 & 0x0F
            if opcode == 0x9:  # ping: answer so the heartbeat keeps us
                self.writer.write(bytes([0x8A, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)
                continue
            if opcode == 0x1:
                return orjson.loads(payload)  # type: ignore[no-any-return]
            raise ConnectionError(f"unexpected opcode {opcode}")


async def publish_all(session: str, port: int, count: int,
                      on: tuple[ServerProcess, int] | None = None) -> None:
    """Publish ``count`` events of EVENT_BYTES, many in flight, and wait for every ack;
    ``on`` = (server, worker pid): from a connection that worker serves."""
    while True:
        peer = await Peer.connect(port)
        if on is None or on[0].worker_of(peer.ws.get_extra_info("sockname")[1]) == on[1]:
            break
        await peer.close()
    await peer.hello()
    body = "x" * (EVENT_BYTES - 40)
    sent = acked = 0
    while acked < count:
        while sent < count and sent - acked < 200:
            await peer.send({"op": "publish", "id": sent, "session": session,
                             "type": "message", "data": {"n": sent, "body": body}})
            sent += 1
        frame = await peer.recv(60)
        assert frame["op"] == "published", frame
        acked += 1
    await peer.close()


def rss(process: psutil.Process) -> int:
    """The resident memory of ``process`` and its children (the workers of --workers)."""
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])


@pytest.mark.parametrize("workers", [1, 2])
async def test_stalled_reader_costs_bounded_memory_and_loses_nothing(tmp_path: Path,
                                                                     workers: int) -> None:
    data = tmp_path / "data"
    data.mkdir()
    server = ServerProcess(data, workers=workers, env={
        "TETHER_PUBLISH_RATE": "1000000", "TETHER_PUBLISH_BURST": "1000000",
        "TETHER_SUBJECT_PUBLISH_RATE": "0",
        "TETHER_HEARTBEAT": "120", "TETHER_OUTBOUND_BUFFER_BYTES": str(BUFFER),
        "TETHER_COMPRESSION": "false"}).start()
    try:
        process = psutil.Process(server.pid)
        # Warm up: the same volume into another session fills SQLite's page cache and the
        # allocator's arenas, so what grows afterwards is what the stalled reader costs.
        # SQLite's page cache is 64 MiB: warm up past it.
        if workers == 1:
            await publish_all("warmup", server.port, 2 * COUNT)
        else:  # every worker's arenas too
            await asyncio.gather(*(
                publish_all(f"warmup-{pid}", server.port, 2 * COUNT // workers, (server, pid))
                for pid in server.worker_pids()))
        baseline = rss(process)

        slow = await RawSocketPeer.connect(server.port)
        await slow.send({"op": "hello", "id": 1, "token": token()})
        assert (await slow.recv())["op"] == "welcome"
        await slow.send({"op": "attach", "id": 2, "session": "slow"})
        assert (await slow.recv())["op"] == "attached"
        # ... and from here on it reads nothing while 50 MB are published.
        peak = baseline
        publishing = asyncio.create_task(publish_all("slow", server.port, COUNT))
        while not publishing.done():
            peak = max(peak, rss(process))
            await asyncio.wait([publishing], timeout=0.05)
        await publishing
        peak = max(peak, rss(process))
        growth = peak - baseline
        print(f"\nRSS baseline {baseline / 2**20:.1f} MiB, peak growth {growth / 2**20:.1f} MiB "
              f"while {TOTAL_BYTES / 2**20:.0f} MiB were published to a stalled reader "
              f"(buffer {BUFFER / 2**20:.0f} MiB)")
        # Unbounded queueing would hold the whole 50 MiB. Quiet, growth is about 5 MiB (the
        # 1 MiB buffer, the catch-up page, in-flight publishes, allocator slack); a busy machine
        # shifts timings and allocator behaviour, so the bound leaves room for that.
        assert growth < 24 * 2**20

        seqs: list[int] = []
        while len(seqs) < COUNT:
            frame = await asyncio.wait_for(slow.recv(), 60)
            if frame.get("op") == "event":
                assert frame["data"]["n"] == len(seqs)
                seqs.append(frame["seq"])
        assert seqs == list(range(1, COUNT + 1))
        slow.writer.close()
    finally:
        server.stop()
