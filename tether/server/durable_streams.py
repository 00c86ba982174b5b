"""The Durable Streams protocol (``PROTOCOL.md`` 1.0 of durable-streams) under ``/v1/stream/``.

A stream is a session log (``docs/durable-streams.md`` has the whole mapping): ``PUT`` writes a
``ds.create`` event holding the stream's configuration, each JSON message is one
``ds.message`` event, each append of another content type one ``ds.bytes`` event, ``DELETE``
writes ``ds.delete``. An offset is a position in the stream: the seq of the last event covered
(shifted past the branch point for a fork, see :mod:`tether.server.forks`), written as two
16-digit halves of one 32-digit number, so offsets sort lexicographically in log order.

Like every transport this is a thin layer over :class:`~tether.server.sessions.SessionService`:
writes go through ``publish`` (capability, limits, validation, commit), reads through
``history`` and live reads wait on ``SessionService.watch``, registered before reading.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import functools
import hashlib
import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from tether.protocol.codes import ErrorCode, RequestError
from tether.protocol.cursor import Cursor
from tether.protocol.events import Event, Sender, valid_session_id
from tether.server import forks
from tether.server.auth import Grant, anonymous_grant
from tether.server.config import is_loopback
from tether.server.forks import Segment
from tether.server.http import bearer_token
from tether.server.keys import AUTH, CONFIG, SESSIONS
from tether.server.sessions import Caller, SessionService

CREATE = "ds.create"
DELETE = "ds.delete"
MESSAGE = "ds.message"
BYTES = "ds.bytes"
PRODUCER = "ds.producer"
CLOSE = "ds.close"
FORK = "ds.fork"  # in a source: a fork now reads it (the source's data must stay readable)
UNFORK = "ds.unfork"  # in a source: that fork was deleted
SEQ = "ds.seq"  # the Stream-Seq a JSON append was accepted with (a bytes append carries it)
DATA_TYPES = frozenset({MESSAGE, BYTES})
MAX_SAFE_INT = 2**53 - 1
_INT_RE = re.compile(r"0|[1-9][0-9]{0,15}")

OFFSET_DIGITS = 16
_HALF = 10**OFFSET_DIGITS
PAGE = 1000  # events per catch-up response
# Seconds a long-poll waits for data (implementation-defined by the protocol).
LONG_POLL_TIMEOUT = float(os.environ.get("TETHER_DS_LONG_POLL", "20"))
SSE_LIFETIME = 60.0  # seconds before the server ends an SSE response (the client reconnects)
CURSOR_EPOCH = datetime(2024, 10, 9, tzinfo=UTC).timestamp()
CURSOR_INTERVAL = 20
STREAM_PREFIX = "/v1/stream/"

# Two 16-digit halves (the reference server's shape) or, as earlier versions wrote, one.
_OFFSET_RE = re.compile(rf"([0-9]{{{OFFSET_DIGITS}}})(?:_([0-9]{{{OFFSET_DIGITS}}}))?")
_TTL_RE = re.compile(r"0|[1-9][0-9]{0,15}")
_SEQ_HEADER = "Stream-Seq"
_LINES_RE = re.compile(r"\r\n|\r|\n")  # every line break SSE knows, so data cannot end a field

# Reads and writes need a bearer token (or an --anonymous rule), never a cookie, so any origin
# may call: the browser cannot lend a visitor's credentials to another site here.
_EXPOSED = ("Stream-Next-Offset, Stream-Cursor, Stream-Up-To-Date, Stream-Closed, "
            "Stream-TTL, Stream-Expires-At, Stream-SSE-Data-Encoding, ETag, Location, "
            "Producer-Epoch, Producer-Seq, Producer-Expected-Seq, Producer-Received-Seq")
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff",
                    "Cross-Origin-Resource-Policy": "cross-origin",
                    "Access-Control-Allow-Origin": "*",
                    "Access-Control-Expose-Headers": _EXPOSED}
PREFLIGHT_HEADERS = {
    **SECURITY_HEADERS,
    "Access-Control-Allow-Methods": "GET, HEAD, POST, PUT, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": (
        "Authorization, Content-Type, If-None-Match, Stream-TTL, Stream-Expires-At, "
        "Stream-Seq, Stream-Closed, Stream-Forked-From, Stream-Fork-Offset, "
        "Stream-Fork-Sub-Offset, Producer-Id, Producer-Epoch, Producer-Seq, X-Tether-Client"),
    "Access-Control-Max-Age": "600",
}


def offset_of(position: int) -> str:
    return f"{position // _HALF:0{OFFSET_DIGITS}d}_{position % _HALF:0{OFFSET_DIGITS}d}"


def parse_offset(text: str) -> int | None:
    """The position an offset names, or None when it is not one."""
    match = _OFFSET_RE.fullmatch(text)
    if match is None:
        return None
    high, low = match.groups()
    return int(high) if low is None else int(high) * _HALF + int(low)


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
    """A stream's configuration and state, folded from its session's ``ds.*`` records."""

    content_type: str
    ttl: int | None
    expires_at: str | None
    created_seq: int
    created_ms: int
    chain: tuple[Segment, ...] = ()  # what a read walks (forks.py); (own log,) unless a fork
    fork: tuple[str, int | None, int] | None = None  # (source, Stream-Fork-Offset, sub-offset)
    stream_seq: str | None = None  # the last Stream-Seq accepted
    closed: bool = False  # a ds.close was written: no more appends
    written_ms: int = 0  # the newest record's commit time (a write renews a sliding TTL)
    deleted: bool = False  # deleted while forks still read it: 410 until the last one goes
    forks: frozenset[str] = field(default_factory=frozenset)  # live forks reading this stream

    def config(self) -> tuple[str, int | None, str | None, Any]:
        return (media_type(self.content_type), self.ttl, self.expires_at, self.fork)

    @property
    def source(self) -> str | None:
        return self.fork[0] if self.fork is not None else None

    def expired(self, touched: float = 0.0, now: float | None = None) -> bool:
        """Whether the TTL (renewed by reads and writes: a sliding window) or the absolute
        expiry time has passed (by ``now``, default the present). ``touched`` is the last read
        seen by this process."""
        now = time.time() if now is None else now
        if self.ttl is not None:
            renewed = max(self.created_ms, self.written_ms) / 1000
            if now >= max(renewed, touched) + self.ttl:
                return True
        if self.expires_at is not None:
            with contextlib.suppress(ValueError):
                return now >= datetime.fromisoformat(self.expires_at).timestamp()
        return False


def _server_caller() -> Caller:
    """The transport itself: reads of a fork's sources, and the bookkeeping records it keeps
    in them (a fork's reader needs no right on the streams the fork was made from)."""
    grant = Grant("tether.durable-streams", ("*",), frozenset({"subscribe", "publish"}), None)
    return Caller(grant, Sender("tether.durable-streams", "server", "system"), connection="ds")


@dataclass(slots=True)
class _Entry:
    """A cached fold of one session's log: valid while the log's epoch and tail match."""

    meta: Meta | None
    producers: dict[str, tuple[int, int]]
    epoch: str
    upto: int  # the seq of the last record folded


class Streams:
    """The Durable Streams view of the session service.

    A stream's state (configuration, closure, producers, forks) is a fold of its log's
    ``ds.*`` records. The fold is cached per process and brought up to date from the log on
    every access: the session's head says whether records were added since (by this process,
    another worker of ``--workers`` or another node on Redis), and only those are read. So every
    process answers from the same state, with one ``head`` per request when nothing changed.
    """

    MAX_CACHED = 10_000
    TOUCH_EVERY = 1.0  # seconds between two shared records of reads of one stream

    def __init__(self, service: SessionService) -> None:
        self.service = service
        self.server = _server_caller()
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}
        # session → the last read seen by this process (time.time()): renews a sliding TTL.
        self.touched: dict[str, float] = {}
        self._shared_touch: dict[str, float] = {}

    def lock(self, session: str) -> asyncio.Lock:
        lock = self._locks.get(session)
        if lock is None:
            lock = self._locks[session] = asyncio.Lock()
            if len(self._locks) > self.MAX_CACHED:
                for name in [n for n, lk in self._locks.items() if not lk.locked()][:1000]:
                    if name != session:
                        del self._locks[name]
        return lock

    async def touch(self, session: str, meta: Meta) -> None:
        """A read or a write renews a sliding TTL. Reads leave no record in the log: the time
        goes to presence-like soft state (shared by every worker and node, expiring with the
        TTL), at most once a second per stream and process."""
        now = time.time()
        self.touched[session] = now
        if meta.ttl is None or now - self._shared_touch.get(session, 0.0) < self.TOUCH_EVERY:
            return
        self._shared_touch[session] = now
        if len(self._shared_touch) > self.MAX_CACHED:
            self._shared_touch.clear()
        await self.service.presence.set_presence(_touch_key(session), "read", {"t": now},
                                                 float(meta.ttl) + 1.0)

    async def _expired(self, session: str, meta: Meta) -> bool:
        if not meta.expired(self.touched.get(session, 0.0)):
            return False
        if meta.ttl is None:
            return True
        # Another process may have seen a read since: the shared record says.
        members = await self.service.presence.presence(_touch_key(session))
        touched = max((float(m.get("t", 0)) for m in members if isinstance(m, dict)),
                      default=0.0)
        if touched > self.touched.get(session, 0.0):
            self.touched[session] = touched
        return meta.expired(self.touched.get(session, 0.0))

    async def fold(self, session: str) -> _Entry:
        """The session's fold, brought up to date with its log."""
        head, _, _, _ = await self.service.position(session, None)
        entry = self._cache.get(session)
        if entry is None or entry.epoch != head.epoch or entry.upto > head.last_seq \
                or entry.upto < head.first_seq - 1:
            entry = _Entry(None, {}, head.epoch, head.first_seq - 1)
        if entry.upto < head.last_seq:
            # Folded into a copy, published when done: a concurrent fold of the same session
            # (reads take no lock) never sees a state going back to an older record.
            entry = _Entry(entry.meta, dict(entry.producers), entry.epoch, entry.upto)
            while entry.upto < head.last_seq:
                page = await self.service.history(self.server, session,
                                                  Cursor(head.epoch, entry.upto), PAGE)
                if not page.events:
                    break
                for event in page.events:
                    entry.meta, entry.producers = _fold(session, entry.meta, entry.producers,
                                                        event)
                entry.upto = page.events[-1].seq
            newer = self._cache.get(session)
            if newer is not None and newer.epoch == entry.epoch and newer.upto > entry.upto:
                entry = newer  # another fold (or this process's own commit) got further
        self._cache[session] = entry
        self._cache.move_to_end(session)
        if len(self._cache) > self.MAX_CACHED:
            evicted, _ = self._cache.popitem(last=False)
            self.touched.pop(evicted, None)
        return entry

    def committed(self, session: str, events: list[Event]) -> None:
        """Fold what this process just committed, if it directly follows the cached fold
        (else the next access reads it back from the log)."""
        entry = self._cache.get(session)
        if entry is None or not events or events[0].seq != entry.upto + 1:
            return
        for i, event in enumerate(events):
            if event.seq != entry.upto + 1 + i:
                return  # another writer's record in between: leave the rest to the log
        for event in events:
            entry.meta, entry.producers = _fold(session, entry.meta, entry.producers, event)
            entry.upto = event.seq

    def heard(self, session: str, meta: Meta, after: int, events: list[Event] | None
              ) -> tuple[Meta, forks.Page] | None:
        """A live reader's next page taken from the events its watch heard, with no store
        read: when they directly follow position ``after`` in the stream's own log and the
        cached state has folded them. Else None: read the log (``events`` after a gap, from
        another process ahead of this one's fold, or lost by a lossy live channel)."""
        if not events:
            return None
        self.committed(session, events)  # fold them, if they follow the cached state
        entry = self._cache.get(session)
        current = None if entry is None else entry.meta
        own = meta.chain[-1]
        local = after - own.delta
        if entry is None or current is None or entry.upto != events[-1].seq \
                or current.created_seq != meta.created_seq or current.deleted \
                or after < own.after or events[0].seq != local + 1 \
                or current.expired(self.touched.get(session, 0.0)):
            return None
        for i, event in enumerate(events):
            if event.seq != local + 1 + i:
                return None
        if own.delta:
            events = [dataclasses.replace(e, seq=e.seq + own.delta) for e in events]
        return current, forks.Page(events, events[-1].seq, True)

    async def state(self, session: str) -> Meta | None:
        """The stream at ``session`` as its log says, deleted or not; None: none or expired."""
        return await self._live(session, await self.fold(session))

    async def _live(self, session: str, entry: _Entry) -> Meta | None:
        meta = entry.meta
        if meta is not None and not meta.deleted and await self._expired(session, meta):
            return None
        return meta

    async def meta(self, session: str) -> Meta | None:
        """The live stream at ``session`` (deleted ones raise :class:`Gone`), or None."""
        return (await self.current(session))[0]

    async def current(self, session: str
                      ) -> tuple[Meta | None, dict[str, tuple[int, int]]]:
        """:meth:`meta` and the stream's producers (id → (epoch, last seq)), from one fold.

        The caller's right to the request was checked already (a writer needs ``publish``,
        not ``subscribe``): the state is read with the transport's own caller."""
        entry = await self.fold(session)
        meta = await self._live(session, entry)
        if meta is not None and meta.deleted:
            raise Gone("the stream was deleted; forks of it still read its data")
        return meta, entry.producers

    async def _read_log(self, session: str, after: int, limit: int
                        ) -> tuple[list[Event], int]:
        """The forks.Reader: one page of ``session``'s log after ``after``."""
        head, _, _, _ = await self.service.position(session, None)
        if after < head.first_seq - 1:
            raise Gone("offset is before the oldest retained data")
        if after >= head.last_seq:
            return [], head.last_seq
        page = await self.service.history(self.server, session, Cursor(head.epoch, after),
                                          limit)
        return page.events, head.last_seq

    async def read(self, meta: Meta, after: int, limit: int = PAGE) -> forks.Page:
        """Events after position ``after`` (data and records), walking a fork's chain."""
        return await forks.read(self._read_log, meta.chain, after, limit)

    async def tail(self, session: str, meta: Meta) -> int:
        """The position of the stream's newest event."""
        head, _, _, _ = await self.service.position(session, None)
        return forks.tail(meta.chain, head.last_seq)


