"""A bounded reconnect storm (``bench/storm.py`` is the full one): SDK clients over a few
sessions, the server SIGKILLed and restarted while publishers keep publishing; every client
resumes from its cursor and every session's events arrive once each, in order, with no gap."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ServerProcess, token
from tether.client import Client
from tether.client.client import ConnectionState, SessionState
from tether.client.protocol import Snapshot

pytestmark = pytest.mark.slow

CLIENTS = 120
SESSIONS = 12
EVENTS = 40  # per session
KILL_AFTER = 10  # every session has published this many when the server is killed


class Follower:
    def __init__(self, client: Client, session: str) -> None:
        self.client = client
        self.name = session
        self.next = 0
        self.gaps = self.dups = self.snapshots = 0
        self.lost = False
        self.done = asyncio.Event()
        client.on_state(self._state)

    def _state(self, state: ConnectionState) -> None:
        if state is ConnectionState.RECONNECTING:
            self.lost = True

    async def follow(self, attached: asyncio.Future[Any]) -> None:
        session = await self.client.attach(self.name)
        attached.set_result(session)
        async for item in session:
            if isinstance(item, Snapshot):
                self.snapshots += 1
                continue
            n = item.data["n"]
            if n < self.next:
                self.dups += 1
                continue
            self.gaps += n - self.next
            self.next = n + 1
            if self.next == EVENTS:
                self.done.set()


async def test_storm_every_client_resumes_nothing_lost(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data", extra=["--workers", "1"],
                           env={"TETHER_SUBJECT_CONNECTIONS": "0",
                                "TETHER_SUBJECT_ATTACH_RATE": "0"}).start()
    url = f"ws://127.0.0.1:{server.port}"
    names = [f"storm-{i}" for i in range(SESSIONS)]
    followers = [Follower(Client(url, token=token()), names[i % SESSIONS])
                 for i in range(CLIENTS)]
    publisher = Client(url, token=token(), kind="agent")
    tasks: list[asyncio.Task[None]] = []
    try:
        await asyncio.gather(*(f.client.connect() for f in followers))
        attached = [asyncio.get_running_loop().create_future() for _ in followers]
        tasks += [asyncio.create_task(f.follow(a)) for f, a in zip(followers, attached,
                                                                     strict=True)]
        sessions = await asyncio.gather(*attached)
        await publisher.connect()
        reached = asyncio.Event()
        counts = dict.fromkeys(names, 0)

        async def publish(name: str) -> None:
            session = await publisher.attach(name)
            for n in range(EVENTS):
                await session.publish("tick", {"n": n})
                counts[name] = n + 1
                if min(counts.values()) >= KILL_AFTER:
                    reached.set()

        publishing = [asyncio.create_task(publish(name)) for name in names]
        await asyncio.wait_for(reached.wait(), 60)
        server.kill()
        server.start()  # same port, same data: publishes pending in the SDK are re-sent
        await asyncio.wait_for(asyncio.gather(*publishing), 120)
        await asyncio.wait_for(asyncio.gather(*(f.done.wait() for f in followers)), 120)
        assert all(f.lost for f in followers)  # every client went through the storm
        assert all(s.state is SessionState.ATTACHED and s.resumed for s in sessions)
        assert sum(f.gaps for f in followers) == 0
        assert sum(f.dups for f in followers) == 0
        assert sum(f.snapshots for f in followers) == 0
        assert all(f.next == EVENTS for f in followers)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*(f.client.close() for f in followers), publisher.close(),
                             return_exceptions=True)
        server.stop()
