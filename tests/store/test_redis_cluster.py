"""Redis Cluster only: sessions spread over the masters, flushes that span slots, slots that
move while nodes append and listen (MOVED, ASK, SUNSUBSCRIBE)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
import redis as sync_redis
from redis.crc import key_slot

from tests.conftest import RedisCluster
from tests.store.test_redis import ALICE, Collector, open_node
from tether.store.redis import RedisStore
from tether.store.redis.cluster import parse_cluster_url

pytestmark = pytest.mark.redis


def slot_of(session: str) -> int:
    return key_slot(f"tether:{{{session}}}:meta".encode())


def owners(cluster: RedisCluster) -> dict[int, int]:
    """Slot -> the port of the master that serves it, as the cluster says now."""
    node = sync_redis.Redis(port=cluster.ports[0])
    owner: dict[int, int] = {}
    for start, end, master, *_ in node.execute_command("CLUSTER SLOTS"):
        for slot in range(start, end + 1):
            owner[slot] = int(master[1])
    node.close()
    return owner


def node_id(port: int) -> str:
    node = sync_redis.Redis(port=port, decode_responses=True)
    try:
        return str(node.execute_command("CLUSTER MYID"))
    finally:
        node.close()


def begin_move(slot: int, source: int, target: int) -> None:
    """Mark ``slot`` as migrating from ``source`` to ``target`` (keys not moved yet)."""
    sync_redis.Redis(port=target).execute_command(
        "CLUSTER SETSLOT", slot, "IMPORTING", node_id(source))
    sync_redis.Redis(port=source).execute_command(
        "CLUSTER SETSLOT", slot, "MIGRATING", node_id(target))


def finish_move(cluster: RedisCluster, slot: int, source: int, target: int) -> None:
    """Move the slot's remaining keys to ``target`` and give it the slot on every master."""
    src = sync_redis.Redis(port=source)
    while keys := src.execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
        src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
    target_id = node_id(target)
    for port in (target, source, *(p for p in cluster.ports if p not in (source, target))):
        sync_redis.Redis(port=port).execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)
    cluster.wait_ok()


@pytest.fixture
async def pair(redis_cluster_url: str) -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    a = await open_node(redis_cluster_url)
    b = await open_node(redis_cluster_url)
    yield a, b
    await a.close()
    await b.close()


def test_cluster_urls_name_their_seeds() -> None:
    assert parse_cluster_url("redis+cluster://127.0.0.1:7000,127.0.0.1:7001") == (
        "redis://127.0.0.1:7000", [("127.0.0.1", 7000), ("127.0.0.1", 7001)])
    assert parse_cluster_url("rediss+cluster://u:p%40@h1:7000,h2/?socket_timeout=2") == (
        "rediss://u:p%40@h1:7000/?socket_timeout=2", [("h1", 7000), ("h2", 6379)])
    with pytest.raises(ValueError):
        parse_cluster_url("redis+cluster://h1:port")


async def test_sessions_spread_over_the_masters_and_one_flush_commits_every_slot(
    redis_cluster: RedisCluster, pair: tuple[RedisStore, RedisStore],
) -> None:
    a, b = pair
    sessions = [f"spread-{i}" for i in range(60)]
    watchers = {session: Collector() for session in sessions}
    for session, watcher in watchers.items():
        b.listen(session, watcher)
    sizes: list[int] = []
    store = await open_node(redis_cluster.url, on_batch=sizes.append)
    try:
        # One tick: every session of every slot in the same flush.
        results = await asyncio.gather(*(
            store.append(session, "message", {"n": n}, ALICE)
            for n in range(3) for session in sessions))
    finally:
        await store.close()
    assert sum(sizes) == 180
    # One script call per slot at least: a call never spans two slots.
    assert len(sizes) >= len({slot_of(s) for s in sessions})
    assert {(r.event.session, r.event.seq) for r in results} == {
        (s, seq) for s in sessions for seq in (1, 2, 3)}
    for session in sessions:
        stored = await a.read(session, 0, 10)
        assert [(e.seq, e.data) for e in stored] == [(1, {"n": 0}), (2, {"n": 1}), (3, {"n": 2})]
        seen = await watchers[session].wait_for(3)
        assert [e.seq for e in seen] == [1, 2, 3]
    # Each session's keys live on the master that owns its slot, and all three hold some.
    owner = owners(redis_cluster)
    holders: dict[int, int] = {}
    for port in redis_cluster.ports:
        node = sync_redis.Redis(port=port)
        for key in node.scan_iter(match="tether:{spread-*}:log"):
            session = key.decode().split("{")[1].split("}")[0]
            assert owner[slot_of(session)] == port
            holders[port] = holders.get(port, 0) + 1
        node.close()
    assert sorted(holders) == sorted(redis_cluster.ports)
    assert sum(holders.values()) == len(sessions)