def _touch_key(session: str) -> str:
    # Not a session id ('/' is not allowed in one): no client can attach to it or list it.
    return f"ds.touch/{session}"


def _fold(session: str, meta: Meta | None, producers: dict[str, tuple[int, int]],
          event: Event) -> tuple[Meta | None, dict[str, tuple[int, int]]]:
    """The stream's state after one more record of its log."""
    data = event.data if isinstance(event.data, dict) else {}
    if event.type == CREATE and meta is not None and not meta.deleted \
            and not meta.expired(now=event.time / 1000):
        # Two processes created the stream at once (each saw none): the first one stands, and
        # what the second appended follows it, so neither creator's data is hidden.
        return meta, producers
    if event.type == CREATE:
        fork = data.get("fork")
        chain: tuple[Segment, ...] = forks.root(session, event.seq)
        fork_key = None
        if isinstance(fork, dict):
            parents = tuple(Segment.from_json(s) for s in fork.get("segments", ()))
            chain = forks.fork_chain(parents, session, event.seq, int(fork["at"]))
            fork_key = (str(fork["from"]), fork.get("offset"), int(fork.get("sub", 0)))
        return Meta(str(data.get("content_type")), data.get("ttl"), data.get("expires_at"),
                    event.seq, event.time, chain, fork_key, written_ms=event.time), {}
    if meta is None:
        return None, producers
    if event.type == DELETE:
        if meta.forks:
            return dataclasses.replace(meta, deleted=True), producers
        return None, {}
    if event.type in (FORK, UNFORK):
        if data.get("gen") != meta.created_seq:  # about an earlier stream of this name
            return meta, producers
        name = str(data.get("name"))
        live = meta.forks | {name} if event.type == FORK else meta.forks - {name}
        if meta.deleted and not live:
            return None, {}
        return dataclasses.replace(meta, forks=live), producers
    if meta.ttl is not None:  # only a sliding TTL looks at the newest write
        meta = dataclasses.replace(meta, written_ms=event.time)
    if event.type == CLOSE:
        return dataclasses.replace(meta, closed=True), producers
    if event.type == PRODUCER:
        producers[str(data.get("id"))] = (int(data.get("epoch", 0)), int(data.get("seq", 0)))
    elif event.type == SEQ or (event.type == BYTES and "stream_seq" in data):
        meta = dataclasses.replace(meta, stream_seq=str(data["stream_seq"]))
    return meta, producers


