"""Fuzzing in CI: 50,000 generated inputs (WebSocket frames and HTTP requests) against a real
server, with a bystander client that must not notice.

The harness is ``bench/fuzz.py`` (its docstring lists the generators and the oracle); the long
run is ``python -m bench.fuzz --inputs 1000000`` (figures in ``docs/security.md``). A failure
message carries the seed and the frames or request that preceded it: re-run
``run_fuzz(inputs, seed)`` with the same seed to reproduce it.
"""

from __future__ import annotations

import pytest

from bench import fuzz
from tether.protocol.frames import Ack
from tether.server import connection, http

INPUTS = 50_000
SEED = 20_240_601


@pytest.mark.timeout(300)
async def test_fuzz_frames_and_http_with_a_bystander() -> None:
    report = await fuzz.run_fuzz(INPUTS, SEED)
    print(report.summary())
    assert report.inputs >= INPUTS
    assert report.ws_frames > 0.8 * INPUTS and report.http_requests > 0.1 * INPUTS
    assert report.tracebacks == []
    assert report.failures == [], report.summary()
    assert report.bystander_published > 100
    assert report.bystander_losses == 0
    assert report.bystander_received == report.bystander_published
    assert report.log_events >= report.bystander_published
    # The fuzz reached past the decoder: every kind of request error was answered.
    for code in ("bad_frame", "unknown_frame", "invalid", "bad_cursor", "not_attached",
                 "unknown_event_type", "run_not_found", "forbidden"):
        assert report.error_codes[code] > 0, code
    assert {200, 201, 400, 401, 404} <= set(report.http_status)


@pytest.mark.timeout(120)
async def test_the_oracle_sees_injected_bugs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A handler that raises, and a route that answers 500, are both reported."""

    def broken_ack(self: connection.Connection, frame: Ack) -> None:
        raise RuntimeError("injected ack bug")

    async def broken_healthz(request: object) -> None:
        raise RuntimeError("injected healthz bug")

    monkeypatch.setattr(connection.Connection, "_ack", broken_ack)
    monkeypatch.setattr(http, "healthz", broken_healthz)
    report = await fuzz.run_fuzz(6000, SEED, examples=100, http_share=0.3)
    assert any("injected ack bug" in t for t in report.tracebacks), report.summary()
    assert any("injected healthz bug" in t for t in report.tracebacks), report.summary()
    assert any(f.startswith("HTTP 500") and "/healthz" in f for f in report.failures)
    assert report.error_codes["internal"] > 0
