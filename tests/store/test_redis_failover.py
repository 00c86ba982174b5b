"""Redis Cluster failover: a master dies (SIGKILL) and its replica takes over its slots.

Redis replicates asynchronously: a master acknowledges a write before its replica has it, so
a failover may lose acknowledged events unless the store waits for the replica
(``wait_replicas``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import redis as sync_redis
import redis.asyncio as aioredis

from tests.conftest import RedisCluster, free_port, wait_for_port, wait_replicas_acked
from tests.store.test_redis import ALICE, Collector, PrivateRedis, open_node
from tests.store.test_redis_cluster import owners, slot_of
from tether.store import Appended, StoreError
from tether.store.redis import RedisStore
from tether.store.redis.client import WAIT_TIMEOUT, split_store_options

pytestmark = pytest.mark.redis

URL_WAITING = "?wait_replicas=1&wait_timeout={}"

# Bounds on waits that normally take ~2-3 s (node timeout 1 s, then the election).
FAILOVER_WAIT = 30.0
RECOVERY_WAIT = 15.0


async def promoted(port: int) -> None:
    """Wait until the replica on ``port`` is a master serving slots."""
    node = aioredis.Redis(port=port, decode_responses=True)
    try:
        async with asyncio.timeout(FAILOVER_WAIT):
            while True:
                role = (await node.info("replication"))["role"]
                if role == "master" and await serves_slots(node):
                    return
                await asyncio.sleep(0.02)
    finally:
        await node.aclose()


async def serves_slots(node: aioredis.Redis) -> bool:
    me = str(await node.execute_command("CLUSTER MYID"))
    slots = await node.execute_command("CLUSTER SLOTS")
    return any(master[2] == me for _, _, master, *_ in slots)


def spread(cluster: RedisCluster, per_master: int) -> dict[int, list[str]]:
    """``per_master`` session names served by each master."""
    owner = owners(cluster)
    sessions: dict[int, list[str]] = {port: [] for port in cluster.ports}
    n = 0
    while any(len(names) < per_master for names in sessions.values()):
        name = f"fo-{n}"
        n += 1
        names = sessions[owner[slot_of(name)]]
        if len(names) < per_master:
            names.append(name)
    return sessions


class Appender:
    """Appends 0, 1, 2... to one session, each with its own idempotency key, retrying a
    failed append (outcome unknown) with the same key until it is acknowledged."""

    def __init__(self, store: RedisStore, session: str, progress: asyncio.Event) -> None:
        self.store = store
        self.session = session
        self.progress = progress
        self.acked: list[tuple[int, int]] = []  # (value, seq) of each acknowledged append
        self.failures = 0
        self.stop = False
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        n = 0
        while not self.stop:
            try:
                result = await self.store.append(self.session, "message", n, ALICE,
                                                 key=f"k{n}")
            except StoreError:
                self.failures += 1
                await asyncio.sleep(0)  # a store that fails at once must not starve the loop
                continue
            self.acked.append((n, result.event.seq))
            n += 1
            self.progress.set()


async def hears(watcher: Collector, seq: int) -> None:
    """Wait until ``watcher`` has heard event ``seq`` or a later one."""
    async with asyncio.timeout(RECOVERY_WAIT):
        while not watcher.events or watcher.events[-1].seq < seq:
            await watcher.wait_for(len(watcher.events) + 1, RECOVERY_WAIT)


async def until(condition: Callable[[], bool], progress: asyncio.Event,
                timeout: float) -> None:
    """Wait, woken by ``progress``, until ``condition()`` holds."""
    async with asyncio.timeout(timeout):
        while not condition():
            progress.clear()
            await progress.wait()


@pytest.fixture
async def stores(redis_failover_cluster: RedisCluster
                 ) -> AsyncIterator[tuple[RedisStore, RedisStore, RedisStore]]:
    """Two appending nodes, one acknowledging after the master's reply and one after the
    replica's (``wait_replicas=1``), and a listening node."""
    url = redis_failover_cluster.url
    plain = await open_node(url)
    waiting = await open_node(url + URL_WAITING.format(500))
    listening = await open_node(url)
    yield plain, waiting, listening
    for store in (plain, waiting, listening):
        await store.close()


