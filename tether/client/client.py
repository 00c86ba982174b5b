"""The asyncio client: sockets, tasks, futures and queues around :mod:`tether.client.protocol`.

This module owns I/O only: connecting with aiohttp, the reconnect loop (exponential backoff with
full jitter), the per-connection writer and heartbeat watchdog, the bounded per-session queues
and the futures of pending calls. Every protocol decision (dedupe, epochs, replay of pending
publishes and their order, re-attach cursors) is made by
:class:`~tether.client.protocol.ClientProtocol`.

Usage::

    async with tether.Client("ws://127.0.0.1:8765", token=TOKEN) as client:
        session = await client.attach("demo", cursor=saved_cursor)   # None = from the start
        cursor = await session.publish("message", {"text": "hi"})    # returns after commit
        async for item in session:          # ordered, exactly once, across reconnects
            ...

Backpressure: each session has a bounded queue. When the application stops iterating and the
queue fills, the client stops reading the socket, so TCP pushes back to the server (whose hub
then serves this peer from the store when it catches up). Reading resumes as soon as the queue
has room, or as soon as something else needs the socket: a reply to a pending call, or another
session whose iterator is waiting. Then the full session is put in *overflow*: its events are
dropped and, once the application has drained half its queue, it is re-attached from the last
queued cursor, so nothing is lost or duplicated. This keeps memory bounded without letting an
unread session deadlock a ``publish`` or starve the other sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
import logging
import random
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from types import MappingProxyType, TracebackType
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from tether.client.errors import (
    AttachError,
    ClientClosed,
    ConnectionFailed,
    PublishError,
    RequestFailed,
    SessionClosed,
    TetherError,
)
from tether.client.protocol import (
    BACKOFF_BASE,
    BACKOFF_CAP,
    INTERRUPT_TYPES,
    Attached,
    AttachFailed,
    ClientProtocol,
    Completed,
    Deliver,
    Failed,
    Frame,
    Heartbeat,
    Notice,
    Outcome,
    PresenceChanged,
    RetryLater,
    Send,
    SessionItem,
    Snapshot,
    Welcomed,
    backoff_delay,
)
from tether.protocol.codec import JSON, MSGPACK, Codec, DecodeError
from tether.protocol.codes import CloseCode, retry_after_from_reason, should_reconnect
from tether.protocol.frames import CLIENT_KINDS

log = logging.getLogger("tether.client")

WS_PATH: Final = "/v1/ws"

TokenSource = str | Callable[[], str | Awaitable[str]] | None
StateCallback = Callable[["ConnectionState"], None]
PresenceCallback = Callable[["Session", str, tuple[dict[str, Any], ...]], None]


class ConnectionState(enum.Enum):
    """Where the client's connection stands; see :meth:`Client.on_state`."""

    CONNECTING = "connecting"  # the first connection attempt (or before connect())
    CONNECTED = "connected"  # welcomed; sessions are (being) re-attached
    RECONNECTING = "reconnecting"  # connection lost; retrying with backoff
    CLOSED = "closed"  # closed by the application or stopped for good


class SessionState(enum.Enum):
    """Where one :class:`Session` stands; read it from :attr:`Session.state`.

    The allowed moves are :data:`SESSION_TRANSITIONS`; ``DETACHED`` and ``CLOSED`` are final.
    """

    ATTACHING = "attaching"  # attach() sent (or waiting for a connection); not attached yet
    ATTACHED = "attached"  # attached on the current connection: events flow
    REATTACHING = "reattaching"  # was attached; connection lost (or the server refused the
    # re-attach for now): re-attaching from the last cursor, with no gap and no duplicate
    DETACHING = "detaching"  # detach() called: no new publishes; pending ones finish first
    DETACHED = "detached"  # detached by the application; queued items can still be iterated
    CLOSED = "closed"  # the client closed or stopped, or the server refused the (re-)attach


SESSION_TRANSITIONS: Final[Mapping[SessionState, frozenset[SessionState]]] = MappingProxyType({
    SessionState.ATTACHING: frozenset({SessionState.ATTACHED, SessionState.DETACHING,
                                       SessionState.CLOSED}),
    SessionState.ATTACHED: frozenset({SessionState.REATTACHING, SessionState.DETACHING,
                                      SessionState.CLOSED}),
    SessionState.REATTACHING: frozenset({SessionState.ATTACHED, SessionState.DETACHING,
                                         SessionState.CLOSED}),
    SessionState.DETACHING: frozenset({SessionState.DETACHED, SessionState.CLOSED}),
    SessionState.DETACHED: frozenset(),
    SessionState.CLOSED: frozenset(),
})
"""Every allowed move of :class:`SessionState`; anything else is a bug and raises."""


