"""The scenarios against a native tether agent: the reference the integrations match."""

from __future__ import annotations

from typing import Any

import pytest

from tests.agents.integrations import scenarios

pytestmark = pytest.mark.slow
SPEC = "tests.agents.integrations.native_agent:agent"


@pytest.mark.parametrize("scenario", [
    scenarios.streaming, scenarios.server_tool, scenarios.approval_across_sigkill,
    scenarios.rejection, scenarios.client_tool, scenarios.cancel, scenarios.steer,
    scenarios.restart_mid_stream])
async def test_native(serve_agent: Any, scenario: Any) -> None:
    await scenario(serve_agent(SPEC))
