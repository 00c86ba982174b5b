"""Redis-only behaviour: several nodes on one Redis, batching, durability, failures."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import redis as sync_redis

from tests.conftest import free_port, wait_for_port
from tether.protocol.events import Event, Sender
from tether.store import Retention, StoreError, StreamClosedError
from tether.store.redis import FLUSH_CONNECTIONS, RedisStore

pytestmark = pytest.mark.redis

ALICE = Sender("alice", "c1", "human")
BOB = Sender("bob", "c2", "agent")


class Collector:
    """A listener that lets a test wait for a number of events instead of sleeping."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._changed = asyncio.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        self._changed.set()

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Event]:
        async def until() -> None:
            while len(self.events) < count:
                self._changed.clear()
                await self._changed.wait()
        await asyncio.wait_for(until(), timeout)
        return self.events


async def open_node(url: str, retention: Retention | None = None, *,
                    on_batch: Callable[[int], None] | None = None,
                    prefix: str = "tether") -> RedisStore:
    store = RedisStore(url, retention, on_batch=on_batch, prefix=prefix)
    await store.start()
    return store


@pytest.fixture(params=["redis", "redis-cluster"])
async def nodes(request: pytest.FixtureRequest) -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    """Two nodes on one Redis, or on one Redis Cluster."""
    url = request.getfixturevalue("redis_url" if request.param == "redis"
                                  else "redis_cluster_url")
    a = await open_node(url)
    b = await open_node(url)
    yield a, b
    await a.close()
    await b.close()


