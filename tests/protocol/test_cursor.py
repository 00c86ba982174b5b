from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.protocol.cursor import Cursor, CursorError, epoch_belongs, new_epoch

sessions = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,40}", fullmatch=True)


@given(sessions, st.integers(min_value=0, max_value=10**15))
def test_cursor_round_trips(session: str, seq: int) -> None:
    cursor = Cursor(new_epoch(session), seq)
    assert Cursor.parse(str(cursor)) == cursor


@given(sessions, sessions)
def test_epoch_tells_sessions_apart(a: str, b: str) -> None:
    epoch = new_epoch(a)
    assert epoch_belongs(epoch, a)
    if a != b:
        # 32-bit tags: a collision is possible in principle, never in these examples.
        assert not epoch_belongs(epoch, b)


@given(st.text(max_size=40))
def test_garbage_never_parses_silently(text: str) -> None:
    try:
        cursor = Cursor.parse(text)
    except CursorError:
        return
    assert Cursor.parse(str(cursor)) == cursor
    assert text.startswith(cursor.epoch + ":")


@pytest.mark.parametrize("text", ["", ":", "abc", "abc:", ":5", "a b:1", "abc:-1", "abc:1.5",
                                  "abc:99999999999999999999"])
def test_malformed_cursors(text: str) -> None:
    with pytest.raises(CursorError):
        Cursor.parse(text)
