"""The Durable Streams protocol (``PROTOCOL.md`` 1.0 of durable-streams) under ``/v1/stream/``.

A stream is a session log (``docs/durable-streams.md`` has the whole mapping): ``PUT`` writes a
``ds.create`` event holding the stream's configuration, each JSON message is one
``ds.message`` event, each append of another content type one ``ds.bytes`` event, ``DELETE``
writes ``ds.delete``. An offset is the seq of the last event covered, as 16 decimal digits, so
offsets sort lexicographically in log order.

Like every transport this is a thin layer over :class:`~tether.server.sessions.SessionService`:
writes go through ``publish`` (capability, limits, validation, commit) and reads through
``history``. Long-poll and SSE wait on the store's listener, registered before reading.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import ipaddress
import math
import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from tether.protocol.codes import ErrorCode, RequestError
from tether.protocol.cursor import Cursor
from tether.protocol.events import Event, Sender, valid_session_id
from tether.server.auth import Grant
from tether.server.http import bearer_token
from tether.server.keys import AUTH, CONFIG, SESSIONS
from tether.server.sessions import Caller, SessionService

CREATE = "ds.create"
DELETE = "ds.delete"
MESSAGE = "ds.message"
BYTES = "ds.bytes"
PRODUCER = "ds.producer"
CLOSE = "ds.close"
DATA_TYPES = frozenset({MESSAGE, BYTES})
MAX_SAFE_INT = 2**53 - 1
_INT_RE = re.compile(r"0|[1-9][0-9]{0,15}")

OFFSET_DIGITS = 16
PAGE = 1000  # events per catch-up response
# Seconds a long-poll waits for data (implementation-defined by the protocol).
LONG_POLL_TIMEOUT = float(os.environ.get("TETHER_DS_LONG_POLL", "20"))
SSE_LIFETIME = 60.0  # seconds before the server ends an SSE response (the client reconnects)
CURSOR_EPOCH = datetime(2024, 10, 9, tzinfo=UTC).timestamp()
CURSOR_INTERVAL = 20
ANONYMOUS_ENV = "TETHER_ANONYMOUS"

_OFFSET_RE = re.compile(rf"[0-9]{{{OFFSET_DIGITS}}}")
_TTL_RE = re.compile(r"0|[1-9][0-9]{0,15}")
_SEQ_HEADER = "Stream-Seq"
_LINES_RE = re.compile(r"\r\n|\r|\n")  # every line break SSE knows, so data cannot end a field

SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff",
                    "Cross-Origin-Resource-Policy": "cross-origin"}


def offset_of(seq: int) -> str:
    return f"{seq:0{OFFSET_DIGITS}d}"


def media_type(value: str | None) -> str:
    """The media type of a ``Content-Type`` value, lowercased, without parameters."""
    return (value or "").split(";", 1)[0].strip().lower()


def is_json(content_type: str) -> bool:
    return media_type(content_type) == "application/json"


def live_cursor(previous: str | None) -> str:
    """The protocol's interval cursor (section 8.1): never at or below the client's."""
    interval = int((time.time() - CURSOR_EPOCH) // CURSOR_INTERVAL)
    if previous is not None and previous.isdigit() and int(previous) >= interval:
        interval = int(previous) + 1 + int.from_bytes(os.urandom(2)) % (3600 // CURSOR_INTERVAL)
    return str(interval)


@dataclass(frozen=True, slots=True)
class Meta:
    """A stream's configuration, as its ``ds.create`` event holds it."""

    content_type: str
    ttl: int | None
    expires_at: str | None
    created_seq: int
    created_ms: int
    stream_seq: str | None = None  # the last Stream-Seq accepted
    closed: bool = False  # a ds.close was written: no more appends

    def config(self) -> tuple[str, int | None, str | None]:
        return (media_type(self.content_type), self.ttl, self.expires_at)

    def expired(self) -> bool:
        now = time.time()
        if self.ttl is not None and now >= self.created_ms / 1000 + self.ttl:
            return True
        if self.expires_at is not None:
            with contextlib.suppress(ValueError):
                return now >= datetime.fromisoformat(self.expires_at).timestamp()
        return False


