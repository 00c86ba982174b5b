"""Property tests: any interleaving of appends with and without idempotency keys, across
sessions and senders, yields gapless seqs in commit order and appends each key once — in
process (memory, sqlite), through the shared store of ``tether serve --workers N``, and on a
Redis Cluster (sessions spread over its masters, so a flush commits on several at once)."""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import RedisCluster
from tests.store.conftest import open_shared
from tether.protocol.events import Event, Sender
from tether.store import Store, open_store
from tether.store.redis import RedisStore

ops = st.lists(
    st.tuples(st.sampled_from(["a", "b", "c"]),          # session
              st.sampled_from(["alice", "bob"]),         # sender
              st.one_of(st.none(), st.sampled_from(["k1", "k2", "k3"])),  # key
              st.booleans()),                            # await now, or in the next batch
    min_size=1, max_size=40)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops, st.sampled_from(["memory", "sqlite", "shared"]))
def test_appends_are_gapless_and_keys_dedupe(script: list[tuple[str, str, str | None, bool]],
                                             kind: str) -> None:
    async def run() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            if kind == "shared":
                store: Store = await open_shared(Path(tmp))
            else:
                store = open_store("memory://" if kind == "memory" else f"sqlite://{tmp}")
                await store.start()
            await check(store, script)

    asyncio.run(run())


@pytest.mark.redis
@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(ops)
def test_appends_are_gapless_and_keys_dedupe_on_a_redis_cluster(
        redis_cluster: RedisCluster, script: list[tuple[str, str, str | None, bool]]) -> None:
    async def run() -> None:
        # A prefix of its own per example stands in for flushing the cluster.
        store = RedisStore(redis_cluster.url, prefix=f"p{uuid.uuid4().hex}")
        await store.start()
        await check(store, script)

    asyncio.run(run())


async def check(store: Store, script: list[tuple[str, str, str | None, bool]]) -> None:
    """Run ``script`` on a started ``store``, check its logs and listeners, close it."""
    seen: dict[str, list[Event]] = {"a": [], "b": [], "c": []}
    arrived = asyncio.Event()

    def listener(event: Event) -> None:
        seen[event.session].append(event)
        arrived.set()

    for session in seen:
        store.listen(session, listener)
    first_seq: dict[tuple[str, str, str], int] = {}
    pending = []
    for i, (session, sub, key, flush) in enumerate(script):
        pending.append((session, sub, key, asyncio.ensure_future(
            store.append(session, "message", i, Sender(sub), key))))
        if flush:
            for p_session, p_sub, p_key, fut in pending:
                result = await fut
                if p_key is not None:
                    scope = (p_session, p_sub, p_key)
                    if scope in first_seq:
                        assert result.duplicate
                        assert result.event.seq == first_seq[scope]
                    else:
                        first_seq[scope] = result.event.seq
            pending.clear()
    await asyncio.gather(*(fut for *_, fut in pending))
    for session, events in seen.items():
        stored = await store.read(session, 0, 1000)
        assert [e.seq for e in stored] == list(range(1, len(stored) + 1))
        # Pub/sub (Redis) delivers after the append's reply: wait for the rest.
        async with asyncio.timeout(10):
            while len(events) < len(stored):
                arrived.clear()
                await arrived.wait()
        assert [e.seq for e in events] == [e.seq for e in stored]
        keyed = {(sub, k) for s, sub, k, _ in script if s == session and k is not None}
        unkeyed = sum(1 for s, _, k, _ in script if s == session and k is None)
        assert len(stored) == unkeyed + len(keyed)
    await store.close()