class Gone(Exception):
    """``410 Gone``: data below retention, or a deleted stream that forks still read."""


# --- requests ------------------------------------------------------------------------------


def _problem(status: int, message: str, **headers: str) -> web.Response:
    return web.Response(status=status, text=message, content_type="text/plain",
                        headers={**SECURITY_HEADERS, **headers})


def _gone(exc: Gone) -> web.Response:
    return _problem(410, str(exc))


def _session(request: web.Request) -> str:
    name = request.match_info["name"]
    if not valid_session_id(name):
        raise RequestError(ErrorCode.INVALID, "stream name must be a valid session id "
                                              "([A-Za-z0-9][A-Za-z0-9_.:@-]{0,127})")
    return name


def _anonymous(app: web.Application, session: str) -> Grant | None:
    """The grant of a request without a token (``tether serve --anonymous``): honoured only
    on a loopback address unless ``--anonymous-public`` says otherwise."""
    config = app[CONFIG]
    if not config.anonymous or not (config.anonymous_public or is_loopback(config.host)):
        return None
    return _anonymous_grant(config.anonymous, session)


# Rules are parsed once per (rules, session), and a grant keeps its memo of checks.
_anonymous_grant = functools.lru_cache(maxsize=4096)(anonymous_grant)


def _caller(request: web.Request, session: str, cap: str) -> Caller:
    token = bearer_token(request)
    grant = None if token else _anonymous(request.app, session)
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


