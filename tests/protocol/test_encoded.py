"""Frames joined from stored bytes are byte for byte the reference encoder's frames.

The reference is what the live path sends: ``orjson.dumps(event_frame(event))`` (wrapped for
the format). A store keeps ``orjson.dumps(data)``; catch-up joins those bytes into the frame
instead of decoding them. Both must agree for any event a client can publish and a store can
hold, whether the reference starts from the event as published or as read back.
"""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.protocol.cursor import new_epoch
from tether.protocol.encoded import (
    FORMAT_JSON,
    FORMAT_JSON_WS,
    FORMAT_SSE,
    FORMATS,
    FrameBuilder,
    encode_reference,
    wrap,
    ws_frame,
)
from tether.protocol.events import SYSTEM, Event, Sender

I64_MIN, U64_MAX = -(2**63), 2**64 - 1

# Text with anything orjson encodes: control characters, quotes, backslashes, non-BMP
# characters (no lone surrogates: orjson refuses those, so no store holds them).
text = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(I64_MIN, U64_MAX),  # the whole range orjson encodes
    st.sampled_from([I64_MIN, -1, 0, 2**53 + 1, 2**63 - 1, 2**63, U64_MAX]),
    st.floats(allow_nan=True, allow_infinity=True),  # NaN and ±inf are stored as null
    st.sampled_from([0.1, -0.0, 1e16, 1e-7, 5e-324, 1.7976931348623157e308, 1.5e300]),
    text,
)
json_data = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=5),
                            st.dictionaries(text, inner, max_size=5)),
    max_leaves=30,
)
sessions = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}", fullmatch=True)
types = st.one_of(st.from_regex(r"[A-Za-z][A-Za-z0-9_.:-]{0,63}", fullmatch=True),
                  st.sampled_from(["stream.append", "stream.end", "run.delta", "tool.call",
                                   "tether.unreadable"]))
senders = st.one_of(
    st.just(SYSTEM),
    st.builds(Sender, text, text, st.sampled_from(["human", "agent", "system"])),
    st.builds(Sender, text, text, text),  # whatever a stored row holds
)
events = st.builds(
    Event,
    session=sessions,
    epoch=st.one_of(st.builds(new_epoch, sessions), st.builds(new_epoch)),
    seq=st.integers(1, 2**63 - 1),
    type=types,
    data=json_data,
    sender=senders,
    time=st.integers(0, 2**53),
)


def stored_frame(fmt: str, event: Event) -> tuple[bytes, Event]:
    """The frame catch-up builds from the row a store keeps of ``event``, and the event
    a decoding read gives back from that row."""
    raw = orjson.dumps(event.data)  # what the SQLite store writes at commit
    sender = event.sender
    built = FrameBuilder(event.session, event.epoch, fmt).frame(
        event.seq, event.type, raw, sender.sub, sender.client, sender.kind, event.time)
    read = Event(event.session, event.epoch, event.seq, event.type, orjson.loads(raw),
                 sender, event.time)
    return built, read


@settings(max_examples=400, deadline=None)
@given(events, st.sampled_from(sorted(FORMATS)))
def test_a_frame_from_stored_bytes_is_the_reference_frame(event: Event, fmt: str) -> None:
    built, read = stored_frame(fmt, event)
    assert built == encode_reference(fmt, read)  # the reference read path
    assert built == encode_reference(fmt, event)  # the live path, from the published event


@given(st.lists(events, min_size=1, max_size=8), st.sampled_from(sorted(FORMATS)))
def test_one_builder_serves_a_page_of_many_senders_and_types(page: list[Event],
                                                             fmt: str) -> None:
    first = page[0]
    builder = FrameBuilder(first.session, first.epoch, fmt)
    for event in page:
        event = Event(first.session, first.epoch, event.seq, event.type, event.data,
                      event.sender, event.time)
        sender = event.sender
        assert builder.frame(event.seq, event.type, orjson.dumps(event.data), sender.sub,
                             sender.client, sender.kind, event.time) \
            == encode_reference(fmt, event)


def test_every_websocket_length_form() -> None:
    # An event frame is longer than 125 bytes: 16-bit lengths, and 64-bit from 65,536 bytes.
    epoch = new_epoch("s")

    def event(size: int) -> Event:
        return Event("s", epoch, 7, "message", {"text": "x" * size}, Sender("u"), 1)

    overhead = len(encode_reference(FORMAT_JSON, event(0)))
    for length in (200, 65535, 65536):
        e = event(length - overhead)
        payload = encode_reference(FORMAT_JSON, e)
        assert len(payload) == length
        built, _ = stored_frame(FORMAT_JSON_WS, e)
        assert built == ws_frame(payload, False) == encode_reference(FORMAT_JSON_WS, e)


def test_percent_signs_in_a_session_or_epoch_are_literal() -> None:
    # The builder's template is a %-format: nothing of the session may act as a directive.
    event = Event("a%d%s%%b", "ep%d%", 3, "message", {"p": "%s"}, Sender("%d", "%b", "%"), 9)
    for fmt in FORMATS:
        built, _ = stored_frame(fmt, event)
        assert built == encode_reference(fmt, event)


def test_formats() -> None:
    payload = b'{"op":"event"}'
    assert wrap(FORMAT_JSON, payload, "e", 4) == payload
    assert wrap(FORMAT_SSE, payload, "e", 4) == b'id: e:4\ndata: {"op":"event"}\n\n'
    assert wrap(FORMAT_JSON_WS, payload, "e", 4) == b"\x81\x0e" + payload
    assert ws_frame(b"x" * 125, False)[:2] == b"\x81\x7d"
    assert ws_frame(b"x" * 126, True)[:4] == b"\x82\x7e\x00\x7e"
    assert ws_frame(b"x" * 65536, False)[:10] == b"\x81\x7f" + (65536).to_bytes(8, "big")
