"""The client side of wire protocol v1 as a pure state machine: no sockets, no clocks, no tasks.

Like python-websockets' sans-I/O core, this module only turns *calls* (attach, publish, …) into
frames to send and *received frames* into :data:`Outcome` objects; the asyncio layer in
:mod:`tether.client.client` does the I/O and owns futures and queues. Keeping every decision here
makes the delivery guarantees testable by feeding frames, without a server.

What it owns:

* request-id allocation (monotonic for the whole client lifetime, so an id is never reused and a
  late reply can never be matched to the wrong request) and reply matching;
* per-session state (:class:`SessionRecord`): the epoch and last accepted ``seq``, which make
  delivery exactly-once and ordered: an event of the current epoch with ``seq <= last`` is a
  duplicate and dropped, one with ``seq > last + 1`` is a gap and triggers a re-attach from the
  last accepted cursor instead of being delivered out of order;
* epoch changes: ``attached{resumed: false}`` means continuity was lost (new epoch, expired
  cursor, trimmed history). It is surfaced as a :class:`Snapshot` item, never silently, and the
  position resets to the attached cursor;
* pending publishes with their idempotency keys: they survive a reconnect and are re-sent with
  the same id *and key* after the next ``welcome``, so a publish whose reply was lost commits
  once (the server answers ``duplicate: true`` with the original cursor);
* the order of a session's publishes across temporary refusals (``rate_limited``,
  ``store_unavailable``): see *Publish order* below;
* the re-attach of every session, from its last accepted cursor, after each ``welcome``;
* presence maps maintained from ``presence`` frames;
* the pure policies the I/O layer applies with its own clock: :func:`backoff_delay` (exponential
  backoff with full jitter) and :class:`Heartbeat` (idle → ping → drop).

Publish order
-------------

The server handles the frames of one connection in order and the store assigns seqs in the order
appends start, so publishes pipelined on one connection commit in the order they were sent. A
temporary refusal breaks that: the refused publish must be sent again, after publishes the
server has already taken. So, per session (for the *ordered* publishes: everything except
transient events and the run interrupts ``run.cancel``/``run.steer``, which go ahead on purpose):

1. On a temporary refusal the session enters *retry*: its publishes are held (new ones are not
   sent; refused ones are not re-sent) while a backoff runs (the error's ``retry_after`` when
   the server gives one, else :func:`backoff_delay`).
2. After the backoff, and once no publish of the session is in flight any more (each was
   committed, refused, or failed), the earliest unanswered one is re-sent, alone. When it is
   committed the next one follows, one at a time, in call order; a new refusal starts another
   backoff. When nothing of the session is left unanswered, pipelining resumes.

What this guarantees, for the publishes of one session on one client: nothing is lost or
committed twice (idempotency keys); a publish that was refused, and every publish made after
the client saw that refusal, commit in call order, after everything the server took before.
The one inversion the protocol cannot prevent: publishes already *in flight* behind a refused
one (sent before its refusal came back, or whose refusal was lost with the connection) that the
server then accepted commit ahead of it. They keep their place (a later re-send with the same
key would answer ``duplicate`` with the original cursor); only pipelining creates them, so a
caller that awaits each publish, or a session that is never refused, gets log order == call
order. (Across a reconnect this assumes the server is done with the old connection: frames a
server still reads from a socket the client gave up on may commit around their re-sends, each
key once.)
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from tether.protocol.codes import TEMPORARY_ERRORS
from tether.protocol.cursor import Cursor, CursorError
from tether.protocol.events import SYSTEM, Sender

Frame = dict[str, Any]

SNAPSHOT_TYPE = "tether.snapshot"

# Run interrupts must not wait behind queued data: the I/O layer sends them ahead of its
# outbox, and they are neither held nor holding in a session's ordered retry.
INTERRUPT_TYPES = frozenset({"run.cancel", "run.steer"})

__all__ = [
    "BACKOFF_BASE",
    "BACKOFF_CAP",
    "INTERRUPT_TYPES",
    "SNAPSHOT_TYPE",
    "AttachFailed",
    "Attached",
    "ClientProtocol",
    "Completed",
    "Deliver",
    "Failed",
    "Frame",
    "Heartbeat",
    "Notice",
    "Outcome",
    "PendingPublish",
    "PresenceChanged",
    "RetryLater",
    "Send",
    "SessionEvent",
    "SessionItem",
    "SessionRecord",
    "Snapshot",
    "Welcomed",
    "backoff_delay",
]


# --- items delivered to the application ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionEvent:
    """One event of a session, as yielded by ``async for event in session``.

    ``cursor`` is the ``"{epoch}:{seq}"`` string to persist and pass back to ``attach`` later;
    it is ``None`` (and ``seq`` is 0) for transient events, which are fanned out but never
    stored, so they have no place in the log and are not deduplicated.
    ``time`` is milliseconds since the Unix epoch, assigned by the store at commit.
    """

    session: str
    seq: int
    cursor: str | None
    type: str
    data: Any
    sender: Sender
    time: int
    transient: bool = False

    @property
    def epoch(self) -> str | None:
        return self.cursor.rpartition(":")[0] if self.cursor else None

    @property
    def stream(self) -> str | None:
        """The stream id of a ``stream.append`` / ``stream.end`` event."""
        if self.type in ("stream.append", "stream.end") and isinstance(self.data, dict):
            stream = self.data.get("stream")
            return stream if isinstance(stream, str) else None
        return None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Continuity was lost: the server could not resume from the cursor the client held.

    Yielded by the session iterator in place of the missing events, so it is never silent; it
    also reads like an event of type ``tether.snapshot`` (see the properties below).
    ``reason`` is the server's (``epoch_changed``, ``cursor_expired``, ``history_trimmed``, …);
    ``previous`` the cursor that could not be resumed (``None`` on a first attach); ``cursor`` the
    position the session continues from: events after it follow this item. ``events`` is the
    server's compacted recent history up to ``cursor`` (deltas of ended streams dropped) and
    ``presence`` the members present at attach. Applications typically re-render from it.
    """

    session: str
    cursor: str
    reason: str
    previous: str | None
    events: tuple[SessionEvent, ...]
    presence: tuple[dict[str, Any], ...]

    # Event-shaped read-only view, so generic loops (``print(item.seq, item.type, item.data)``)
    # work on every item: ``type`` is the reserved ``tether.snapshot``, which no publisher can
    # use, so ``item.type == SNAPSHOT_TYPE`` is as good a test as ``isinstance``.

    @property
    def type(self) -> str:
        return SNAPSHOT_TYPE

    @property
    def seq(self) -> int:
        return int(self.cursor.rpartition(":")[2])

    @property
    def epoch(self) -> str:
        return self.cursor.rpartition(":")[0]

    @property
    def data(self) -> dict[str, Any]:
        return {"reason": self.reason, "previous": self.previous, "events": len(self.events)}

    @property
    def sender(self) -> Sender:
        return SYSTEM

    @property
    def time(self) -> int:
        return max((e.time for e in self.events), default=0)

    @property
    def transient(self) -> bool:
        return False


