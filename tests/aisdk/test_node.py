"""Runs the AI SDK's Node tests (``node --test tests/aisdk/``) under pytest: the SDK's own chat
class, from the pinned ``ai`` package, against ``tether serve`` started with this Python."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_ai_sdk_chat_in_node(aisdk_node_modules: Path) -> None:
    node = shutil.which("node")
    assert node is not None
    env = {**os.environ, "TETHER_PYTHON": sys.executable}
    env.pop("NODE_TEST_CONTEXT", None)
    result = subprocess.run([node, "--test", "--test-reporter=tap", "chat.test.mjs"], cwd=HERE,
                            env=env, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "# fail 0" in result.stdout, result.stdout[-2000:]
