"""The scale-out store: several server nodes share one Redis (7.0 or later).

Key layout (``P`` is the prefix, ``tether`` by default; ``S`` the session id)::

    P:{S}:meta          hash    epoch, seq (the last committed seq)
    P:{S}:log           stream  one entry per event, ID ``{seq}-0``, fields ``t`` (time, ms)
                                and ``e`` (the JSON array ``[type, [sub, client, kind], data]``)
    P:{S}:i:N:SUB:KEY   string  idempotency key of sender SUB (N = len(SUB)); value = seq
    P:{S}:st:STREAM     string  JSON-escaped text of an open token stream so far
    P:{S}:sc:STREAM     string  marker of an ended token stream
    P:{S}:pz / P:{S}:pi zset / hash  presence: member -> expiry (ms), member -> info JSON
    P:{S}:ch            channel live fan-out: ``[transient, epoch, time, first_seq, [e, ...]]``
    P:sessions          set     every session id ever written, for ``trim()``

The ``{S}`` hash tag puts all keys of one session in one Redis Cluster slot, and every script
declares all the keys it touches in ``KEYS``. This class talks to one Redis (standalone or
behind a proxy), where one append call may carry several sessions' batches; against a cluster
the flusher would group sessions by slot (``CLUSTER KEYSLOT`` of the tag), send each group to
its node, and fan out with SPUBLISH/SSUBSCRIBE. ``P:sessions`` has its own slot and is only
touched by plain commands.

Commits: ``append`` only enqueues. The first append of a loop tick wakes a flusher task, which
packs the queued events of many sessions into ``EVALSHA`` calls of one append script (at most
``MAX_SCRIPT_EVENTS`` events each; ``on_batch`` hears each call's size) and pipelines them on
its own connection. ``FLUSH_CONNECTIONS`` flushers share the sessions ready at a tick, so Redis
runs one pipeline while this process resolves or packs another; a session with a batch in
flight waits for it, so a session's appends commit in call order, and its queue grows into
the next batch meanwhile (group commit). Per session the script checks idempotency keys,
concatenates token streams, assigns seqs, XADDs, and PUBLISHes the committed events as one
message; one call costs Redis much less than one call per session.

Event time is the Redis server's ``TIME`` read inside the script (Redis 7 replicates script
effects, so non-deterministic commands are allowed): one clock for every node, so event times
follow seq order across nodes and age-based trimming compares like with like.

Token streams: each ``stream.append`` APPENDs its text, JSON-escaped by the client, to
``st:STREAM``; the client encodes ``stream.end`` with ``"text":""`` as the last member of
its data, and the script splices the accumulated escaped text in between those quotes. The
escaping of a concatenation is the concatenation of the escapings, so the stored text is the
deltas' text byte for byte, and Lua never parses or re-encodes JSON (cjson would mangle it).

Retention: XADD trims with ``MAXLEN ~`` (whole stream nodes, cheap); ``trim()`` trims every
session in ``P:sessions`` exactly, by count, then by age from the oldest entries with
``XTRIM MINID``. Idempotency keys and ended-stream markers expire on their own (``PX``).

Listeners get events only from pub/sub, on this node as on every other: one reader task on
one connection subscribes each session's channel while it has listeners. A flush waits for
the SUBSCRIBE replies of listeners added before it. Pub/sub is at-most-once: across a
reconnect events may be missed, and the server heals gaps from the log.

Failures surface as :class:`StoreError`. When a connection fails before a script call's reply
is read, its callers get a StoreError although their events may have committed (retry with
idempotency keys).
The same holds for a whole script call if Redis raises inside it (a key of the wrong type):
Redis does not roll scripts back.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError

from tether.protocol.cursor import new_epoch
from tether.protocol.events import STREAM_APPEND, STREAM_END, Event, Sender
from tether.store.base import (
    Appended,
    Head,
    Listener,
    Listeners,
    Retention,
    StoreError,
    StreamClosedError,
)

log = logging.getLogger("tether.store.redis")

# One script call holds Redis for its whole run; bound it so other clients keep flowing.
MAX_SCRIPT_EVENTS = 512
# Pipelines in flight at once, each on its own connection.
FLUSH_CONNECTIONS = 2
# A flush waits at most this long for SUBSCRIBEs issued before it, so a dead pub/sub
# connection cannot stall commits.
SUBSCRIBE_WAIT = 2.0
PING_INTERVAL = 15.0
RECONNECT_MIN = 0.05
RECONNECT_MAX = 2.0
TRIM_PIPELINE = 100
_KEY_CACHE_SIZE = 65536

# Op codes shared with the append script.
_OP_PLAIN, _OP_APPEND, _OP_END, _OP_KEYED = 0, 1, 2, 3

_LUA_HELPERS = """
local function int(n) return string.format('%d', n) end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