async def _publish(service: SessionService, caller: Caller, session: str,
                   items: list[tuple[str, Any]], streams: Streams | None = None,
                   key: str | None = None) -> list[Event]:
    """Publish the records in order, queued in one loop tick (a store's group commit usually
    takes them together); the committed events. With ``key``, record ``i``
    carries the store's idempotency key ``{key}:{i}``: the same records published again
    (by any process, within the store's idempotency window) are not appended twice and come
    back empty."""
    futures = [service.publish(caller, session, kind, data,
                               None if key is None else f"{key}:{i}", server_written=True)
               for i, (kind, data) in enumerate(items)]
    events = [r.event for r in await asyncio.gather(*futures) if not r.duplicate]
    if streams is not None:
        streams.committed(session, events)
    return events


async def _commit(service: SessionService, caller: Caller, session: str,
                  items: list[tuple[str, Any]], streams: Streams | None = None,
                  key: str | None = None) -> int:
    """:func:`_publish`; the seq of the last record (0 when there are none)."""
    events = await _publish(service, caller, session, items, streams, key)
    return max((e.seq for e in events), default=0)


def _records(content_type: str, raw: bytes, initial: bool,
             stream_seq: str | None = None) -> list[tuple[str, Any]]:
    """The records a body appends: one per JSON message, or one for the bytes."""
    if is_json(content_type):
        if initial and not raw.strip():
            return []
        items: list[tuple[str, Any]] = [
            (MESSAGE, m) for m in _parse_json_messages(raw, allow_empty=initial)]
    else:
        if not raw:
            return []
        items = [(BYTES, {"b64": base64.b64encode(raw).decode()})]
    if stream_seq is not None and items:
        # The last event of the batch carries the accepted Stream-Seq (read back on load).
        kind, data = items[-1]
        if kind == BYTES:
            items[-1] = (kind, {**data, "stream_seq": stream_seq})
    return items