SessionItem = SessionEvent | Snapshot


def event_from_frame(frame: Mapping[str, Any]) -> SessionEvent:
    """Build a :class:`SessionEvent` from an ``event`` frame (or a snapshot entry)."""
    cursor = frame.get("cursor")
    seq = frame.get("seq", 0)
    time = frame.get("time", 0)
    return SessionEvent(
        session=str(frame.get("session", "")),
        seq=seq if isinstance(seq, int) else 0,
        cursor=cursor if isinstance(cursor, str) else None,
        type=str(frame.get("type", "")),
        data=frame.get("data"),
        sender=Sender.from_dict(frame.get("sender")),
        time=time if isinstance(time, int) else 0,
        transient=bool(frame.get("transient", False)),
    )


# --- outcomes of ClientProtocol.receive ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """A frame the I/O layer must send now, on the current connection, in order."""

    frame: Frame


@dataclass(frozen=True, slots=True)
class Welcomed:
    """``hello`` was accepted; ``frame`` is the ``welcome`` (heartbeat, limits, caps)."""

    frame: Frame

    @property
    def heartbeat(self) -> float:
        value = self.frame.get("heartbeat")
        return float(value) if isinstance(value, int | float) else 0.0


@dataclass(frozen=True, slots=True)
class Deliver:
    """An item for the session's iterator, in order."""

    session: str
    item: SessionItem