class Streams:
    """The Durable Streams view of the session service, with a bounded metadata cache."""

    MAX_CACHED = 10_000

    def __init__(self, service: SessionService) -> None:
        self.service = service
        self._meta: OrderedDict[str, Meta | None] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}
        # session → producer id → (epoch, last accepted seq), loaded with the metadata
        self.producers: dict[str, dict[str, tuple[int, int]]] = {}

    def lock(self, session: str) -> asyncio.Lock:
        lock = self._locks.get(session)
        if lock is None:
            lock = self._locks[session] = asyncio.Lock()
            if len(self._locks) > self.MAX_CACHED:
                for name in [n for n, lk in self._locks.items() if not lk.locked()][:1000]:
                    if name != session:
                        del self._locks[name]
        return lock

    def remember(self, session: str, meta: Meta | None,
                 producers: dict[str, tuple[int, int]] | None = None) -> None:
        if producers is not None or meta is None or session not in self._meta:
            self.producers[session] = producers or {}
        self._meta[session] = meta
        self._meta.move_to_end(session)
        if len(self._meta) > self.MAX_CACHED:
            evicted, _ = self._meta.popitem(last=False)
            self.producers.pop(evicted, None)

    async def meta(self, caller: Caller, session: str) -> Meta | None:
        """The stream's configuration, or None when no stream exists at ``session``."""
        if session in self._meta:
            meta = self._meta[session]
            self._meta.move_to_end(session)
        else:
            meta, producers = await self._load(caller, session)
            self.remember(session, meta, producers)
        if meta is not None and meta.expired():
            return None
        return meta

    async def _load(self, caller: Caller, session: str
                    ) -> tuple[Meta | None, dict[str, tuple[int, int]]]:
        head, _, _, _ = await self.service.position(session, None)
        after = head.first_seq - 1
        meta: Meta | None = None
        producers: dict[str, tuple[int, int]] = {}
        while True:
            page = await self.service.history(caller, session, Cursor(head.epoch, after), PAGE)
            for event in page.events:
                if event.type == CREATE and isinstance(event.data, dict):
                    meta = Meta(str(event.data.get("content_type")), event.data.get("ttl"),
                                event.data.get("expires_at"), event.seq, event.time)
                    producers = {}
                elif event.type == DELETE:
                    meta = None
                    producers = {}
                elif event.type == CLOSE and meta is not None:
                    meta = dataclasses.replace(meta, closed=True)
                elif event.type == PRODUCER and isinstance(event.data, dict):
                    producers[str(event.data.get("id"))] = (int(event.data.get("epoch", 0)),
                                                            int(event.data.get("seq", 0)))
                elif meta is not None and event.type in DATA_TYPES \
                        and isinstance(event.data, dict) and "stream_seq" in event.data:
                    meta = _with_seq(meta, event.data["stream_seq"])
            if len(page.events) < PAGE:
                return meta, producers
            after = page.events[-1].seq

    async def read(self, caller: Caller, session: str, after: int
                   ) -> tuple[list[Event], int, bool, int]:
        """Data events after ``after``: (events, next seq, up to date, tail seq)."""
        head, _, _, _ = await self.service.position(session, None)
        if after < head.first_seq - 1:
            raise _Gone()
        page = await self.service.history(caller, session, Cursor(head.epoch, after), PAGE)
        last = page.events[-1].seq if page.events else after
        data = [e for e in page.events if e.type in DATA_TYPES]
        up_to_date = len(page.events) < PAGE
        return data, last, up_to_date, max(head.last_seq, last)


class _Gone(Exception):
    pass


def _with_seq(meta: Meta, stream_seq: str) -> Meta:
    return dataclasses.replace(meta, stream_seq=stream_seq)


# --- requests ------------------------------------------------------------------------------


def _problem(status: int, message: str, **headers: str) -> web.Response:
    return web.Response(status=status, text=message, content_type="text/plain",
                        headers={**SECURITY_HEADERS, **headers})


def _session(request: web.Request) -> str:
    name = request.match_info["name"]
    if not valid_session_id(name):
        raise RequestError(ErrorCode.INVALID, "stream name must be a valid session id "
                                              "([A-Za-z0-9][A-Za-z0-9_.:@-]{0,127})")
    return name


