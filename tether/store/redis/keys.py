"""Key names of the Redis store, and what this process caches per session.

Key layout (``P`` is the prefix, ``tether`` by default; ``S`` the session id)::

    P:{S}:meta          hash    epoch, seq (the last committed seq)
    P:{S}:log           stream  one entry per event, ID ``{seq}-0``, fields ``t`` (time, ms)
                                and ``e`` (the JSON array ``[type, [sub, client, kind], data]``)
    P:{S}:i:N:SUB:KEY   string  idempotency key of sender SUB (N = len(SUB)); value = seq
    P:{S}:st:STREAM     string  JSON-escaped text of an open token stream so far
    P:{S}:sc:STREAM     string  marker of an ended token stream
    P:{S}:pz / P:{S}:pi zset / hash  presence: member -> expiry (ms), member -> info JSON
    P:{S}:ch            channel live fan-out: ``[transient, epoch, time, first_seq, [e, ...]]``
                                (a shard channel on a Redis Cluster)
    P:sessions          set     every session id ever written, for ``trim()``

The ``{S}`` hash tag puts all keys of one session, and its channel, in one Redis Cluster slot,
and every script declares all the keys it touches in ``KEYS``. On one Redis (standalone or
behind a proxy) one append call may carry several sessions' batches. On a cluster
(``cluster.py``) the flusher groups sessions by the slot of their tag, sends one call per slot
to the master that owns it, and the script fans out with ``SPUBLISH`` on the session's shard
channel, which listeners ``SSUBSCRIBE`` on that master (``shards.py``). ``P:sessions`` has its
own slot and is only touched by plain commands.

The commit path packs its commands itself (see ``commit.py``), so the names a batch needs are
kept here already RESP-encoded, once per session rather than once per append.
"""

from __future__ import annotations

from dataclasses import dataclass

from tether.protocol.cursor import new_epoch

# Bound of every per-session cache of this package; each is simply cleared when full, since
# everything in it can be derived again.
KEY_CACHE_SIZE = 65536


def bulk(value: bytes) -> bytes:
    """One RESP bulk string: the flush path packs commands itself, from pre-encoded parts."""
    return b"$%d\r\n%b\r\n" % (len(value), value)


@dataclass(frozen=True, slots=True)
class Keys:
    """The keys of one session (see the module docstring)."""

    base: bytes  # P:{S}:
    meta: bytes
    log: bytes
    channel: bytes
    presence: bytes  # member -> expiry
    members: bytes  # member -> info
    head_resp: bytes  # meta and log as RESP bulk strings
    channel_resp: bytes

    def stream_resp(self, stream: bytes) -> bytes:
        """A token stream's text and ended-marker keys, as RESP bulk strings."""
        base = self.base
        return bulk(base + b"st:" + stream) + bulk(base + b"sc:" + stream)

    def idempotency_resp(self, sub: bytes, key: str) -> bytes:
        """The idempotency key ``key`` of sender subject ``sub``, as a RESP bulk string.

        The subject's length comes first, so no choice of ``sub`` and ``key`` can produce
        another sender's key.
        """
        return bulk(b"%si:%d:%s:%s" % (self.base, len(sub), sub, key.encode()))


class KeySpace:
    """The key names under one prefix, and per-session values this process derives once.

    Besides key names it remembers which sessions are known to be in ``P:sessions``
    (``registered``) and an epoch to offer Redis for a session that may have none yet.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.sessions = f"{prefix}:sessions".encode()
        self.registered: set[str] = set()
        self._keys: dict[str, Keys] = {}
        self._candidates: dict[str, tuple[bytes, bytes]] = {}

    def of(self, session: str) -> Keys:
        keys = self._keys.get(session)
        if keys is None:
            if len(self._keys) >= KEY_CACHE_SIZE:
                self._keys.clear()
            base = f"{self.prefix}:{{{session}}}:".encode()
            meta, log, channel = base + b"meta", base + b"log", base + b"ch"
            keys = self._keys[session] = Keys(
                base, meta, log, channel, base + b"pz", base + b"pi",
                bulk(meta) + bulk(log), bulk(channel))
        return keys

    def candidate(self, session: str) -> tuple[bytes, bytes]:
        """An epoch for the session if it has none yet, plain and RESP-encoded.

        Redis only uses it when the session has no epoch, so an unused one is offered again.
        """
        candidate = self._candidates.get(session)
        if candidate is None:
            if len(self._candidates) >= KEY_CACHE_SIZE:
                self._candidates.clear()
            epoch = new_epoch(session).encode()
            candidate = self._candidates[session] = (epoch, bulk(epoch))
        return candidate

    def epoch_taken(self, session: str, epoch: bytes) -> None:
        """Redis answered with ``epoch``: the candidate, if it was that one, is used up."""
        candidate = self._candidates.get(session)
        if candidate is not None and candidate[0] == epoch:
            del self._candidates[session]