def _own(meta: Meta, seq: int) -> int:
    """The position of the stream's own log record ``seq``."""
    return seq + meta.chain[-1].delta


@dataclass(frozen=True, slots=True)
class _ForkRequest:
    source: str
    offset: int | None  # Stream-Fork-Offset (None: the source's tail)
    sub: int  # Stream-Fork-Sub-Offset: bytes / messages of the next append also inherited


def _fork_request(request: web.Request) -> _ForkRequest | None:
    """The fork headers of a ``PUT``, validated (``400`` for malformed ones)."""
    source = request.headers.get("Stream-Forked-From")
    offset_text = request.headers.get("Stream-Fork-Offset")
    sub_text = request.headers.get("Stream-Fork-Sub-Offset")
    if source is None:
        if offset_text is not None or sub_text is not None:
            raise RequestError(ErrorCode.INVALID, "Stream-Fork-Offset and "
                                                  "Stream-Fork-Sub-Offset need Stream-Forked-From")
        return None
    name = source.strip()
    if "://" in name:
        name = "/" + name.split("://", 1)[1].partition("/")[2]
    name = name.split("?", 1)[0]
    if name.startswith(STREAM_PREFIX):
        name = name[len(STREAM_PREFIX):]
    if not valid_session_id(name):
        raise RequestError(ErrorCode.INVALID, "Stream-Forked-From must name a stream "
                                              "(/v1/stream/NAME)")
    offset = None
    if offset_text is not None:
        offset = parse_offset(offset_text.strip())
        if offset is None:
            raise RequestError(ErrorCode.INVALID, "malformed Stream-Fork-Offset")
    sub = 0
    if sub_text is not None:
        if not _INT_RE.fullmatch(sub_text.strip()):
            raise RequestError(ErrorCode.INVALID, "Stream-Fork-Sub-Offset must be an integer "
                                                  "0..2^53-1 without sign or leading zeros")
        sub = int(sub_text)
        if sub and offset is None:
            raise RequestError(ErrorCode.INVALID, "Stream-Fork-Sub-Offset needs "
                                                  "Stream-Fork-Offset")
    return _ForkRequest(name, offset, sub)


async def _branch(streams: Streams, source: Meta, fork: _ForkRequest, tail: int
                  ) -> tuple[int, list[tuple[str, Any]]] | web.Response:
    """Where a fork of ``source`` branches, and the records it starts with (the inherited part
    of an append split by a sub-offset); or the refusal."""
    at = tail if fork.offset is None else max(fork.offset, forks.start(source.chain))
    if at > tail:
        return _problem(400, "Stream-Fork-Offset is beyond the source's tail")
    if not fork.sub:
        return at, []
    page = await streams.read(source, at)
    data = [e for e in page.events if e.type in DATA_TYPES]
    if is_json(source.content_type):
        # Each JSON message is its own record: the fork simply branches after the sub-th.
        if fork.sub > len(data):
            return _problem(400, "Stream-Fork-Sub-Offset is beyond the next append")
        return data[fork.sub - 1].seq, []
    if not data or not isinstance(data[0].data, dict):
        return _problem(400, "Stream-Fork-Sub-Offset is beyond the next append")
    chunk = base64.b64decode(data[0].data.get("b64", ""))
    if fork.sub > len(chunk):
        return _problem(400, "Stream-Fork-Sub-Offset is beyond the next append")
    return at, [(BYTES, {"b64": base64.b64encode(chunk[:fork.sub]).decode()})]