def anonymous_grant(app: web.Application) -> Grant | None:
    """The grant of a request without a token: ``TETHER_ANONYMOUS='PATTERN=CAPS'``, honoured
    only when the server listens on a loopback address (off unless set)."""
    spec = os.environ.get(ANONYMOUS_ENV, "").strip()
    if not spec:
        return None
    host = app[CONFIG].host
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        return None
    pattern, _, caps = spec.partition("=")
    return Grant("anonymous", (pattern.strip() or "*",),
                 frozenset(c.strip() for c in caps.split(",") if c.strip()), None)


def _caller(request: web.Request, session: str, cap: str) -> Caller:
    token = bearer_token(request)
    grant = None if token else anonymous_grant(request.app)
    if grant is None:
        grant = request.app[AUTH].verify(token)
    caller = Caller(grant, Sender(grant.sub, request.headers.get("X-Tether-Client",
                                                                 "durable-streams"), "human"),
                    connection="http")
    caller.require(session, cap)
    return caller


def _streams(request: web.Request) -> Streams:
    return request.app[STREAMS]


def _parse_json_messages(raw: bytes, allow_empty: bool) -> list[Any]:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RequestError(ErrorCode.INVALID, f"malformed JSON: {exc}") from None
    if isinstance(value, list):
        if not value and not allow_empty:
            raise RequestError(ErrorCode.INVALID, "an empty JSON array appends nothing")
        return value
    return [value]


async def _append(request: web.Request, caller: Caller, session: str, content_type: str,
                  raw: bytes, initial: bool, stream_seq: str | None = None) -> int:
    """Commit the body as events; the seq of the last one (0 when nothing was written)."""
    service = request.app[SESSIONS]
    if is_json(content_type):
        if initial and not raw.strip():
            return 0
        items: list[tuple[str, Any]] = [
            (MESSAGE, m) for m in _parse_json_messages(raw, allow_empty=initial)]
    else:
        if not raw:
            return 0
        items = [(BYTES, {"b64": base64.b64encode(raw).decode()})]
    if stream_seq is not None and items:
        # The last event of the batch carries the accepted Stream-Seq (read back on load).
        kind, data = items[-1]
        if kind == BYTES:
            items[-1] = (kind, {**data, "stream_seq": stream_seq})
    futures = [service.publish(caller, session, kind, data, server_written=True)
               for kind, data in items]
    results = await asyncio.gather(*futures)
    return max((r.event.seq for r in results), default=0)


async def put_stream(request: web.Request) -> web.Response:
    session = _session(request)
    caller = _caller(request, session, "publish")
    content_type = request.headers.get("Content-Type") or "application/octet-stream"
    ttl_text = request.headers.get("Stream-TTL")
    expires_at = request.headers.get("Stream-Expires-At")
    if ttl_text is not None and expires_at is not None:
        return _problem(400, "give Stream-TTL or Stream-Expires-At, not both")
    ttl: int | None = None
    if ttl_text is not None:
        if not _TTL_RE.fullmatch(ttl_text.strip()):
            return _problem(400, "Stream-TTL must be a non-negative integer")
        ttl = int(ttl_text)
    if expires_at is not None:
        try:
            datetime.fromisoformat(expires_at.strip().replace("Z", "+00:00"))
        except ValueError:
            return _problem(400, "Stream-Expires-At must be an RFC 3339 timestamp")
        expires_at = expires_at.strip()
    raw = await request.read()
    streams = _streams(request)
    location = str(request.url.with_query(None))
    async with streams.lock(session):
        meta = await streams.meta(caller, session)
        wanted = (media_type(content_type), ttl, expires_at)
        if meta is not None:
            if meta.config() != wanted:
                return _problem(409, "the stream exists with a different configuration")
            _, last, _, tail = await streams.read(caller, session, meta.created_seq)
            return _ok(200, meta, tail)
        if is_json(content_type) and raw.strip():
            _parse_json_messages(raw, allow_empty=True)  # refuse bad JSON before creating
        service = request.app[SESSIONS]
        appended = await service.publish(caller, session, CREATE, {
            "content_type": content_type, "ttl": ttl, "expires_at": expires_at},
            server_written=True)
        meta = Meta(content_type, ttl, expires_at, appended.event.seq, appended.event.time)
        streams.remember(session, meta, {})
        last = await _append(request, caller, session, content_type, raw, initial=True)
        if _closing(request):
            last = await _close(request, caller, session, meta)
            meta = dataclasses.replace(meta, closed=True)
    response = _ok(201, meta, max(last, meta.created_seq))
    response.headers["Location"] = location
    return response


