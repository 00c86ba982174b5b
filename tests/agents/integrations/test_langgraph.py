"""The scenarios against a LangGraph graph served by tether, and the checkpointer that keeps
LangGraph's checkpoints in the session log."""

from __future__ import annotations

from typing import Any

import pytest

from tests.agents.integrations import scenarios

SPEC = "tests.agents.integrations.langgraph_agent:agent"


@pytest.mark.slow
@pytest.mark.parametrize("scenario", [
    scenarios.streaming, scenarios.server_tool, scenarios.approval_across_sigkill,
    scenarios.rejection, scenarios.client_tool, scenarios.cancel, scenarios.steer])
async def test_langgraph(serve_agent: Any, scenario: Any) -> None:
    await scenario(serve_agent(SPEC))