async def put_stream(request: web.Request) -> web.Response:
    session = _session(request)
    caller = _caller(request, session, "publish")
    content_type = request.headers.get("Content-Type")
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
    fork = _fork_request(request)
    raw = await request.read()
    streams = _streams(request)
    service = request.app[SESSIONS]
    location = str(request.url.with_query(None))
    source: Meta | None = None
    if fork is not None:
        caller.require(fork.source, "subscribe")
        source = await streams.state(fork.source)
        if source is None:
            return _problem(404, "the stream to fork does not exist")
        if source.deleted:
            return _problem(409, "the stream to fork was deleted")
        content_type = content_type or source.content_type
        if media_type(content_type) != media_type(source.content_type):
            return _problem(409, "a fork has its source's content type")
        if ttl is None and expires_at is None:
            ttl, expires_at = source.ttl, source.expires_at  # a fork lives as long by default
    content_type = content_type or "application/octet-stream"
    fork_key = None if fork is None else (fork.source, fork.offset, fork.sub)
    async with streams.lock(session):
        current = await streams.state(session)
        if current is not None:
            if current.deleted:
                return _problem(409, "the stream was deleted and forks still read it")
            if current.config() != (media_type(content_type), ttl, expires_at, fork_key):
                return _problem(409, "the stream exists with a different configuration")
            return _ok(200, current, await streams.tail(session, current))
        if is_json(content_type) and raw.strip():
            _parse_json_messages(raw, allow_empty=True)  # refuse bad JSON before creating
        record: dict[str, Any] = {"content_type": content_type, "ttl": ttl,
                                  "expires_at": expires_at}
        prefix: list[tuple[str, Any]] = []
        if fork is not None and source is not None:
            branch = await _branch(streams, source, fork, await streams.tail(fork.source,
                                                                              source))
            if isinstance(branch, web.Response):
                return branch
            at, prefix = branch
            record["fork"] = {"from": fork.source, "offset": fork.offset, "sub": fork.sub,
                              "at": at, "segments": [s.to_json() for s in
                                                     forks.inherited(source.chain, at)]}
        # The stream's records go in one tick: its creation, what a fork starts with, the
        # initial body, the close.
        items = [(CREATE, record), *prefix, *_records(content_type, raw, initial=True)]
        if _closing(request):
            items.append((CLOSE, None))
        events = await _publish(service, caller, session, items)
        meta = None
        for event in events:
            meta, _ = _fold(session, meta, {}, event)
        if meta is None:  # only a concurrent delete between the records could do this
            return _problem(409, "the stream was deleted while it was created")
        if fork is not None:
            await _refer(streams, fork.source, session, FORK)
    response = _ok(201, meta, _own(meta, max(events[-1].seq, meta.created_seq)))
    response.headers["Location"] = location
    return response


async def _refer(streams: Streams, source: str, fork: str, kind: str) -> None:
    """Record in ``source`` that ``fork`` reads it (``ds.fork``) or no longer does
    (``ds.unfork``). A deleted source whose last fork goes is gone for good, and lets go of
    its own source in turn."""
    while True:
        async with streams.lock(source):
            meta = await streams.state(source)
            if meta is None:
                return
            await streams.service.publish(
                streams.server, source, kind, {"name": fork, "gen": meta.created_seq},
                server_written=True)
            after = await streams.state(source)
        if after is not None or meta.source is None:
            return
        fork, source, kind = source, meta.source, UNFORK


