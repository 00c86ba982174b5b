from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from tests.helpers import SECRET, Peer
from tether.server import Server, ServerConfig
from tether.server.metrics import LATENCY_BUCKETS, Metrics


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


@given(st.lists(st.floats(min_value=0.0, max_value=5.0), max_size=40))
def test_the_delivery_histogram_is_exported_as_prometheus_client_exports_one(
        values: list[float]) -> None:
    """The hot-path histogram, kept as plain counts, reads the same as the library's own."""
    metrics = Metrics()
    reference_registry = CollectorRegistry()
    reference = Histogram("tether_publish_deliver_seconds", "reference",
                          buckets=LATENCY_BUCKETS, registry=reference_registry)
    for value in values:
        metrics.hot.observe_latency(value)
        reference.observe(value)

    def samples(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
        return {(s.name, s.labels.get("le", "")): s.value
                for family in registry.collect()
                if family.name == "tether_publish_deliver_seconds"
                for s in family.samples if not s.name.endswith("_created")}

    ours, theirs = samples(metrics.registry), samples(reference_registry)
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value), key


async def test_publishes_are_counted_stored_and_transient(server: Server) -> None:
    peer = await Peer.connect(server.port)
    await peer.hello()
    for i in range(3):
        await peer.publish("s", "message", i)
    await peer.publish("s", "typing", {}, transient=True)
    await peer.close()
    text = generate_latest(server.metrics.registry).decode()
    assert 'tether_events_published_total{transient="false"} 3.0' in text
    assert 'tether_events_published_total{transient="true"} 1.0' in text