@dataclass(frozen=True, slots=True)
class Attached:
    """A session is attached on this connection (first attach or any re-attach)."""

    session: str
    resumed: bool
    cursor: str


@dataclass(frozen=True, slots=True)
class AttachFailed:
    """An attach was refused for good (forbidden, bad cursor, …); the session is gone."""

    session: str
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Completed:
    """Request ``id`` succeeded. ``value``: the cursor for a publish (``None`` when transient),
    the member list for ``presence.set``, ``None`` otherwise."""

    id: int
    value: Any = None
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class Failed:
    """Request ``id`` failed with a non-temporary error."""

    id: int
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class RetryLater:
    """Request ``id`` hit a temporary error: wait ``retry_after`` seconds when the server said
    (the error frame's ``retry_after``, in ms on the wire), else ``backoff_delay(attempt, ...)``,
    then call :meth:`ClientProtocol.retry` with this outcome (or :meth:`ClientProtocol.give_up`
    once the I/O layer's attempts are spent). ``op`` is ``"attach"`` or ``"publish"``;
    ``session`` is set for an attach and for an ordered publish (whose retry resumes the
    session's held publishes, in order)."""

    id: int
    attempt: int
    code: str
    message: str
    session: str | None = None
    op: str = "attach"
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class PresenceChanged:
    """The presence map of ``session`` changed (``action``: list/join/leave/update/set)."""

    session: str
    action: str
    members: tuple[dict[str, Any], ...]


@dataclass(frozen=True, slots=True)
class Notice:
    """A frame that answers nothing we know: an ``error`` without id, an unknown op. Log it."""

    frame: Frame


Outcome = (Send | Welcomed | Deliver | Attached | AttachFailed | Completed | Failed | RetryLater
           | PresenceChanged | Notice)


# --- state -------------------------------------------------------------------------------------


@dataclass(slots=True)
class PendingPublish:
    """A publish not yet answered. ``key`` is fixed at creation and reused on every re-send."""

    id: int
    session: str
    type: str
    data: Any
    key: str
    transient: bool
    in_flight: bool = False  # sent on the current connection, reply not yet received
    attempts: int = 0  # temporary errors so far

    @property
    def ordered(self) -> bool:
        """Whether it keeps its place among the session's publishes (see *Publish order*)."""
        return not self.transient and self.type not in INTERRUPT_TYPES

    def frame(self) -> Frame:
        frame: Frame = {"op": "publish", "id": self.id, "session": self.session,
                        "type": self.type, "data": self.data, "key": self.key}
        if self.transient:
            frame["transient"] = True
        return frame


@dataclass(slots=True)
class SessionRecord:
    """Where one attached session stands in the protocol.

    ``epoch``/``last_seq`` are the position of the last *accepted* event (handed to the I/O layer
    for the session queue), the position every (re-)attach resumes from. Until the first
    ``attached``, ``requested`` is the cursor the application asked to start from.
    """

    name: str
    requested: str | None = None
    presence_state: dict[str, Any] | None = None
    epoch: str | None = None
    last_seq: int = 0
    attached: bool = False  # attached on the current connection
    resumed: bool | None = None  # the last attached frame's flag
    attach_attempts: int = 0
    resyncing: bool = False  # a re-attach on the same connection is in flight
    overflowing: bool = False  # the I/O layer could not queue; drop until resync()
    presence: dict[str, dict[str, Any]] = field(default_factory=dict)
    presence_waiters: list[int] = field(default_factory=list)

    @property
    def cursor(self) -> str | None:
        """The cursor to resume from: the last accepted one, else the requested one."""
        if self.epoch is not None:
            return f"{self.epoch}:{self.last_seq}"
        return self.requested

    def attach_frame(self, rid: int) -> Frame:
        frame: Frame = {"op": "attach", "id": rid, "session": self.name}
        cursor = self.cursor
        if cursor is not None:
            frame["cursor"] = cursor
        if self.presence_state is not None:
            frame["presence"] = self.presence_state
        return frame


