"""Reading a log never aborts on one bad stored event.

An event stored before today's publish checks (data nested too deep to frame, say), or a row
damaged on disk, must not make a session unreadable: readers get a documented placeholder
(:func:`tether.protocol.events.unreadable`) in its place, the event is counted in
``tether_unreadable_events_total`` and logged once per read. ``tether doctor`` lists them.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from tether.protocol.encoded import encode_reference
from tether.protocol.events import MAX_DELIVERABLE_DEPTH, Event, Sender, unreadable

log = logging.getLogger("tether.store")


class UnreadableCounter:
    """How many placeholders this process has served (read by the metrics collector)."""

    count = 0


def problem_with(data: Any) -> str | None:
    """Why ``data`` cannot be framed in every wire format, or None."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > MAX_DELIVERABLE_DEPTH:
                return f"nested more than {MAX_DELIVERABLE_DEPTH} deep"
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children
                         if isinstance(child, dict | list))
    try:
        orjson.dumps(data)
    except TypeError as exc:
        return f"not encodable: {exc}"
    return None


def decode_rows(session: str, epoch: str,
                rows: list[tuple[int, str, bytes | str, str, str, str, int]]) -> list[Event]:
    """Events from stored rows, with a placeholder for each one that cannot be delivered.

    The common case costs one ``orjson.loads`` per row and a size-free depth check only for
    data that is unusually nested, so a healthy page is read at full speed.
    """
    events: list[Event] = []
    for seq, type_, raw, sub, client, kind, t in rows:
        sender = Sender(sub, client, kind)
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            events.append(placeholder(Event(session, epoch, seq, type_, None, sender, t),
                                       f"stored data does not decode: {exc}"))
            continue
        event = Event(session, epoch, seq, type_, data, sender, t)
        if isinstance(data, dict | list) and _nested(raw):
            problem = problem_with(data)
            if problem is not None:
                event = placeholder(event, problem)
        events.append(event)
    return events


def _nested(raw: bytes | str) -> bool:
    """Cheap pre-check: could this JSON text nest deeper than the deliverable limit?"""
    if len(raw) <= 2 * MAX_DELIVERABLE_DEPTH:  # too short to hold that many brackets
        return False
    if isinstance(raw, str):
        return raw.count("{") + raw.count("[") > MAX_DELIVERABLE_DEPTH
    return raw.count(b"{") + raw.count(b"[") > MAX_DELIVERABLE_DEPTH


def placeholder(event: Event, reason: str) -> Event:
    UnreadableCounter.count += 1
    log.warning("unreadable event %s:%d (%s): %s", event.session, event.seq, event.type, reason)
    return unreadable(event, reason)


def reference_frame(fmt: str, event: Event) -> bytes:
    """``event``'s frame in ``fmt`` (tether/protocol/encoded.py) by the reference encoder, or
    its placeholder's when it cannot be encoded: what catch-up sends for a stored event."""
    try:
        return encode_reference(fmt, event)
    except (TypeError, ValueError, OverflowError) as exc:
        return encode_reference(fmt, placeholder(event, f"not encodable: {exc}"))


def checked(event: Event, raw: bytes | str) -> Event:
    """``event`` (decoded from ``raw``), or its placeholder when it cannot be delivered."""
    if isinstance(event.data, dict | list) and _nested(raw):
        problem = problem_with(event.data)
        if problem is not None:
            return placeholder(event, problem)
    return event


def undecodable(event: Event, exc: Exception) -> Event:
    """The placeholder of a stored entry that does not decode."""
    return placeholder(event, f"stored data does not decode: {exc}")