_APPEND_LUA = "#!lua\n" + _LUA_HELPERS + """
-- One call commits a batch for one or more sessions.
-- KEYS: per session: meta, log, then per event [idempotency key] [stream text, stream closed]
-- ARGV: max events, idempotency window ms, stream ttl ms, then per session: epoch candidate,
--       channel, event count, then per event: op, payload [, escaped text of stream.append]
-- op: 0 plain, 1 stream.append, 2 stream.end; +3 when the event has an idempotency key
-- Returns one flat array (nested replies cost Redis more than the commands themselves):
-- time, then per session: epoch, first seq, the number of values that follow for the
-- session's special outcomes, then per special outcome: its event's (1-based) index and
--   1, payload          a committed stream.end (its text filled in)
--   2, seq, time, payload  a duplicate idempotency key (payload '' if trimmed away)
--   3                   an event on an ended stream
-- Every other event committed, with seqs counting up from the first seq.
local maxlen, window, ttl = ARGV[1], ARGV[2], ARGV[3]
local now = int(now_ms())
local out = {tonumber(now)}
local k, i = 1, 4
while i <= #ARGV do
  local meta, log = KEYS[k], KEYS[k + 1]
  k = k + 2
  local candidate, channel, count = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  i = i + 3
  local state = redis.call('HMGET', meta, 'epoch', 'seq')
  local epoch = state[1]
  if not epoch then
    -- A new incarnation: a log left without its meta must not collide with seqs from 1.
    epoch = candidate
    redis.call('HSET', meta, 'epoch', epoch)
    redis.call('DEL', log)
  end
  local seq = tonumber(state[2]) or 0
  local first = seq + 1
  local published, special = {}, {}
  for index = 1, count do
    local op = tonumber(ARGV[i])
    local payload = ARGV[i + 1]
    i = i + 2
    local ikey, tkey, ckey, fragment, done
    if op >= 3 then
      op = op - 3
      ikey = KEYS[k]
      k = k + 1
    end
    if op > 0 then
      tkey, ckey = KEYS[k], KEYS[k + 1]
      k = k + 2
    end
    if op == 1 then
      fragment = ARGV[i]
      i = i + 1
    end
    if ikey then
      local original = redis.call('GET', ikey)
      if original then
        local id = original .. '-0'
        local entry = redis.call('XRANGE', log, id, id)
        local time, body = 0, ''
        if #entry > 0 then
          time, body = tonumber(entry[1][2][2]), entry[1][2][4]
        end
        local n = #special
        special[n + 1], special[n + 2], special[n + 3] = index, 2, tonumber(original)
        special[n + 4], special[n + 5] = time, body
        done = true
      end
    end
    if not done and op > 0 and redis.call('EXISTS', ckey) == 1 then
      local n = #special
      special[n + 1], special[n + 2] = index, 3
      done = true
    end
    if not done then
      if op == 1 then
        redis.call('APPEND', tkey, fragment)
        redis.call('PEXPIRE', tkey, ttl)
      elseif op == 2 then
        -- The client encoded data with "text":"" last: splice the escaped text into it.
        local text = redis.call('GET', tkey) or ''
        payload = string.sub(payload, 1, -4) .. text .. string.sub(payload, -3)
        redis.call('DEL', tkey)
        redis.call('SET', ckey, '1', 'PX', ttl)
      end
      seq = seq + 1
      redis.call('XADD', log, 'MAXLEN', '~', maxlen, int(seq) .. '-0', 't', now, 'e', payload)
      if ikey then
        redis.call('SET', ikey, int(seq), 'PX', window)
      end
      published[#published + 1] = payload
      if op == 2 then
        local n = #special
        special[n + 1], special[n + 2], special[n + 3] = index, 1, payload
      end
    end
  end
  if seq >= first then
    redis.call('HSET', meta, 'seq', int(seq))
    redis.call('PUBLISH', channel, '[0,"' .. epoch .. '",' .. now .. ',' .. int(first) .. ',['
      .. table.concat(published, ',') .. ']]')
  end
  local n = #out
  out[n + 1], out[n + 2], out[n + 3] = epoch, first, #special
  for j = 1, #special do
    out[n + 3 + j] = special[j]
  end
end
return out
"""

_HEAD_LUA = "#!lua\n" + """
-- KEYS: meta, log. ARGV: epoch candidate
redis.call('HSETNX', KEYS[1], 'epoch', ARGV[1])
local state = redis.call('HMGET', KEYS[1], 'epoch', 'seq')
local last = tonumber(state[2]) or 0
local first = last + 1
local entry = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
if #entry > 0 then
  first = tonumber(string.match(entry[1][1], '^(%d+)'))
end
return {state[1], last, first}
"""

_READ_LUA = "#!lua flags=no-writes\n" + """
-- KEYS: meta, log. ARGV: exclusive start id, count
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  return {}
end
return {epoch, redis.call('XRANGE', KEYS[2], ARGV[1], '+', 'COUNT', ARGV[2])}
"""

