"""Forks, sliding TTL, CORS and anonymous access of the Durable Streams transport, on every
store (memory, SQLite, a real redis-server)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.helpers import SECRET, token
from tether.server import Server, ServerConfig, durable_streams
from tether.server.forks import Segment, inherited
from tether.store.base import SessionStore

AUTH = {"Authorization": f"Bearer {token()}"}
TEXT = {**AUTH, "Content-Type": "text/plain"}
JSON = {**AUTH, "Content-Type": "application/json"}


@pytest.fixture
async def ds(store: SessionStore, tmp_path: Path) -> AsyncIterator[tuple[Server, str]]:
    config = ServerConfig(port=0, secret=SECRET, data_dir=tmp_path, heartbeat=5)
    srv = Server(config, store=store)
    await srv.start()
    yield srv, f"http://127.0.0.1:{srv.port}/v1/stream"
    await srv.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def text(http: aiohttp.ClientSession, url: str, offset: str = "-1") -> str:
    async with http.get(url, params={"offset": offset}, headers=AUTH) as resp:
        assert resp.status == 200
        return await resp.text()


async def test_a_fork_reads_its_source_then_its_own_events(
        ds: tuple[Server, str], http: aiohttp.ClientSession) -> None:
    _, base = ds
    resp = await http.put(f"{base}/src", headers=TEXT, data=b"A")
    at_a = resp.headers["Stream-Next-Offset"]
    await http.post(f"{base}/src", headers=TEXT, data=b"B")
    resp = await http.put(f"{base}/fork", headers={
        **TEXT, "Stream-Forked-From": "/v1/stream/src", "Stream-Fork-Offset": at_a})
    assert resp.status == 201 and "Stream-Forked-From" not in resp.headers
    assert resp.headers["Stream-Next-Offset"] == at_a  # positions continue at the branch
    resp = await http.post(f"{base}/fork", headers=TEXT, data=b"C")
    own = resp.headers["Stream-Next-Offset"]
    assert own > at_a
    await http.post(f"{base}/src", headers=TEXT, data=b"D")  # after the fork: not in it
    assert await text(http, f"{base}/fork") == "AC"
    assert await text(http, f"{base}/fork", at_a) == "C"  # an offset of the source still works
    assert await text(http, f"{base}/src") == "ABD"

    # A fork of the fork, inside a binary append (sub-offset): "A" + the first byte of "C".
    resp = await http.put(f"{base}/fork2", headers={
        **TEXT, "Stream-Forked-From": "/v1/stream/fork", "Stream-Fork-Offset": at_a,
        "Stream-Fork-Sub-Offset": "1"})
    assert resp.status == 201
    assert await text(http, f"{base}/fork2") == "AC"
    same = {**TEXT, "Stream-Forked-From": "/v1/stream/fork", "Stream-Fork-Offset": at_a}
    assert (await http.put(f"{base}/fork2", headers=same)).status == 409  # another sub-offset


async def test_a_deleted_source_stays_readable_by_its_forks_until_the_last_goes(
        ds: tuple[Server, str], http: aiohttp.ClientSession) -> None:
    srv, base = ds
    await http.put(f"{base}/s", headers=JSON, data=b'[{"n": 1}, {"n": 2}, {"n": 3}]')
    resp = await http.put(f"{base}/f", headers={
        **JSON, "Stream-Forked-From": "/v1/stream/s",
        "Stream-Fork-Offset": "0000000000000000_0000000000000000",
        "Stream-Fork-Sub-Offset": "2"})
    assert resp.status == 201
    assert orjson.loads(await text(http, f"{base}/f")) == [{"n": 1}, {"n": 2}]
    assert (await http.delete(f"{base}/s", headers=AUTH)).status == 204
    assert (await http.head(f"{base}/s", headers=AUTH)).status == 410
    assert (await http.put(f"{base}/s", headers=JSON)).status == 409  # not re-creatable yet
    srv.app[durable_streams.STREAMS]._cache.clear()  # the state is the log's, not the cache's
    assert orjson.loads(await text(http, f"{base}/f")) == [{"n": 1}, {"n": 2}]
    assert (await http.delete(f"{base}/f", headers=AUTH)).status == 204
    assert (await http.head(f"{base}/s", headers=AUTH)).status == 404  # released with it
    assert (await http.put(f"{base}/s", headers=JSON)).status == 201


async def test_cors_preflight_allows_the_protocol_headers(
        ds: tuple[Server, str], http: aiohttp.ClientSession) -> None:
    _, base = ds
    resp = await http.options(f"{base}/any", headers={
        "Origin": "https://example.com", "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "if-none-match"})
    assert resp.status == 204 and resp.headers["Access-Control-Allow-Origin"] == "*"
    assert "If-None-Match" in resp.headers["Access-Control-Allow-Headers"]
    resp = await http.put(f"{base}/cors", headers=TEXT)
    assert "Stream-Next-Offset" in resp.headers["Access-Control-Expose-Headers"]


def test_a_ttl_slides_with_the_last_access() -> None:
    created = int(time.time() * 1000) - 10_000  # ten seconds ago
    meta = durable_streams.Meta("text/plain", 5, None, 1, created, written_ms=created)
    assert meta.expired()
    assert not meta.expired(touched=time.time() - 1)  # read a second ago
    assert not durable_streams.Meta("text/plain", 5, None, 1, created,
                                    written_ms=created + 9_000).expired()


def test_offsets_are_two_halves_of_one_number() -> None:
    assert durable_streams.offset_of(42) == "0000000000000000_0000000000000042"
    assert durable_streams.parse_offset("0000000000000001_0000000000000000") == 10**16
    assert durable_streams.parse_offset("0000000000000042") == 42  # the earlier form
    assert durable_streams.parse_offset("42") is None
    chain = (Segment("a", 0, 1, None),)
    assert inherited(chain, 0) == ()  # forking before the first event inherits nothing
    assert inherited(chain, 7) == (Segment("a", 0, 1, 7),)


async def test_anonymous_rules_apply_on_loopback_only(tmp_path: Path) -> None:
    rules = ("pub-*=subscribe",)
    ServerConfig(host="127.0.0.1", anonymous=rules).check_anonymous()
    with pytest.raises(ValueError, match="anonymous-public"):
        ServerConfig(host="0.0.0.0", anonymous=rules).check_anonymous()
    ServerConfig(host="0.0.0.0", anonymous=rules, anonymous_public=True).check_anonymous()
    with pytest.raises(ValueError, match="admin"):
        ServerConfig(anonymous=("*=admin",)).check_anonymous()

    config = ServerConfig(port=0, secret=SECRET, data_dir=tmp_path, anonymous=rules)
    srv = Server(config)
    await srv.start()
    base = f"http://127.0.0.1:{srv.port}/v1/stream"
    try:
        async with aiohttp.ClientSession() as http:
            await http.put(f"{base}/pub-1", headers=TEXT, data=b"hi")
            assert await (await http.get(f"{base}/pub-1")).text() == "hi"  # no token
            assert (await http.post(f"{base}/pub-1", data=b"x",
                                    headers={"Content-Type": "text/plain"})).status == 403
            assert (await http.get(f"{base}/other")).status == 401  # no rule matches
            bad = {"Authorization": "Bearer nonsense"}
            assert (await http.get(f"{base}/pub-1", headers=bad)).status == 401
    finally:
        await srv.stop()


def test_serve_refuses_anonymous_on_a_public_address(tmp_path: Path) -> None:
    import subprocess
    import sys

    # Refused before binding anything: the port is never opened.
    done = subprocess.run([sys.executable, "-m", "tether", "serve", "--host", "0.0.0.0",
                           "--port", "1", "--data", str(tmp_path), "--agent", "none",
                           "--anonymous", "*=subscribe"], capture_output=True, timeout=60,
                          check=False)
    assert done.returncode != 0 and b"--anonymous-public" in done.stderr


async def test_a_writer_needs_publish_only(ds: tuple[Server, str],
                                           http: aiohttp.ClientSession) -> None:
    _, base = ds
    writer = {"Authorization": f"Bearer {token(caps=['publish'])}",
              "Content-Type": "application/json"}
    assert (await http.put(f"{base}/w", headers=writer)).status == 201
    resp = await http.post(f"{base}/w", headers={
        **writer, "Producer-Id": "p", "Producer-Epoch": "0", "Producer-Seq": "0"}, data=b"1")
    assert resp.status == 200
    assert (await http.get(f"{base}/w", headers=writer)).status == 403  # reading is not


def test_a_second_creation_of_a_live_stream_does_not_hide_the_first() -> None:
    from tether.protocol.events import SYSTEM, Event

    now = int(time.time() * 1000)

    def record(seq: int, type: str, data: object) -> Event:
        return Event("s", "e", seq, type, data, SYSTEM, now)

    config = {"content_type": "text/plain", "ttl": None, "expires_at": None}
    meta, producers = durable_streams._fold("s", None, {}, record(1, "ds.create", config))
    meta, producers = durable_streams._fold("s", meta, producers,
                                            record(2, "ds.bytes", {"b64": "YQ=="}))
    # Another worker saw no stream at the same moment and created it too.
    meta, producers = durable_streams._fold("s", meta, producers, record(3, "ds.create", config))
    assert meta is not None and meta.created_seq == 1  # the data at seq 2 stays in the stream
    meta, producers = durable_streams._fold("s", meta, producers, record(4, "ds.delete", None))
    meta, producers = durable_streams._fold("s", meta, producers, record(5, "ds.create", config))
    assert meta is not None and meta.created_seq == 5  # after a delete: a new stream


async def test_a_live_reader_takes_new_events_from_its_watch_not_the_store(
        ds: tuple[Server, str], http: aiohttp.ClientSession) -> None:
    srv, base = ds
    streams = srv.app[durable_streams.STREAMS]
    reads: list[str] = []
    read_log = streams._read_log

    async def counting(session: str, after: int, limit: int) -> tuple[list[Any], int]:
        reads.append(session)
        return await read_log(session, after, limit)

    streams._read_log = counting  # type: ignore[method-assign]
    await http.put(f"{base}/live", headers=JSON)
    resp = await http.get(f"{base}/live", params={"offset": "-1", "live": "sse"}, headers=AUTH)
    seen = b""
    while b"upToDate" not in seen:
        seen += await asyncio.wait_for(resp.content.readany(), 5)
    before = len(reads)
    for n in range(3):
        await http.post(f"{base}/live", headers=JSON, data=orjson.dumps({"n": n}))
        more = b""
        while f'"n":{n}'.encode() not in more:
            more += await asyncio.wait_for(resp.content.readany(), 5)
    resp.close()
    assert len(reads) == before  # every append reached the reader without a read of the log