@dataclass(slots=True)
class _Retry:
    """A session whose ordered publishes are held after a temporary refusal."""

    backoff: bool = True  # a backoff runs: send nothing until retry_publishes()
    head: int | None = None  # the publish re-sent alone, while it awaits its reply


@dataclass(slots=True)
class _Request:
    op: str  # hello, attach, detach, presence.set, ping
    session: str | None = None


class ClientProtocol:
    """Client state of one logical tether client across any number of connections.

    Lifecycle per connection: :meth:`hello` → send it → feed every received frame to
    :meth:`receive` and act on the outcomes → :meth:`connection_lost` when the socket closes.
    Request methods return the frame to send, or ``None`` while there is no welcomed connection:
    such requests are sent by the outcomes of the next ``welcome``.
    """

    def __init__(self, *, client_id: str, device: str = "", kind: str = "human",
                 tools: tuple[str, ...] = ()) -> None:
        self.client_id = client_id
        self.device = device
        self.kind = kind
        self.tools = tools
        self.sessions: dict[str, SessionRecord] = {}
        self.publishes: dict[int, PendingPublish] = {}  # by id, so in call order
        # Sessions whose ordered publishes are held after a temporary refusal (see *Publish
        # order* in the module docstring).
        self.retrying: dict[str, _Retry] = {}
        self.connected = False  # a welcome was received on the current connection
        self._requests: dict[int, _Request] = {}
        self._last_id = 0

    # --- ids and bookkeeping -------------------------------------------------------------

    def next_id(self) -> int:
        self._last_id += 1
        return self._last_id

    def has_outstanding(self) -> bool:
        """Whether a request awaits its reply on the current connection.

        The I/O layer must keep reading while this is true, or the reply could never arrive.
        """
        if any(p.in_flight for p in self.publishes.values()):
            return True
        return any(r.op != "hello" for r in self._requests.values())

    # --- connection lifecycle -------------------------------------------------------------

    def hello(self, token: str | None) -> Frame:
        """The first frame on a new connection."""
        self.connected = False
        rid = self.next_id()
        self._requests[rid] = _Request("hello")
        frame: Frame = {"op": "hello", "id": rid, "client": self.client_id, "kind": self.kind}
        if token is not None:
            frame["token"] = token
        if self.device:  # the server rejects an empty string; omit instead
            frame["device"] = self.device
        if self.tools:
            frame["tools"] = list(self.tools)
        return frame

    def connection_lost(self) -> list[Outcome]:
        """The socket closed. Returns the requests that end with the connection."""
        self.connected = False
        outcomes: list[Outcome] = []
        for state in self.sessions.values():
            state.attached = False
            state.resyncing = False
            state.overflowing = False  # the re-attach after welcome resumes from last_seq
        for rid, request in self._requests.items():
            if request.op == "detach":
                # The server detaches every session of a closed connection.
                outcomes.append(Completed(rid))
            elif request.op == "presence.set" and request.session in self.sessions:
                # The re-attach carries the desired state; it completes this request.
                self.sessions[request.session].presence_waiters.append(rid)
            elif request.op == "ping":
                outcomes.append(Completed(rid))
        self._requests.clear()
        for retry in self.retrying.values():
            retry.head = None  # its reply is lost with the connection; re-sent after welcome
        for rid, pub in list(self.publishes.items()):
            if pub.in_flight and pub.transient:
                # Transient events are best effort and carry no idempotency on the server:
                # re-sending could show them twice, so one lost with its connection stays lost.
                del self.publishes[rid]
                outcomes.append(Completed(rid, None))
            pub.in_flight = False
        return outcomes

    def _on_welcome(self, frame: Frame) -> list[Outcome]:
        self.connected = True
        outcomes: list[Outcome] = [Welcomed(frame)]
        # Re-attach first: the server handles frames in order, so the publishes that follow
        # cannot reach a session before its attach.
        for state in self.sessions.values():
            outcomes.append(Send(self._attach_request(state)))
        for pub in self.publishes.values():  # in call order
            if pub.ordered and pub.session in self.retrying:
                continue  # one at a time, by _pump below
            pub.in_flight = True
            outcomes.append(Send(pub.frame()))
        for session in list(self.retrying):
            outcomes.extend(self._pump(session))
        return outcomes

    def _attach_request(self, state: SessionRecord) -> Frame:
        rid = self.next_id()
        self._requests[rid] = _Request("attach", state.name)
        return state.attach_frame(rid)

    # --- requests -----------------------------------------------------------------------

    def attach(self, session: str, cursor: str | None = None,
               presence: dict[str, Any] | None = None) -> Frame | None:
        """Start following ``session`` from ``cursor`` (``None`` = from the start).

        Completion is reported by an :class:`Attached` or :class:`AttachFailed` outcome.
        """
        if cursor is not None:
            try:
                Cursor.parse(cursor)
            except CursorError as exc:
                raise ValueError(str(exc)) from None
        if session in self.sessions:
            raise ValueError(f"already attached to {session!r}")
        state = SessionRecord(session, requested=cursor, presence_state=presence)
        self.sessions[session] = state
        return self._attach_request(state) if self.connected else None

    def detach(self, session: str) -> tuple[int, Frame | None]:
        """Stop following ``session``. A ``None`` frame means it is already done (offline)."""
        self.sessions.pop(session, None)
        rid = self.next_id()
        if not self.connected:
            return rid, None
        self._requests[rid] = _Request("detach", session)
        return rid, {"op": "detach", "id": rid, "session": session}

    def publish(self, session: str, type: str, data: Any, *, key: str | None = None,
                transient: bool = False) -> tuple[int, Frame | None]:
        """Register a publish; a fresh uuid4 idempotency key unless ``key`` is given.

        The frame is ``None`` while there is no welcomed connection, and while the session's
        publishes are held after a temporary refusal: it is sent later, in call order.
        """
        rid = self.next_id()
        pub = PendingPublish(rid, session, type, data, key or uuid.uuid4().hex, transient)
        self.publishes[rid] = pub
        if not self.connected or (pub.ordered and session in self.retrying):
            return rid, None
        pub.in_flight = True
        return rid, pub.frame()

    def set_presence(self, session: str, state: dict[str, Any]) -> tuple[int, Frame | None]:
        """Set this client's presence state in ``session``; also kept for every re-attach."""
        sess = self.sessions.get(session)
        if sess is None:
            raise ValueError(f"not attached to {session!r}")
        sess.presence_state = state
        rid = self.next_id()
        if not (self.connected and sess.attached):
            # The pending (re-)attach carries the state and completes this request.
            sess.presence_waiters.append(rid)
            return rid, None
        self._requests[rid] = _Request("presence.set", session)
        return rid, {"op": "presence.set", "id": rid, "session": session, "state": state}

    def ping(self) -> tuple[int, Frame] | None:
        if not self.connected:
            return None
        rid = self.next_id()
        self._requests[rid] = _Request("ping")
        return rid, {"op": "ping", "id": rid}

    def retry(self, retry: RetryLater) -> list[Outcome]:
        """The backoff of a :class:`RetryLater` is over: what to send now, if anything."""
        if retry.op == "attach":
            frame = self.retry_attach(retry.session) if retry.session is not None else None
            return [Send(frame)] if frame is not None else []
        if retry.session is not None:
            return self.retry_publishes(retry.session)
        frame = self.resend(retry.id)
        return [Send(frame)] if frame is not None else []

    def give_up(self, retry: RetryLater) -> list[Outcome]:
        """Stop retrying: the request of ``retry`` fails with its last temporary error."""
        if retry.op == "attach":
            state = self.sessions.pop(retry.session, None) if retry.session else None
            if state is None:
                return []
            outcomes: list[Outcome] = [Failed(w, retry.code, retry.message)
                                       for w in state.presence_waiters]
            outcomes.append(AttachFailed(state.name, retry.code, retry.message))
            return outcomes
        outcomes = [Failed(retry.id, retry.code, retry.message)] \
            if self.publishes.pop(retry.id, None) is not None else []
        if retry.session is not None:
            # The backoff this outcome asked for will not run: the next publish goes now.
            outcomes.extend(self.retry_publishes(retry.session))
        return outcomes

    def resend(self, rid: int) -> Frame | None:
        """The frame to re-send for an unordered publish (transient, interrupt) that got a
        temporary error, if still relevant."""
        pub = self.publishes.get(rid)
        if pub is not None:
            if pub.in_flight or not self.connected:
                return None  # already re-sent by a reconnect, or will be after the next one
            pub.in_flight = True
            return pub.frame()
        return None

    def retry_publishes(self, session: str) -> list[Outcome]:
        """The backoff of ``session``'s held publishes is over: re-send the earliest
        unanswered one once none is in flight (now, or when the last in-flight reply comes)."""
        retry = self.retrying.get(session)
        if retry is not None:
            retry.backoff = False
        return self._pump(session)

    def retry_attach(self, session: str) -> Frame | None:
        """Re-send an attach that got a temporary error."""
        state = self.sessions.get(session)
        if state is None or state.attached or not self.connected:
            return None
        return self._attach_request(state)

    def cancel(self, rid: int) -> list[Outcome]:
        """Forget request ``rid`` (the caller stopped waiting). A publish may still commit.

        Returns what to send instead: the next held publish of its session, if it waited for
        this one."""
        self._requests.pop(rid, None)
        pub = self.publishes.pop(rid, None)
        if pub is None or not pub.ordered:
            return []
        return self._pump(pub.session)

    def _pump(self, session: str) -> list[Outcome]:
        """Advance ``session``'s ordered retry: when no backoff runs and none of its publishes
        is in flight, send the earliest unanswered one alone; when none is left, leave retry
        so that publishes are pipelined again."""
        retry = self.retrying.get(session)
        if retry is None or retry.backoff or not self.connected:
            return []  # not retrying, or a backoff runs, or the welcome will call us
        head: PendingPublish | None = None
        for pub in self.publishes.values():  # in call order
            if pub.session == session and pub.ordered:
                if pub.in_flight:
                    return []  # its reply (commit or refusal) must come first
                if head is None:
                    head = pub
        if head is None:
            del self.retrying[session]
            return []
        head.in_flight = True
        retry.head = head.id
        return [Send(head.frame())]

    # --- backpressure ---------------------------------------------------------------------

    def overflow(self, session: str, after_seq: int) -> None:
        """The I/O layer could not queue the event after ``after_seq``: forget it and drop
        everything of ``session`` until :meth:`resync`, which resumes from ``after_seq``."""
        state = self.sessions.get(session)
        if state is None:
            return
        state.last_seq = min(state.last_seq, after_seq)
        state.overflowing = True

    def resync(self, session: str) -> Frame | None:
        """Leave overflow: re-attach on this connection from the last accepted cursor."""
        state = self.sessions.get(session)
        if state is None or not state.overflowing:
            return None
        state.overflowing = False
        if not (self.connected and state.attached):
            return None  # the re-attach after the next welcome resumes from last_seq
        state.resyncing = True
        return self._attach_request(state)

    # --- receiving --------------------------------------------------------------------------

    def receive(self, frame: Frame) -> list[Outcome]:
        """Apply one decoded server frame; return what the I/O layer must do, in order."""
        op = frame.get("op")
        if op == "event":
            return self._on_event(frame)
        if op == "presence":
            return self._on_presence(frame)
        if op == "published":
            return self._on_published(frame)
        if op == "attached":
            return self._on_attached(frame)
        if op == "error":
            return self._on_error(frame)
        rid = frame.get("id")
        request = self._requests.get(rid) if isinstance(rid, int) else None
        if op == "welcome" and request is not None and request.op == "hello":
            del self._requests[rid]  # type: ignore[arg-type]
            return self._on_welcome(frame)
        if op in ("pong", "detached") and request is not None:
            del self._requests[rid]  # type: ignore[arg-type]
            return [Completed(rid)]  # type: ignore[arg-type]
        if op == "pong":
            return []  # a ping from an earlier connection; it only proved liveness
        return [Notice(frame)]

    def _on_event(self, frame: Frame) -> list[Outcome]:
        name = frame.get("session")
        state = self.sessions.get(name) if isinstance(name, str) else None
        if state is None or not state.attached or state.overflowing:
            # Not following it (any more) on this connection: in flight before a detach, or
            # being dropped until a resync re-reads it from the store.
            return []
        event = event_from_frame(frame)
        if event.transient or event.cursor is None:
            return [Deliver(state.name, event)]
        if event.epoch != state.epoch:
            return []  # from a subscription the last attached frame replaced
        if event.seq <= state.last_seq:
            return []  # already delivered (catch-up overlapping live, or a replay)
        if event.seq != state.last_seq + 1:
            # A gap: the missing events are in the store. Never deliver out of order; re-attach
            # from the last accepted cursor and let the server's catch-up fill it in.
            if state.resyncing:
                return []
            state.resyncing = True
            return [Send(self._attach_request(state))]
        state.last_seq = event.seq
        return [Deliver(state.name, event)]

    def _on_attached(self, frame: Frame) -> list[Outcome]:
        rid = frame.get("id")
        request = self._requests.pop(rid, None) if isinstance(rid, int) else None
        name = frame.get("session")
        state = self.sessions.get(name) if isinstance(name, str) else None
        if request is None or state is None:
            return []  # detached meanwhile: the detach that follows it cleans up the server
        try:
            cursor = Cursor.parse(frame.get("cursor"))  # type: ignore[arg-type]
        except CursorError:
            return [Notice(frame)]
        resumed = frame.get("resumed") is True
        outcomes: list[Outcome] = []
        state.attached = True
        state.resyncing = False
        state.attach_attempts = 0
        state.resumed = resumed
        if resumed:
            if state.epoch == cursor.epoch:
                # Events of the replaced subscription may have been accepted after the attach
                # was sent; never move backwards, or they would be delivered twice.
                state.last_seq = max(state.last_seq, cursor.seq)
            else:
                state.epoch, state.last_seq = cursor.epoch, cursor.seq
        else:
            previous = state.cursor
            snapshot = frame.get("snapshot")
            snap: Mapping[str, Any] = snapshot if isinstance(snapshot, dict) else {}
            raw_events = snap.get("events")
            raw_presence = snap.get("presence")
            events = tuple(event_from_frame(e) for e in raw_events or () if isinstance(e, dict))
            members = tuple(m for m in raw_presence or () if isinstance(m, dict))
            state.epoch, state.last_seq = cursor.epoch, cursor.seq
            outcomes.append(Deliver(state.name, Snapshot(
                state.name, str(cursor), str(frame.get("reason") or "fresh"), previous,
                events, members)))
        state.requested = None
        outcomes.append(Attached(state.name, resumed, str(cursor)))
        for waiter in state.presence_waiters:
            outcomes.append(Completed(waiter, None))
        state.presence_waiters.clear()
        return outcomes

    def _on_published(self, frame: Frame) -> list[Outcome]:
        rid = frame.get("id")
        pub = self.publishes.pop(rid, None) if isinstance(rid, int) else None
        if pub is None:
            return []  # a reply to a publish the caller cancelled
        cursor = frame.get("cursor")
        outcomes: list[Outcome] = [Completed(pub.id, cursor if isinstance(cursor, str) else None,
                                             duplicate=frame.get("duplicate") is True)]
        if pub.ordered and pub.session in self.retrying:
            outcomes.extend(self._pump(pub.session))
        return outcomes

    def _on_error(self, frame: Frame) -> list[Outcome]:
        rid = frame.get("id")
        code = str(frame.get("code", "internal"))
        message = str(frame.get("message", ""))
        temporary = frame.get("temporary") is True or code in TEMPORARY_ERRORS
        if not isinstance(rid, int):
            return [Notice(frame)]
        pub = self.publishes.get(rid)
        if pub is not None:
            if temporary:
                pub.in_flight = False
                pub.attempts += 1
                if not pub.ordered:
                    return [RetryLater(rid, pub.attempts - 1, code, message, op="publish",
                                       retry_after=_retry_after(frame))]
                retry = self.retrying.get(pub.session)
                if retry is not None and retry.head != rid:
                    # In flight behind one already refused: its turn comes, in call order.
                    return self._pump(pub.session)
                # The first refusal, or the publish re-sent alone refused again: hold the
                # session's publishes and back off.
                self.retrying[pub.session] = _Retry()
                return [RetryLater(rid, pub.attempts - 1, code, message, session=pub.session,
                                   op="publish", retry_after=_retry_after(frame))]
            del self.publishes[rid]
            failed: list[Outcome] = [Failed(rid, code, message)]
            if pub.ordered and pub.session in self.retrying:
                failed.extend(self._pump(pub.session))
            return failed
        request = self._requests.pop(rid, None)
        if request is None:
            return [Notice(frame)]
        if request.op == "hello":
            return [Failed(rid, code, message)]
        if request.op == "attach" and request.session is not None:
            state = self.sessions.get(request.session)
            if state is None:
                return []
            state.resyncing = False
            if temporary:
                # The server drops its subscription before it fails an attach: until the retry
                # is attached, nothing of this session arrives, whatever was attached before.
                state.attached = False
                state.attach_attempts += 1
                return [RetryLater(rid, state.attach_attempts - 1, code, message,
                                   session=state.name, retry_after=_retry_after(frame))]
            del self.sessions[state.name]
            outcomes: list[Outcome] = [Failed(w, code, message) for w in state.presence_waiters]
            outcomes.append(AttachFailed(state.name, code, message))
            return outcomes
        return [Failed(rid, code, message)]

    def _on_presence(self, frame: Frame) -> list[Outcome]:
        name = frame.get("session")
        state = self.sessions.get(name) if isinstance(name, str) else None
        action = str(frame.get("action", ""))
        raw = frame.get("members")
        members = tuple(m for m in raw or () if isinstance(m, dict))
        outcomes: list[Outcome] = []
        rid = frame.get("id")
        if isinstance(rid, int) and rid in self._requests:
            del self._requests[rid]
            outcomes.append(Completed(rid, list(members)))
        if state is None:
            return outcomes
        if action == "list":
            state.presence = {str(m.get("member")): m for m in members}
        elif action == "leave":
            for m in members:
                state.presence.pop(str(m.get("member")), None)
        else:  # join, update, set
            for m in members:
                state.presence[str(m.get("member"))] = m
        outcomes.append(PresenceChanged(state.name, action, members))
        return outcomes


