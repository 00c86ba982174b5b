"""Events: the entries of a session log, and the rules for their types.

An event type is an application name (``message``, ``chat.reaction``, ``doc:edit``) or one of
the names reserved by tether. Reserved namespaces are closed: a type inside them that tether
does not define is rejected with ``unknown_event_type`` rather than stored, so a typo never
becomes history that later versions misread.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tether.protocol.codes import ErrorCode, RequestError
from tether.protocol.cursor import Cursor

STREAM_APPEND = "stream.append"
STREAM_END = "stream.end"
PRESENCE_JOIN = "presence.join"
PRESENCE_LEAVE = "presence.leave"
PRESENCE_UPDATE = "presence.update"

# Reserved namespaces and the types tether defines inside them. Later protocol versions add to
# these sets; an unknown name inside a namespace is an error, not an application event.
RESERVED_NAMESPACES = ("stream.", "presence.", "run.", "tool.", "approval.", "tether.", "ds.")
# Types clients publish to steer runs; the run manager validates them before they are stored.
CONTROL_TYPES = frozenset({"run.cancel", "run.steer", "approval.decision", "tool.result"})
# Types only the server writes (run lifecycle, tool calls, the run index).
SERVER_TYPES = frozenset({
    "run.created", "run.state", "run.snapshot", "run.delta", "run.index", "run.claim",
    "run.checkpoint",
    "tool.call", "approval.request", "tether.schedule", "tether.webhook", "tether.fire",
    "tether.probe", "tether.unreadable",
    "tether.items",  # an OpenAI Agents SDK session's memory (integrations/openai_agents.py)
    "tether.langgraph",  # a LangGraph thread's checkpoints (integrations/langgraph.py)
    # A Durable Streams stream's own records (tether/server/durable_streams.py): only that
    # transport writes them, so no client can forge a stream's metadata or producer state.
    "ds.create", "ds.message", "ds.bytes", "ds.producer", "ds.close", "ds.delete",
    "ds.fork", "ds.unfork", "ds.seq",
})
KNOWN_RESERVED_TYPES = frozenset({STREAM_APPEND, STREAM_END}) | CONTROL_TYPES | SERVER_TYPES
TRANSIENT_ONLY_TYPES = frozenset({PRESENCE_JOIN, PRESENCE_LEAVE, PRESENCE_UPDATE})

# ASCII only, matched whole with ``fullmatch`` (``$`` would let "demo\n" through as a second
# session id that prints like the first).
_TYPE_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.:-]{0,63}")
_SESSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}")
_STREAM_ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def valid_session_id(session: object) -> bool:
    return isinstance(session, str) and _SESSION_RE.fullmatch(session) is not None


# Types and stream ids already found valid: a pure function of the string, asked for every
# published event with the same few values. Bounded: cleared when full.
_VALID_TYPES: set[str] = set()
_VALID_STREAMS: set[str] = set()
_MAX_REMEMBERED = 4096


def check_event_type(event_type: object) -> None:
    """Raise :class:`RequestError` unless ``event_type`` may be published."""
    if event_type in _VALID_TYPES:
        return
    _check_event_type(event_type)
    assert isinstance(event_type, str)
    if len(_VALID_TYPES) >= _MAX_REMEMBERED:
        _VALID_TYPES.clear()
    _VALID_TYPES.add(event_type)


def _check_event_type(event_type: object) -> None:
    if not isinstance(event_type, str) or not _TYPE_RE.fullmatch(event_type):
        raise RequestError(ErrorCode.INVALID,
                           "event type must match [A-Za-z][A-Za-z0-9_.:-]{0,63}")
    if event_type.startswith(RESERVED_NAMESPACES) and event_type not in KNOWN_RESERVED_TYPES:
        raise RequestError(ErrorCode.UNKNOWN_EVENT_TYPE,
                           f"{event_type!r} is in a reserved namespace and is not defined "
                           "by tether")


def check_stream_data(event_type: str, data: Any) -> str | None:
    """Validate the data of ``stream.append`` / ``stream.end``; ``None`` when valid."""
    if not isinstance(data, dict):
        return f"{event_type} data must be an object"
    stream = data.get("stream")
    if stream not in _VALID_STREAMS:
        if not isinstance(stream, str) or not _STREAM_ID_RE.fullmatch(stream):
            return f"{event_type} data.stream must be a stream id ([A-Za-z0-9_.:-]{{1,64}})"
        if len(_VALID_STREAMS) >= _MAX_REMEMBERED:
            _VALID_STREAMS.clear()
        _VALID_STREAMS.add(stream)
    if event_type == STREAM_APPEND and not isinstance(data.get("text"), str):
        return "stream.append data.text must be a string"
    if event_type == STREAM_END and "text" in data:
        return "stream.end must not carry text: the store fills it in from the deltas"
    return None


@dataclass(frozen=True, slots=True)
class Sender:
    """Who published an event: the token subject, the client id and its kind."""

    sub: str
    client: str = ""
    kind: str = "human"

    def to_dict(self) -> dict[str, str]:
        return {"sub": self.sub, "client": self.client, "kind": self.kind}

    @classmethod
    def from_dict(cls, data: Any) -> Sender:
        if not isinstance(data, dict):
            return cls(sub="")
        return cls(
            sub=str(data.get("sub", "")),
            client=str(data.get("client", "")),
            kind=str(data.get("kind", "human")),
        )


SYSTEM = Sender(sub="tether", client="server", kind="system")


@dataclass(frozen=True, slots=True)
class Event:
    """One committed (or, when ``transient``, fanned-out-only) entry of a session log.

    ``seq`` is 0 for transient events: they have no place in the log.
    ``time`` is milliseconds since the Unix epoch, assigned by the store at commit.
    """

    session: str
    epoch: str
    seq: int
    type: str
    data: Any
    sender: Sender
    time: int
    transient: bool = False

    @property
    def cursor(self) -> Cursor:
        return Cursor(self.epoch, self.seq)

    @property
    def stream(self) -> str | None:
        if self.type in (STREAM_APPEND, STREAM_END) and isinstance(self.data, dict):
            stream = self.data.get("stream")
            return stream if isinstance(stream, str) else None
        return None


UNREADABLE = "tether.unreadable"
# Data nested deeper than this cannot be framed by every encoder: orjson refuses more than 254
# levels and the event frame around the data adds one (measured: data 253 deep encodes, 254
# does not). Publish validation keeps new events far below it (max_event_depth).
MAX_DELIVERABLE_DEPTH = 253


def unreadable(event: Event, reason: str) -> Event:
    """The placeholder delivered instead of a stored event that cannot be decoded or encoded.

    Same session, epoch, seq, sender and time — the log keeps no gap — with type
    ``tether.unreadable`` and data ``{"type": <the original type>, "reason": ...}``.
    """
    return Event(event.session, event.epoch, event.seq, UNREADABLE,
                 {"type": event.type, "reason": reason}, event.sender, event.time,
                 event.transient)