def ws_url(url: str) -> str:
    """``ws://host:port`` → ``ws://host:port/v1/ws``; a URL with a path is kept as given."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss", "http", "https"):
        raise ValueError(f"unsupported URL scheme {parts.scheme!r}: use ws:// or wss://")
    if parts.path in ("", "/"):
        parts = parts._replace(path=WS_PATH)
    return urlunsplit(parts)


class _End:
    """Sentinel returned by a finished session queue."""


_END: Final = _End()


class _ItemQueue:
    """A session's bounded FIFO of delivered items, with the waiters the reader needs to see.

    ``asyncio.Queue`` would do for put/get, but the reader must know whether a consumer is
    waiting (demand) and must be able to enqueue a snapshot beyond the bound.
    """

    def __init__(self, maxsize: int, on_space: Callable[[], None]) -> None:
        self.maxsize = maxsize
        self.items: deque[SessionItem] = deque()
        self.waiting = 0
        self.finished = False
        self.error: BaseException | None = None
        self._not_empty = asyncio.Event()
        self._on_space = on_space

    def full(self) -> bool:
        return len(self.items) >= self.maxsize

    def put(self, item: SessionItem) -> None:
        self.items.append(item)
        self._not_empty.set()

    def finish(self, error: BaseException | None) -> None:
        """No more items will come; consumers drain what is queued, then stop (or raise)."""
        if not self.finished:
            self.finished = True
            self.error = error
        self._not_empty.set()

    async def get(self) -> SessionItem | _End:
        while not self.items:
            if self.finished:
                if self.error is not None:
                    raise self.error
                return _END
            self._not_empty.clear()
            self.waiting += 1
            self._on_space()  # a waiting consumer is demand: the reader must not stay paused
            try:
                await self._not_empty.wait()
            finally:
                self.waiting -= 1
        item = self.items.popleft()
        self._on_space()
        return item


class _Connection:
    """One WebSocket and the tasks that live exactly as long as it."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.outbox: deque[Frame] = deque()
        self.outbox_ready = asyncio.Event()
        self.welcomed = asyncio.Event()
        self.heartbeat: Heartbeat | None = None
        self.dropped: str | None = None  # why we closed it ourselves, if we did
        self.tasks: list[asyncio.Task[None]] = []


class Stream:
    """A token stream in a session: ``stream.append`` deltas, then one ``stream.end``.

    ``async with session.stream() as s: await s.append("Hel"); await s.append("lo")`` ends the
    stream on exit; the store fills the final text into ``stream.end`` from the deltas.
    """

    def __init__(self, session: Session, stream_id: str) -> None:
        self.session = session
        self.id = stream_id
        self.ended = False

    async def append(self, text: str) -> str | None:
        """Publish one delta; returns its cursor once committed."""
        return await self.session.publish("stream.append", {"stream": self.id, "text": text})

    async def end(self) -> str | None:
        """End the stream; returns the cursor of the ``stream.end`` event."""
        self.ended = True
        return await self.session.publish("stream.end", {"stream": self.id})

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        # End even on error: followers must see the stream finish rather than hang open.
        if not self.ended:
            await self.end()


