"""The msgspec fast path for ``publish`` agrees with the reference path on every input.

``fast_publish`` may decline anything (the reference path then answers), but whatever it
accepts must be exactly what ``JSON.decode`` + ``parse_client_frame`` make of the same bytes.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.protocol.codec import JSON, DecodeError
from tether.protocol.frames import FrameError, Publish, fast_publish, parse_client_frame

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12,
)
field_values = json_values | st.sampled_from(
    ["publish", "ack", "s-1", "a" * 64, "a" * 65, "a" * 129, "s\n", "", "é", 2**63, -(2**63) - 1,
     2**64, True, False, 1.0])


def reference(data: bytes | str) -> Publish | None:
    try:
        frame = parse_client_frame(JSON.decode(data))
    except (DecodeError, FrameError):
        return None
    return frame if isinstance(frame, Publish) else None


def check(data: bytes | str) -> None:
    fast = fast_publish(data)
    if fast is not None:
        assert fast == reference(data), data


@settings(max_examples=1000)
@given(st.dictionaries(st.sampled_from(["op", "id", "session", "type", "data", "key",
                                        "transient", "x"]), field_values, max_size=7),
       st.booleans())
def test_fast_path_agrees_with_reference(frame: dict[str, Any], publish: bool) -> None:
    if publish:
        frame["op"] = "publish"
    try:
        data = orjson.dumps(frame)
    except TypeError:  # integers beyond 64 bits: write them by hand below
        return
    check(data)
    check(data.decode())


VALID = b'{"op":"publish","session":"s1","type":"message"%s}'


@pytest.mark.parametrize("extra", [
    b',"data":{"a":[1,2.5,"x"]}', b',"id":7', b',"id":"r1"', b',"key":"k"', b',"transient":true',
    b',"data":123456789012345678901234567890', b',"data":18446744073709551616',
    b',"data":"\\ud800"', b',"data":1e400', b',"x":1e400', b',"x":"\\ud800"', b',"id":1.0',
    b',"id":true', b',"id":18446744073709551616', b',"id":"' + b"a" * 65 + b'"',
    b',"transient":null', b',"key":""', b',"key":null', b',"op":"ack"', b',"session":"s2"',
    b',"data":' + b"[" * 1100 + b"]" * 1100, b',"data":' + b"[" * 40 + b"]" * 40,
    b',"session":"s\\n"', b',"type":"' + b"t" * 65 + b'"', b',"data":NaN', b',"data":[1,]',
])
def test_edge_cases_agree(extra: bytes) -> None:
    data = VALID % extra
    check(data)
    check(data.decode(errors="surrogatepass"))


def test_fast_path_takes_the_usual_publish() -> None:
    frame = (b'{"op":"publish","id":3,"session":"stream-1","type":"stream.append",'
             b'"data":{"stream":"m1","text":"hi"}}')
    fast = fast_publish(frame)
    assert fast == Publish(3, "stream-1", "stream.append", {"stream": "m1", "text": "hi"})
    assert fast == reference(frame)


@pytest.mark.parametrize("data", [
    b"", b"[]", b"null", b'{"op":"ping"}', b'{"op":"publish"}', b"\xff",
    b'{"session":"s","type":"t"}', b'{"op":null,"session":"s","type":"t"}',
    b'{"op":"\\u0000","session":"s","type":"t"}',
    b'{"op":"publish","session":"s","type":"t"} x', b'\xef\xbb\xbf{"op":"publish"}',
])
def test_fast_path_declines_what_is_not_a_valid_publish(data: bytes) -> None:
    assert fast_publish(data) is None
