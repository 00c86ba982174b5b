"""An event that cannot be delivered never breaks a session: readers get a placeholder.

Publish validation refuses such events now; these were stored directly (as an older version,
or a damaged disk, could have left them) in a real SQLite store.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import aiohttp

from tests.helpers import SECRET, Peer, nested, token
from tests.server.test_http import read_sse
from tether.protocol.events import Sender
from tether.server import Server, ServerConfig
from tether.store.doctor import scan

AUTH = {"Authorization": f"Bearer {token()}"}


async def test_a_poison_event_is_a_placeholder_for_every_reader(tmp_path: Path) -> None:
    # SQLite stores what it is given; Redis's own encoding refuses data this deep at append.
    server = Server(ServerConfig(port=0, secret=SECRET, data_dir=tmp_path))
    await server.start()
    try:
        store = server.store
        sender = Sender("old-version")
        await store.append("s", "message", {"text": "before"}, sender)
        await store.append("s", "message", nested(254), sender)  # a frame cannot hold it
        await store.append("s", "message", {"text": "after"}, sender)
        base = f"http://127.0.0.1:{server.port}/v1/sessions/s"
        async with aiohttp.ClientSession() as http:
            history = await (await http.get(f"{base}/events", headers=AUTH)).json()
            sse = await http.get(f"{base}/stream", headers=AUTH)
            streamed = [m["data"] for m in await read_sse(sse, 3)]
            sse.close()
        peer = await Peer.connect(server.port)
        await peer.hello()
        await peer.attach("s")
        attached = await peer.events("s", 3)
        await peer.close()
        for events in (history["events"], streamed, attached):
            assert [e["seq"] for e in events] == [1, 2, 3]
            assert events[1]["type"] == "tether.unreadable"
            assert events[1]["data"]["type"] == "message"
            assert "deep" in events[1]["data"]["reason"]
            assert events[2]["data"] == {"text": "after"}
        async with aiohttp.ClientSession() as http:
            metrics = await http.get(f"http://127.0.0.1:{server.port}/metrics")
            assert "tether_unreadable_events_total" in await metrics.text()
    finally:
        await server.stop()
    check_doctor(tmp_path)


def check_doctor(data: Path) -> None:
    (finding,) = list(scan(data))
    assert (finding.session, finding.seq, finding.type) == ("s", 2, "message")
    done = subprocess.run([sys.executable, "-m", "tether", "doctor", "--data", str(data)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "s:2" in done.stdout, done.stdout + done.stderr


async def test_a_poison_event_committed_live_reaches_subscribers_as_a_placeholder(
        tmp_path: Path) -> None:
    server = Server(ServerConfig(port=0, secret=SECRET, data_dir=tmp_path))
    await server.start()
    try:
        peer = await Peer.connect(server.port)
        await peer.hello()
        await peer.attach("live")
        await server.store.append("live", "message", nested(254), Sender("old-version"))
        await server.store.append("live", "message", {"text": "after"}, Sender("old-version"))
        first, second = await peer.events("live", 2)
        assert first["type"] == "tether.unreadable" and first["seq"] == 1
        assert second["data"] == {"text": "after"}
        await peer.close()
    finally:
        await server.stop()