class Session:
    """One attached session: publish into it, iterate its events, see who is present.

    Iterating yields, in order and exactly once across reconnects:

    * :class:`~tether.client.protocol.SessionEvent` for each event (``transient=True`` for
      ephemeral ones, which have no cursor and are not persisted);
    * :class:`~tether.client.protocol.Snapshot` when continuity was lost (the server could not
      resume from the held cursor: new epoch, expired cursor, trimmed history). It carries the
      recent history and the new position, and is never skipped: the events after it continue
      from ``snapshot.cursor``. It has the same read-only attributes as an event (``seq``,
      ``cursor``, ``type == "tether.snapshot"``, ``data``, ``sender``, ``time``), so a generic
      loop keeps working; check ``isinstance(item, Snapshot)`` to rebuild state from it.

    ``cursor`` is the cursor of the last item the iterator yielded: persist it and pass it to
    ``attach`` to resume exactly there later. ``resumed`` is the last (re-)attach's flag;
    ``state`` the :class:`SessionState`.
    Iteration ends after :meth:`detach` or :meth:`Client.close` (once queued items are
    drained) and raises :class:`ConnectionFailed` / :class:`AttachError` if the client stopped.
    """

    def __init__(self, client: Client, name: str, cursor: str | None, queue_size: int) -> None:
        self.client = client
        self.name = name
        self.cursor: str | None = cursor
        self.resumed: bool | None = None
        self._state = SessionState.ATTACHING
        self._queue = _ItemQueue(queue_size, client._wake_reader)
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._presence_callbacks: list[PresenceCallback] = []

    def __repr__(self) -> str:
        return f"<Session {self.name!r} {self._state.value} cursor={self.cursor!r}>"

    @property
    def state(self) -> SessionState:
        """Where the session stands (read-only; see :class:`SessionState`)."""
        return self._state

    @property
    def presence(self) -> dict[str, dict[str, Any]]:
        """Members present now, by member id (a copy)."""
        state = self.client._proto.sessions.get(self.name)
        return dict(state.presence) if state is not None else {}

    @property
    def buffered(self) -> int:
        """Items received but not yet yielded (at most ``queue_size``, plus a snapshot)."""
        return len(self._queue.items)

    # --- publishing -------------------------------------------------------------------------

    async def publish(self, type: str, data: Any = None, *, key: str | None = None,
                      transient: bool = False) -> str | None:
        """Publish an event; return its cursor once the store has committed it.

        A uuid4 idempotency ``key`` is generated unless given. The publish stays pending across
        reconnects and is re-sent with the same key, so it commits once even if a reply was
        lost (the server answers a retry with the original cursor). Temporary errors
        (``rate_limited``, ``store_unavailable``) are retried with backoff (the error's
        ``retry_after`` when the server gives one); others raise :class:`PublishError`, and so
        does the last temporary error once ``max_attempts`` retries are spent.

        Order: publishes of one session that are awaited concurrently (pipelined) are sent in
        call order, and the server commits them in that order. After a temporary refusal the
        session's publishes are held, then re-sent one at a time in call order once the
        backoff is over and no publish of the session is in flight any more; pipelining
        resumes when none is left unanswered. So a refused publish, and every publish made
        after the client saw the refusal, commit in call order. The one exception the protocol
        cannot prevent: a publish that was already in flight behind the refused one and that
        the server accepted keeps its place, ahead of it. Awaiting each publish before the
        next (one in flight) gives log order == call order whatever the server refuses.
        ``run.cancel`` and ``run.steer`` go ahead of queued publishes on purpose.

        A ``transient`` publish is fanned out without being stored and returns ``None``; it is
        best effort: one in flight when the connection drops is not re-sent.
        """
        if self._state in (SessionState.DETACHING, SessionState.DETACHED):
            raise SessionClosed(f"session {self.name!r} is detached")
        return await self.client._publish(self.name, type, data, key, transient)

    def stream(self, stream_id: str | None = None) -> Stream:
        """A token stream helper; a random stream id unless given."""
        return Stream(self, stream_id or uuid.uuid4().hex[:16])

    # --- steering runs (see docs/runs.md) -------------------------------------------------

    async def cancel_run(self, run: str, reason: str = "") -> str | None:
        """Cancel a run; sent ahead of anything already queued on this connection."""
        return await self.publish("run.cancel", {"run": run, "reason": reason})

    async def steer(self, run: str, text: str) -> str | None:
        """Inject a message into an active run; sent ahead of queued data."""
        return await self.publish("run.steer", {"run": run, "text": text})

    async def approve(self, run: str, call: str,
                      arguments: dict[str, Any] | None = None) -> str | None:
        """Approve a tool call, optionally with edited arguments (needs ``approve``)."""
        data: dict[str, Any] = {"run": run, "call": call, "decision": "approve"}
        if arguments is not None:
            data["arguments"] = arguments
        return await self.publish("approval.decision", data)

    async def reject(self, run: str, call: str) -> str | None:
        return await self.publish("approval.decision",
                                  {"run": run, "call": call, "decision": "reject"})

    async def answer_tool(self, run: str, call: str, result: Any = None, *,
                          error: str | None = None) -> str | None:
        """Answer a front-end tool call; the first valid answer wins."""
        data: dict[str, Any] = {"run": run, "call": call}
        if error is not None:
            data["error"] = error
        else:
            data["result"] = result
        return await self.publish("tool.result", data)

    # --- presence ---------------------------------------------------------------------------

    async def set_presence(self, state: dict[str, Any]) -> None:
        """Set this client's presence state; it is restored on every re-attach."""
        if self._state in (SessionState.DETACHING, SessionState.DETACHED):
            raise SessionClosed(f"session {self.name!r} is detached")
        await self.client._set_presence(self.name, state)

    def on_presence(self, callback: PresenceCallback) -> Callable[[], None]:
        """Call ``callback(session, action, members)`` on every presence change (action:
        ``list`` on each (re-)attach, ``join``, ``leave``, ``update``, ``set``). Read the whole
        map from :attr:`presence`. Returns a function that removes the callback."""
        self._presence_callbacks.append(callback)
        return lambda: self._presence_callbacks.remove(callback)

    # --- iteration --------------------------------------------------------------------------

    def __aiter__(self) -> Session:
        return self

    async def __anext__(self) -> SessionItem:
        item = await self._get()
        if isinstance(item, _End):
            raise StopAsyncIteration
        return item

    async def next(self) -> SessionItem:
        """The next item, or :class:`SessionClosed` once the session is detached and drained.

        Wrap it in ``asyncio.timeout()`` to bound the wait; nothing is lost on a timeout."""
        item = await self._get()
        if isinstance(item, _End):
            raise SessionClosed(f"session {self.name!r} is detached")
        return item

    async def _get(self) -> SessionItem | _End:
        item = await self._queue.get()
        if isinstance(item, _End):
            return item
        if item.cursor is not None:  # transient events have none: they are not in the log
            self.cursor = item.cursor
        self.client._queue_drained(self)
        return item

    async def detach(self) -> None:
        """Stop following the session. Publishes already made are awaited first (they may be
        waiting for a reconnect); queued items can still be iterated, then iteration ends.
        Nothing to do once detaching, detached or closed."""
        if self._state in (SessionState.DETACHING, SessionState.DETACHED, SessionState.CLOSED):
            return
        self._transition(SessionState.DETACHING)
        await self.client._detach(self)

    # --- called by the client ---------------------------------------------------------------

    def _transition(self, new: SessionState) -> None:
        """Move to ``new``; a move :data:`SESSION_TRANSITIONS` does not allow is a bug."""
        if new is self._state:
            return
        if new not in SESSION_TRANSITIONS[self._state]:
            raise RuntimeError(f"session {self.name!r}: {self._state.name} -> {new.name} "
                               "is not a session state transition")
        self._state = new

    def _attached(self, resumed: bool) -> None:
        """An ``attached`` frame: the first attach, a re-attach, or a resync on the same
        connection (which keeps ``ATTACHED``). A detaching session stays detaching."""
        self.resumed = resumed
        if self._state in (SessionState.ATTACHING, SessionState.REATTACHING):
            self._transition(SessionState.ATTACHED)

    def _lost(self) -> None:
        """The server no longer sends this session's events: the connection closed, or it
        refused a re-attach for now. A re-attach follows (after the next welcome)."""
        if self._state is SessionState.ATTACHED:
            self._transition(SessionState.REATTACHING)

    def _closed(self) -> None:
        """The client stopped, or the server refused the (re-)attach for good."""
        if self._state is not SessionState.DETACHED:
            self._transition(SessionState.CLOSED)

    def _presence_changed(self, action: str, members: tuple[dict[str, Any], ...]) -> None:
        for callback in tuple(self._presence_callbacks):
            try:
                callback(self, action, members)
            except Exception:
                log.exception("presence callback of %s failed", self.name)