def _retry_after(frame: Frame) -> float | None:
    """An error frame's ``retry_after`` (ms, optional) in seconds."""
    value = frame.get("retry_after")
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        return None
    return min(float(value), 86_400_000.0) / 1000.0


# --- pure policies the I/O layer applies with its own clock and randomness --------------------


# The SDKs' reconnect backoff. The cap bounds how long a client stays away once the server is
# back: after a restart of a few seconds, a 30 s cap left the unluckiest of 10,000 clients in
# 16-30 s windows; at 8 s the whole crowd is back within the downtime plus 8 s, and still
# arrives spread over up to 8 s (docs/scaling.md, "Reconnect storms").
BACKOFF_BASE = 0.5
BACKOFF_CAP = 8.0


def backoff_delay(attempt: int, base: float, cap: float,
                  rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: ``uniform(0, min(cap, base * 2**attempt))``.

    Full jitter (rather than ±x%) spreads a crowd of clients that lost the same server over the
    whole window, so they do not come back in waves. ``attempt`` counts from 0.
    """
    # Cap the exponent: 2**attempt for a client retrying for days would overflow a float.
    ceiling = min(cap, base * 2.0 ** min(attempt, 62))
    return (rng or random).uniform(0.0, ceiling)


class Heartbeat:
    """Idle detection: after ``timeout`` seconds with nothing received, ping; after another
    ``timeout`` with still nothing, drop the connection.

    Application-level, on top of aiohttp's WebSocket pings, because a half-open TCP connection
    or a wedged proxy can keep answering control frames while delivering nothing.
    """

    def __init__(self, timeout: float, now: float) -> None:
        self.timeout = timeout
        self.last_received = now
        self.ping_sent_at: float | None = None

    def received(self, now: float) -> None:
        self.last_received = now
        self.ping_sent_at = None

    def poll(self, now: float) -> tuple[Literal["wait", "ping", "drop"], float]:
        """What to do at ``now``, and how long to wait before polling again."""
        if self.ping_sent_at is not None:
            waited = now - self.ping_sent_at
            if waited >= self.timeout:
                return "drop", 0.0
            return "wait", self.timeout - waited
        idle = now - self.last_received
        if idle >= self.timeout:
            self.ping_sent_at = now
            return "ping", self.timeout
        return "wait", self.timeout - idle
