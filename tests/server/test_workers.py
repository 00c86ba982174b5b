"""``tether serve --workers 2`` on the embedded SQLite store: the workers serve one log.

Peers are placed on a chosen worker by connecting until the kernel's SO_REUSEPORT spread puts
one there (the test reads which worker serves a connection from its socket). Across workers:
one gapless order for concurrent publishers, live fan-out to subscribers of the other worker,
presence, a run claimed once and picked up by the other worker when its own dies, a dead
worker restarted, SIGTERM stopping every process with every commit kept, and the port refused
to a second server.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from tests.agents.test_runs import APPROVER, until_event
from tests.helpers import SECRET, Peer, ServerProcess, token

pytestmark = pytest.mark.slow

PER_PUBLISHER = 150


def worker_of(server: ServerProcess, peer: Peer) -> int:
    return server.worker_of(peer.ws.get_extra_info("sockname")[1])


async def peers_on_each_worker(server: ServerProcess, tok: str | None = None
                               ) -> dict[int, Peer]:
    """One connected (hello'd) peer per worker, by worker pid."""
    placed: dict[int, Peer] = {}
    spare: list[Peer] = []
    for _ in range(64):
        peer = await Peer.connect(server.port)
        peer.welcome = await peer.hello(tok)  # type: ignore[attr-defined]
        pid = worker_of(server, peer)
        if pid in placed:
            spare.append(peer)
        else:
            placed[pid] = peer
        if len(placed) == server.workers:
            break
    for peer in spare:
        await peer.close()
    assert len(placed) == server.workers, "the kernel never spread connections over workers"
    return placed


async def history(port: int, session: str) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as http:
        resp = await http.get(f"http://127.0.0.1:{port}/v1/sessions/{session}/events",
                              params={"limit": "1000"},
                              headers={"Authorization": f"Bearer {token()}"})
        events: list[dict[str, Any]] = (await resp.json())["events"]
        return events


async def test_workers_share_one_log_fan_out_and_presence_and_the_port(tmp_path: Path
                                                                        ) -> None:
    server = ServerProcess(tmp_path / "data", workers=2).start()
    try:
        subs = list((await peers_on_each_worker(server)).values())
        await subs[0].attach("shared")
        await subs[1].attach("shared")
        # Presence crosses workers: the first subscriber hears the second one join.
        second = subs[1].welcome["client"]  # type: ignore[attr-defined]
        while (await subs[0].expect("presence", action="join"))["members"][0]["client"] \
                != second:
            pass
        pubs = list((await peers_on_each_worker(server)).values())

        async def publish(peer: Peer, name: str) -> list[int]:
            seqs = []
            for i in range(PER_PUBLISHER):
                reply = await peer.publish("shared", "message", {"by": name, "i": i},
                                           key=f"{name}-{i}")
                assert reply["op"] == "published", reply
                seqs.append(reply["seq"])
            return seqs

        acked = await asyncio.gather(*(publish(p, f"p{n}") for n, p in enumerate(pubs)))
        total = PER_PUBLISHER * len(pubs)
        assert sorted(acked[0] + acked[1]) == list(range(1, total + 1))
        for sub in subs:
            events = await sub.events("shared", total)
            assert [e["seq"] for e in events] == list(range(1, total + 1))
            for name in ("p0", "p1"):  # each publisher's own order is kept
                assert [e["data"]["i"] for e in events if e["data"]["by"] == name] == \
                    list(range(PER_PUBLISHER))
        for peer in subs + pubs:
            await peer.close()
        assert [e["seq"] for e in await history(server.port, "shared")] == \
            list(range(1, total + 1))

        # Workers bind with SO_REUSEPORT, which any process of the same user could join: the
        # supervisor proves the port free first, so a second server fails instead of sharing.
        done = await asyncio.to_thread(subprocess.run, [
            sys.executable, "-m", "tether", "serve", "--port", str(server.port), "--data",
            str(tmp_path / "other"), "--secret", SECRET, "--workers", "2"],
            capture_output=True, text=True, timeout=60)
        assert done.returncode == 1
        assert "cannot listen on" in done.stderr and "in use" in done.stderr, done.stderr
    finally:
        server.stop()


async def test_a_run_is_claimed_once_and_survives_its_workers_death(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data", workers=2, env={"TETHER_LEASE_SECONDS": "1"},
                           extra=["--agent", "tests.agents.fast_demo:agent"]).start()
    try:
        peers = await peers_on_each_worker(server, token(caps=APPROVER))
        for peer in peers.values():
            assert (await peer.attach("demo-workers"))["op"] == "attached"
        (driver_pid, driver), (_, other) = peers.items()
        # The run starts on the worker that commits the message.
        await driver.publish("demo-workers", "message", {"text": "send the report"})
        request = await until_event(other, "approval.request")
        await until_event(other, "run.state", state="awaiting_approval")
        await driver.close()
        server.kill_worker(driver_pid)
        data = request["data"]
        reply = await other.publish("demo-workers", "approval.decision", {
            "run": data["run"], "call": data["call"], "decision": "approve"})
        assert reply["op"] == "published", reply
        done = await until_event(other, "run.state", run=data["run"], state="completed")
        # Driven on by the other worker, or by the dead one's replacement (which has its node
        # id, and reclaims its runs): either way, after the death, and once.
        assert done["seq"] > request["seq"]
        events = await history(server.port, "demo-workers")
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert len([e for e in events if e["type"] == "run.created"]) == 1
        results = [e for e in events if e["type"] == "tool.result"]
        assert len(results) == 1 and results[0]["data"]["result"]["status"] == "sent"
        await other.close()
        # The supervisor started a worker in place of the dead one.
        async def restarted() -> None:
            while driver_pid in server.worker_pids() or len(server.worker_pids()) < 2:
                await asyncio.sleep(0.05)
        await asyncio.wait_for(restarted(), 30)
    finally:
        server.stop()


async def test_sigterm_stops_every_process_and_keeps_every_commit(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data", workers=2).start()
    workers = server.worker_pids()
    try:
        peers = await peers_on_each_worker(server)
        for n, peer in enumerate(peers.values()):
            for i in range(20):
                await peer.send({"op": "publish", "id": i, "session": "kept", "type": "message",
                                 "data": {"w": n, "i": i}})
        for peer in peers.values():
            for _ in range(20):
                assert (await peer.expect("published"))["seq"] > 0
        closing = [asyncio.create_task(peer.expect("never")) for peer in peers.values()]
        assert server.proc is not None
        server.proc.terminate()
        assert await asyncio.to_thread(server.proc.wait, 30) == 0
        for task in closing:  # every socket was closed by its worker: 4000, reconnect
            with pytest.raises(ConnectionError, match="4000"):
                await task
        for peer in peers.values():
            await peer.close()
        assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() !=
                       psutil.STATUS_ZOMBIE for pid in workers)
    finally:
        server.stop()
    again = ServerProcess(tmp_path / "data", workers=1).start()
    try:
        events = await history(again.port, "kept")
        assert [e["seq"] for e in events] == list(range(1, 41))
    finally:
        again.stop()


