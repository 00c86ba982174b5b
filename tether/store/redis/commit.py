"""Commits of the Redis store: appends queued per session, flushed as batched script calls.

``append_future`` only encodes and enqueues: the event becomes the RESP-encoded keys and
arguments of the append script (``scripts.py``), so a flush only concatenates bytes. The first
append of a loop tick wakes a flusher task, which packs the queued events of many sessions
into ``EVALSHA`` calls of the append script (at most ``MAX_SCRIPT_EVENTS`` events each;
``on_batch`` hears each call's size) and pipelines them on its own connection.
``FLUSH_CONNECTIONS`` flushers share the sessions ready at a tick, so Redis runs one pipeline
while this process resolves or packs another; a session with a batch in flight waits for it,
so a session's appends commit in call order, and its queue grows into the next batch
meanwhile (group commit). Per session the script checks idempotency keys, concatenates token
streams, assigns seqs, XADDs, and PUBLISHes the committed events as one message; one call
costs Redis much less than one call per session.

A flush first waits for the SUBSCRIBE replies of listeners added before it (``pubsub.py``),
so they hear what it commits.

Failures: when a connection fails before a script call's reply is read, its callers get a
:class:`StoreError` although their events may have committed (retry with idempotency keys).
The same holds for a whole script call if Redis raises inside it (a key of the wrong type):
Redis does not roll scripts back. ``NOSCRIPT`` means the script did not run, so that call is
sent again after loading it.

Replication: Redis acknowledges a write before its replicas have it, so a failover can lose
acknowledged events. With ``wait_replicas=N`` in the URL a pipeline ends with ``WAIT N
timeout``, and its callers are answered only once N replicas have their events; if fewer do
in time, they get a :class:`StoreError` (outcome unknown, as above).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError

from tether.protocol.events import STREAM_APPEND, STREAM_END, Event, Sender
from tether.store.base import Appended, Retention, StoreError, StreamClosedError
from tether.store.redis.client import RedisClient
from tether.store.redis.codec import decode_sender
from tether.store.redis.keys import KeySpace, bulk
from tether.store.redis.pubsub import LiveChannel
from tether.store.redis.scripts import (
    APPEND,
    OP_APPEND,
    OP_END,
    OP_KEYED,
    OP_PLAIN,
    OUTCOME_DUPLICATE,
    OUTCOME_END,
    SPECIAL_WIDTH,
    Script,
)

log = logging.getLogger("tether.store.redis")

# One script call holds Redis for its whole run; bound it so other clients keep flowing.
MAX_SCRIPT_EVENTS = 512
# Pipelines in flight at once, each on its own connection.
FLUSH_CONNECTIONS = 2

_OP_BULK = tuple(bulk(str(code).encode()) for code in range(6))
_COUNT_BULK = tuple(bulk(str(n).encode()) for n in range(MAX_SCRIPT_EVENTS + 1))


class Op:
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


class NotSentError(RedisConnectionError):
    """The connection could not be made: no command was sent, so none ran."""


class NotReplicatedError(RedisError):
    """Fewer replicas than ``wait_replicas`` acknowledged a commit in time."""


def _fail(future: asyncio.Future[Appended], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


class CommitQueue:
    """Queued appends and the flusher tasks that commit them (module docstring)."""

    # The append script: the cluster's publishes on shard channels.
    script: Script = APPEND

    def __init__(self, client: RedisClient, keys: KeySpace, live: LiveChannel,
                 retention: Retention, on_batch: Callable[[int], None] | None) -> None:
        self._client = client
        self._script_resp = bulk(self.script.sha.encode())
        self._keys = keys
        self._keys_of = keys.of
        self._live = live
        self._on_batch = on_batch
        self._open = False
        self._closing = False
        self._pending: dict[str, list[Op]] = {}
        self._wake = asyncio.Event()
        self._busy: set[str] = set()  # sessions with a batch in flight
        self._idle_flushers = 0
        self._conns: list[AbstractConnection] = []
        self._flushers: list[asyncio.Task[None]] = []
        window = max(1, math.ceil(retention.idempotency_window * 1000))
        stream_ttl = max(1, math.ceil(retention.max_age * 1000))
        self._limits_resp = b"".join(
            bulk(b"%d" % n) for n in (retention.max_events, window, stream_ttl))
        self._loop: asyncio.AbstractEventLoop  # set by start()
        # WAIT numreplicas timeout, after each pipeline of commits (``_execute``).
        self._wait: list[bytes] | None = None
        if client.wait_replicas:
            self._wait = [b"*3\r\n$4\r\nWAIT\r\n" + bulk(b"%d" % client.wait_replicas)
                          + bulk(b"%d" % client.wait_timeout)]

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the flushers; appends are accepted from now on."""
        self._loop = asyncio.get_running_loop()
        for n in range(FLUSH_CONNECTIONS):
            conn = self._client.connection(socket_keepalive=True)
            self._conns.append(conn)
            self._flushers.append(asyncio.create_task(
                self._flush_loop(functools.partial(self._flush, conn)),
                name=f"tether-redis-flush-{n}"))
        self._open = True

    def stopping(self) -> None:
        """Refuse new appends; the flushers commit what is queued, then end."""
        self._open = False
        self._closing = True
        self._wake.set()

    async def close(self) -> None:
        self.stopping()
        await asyncio.gather(*self._flushers, return_exceptions=True)

    async def disconnect(self) -> None:
        for conn in self._conns:
            with contextlib.suppress(Exception):
                await conn.disconnect()

    # -- queueing ----------------------------------------------------------------------------

    def append_future(self, session: str, type: str, data: Any, sender: Sender,
                      key: str | None = None) -> asyncio.Future[Appended]:
        """Queue an append for the next batch; the future resolves at commit."""
        if not self._open:
            raise StoreError("store is closed" if self._closing else "store is not started")
        keys = self._keys_of(session)
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
            args = (bulk(orjson.dumps([type, sender_list, data]))
                    + bulk(orjson.dumps(text)[1:-1]))
            code, nargs = OP_APPEND, 3
            op_keys = keys.stream_resp(stream)
            nkeys = 2
        elif type == STREAM_END:
            stream = data["stream"].encode()
            end_data = {k: v for k, v in data.items() if k != "text"}
            end_data["text"] = ""
            args = bulk(orjson.dumps([type, sender_list, end_data]))
            code, nargs = OP_END, 2
            op_keys = keys.stream_resp(stream)
            nkeys = 2
        else:
            args = bulk(orjson.dumps([type, sender_list, data]))
            code, nargs = OP_PLAIN, 2
        if key is not None:
            code += OP_KEYED
            op_keys = keys.idempotency_resp(sender.sub.encode(), key) + op_keys
            nkeys += 1
        future: asyncio.Future[Appended] = self._loop.create_future()
        op = Op(type, data, sender, op_keys, nkeys, _OP_BULK[code] + args, nargs, future)
        queue = self._pending.get(session)
        if queue is None:
            self._pending[session] = [op]
        else:
            queue.append(op)
        if not self._wake.is_set():
            self._wake.set()
        return future

    # -- flushing ----------------------------------------------------------------------------

    async def _flush_loop(self, flush: Callable[[dict[str, list[Op]]], Awaitable[None]]) -> None:
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
                await flush(batch)
            except Exception as exc:
                log.exception("redis flush failed")
                for ops in batch.values():
                    for op in ops:
                        _fail(op.future, StoreError(f"redis: {exc}"))
            finally:
                self._busy.difference_update(batch)
                if self._pending:
                    self._wake.set()

    def _take(self) -> dict[str, list[Op]]:
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

    def _pack_call(self, segments: list[tuple[str, list[Op]]]) -> list[bytes]:
        keys: list[bytes] = []
        argv: list[bytes] = [self._limits_resp]
        nkeys, nargs = 0, 3
        keys_of, candidate = self._keys_of, self._keys.candidate
        for session, ops in segments:
            session_keys = keys_of(session)
            keys.append(session_keys.head_resp)
            argv.append(candidate(session)[1])
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
            3 + nkeys + nargs, self._script_resp, bulk(b"%d" % nkeys))
        return [header, *keys, *argv]

    async def _flush(self, conn: AbstractConnection, batch: dict[str, list[Op]]) -> None:
        if self._live.unconfirmed:
            # Listeners registered before these appends must hear them: wait for the
            # SUBSCRIBE replies (bounded: pub/sub is best effort anyway).
            await self._live.subscribed()
        calls: list[list[tuple[str, list[Op]]]] = []
        segments: list[tuple[str, list[Op]]] = []
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
        registered = self._keys.registered
        unregistered = [s for s in batch if s not in registered]
        if unregistered:
            commands.append([b"*%d\r\n$4\r\nSADD\r\n" % (2 + len(unregistered)),
                             bulk(self._keys.sessions),
                             *(bulk(s.encode()) for s in unregistered)])
        results = await self._execute(conn, commands)
        if unregistered and not isinstance(results[-1], Exception):
            registered.update(unregistered)
        for call, result in zip(calls, results, strict=False):
            self._resolve(call, result)
            if self._on_batch is not None:
                self._on_batch(sum(len(ops) for _, ops in call))

    async def _execute(self, conn: AbstractConnection,
                       commands: list[list[bytes]]) -> list[Any]:
        """Pipeline ``commands`` on ``conn``; errors come back as values, one per command.

        With ``wait_replicas``, a ``WAIT`` ends the pipeline: it answers once that many
        replicas have every write of this connection so far, or at ``wait_timeout``. If
        fewer did, every command's outcome is unknown, as if the connection had been lost:
        it ran on the master, but a failover now could lose it.
        """
        if conn.is_connected and await _stale(conn):
            # The server closed this idle connection (restart, timeout): reconnect rather than
            # fail a batch whose outcome would then be unknown.
            await conn.disconnect(nowait=True)
        if not conn.is_connected:
            connect: Callable[[], Awaitable[None]] = conn.connect
            try:
                await connect()
            except (RedisError, OSError) as exc:
                # Unlike a connection lost with calls in flight, this outcome is known.
                return [NotSentError(str(exc))] * len(commands)
        wait = self._wait
        results = await _roundtrip(conn, commands if wait is None else [*commands, wait])
        missing = [i for i, r in enumerate(results[:len(commands)])
                   if isinstance(r, NoScriptError)]
        if missing:
            # NOSCRIPT means the script did not run, so resending is safe.
            load = [b"*3\r\n$6\r\nSCRIPT\r\n$4\r\nLOAD\r\n" + bulk(self.script.source.encode())]
            resend = [load, *(commands[i] for i in missing)]
            again = await _roundtrip(conn, resend if wait is None else [*resend, wait])
            for i, result in zip(missing, again[1:], strict=False):
                results[i] = result
            if wait is not None:
                results[-1] = again[-1]
        if wait is None:
            return results
        acked = results.pop()
        if isinstance(acked, int) and acked >= self._client.wait_replicas:
            return results
        error = acked if isinstance(acked, Exception) else NotReplicatedError(
            f"committed on the master, but {acked} of {self._client.wait_replicas} "
            f"replicas acknowledged it within {self._client.wait_timeout} ms: "
            "a failover now would lose it")
        return [r if isinstance(r, Exception) else error for r in results]

    # -- answering ---------------------------------------------------------------------------

    def _resolve(self, call: list[tuple[str, list[Op]]], result: Any) -> None:
        """Answer the callers of one script call from its flat reply (see ``scripts.py``)."""
        if isinstance(result, Exception):
            error = StoreError(f"redis: {result}")
            for _, ops in call:
                for op in ops:
                    _fail(op.future, error)
            return
        epoch_taken = self._keys.epoch_taken
        now: int = result[0]
        pos = 1
        for session, ops in call:
            raw_epoch, seq, nvalues = result[pos], result[pos + 1], result[pos + 2]
            special = result[pos + 3:pos + 3 + nvalues]
            pos += 3 + nvalues
            epoch = raw_epoch.decode()
            epoch_taken(session, raw_epoch)
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
                width = SPECIAL_WIDTH[special[j + 1]]
                outcomes[special[j]] = special[j + 1:j + width]
                j += width
            for index, op in enumerate(ops, 1):
                outcome = outcomes.get(index)
                if outcome is None or outcome[0] == OUTCOME_END:
                    # A committed stream.end's stored data carries the text.
                    data = op.data if outcome is None else orjson.loads(outcome[1])[2]
                    if not op.future.done():
                        op.future.set_result(Appended(
                            Event(session, epoch, seq, op.type, data, op.sender, now), False))
                    seq += 1
                elif op.future.done():
                    pass
                elif outcome[0] == OUTCOME_DUPLICATE:
                    op.future.set_result(Appended(
                        _original(session, epoch, now, op, outcome), True))
                else:  # OUTCOME_CLOSED
                    stream = op.data.get("stream") if isinstance(op.data, dict) else None
                    op.future.set_exception(StreamClosedError(f"stream {stream!r} has ended"))


def _original(session: str, epoch: str, now: int, op: Op, outcome: list[Any]) -> Event:
    """The event a duplicate idempotency key refers to."""
    _, seq, time, payload = outcome
    if not payload:
        # The original was trimmed away; the request is the best description left.
        return Event(session, epoch, seq, op.type, op.data, op.sender, now)
    raw = orjson.loads(payload)
    return Event(session, epoch, seq, raw[0], raw[2], decode_sender(raw[1]), time)


async def _stale(conn: AbstractConnection) -> bool:
    """Whether an idle connection has unread bytes (the server closed it or sent an error)."""
    # can_read() replaced can_read_destructive() in redis-py 8 (tether supports 5.3 and later);
    # both only look at buffers.
    check = getattr(conn, "can_read", None) or conn.can_read_destructive
    try:
        return bool(await check())
    except (RedisError, OSError):
        return True


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