def _closing(request: web.Request) -> bool:
    return request.headers.get("Stream-Closed", "").strip().lower() == "true"


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
    closing = _closing(request)
    raw = await request.read()
    content_type = request.headers.get("Content-Type")
    stream_seq = request.headers.get(_SEQ_HEADER)
    producer = _producer_headers(request)
    # One writer per stream in this process; the state is read from the log under the lock.
    async with streams.lock(session):
        try:
            meta, producers = await streams.current(session)
        except Gone as exc:
            return _gone(exc)
        if meta is None:
            return _problem(404, "no such stream")
        if raw or not closing:  # a close without a body ignores the content type
            if not content_type:
                return _problem(400, "Content-Type is required")
            if media_type(content_type) != media_type(meta.content_type):
                return _problem(409, f"the stream's content type is {meta.content_type}")
            if not raw:
                return _problem(400, "an empty body appends nothing")
        await streams.touch(session, meta)  # any write renews a sliding TTL, a refused one too
        headers = dict(SECURITY_HEADERS)
        if meta.closed:
            headers["Stream-Closed"] = "true"
        if producer is not None:
            refusal = _check_producer(producers, *producer)
            if refusal is not None:
                refusal.headers.update(headers)
                return refusal
        if meta.closed:
            if closing and not raw and producer is None:
                return web.Response(status=204, headers=headers)  # closing again: a no-op
            return _problem(409, "the stream is closed", **headers, **{
                "Stream-Next-Offset": offset_of(await streams.tail(session, meta))})
        if stream_seq is not None and meta.stream_seq is not None \
                and stream_seq.encode() <= meta.stream_seq.encode():
            return _problem(409, "Stream-Seq must increase")
        items = _records(meta.content_type, raw, initial=not raw,
                         stream_seq=None if is_json(meta.content_type) else stream_seq)
        if stream_seq is not None and is_json(meta.content_type):
            items.append((SEQ, {"stream_seq": stream_seq}))
        status = 204
        if producer is not None:
            pid, epoch, seq = producer
            # The producer's state follows the batch's records and is queued with them in
            # one loop tick, which the stores usually commit together; nothing promises it,
            # so after a crash between the two a retry could append again (the protocol's
            # "recovery for non-atomic stores": bump the epoch after a crash).
            items.append((PRODUCER, {"id": pid, "epoch": epoch, "seq": seq}))
            headers.update({"Producer-Epoch": str(epoch), "Producer-Seq": str(seq)})
            status = 200 if raw else 204  # a close-only request appends no data
        if closing:
            items.append((CLOSE, None))
            headers["Stream-Closed"] = "true"
        # A producer's records carry idempotency keys: the check above runs per process, so
        # the same (producer, epoch, seq) sent to two workers or nodes at once (a retry racing
        # its original) is deduplicated by the store itself.
        key = None if producer is None else "ds:" + hashlib.sha256(
            f"{meta.created_seq}\0{producer[0]}\0{producer[1]}\0{producer[2]}".encode()
        ).hexdigest()[:32]  # a Producer-Id is any header value: bounded, and in one charset
        last = await _commit(request.app[SESSIONS], caller, session, items, streams, key)
        if key is not None and items and not last:
            assert producer is not None
            return web.Response(status=204, headers={  # another process appended it first
                **SECURITY_HEADERS, "Producer-Epoch": str(producer[1]),
                "Producer-Seq": str(producer[2])})
        tail = _own(meta, last) if last else await streams.tail(session, meta)
    return web.Response(status=status, headers={**headers,
                                                "Stream-Next-Offset": offset_of(tail)})


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
        try:
            meta = await streams.meta(session)
        except Gone as exc:
            return _gone(exc)
        if meta is None:
            return _problem(404, "no such stream")
        await request.app[SESSIONS].publish(caller, session, DELETE, None,
                                            server_written=True)
        gone = await streams.state(session) is None  # else forks still read it: 410
    if gone and meta.source is not None:
        await _refer(streams, meta.source, session, UNFORK)  # the source may go now
    return web.Response(status=204, headers=SECURITY_HEADERS)


async def head_stream(request: web.Request) -> web.Response:
    session = _session(request)
    _caller(request, session, "subscribe")  # the right to look; HEAD writes nothing
    streams = _streams(request)
    try:
        meta = await streams.meta(session)
    except Gone:
        return web.Response(status=410, headers=SECURITY_HEADERS)
    if meta is None:
        return web.Response(status=404, headers=SECURITY_HEADERS)
    headers = {**SECURITY_HEADERS, "Content-Type": meta.content_type,
               "Stream-Next-Offset": offset_of(await streams.tail(session, meta)),
               "Cache-Control": "no-store"}
    if meta.ttl is not None:
        headers["Stream-TTL"] = str(meta.ttl)  # a sliding window: renewed by every access
    if meta.expires_at is not None:
        headers["Stream-Expires-At"] = meta.expires_at
    if meta.closed:
        headers["Stream-Closed"] = "true"
    return web.Response(status=200, headers=headers)


async def options_stream(request: web.Request) -> web.Response:
    """A CORS preflight: any origin, the protocol's request headers (bearer auth only)."""
    return web.Response(status=204, headers=PREFLIGHT_HEADERS)


def _body(meta: Meta, events: list[Event]) -> bytes:
    if is_json(meta.content_type):
        return orjson.dumps([e.data for e in events])  # one call: half the cost of a join
    return b"".join(base64.b64decode(e.data["b64"]) for e in events
                    if isinstance(e.data, dict) and "b64" in e.data)


def _start(offset: str | None, meta: Meta, tail: int) -> int:
    if offset is None or offset == "-1":
        return forks.start(meta.chain)
    if offset == "now":
        return tail
    position = parse_offset(offset)
    if position is None:
        raise RequestError(ErrorCode.INVALID, f"malformed offset {offset[:64]!r}")
    return max(position, forks.start(meta.chain))


def _data(page: forks.Page) -> list[Event]:
    return [e for e in page.events if e.type in DATA_TYPES]