def _closing(request: web.Request) -> bool:
    return request.headers.get("Stream-Closed", "").strip().lower() == "true"


async def _close(request: web.Request, caller: Caller, session: str, meta: Meta) -> int:
    """Write ``ds.close``: the stream takes no more appends. The seq of the close."""
    appended = await request.app[SESSIONS].publish(caller, session, CLOSE, None,
                                                   server_written=True)
    _streams(request).remember(session, dataclasses.replace(meta, closed=True))
    return appended.event.seq


def _ok(status: int, meta: Meta, tail: int) -> web.Response:
    headers = {**SECURITY_HEADERS, "Content-Type": meta.content_type,
               "Stream-Next-Offset": offset_of(tail)}
    if meta.closed:
        headers["Stream-Closed"] = "true"
    return web.Response(status=status, headers=headers)


async def post_stream(request: web.Request) -> web.Response:
    session = _session(request)
    caller = _caller(request, session, "publish")
    if request.content_length is not None \
            and request.content_length > request.app[CONFIG].max_frame_bytes:
        return _problem(413, "request body too large")
    streams = _streams(request)
    meta = await streams.meta(caller, session)
    if meta is None:
        return _problem(404, "no such stream")
    closing = _closing(request)
    raw = await request.read()
    content_type = request.headers.get("Content-Type")
    if raw or not closing:  # a close without a body ignores the content type
        if not content_type:
            return _problem(400, "Content-Type is required")
        if media_type(content_type) != media_type(meta.content_type):
            return _problem(409, f"the stream's content type is {meta.content_type}")
        if not raw:
            return _problem(400, "an empty body appends nothing")
    stream_seq = request.headers.get(_SEQ_HEADER)
    producer = _producer_headers(request)
    async with streams.lock(session):
        meta = await streams.meta(caller, session)
        if meta is None:
            return _problem(404, "no such stream")
        headers = dict(SECURITY_HEADERS)
        if meta.closed:
            headers["Stream-Closed"] = "true"
        if producer is not None:
            refusal = _check_producer(streams.producers.setdefault(session, {}), *producer)
            if refusal is not None:
                refusal.headers.update(headers)
                return refusal
        if meta.closed:
            if closing and not raw and producer is None:
                return web.Response(status=204, headers=headers)  # closing again: a no-op
            _, _, _, tail = await streams.read(caller, session, meta.created_seq)
            return _problem(409, "the stream is closed", **headers,
                            **{"Stream-Next-Offset": offset_of(tail)})
        if stream_seq is not None and meta.stream_seq is not None \
                and stream_seq.encode() <= meta.stream_seq.encode():
            return _problem(409, "Stream-Seq must increase")
        last = await _append(request, caller, session, meta.content_type, raw,
                             initial=not raw,
                             stream_seq=None if is_json(meta.content_type) else stream_seq)
        if stream_seq is not None:
            meta = _with_seq(meta, stream_seq)
            streams.remember(session, meta)
        status = 204
        if producer is not None:
            pid, epoch, seq = producer
            # Not atomic with the append: a crash between the two lets a retry append again
            # (the protocol's "recovery for non-atomic stores": bump the epoch after a crash).
            appended = await request.app[SESSIONS].publish(
                caller, session, PRODUCER, {"id": pid, "epoch": epoch, "seq": seq},
                server_written=True)
            streams.producers.setdefault(session, {})[pid] = (epoch, seq)
            last = max(last, appended.event.seq)
            headers.update({"Producer-Epoch": str(epoch), "Producer-Seq": str(seq)})
            status = 200 if raw else 204  # a close-only request appends no data
        if closing:
            last = await _close(request, caller, session, meta)
            headers["Stream-Closed"] = "true"
        if not last:
            _, _, _, last = await streams.read(caller, session, meta.created_seq)
    return web.Response(status=status, headers={**headers,
                                                "Stream-Next-Offset": offset_of(last)})


