"""The session service: every operation on a session, written once for every transport.

A transport (the WebSocket endpoint, HTTP, SSE, AG-UI, and whatever comes next) parses its own
wire format, identifies a :class:`Caller`, and then calls this service; it never touches the
store, the hub or the run manager for session work itself. So publish (validation, limits,
idempotency, commit, run triggering), attach (the resume decision, subscribe-then-read,
snapshot or replay), presence and run control behave the same whatever the wire.

Failures are :class:`~tether.protocol.codes.TetherError` subclasses carrying their code; each
transport translates them in one place (an ``error`` frame, an HTTP JSON body).

The hot path stays free of tasks: :meth:`SessionService.publish` returns the store's commit
future itself, with the service's own bookkeeping attached as a done-callback registered
before the transport's, so a reply costs no coroutine.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import orjson

from tether.protocol.codes import ErrorCode, RequestError, TetherError
from tether.protocol.cursor import Cursor, CursorError, epoch_belongs
from tether.protocol.events import (
    CONTROL_TYPES,
    PRESENCE_JOIN,
    PRESENCE_LEAVE,
    PRESENCE_UPDATE,
    SERVER_TYPES,
    STREAM_APPEND,
    STREAM_END,
    SYSTEM,
    Event,
    Sender,
    check_event_type,
    check_stream_data,
    valid_session_id,
)
from tether.protocol.frames import event_frame
from tether.server.auth import Grant, require
from tether.server.config import ServerConfig
from tether.server.hub import Hub, Peer, Subscription
from tether.server.metrics import Metrics
from tether.store.base import (
    Appended,
    Head,
    PresenceStore,
    SessionStore,
    StoreError,
    now_ms,
)

if TYPE_CHECKING:
    from tether.agents.runner import RunManager

log = logging.getLogger("tether.sessions")

# What a transport is called with once a publish is done (committed, refused or failed).
Reply = Callable[["asyncio.Future[Appended]"], None]
# set_presence, then presence (session, member, info, ttl): see SharedStore.join_presence.
JoinPresence = Callable[[str, str, dict[str, Any], float],
                        Coroutine[Any, Any, list[dict[str, Any]]]]

SHUTDOWN_WAIT = 2.0  # seconds a stopping node waits for close handshakes
HEALTH_SESSION = "tether.healthz"  # the server's own: probe commits of /healthz


# --- pure rules ----------------------------------------------------------------------------


class TokenBucket:
    """A publish-rate limit: ``rate`` per second sustained, ``capacity`` in a burst."""

    __slots__ = ("capacity", "rate", "stamp", "tokens")

    def __init__(self, rate: float, capacity: int) -> None:
        self.rate = rate
        # As given, not float(capacity): the config's own int, shared by every connection's
        # bucket instead of two floats each; ``tokens`` turns float when first taken from.
        self.capacity: float = capacity
        self.tokens: float = capacity
        self.stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def wait(self) -> float:
        """Seconds until one token is back."""
        return (1.0 - self.tokens) / self.rate if self.rate > 0 else 1.0


class StoreHealth:
    """Whether the store commits: seen from every publish, and probed when nothing was seen.

    A store whose reads work while its commits fail (a full disk) answers ``head`` happily;
    what counts is the outcome of commits. The state changes are logged once each, not per
    request.
    """

    def __init__(self) -> None:
        self.failing_since: float | None = None
        self.reason = ""
        self.last_ok = 0.0

    def ok(self) -> None:
        self.last_ok = time.monotonic()
        if self.failing_since is not None:
            log.warning("store commits again after %.1f s of failures",
                        time.monotonic() - self.failing_since)
            self.failing_since = None
            self.reason = ""

    def failed(self, reason: str) -> None:
        if self.failing_since is None:
            self.failing_since = time.monotonic()
            log.error("store cannot commit: %s", reason)
        self.reason = reason

    def unhealthy_for(self) -> float:
        """Seconds the store has been failing (0 when it is not)."""
        return 0.0 if self.failing_since is None else time.monotonic() - self.failing_since


RateLimit = Literal["publish", "presence", "attach"]
CountLimit = Literal["connections", "streams"]


class _Subject:
    __slots__ = ("buckets", "counts")

    def __init__(self, config: ServerConfig) -> None:
        self.buckets: dict[RateLimit, TokenBucket] = {
            "publish": TokenBucket(config.subject_publish_rate, config.subject_publish_burst),
            "presence": TokenBucket(config.subject_presence_rate, config.subject_presence_burst),
            "attach": TokenBucket(config.subject_attach_rate, config.subject_attach_burst),
        }
        self.counts: dict[CountLimit, int] = {"connections": 0, "streams": 0}


class SubjectLimits:
    """Limits per subject (a token's ``sub``), whatever the transport or connection count.

    Rates are token buckets; a refusal is ``rate_limited`` with ``retry_after``. Counts (open
    connections, open streams) are taken on open and given back on close. Subjects with
    nothing open are forgotten least recently used first beyond ``MAX_SUBJECTS``: a
    forgotten subject starts again with a full bucket, which costs at most one burst.
    """

    MAX_SUBJECTS = 100_000

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._subjects: dict[str, _Subject] = {}

    def _of(self, sub: str) -> _Subject:
        subject = self._subjects.pop(sub, None)
        if subject is None:
            subject = _Subject(self.config)
            if len(self._subjects) >= self.MAX_SUBJECTS:
                self._forget_idle()
        self._subjects[sub] = subject  # re-inserted: dict order is recency
        return subject

    def _forget_idle(self) -> None:
        for name in list(self._subjects)[: self.MAX_SUBJECTS // 10]:
            subject = self._subjects[name]
            if not any(subject.counts.values()):
                del self._subjects[name]

    def take(self, sub: str, what: RateLimit) -> None:
        """Take one ``publish`` / ``presence`` / ``attach`` from ``sub``'s bucket, or refuse."""
        bucket = self._of(sub).buckets[what]
        if bucket.rate <= 0 or bucket.take():
            return
        raise RequestError(ErrorCode.RATE_LIMITED,
                           f"more than {bucket.rate:g} {what} per second for subject {sub!r}",
                           retry_after=bucket.wait())

    def open(self, sub: str, what: CountLimit) -> None:
        """Count one more open ``connections`` / ``streams`` of ``sub``, or refuse."""
        limit = (self.config.subject_connections if what == "connections"
                 else self.config.subject_streams)
        counts = self._of(sub).counts
        if limit and counts[what] >= limit:
            raise RequestError(ErrorCode.RATE_LIMITED,
                               f"subject {sub!r} has {limit} open {what} already",
                               retry_after=1.0)
        counts[what] += 1

    def close(self, sub: str, what: CountLimit) -> None:
        subject = self._subjects.get(sub)
        if subject is not None:
            subject.counts[what] = max(0, subject.counts[what] - 1)


def parse_session(session: object) -> str:
    """``session`` if it is a valid session id; else ``invalid``."""
    if not valid_session_id(session):
        raise RequestError(ErrorCode.INVALID, "invalid session id")
    assert isinstance(session, str)
    return session


def parse_cursor(text: str | None, session: str) -> Cursor | None:
    """A cursor from its text (None when absent); ``bad_cursor`` if malformed or foreign."""
    if not text:
        return None
    try:
        cursor = Cursor.parse(text)
    except CursorError as exc:
        raise RequestError(ErrorCode.BAD_CURSOR, str(exc)) from None
    check_cursor(cursor, session)
    return cursor


def check_cursor(cursor: Cursor | None, session: str) -> None:
    if cursor is not None and not epoch_belongs(cursor.epoch, session):
        raise RequestError(ErrorCode.BAD_CURSOR, "cursor belongs to another session")


def resume_decision(cursor: Cursor | None, head: Head) -> tuple[bool, int, str | None]:
    """Whether an attach at ``cursor`` resumes, the seq to continue after, and why not.

    ``cursor`` must already be known to belong to this session.
    """
    if cursor is None:
        if head.first_seq <= 1:
            return True, 0, None
        return False, head.last_seq, "history_trimmed"
    if cursor.epoch != head.epoch:
        return False, head.last_seq, "epoch_changed"
    if cursor.seq > head.last_seq:
        raise RequestError(ErrorCode.BAD_CURSOR, "cursor is ahead of the session's log")
    if cursor.seq < head.first_seq - 1:
        return False, head.last_seq, "cursor_expired"
    return True, cursor.seq, None


def validate_event(event_type: str, data: Any, max_bytes: int, transient: bool,
                   max_depth: int = 32, server_written: bool = False) -> None:
    """Raise :class:`RequestError` unless the event may be published."""
    check_event_type(event_type)
    if event_type in SERVER_TYPES and not server_written:
        raise RequestError(ErrorCode.FORBIDDEN, f"only the server writes {event_type!r} events")
    if event_type in CONTROL_TYPES and transient:
        raise RequestError(ErrorCode.INVALID, "run control events cannot be transient")
    if event_type in (STREAM_APPEND, STREAM_END):
        if transient:
            raise RequestError(ErrorCode.INVALID, "stream events cannot be transient")
        problem = check_stream_data(event_type, data)
        if problem is not None:
            raise RequestError(ErrorCode.INVALID, problem)
    check_value(data, max_bytes, max_depth, "event data")


def check_value(value: Any, max_bytes: int, max_depth: int, what: str) -> int:
    """Raise unless ``value`` is deliverable in every wire format; return its JSON size.

    Deliverable means: nested at most ``max_depth`` deep (the frame around it adds two levels,
    far below every encoder's own limit), encodable by orjson — which refuses what MessagePack
    clients can send but JSON cannot carry: bytes, extension types, non-string keys, integers
    beyond 64 bits, lone surrogates — and at most ``max_bytes`` as JSON. What passes encodes as
    JSON, MessagePack and SSE alike, so no accepted event can break a reader later.
    """
    too_deep = _deeper_than(value, max_depth)
    if too_deep:
        raise RequestError(ErrorCode.INVALID, f"{what} is nested more than {max_depth} deep")
    try:
        size = len(orjson.dumps(value))
    except TypeError as exc:
        raise RequestError(ErrorCode.INVALID, f"{what} is not JSON-compatible: {exc}") from None
    if size > max_bytes:
        raise RequestError(ErrorCode.TOO_LARGE, f"{what} is {size} bytes, more than {max_bytes}")
    return size


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether containers in ``value`` nest more than ``limit`` deep (iterative: no recursion
    limit to hit on hostile input)."""
    if not isinstance(value, dict | list):
        return False
    children = value.values() if isinstance(value, dict) else value
    for child in children:
        if isinstance(child, dict | list):
            break
    else:
        return limit < 1  # flat, the common case: no stack to build
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        for child in children:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return False


def as_error(exc: BaseException) -> TetherError:
    """The error to report for a failed operation: its own code, else ``internal`` (a bug:
    validation admits only what every store and encoder takes)."""
    if isinstance(exc, TetherError):
        return exc
    return RequestError(ErrorCode.INTERNAL, "internal error")


# --- who acts ------------------------------------------------------------------------------


@dataclass(slots=True)
class Caller:
    """Who acts on sessions, whatever the transport: a verified grant and an identity.

    A WebSocket connection is one caller for its lifetime; an HTTP request is one for the
    request. ``bucket`` limits its publish rate (None: not limited here).
    """

    grant: Grant
    sender: Sender
    connection: str = ""  # a short id of the transport connection, for presence member ids
    device: str = ""
    tools: tuple[str, ...] = ()
    bucket: TokenBucket | None = None
    # session → member info; None until the first join (most connections never join: an
    # empty dict each would be ~64 bytes per idle connection)
    presence: dict[str, dict[str, Any]] | None = None

    @property
    def member_id(self) -> str:
        return f"{self.sender.sub}/{self.sender.client}/{self.connection}"

    def require(self, session: str, cap: str) -> None:
        require(self.grant, session, cap)


class Live(Protocol):
    """An open delivery (a WebSocket, an SSE stream) the service ends at token expiry and at
    shutdown, on every transport alike."""

    @property
    def caller(self) -> Caller | None: ...

    def expire(self) -> None:
        """The token expired: end with the transport's "token expired" signal."""

    async def shutdown(self) -> None:
        """The node is stopping: end with the transport's "reconnect" signal."""


class Catchup(enum.Enum):
    """What an attach that cannot resume gives the reader."""

    SNAPSHOT = "snapshot"  # the recent history, compacted, in the attached reply
    REPLAY = "replay"  # everything retained, from its beginning, as ordinary events


@dataclass(slots=True)
class Attachment:
    """The outcome of an attach: the subscription (buffering) and the reply's contents.

    The transport sends its reply (``attached``), then calls :meth:`start` so that live and
    missed events follow the reply, in order.
    """

    session: str
    subscription: Subscription
    head: Head
    cursor: Cursor  # where the reader stands after the reply
    after: int  # the seq delivery continues after
    resumed: bool
    reason: str | None
    snapshot: list[dict[str, Any]] | None = None

    def start(self) -> None:
        self.subscription.catch_up("attach")


@dataclass(frozen=True, slots=True)
class History:
    session: str
    events: list[Event]
    head: Head
    cursor: Cursor
    resumed: bool
    reason: str | None

    @property
    def more(self) -> bool:
        return self.cursor.seq < self.head.last_seq


# --- the service ---------------------------------------------------------------------------


class SessionService:
    """Publish, attach, history, presence and run control for every transport of a node."""

    def __init__(self, config: ServerConfig, store: SessionStore, presence: PresenceStore,
                 hub: Hub, runs: RunManager, metrics: Metrics) -> None:
        self.config = config
        self.store = store
        self.presence = presence
        self.hub = hub
        self.runs = runs
        self.metrics = metrics
        self.live: set[Live] = set()  # open deliveries: ended at token expiry and shutdown
        self.limits = SubjectLimits(config)
        self.health = StoreHealth()
        self._background: set[asyncio.Task[Any]] = set()
        # A presence store that sets a member and lists the members in one call (optional).
        self._join_presence: JoinPresence | None = getattr(presence, "join_presence", None)

    # --- publish -----------------------------------------------------------------------------

    def publish(self, caller: Caller, session: str, type: str, data: Any,
                key: str | None = None, transient: bool = False, *,
                server_written: bool = False, reply: Reply | None = None,
                ) -> asyncio.Future[Appended]:
        """Validate (raising at once) and commit; the future resolves after the commit.

        Control events (``run.cancel`` …) go to the run manager, which validates them against
        the run before anything is written; transient events are fanned out, not stored
        (seq 0). ``server_written`` is for a transport writing its own records (types in
        ``SERVER_TYPES``, such as a Durable Streams stream's ``ds.*`` events) on a caller's
        behalf: the caller's capability and limits still apply. A committed ``message`` from
        a person may start a run, in the background: the reply does not wait for it.
        ``reply`` is called with the future once it is done, after the service's own
        bookkeeping and in the same callback (one loop callback per publish, not two).
        """
        caller.require(session, "publish")
        bucket = caller.bucket
        if bucket is not None and not bucket.take():
            raise RequestError(ErrorCode.RATE_LIMITED,
                               f"more than {self.config.publish_rate:g} publishes/s",
                               retry_after=bucket.wait())
        self.limits.take(caller.sender.sub, "publish")
        validate_event(type, data, self.config.max_event_bytes, transient,
                       self.config.max_event_depth, server_written)
        future: asyncio.Future[Appended]
        if type in CONTROL_TYPES:
            # Not on the data path: a cancel must not wait behind queued data.
            future = asyncio.ensure_future(
                self.runs.control(session, type, data, caller.sender, caller.grant))
        elif transient:
            future = asyncio.ensure_future(self._publish_transient(
                Event(session, "", 0, type, data, caller.sender, now_ms(), transient=True)))
        else:
            try:
                future = self.store.append_future(session, type, data, caller.sender, key)
            except StoreError as exc:
                self.health.failed(str(exc))
                raise
            future.add_done_callback(self._committed if reply is None
                                     else functools.partial(self._committed, reply=reply))
            return future
        if reply is not None:
            future.add_done_callback(reply)
        return future

    async def _publish_transient(self, event: Event) -> Appended:
        await self.store.publish_transient(event)
        self.metrics.hot.published_transient += 1
        return Appended(event, duplicate=False)

    def _committed(self, future: asyncio.Future[Appended], reply: Reply | None = None) -> None:
        try:
            if not future.cancelled():
                exc = future.exception()
                if exc is None:
                    self.health.ok()
                    appended = future.result()
                    self.metrics.hot.published_stored += 1
                    if not appended.duplicate and appended.event.type == "message":
                        self.background(self.runs.on_committed(appended.event))
                elif isinstance(exc, StoreError):
                    self.health.failed(str(exc))
        finally:
            if reply is not None:
                reply(future)  # whatever the bookkeeping did: the transport counts on it

    # --- reading -----------------------------------------------------------------------------

    async def position(self, session: str, cursor: Cursor | None) -> tuple[Head, bool, int,
                                                                           str | None]:
        """The head of ``session`` and the resume decision for ``cursor``."""
        check_cursor(cursor, session)
        head = await self.store.head(session)
        resumed, after, reason = resume_decision(cursor, head)
        return head, resumed, after, reason

    async def history(self, caller: Caller, session: str, cursor: Cursor | None, limit: int,
                      compact: bool = False) -> History:
        """One page of the log after ``cursor`` (from what is retained when it cannot
        resume, saying so)."""
        caller.require(session, "subscribe")
        head, resumed, after, reason = await self.position(session, cursor)
        if not resumed:
            after = head.first_seq - 1
        events = await self.store.read(session, after, limit)
        if compact:
            events = _compacted(events)
        last = events[-1].seq if events else after
        return History(session, events, head, Cursor(head.epoch, last), resumed, reason)

    async def attach(self, caller: Caller, peer: Peer, session: str, cursor: Cursor | None, *,
                     catchup: Catchup = Catchup.SNAPSHOT,
                     replacing: Subscription | None = None) -> Attachment:
        """Subscribe ``peer`` to ``session`` from ``cursor`` (buffering until ``start()``).

        Subscribes before reading anything, so no commit can fall between history and live.
        ``replacing`` (an earlier attach of the same peer) is dropped only once this one can
        proceed.
        """
        caller.require(session, "subscribe")
        self.limits.take(caller.sender.sub, "attach")
        head, resumed, after, reason = await self.position(session, cursor)
        if not resumed and catchup is Catchup.REPLAY:
            after = head.first_seq - 1
        if replacing is not None:
            self.hub.unsubscribe(replacing)
        sub = self.hub.subscribe(peer, session, head.epoch, after)
        attachment = Attachment(session, sub, head, Cursor(head.epoch, after), after, resumed,
                                reason)
        try:
            if not resumed and catchup is Catchup.SNAPSHOT:
                attachment.snapshot, sub.last_seq = await self._snapshot(session, head)
                attachment.cursor = Cursor(head.epoch, sub.last_seq)
        except BaseException:
            self.hub.unsubscribe(sub)
            raise
        if cursor is not None or not resumed:
            self.metrics.resumes.labels("true" if resumed else "false").inc()
        return attachment

    def detach(self, sub: Subscription) -> None:
        self.hub.unsubscribe(sub)

    async def _snapshot(self, session: str, head: Head) -> tuple[list[Any], int]:
        """The recent history, compacted (deltas of ended streams dropped), and its last seq."""
        limit = self.config.snapshot_events
        after = max(head.first_seq - 1, head.last_seq - limit)
        events = await self.store.read(session, after, limit)
        last = events[-1].seq if events else head.last_seq
        return [event_frame(e) for e in _compacted(events)], max(last, head.last_seq)

    # --- presence ----------------------------------------------------------------------------

    async def join(self, caller: Caller, session: str, state: dict[str, Any]
                   ) -> list[dict[str, Any]]:
        """Make ``caller`` present in ``session`` (if its token allows presence); the
        session's members, ``caller`` among them when it joined."""
        if not caller.grant.allows(session, "presence"):
            return await self.members(session)
        self._check_presence(caller, session, state)
        member = caller.member_id
        info = {"member": member, "sub": caller.sender.sub,
                "client": caller.sender.client, "device": caller.device,
                "kind": caller.sender.kind, "tools": list(caller.tools), "state": state,
                "since": now_ms()}
        if caller.presence is None:
            caller.presence = {}
        caller.presence[session] = info
        ttl = self.config.presence_ttl
        if self._join_presence is not None:
            # One round trip to a shared store instead of two (see SharedStore.join_presence).
            members = await self._join_presence(session, member, info, ttl)
            await self._announce(session, PRESENCE_JOIN, info)
            return members
        await self.presence.set_presence(session, member, info, ttl)
        await self._announce(session, PRESENCE_JOIN, info)
        return await self.members(session)

    async def members(self, session: str) -> list[dict[str, Any]]:
        return await self.presence.presence(session)

    async def update_presence(self, caller: Caller, session: str,
                              state: dict[str, Any]) -> dict[str, Any]:
        caller.require(session, "presence")
        info = caller.presence.get(session) if caller.presence else None
        if info is None:
            raise RequestError(ErrorCode.NOT_ATTACHED, f"not attached to {session!r}")
        self._check_presence(caller, session, state)
        self.limits.take(caller.sender.sub, "presence")
        info["state"] = state
        await self.presence.set_presence(session, info["member"], info, self.config.presence_ttl)
        await self._announce(session, PRESENCE_UPDATE, info)
        return info

    def _check_presence(self, caller: Caller, session: str, state: dict[str, Any]) -> None:
        """A presence state goes to every member of the session, in their wire format: the
        same rules as event data, a smaller size per member and a budget per caller."""
        config = self.config
        size = check_value(state, config.max_presence_bytes, config.max_event_depth,
                           "presence state")
        joined = caller.presence or {}
        others = sum(len(orjson.dumps(info["state"])) for s, info in joined.items()
                     if s != session)
        if others + size > config.max_presence_total_bytes:
            raise RequestError(ErrorCode.TOO_LARGE,
                               f"presence states of one connection exceed "
                               f"{config.max_presence_total_bytes} bytes")

    async def leave(self, caller: Caller, session: str) -> None:
        """``caller`` is no longer present in ``session``; store failures are logged only."""
        info = caller.presence.pop(session, None) if caller.presence else None
        if info is None:
            return
        try:
            await self.presence.clear_presence(session, info["member"])
            await self._announce(session, PRESENCE_LEAVE, info)
        except TetherError as exc:
            log.warning("presence leave of %s failed: %s", session, exc)

    async def refresh_presence(self, caller: Caller) -> None:
        for session, info in list((caller.presence or {}).items()):
            await self.presence.set_presence(session, info["member"], info,
                                          self.config.presence_ttl)

    async def _announce(self, session: str, kind: str, info: dict[str, Any]) -> None:
        await self.store.publish_transient(
            Event(session, "", 0, kind, info, SYSTEM, now_ms(), transient=True))

    def watch(self, caller: Caller, session: str) -> Watch:
        """A wake-up for a reader that polls the log (long-poll, Durable Streams SSE).

        Use it as a context manager and read *inside* it: the listener is registered on
        entry, before the read, so no commit can fall between the read and the wait.
        """
        caller.require(session, "subscribe")
        return Watch(self.store, session, self.config.tail_check_interval)

    # --- runs --------------------------------------------------------------------------------

    async def start_run(self, caller: Caller, session: str, agent_name: str | None,
                        input: Any) -> tuple[str, str]:
        """Start a run of the session's agent (or the named one); (run id, agent name)."""
        caller.require(session, "publish")
        agent = self.runs.agent_for(session, agent_name)
        if agent is None:
            raise RequestError(ErrorCode.NOT_FOUND, f"no agent serves {session!r}" + (
                f" under the name {agent_name!r}" if agent_name else ""))
        run = await self.runs.create_run(session, agent, input, "api")
        return run, agent.name

    async def check_store(self, probe_after: float = 10.0) -> tuple[bool, str]:
        """(healthy, reason): unhealthy once commits have failed for ``store_unhealthy_after``.

        Without a commit seen for ``probe_after`` seconds, commit a probe event (to the
        server's own ``tether.healthz`` session) to find out.
        """
        if time.monotonic() - self.health.last_ok > probe_after or self.health.failing_since:
            try:
                await asyncio.wait_for(self.store.append(
                    HEALTH_SESSION, "tether.probe", None, SYSTEM), 2.0)
                self.health.ok()
            except TimeoutError:
                self.health.failed("a probe commit took more than 2 s")
            except StoreError as exc:
                self.health.failed(str(exc))
        if self.health.unhealthy_for() >= self.config.store_unhealthy_after \
                and self.health.failing_since is not None:
            return False, self.health.reason
        return True, ""

    # --- lifetime ----------------------------------------------------------------------------

    def expire_tokens(self) -> None:
        """End every open delivery whose token has expired."""
        now = time.time()
        for live in list(self.live):
            caller = live.caller
            exp = caller.grant.exp if caller is not None else None
            if exp is not None and exp <= now:
                live.expire()

    async def refresh_presence_all(self) -> None:
        """Keep the presence of every open delivery from expiring."""
        for live in list(self.live):
            caller = live.caller
            if caller is not None and caller.presence:
                await self.refresh_presence(caller)

    async def shutdown(self) -> None:
        """End every open delivery, waiting briefly for close handshakes."""
        ends = [asyncio.ensure_future(live.shutdown()) for live in list(self.live)]
        if ends:
            await asyncio.wait(ends, timeout=SHUTDOWN_WAIT)

    def background(self, coro: Any) -> None:
        """Run ``coro`` as a task kept until it ends; its failure is logged."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())


class Watch:
    """Set when ``session`` commits an event (see :meth:`SessionService.watch`).

    On a store whose live channel may lose events (Redis pub/sub), :meth:`wait` also returns
    True every ``recheck`` seconds, so the reader looks at the log again instead of sleeping
    through a lost notification. :meth:`take` hands over the committed events heard since the
    last call, so a reader whose position they directly follow need not read them back.
    """

    MAX_HELD = 1000  # events kept for take(); beyond, the reader reads the log instead

    def __init__(self, store: SessionStore, session: str, recheck: float) -> None:
        self._store = store
        self._session = session
        self._recheck = recheck if store.live_is_lossy else None
        self._changed = asyncio.Event()
        self._held: list[Event] | None = []  # None: more than MAX_HELD came

    def _on_event(self, event: Event) -> None:
        if not event.transient:
            self._changed.set()
            if self._held is not None:
                self._held.append(event)
                if len(self._held) > self.MAX_HELD:
                    self._held = None

    def take(self) -> list[Event] | None:
        """The committed events heard since the last call, in the order heard; None when
        too many came to keep (read the log)."""
        held, self._held = self._held, []
        return held

    def __enter__(self) -> Watch:
        self._store.listen(self._session, self._on_event)
        return self

    def __exit__(self, *exc: object) -> None:
        self._store.unlisten(self._session, self._on_event)

    async def wait(self, seconds: float) -> bool:
        """Whether the session may have changed within ``seconds`` (False: nothing came)."""
        limit = max(0.0, seconds)
        if self._recheck is not None and self._recheck < limit:
            limit = self._recheck
            timed_out = True
        else:
            timed_out = False
        try:
            await asyncio.wait_for(self._changed.wait(), limit)
        except TimeoutError:
            return timed_out  # a lossy store's periodic look at the log counts as a change
        self._changed.clear()
        return True


def _compacted(events: list[Event]) -> list[Event]:
    """``events`` without the deltas of streams that end among them (the end holds the text)."""
    ended = {e.stream for e in events if e.type == STREAM_END}
    return [e for e in events if not (e.type == STREAM_APPEND and e.stream in ended)]


def new_connection_id() -> str:
    return secrets.token_hex(6)

