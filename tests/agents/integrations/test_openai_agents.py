"""The scenarios against an OpenAI Agents SDK agent served by tether."""

from __future__ import annotations

from typing import Any

import pytest

from tests.agents.integrations import scenarios

pytestmark = pytest.mark.slow
SPEC = "tests.agents.integrations.openai_agents_agent:agent"


@pytest.mark.parametrize("scenario", [
    scenarios.streaming, scenarios.server_tool, scenarios.approval_across_sigkill,
    scenarios.rejection, scenarios.client_tool, scenarios.cancel, scenarios.steer])
async def test_openai_agents(serve_agent: Any, scenario: Any) -> None:
    await scenario(serve_agent(SPEC))