class PrivateRedis:
    """A redis-server of the test's own, which it may stop and restart on the same port."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        self.binary = binary
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="tether-redis-private-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    yield server
    server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)


# -- several nodes -------------------------------------------------------------------------


async def test_append_on_one_node_reaches_listeners_on_both_in_order(
    nodes: tuple[RedisStore, RedisStore],
) -> None:
    a, b = nodes
    on_a, on_b = Collector(), Collector()
    a.listen("s1", on_a)
    b.listen("s1", on_b)
    sequential = [await a.append("s1", "message", {"i": i}, ALICE) for i in range(20)]
    concurrent = await asyncio.gather(
        *(a.append("s1", "message", {"i": i}, ALICE) for i in range(20, 120)))
    appended = [r.event for r in sequential + list(concurrent)]
    seen_b = await on_b.wait_for(120)
    seen_a = await on_a.wait_for(120)
    assert [e.seq for e in seen_b] == list(range(1, 121))
    assert [(e.seq, e.data) for e in seen_b] == [(e.seq, e.data) for e in seen_a]
    assert sorted((e.seq, e.data["i"]) for e in appended) == [(e.seq, e.data["i"])
                                                              for e in seen_b]
    assert {e.epoch for e in seen_b} == {appended[0].epoch}
    assert seen_b[0].sender == ALICE and not seen_b[0].transient
    assert (await a.head("s1")) == (await b.head("s1"))


async def test_both_nodes_share_one_gapless_log(nodes: tuple[RedisStore, RedisStore]) -> None:
    a, b = nodes
    watcher = Collector()
    b.listen("s1", watcher)
    results = await asyncio.gather(
        *(node.append("s1", "message", {"n": i}, ALICE)
          for i in range(100) for node in (a, b)))
    assert sorted(r.event.seq for r in results) == list(range(1, 201))
    seen = await watcher.wait_for(200)
    assert [e.seq for e in seen] == list(range(1, 201))
    assert [e.data for e in await a.read("s1", 0, 500)] == [e.data for e in seen]


async def test_transient_events_cross_nodes(nodes: tuple[RedisStore, RedisStore]) -> None:
    a, b = nodes
    watcher = Collector()
    b.listen("s1", watcher)
    head = await a.head("s1")
    await a.publish_transient(
        Event("s1", head.epoch, 0, "typing", {"on": True}, BOB, 123, transient=True))
    (event,) = await watcher.wait_for(1)
    assert event.transient and event.seq == 0 and event.data == {"on": True}
    assert event.sender == BOB and event.epoch == head.epoch
    assert await b.read("s1", 0, 10) == []


async def test_stream_text_and_idempotency_live_in_redis_not_in_a_node(
    nodes: tuple[RedisStore, RedisStore],
) -> None:
    a, b = nodes
    deltas = ["日本", "語 ", "🎉\n", '"quoted" \\ ', "\u2028", ""]
    for i, text in enumerate(deltas):
        await (a if i % 2 else b).append(
            "s1", "stream.append", {"stream": "m1", "text": text}, BOB)
    end = await a.append("s1", "stream.end", {"stream": "m1", "n": 1}, BOB)
    assert end.event.data == {"stream": "m1", "n": 1, "text": "".join(deltas)}
    assert end.event.data["text"].encode() == "".join(deltas).encode()
    with pytest.raises(StreamClosedError):
        await b.append("s1", "stream.append", {"stream": "m1", "text": "x"}, BOB)

    first = await a.append("s1", "message", {"hi": 1}, ALICE, key="k")
    again = await b.append("s1", "message", {"other": 2}, ALICE, key="k")
    assert again.duplicate and again.event.seq == first.event.seq
    assert again.event.data == {"hi": 1} and again.event.time == first.event.time


async def test_mixed_batch_outcomes_keep_seqs_straight(redis_url: str) -> None:
    store = await open_node(redis_url)
    try:
        await store.append("s1", "stream.end", {"stream": "done"}, ALICE)
        ops = [
            store.append("s1", "message", 1, ALICE),
            store.append("s1", "stream.append", {"stream": "done", "text": "x"}, ALICE),
            store.append("s1", "message", 2, ALICE, key="k"),
            store.append("s1", "stream.append", {"stream": "m", "text": "a"}, ALICE),
            store.append("s1", "message", 3, ALICE, key="k"),
            store.append("s1", "stream.end", {"stream": "m"}, ALICE),
            store.append("s2", "message", 4, ALICE),
            store.append("s1", "message", 5, ALICE),
        ]
        results = await asyncio.gather(*ops, return_exceptions=True)
        assert isinstance(results[1], StreamClosedError)
        committed = [r for r in results if not isinstance(r, BaseException)]
        assert [(r.event.session, r.event.seq, r.duplicate) for r in committed] == [
            ("s1", 2, False), ("s1", 3, False), ("s1", 4, False), ("s1", 3, True),
            ("s1", 5, False), ("s2", 1, False), ("s1", 6, False)]
        assert committed[4].event.data == {"stream": "m", "text": "a"}
        stored = await store.read("s1", 0, 10)
        assert [e.data for e in stored] == [
            {"stream": "done", "text": ""}, 1, 2, {"stream": "m", "text": "a"},
            {"stream": "m", "text": "a"}, 5]
    finally:
        await store.close()


async def test_presence_is_shared_by_nodes(nodes: tuple[RedisStore, RedisStore]) -> None:
    a, b = nodes
    await a.set_presence("s1", "alice/c1", {"sub": "alice", "n": "é"}, ttl=30)
    await b.set_presence("s1", "bob/c2", {"sub": "bob"}, ttl=0.05)
    assert sorted(m["sub"] for m in await b.presence("s1")) == ["alice", "bob"]

    async def bob_gone() -> None:
        while len(await a.presence("s1")) != 1:
            await asyncio.sleep(0.01)
    await asyncio.wait_for(bob_gone(), 5)
    assert await b.presence("s1") == [{"sub": "alice", "n": "é"}]
    await b.clear_presence("s1", "alice/c1")
    assert await a.presence("s1") == []


# -- batching ------------------------------------------------------------------------------


async def test_appends_of_one_tick_share_one_script_call(redis_url: str) -> None:
    sizes: list[int] = []
    store = await open_node(redis_url, on_batch=sizes.append)
    try:
        await asyncio.gather(*(store.append("s1", "message", i, ALICE) for i in range(200)))
        assert sum(sizes) == 200
        assert len(sizes) == 1  # one session cannot be split across flushers
        sizes.clear()
        await asyncio.gather(*(store.append(f"many-{i}", "message", i, ALICE)
                               for i in range(60)))
        assert sum(sizes) == 60
        assert len(sizes) <= FLUSH_CONNECTIONS
        sizes.clear()
        for i in range(3):
            await store.append("s1", "message", i, ALICE)
        assert sizes == [1, 1, 1]
    finally:
        await store.close()


async def test_a_busy_session_batches_up_behind_its_flight(redis_url: str) -> None:
    sizes: list[int] = []
    store = await open_node(redis_url, on_batch=sizes.append)
    try:
        first = asyncio.ensure_future(store.append("s1", "message", 0, ALICE))
        await asyncio.sleep(0)  # the flusher takes the first append alone
        rest = [asyncio.ensure_future(store.append("s1", "message", i, ALICE))
                for i in range(1, 50)]
        results = await asyncio.gather(first, *rest)
        assert [r.event.seq for r in results] == list(range(1, 51))
        assert sum(sizes) == 50 and len(sizes) < 50
    finally:
        await store.close()


# -- durability and key layout -------------------------------------------------------------


async def test_log_survives_close_and_reopen(redis_url: str) -> None:
    store = await open_node(redis_url)
    await store.append("s1", "message", {"a": 1}, ALICE, key="k1")
    await store.append("s1", "stream.append", {"stream": "m", "text": "ab"}, BOB)
    await store.append("s1", "stream.end", {"stream": "m"}, BOB)
    head = await store.head("s1")
    await store.close()

    store = await open_node(redis_url)
    try:
        assert await store.head("s1") == head
        events = await store.read("s1", 0, 10)
        assert [e.data for e in events] == [
            {"a": 1}, {"stream": "m", "text": "ab"}, {"stream": "m", "text": "ab"}]
        assert [e.sender for e in events] == [ALICE, BOB, BOB]
        assert all(e.epoch == head.epoch and e.time > 0 for e in events)
        again = await store.append("s1", "message", {"a": 1}, ALICE, key="k1")
        assert again.duplicate and again.event.seq == 1
        with pytest.raises(StreamClosedError):
            await store.append("s1", "stream.end", {"stream": "m"}, BOB)
        appended = await store.append("s1", "message", "next", ALICE)
        assert appended.event.seq == head.last_seq + 1
    finally:
        await store.close()


async def test_close_flushes_pending_appends(redis_url: str) -> None:
    store = await open_node(redis_url)
    pending = [asyncio.ensure_future(store.append("s1", "message", i, ALICE))
               for i in range(10)]
    await asyncio.sleep(0)  # the appends are queued, not yet committed
    await store.close()
    assert [f.result().event.seq for f in pending] == list(range(1, 11))
    with pytest.raises(StoreError):
        await store.append("s1", "message", "late", ALICE)


async def test_key_layout_uses_a_hash_tag_per_session(redis_url: str) -> None:
    store = await open_node(redis_url, prefix="tt")
    try:
        await store.append("chat:42", "message", "x", ALICE, key="k")
        await store.append("chat:42", "stream.append", {"stream": "m", "text": "t"}, ALICE)
        await store.set_presence("chat:42", "alice/c1", {"sub": "alice"}, ttl=30)
    finally:
        await store.close()
    client = sync_redis.Redis.from_url(redis_url)
    keys = set(client.keys("*"))
    assert keys == {b"tt:sessions", b"tt:{chat:42}:meta", b"tt:{chat:42}:log",
                    b"tt:{chat:42}:i:5:alice:k", b"tt:{chat:42}:st:m",
                    b"tt:{chat:42}:pz", b"tt:{chat:42}:pi"}
    entries = client.xrange("tt:{chat:42}:log") or []
    assert [entry_id for entry_id, _ in entries] == [b"1-0", b"2-0"]
    assert client.hget("tt:{chat:42}:meta", "seq") == b"2"
    assert client.smembers("tt:sessions") == {b"chat:42"}
    assert 0 < client.pttl("tt:{chat:42}:i:5:alice:k") <= 3600 * 1000


async def test_prefixes_isolate_deployments(redis_url: str) -> None:
    one = await open_node(redis_url, prefix="one")
    two = await open_node(redis_url, prefix="two")
    try:
        await one.append("s1", "message", "x", ALICE)
        assert (await two.head("s1")).last_seq == 0
        assert await two.read("s1", 0, 10) == []
    finally:
        await one.close()
        await two.close()


async def test_trim_applies_retention_across_sessions(redis_url: str) -> None:
    store = await open_node(redis_url, retention=Retention(max_events=5))
    try:
        for session in ("a", "b", "c"):
            await asyncio.gather(*(store.append(session, "message", i, ALICE)
                                   for i in range(20)))
        assert await store.trim() == 45
        assert await store.trim() == 0
        for session in ("a", "b", "c"):
            head = await store.head(session)
            assert (head.first_seq, head.last_seq) == (16, 20)
            assert [e.seq for e in await store.read(session, 0, 100)] == list(range(16, 21))
    finally:
        await store.close()


async def test_lost_scripts_are_reloaded(redis_url: str) -> None:
    store = await open_node(redis_url)
    try:
        await store.append("s1", "message", 1, ALICE)
        sync_redis.Redis.from_url(redis_url).script_flush()
        assert (await store.append("s1", "message", 2, ALICE)).event.seq == 2
        sync_redis.Redis.from_url(redis_url).script_flush()
        assert [e.data for e in await store.read("s1", 0, 10)] == [1, 2]
        assert (await store.head("s1")).last_seq == 2
    finally:
        await store.close()


async def test_a_failing_listener_does_not_stop_delivery(redis_url: str) -> None:
    store = await open_node(redis_url)
    try:
        def broken(event: Event) -> None:
            raise RuntimeError("listener bug")

        watcher = Collector()
        store.listen("s1", watcher)
        store.listen("s1", broken)
        for i in range(3):
            await store.append("s1", "message", i, ALICE)
        assert [e.data for e in await watcher.wait_for(3)] == [0, 1, 2]
    finally:
        await store.close()


async def test_unlisten_then_listen_again(redis_url: str) -> None:
    store = await open_node(redis_url)
    try:
        first, second = Collector(), Collector()
        store.listen("s1", first)
        await store.append("s1", "message", 1, ALICE)
        await first.wait_for(1)
        store.unlisten("s1", first)
        store.listen("s1", second)
        await store.append("s1", "message", 2, ALICE)
        assert [e.seq for e in await second.wait_for(1)] == [2]
        assert [e.seq for e in first.events] == [1]
    finally:
        await store.close()


# -- failures ------------------------------------------------------------------------------


async def test_unreachable_server_is_a_store_error() -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(StoreError):
        await store.start()
    await store.close()


async def test_server_going_away_is_a_store_error(private_redis: PrivateRedis) -> None:
    store = await open_node(private_redis.url)
    try:
        await store.append("s1", "message", 1, ALICE)
        private_redis.stop()
        with pytest.raises(StoreError):
            await store.append("s1", "message", 2, ALICE)
        with pytest.raises(StoreError):
            await store.read("s1", 0, 10)
        with pytest.raises(StoreError):
            await store.head("s1")
        with pytest.raises(StoreError):
            await store.presence("s1")
    finally:
        await store.close()


async def test_pubsub_resubscribes_after_a_restart(private_redis: PrivateRedis) -> None:
    store = await open_node(private_redis.url)
    try:
        watcher = Collector()
        store.listen("s1", watcher)
        await store.append("s1", "message", "before", ALICE)
        await watcher.wait_for(1)
        private_redis.stop()
        private_redis.start()  # same port, empty data

        # Pub/sub is at-most-once across the outage: probe until delivery resumes.
        async def probe() -> None:
            while not any(e.data == "after" for e in watcher.events):
                # Appends fail while the server is down; the flushers reconnect on next use.
                with contextlib.suppress(StoreError):
                    await store.append("s1", "message", "after", ALICE)
                with contextlib.suppress(TimeoutError):
                    await watcher.wait_for(len(watcher.events) + 1, timeout=0.2)
        await asyncio.wait_for(probe(), 15)
        after = [e for e in watcher.events if e.data == "after"]
        assert after[0].epoch != watcher.events[0].epoch  # the log was lost with the data
    finally:
        await store.close()


async def test_appends_reconnect_after_a_restart(private_redis: PrivateRedis) -> None:
    store = await open_node(private_redis.url)
    try:
        before = await store.append("s1", "message", 1, ALICE)
        private_redis.stop()
        private_redis.start()  # same port, empty data, no scripts
        after = await store.append("s1", "message", 2, ALICE)
        assert after.event.seq == 1 and after.event.epoch != before.event.epoch
        assert [e.data for e in await store.read("s1", 0, 10)] == [2]
    finally:
        await store.close()
