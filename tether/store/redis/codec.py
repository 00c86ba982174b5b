"""Decoding what Redis holds back into event parts: senders and seqs.

An event is stored, and published, as the JSON array ``[type, [sub, client, kind], data]``
(see ``keys.py`` for where), built by ``commit.py`` with the sender as a list. Reads, commits
that answer a duplicate and the live channel all decode it; the helpers here are what they
share.
"""

from __future__ import annotations

from typing import Any

from tether.protocol.events import Sender
from tether.store.redis.keys import KEY_CACHE_SIZE

_senders: dict[tuple[str, str, str], Sender] = {}


def decode_sender(raw: Any) -> Sender:
    # A session has few distinct senders, and building a frozen dataclass costs about as
    # much as decoding the whole event.
    if isinstance(raw, list) and len(raw) == 3:
        key = (raw[0], raw[1], raw[2])
        sender = _senders.get(key)
        if sender is None:
            if len(_senders) >= KEY_CACHE_SIZE:
                _senders.clear()
            sender = _senders[key] = Sender(str(raw[0]), str(raw[1]), str(raw[2]))
        return sender
    return Sender.from_dict(raw)


def seq_of(entry_id: bytes) -> int:
    """The seq of a log entry: its stream ID is ``{seq}-0``."""
    return int(entry_id.partition(b"-")[0])
