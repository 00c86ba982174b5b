"""A client that stops reading while 50 MB are published: the server's memory stays bounded by
its configured buffer, and the client, once it reads again, receives everything in order. Also
with ``--workers 2`` (the memory of every process of the server counted together)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psutil
import pytest

from tests.helpers import BOTH_WS_ENGINES, Peer, RawSocketPeer, ServerProcess, token

pytestmark = [pytest.mark.slow, BOTH_WS_ENGINES]  # both: tether/server/front.py

EVENT_BYTES = 10_000
TOTAL_BYTES = 50 * 1024 * 1024
COUNT = TOTAL_BYTES // EVENT_BYTES
BUFFER = 1 << 20


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
async def test_stalled_reader_costs_bounded_memory_and_loses_nothing(
        tmp_path: Path, workers: int, ws_engine: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    server = ServerProcess(data, workers=workers, env={
        "TETHER_PUBLISH_RATE": "1000000", "TETHER_PUBLISH_BURST": "1000000",
        "TETHER_SUBJECT_PUBLISH_RATE": "0",
        "TETHER_HEARTBEAT": "120", "TETHER_OUTBOUND_BUFFER_BYTES": str(BUFFER),
        "TETHER_COMPRESSION": "false", "TETHER_WS_ENGINE": ws_engine}).start()
    try:
        process = psutil.Process(server.pid)
        # Warm up: the same volume into another session fills SQLite's page cache and the
        # allocator's arenas, so what grows afterwards is what the stalled reader costs.
        # SQLite's page cache is 64 MiB: warm up past it.
        if workers == 1:
            await publish_all("warmup", server.port, 2 * COUNT)
        else:  # every worker's arenas too, then the sequencer's under the load measured below
            await asyncio.gather(*(
                publish_all(f"warmup-{pid}", server.port, 2 * COUNT // workers, (server, pid))
                for pid in server.worker_pids()))
            await publish_all("warmup", server.port, COUNT)
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
        # shifts timings and allocator behaviour, so the bound leaves room for that. With
        # --workers 2 the sequencer's heap grows too: its answers to the catch-up page reads
        # (tracemalloc): the session's first page is 500 events (5 MB here, held as the answer
        # and its frame), later ones near 1 MiB (hub._PAGE_BYTES); 7-23 MiB in all.
        assert growth < (24 if workers == 1 else 32) * 2**20

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