_TRIM_LUA = "#!lua\n" + _LUA_HELPERS + """
-- KEYS: log. ARGV: max events, max age ms. Returns the number of entries removed.
local log = KEYS[1]
local removed = redis.call('XTRIM', log, 'MAXLEN', ARGV[1])
local cutoff = now_ms() - tonumber(ARGV[2])
while true do
  local page = redis.call('XRANGE', log, '-', '+', 'COUNT', 256)
  if #page == 0 then
    break
  end
  local keep
  for j = 1, #page do
    if tonumber(page[j][2][2]) >= cutoff then
      keep = page[j][1]
      break
    end
  end
  if keep then
    removed = removed + redis.call('XTRIM', log, 'MINID', keep)
    break
  end
  local last = tonumber(string.match(page[#page][1], '^(%d+)'))
  removed = removed + redis.call('XTRIM', log, 'MINID', int(last + 1) .. '-0')
  if #page < 256 then
    break
  end
end
return removed
"""

_PRESENCE_SET_LUA = "#!lua\n" + _LUA_HELPERS + """
-- KEYS: expiries zset, info hash. ARGV: member, info, ttl ms
local expires = now_ms() + tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], int(expires), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
-- Let an abandoned session's presence vanish with its last member.
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
local at = int(math.ceil(tonumber(last[2])))
redis.call('PEXPIREAT', KEYS[1], at)
redis.call('PEXPIREAT', KEYS[2], at)
return 1
"""

_PRESENCE_GET_LUA = "#!lua\n" + _LUA_HELPERS + """
-- KEYS: expiries zset, info hash. Drops expired members, returns the live members' info.
local now = int(now_ms())
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for j = 1, #gone, 1000 do
  redis.call('HDEL', KEYS[2], unpack(gone, j, math.min(j + 999, #gone)))
end
if #gone > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
end
local live = redis.call('ZRANGE', KEYS[1], 0, -1)
local out = {}
for j = 1, #live, 1000 do
  local infos = redis.call('HMGET', KEYS[2], unpack(live, j, math.min(j + 999, #live)))
  for _, info in ipairs(infos) do
    if info then
      out[#out + 1] = info
    end
  end
end
return out
"""


class _Script:
    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


_APPEND = _Script(_APPEND_LUA)
_HEAD = _Script(_HEAD_LUA)
_READ = _Script(_READ_LUA)
_TRIM = _Script(_TRIM_LUA)
_PRESENCE_SET = _Script(_PRESENCE_SET_LUA)
_PRESENCE_GET = _Script(_PRESENCE_GET_LUA)
_SCRIPTS = (_APPEND, _HEAD, _READ, _TRIM, _PRESENCE_SET, _PRESENCE_GET)


def _bulk(value: bytes) -> bytes:
    """One RESP bulk string: the flush path packs commands itself, from pre-encoded parts."""
    return b"$%d\r\n%b\r\n" % (len(value), value)


# Values per special outcome of the append script, counting its index: see _APPEND_LUA.
_SPECIAL_WIDTH = {1: 3, 2: 5, 3: 2}

_OP_BULK = tuple(_bulk(str(code).encode()) for code in range(6))
_COUNT_BULK = tuple(_bulk(str(n).encode()) for n in range(MAX_SCRIPT_EVENTS + 1))


@dataclass(frozen=True, slots=True)
class _Keys:
    base: bytes
    meta: bytes
    log: bytes
    channel: bytes
    presence: bytes
    members: bytes
    head_resp: bytes  # meta and log as RESP bulk strings
    channel_resp: bytes


class _Op:
    """One queued append: its script keys and arguments (RESP-encoded), and the caller's future."""

    __slots__ = ("args", "data", "future", "keys", "nargs", "nkeys", "sender", "type")

    def __init__(self, type: str, data: Any, sender: Sender, keys: bytes, nkeys: int,
                 args: bytes, nargs: int, future: asyncio.Future[Appended]) -> None:
        self.type = type
        self.data = data
        self.sender = sender
        self.keys = keys
        self.nkeys = nkeys
        self.args = args
        self.nargs = nargs
        self.future = future


_senders: dict[tuple[str, str, str], Sender] = {}


def _sender(raw: Any) -> Sender:
    # A session has few distinct senders, and building a frozen dataclass costs about as
    # much as decoding the whole event.
    if isinstance(raw, list) and len(raw) == 3:
        key = (raw[0], raw[1], raw[2])
        sender = _senders.get(key)
        if sender is None:
            if len(_senders) >= _KEY_CACHE_SIZE:
                _senders.clear()
            sender = _senders[key] = Sender(str(raw[0]), str(raw[1]), str(raw[2]))
        return sender
    return Sender.from_dict(raw)


def _seq_of(entry_id: bytes) -> int:
    return int(entry_id.partition(b"-")[0])


