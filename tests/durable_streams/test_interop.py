"""Other people's Durable Streams clients against `tether serve`, across a restart.

``@durable-streams/client`` (Node, pinned in ``conformance/package.json``) and the PyPI
``durable-streams`` client write streams; the other one, and tether's own SDK (a stream is a
session: its messages are ``ds.message`` events), read them back after the server restarted.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from durable_streams import DurableStream

from tests.durable_streams.test_conformance import HERE
from tests.helpers import ServerProcess, token
from tether.client import SessionEvent, SyncClient

pytestmark = pytest.mark.slow

TOKEN = token()
HEADERS = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def node_client() -> Path:
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        pytest.skip("Node 20 + npm run the Node client")
    if not (HERE / "node_modules" / "@durable-streams" / "client").exists():
        subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=HERE,
                       check=True, timeout=240)
    return HERE / "interop.mjs"


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServerProcess]:
    store = request.getfixturevalue("redis_url") if request.param == "redis" else None
    proc = ServerProcess(tmp_path / "data", store=store, extra=["--agent", "none"]).start()
    yield proc
    proc.stop()


def node(script: Path, *args: str) -> Any:
    done = subprocess.run(["node", str(script), *args], capture_output=True, check=False,
                          timeout=60, cwd=script.parent)
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout)


def sdk_messages(server: ServerProcess, session: str, count: int) -> list[Any]:
    """The stream's messages as tether's SDK sees the session: ``ds.message`` events."""
    with SyncClient(f"ws://127.0.0.1:{server.port}", token=TOKEN) as client:
        sess = client.attach(session)
        found: list[Any] = []
        while len(found) < count:
            item = sess.next(timeout=10)
            if isinstance(item, SessionEvent) and item.type == "ds.message":
                found.append(item.data)
        return found


def test_node_and_python_clients_interoperate_across_a_restart(
        server: ServerProcess, node_client: Path) -> None:
    base = f"http://127.0.0.1:{server.port}/v1/stream"
    from_node = [{"from": "node", "n": i} for i in range(5)]
    from_python = [{"from": "python", "n": i, "text": "é\n\u2028"} for i in range(5)]

    # Node writes with an idempotent producer; Python writes message by message.
    written = node(node_client, "write", f"{base}/interop-node", TOKEN, json.dumps(from_node))
    py = DurableStream.create(f"{base}/interop-py", content_type="application/json",
                              headers=HEADERS)
    for item in from_python[:3]:
        py.append(item)
    before_restart = py.head().offset
    for item in from_python[3:]:
        py.append(item)
    py.close()

    server.stop()
    server.start()

    # Each reads what the other wrote, whole and from an offset taken before the restart.
    with DurableStream.connect(f"{base}/interop-node", headers=HEADERS) as handle, \
            handle.stream(offset="-1", live=False) as res:
        assert list(res.iter_json()) == from_node
        assert res.offset == written["offset"]
    assert node(node_client, "read", f"{base}/interop-py", TOKEN)["items"] == from_python
    resumed = node(node_client, "read", f"{base}/interop-py", TOKEN, before_restart)
    assert resumed["items"] == from_python[3:]

    # tether's SDK follows the same logs as sessions.
    assert sdk_messages(server, "interop-node", 5) == from_node
    assert sdk_messages(server, "interop-py", 5) == from_python

    # Live: Node tails from the end while Python appends after the restart.
    tail: dict[str, Any] = {}
    live = threading.Thread(target=lambda: tail.update(node(
        node_client, "tail", f"{base}/interop-py", TOKEN, resumed["offset"], "2")))
    live.start()
    with DurableStream.connect(f"{base}/interop-py", headers=HEADERS) as handle:
        handle.append({"from": "python", "n": 5})
        handle.append({"from": "python", "n": 6})
    live.join(60)
    assert tail["items"][:2] == [{"from": "python", "n": 5}, {"from": "python", "n": 6}]


def test_a_producer_retry_racing_its_original_across_workers_appends_once(
        tmp_path: Path) -> None:
    """Identical producer requests on separate connections, spread by the kernel over two
    workers: each (producer, epoch, seq) is appended once, whichever worker answers."""
    import asyncio

    import aiohttp

    server = ServerProcess(tmp_path / "data", extra=["--agent", "none", "--workers", "2"])
    server.start()
    url = f"http://127.0.0.1:{server.port}/v1/stream/race"
    headers = {**HEADERS, "Content-Type": "application/json"}

    async def run() -> list[Any]:
        async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True)) as http:
            assert (await http.put(url, headers=headers)).status == 201
            for seq in range(20):
                producer = {"Producer-Id": "p", "Producer-Epoch": "0",
                            "Producer-Seq": str(seq)}
                statuses = await asyncio.gather(*(
                    http.post(url, data=json.dumps({"n": seq}),
                              headers={**headers, **producer}) for _ in range(6)))
                codes = sorted(r.status for r in statuses)
                assert codes == [200] + [204] * 5, codes  # one appended, five deduplicated
            async with http.get(url, headers=HEADERS) as resp:
                return list(await resp.json())

    try:
        assert asyncio.run(run()) == [{"n": n} for n in range(20)]
    finally:
        server.stop()