def _producer_headers(request: web.Request) -> tuple[str, int, int] | None:
    """``(Producer-Id, Producer-Epoch, Producer-Seq)``, all three or none (else ``400``)."""
    values = [request.headers.get(h) for h in ("Producer-Id", "Producer-Epoch",
                                                 "Producer-Seq")]
    if all(v is None for v in values):
        return None
    pid, epoch, seq = values
    if pid is None or epoch is None or seq is None:
        raise RequestError(ErrorCode.INVALID, "give Producer-Id, Producer-Epoch and "
                                              "Producer-Seq together")
    if not pid.strip():
        raise RequestError(ErrorCode.INVALID, "Producer-Id must not be empty")
    numbers = []
    for name, text in (("Producer-Epoch", epoch), ("Producer-Seq", seq)):
        if not _INT_RE.fullmatch(text.strip()) or int(text) > MAX_SAFE_INT:
            raise RequestError(ErrorCode.INVALID, f"{name} must be an integer 0..2^53-1")
        numbers.append(int(text))
    return pid, numbers[0], numbers[1]


def _check_producer(state: dict[str, tuple[int, int]], pid: str, epoch: int,
                    seq: int) -> web.Response | None:
    """The protocol's validation (section 5.2.1): None to accept, else the answer."""
    known = state.get(pid)
    if known is None:
        if seq != 0:
            return _problem(409, "a new producer starts at Producer-Seq 0",
                            **{"Producer-Expected-Seq": "0", "Producer-Received-Seq": str(seq)})
        return None
    current, last = known
    if epoch < current:
        return _problem(403, "stale producer epoch", **{"Producer-Epoch": str(current)})
    if epoch > current:
        return None if seq == 0 else _problem(400, "a new epoch starts at Producer-Seq 0")
    if seq <= last:
        return web.Response(status=204, headers={
            **SECURITY_HEADERS, "Producer-Epoch": str(current), "Producer-Seq": str(last)})
    if seq > last + 1:
        return _problem(409, "Producer-Seq gap", **{"Producer-Expected-Seq": str(last + 1),
                                                     "Producer-Received-Seq": str(seq)})
    return None


async def delete_stream(request: web.Request) -> web.Response:
    session = _session(request)
    caller = _caller(request, session, "publish")
    streams = _streams(request)
    async with streams.lock(session):
        if await streams.meta(caller, session) is None:
            return _problem(404, "no such stream")
        await request.app[SESSIONS].publish(caller, session, DELETE, None,
                                            server_written=True)
        streams.remember(session, None)
    return web.Response(status=204, headers=SECURITY_HEADERS)


async def head_stream(request: web.Request) -> web.Response:
    session = _session(request)
    caller = _caller(request, session, "subscribe")
    streams = _streams(request)
    meta = await streams.meta(caller, session)
    if meta is None:
        return web.Response(status=404, headers=SECURITY_HEADERS)
    head, _, _, _ = await request.app[SESSIONS].position(session, None)
    headers = {**SECURITY_HEADERS, "Content-Type": meta.content_type,
               "Stream-Next-Offset": offset_of(max(head.last_seq, meta.created_seq)),
               "Cache-Control": "no-store"}
    if meta.ttl is not None:
        remaining = meta.created_ms / 1000 + meta.ttl - time.time()
        headers["Stream-TTL"] = str(max(0, math.ceil(remaining)))
    if meta.expires_at is not None:
        headers["Stream-Expires-At"] = meta.expires_at
    if meta.closed:
        headers["Stream-Closed"] = "true"
    return web.Response(status=200, headers=headers)


def _body(meta: Meta, events: list[Event]) -> bytes:
    if is_json(meta.content_type):
        return b"[" + b",".join(orjson.dumps(e.data) for e in events) + b"]"
    return b"".join(base64.b64decode(e.data["b64"]) for e in events
                    if isinstance(e.data, dict) and "b64" in e.data)


def _start(offset: str | None, meta: Meta, tail: int) -> int:
    if offset is None or offset == "-1":
        return meta.created_seq
    if offset == "now":
        return tail
    if not _OFFSET_RE.fullmatch(offset):
        raise RequestError(ErrorCode.INVALID, f"malformed offset {offset[:64]!r}")
    return max(int(offset), meta.created_seq)


