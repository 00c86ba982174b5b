from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.protocol.codec import JSON, MSGPACK, DecodeError
from tether.protocol.codes import (
    CLOSE_CODE_MEANINGS,
    CloseCode,
    ErrorCode,
    RequestError,
    should_reconnect,
)
from tether.protocol.cursor import Cursor, CursorError
from tether.protocol.events import check_event_type, valid_session_id
from tether.protocol.frames import Attach, FrameError, Hello, Publish, parse_client_frame

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=10,
)


def test_parse_valid_frames() -> None:
    hello = parse_client_frame({"op": "hello", "id": 1, "token": "t", "kind": "agent",
                                "tools": ["confirm"]})
    assert hello == Hello(1, "t", "", "", "agent", ("confirm",))
    attach = parse_client_frame({"op": "attach", "id": "a", "session": "s", "cursor": "abc:3"})
    assert isinstance(attach, Attach) and attach.cursor is not None and attach.cursor.seq == 3
    publish = parse_client_frame({"op": "publish", "session": "s", "type": "message",
                                  "data": {"x": 1}, "key": "k"})
    assert publish == Publish(None, "s", "message", {"x": 1}, "k", False)


@pytest.mark.parametrize(("frame", "code"), [
    ({"op": "nope"}, ErrorCode.UNKNOWN_FRAME),
    ({"op": 5}, ErrorCode.BAD_FRAME),
    ({}, ErrorCode.BAD_FRAME),
    ({"op": "attach"}, ErrorCode.INVALID),
    ({"op": "attach", "session": "s", "cursor": "x"}, ErrorCode.BAD_CURSOR),
    ({"op": "hello", "kind": "robot"}, ErrorCode.INVALID),
    ({"op": "publish", "session": "s", "type": ""}, ErrorCode.INVALID),
    ({"op": "presence.set", "session": "s", "state": []}, ErrorCode.INVALID),
])
def test_invalid_frames(frame: dict[str, Any], code: ErrorCode) -> None:
    with pytest.raises(FrameError) as info:
        parse_client_frame(frame)
    assert info.value.code == code


@given(st.dictionaries(st.sampled_from(["op", "id", "session", "cursor", "type", "data", "key",
                                        "token", "kind", "tools", "state", "transient"]),
                       json_values, max_size=8))
def test_any_map_parses_or_raises_frame_error(frame: dict[str, Any]) -> None:
    try:
        parse_client_frame(frame)
    except FrameError as exc:
        assert exc.code in ErrorCode


@given(st.dictionaries(st.text(max_size=8), json_values, max_size=6))
def test_codecs_round_trip(frame: dict[str, Any]) -> None:
    for codec in (JSON, MSGPACK):
        assert codec.decode(codec.encode(frame)) == frame


@given(st.binary(max_size=64))
def test_codecs_reject_garbage_with_decode_error(data: bytes) -> None:
    for codec in (JSON, MSGPACK):
        try:
            frame = codec.decode(data)
        except DecodeError:
            continue
        assert isinstance(frame, dict)


def test_close_code_table_is_complete_and_ranged() -> None:
    assert set(CLOSE_CODE_MEANINGS) == set(CloseCode)
    for code in CloseCode:
        assert code.reconnect == (4000 <= code < 4500)
    assert should_reconnect(1006) and should_reconnect(None) and not should_reconnect(1009)


def test_reserved_event_types() -> None:
    check_event_type("message")
    check_event_type("stream.append")
    for bad, code in [("run.whatever", ErrorCode.UNKNOWN_EVENT_TYPE),
                      ("1abc", ErrorCode.INVALID), ("message\n", ErrorCode.INVALID),
                      ("mess\u00e4ge", ErrorCode.INVALID)]:
        with pytest.raises(RequestError) as caught:
            check_event_type(bad)
        assert caught.value.code == code, bad


@pytest.mark.parametrize("text", ["AbCdEfGh:\u00b2", "AbCdEfGh:\u0661", "AbCdEfGh:1\n",
                                  "AbCdEfGh\n:1", "Ab\u00e7dEfGh:1", ":1", "AbCdEfGh:"])
def test_cursors_are_ascii_and_matched_whole(text: str) -> None:
    with pytest.raises(CursorError):
        Cursor.parse(text)


def test_session_ids_are_ascii_and_matched_whole() -> None:
    assert valid_session_id("demo-1")
    for bad in ("demo\n", "d\u00e9mo", "", "-demo", "a" * 129):
        assert not valid_session_id(bad), bad
