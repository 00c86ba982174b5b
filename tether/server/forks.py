"""Forks: a log that reads another log's prefix, then its own events.

A fork of stream ``P`` at position ``at`` is a new session whose first record names ``P`` and
``at``. Reading it reads ``P`` up to ``at`` and then the fork's own events; nothing is copied.
Positions are comparable across the branch point: the fork's own events are numbered from
``at + 1`` on (``position = local seq + delta``), so an offset read from the parent before the
fork still means the same place in the fork.

A stream's *chain* is the list of :class:`Segment` s a read walks: the root's log, then each
fork's own log in turn, every segment but the last bounded by its branch point. A fork records
its whole inherited chain when it is created, so reads never consult the parents' metadata: a
parent may be deleted, re-created or forked again without changing what the fork reads, and the
data stays where it is (the parent's log, which the fork keeps alive: see ``docs/
durable-streams.md``).

This module knows nothing of HTTP or of a particular store: it reads through a ``Reader``
callback. It is written so that it can move into the store protocol (``SessionStore.read``
following a session's chain itself) when conversation branching needs forks below the
Durable Streams transport.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tether.protocol.events import Event

# (session, after local seq, at most this many) → (events after it in seq order, the
# session's last seq). The reader raises when the log no longer holds ``after`` (retention).
Reader = Callable[[str, int, int], Awaitable[tuple[list[Event], int]]]


@dataclass(frozen=True, slots=True)
class Segment:
    """Events of ``session`` whose positions lie in ``(after, upto]`` (``upto`` None: open)."""

    session: str
    delta: int  # position = local seq + delta
    after: int
    upto: int | None

    def to_json(self) -> list[Any]:
        return [self.session, self.delta, self.after, self.upto]

    @classmethod
    def from_json(cls, value: Any) -> Segment:
        session, delta, after, upto = value
        return cls(str(session), int(delta), int(after), None if upto is None else int(upto))


def root(session: str, created_seq: int) -> tuple[Segment, ...]:
    """The chain of a stream that is not a fork: its own log after its creation record."""
    return (Segment(session, 0, created_seq, None),)


def inherited(chain: Sequence[Segment], at: int) -> tuple[Segment, ...]:
    """What a fork of ``chain`` at position ``at`` reads before its own events."""
    out = []
    for segment in chain:
        if segment.after >= at:
            break
        upto = at if segment.upto is None else min(segment.upto, at)
        out.append(dataclasses.replace(segment, upto=upto))
    return tuple(out)


def fork_chain(parents: Sequence[Segment], session: str, created_seq: int,
               at: int) -> tuple[Segment, ...]:
    """The chain of a fork whose creation record is ``created_seq`` in ``session``."""
    return (*parents, Segment(session, at - created_seq, at, None))


def tail(chain: Sequence[Segment], last_seq: int) -> int:
    """The position of the newest event of a stream whose own log ends at ``last_seq``."""
    own = chain[-1]
    return max(own.after, last_seq + own.delta)


def start(chain: Sequence[Segment]) -> int:
    """The position before the stream's first event (what ``offset=-1`` means)."""
    return chain[0].after


@dataclass(frozen=True, slots=True)
class Page:
    events: list[Event]  # seq is the position in the chain (a copy where it differs)
    last: int  # the position of the last event covered (data or not)
    up_to_date: bool  # nothing after ``last`` yet


async def read(reader: Reader, chain: Sequence[Segment], after: int, limit: int) -> Page:
    """Up to ``limit`` events after position ``after``, walking the chain."""
    events: list[Event] = []
    position = after
    for segment in chain:
        if segment.upto is not None and position >= segment.upto:
            continue
        position = max(position, segment.after)
        local = position - segment.delta
        while True:
            wanted = limit - len(events)
            page, last_seq = await reader(segment.session, local, wanted)
            past_end = False
            for event in page:
                at = event.seq + segment.delta
                if segment.upto is not None and at > segment.upto:
                    past_end = True
                    break
                events.append(event if segment.delta == 0
                              else dataclasses.replace(event, seq=at))
                position = at
            if page:
                local = page[-1].seq
            exhausted = past_end or len(page) < wanted or local >= last_seq
            if segment.upto is None:
                if exhausted or len(events) >= limit:
                    return Page(events, position, exhausted and not past_end)
                continue
            if exhausted or position >= segment.upto:
                position = segment.upto  # the rest of the parent is not the fork's
                break
            if len(events) >= limit:
                return Page(events, position, False)
        if len(events) >= limit:
            return Page(events, position, False)
    return Page(events, position, True)