async def get_stream(request: web.Request) -> web.StreamResponse:
    session = _session(request)
    caller = _caller(request, session, "subscribe")
    streams = _streams(request)
    meta = await streams.meta(caller, session)
    if meta is None:
        return _problem(404, "no such stream")
    live = request.query.get("live")
    offset = request.query.get("offset")
    if live not in (None, "long-poll", "sse"):
        return _problem(400, f"unknown live mode {live!r}")
    if live is not None and offset is None:
        return _problem(400, "live reads need an offset")
    service = request.app[SESSIONS]
    head, _, _, _ = await service.position(session, None)
    after = _start(offset, meta, max(head.last_seq, meta.created_seq))
    if live == "sse":
        return await _sse(request, caller, session, meta, after)
    if live == "long-poll":
        return await _long_poll(request, caller, session, meta, after)
    try:
        events, last, up_to_date, _ = await streams.read(caller, session, after)
    except _Gone:
        return _problem(410, "offset is before the oldest retained data")
    headers = {**SECURITY_HEADERS, "Content-Type": meta.content_type,
               "Stream-Next-Offset": offset_of(last)}
    if up_to_date:
        headers["Stream-Up-To-Date"] = "true"
        if meta.closed:
            headers["Stream-Closed"] = "true"
    if offset == "now":
        headers["Cache-Control"] = "no-store"
    else:
        etag = f'"{session}:{offset_of(after)}:{offset_of(last)}"'
        headers["ETag"] = etag
        headers["Cache-Control"] = "private, max-age=60, stale-while-revalidate=300"
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers=headers)
    return web.Response(status=200, body=_body(meta, events if offset != "now" else []),
                        headers=headers)


