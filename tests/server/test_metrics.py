from __future__ import annotations

from pathlib import Path

from tests.helpers import SECRET, Peer
from tether.server import Server, ServerConfig


async def test_store_batch_sizes_are_reported(tmp_path: Path) -> None:
    server = Server(ServerConfig(port=0, secret=SECRET, data_dir=tmp_path,
                                 store_url=f"sqlite://{tmp_path / 'db'}"))
    await server.start()
    try:
        peer = await Peer.connect(server.port)
        await peer.hello()
        for i in range(50):
            await peer.send({"op": "publish", "id": i, "session": "s", "type": "message",
                             "data": i})
        acked = 0
        while acked < 50:
            acked += (await peer.recv())["op"] == "published"
        await peer.close()
        histogram = server.metrics.batch_size
        count = sum(s.value for s in histogram.collect()[0].samples
                    if s.name.endswith("_count"))
        total = sum(s.value for s in histogram.collect()[0].samples if s.name.endswith("_sum"))
        assert total == 50 and 1 <= count < 50  # pipelined publishes share commits
    finally:
        await server.stop()
