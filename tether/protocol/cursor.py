"""Cursors: the position of a reader in one session's log.

A cursor is the opaque string ``"{epoch}:{seq}"``. The epoch names one incarnation of a
session's log (it changes only when the log is lost or recreated); ``seq`` is the gapless
sequence number the store assigned at commit. The string form is usable as an SSE ``id:``.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from dataclasses import dataclass

# Epochs are short random tokens; keep the alphabet URL- and header-safe. ASCII only and
# matched whole (``fullmatch``): ``$`` would accept a trailing newline, ``isdigit`` would
# accept "²".
_EPOCH_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")
_SEQ_RE = re.compile(r"[0-9]{1,18}")


class CursorError(ValueError):
    """A cursor string that does not parse."""


@dataclass(frozen=True, slots=True, order=True)
class Cursor:
    epoch: str
    seq: int

    def __str__(self) -> str:
        return f"{self.epoch}:{self.seq}"

    @classmethod
    def parse(cls, text: str) -> Cursor:
        """Parse ``"{epoch}:{seq}"``; raise :class:`CursorError` on anything else."""
        if not isinstance(text, str):
            raise CursorError("cursor must be a string")
        epoch, sep, seq_text = text.rpartition(":")
        if not sep or not _EPOCH_RE.fullmatch(epoch) or not _SEQ_RE.fullmatch(seq_text):
            raise CursorError(f"malformed cursor {text[:64]!r}")
        return cls(epoch, int(seq_text))


def _session_tag(session: str) -> str:
    digest = hashlib.blake2b(session.encode(), digest_size=4).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


_RANDOM_LEN = 8  # token_urlsafe(6)
_TAG_LEN = 6


def new_epoch(session: str | None = None) -> str:
    """A fresh epoch: 48 random bits, then a 32-bit tag of ``session`` when given.

    The tag lets a server tell a cursor of *another* session (an error) from a cursor of an
    earlier incarnation of *this* session (``resumed: false``) even after the log was lost.
    """
    random_part = secrets.token_urlsafe(6)
    return random_part + _session_tag(session) if session is not None else random_part


def epoch_belongs(epoch: str, session: str) -> bool:
    """False only when ``epoch`` carries a session tag, and it is another session's."""
    if len(epoch) != _RANDOM_LEN + _TAG_LEN:
        return True
    return epoch[_RANDOM_LEN:] == _session_tag(session)