async def test_a_slot_moving_away_redirects_appends_and_listeners(
    redis_cluster: RedisCluster, pair: tuple[RedisStore, RedisStore],
) -> None:
    a, b = pair
    session = "moving"
    watcher = Collector()
    b.listen(session, watcher)
    for n in range(5):
        await a.append(session, "message", n, ALICE, key=f"k{n}")
    await watcher.wait_for(5)
    slot = slot_of(session)
    source = owners(redis_cluster)[slot]
    target = next(p for p in redis_cluster.ports if p != source)
    begin_move(slot, source, target)
    finish_move(redis_cluster, slot, source, target)

    # Node a's slot map is stale: its next script call is answered MOVED and resent.
    moved = await a.append(session, "message", 5, ALICE, key="k5")
    assert moved.event.seq == 6 and not moved.duplicate
    again = await a.append(session, "message", 0, ALICE, key="k0")
    assert again.duplicate and again.event.seq == 1  # the idempotency keys moved too
    # Node b's subscription ended with the slot (SUNSUBSCRIBE from the old master); it
    # subscribes on the new one. Events published before that are missed (lossy live
    # channel), so append until one arrives.
    n = 6
    async with asyncio.timeout(10):
        while watcher.events[-1].seq <= 5:
            await a.append(session, "message", n, ALICE)
            n += 1
            with contextlib.suppress(TimeoutError):
                await watcher.wait_for(len(watcher.events) + 1, timeout=0.2)
    stored = await b.read(session, 0, 100)
    assert [e.seq for e in stored] == list(range(1, n + 1))
    seen = [e.seq for e in watcher.events]
    assert seen == sorted(set(seen)) and set(seen) <= set(range(1, n + 1))
    target_node = sync_redis.Redis(port=target)
    assert target_node.xlen(f"tether:{{{session}}}:log") == n


async def test_appends_follow_a_slot_while_it_migrates(
    redis_cluster: RedisCluster, pair: tuple[RedisStore, RedisStore],
) -> None:
    a, b = pair
    session = "asked"
    await a.append(session, "message", "before", ALICE)
    slot = slot_of(session)
    fresh = next(f"fresh-{n}" for n in range(1_000_000) if slot_of(f"fresh-{n}") == slot)
    source = owners(redis_cluster)[slot]
    target = next(p for p in redis_cluster.ports if p != source)
    src = sync_redis.Redis(port=source)
    # One connection, so that ASKING applies to the command after it.
    dst = sync_redis.Redis(port=target, single_connection_client=True)
    begin_move(slot, source, target)

    # The session's keys have moved, the slot not yet: the source answers ASK, and the
    # target runs the script after ASKING.
    keys = src.execute_command("CLUSTER GETKEYSINSLOT", slot, 100)
    src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
    during = await a.append(session, "message", "during", ALICE)
    assert during.event.seq == 2
    dst.execute_command("ASKING")
    assert dst.xlen(f"tether:{{{session}}}:log") == 2

    # A new session in the migrating slot: its keys are on neither master, so the target
    # answers the (multi-key) script TRYAGAIN until the slot has moved; the append waits.
    tried = tryagains(dst)
    pending = asyncio.ensure_future(b.append(fresh, "message", "new", ALICE))
    async with asyncio.timeout(10):
        while tryagains(dst) == tried:
            await asyncio.sleep(0.01)
    assert not pending.done()
    finish_move(redis_cluster, slot, source, target)
    assert (await pending).event.seq == 1
    assert dst.xlen(f"tether:{{{fresh}}}:log") == 1

    after = await b.append(session, "message", "after", ALICE)
    assert after.event.seq == 3
    assert [e.data for e in await a.read(session, 0, 10)] == ["before", "during", "after"]
    src.close()
    dst.close()


def tryagains(node: sync_redis.Redis) -> int:
    """How many TRYAGAIN errors ``node`` has answered."""
    stats = node.info("errorstats")
    return int(stats.get("errorstat_TRYAGAIN", {}).get("count", 0))