class _Waiter:
    """Set when the session gets an event: a store listener registered before reading."""

    def __init__(self, request: web.Request, session: str) -> None:
        self.store = request.app[SESSIONS].store
        self.session = session
        self.changed = asyncio.Event()

    def __call__(self, event: Event) -> None:
        if not event.transient:
            self.changed.set()

    def __enter__(self) -> _Waiter:
        self.store.listen(self.session, self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.store.unlisten(self.session, self)

    async def wait(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self.changed.wait(), max(0.0, seconds))
        except TimeoutError:
            return False
        self.changed.clear()
        return True


async def _long_poll(request: web.Request, caller: Caller, session: str, meta: Meta,
                     after: int) -> web.Response:
    streams = _streams(request)
    cursor = live_cursor(request.query.get("cursor"))
    deadline = time.monotonic() + LONG_POLL_TIMEOUT
    with _Waiter(request, session) as waiter:
        while True:
            # Closure is looked at before reading, so the read covers what preceded it.
            current = await streams.meta(caller, session)
            if current is None:
                return _problem(404, "no such stream")
            try:
                events, last, up_to_date, _ = await streams.read(caller, session, after)
            except _Gone:
                return _problem(410, "offset is before the oldest retained data")
            if events:
                headers = {**SECURITY_HEADERS, "Content-Type": meta.content_type,
                           "Stream-Next-Offset": offset_of(last), "Stream-Cursor": cursor,
                           "ETag": f'"{session}:{offset_of(after)}:{offset_of(last)}"',
                           "Cache-Control": "private, max-age=60, stale-while-revalidate=300"}
                if up_to_date:
                    headers["Stream-Up-To-Date"] = "true"
                    if current.closed:
                        headers["Stream-Closed"] = "true"
                return web.Response(status=200, body=_body(meta, events), headers=headers)
            after = last
            if current.closed and up_to_date:  # nothing will come: no wait
                return web.Response(status=204, headers={
                    **SECURITY_HEADERS, "Stream-Next-Offset": offset_of(after),
                    "Stream-Up-To-Date": "true", "Stream-Closed": "true",
                    "Cache-Control": "no-store"})
            if not await waiter.wait(deadline - time.monotonic()):
                return web.Response(status=204, headers={
                    **SECURITY_HEADERS, "Stream-Next-Offset": offset_of(after),
                    "Stream-Up-To-Date": "true", "Stream-Cursor": cursor,
                    "Cache-Control": "no-store"})


class _SseLive:
    """An SSE response the service ends at token expiry and shutdown (``sessions.Live``)."""

    def __init__(self, caller: Caller) -> None:
        self._caller = caller
        self.ended = asyncio.Event()

    @property
    def caller(self) -> Caller | None:
        return self._caller

    def expire(self) -> None:
        self.ended.set()

    async def shutdown(self) -> None:
        self.ended.set()


def _sse_frames(meta: Meta, events: list[Event], last: int, up_to_date: bool,
                cursor: str | None, closed: bool = False) -> tuple[bytes, str | None]:
    """``data`` events, each followed by its ``control`` event, written in one piece.

    Text and JSON streams send what was read as one ``data`` event; other content types send
    one base64 ``data`` event per append (``Stream-SSE-Data-Encoding: base64``). Every line
    break SSE knows splits a ``data:`` field, so stream content cannot end a field or an event.
    """
    if not _sse_text(meta):
        chunks = [(str(e.data.get("b64", "")) if isinstance(e.data, dict) else "", e.seq)
                  for e in events]
    elif events:
        chunks = [(_body(meta, events).decode("utf-8", "replace"), last)]
    else:
        chunks = []
    out = bytearray()
    for i, (text, seq) in enumerate(chunks):
        out += b"event: data\n"
        out += "".join(f"data:{line}\n" for line in _LINES_RE.split(text)).encode()
        out += b"\n"
        final = i == len(chunks) - 1
        out, cursor = _control(out, last if final else seq, cursor, final and up_to_date,
                               final and up_to_date and closed)
    if not chunks:
        out, cursor = _control(out, last, cursor, up_to_date, up_to_date and closed)
    return bytes(out), cursor


def _control(out: bytearray, seq: int, cursor: str | None, up_to_date: bool,
             closed: bool) -> tuple[bytearray, str | None]:
    """Add a ``control`` event: the offset, a cursor (none once closed), the flags."""
    control: dict[str, Any] = {"streamNextOffset": offset_of(seq)}
    if closed:
        control["streamClosed"] = True
    else:
        cursor = live_cursor(cursor)
        control["streamCursor"] = cursor
    if up_to_date:
        control["upToDate"] = True
    out += b"event: control\ndata:" + orjson.dumps(control) + b"\n\n"
    return out, cursor


def _sse_text(meta: Meta) -> bool:
    return is_json(meta.content_type) or media_type(meta.content_type).startswith("text/")


async def _sse(request: web.Request, caller: Caller, session: str, meta: Meta,
               after: int) -> web.StreamResponse:
    streams = _streams(request)
    service = request.app[SESSIONS]
    service.limits.open(caller.sender.sub, "streams")
    headers = {**SECURITY_HEADERS, "Content-Type": "text/event-stream",
               "Cache-Control": "no-cache"}
    if not _sse_text(meta):
        headers["Stream-SSE-Data-Encoding"] = "base64"
    response = web.StreamResponse(headers=headers)
    live = _SseLive(caller)
    cursor = request.query.get("cursor")
    deadline = time.monotonic() + SSE_LIFETIME
    first = True
    try:
        with _Waiter(request, session) as waiter:
            await response.prepare(request)
            service.live.add(live)
            while not live.ended.is_set():
                # Closure is looked at before reading, so the read covers what preceded it.
                current = await streams.meta(caller, session)
                if current is None:
                    break
                try:
                    events, last, up_to_date, _ = await streams.read(caller, session, after)
                except _Gone:
                    break
                closed = current.closed and up_to_date
                if events or first or closed:
                    frames, cursor = _sse_frames(meta, events, last, up_to_date, cursor,
                                                 closed)
                    await response.write(frames)
                    first = False
                if closed:
                    break  # the stream is over: the connection ends after the final event
                after = last
                if not up_to_date:
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                waiting = asyncio.ensure_future(waiter.wait(min(remaining, 15.0)))
                ended = asyncio.ensure_future(live.ended.wait())
                done, _ = await asyncio.wait({waiting, ended},
                                             return_when=asyncio.FIRST_COMPLETED)
                for task in (waiting, ended):
                    task.cancel()
                quiet = not done & {waiting} or not waiting.result()
                if quiet and not live.ended.is_set() and time.monotonic() < deadline:
                    await response.write(b": keep-alive\n\n")
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof()
    except ConnectionResetError:
        pass
    finally:
        service.live.discard(live)
        service.limits.close(caller.sender.sub, "streams")
    return response


STREAMS = web.AppKey("durable_streams", Streams)


def install(app: web.Application) -> None:
    """Serve the Durable Streams protocol under ``/v1/stream/{name}``."""
    app[STREAMS] = Streams(app[SESSIONS])
    path = "/v1/stream/{name}"
    app.router.add_route("PUT", path, put_stream)
    app.router.add_route("POST", path, post_stream)
    app.router.add_route("GET", path, get_stream)
    app.router.add_route("HEAD", path, head_stream)
    app.router.add_route("DELETE", path, delete_stream)
