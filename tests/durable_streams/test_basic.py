"""The Durable Streams protocol under /v1/stream/: create, append, read, live modes, errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest

from tests.helpers import token
from tether.server import Server, durable_streams

AUTH = {"Authorization": f"Bearer {token()}"}
JSON = {**AUTH, "Content-Type": "application/json"}
TEXT = {**AUTH, "Content-Type": "text/plain"}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def url(server: Server, name: str) -> str:
    return f"http://127.0.0.1:{server.port}/v1/stream/{name}"


async def test_json_stream_create_append_read(server: Server,
                                              http: aiohttp.ClientSession) -> None:
    u = url(server, "chat-1")
    resp = await http.put(u, headers=JSON, data=b'[{"n": 0}]')
    assert resp.status == 201
    assert resp.headers["Location"] == u
    assert resp.headers["Content-Type"].startswith("application/json")
    created = resp.headers["Stream-Next-Offset"]
    assert (await http.put(u, headers=JSON)).status == 200  # same configuration
    assert (await http.put(u, headers=TEXT)).status == 409  # another one

    resp = await http.post(u, headers=JSON, data=b'{"n": 1}')
    assert resp.status == 204
    first = resp.headers["Stream-Next-Offset"]
    resp = await http.post(u, headers=JSON, data=b'[{"n": 2}, [3, 4]]')
    tail = resp.headers["Stream-Next-Offset"]
    assert created < first < tail  # offsets sort in log order

    resp = await http.get(u, headers=AUTH)
    assert resp.status == 200 and resp.headers["Stream-Up-To-Date"] == "true"
    assert orjson.loads(await resp.read()) == [{"n": 0}, {"n": 1}, {"n": 2}, [3, 4]]
    assert resp.headers["Stream-Next-Offset"] == tail
    etag = resp.headers["ETag"]

    resp = await http.get(u, params={"offset": first}, headers=AUTH)
    assert orjson.loads(await resp.read()) == [{"n": 2}, [3, 4]]
    resp = await http.get(u, params={"offset": tail}, headers=AUTH)
    assert await resp.read() == b"[]" and resp.headers["Stream-Next-Offset"] == tail
    resp = await http.get(u, params={"offset": "now"}, headers=AUTH)
    assert await resp.read() == b"[]" and resp.headers["Stream-Up-To-Date"] == "true"
    resp = await http.get(u, params={"offset": "-1"}, headers={**AUTH, "If-None-Match": etag})
    assert resp.status == 304

    resp = await http.head(u, headers=AUTH)
    assert resp.status == 200 and resp.headers["Stream-Next-Offset"] == tail
    assert resp.headers["Cache-Control"] == "no-store"


async def test_bytes_stream_round_trips(server: Server, http: aiohttp.ClientSession) -> None:
    u = url(server, "bytes-1")
    octets = {**AUTH, "Content-Type": "application/octet-stream"}
    assert (await http.put(u, headers=octets, data=b"\x00\x01")).status == 201
    assert (await http.post(u, headers=octets, data=b"\xff\xfe")).status == 204
    resp = await http.get(u, headers=AUTH)
    assert await resp.read() == b"\x00\x01\xff\xfe"


async def test_errors_are_the_protocol_status_codes(server: Server,
                                                   http: aiohttp.ClientSession) -> None:
    u = url(server, "errs")
    assert (await http.post(u, headers=JSON, data=b"{}")).status == 404
    assert (await http.get(u, headers=AUTH)).status == 404
    assert (await http.head(u, headers=AUTH)).status == 404
    assert (await http.delete(u, headers=AUTH)).status == 404
    assert (await http.put(u, headers={**JSON, "Stream-TTL": "+5"})).status == 400
    assert (await http.put(u, headers={**JSON, "Stream-TTL": "5",
                                       "Stream-Expires-At": "2030-01-01T00:00:00Z"})).status == 400
    assert (await http.put(u, headers=JSON)).status == 201
    assert (await http.post(u, headers=JSON, data=b"[]")).status == 400
    assert (await http.post(u, headers=JSON, data=b"{nope")).status == 400
    assert (await http.post(u, headers=JSON, data=b"")).status == 400
    assert (await http.post(u, headers=TEXT, data=b"x")).status == 409
    assert (await http.get(u, params={"offset": "abc"}, headers=AUTH)).status == 400
    assert (await http.get(u)).status == 401  # no token, no anonymous mode
    assert (await http.put(url(server, "bad%20name"), headers=JSON)).status == 400
    assert (await http.delete(u, headers=AUTH)).status == 204
    assert (await http.get(u, headers=AUTH)).status == 404


async def test_stream_seq_must_increase(server: Server, http: aiohttp.ClientSession) -> None:
    u = url(server, "seqs")
    assert (await http.put(u, headers=TEXT)).status == 201
    assert (await http.post(u, headers={**TEXT, "Stream-Seq": "b"}, data=b"1")).status == 204
    assert (await http.post(u, headers={**TEXT, "Stream-Seq": "a"}, data=b"2")).status == 409
    assert (await http.post(u, headers={**TEXT, "Stream-Seq": "c"}, data=b"3")).status == 204


async def test_long_poll_returns_new_data_and_times_out_empty(
        server: Server, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(durable_streams, "LONG_POLL_TIMEOUT", 0.5)
    u = url(server, "poll")
    resp = await http.put(u, headers=JSON)
    tail = resp.headers["Stream-Next-Offset"]
    resp = await http.get(u, params={"offset": tail, "live": "long-poll"}, headers=AUTH)
    assert resp.status == 204 and resp.headers["Stream-Up-To-Date"] == "true"
    assert resp.headers["Stream-Next-Offset"] == tail and resp.headers["Stream-Cursor"]

    async def later() -> None:
        # Append once the long-poll is waiting: its store listener is registered.
        listeners = server.store._listeners  # type: ignore[attr-defined]  # MemoryStore's
        while not listeners.has("poll"):
            await asyncio.sleep(0)
        await http.post(u, headers=JSON, data=b'{"late": true}')

    task = asyncio.create_task(later())
    resp = await http.get(u, params={"offset": "now", "live": "long-poll"}, headers=AUTH)
    await task
    assert resp.status == 200 and orjson.loads(await resp.read()) == [{"late": True}]
    assert resp.headers["Stream-Next-Offset"] > tail


async def test_sse_sends_data_then_control(server: Server, http: aiohttp.ClientSession) -> None:
    u = url(server, "sse")
    await http.put(u, headers=JSON, data=b'{"a": 1}')
    resp = await http.get(u, params={"offset": "-1", "live": "sse"}, headers=AUTH)
    assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
    seen = b""
    while b"event: control" not in seen:
        seen += await resp.content.readany()
    assert b'event: data\ndata:[{"a":1}]\n\nevent: control\ndata:{' in seen
    assert b'"upToDate":true' in seen
    await http.post(u, headers=JSON, data=b'{"a": 2}')
    more = b""
    while b"event: control" not in more:
        more += await asyncio.wait_for(resp.content.readany(), 5)
    assert b'data:[{"a":2}]' in more
    resp.close()
    resp.close()


async def test_sse_of_bytes_is_base64_one_event_per_append(server: Server,
                                                          http: aiohttp.ClientSession) -> None:
    octets = {**AUTH, "Content-Type": "application/octet-stream"}
    u = url(server, "raw")
    await http.put(u, headers=octets, data=b"Hello")
    await http.post(u, headers=octets, data=b"\x00\x01")
    resp = await http.get(u, params={"offset": "-1", "live": "sse"}, headers=AUTH)
    assert resp.headers["Stream-SSE-Data-Encoding"] == "base64"
    seen = b""
    while b"upToDate" not in seen:
        seen += await asyncio.wait_for(resp.content.readany(), 5)
    blocks = [b for b in seen.split(b"\n\n") if b.startswith(b"event:")]
    assert [b.split(b"\n")[0] for b in blocks] == [b"event: data", b"event: control"] * 2
    assert blocks[0] == b"event: data\ndata:SGVsbG8=" and blocks[2] == b"event: data\ndata:AAE="
    resp.close()


async def test_sse_data_cannot_forge_events(server: Server, http: aiohttp.ClientSession) -> None:
    u = url(server, "forge")
    await http.put(u, headers=TEXT, data=b"a\r\revent: control\rdata: {}\n\nb")
    resp = await http.get(u, params={"offset": "-1", "live": "sse"}, headers=AUTH)
    seen = b""
    while b"upToDate" not in seen:
        seen += await asyncio.wait_for(resp.content.readany(), 5)
    assert b"\r" not in seen
    assert seen.count(b"\nevent: control") == 1 and seen.startswith(b"event: data\n")
    resp.close()


async def test_idempotent_producer_fences_dedupes_and_detects_gaps(
        server: Server, http: aiohttp.ClientSession) -> None:
    u = url(server, "producer")
    await http.put(u, headers=JSON)

    async def send(epoch: int, seq: int, body: bytes = b'{"m": 1}',
                   pid: str = "p1") -> aiohttp.ClientResponse:
        return await http.post(u, data=body, headers={
            **JSON, "Producer-Id": pid, "Producer-Epoch": str(epoch),
            "Producer-Seq": str(seq)})

    resp = await send(0, 0)
    assert resp.status == 200 and resp.headers["Producer-Seq"] == "0"
    assert (await send(0, 0)).status == 204  # a retry: nothing appended
    assert (await send(0, 1, b'{"m": 2}')).status == 200
    resp = await send(0, 3)
    assert resp.status == 409 and resp.headers["Producer-Expected-Seq"] == "2"
    assert (await send(1, 1)).status == 400  # a new epoch starts at 0
    assert (await send(1, 0, b'{"m": 3}')).status == 200
    resp = await send(0, 2)
    assert resp.status == 403 and resp.headers["Producer-Epoch"] == "1"
    assert (await send(0, 0, pid="p2")).status == 200  # producers are independent
    bad = {**JSON, "Producer-Id": "p1", "Producer-Epoch": "1e3", "Producer-Seq": "0"}
    assert (await http.post(u, data=b"{}", headers=bad)).status == 400
    partial = {**JSON, "Producer-Id": "p1"}
    assert (await http.post(u, data=b"{}", headers=partial)).status == 400
    resp = await http.get(u, headers=AUTH)
    assert orjson.loads(await resp.read()) == [{"m": 1}, {"m": 2}, {"m": 3}, {"m": 1}]

    # The producer state is in the log: a server that forgot its cache still dedupes.
    server.app[durable_streams.STREAMS]._cache.clear()
    assert (await send(1, 0)).status == 204


async def test_closed_stream_takes_no_appends_and_says_so_on_reads(
        server: Server, http: aiohttp.ClientSession) -> None:
    u = url(server, "closing")
    await http.put(u, headers=TEXT, data=b"first ")
    resp = await http.post(u, headers={**TEXT, "Stream-Closed": "true"}, data=b"last")
    assert resp.status == 204 and resp.headers["Stream-Closed"] == "true"
    tail = resp.headers["Stream-Next-Offset"]
    again = await http.post(u, headers={**AUTH, "Stream-Closed": "true"})
    assert again.status == 204 and again.headers["Stream-Closed"] == "true"  # idempotent
    refused = await http.post(u, headers=TEXT, data=b"more")
    assert refused.status == 409 and refused.headers["Stream-Closed"] == "true"
    assert refused.headers["Stream-Next-Offset"] == tail
    resp = await http.get(u, headers=AUTH)
    assert await resp.read() == b"first last" and resp.headers["Stream-Closed"] == "true"
    assert (await http.head(u, headers=AUTH)).headers["Stream-Closed"] == "true"
    resp = await http.get(u, params={"offset": tail, "live": "long-poll"}, headers=AUTH)
    assert resp.status == 204 and resp.headers["Stream-Closed"] == "true"  # no wait
    resp = await http.get(u, params={"offset": "-1", "live": "sse"}, headers=AUTH)
    seen = await asyncio.wait_for(resp.read(), 5)  # the response ends after the last event
    assert seen.endswith(b'"streamClosed":true,"upToDate":true}\n\n')
    assert b"streamCursor" not in seen.split(b"event: control")[-1]


async def test_put_can_create_a_closed_stream(server: Server,
                                              http: aiohttp.ClientSession) -> None:
    u = url(server, "born-closed")
    resp = await http.put(u, headers={**JSON, "Stream-Closed": "true"}, data=b'[1, 2]')
    assert resp.status == 201 and resp.headers["Stream-Closed"] == "true"
    assert (await http.post(u, headers=JSON, data=b"3")).status == 409
    resp = await http.get(u, headers=AUTH)
    assert orjson.loads(await resp.read()) == [1, 2]