def _fail(future: asyncio.Future[Appended], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


class RedisStore:
    """A :class:`~tether.store.base.SessionStore` on Redis streams, scripts and pub/sub."""

    # Pub/sub is at-most-once: the server heals gaps from the Stream (Hub.check_tails).
    live_is_lossy = True

    def __init__(self, url: str, retention: Retention | None = None, *,
                 on_batch: Callable[[int], None] | None = None,
                 prefix: str = "tether") -> None:
        self.url = url
        self.retention = retention or Retention()
        self.prefix = prefix
        self._on_batch = on_batch
        self._sessions_key = f"{prefix}:sessions".encode()
        self._keys_cache: dict[str, _Keys] = {}
        self._client: aioredis.Redis | None = None
        self._started = False
        self._closing = False
        # Commits.
        self._pending: dict[str, list[_Op]] = {}
        self._wake = asyncio.Event()
        self._busy: set[str] = set()  # sessions with a batch in flight
        self._idle_flushers = 0
        self._flush_conns: list[AbstractConnection] = []
        self._flushers: list[asyncio.Task[None]] = []
        self._registered: set[str] = set()
        self._candidates: dict[str, tuple[bytes, bytes]] = {}
        window = max(1, math.ceil(self.retention.idempotency_window * 1000))
        stream_ttl = max(1, math.ceil(self.retention.max_age * 1000))
        self._limits_resp = b"".join(
            _bulk(b"%d" % n) for n in (self.retention.max_events, window, stream_ttl))
        self._loop: asyncio.AbstractEventLoop  # set by start()
        # Live fan-out.
        self._listeners = Listeners()
        self._channels: dict[bytes, str] = {}
        self._sub_ops: deque[tuple[bytes, bytes]] = deque()
        self._sub_wake = asyncio.Event()
        self._sub_waiters: dict[bytes, deque[asyncio.Future[None]]] = {}
        self._unconfirmed: set[asyncio.Future[None]] = set()
        self._ps_conn: AbstractConnection | None = None
        self._ps_task: asyncio.Task[None] | None = None
        self._ps_ready = asyncio.Event()
        self._last_rx = 0.0

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        # RESP2 keeps replies (and pub/sub messages) plain arrays; a few quick retries ride
        # over a dropped idle connection without stalling callers when Redis is really down.
        client = aioredis.Redis.from_url(
            self.url, protocol=2, decode_responses=False, health_check_interval=0,
            retry=Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.25), 2),
        )
        try:
            pipe = client.pipeline(transaction=False)
            for script in _SCRIPTS:
                pipe.script_load(script.source)
            await pipe.execute()
        except (RedisError, OSError) as exc:
            await client.aclose()
            raise StoreError(f"redis at {self._safe_url()} is unavailable: {exc}") from exc
        self._client = client
        self._loop = asyncio.get_running_loop()
        for n in range(FLUSH_CONNECTIONS):
            conn = self._connection(socket_keepalive=True)
            self._flush_conns.append(conn)
            self._flushers.append(
                asyncio.create_task(self._flush_loop(conn), name=f"tether-redis-flush-{n}"))
        self._ps_task = asyncio.create_task(self._pubsub_loop(), name="tether-redis-pubsub")
        self._started = True
        # A listener registered right after start must hear the very first commits, so the
        # pub/sub connection has to be up before anything can be appended.
        try:
            await asyncio.wait_for(self._ps_ready.wait(), SUBSCRIBE_WAIT * 5)
        except TimeoutError:
            await self.close()
            raise StoreError(f"redis at {self._safe_url()}: pub/sub did not connect") from None

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._wake.set()
        await asyncio.gather(*self._flushers, return_exceptions=True)
        for future in self._unconfirmed:
            if not future.done():
                future.set_result(None)
        if self._ps_task is not None:
            self._ps_task.cancel()
            with contextlib.suppress(BaseException):
                await self._ps_task
        for conn in self._flush_conns:
            with contextlib.suppress(Exception):
                await conn.disconnect()
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.aclose()

    def _safe_url(self) -> str:
        scheme, sep, rest = self.url.partition("://")
        return f"{scheme}{sep}{rest.rpartition('@')[2]}"

    def _connection(self, **overrides: Any) -> AbstractConnection:
        assert self._client is not None
        pool = self._client.connection_pool
        kwargs = {**pool.connection_kwargs, "health_check_interval": 0, **overrides}
        connection: AbstractConnection = pool.connection_class(**kwargs)
        return connection

    def _redis(self) -> aioredis.Redis:
        if self._client is None or self._closing:
            raise StoreError("store is not started" if not self._closing else "store is closed")
        return self._client

    def _keys(self, session: str) -> _Keys:
        keys = self._keys_cache.get(session)
        if keys is None:
            if len(self._keys_cache) >= _KEY_CACHE_SIZE:
                self._keys_cache.clear()
            base = f"{self.prefix}:{{{session}}}:".encode()
            meta, log, channel = base + b"meta", base + b"log", base + b"ch"
            keys = self._keys_cache[session] = _Keys(
                base, meta, log, channel, base + b"pz", base + b"pi",
                _bulk(meta) + _bulk(log), _bulk(channel))
        return keys

    async def _eval(self, script: _Script, keys: Sequence[bytes | str],
                    args: Sequence[bytes | str | int]) -> Any:
        client = self._redis()
        execute: Callable[..., Awaitable[Any]] = client.execute_command
        try:
            try:
                return await execute("EVALSHA", script.sha, len(keys), *keys, *args)
            except NoScriptError:
                # The server restarted or its script cache was flushed.
                await client.script_load(script.source)
                return await execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis: {exc}") from exc

    # -- log ---------------------------------------------------------------------------------

    async def append(self, session: str, type: str, data: Any, sender: Sender,
                     key: str | None = None) -> Appended:
        return await self.append_future(session, type, data, sender, key)

    def append_future(self, session: str, type: str, data: Any, sender: Sender,
                      key: str | None = None) -> asyncio.Future[Appended]:
        """Queue an append for the next batch; the future resolves at commit."""
        if not self._started or self._closing:
            raise StoreError("store is closed" if self._closing else "store is not started")
        keys = self._keys(session)
        sender_list = [sender.sub, sender.client, sender.kind]
        op_keys = b""
        nkeys = 0
        if type == STREAM_APPEND:
            stream = data["stream"].encode()
            text = data["text"]
            if not isinstance(text, str):
                raise TypeError("stream.append data.text must be a string")
            # Escaped fragments concatenate to the escaped concatenation, so Lua never
            # parses JSON: it splices the accumulated fragments into stream.end.
            args = (_bulk(orjson.dumps([type, sender_list, data]))
                    + _bulk(orjson.dumps(text)[1:-1]))
            code, nargs = _OP_APPEND, 3
            op_keys = _bulk(keys.base + b"st:" + stream) + _bulk(keys.base + b"sc:" + stream)
            nkeys = 2
        elif type == STREAM_END:
            stream = data["stream"].encode()
            end_data = {k: v for k, v in data.items() if k != "text"}
            end_data["text"] = ""
            args = _bulk(orjson.dumps([type, sender_list, end_data]))
            code, nargs = _OP_END, 2
            op_keys = _bulk(keys.base + b"st:" + stream) + _bulk(keys.base + b"sc:" + stream)
            nkeys = 2
        else:
            args = _bulk(orjson.dumps([type, sender_list, data]))
            code, nargs = _OP_PLAIN, 2
        if key is not None:
            code += _OP_KEYED
            sub = sender.sub.encode()
            op_keys = _bulk(b"%si:%d:%s:%s" % (keys.base, len(sub), sub, key.encode())) + op_keys
            nkeys += 1
        future: asyncio.Future[Appended] = self._loop.create_future()
        op = _Op(type, data, sender, op_keys, nkeys, _OP_BULK[code] + args, nargs, future)
        queue = self._pending.get(session)
        if queue is None:
            self._pending[session] = [op]
        else:
            queue.append(op)
        if not self._wake.is_set():
            self._wake.set()
        return future

    async def _flush_loop(self, conn: AbstractConnection) -> None:
        while True:
            batch = self._take()
            if not batch:
                if self._closing and not self._pending:
                    return
                self._wake.clear()
                self._idle_flushers += 1
                try:
                    await self._wake.wait()
                finally:
                    self._idle_flushers -= 1
                continue
            try:
                await self._flush(conn, batch)
            except Exception as exc:
                log.exception("redis flush failed")
                for ops in batch.values():
                    for op in ops:
                        _fail(op.future, StoreError(f"redis: {exc}"))
            finally:
                self._busy.difference_update(batch)
                if self._pending:
                    self._wake.set()

    def _take(self) -> dict[str, list[_Op]]:
        """Claim queued sessions that have no batch in flight.

        The sessions ready now are shared among the idle flushers, so that Redis runs one
        part while this process packs or resolves another; a session with a batch in flight
        waits for it, which keeps each session's appends in call order.
        """
        pending = self._pending
        if not pending:
            return {}
        if not self._busy and self._idle_flushers == 0:
            self._pending = {}
            self._busy.update(pending)
            return pending
        ready = [s for s in pending if s not in self._busy]
        share = -(-len(ready) // (self._idle_flushers + 1))
        batch = {s: pending.pop(s) for s in ready[:share]}
        self._busy.update(batch)
        return batch

    def _candidate(self, session: str) -> tuple[bytes, bytes]:
        """An epoch for the session if it has none yet, plain and RESP-encoded.

        Redis only uses it when the session has no epoch, so an unused one is offered again.
        """
        candidate = self._candidates.get(session)
        if candidate is None:
            if len(self._candidates) >= _KEY_CACHE_SIZE:
                self._candidates.clear()
            epoch = new_epoch(session).encode()
            candidate = self._candidates[session] = (epoch, _bulk(epoch))
        return candidate

    def _epoch_taken(self, session: str, epoch: bytes) -> None:
        candidate = self._candidates.get(session)
        if candidate is not None and candidate[0] == epoch:
            del self._candidates[session]

    def _pack_call(self, segments: list[tuple[str, list[_Op]]]) -> list[bytes]:
        keys: list[bytes] = []
        argv: list[bytes] = [self._limits_resp]
        nkeys, nargs = 0, 3
        for session, ops in segments:
            session_keys = self._keys(session)
            keys.append(session_keys.head_resp)
            argv.append(self._candidate(session)[1])
            argv.append(session_keys.channel_resp)
            argv.append(_COUNT_BULK[len(ops)])
            nkeys += 2
            nargs += 3
            for op in ops:
                if op.nkeys:
                    keys.append(op.keys)
                    nkeys += op.nkeys
                argv.append(op.args)
                nargs += op.nargs
        header = b"*%d\r\n$7\r\nEVALSHA\r\n%b%b" % (
            3 + nkeys + nargs, _bulk(_APPEND.sha.encode()), _bulk(b"%d" % nkeys))
        return [header, *keys, *argv]

    async def _flush(self, conn: AbstractConnection, batch: dict[str, list[_Op]]) -> None:
        if self._unconfirmed:
            # Listeners registered before these appends must hear them: wait for the
            # SUBSCRIBE replies (bounded: pub/sub is best effort anyway).
            await asyncio.wait(set(self._unconfirmed), timeout=SUBSCRIBE_WAIT)
        calls: list[list[tuple[str, list[_Op]]]] = []
        segments: list[tuple[str, list[_Op]]] = []
        size = 0
        for session, ops in batch.items():
            live = [op for op in ops if not op.future.done()]
            while live:
                room = MAX_SCRIPT_EVENTS - size
                segments.append((session, live[:room]))
                size += min(room, len(live))
                live = live[room:]
                if size >= MAX_SCRIPT_EVENTS:
                    calls.append(segments)
                    segments, size = [], 0
        if segments:
            calls.append(segments)
        if not calls:
            return
        commands = [self._pack_call(call) for call in calls]
        unregistered = [s for s in batch if s not in self._registered]
        if unregistered:
            commands.append([b"*%d\r\n$4\r\nSADD\r\n" % (2 + len(unregistered)),
                             _bulk(self._sessions_key),
                             *(_bulk(s.encode()) for s in unregistered)])
        results = await self._execute(conn, commands)
        if unregistered and not isinstance(results[-1], Exception):
            self._registered.update(unregistered)
        for call, result in zip(calls, results, strict=False):
            self._resolve(call, result)
            if self._on_batch is not None:
                self._on_batch(sum(len(ops) for _, ops in call))

    async def _execute(self, conn: AbstractConnection,
                       commands: list[list[bytes]]) -> list[Any]:
        """Pipeline ``commands`` on ``conn``; errors come back as values, one per command."""
        if conn.is_connected and await self._stale(conn):
            # The server closed this idle connection (restart, timeout): reconnect rather than
            # fail a batch whose outcome would then be unknown.
            await conn.disconnect(nowait=True)
        results = await self._roundtrip(conn, commands)
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:
            # NOSCRIPT means the script did not run, so resending is safe.
            load = [b"*3\r\n$6\r\nSCRIPT\r\n$4\r\nLOAD\r\n" + _bulk(_APPEND.source.encode())]
            again = await self._roundtrip(conn, [load, *(commands[i] for i in missing)])
            for i, result in zip(missing, again[1:], strict=True):
                results[i] = result
        return results

    @staticmethod
    async def _stale(conn: AbstractConnection) -> bool:
        # can_read() replaced can_read_destructive() in redis-py 8; both only look at buffers.
        check = getattr(conn, "can_read", None) or conn.can_read_destructive
        try:
            return bool(await check())
        except (RedisError, OSError):
            return True

    @staticmethod
    async def _roundtrip(conn: AbstractConnection, commands: list[list[bytes]]) -> list[Any]:
        """Send ``commands`` and read their replies; a lost connection fails the unread ones."""
        results: list[Any] = []
        try:
            await conn.send_packed_command(
                [part for command in commands for part in command], check_health=False)
            for _ in commands:
                try:
                    results.append(await conn.read_response(disable_decoding=True))
                except ResponseError as exc:
                    results.append(exc)
        except (RedisError, OSError) as exc:
            # Replies may be half read: the connection is no longer in step.
            await conn.disconnect(nowait=True)
            results.extend([exc] * (len(commands) - len(results)))
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        return results

    def _resolve(self, call: list[tuple[str, list[_Op]]], result: Any) -> None:
        if isinstance(result, Exception):
            error = StoreError(f"redis: {result}")
            for _, ops in call:
                for op in ops:
                    _fail(op.future, error)
            return
        now: int = result[0]
        pos = 1
        for session, ops in call:
            raw_epoch, seq, nvalues = result[pos], result[pos + 1], result[pos + 2]
            special = result[pos + 3:pos + 3 + nvalues]
            pos += 3 + nvalues
            epoch = raw_epoch.decode()
            self._epoch_taken(session, raw_epoch)
            if not special:
                for op in ops:
                    if not op.future.done():
                        op.future.set_result(Appended(
                            Event(session, epoch, seq, op.type, op.data, op.sender, now), False))
                    seq += 1
                continue
            outcomes: dict[int, list[Any]] = {}
            j = 0
            while j < len(special):
                width = _SPECIAL_WIDTH[special[j + 1]]
                outcomes[special[j]] = special[j + 1:j + width]
                j += width
            for index, op in enumerate(ops, 1):
                outcome = outcomes.get(index)
                if outcome is None or outcome[0] == 1:
                    # A committed stream.end's stored data carries the text.
                    data = op.data if outcome is None else orjson.loads(outcome[1])[2]
                    if not op.future.done():
                        op.future.set_result(Appended(
                            Event(session, epoch, seq, op.type, data, op.sender, now), False))
                    seq += 1
                elif op.future.done():
                    pass
                elif outcome[0] == 2:
                    op.future.set_result(Appended(
                        self._original(session, epoch, now, op, outcome), True))
                else:
                    stream = op.data.get("stream") if isinstance(op.data, dict) else None
                    op.future.set_exception(StreamClosedError(f"stream {stream!r} has ended"))

    @staticmethod
    def _original(session: str, epoch: str, now: int, op: _Op, outcome: list[Any]) -> Event:
        """The event a duplicate idempotency key refers to."""
        _, seq, time, payload = outcome
        if not payload:
            # The original was trimmed away; the request is the best description left.
            return Event(session, epoch, seq, op.type, op.data, op.sender, now)
        raw = orjson.loads(payload)
        return Event(session, epoch, seq, raw[0], raw[2], _sender(raw[1]), time)

    async def read(self, session: str, after: int, limit: int) -> list[Event]:
        if limit <= 0:
            return []
        keys = self._keys(session)
        result = await self._eval(_READ, (keys.meta, keys.log),
                                  (f"({max(after, 0)}-0", limit))
        if not result:
            return []
        epoch = result[0].decode()
        events = []
        for entry_id, fields in result[1]:
            raw = orjson.loads(fields[3])
            events.append(Event(session, epoch, _seq_of(entry_id), raw[0], raw[2],
                                _sender(raw[1]), int(fields[1])))
        return events

    async def head(self, session: str) -> Head:
        keys = self._keys(session)
        epoch, last_seq, first_seq = await self._eval(
            _HEAD, (keys.meta, keys.log), (self._candidate(session)[0],))
        self._epoch_taken(session, epoch)
        if session not in self._registered:
            try:
                await self._redis().sadd(self._sessions_key, session)
            except (RedisError, OSError) as exc:
                raise StoreError(f"redis: {exc}") from exc
            self._registered.add(session)
        return Head(epoch.decode(), int(last_seq), int(first_seq))

    async def trim(self) -> int:
        client = self._redis()
        removed = 0
        args = (self.retention.max_events, max(0, math.floor(self.retention.max_age * 1000)))
        try:
            batch: list[str] = []
            async for member in client.sscan_iter(self._sessions_key, count=TRIM_PIPELINE):
                batch.append(member.decode())
                if len(batch) >= TRIM_PIPELINE:
                    removed += await self._trim_sessions(client, batch, args)
                    batch = []
            if batch:
                removed += await self._trim_sessions(client, batch, args)
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis: {exc}") from exc
        return removed

    async def _trim_sessions(self, client: aioredis.Redis, sessions: list[str],
                             args: tuple[int, int]) -> int:
        # Scripts are loaded at start; reload once if the server lost them since.
        for attempt in range(2):
            pipe = client.pipeline(transaction=False)
            for session in sessions:
                pipe.evalsha(_TRIM.sha, 1, self._keys(session).log, *args)
            results = await pipe.execute(raise_on_error=False)
            if attempt == 0 and any(isinstance(r, NoScriptError) for r in results):
                await client.script_load(_TRIM.source)
                continue
            break
        removed = 0
        for result in results:
            if isinstance(result, Exception):
                raise result
            removed += int(result)
        return removed

    # -- live fan-out ------------------------------------------------------------------------

    async def publish_transient(self, event: Event) -> None:
        if self._unconfirmed:
            await asyncio.wait(set(self._unconfirmed), timeout=SUBSCRIBE_WAIT)
        payload = orjson.dumps([1, event.epoch, event.time, event.seq, [[
            event.type, [event.sender.sub, event.sender.client, event.sender.kind],
            event.data]]])
        try:
            await self._redis().publish(self._keys(event.session).channel, payload)
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis: {exc}") from exc

    def listen(self, session: str, listener: Listener) -> None:
        first = not self._listeners.has(session)
        self._listeners.add(session, listener)
        if first:
            channel = self._keys(session).channel
            self._channels[channel] = session
            self._queue_sub(b"SUBSCRIBE", channel)

    def unlisten(self, session: str, listener: Listener) -> None:
        if not self._listeners.has(session):
            return
        self._listeners.remove(session, listener)
        if not self._listeners.has(session):
            channel = self._keys(session).channel
            if self._channels.pop(channel, None) is not None:
                self._queue_sub(b"UNSUBSCRIBE", channel)

    def _queue_sub(self, command: bytes, channel: bytes) -> None:
        if self._ps_conn is None:
            return  # the (re)connect subscribes to every channel in self._channels
        if command == b"SUBSCRIBE":
            self._expect_subscribe(channel)
        self._sub_ops.append((command, channel))
        self._sub_wake.set()

    def _expect_subscribe(self, channel: bytes) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sub_waiters.setdefault(channel, deque()).append(future)
        self._unconfirmed.add(future)

    def _release_waiters(self) -> None:
        for future in self._unconfirmed:
            if not future.done():
                future.set_result(None)
        self._unconfirmed.clear()
        self._sub_waiters.clear()

    async def _pubsub_loop(self) -> None:
        delay = RECONNECT_MIN
        loop = asyncio.get_running_loop()
        failures = 0
        while not self._closing:
            conn = self._connection(socket_timeout=None, socket_keepalive=True)
            writer: asyncio.Task[None] | None = None
            connect: Callable[[], Awaitable[None]] = conn.connect
            try:
                await connect()
                self._sub_ops.clear()
                self._release_waiters()
                self._ps_conn = conn
                self._ps_ready.set()
                channels = list(self._channels)
                for channel in channels:
                    self._expect_subscribe(channel)
                if channels:
                    await conn.send_command(b"SUBSCRIBE", *channels, check_health=False)
                if failures:
                    log.warning("redis pub/sub reconnected; resubscribed %d channels",
                                len(channels))
                failures, delay = 0, RECONNECT_MIN
                self._last_rx = loop.time()
                writer = asyncio.create_task(self._pubsub_writer(conn))
                while True:
                    reply = await conn.read_response(disable_decoding=True, timeout=math.inf)
                    self._last_rx = loop.time()
                    self._on_pubsub_reply(reply)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._closing:
                    break
                failures += 1
                log.warning("redis pub/sub connection failed (%s); retrying in %.2fs",
                            exc, delay)
            finally:
                self._ps_conn = None
                self._ps_ready.clear()
                if writer is not None:
                    writer.cancel()
                    with contextlib.suppress(BaseException):
                        await writer
                self._release_waiters()
                with contextlib.suppress(Exception):
                    await conn.disconnect(nowait=True)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX)

    async def _pubsub_writer(self, conn: AbstractConnection) -> None:
        """Send (un)subscribes in call order, and PING an idle connection to notice loss."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    await asyncio.wait_for(self._sub_wake.wait(), PING_INTERVAL)
                except TimeoutError:
                    if loop.time() - self._last_rx > 3 * PING_INTERVAL:
                        raise ConnectionError("no reply to PING") from None
                    await conn.send_command(b"PING", check_health=False)
                    continue
                self._sub_wake.clear()
                commands = list(self._sub_ops)
                self._sub_ops.clear()
                if commands:
                    await conn.send_packed_command(conn.pack_commands(commands),
                                                   check_health=False)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("redis pub/sub write failed: %s", exc)
            # Closing the socket ends the reader's read, which then reconnects.
            await conn.disconnect(nowait=True)

    def _on_pubsub_reply(self, reply: Any) -> None:
        if not isinstance(reply, list) or len(reply) < 3:
            return  # PONG outside subscribed mode
        kind = reply[0]
        if kind == b"message":
            self._deliver(reply[1], reply[2])
        elif kind == b"subscribe":
            waiters = self._sub_waiters.get(reply[1])
            if waiters:
                future = waiters.popleft()
                self._unconfirmed.discard(future)
                if not future.done():
                    future.set_result(None)

    def _deliver(self, channel: bytes, message: bytes) -> None:
        session = self._channels.get(channel)
        if session is None:
            return
        try:
            transient, epoch, time, first, payloads = orjson.loads(message)
            events = [
                Event(session, epoch, first + i, raw[0], raw[2], _sender(raw[1]), time,
                      transient=bool(transient))
                for i, raw in enumerate(payloads)
            ]
        except (ValueError, TypeError, IndexError) as exc:
            log.warning("dropping malformed message on %r: %s", channel, exc)
            return
        for event in events:
            try:
                self._listeners.dispatch(event)
            except Exception:
                log.exception("listener failed on %s seq %d", session, event.seq)

    # -- presence ----------------------------------------------------------------------------

    async def set_presence(self, session: str, member: str, info: dict[str, Any],
                           ttl: float) -> None:
        keys = self._keys(session)
        await self._eval(_PRESENCE_SET, (keys.presence, keys.members),
                         (member, orjson.dumps(info), max(1, math.ceil(ttl * 1000))))

    async def clear_presence(self, session: str, member: str) -> None:
        keys = self._keys(session)
        try:
            pipe = self._redis().pipeline(transaction=True)
            pipe.zrem(keys.presence, member)
            pipe.hdel(keys.members, member)
            await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis: {exc}") from exc

    async def presence(self, session: str) -> list[dict[str, Any]]:
        keys = self._keys(session)
        infos = await self._eval(_PRESENCE_GET, (keys.presence, keys.members), ())
        return [orjson.loads(info) for info in infos]