async def test_a_killed_master_fails_over_and_appends_and_listeners_resume(
    redis_failover_cluster: RedisCluster,
    stores: tuple[RedisStore, RedisStore, RedisStore],
    request: pytest.FixtureRequest,
) -> None:
    cluster = redis_failover_cluster
    plain, waiting, listening = stores
    by_master = spread(cluster, 4)
    # The URL's first seed dies: the store must find the cluster through the others.
    victim = cluster.ports[0]
    (replica,) = cluster.replicas_of(victim)
    progress = asyncio.Event()
    watchers: dict[str, Collector] = {}
    appenders: list[Appender] = []
    for names in by_master.values():
        for i, session in enumerate(names):
            watchers[session] = Collector()
            listening.listen(session, watchers[session])
            # Half the sessions of each master on each appending node.
            appenders.append(Appender(waiting if i % 2 else plain, session, progress))
    on_victim = [a for a in appenders if a.session in by_master[victim]]
    try:
        await until(lambda: all(len(a.acked) >= 3 for a in appenders), progress, RECOVERY_WAIT)
        cluster.kill(victim)
        await promoted(replica)
        # Appends to every slot succeed again, the dead master's ones on the promoted replica,
        # but for the node that waits for a replica: the promoted one has none.
        after = {a.session: len(a.acked) for a in appenders}
        unreplicated = [a for a in on_victim if a.store is waiting]
        await until(lambda: all(len(a.acked) >= after[a.session] + 3 for a in appenders
                                if a not in unreplicated), progress, RECOVERY_WAIT)
        assert all(len(a.acked) == after[a.session] for a in unreplicated)
        # The dead master comes back as the promoted one's replica: those appends resume.
        cluster.restart(victim)
        await until(lambda: all(len(a.acked) >= after[a.session] + 3 for a in unreplicated),
                    progress, RECOVERY_WAIT)
        # The listening node resubscribed on the promoted replica: it hears new commits.
        target = {a.session: a.acked[-1][1] for a in on_victim}
        for appender in on_victim:
            await hears(watchers[appender.session], target[appender.session])
    finally:
        for appender in appenders:
            appender.stop = True
        await asyncio.gather(*(a.task for a in appenders))

    lost: dict[str, list[tuple[int, int]]] = {}
    for appender in appenders:
        stored = await plain.read(appender.session, 0, 100_000)
        # Gapless, ordered, and each value once (retries hit their idempotency key).
        assert [e.seq for e in stored] == list(range(1, len(stored) + 1))
        values = [e.data for e in stored]
        assert values == sorted(set(values))
        at = {e.seq: e.data for e in stored}
        missing = [(n, seq) for n, seq in appender.acked if at.get(seq) != n]
        if missing:
            lost[appender.session] = missing
        seen = [e.seq for e in watchers[appender.session].events]
        assert seen == sorted(set(seen))
    # Waiting for the replica makes an acknowledged append survive the failover.
    assert not [s for s in lost if any(a.session == s and a.store is waiting
                                       for a in appenders)]
    # Without it, Redis promises nothing (the next test loses one): measured, not asserted.
    request.node.user_properties += [
        ("acknowledged_on_victim", sum(len(a.acked) for a in on_victim)),
        ("lost_acknowledged", sum(len(m) for m in lost.values())),
        ("failed_appends", sum(a.failures for a in on_victim))]


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """SIGSTOP a process for the block: it reads nothing and answers nothing meanwhile."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


async def append_when_served(store: RedisStore, session: str, data: str) -> Appended:
    """Append, retrying while the store finds the session's new master."""
    async with asyncio.timeout(RECOVERY_WAIT):
        while True:
            try:
                return await store.append(session, "message", data, ALICE)
            except StoreError:
                continue


