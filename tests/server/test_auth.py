"""Token issuing (``tether.server.auth``)."""

from __future__ import annotations

import time

import jwt

from tests.helpers import SECRET
from tether.server.auth import issue_token


def test_a_token_lives_at_least_its_ttl() -> None:
    before = time.time()
    claims = jwt.decode(issue_token(SECRET, "alice", ["*"], ["subscribe"], ttl=1), SECRET,
                        algorithms=["HS256"])
    # ``exp`` is whole seconds; truncating it would cut a one-second token to milliseconds.
    assert claims["exp"] >= before + 1
