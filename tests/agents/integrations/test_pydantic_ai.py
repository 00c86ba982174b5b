"""The scenarios against a Pydantic AI agent served with ``tether serve --agent``."""

from __future__ import annotations

from typing import Any

import pytest

from tests.agents.integrations import scenarios

pytestmark = pytest.mark.slow
SPEC = "tests.agents.integrations.pydantic_ai_agent:agent"


@pytest.mark.parametrize("scenario", [
    scenarios.streaming, scenarios.server_tool, scenarios.approval_across_sigkill,
    scenarios.rejection, scenarios.client_tool, scenarios.cancel, scenarios.steer])
async def test_pydantic_ai(serve_agent: Any, scenario: Any) -> None:
    await scenario(serve_agent(SPEC))
