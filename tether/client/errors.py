"""Exceptions raised by the tether client SDK.

Everything derives from :class:`TetherError`. Request failures carry the server's error ``code``
(see :class:`tether.protocol.codes.ErrorCode`); connection failures carry the close code, which
says why the client stopped instead of reconnecting.
"""

from __future__ import annotations

from tether.protocol.codes import CLOSE_CODE_MEANINGS, CloseCode


class TetherError(Exception):
    """Base class of every client error."""


class RequestFailed(TetherError):
    """The server answered a request with a non-temporary ``error`` frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message


class PublishError(RequestFailed):
    """A publish was refused (``forbidden``, ``too_large``, ``invalid``, ``stream_closed``, …).

    Temporary errors (``rate_limited``, ``store_unavailable``) are retried with backoff instead,
    and only surface as this error once ``max_attempts`` retries are spent.
    """


class AttachError(RequestFailed):
    """An attach (or a re-attach after a reconnect) was refused, e.g. ``forbidden``."""


class ConnectionFailed(TetherError):
    """The client stopped for good: a close code that forbids reconnecting (4500–4999, such as
    ``UNAUTHORIZED``, or ``TOKEN_EXPIRED`` with a fixed token string), a refused ``hello``, or
    ``max_attempts`` reconnects in a row that failed.

    ``code`` is the WebSocket close code when there was one, ``None`` otherwise.
    """

    def __init__(self, code: int | None, reason: str) -> None:
        meaning = ""
        if code is not None and code in CloseCode._value2member_map_:
            meaning = CLOSE_CODE_MEANINGS[CloseCode(code)]
        text = f"connection failed (close code {code}): {reason or meaning}" if code is not None \
            else f"connection failed: {reason}"
        super().__init__(text)
        self.code = code
        self.reason = reason


class ClientClosed(TetherError):
    """The client was closed by the application while the call was pending."""


class SessionClosed(TetherError):
    """The session was detached; it can no longer publish or set presence."""
