"""Load shedding for a reconnect storm: at most ``max_connect_rate`` new WebSockets per second
per process; the rest are told when to come back.

A deploy or a crash drops every connection of a node at once, and every client reconnects. The
SDKs spread their attempts with jittered backoff, but a node should not depend on every client
behaving: beyond the configured rate, a new WebSocket is accepted and closed at once with
``4003 try_again_later`` and a reason ``retry_after=SECONDS`` (before ``hello``, so the
expensive part, token verification and attach, is never paid for it). The delays handed out
grow with the number of clients already sent away, so the returning crowd arrives at about the
admitted rate instead of all at once; the SDKs wait that long (plus a little jitter) instead of
their own backoff.
"""

from __future__ import annotations

import time

from tether.protocol.codes import MAX_RETRY_AFTER


class Admission:
    """A token bucket for new connections, and the queue of those sent away."""

    __slots__ = ("_deferred", "_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: int = 0) -> None:
        self.rate = rate
        self.burst = float(burst or max(1.0, rate))
        self._tokens = self.burst
        self._deferred = 0.0  # clients told to come back, not yet due
        self._stamp = time.monotonic()

    def retry_after(self) -> float:
        """0.0 to admit this connection now; otherwise the seconds it should wait."""
        now = time.monotonic()
        elapsed = now - self._stamp
        self._stamp = now
        self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
        self._deferred = max(0.0, self._deferred - elapsed * self.rate)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        # Behind every client already sent away: they come back at the admitted rate.
        self._deferred += 1.0
        return min(MAX_RETRY_AFTER, self._deferred / self.rate)

