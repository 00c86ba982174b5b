"""Cursors: the position of a reader in one session's log.

A cursor is the opaque string ``"{epoch}:{seq}"``. The epoch names one incarnation of a
session's log (it changes only when the log is lost or recreated); ``seq`` is the gapless
sequence number the store assigned at commit. The string form is usable as an SSE ``id:``.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

# Epochs are short random tokens; keep the alphabet URL- and header-safe.
_EPOCH_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


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
        if not sep or not _EPOCH_RE.match(epoch) or not seq_text.isdigit() or len(seq_text) > 18:
            raise CursorError(f"malformed cursor {text[:64]!r}")
        return cls(epoch, int(seq_text))


def new_epoch() -> str:
    """A fresh random epoch (64 bits, URL-safe)."""
    return secrets.token_urlsafe(8)
