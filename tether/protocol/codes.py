"""Close codes and request-error codes: the one table both sides and the docs agree on.

Two kinds of failure, as in Centrifuge:

* a **request error** answers one frame with an ``error`` frame; the connection stays open;
* a **disconnect** closes the WebSocket with a code from :class:`CloseCode`. Codes 4000–4499 tell
  the client to reconnect (with backoff); codes 4500–4999 tell it to stop.
"""

from __future__ import annotations

import enum


class CloseCode(enum.IntEnum):
    # 4000–4499: transient, reconnect with backoff and resume from the last cursor.
    SHUTDOWN = 4000
    SLOW_CONSUMER = 4001
    TOO_MANY_CONNECTIONS = 4002
    TRY_AGAIN_LATER = 4003  # load shedding: the reason says "retry_after=SECONDS"
    # 4500–4999: permanent, do not reconnect without changing something.
    UNAUTHORIZED = 4500
    TOKEN_EXPIRED = 4501
    HELLO_TIMEOUT = 4502
    UNSUPPORTED_CODEC = 4503
    TOO_MANY_ERRORS = 4504

    @property
    def reconnect(self) -> bool:
        return should_reconnect(int(self))

    @property
    def meaning(self) -> str:
        return CLOSE_CODE_MEANINGS[self]


CLOSE_CODE_MEANINGS: dict[CloseCode, str] = {
    CloseCode.SHUTDOWN: "the server is shutting down or restarting; reconnect, resume from cursor",
    CloseCode.SLOW_CONSUMER: "writing to the client failed or stalled; reconnect and resume",
    CloseCode.TOO_MANY_CONNECTIONS: "the token's subject holds too many connections; reconnect "
                                    "later (with backoff)",
    CloseCode.TRY_AGAIN_LATER: "the server is shedding load; reconnect after the delay in the "
                               "close reason (retry_after=SECONDS)",
    CloseCode.UNAUTHORIZED: "missing, malformed, forged or wrong-secret token",
    CloseCode.TOKEN_EXPIRED: "the token expired; get a new one before reconnecting",
    CloseCode.HELLO_TIMEOUT: "no hello within the hello timeout after the upgrade",
    CloseCode.UNSUPPORTED_CODEC: "no supported subprotocol (tether.v1.json, tether.v1.msgpack)",
    CloseCode.TOO_MANY_ERRORS: "too many request errors in a row on this connection",
}


def should_reconnect(code: int | None) -> bool:
    """Whether a client should reconnect after a close with ``code``.

    4500–4999 and the standard codes for a peer's protocol or policy violation (1002, 1003,
    1007, 1008, 1009, 1010) mean "stop". Everything else, a normal close (1000) or going away
    (1001) from a proxy included, is transient: reconnect and resume.
    """
    if code is None:
        return True
    if 4500 <= code <= 4999:
        return False
    return code not in (1002, 1003, 1007, 1008, 1009, 1010)


# The longest wait a try_again_later close may ask for: past it, a client's backoff is as good.
MAX_RETRY_AFTER = 60.0


def retry_after_from_reason(reason: str) -> float | None:
    """The delay of a ``try_again_later`` close reason (``retry_after=SECONDS``), if valid."""
    for part in reason.replace(",", " ").split():
        if part.startswith("retry_after="):
            try:
                value = float(part[len("retry_after="):])
            except ValueError:
                return None
            return value if 0.0 <= value <= MAX_RETRY_AFTER else None
    return None


class ErrorCode(enum.StrEnum):
    """Codes carried by ``error`` frames and HTTP error bodies."""

    BAD_FRAME = "bad_frame"  # not decodable with the negotiated codec, or not an object
    UNKNOWN_FRAME = "unknown_frame"  # "op" names no frame of this protocol
    INVALID = "invalid"  # a field is missing or has the wrong type or value
    NOT_READY = "not_ready"  # a frame other than hello before hello
    FORBIDDEN = "forbidden"  # the token lacks the capability or session
    BAD_CURSOR = "bad_cursor"  # malformed cursor, or a cursor from another session
    NOT_ATTACHED = "not_attached"  # detach/ack/presence.set on a session not attached
    TOO_MANY_SESSIONS = "too_many_sessions"  # attach beyond the per-connection limit
    RATE_LIMITED = "rate_limited"  # a rate or count limit (temporary; retry_after when known)
    TOO_LARGE = "too_large"  # event data larger than the maximum event size
    UNKNOWN_EVENT_TYPE = "unknown_event_type"  # a reserved-namespace type that does not exist
    STREAM_CLOSED = "stream_closed"  # append or end on a stream that already ended
    RUN_NOT_FOUND = "run_not_found"  # a control event for a run the session does not have
    RUN_FINISHED = "run_finished"  # a control event for a completed, failed or cancelled run
    UNKNOWN_CALL = "unknown_call"  # a decision or tool result for a call nobody awaits
    ALREADY_DECIDED = "already_decided"  # a second decision or result for the same call
    UNAUTHORIZED = "unauthorized"  # HTTP only: no token or a bad one
    NOT_FOUND = "not_found"  # HTTP only
    STORE_UNAVAILABLE = "store_unavailable"  # temporary: the store failed this request
    INTERNAL = "internal"


TEMPORARY_ERRORS = frozenset({ErrorCode.RATE_LIMITED, ErrorCode.STORE_UNAVAILABLE})

HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.BAD_FRAME: 400,
    ErrorCode.UNKNOWN_FRAME: 400,
    ErrorCode.INVALID: 400,
    ErrorCode.NOT_READY: 400,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.BAD_CURSOR: 400,
    ErrorCode.NOT_ATTACHED: 400,
    ErrorCode.TOO_MANY_SESSIONS: 429,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.UNKNOWN_EVENT_TYPE: 400,
    ErrorCode.STREAM_CLOSED: 409,
    ErrorCode.RUN_NOT_FOUND: 404,
    ErrorCode.RUN_FINISHED: 409,
    ErrorCode.UNKNOWN_CALL: 409,
    ErrorCode.ALREADY_DECIDED: 409,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.STORE_UNAVAILABLE: 503,
    ErrorCode.INTERNAL: 500,
}


class TetherError(Exception):
    """A failure that maps to an error code; each transport translates it in one place.

    Subclasses name their code as a class attribute (``code = ErrorCode.STORE_UNAVAILABLE``);
    :class:`RequestError` carries one per instance. The WebSocket endpoint answers with an
    ``error`` frame, HTTP with a JSON body and :data:`HTTP_STATUS`, SSE the same before the
    response starts.
    """

    code: ErrorCode = ErrorCode.INTERNAL
    retry_after: float | None = None  # seconds, when the server knows when a retry can pass

    @property
    def message(self) -> str:
        return str(self)

    @property
    def temporary(self) -> bool:
        return self.code in TEMPORARY_ERRORS


class RequestError(TetherError):
    """A request failed; answered with an ``error`` frame, the connection stays open."""

    def __init__(self, code: ErrorCode, message: str, *,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after = retry_after
