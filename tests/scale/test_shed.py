"""Load shedding: beyond ``max_connect_rate`` new sockets are closed with 4003 and a
retry_after; the SDK waits that long and gets in."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest

from tests.helpers import SECRET, Peer, token
from tether.client import Client
from tether.protocol.codes import CloseCode, retry_after_from_reason
from tether.server import Server, ServerConfig
from tether.server.admission import Admission
from tether.server.connection import WS_ENDPOINT
from tether.store import MemoryStore


def test_admission_spreads_the_crowd() -> None:
    admission = Admission(rate=10.0, burst=3)
    delays = [admission.retry_after() for _ in range(8)]
    assert delays[:3] == [0.0, 0.0, 0.0]
    # Each client sent away is told to come back after the ones before it.
    waits = delays[3:]
    assert all(b > a > 0 for a, b in itertools.pairwise(waits))
    assert 0.3 < waits[-1] <= 0.5  # five sent away at 10/s: the last waits ~0.5 s


@pytest.mark.parametrize(("reason", "delay"), [
    ("retry_after=2.5", 2.5), ("shed, retry_after=0.25", 0.25), ("retry_after=x", None),
    ("retry_after=61", None), ("", None), ("try again", None),
])
def test_reason_parsing(reason: str, delay: float | None) -> None:
    assert retry_after_from_reason(reason) == delay


async def test_shed_sockets_are_closed_with_a_delay_and_the_sdk_gets_in(tmp_path: Path) -> None:
    config = ServerConfig(port=0, secret=SECRET, data_dir=tmp_path, max_connect_rate=0.1,
                          max_connect_burst=5, subject_connections=0)
    server = Server(config, store=MemoryStore())
    await server.start()
    clients: list[Client] = []
    try:
        # Raw peers past the burst (one new token per 10 s): five admitted, the sixth shed.
        peers = [await Peer.connect(server.port) for _ in range(5)]
        shed = await Peer.connect(server.port)
        msg = await shed.ws.receive(10)
        assert msg.type.name == "CLOSE" and msg.data == CloseCode.TRY_AGAIN_LATER
        assert retry_after_from_reason(str(msg.extra)) is not None
        for peer in [*peers, shed]:
            await peer.close()
        # A crowd of SDK clients: every one is welcomed, some only after being sent away.
        server.app[WS_ENDPOINT].admission = Admission(rate=5.0, burst=5)
        clients = [Client(f"ws://127.0.0.1:{server.port}", token=token(), backoff_base=0.01)
                   for _ in range(30)]
        await asyncio.wait_for(asyncio.gather(*(c.connect() for c in clients)), 60)
        closes = server.metrics.closes.labels(str(int(CloseCode.TRY_AGAIN_LATER)))
        assert closes._value.get() > 1
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        await server.stop()
