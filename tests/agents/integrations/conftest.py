"""Fixtures for framework agents served as tether runs: the simulated Chat Completions
upstream (in this process, on a loopback port) and a ``tether serve`` subprocess whose agent
talks to it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.agents.integrations.scenarios import ARGUMENTS, Served
from tests.helpers import ServerProcess
from tether.agents.upstream import SimulatedUpstream, serve


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[SimulatedUpstream, str]]:
    up = SimulatedUpstream(seed=3, answer_tokens=12, arguments=ARGUMENTS)
    runner = await serve("127.0.0.1", 0, up)
    port = runner.addresses[0][1]
    yield up, f"http://127.0.0.1:{port}/v1"
    await runner.cleanup()


@pytest.fixture
def serve_agent(tmp_path: Path, upstream: tuple[SimulatedUpstream, str]
                ) -> Iterator[object]:
    """``serve_agent("module:object")`` starts ``tether serve --agent`` with it on fw-*."""
    started: list[ServerProcess] = []

    def start(spec: str) -> Served:
        server = ServerProcess(tmp_path / "data", extra=["--agent", spec, "--sessions", "fw-*"],
            env={"OPENAI_BASE_URL": upstream[1], "OPENAI_API_KEY": "sk-test",
                 "OPENAI_AGENTS_DISABLE_TRACING": "1"})
        (tmp_path / "data").mkdir(exist_ok=True)
        started.append(server.start())
        return Served(server, upstream[0])

    yield start
    for server in started:
        server.stop()