async def test_an_append_acknowledged_before_the_replica_had_it_is_lost_in_a_failover(
    redis_failover_cluster: RedisCluster,
) -> None:
    """Unless the store waits for the replica: then it is refused, not acknowledged."""
    cluster = redis_failover_cluster
    victim = cluster.ports[1]
    (replica,) = cluster.replicas_of(victim)
    (session,) = spread(cluster, 1)[victim]
    plain = await open_node(cluster.url)
    waiting = await open_node(cluster.url + URL_WAITING.format(500))
    try:
        first = await waiting.append(session, "message", "replicated", ALICE)
        assert first.event.seq == 1
        # The replica is cut off (stopped, so that it cannot reconnect) before the next
        # appends: they exist on the master only when it dies.
        with stopped(cluster.procs[replica].pid):
            master = sync_redis.Redis(port=victim)
            master.execute_command("CLIENT KILL TYPE replica")
            master.close()
            acknowledged = await plain.append(session, "message", "acknowledged", ALICE)
            assert acknowledged.event.seq == 2
            with pytest.raises(StoreError, match="0 of 1 replicas"):
                await waiting.append(session, "message", "refused", ALICE)
            cluster.kill(victim)
        await promoted(replica)
        after = await append_when_served(plain, session, "after")
        stored = await plain.read(session, 0, 10)
    finally:
        await plain.close()
        await waiting.close()
    # The acknowledged event is gone, and its seq names another event now.
    assert after.event.seq == 2
    assert [(e.seq, e.data) for e in stored] == [(1, "replicated"), (2, "after")]


@pytest.fixture
def replicated_redis() -> Iterator[tuple[PrivateRedis, int]]:
    """A redis-server and a replica of it (its pid)."""
    server = PrivateRedis()
    master = sync_redis.Redis(port=server.port)
    master.config_set("repl-diskless-sync-delay", 0)  # the replica's first sync at once
    master.close()
    port = free_port()
    proc = subprocess.Popen(
        [server.binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", server.dir, "--dbfilename", f"dump-{port}.rdb",
         "--replicaof", "127.0.0.1", str(server.port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        wait_replicas_acked(server.port, time.monotonic() + 30)
        yield server, proc.pid
    finally:
        proc.terminate()
        proc.wait(10)
        server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)


async def test_one_redis_acknowledges_once_its_replica_has_the_commit(
    replicated_redis: tuple[PrivateRedis, int],
) -> None:
    server, replica_pid = replicated_redis
    store = await open_node(server.url + URL_WAITING.format(500))
    try:
        assert (await store.append("s", "message", 1, ALICE)).event.seq == 1
        with stopped(replica_pid), pytest.raises(StoreError, match="0 of 1 replicas"):
            await store.append("s", "message", 2, ALICE, key="two")
        # It committed on the master all the same; its key finds it once replicated.
        again = await store.append("s", "message", 2, ALICE, key="two")
        assert again.duplicate and again.event.seq == 2
        assert (await store.append("s", "message", 3, ALICE)).event.seq == 3
    finally:
        await store.close()


def test_the_wait_options_are_the_stores_own() -> None:
    assert split_store_options("redis://h:6379/0?wait_replicas=2&socket_timeout=5") == (
        "redis://h:6379/0?socket_timeout=5", 2, WAIT_TIMEOUT)
    assert split_store_options("redis+cluster://h1:7000,h2:7001?wait_replicas=1&wait_timeout=50"
                               ) == ("redis+cluster://h1:7000,h2:7001", 1, 50)
    assert split_store_options("rediss+cluster://u:p%40@h1:7000/") == (
        "rediss+cluster://u:p%40@h1:7000/", 0, WAIT_TIMEOUT)
    for bad in ("wait_replicas=one", "wait_timeout=0", "wait_timeout=-5"):
        with pytest.raises(ValueError):
            split_store_options(f"redis://h:6379/0?{bad}")
