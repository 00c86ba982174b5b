"""The shared store of ``tether serve --workers N`` beyond the contract suite: several clients
on one host, a lost host, a broken client."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tether.protocol.events import Event, Sender
from tether.store import StoreError, open_store
from tether.store.shared import SharedStore, StoreHost

ALICE = Sender("alice", "c1", "human")


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[StoreHost]:
    backend = open_store(f"sqlite://{tmp_path / 'data'}")
    await backend.start()
    host = StoreHost(backend)
    yield host
    await host.close()
    await backend.close()


async def client(host: StoreHost, listen: dict[str, list[Event]] | None = None,
                 **kwargs: object) -> SharedStore:
    """A started client; ``listen``: listeners added before start (session → events)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    await host.serve(theirs)
    store = SharedStore(ours, **kwargs)  # type: ignore[arg-type]
    for session, events in (listen or {}).items():
        store.listen(session, events.append)
    await store.start()
    return store


async def test_every_listening_client_hears_each_commit_once(host: StoreHost) -> None:
    a, b = await client(host), await client(host)
    heard_a: list[Event] = []
    heard_b: list[Event] = []
    both = asyncio.Event()

    def on_b(event: Event) -> None:
        heard_b.append(event)
        if len(heard_b) == 20:
            both.set()

    a.listen("s", heard_a.append)
    b.listen("s", on_b)
    b.listen("s", lambda event: None)  # a second local listener: still one subscription
    await asyncio.gather(*(x.append("s", "message", {"i": i}, ALICE)
                           for i in range(10) for x in (a, b)))
    await asyncio.wait_for(both.wait(), 10)
    assert [e.seq for e in heard_b] == list(range(1, 21))
    assert [e.seq for e in heard_a] == list(range(1, 21))
    b.unlisten("s", on_b)
    # b has one listener left; a read after the append proves the order of the socket.
    await a.append("s", "message", "late", ALICE)
    assert [e.data for e in await b.read("s", 20, 10)] == ["late"]
    assert len(heard_b) == 20
    await a.close()
    await b.close()


async def test_listeners_added_before_start_hear_commits(host: StoreHost) -> None:
    early: list[Event] = []
    store = await client(host, {"s": early})
    await store.append("s", "message", 1, ALICE)
    assert [e.data for e in await store.read("s", 0, 10)] == [1]  # the push came first
    assert [e.data for e in early] == [1]
    await store.close()


async def test_a_lost_host_fails_pending_calls_and_tells_the_worker(host: StoreHost) -> None:
    lost = asyncio.Event()
    store = await client(host, on_lost=lost.set)
    await store.append("s", "message", 1, ALICE)
    pending = store.append_future("s", "message", 2, ALICE)
    await host.close()  # the supervisor is gone
    await asyncio.wait_for(lost.wait(), 10)
    with pytest.raises(StoreError):
        await pending  # committed or not: the worker cannot know, as with a lost Redis reply
    with pytest.raises(StoreError, match="lost"):
        await store.append("s", "message", 3, ALICE)
    await store.close()


async def test_a_broken_client_is_dropped_and_others_keep_working(host: StoreHost) -> None:
    good = await client(host)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    conn = await host.serve(theirs)
    ours.sendall(b"\x00\x00\x00\x05nope!")
    ours.setblocking(False)
    loop = asyncio.get_running_loop()
    assert await asyncio.wait_for(loop.sock_recv(ours, 10), 10) == b""  # closed by the host
    assert conn not in host.connections
    ours.close()
    assert (await good.append("s", "message", "still", ALICE)).event.seq == 1
    await good.close()


async def test_join_presence_sets_the_member_and_lists_everyone(host: StoreHost) -> None:
    a, b = await client(host), await client(host)
    await b.set_presence("s", "bob/c2", {"sub": "bob"}, ttl=30)
    members = await a.join_presence("s", "alice/c1", {"sub": "alice"}, ttl=30)
    assert sorted(m["sub"] for m in members) == ["alice", "bob"]
    assert sorted(m["sub"] for m in await b.presence("s")) == ["alice", "bob"]
    assert await a.join_presence("other", "alice/c1", {"sub": "alice"}, ttl=30) == [
        {"sub": "alice"}]
    await a.close()
    await b.close()