async def get_stream(request: web.Request) -> web.StreamResponse:
    session = _session(request)
    caller = _caller(request, session, "subscribe")
    streams = _streams(request)
    try:
        meta = await streams.meta(session)
    except Gone as exc:
        return _gone(exc)
    if meta is None:
        return _problem(404, "no such stream")
    await streams.touch(session, meta)  # a read renews a sliding TTL
    live = request.query.get("live")
    offset = request.query.get("offset")
    if live not in (None, "long-poll", "sse"):
        return _problem(400, f"unknown live mode {live!r}")
    if live is not None and offset is None:
        return _problem(400, "live reads need an offset")
    after = _start(offset, meta, await streams.tail(session, meta))
    if live == "sse":
        return await _sse(request, caller, session, meta, after)
    if live == "long-poll":
        return await _long_poll(request, caller, session, meta, after)
    try:
        page = await streams.read(meta, after)
    except Gone as exc:
        return _gone(exc)
    last = page.last
    headers = {**SECURITY_HEADERS, "Content-Type": meta.content_type,
               "Stream-Next-Offset": offset_of(last)}
    if page.up_to_date:
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
    return web.Response(status=200, body=_body(meta, _data(page) if offset != "now" else []),
                        headers=headers)


async def _long_poll(request: web.Request, caller: Caller, session: str, meta: Meta,
                     after: int) -> web.Response:
    streams = _streams(request)
    cursor = live_cursor(request.query.get("cursor"))
    deadline = time.monotonic() + LONG_POLL_TIMEOUT
    # A fork waits on its own log: its sources' later appends are not part of it.
    with request.app[SESSIONS].watch(caller, session) as watch:
        heard: list[Event] | None = None
        while True:
            quick = streams.heard(session, meta, after, heard)
            if quick is not None:
                current, page = quick
            else:
                # Closure is looked at before reading, so the read covers what preceded it.
                try:
                    state = await streams.meta(session)
                    if state is None:
                        return _problem(404, "no such stream")
                    current = state
                    page = await streams.read(current, after)
                except Gone as exc:
                    return _gone(exc)
            events, last = _data(page), page.last
            if events:
                headers = {**SECURITY_HEADERS, "Content-Type": meta.content_type,
                           "Stream-Next-Offset": offset_of(last), "Stream-Cursor": cursor,
                           "ETag": f'"{session}:{offset_of(after)}:{offset_of(last)}"',
                           "Cache-Control": "private, max-age=60, stale-while-revalidate=300"}
                if page.up_to_date:
                    headers["Stream-Up-To-Date"] = "true"
                    if current.closed:
                        headers["Stream-Closed"] = "true"
                return web.Response(status=200, body=_body(meta, events), headers=headers)
            after = last
            if not page.up_to_date:
                continue  # a page of records that are not data: read on
            if current.closed:  # nothing will come: no wait
                return web.Response(status=204, headers={
                    **SECURITY_HEADERS, "Stream-Next-Offset": offset_of(after),
                    "Stream-Up-To-Date": "true", "Stream-Closed": "true",
                    "Cache-Control": "no-store"})
            watch.take()  # what was heard so far is covered by this read
            if not await watch.wait(deadline - time.monotonic()) \
                    and time.monotonic() >= deadline:
                return web.Response(status=204, headers={
                    **SECURITY_HEADERS, "Stream-Next-Offset": offset_of(after),
                    "Stream-Up-To-Date": "true", "Stream-Cursor": cursor,
                    "Cache-Control": "no-store"})
            heard = watch.take()


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
        with service.watch(caller, session) as watch:
            await response.prepare(request)
            service.live.add(live)
            heard: list[Event] | None = None
            while not live.ended.is_set():
                quick = streams.heard(session, meta, after, heard)
                if quick is not None:
                    current, page = quick
                else:
                    # Closure is looked at before reading, so the read covers what preceded.
                    try:
                        state = await streams.meta(session)
                        if state is None:
                            break
                        current = state
                        page = await streams.read(current, after)
                    except Gone:
                        break
                heard = None
                events, last, up_to_date = _data(page), page.last, page.up_to_date
                closed = current.closed and up_to_date
                if events or first or closed:
                    frames, cursor = _sse_frames(meta, events, last, up_to_date, cursor,
                                                 closed)
                    await response.write(frames)
                    first = False
                    await streams.touch(session, meta)  # a live reader renews a sliding TTL
                if closed:
                    break  # the stream is over: the connection ends after the final event
                after = last
                if not up_to_date:
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if quick is None:
                    watch.take()  # what was heard so far is covered by the read
                waiting = asyncio.ensure_future(watch.wait(min(remaining, 15.0)))
                ended = asyncio.ensure_future(live.ended.wait())
                done, _ = await asyncio.wait({waiting, ended},
                                             return_when=asyncio.FIRST_COMPLETED)
                for task in (waiting, ended):
                    task.cancel()
                quiet = not done & {waiting} or not waiting.result()
                if quiet and not live.ended.is_set() and time.monotonic() < deadline:
                    await response.write(b": keep-alive\n\n")
                heard = watch.take()
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
    app.router.add_route("OPTIONS", path, options_stream)