class Client:
    """A tether client: one logical connection, reconnected as long as that can help.

    ``url``: ``ws://host:port`` (``/v1/ws`` is appended) or a full endpoint URL.
    ``token``: a string, or a callable (sync or async) returning one, called again on every
    reconnect (so an expired token can be refreshed: with a callable, ``TOKEN_EXPIRED`` leads
    to a reconnect instead of a stop).
    ``codec``: ``"json"`` or ``"msgpack"``. ``client_id``: stable for this object's lifetime
    (random by default); ``device``, ``kind`` (``"human"`` or ``"agent"``), ``tools`` describe
    this client in presence.
    Reconnects wait ``uniform(0, min(backoff_cap, backoff_base * 2**attempt))`` seconds;
    ``max_attempts`` failed attempts in a row (``None``: never give up) stop the client.
    ``heartbeat_timeout``: seconds without any frame before a ``ping``, and again before
    dropping the socket; default ``2 × welcome.heartbeat + 5``. ``ws_heartbeat`` is passed to
    aiohttp for WebSocket-level pings. ``queue_size`` bounds each session's queue.
    """

    def __init__(self, url: str, *, token: TokenSource = None, codec: str = "json",
                 client_id: str | None = None, device: str = "", kind: str = "human",
                 tools: tuple[str, ...] = (), backoff_base: float = BACKOFF_BASE,
                 backoff_cap: float = BACKOFF_CAP, max_attempts: int | None = None,
                 heartbeat_timeout: float | None = None, ws_heartbeat: float | None = 20.0,
                 connect_timeout: float = 10.0, close_timeout: float = 2.0,
                 queue_size: int = 1024, max_msg_size: int = 4 << 20,
                 http_session: aiohttp.ClientSession | None = None,
                 rng: random.Random | None = None) -> None:
        if codec not in ("json", "msgpack"):
            raise ValueError("codec must be 'json' or 'msgpack'")
        if kind not in CLIENT_KINDS:
            raise ValueError("kind must be 'human' or 'agent'")
        if queue_size < 2:
            raise ValueError("queue_size must be at least 2")
        self.url = ws_url(url)
        self.codec: Codec = JSON if codec == "json" else MSGPACK
        self.client_id = client_id or f"py-{uuid.uuid4().hex[:12]}"
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.max_attempts = max_attempts
        self.heartbeat_timeout = heartbeat_timeout
        self.ws_heartbeat = ws_heartbeat
        self.connect_timeout = connect_timeout
        # Why the last connection attempt failed (None once one succeeded): for a caller that
        # must say why a server is unreachable.
        self.last_connect_error: BaseException | None = None
        self.close_timeout = close_timeout
        self.queue_size = queue_size
        self.max_msg_size = max_msg_size
        self.welcome: Frame | None = None  # the last welcome frame (caps, limits, heartbeat)
        self._token = token
        self._rng = rng or random.Random()
        self._http = http_session
        self._own_http = http_session is None
        self._proto = ClientProtocol(client_id=self.client_id, device=device, kind=kind,
                                     tools=tools)
        self._state = ConnectionState.CONNECTING
        self._state_callbacks: list[StateCallback] = []
        self._sessions: dict[str, Session] = {}
        self._waiters: dict[int, tuple[asyncio.Future[Completed], str, str | None]] = {}
        self._conn: _Connection | None = None
        self._run_task: asyncio.Task[None] | None = None
        self._connected_once: asyncio.Future[None] | None = None
        self._close_started = False  # close() was called: resources are (being) released
        self._error: TetherError | None = None  # why the client stopped, once it has
        self._fatal: ConnectionFailed | None = None  # set by a refused hello
        self._stop = asyncio.Event()
        self._reader_wakeup = asyncio.Event()
        self._paused = False
        self._timers: set[asyncio.TimerHandle] = set()
        self._background: set[asyncio.Task[Any]] = set()

    # --- public API -----------------------------------------------------------------------

    @property
    def state(self) -> ConnectionState:
        return self._state

    @property
    def _closing(self) -> bool:
        """close() was called, or the client stopped by itself (then ``_error`` says why)."""
        return self._close_started or self._error is not None

    @property
    def reading_paused(self) -> bool:
        """Whether reading the socket is paused because a session queue is full."""
        return self._paused

    @property
    def sessions(self) -> dict[str, Session]:
        """Attached sessions by name (a copy)."""
        return dict(self._sessions)

    def on_state(self, callback: StateCallback) -> Callable[[], None]:
        """Call ``callback(state)`` on every state change; returns a remover."""
        self._state_callbacks.append(callback)
        return lambda: self._state_callbacks.remove(callback)

    async def states(self) -> AsyncIterator[ConnectionState]:
        """The current state, then every change, until ``CLOSED`` (which is yielded)."""
        changes: deque[ConnectionState] = deque([self._state], maxlen=64)
        ready = asyncio.Event()
        ready.set()

        def push(state: ConnectionState) -> None:
            changes.append(state)  # bounded: a consumer this slow only misses old states
            ready.set()

        remove = self.on_state(push)
        try:
            while True:
                await ready.wait()
                ready.clear()
                while changes:
                    state = changes.popleft()
                    yield state
                    if state is ConnectionState.CLOSED:
                        return
        finally:
            remove()

    async def connect(self) -> None:
        """Connect (retrying per the backoff policy); return once welcomed the first time."""
        if self._run_task is None:
            if self._closing:
                raise ClientClosed("the client is closed")
            if self._http is None:
                self._http = aiohttp.ClientSession()
            loop = asyncio.get_running_loop()
            self._connected_once = loop.create_future()
            self._run_task = loop.create_task(self._run(), name="tether-client")
        assert self._connected_once is not None
        await asyncio.shield(self._connected_once)

    async def __aenter__(self) -> Client:
        try:
            await self.connect()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def attach(self, session: str, cursor: str | None = None, *,
                     presence: dict[str, Any] | None = None) -> Session:
        """Follow ``session`` from ``cursor`` (``None``: from the start of its history).

        Returns once attached; a :class:`Snapshot` is the first item if the cursor could not
        be resumed. Attaching a session already attached returns the same object.
        """
        self._check_usable()
        existing = self._sessions.get(session)
        if existing is not None:
            await asyncio.shield(existing._ready)
            return existing
        frame = self._proto.attach(session, cursor, presence)
        sess = Session(self, session, cursor, self.queue_size)
        self._sessions[session] = sess
        if frame is not None:
            self._send(frame)
        self._wake_reader()
        try:
            await asyncio.shield(sess._ready)
        except asyncio.CancelledError:
            if not sess._ready.done():
                sess._ready.cancel()
                with contextlib.suppress(TetherError):
                    await sess.detach()
            raise
        return sess

    async def close(self) -> None:
        """Close the connection and stop; pending calls raise :class:`ClientClosed`, session
        iterators end once their queued items are drained."""
        if self._close_started:
            if self._run_task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(self._run_task)
            return
        self._close_started = True
        self._stop.set()
        self._wake_reader()
        conn = self._conn
        if conn is not None:
            conn.dropped = "closed by the application"
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.ws.close(), self.close_timeout)
        elif self._run_task is not None:
            # Between connections (backoff, connecting): nothing to close gracefully.
            self._run_task.cancel()
        if self._run_task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._run_task), self.close_timeout)
            except (TimeoutError, asyncio.CancelledError):
                self._run_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._run_task
        self._finish(ClientClosed("the client is closed"))
        for task in list(self._background):
            task.cancel()
        if self._own_http and self._http is not None:
            await self._http.close()
            self._http = None

    # --- internals: requests ---------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closing:
            raise ClientClosed("the client is closed")
        if self._run_task is None:
            raise TetherError("call connect() (or use 'async with') first")

    async def _request(self, rid: int, frame: Frame | None, kind: str,
                       session: str | None) -> Completed:
        fut: asyncio.Future[Completed] = asyncio.get_running_loop().create_future()
        self._waiters[rid] = (fut, kind, session)
        if frame is not None:
            self._send(frame)
        self._wake_reader()  # a reply is now awaited: a paused reader must read again
        try:
            return await fut
        except asyncio.CancelledError:
            self._waiters.pop(rid, None)
            for outcome in self._proto.cancel(rid):
                self._apply_sync(outcome)
            raise

    async def _publish(self, session: str, type: str, data: Any, key: str | None,
                       transient: bool) -> str | None:
        self._check_usable()
        rid, frame = self._proto.publish(session, type, data, key=key, transient=transient)
        done = await self._request(rid, frame, "publish", session)
        return done.value if isinstance(done.value, str) else None

    async def _set_presence(self, session: str, state: dict[str, Any]) -> None:
        self._check_usable()
        rid, frame = self._proto.set_presence(session, state)
        await self._request(rid, frame, "presence", session)

    async def _detach(self, session: Session) -> None:
        name = session.name
        publishes = [fut for fut, kind, sess in self._waiters.values()
                     if kind == "publish" and sess == name]
        if publishes:
            # asyncio.wait, unlike gather, does not cancel the publishes if detach is cancelled.
            await asyncio.wait(publishes)
        if self._sessions.get(name) is session:
            del self._sessions[name]
        if session.state is SessionState.DETACHING:  # not closed meanwhile
            session._transition(SessionState.DETACHED)
        session._queue.finish(None)
        if not session._ready.done():
            session._ready.set_exception(SessionClosed(f"session {name!r} was detached"))
            session._ready.exception()  # retrieved: nobody else may be waiting for it
        if self._closing or self._error is not None:
            return
        rid, frame = self._proto.detach(name)
        if frame is not None:
            with contextlib.suppress(TetherError):
                await self._request(rid, frame, "detach", name)

    # --- internals: the connection loop -----------------------------------------------------

    def _set_state(self, state: ConnectionState) -> None:
        if state is self._state:
            return
        self._state = state
        for callback in tuple(self._state_callbacks):
            try:
                callback(state)
            except Exception:
                log.exception("state callback failed")

    def _permanent(self, code: int | None) -> bool:
        if code == CloseCode.TOKEN_EXPIRED and callable(self._token):
            return False  # the callable is asked for a fresh token on the next attempt
        if code == CloseCode.HELLO_TIMEOUT:
            # This client sends hello first thing, so the server lost it rather than this client
            # being broken: a node that is shutting down stops reading sockets it accepted in
            # its last moments, then times them out with this code. Retrying is the fix.
            return False
        return not should_reconnect(code)

    async def _run(self) -> None:
        attempt = 0
        error: TetherError | None = None
        try:
            while not self._closing:
                code, reason, welcomed = await self._connect_once()
                if self._closing:
                    break
                if self._fatal is not None:
                    error = self._fatal
                    break
                if welcomed:
                    attempt = 0
                if code is not None and self._permanent(code):
                    error = ConnectionFailed(code, reason)
                    break
                if self.max_attempts is not None and attempt >= self.max_attempts:
                    error = ConnectionFailed(code, f"gave up after {attempt + 1} attempts: "
                                                   f"{reason}")
                    break
                self._set_state(ConnectionState.RECONNECTING)
                delay = backoff_delay(attempt, self.backoff_base, self.backoff_cap, self._rng)
                if code == CloseCode.TRY_AGAIN_LATER:
                    # The server is shedding load and said when to come back: its delay (with
                    # up to 20 % jitter) replaces the backoff, which would bring us back sooner.
                    after = retry_after_from_reason(reason)
                    if after is not None:
                        delay = after * self._rng.uniform(1.0, 1.2)
                attempt += 1
                log.info("tether: reconnecting in %.2fs (%s)", delay, reason)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
        except Exception as exc:  # a bug; surface it rather than hang every caller
            log.exception("tether client loop failed")
            error = ConnectionFailed(None, f"client loop failed: {exc!r}")
        finally:
            self._finish(error or ClientClosed("the client is closed"))

    async def _connect_once(self) -> tuple[int | None, str, bool]:
        """One connection: connect, hello, serve until it closes. Returns (close code, reason,
        whether it was welcomed)."""
        assert self._http is not None
        try:
            token = await self._resolve_token()
            # connect_timeout bounds the TCP, TLS and upgrade steps too, not only the welcome.
            async with asyncio.timeout(self.connect_timeout):
                ws = await self._http.ws_connect(
                    self.url, protocols=[self.codec.subprotocol],
                    heartbeat=self.ws_heartbeat, max_msg_size=self.max_msg_size, autoping=True,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None,
                                                    ws_close=self.close_timeout),
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # refused, DNS, TLS, handshake status, a failing token source
            self.last_connect_error = exc
            log.info("tether: connect to %s failed: %r", self.url, exc)
            return None, f"connect failed: {exc!r}", False
        self.last_connect_error = None
        if self._closing:  # close() ran while we were connecting
            await ws.close()
            return None, "closed by the application", False
        conn = self._conn = _Connection(ws)
        loop = asyncio.get_running_loop()
        conn.tasks.append(loop.create_task(self._write_loop(conn)))
        conn.tasks.append(loop.create_task(self._watchdog(conn)))
        self._send(self._proto.hello(token))
        code: int | None = None
        reason = ""
        try:
            code, reason = await self._read_loop(conn)
        finally:
            self._conn = None
            for task in conn.tasks:
                task.cancel()
            for outcome in self._proto.connection_lost():
                self._apply_sync(outcome)
            for session in self._sessions.values():
                session._lost()
            if not ws.closed and conn.dropped is None:
                closer = loop.create_task(ws.close())
                self._background.add(closer)
                closer.add_done_callback(self._background.discard)
        if conn.dropped is not None:
            # We closed it: whatever code the close handshake reported is ours, not the server's.
            return None, conn.dropped, conn.welcomed.is_set()
        return code, reason or f"closed with code {code}", conn.welcomed.is_set()

    async def _resolve_token(self) -> str | None:
        source = self._token
        if source is None or isinstance(source, str):
            return source
        value = source()
        if inspect.isawaitable(value):
            value = await value
        if not isinstance(value, str):
            raise TypeError("the token callable must return a string")
        return value

    async def _read_loop(self, conn: _Connection) -> tuple[int | None, str]:
        ws = conn.ws
        loop = asyncio.get_running_loop()
        while True:
            try:
                msg = await ws.receive()
            except (aiohttp.ClientError, ConnectionError) as exc:
                # aiohttp answers a ping inside receive(); when the socket is closing under it
                # (a server killed mid-storm) the pong's write raises here. That is a dropped
                # connection like any other: reconnect, never stop the client.
                log.info("tether: websocket failed: %r", exc)
                return ws.close_code, f"receive failed: {exc!r}"
            if msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                if conn.heartbeat is not None:
                    conn.heartbeat.received(loop.time())
                try:
                    frame = self.codec.decode(msg.data)
                except DecodeError as exc:
                    log.warning("tether: undecodable frame: %s", exc)
                    continue
                for outcome in self._proto.receive(frame):
                    await self._apply(conn, outcome)
            elif msg.type is aiohttp.WSMsgType.CLOSE:
                return int(msg.data), str(msg.extra or "")
            else:  # CLOSING (we close), CLOSED (dropped), ERROR
                if msg.type is aiohttp.WSMsgType.ERROR:
                    log.info("tether: websocket error: %r", msg.data)
                return ws.close_code, ""

    async def _write_loop(self, conn: _Connection) -> None:
        ws, codec = conn.ws, self.codec
        try:
            while True:
                while conn.outbox:
                    data = codec.encode(conn.outbox.popleft())
                    if codec.binary:
                        await ws.send_bytes(data)
                    else:
                        await ws.send_str(data.decode())
                conn.outbox_ready.clear()
                await conn.outbox_ready.wait()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the socket died under us; the reader sees it close
            log.info("tether: send failed: %r", exc)
            self._drop(conn, f"send failed: {exc!r}")

    async def _watchdog(self, conn: _Connection) -> None:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(conn.welcomed.wait(), self.connect_timeout)
        except TimeoutError:
            self._drop(conn, "no welcome within connect_timeout")
            return
        heartbeat = conn.heartbeat
        assert heartbeat is not None
        while True:
            if self._paused:
                # We stopped reading on purpose (backpressure): silence proves nothing.
                heartbeat.received(loop.time())
            action, wait = heartbeat.poll(loop.time())
            if action == "drop":
                self._drop(conn, "heartbeat timeout: nothing received after a ping")
                return
            if action == "ping":
                ping = self._proto.ping()
                if ping is not None:
                    self._send(ping[1])
            await asyncio.sleep(wait)

    def _drop(self, conn: _Connection, why: str) -> None:
        """Close ``conn`` from our side; the reader returns at once and we reconnect."""
        if conn.dropped is None:
            conn.dropped = why
        task = asyncio.get_running_loop().create_task(conn.ws.close(code=1001))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _send(self, frame: Frame) -> None:
        conn = self._conn
        if conn is None:
            return  # no connection: the protocol state re-sends what matters after welcome
        if frame.get("op") == "publish" and frame.get("type") in INTERRUPT_TYPES:
            conn.outbox.appendleft(frame)  # interrupts go ahead of queued data
        else:
            conn.outbox.append(frame)
        conn.outbox_ready.set()

    # --- internals: outcomes ------------------------------------------------------------

    async def _apply(self, conn: _Connection, outcome: Outcome) -> None:
        if isinstance(outcome, Deliver):
            await self._deliver(outcome)
        elif isinstance(outcome, Welcomed):
            self.welcome = outcome.frame
            timeout = self.heartbeat_timeout
            if timeout is None:
                timeout = 2 * outcome.heartbeat + 5 if outcome.heartbeat > 0 else 30.0
            conn.heartbeat = Heartbeat(timeout, asyncio.get_running_loop().time())
            conn.welcomed.set()
            self._set_state(ConnectionState.CONNECTED)
            if self._connected_once is not None and not self._connected_once.done():
                self._connected_once.set_result(None)
        else:
            self._apply_sync(outcome)

    def _apply_sync(self, outcome: Outcome) -> None:
        if isinstance(outcome, Send):
            self._send(outcome.frame)
        elif isinstance(outcome, Completed):
            waiter = self._waiters.pop(outcome.id, None)
            if waiter is not None and not waiter[0].done():
                waiter[0].set_result(outcome)
        elif isinstance(outcome, Failed):
            self._on_failed(outcome)
        elif isinstance(outcome, Attached):
            session = self._sessions.get(outcome.session)
            if session is not None:
                session._attached(outcome.resumed)
                if not session._ready.done():
                    session._ready.set_result(None)
        elif isinstance(outcome, AttachFailed):
            self._on_attach_failed(outcome)
        elif isinstance(outcome, RetryLater):
            self._on_retry_later(outcome)
        elif isinstance(outcome, PresenceChanged):
            session = self._sessions.get(outcome.session)
            if session is not None:
                session._presence_changed(outcome.action, outcome.members)
        elif isinstance(outcome, Notice):
            log.warning("tether: unexpected frame from server: %r", outcome.frame)

    def _on_failed(self, outcome: Failed) -> None:
        waiter = self._waiters.pop(outcome.id, None)
        if waiter is None:
            if self._conn is not None and not self._conn.welcomed.is_set():
                # Only hello has no waiter before welcome: the server refused our hello.
                self._fatal = ConnectionFailed(None, f"hello refused: {outcome.code}: "
                                                     f"{outcome.message}")
                self._drop(self._conn, "hello refused")
            return
        fut, kind, _ = waiter
        error: RequestFailed = (PublishError if kind == "publish" else RequestFailed)(
            outcome.code, outcome.message)
        if not fut.done():
            fut.set_exception(error)

    def _on_attach_failed(self, outcome: AttachFailed) -> None:
        session = self._sessions.pop(outcome.session, None)
        if session is None:
            return
        session._closed()
        error = AttachError(outcome.code, outcome.message)
        if not session._ready.done():
            session._ready.set_exception(error)
        else:  # a re-attach after a reconnect was refused: end the iterator with the reason
            session._queue.finish(error)

    def _on_retry_later(self, outcome: RetryLater) -> None:
        if outcome.op == "attach" and outcome.session is not None:
            session = self._sessions.get(outcome.session)
            if session is not None:
                session._lost()  # the server dropped the subscription before refusing
        if self.max_attempts is not None and outcome.attempt >= self.max_attempts:
            for result in self._proto.give_up(outcome):
                self._apply_sync(result)
            return
        delay = outcome.retry_after
        if delay is None:
            delay = backoff_delay(outcome.attempt, self.backoff_base, self.backoff_cap,
                                  self._rng)
        log.info("tether: %s, retrying in %.2fs", outcome.code, delay)
        handle: asyncio.TimerHandle | None = None

        def retry() -> None:
            assert handle is not None
            self._timers.discard(handle)
            for result in self._proto.retry(outcome):
                self._apply_sync(result)
            self._wake_reader()  # a reply is awaited again: a paused reader must read

        handle = asyncio.get_running_loop().call_later(delay, retry)
        self._timers.add(handle)

    # --- internals: delivery and backpressure --------------------------------------------

    def _wake_reader(self) -> None:
        self._reader_wakeup.set()

    def _has_demand(self, excluding: Session) -> bool:
        """Whether something other than ``excluding``'s consumer needs the socket read."""
        if self._closing or self._proto.has_outstanding():
            return True
        return any(s._queue.waiting for s in self._sessions.values() if s is not excluding)

    async def _deliver(self, outcome: Deliver) -> None:
        session = self._sessions.get(outcome.session)
        if session is None:
            return
        queue = session._queue
        item = outcome.item
        if isinstance(item, Snapshot):
            queue.put(item)  # beyond the bound: it is one item, and must never be dropped
            return
        while queue.full():
            if item.transient:
                return  # ephemeral by nature: dropping one beats blocking the socket for it
            if self._has_demand(session):
                # Keep reading for whoever waits; this session re-reads from the store later.
                self._proto.overflow(session.name, item.seq - 1)
                return
            self._paused = True
            self._reader_wakeup.clear()
            try:
                await self._reader_wakeup.wait()
            finally:
                self._paused = False
            if self._sessions.get(outcome.session) is not session:
                return  # detached while we waited
        queue.put(item)

    def _queue_drained(self, session: Session) -> None:
        """The application took an item: leave overflow once half the queue is free."""
        state = self._proto.sessions.get(session.name)
        if state is not None and state.overflowing and \
                len(session._queue.items) <= self.queue_size // 2:
            frame = self._proto.resync(session.name)
            if frame is not None:
                self._send(frame)

    def _finish(self, error: TetherError) -> None:
        """The client stopped: fail every pending call, end every iterator."""
        if self._error is None:
            self._error = error
        self._stop.set()
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
        for fut, _, _ in self._waiters.values():
            if not fut.done():
                fut.set_exception(error)
                fut.exception()  # a publish nobody awaits must not log "never retrieved"
        self._waiters.clear()
        iterator_error = None if isinstance(error, ClientClosed) else error
        for session in self._sessions.values():
            session._closed()
            if not session._ready.done():
                session._ready.set_exception(error)
                session._ready.exception()
            session._queue.finish(iterator_error)
        if self._connected_once is not None and not self._connected_once.done():
            self._connected_once.set_exception(error)
            self._connected_once.exception()
        self._wake_reader()
        self._set_state(ConnectionState.CLOSED)
