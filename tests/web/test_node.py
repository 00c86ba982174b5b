"""Runs the SDK's and the web app's Node tests (``node --test tests/web/``) under pytest, so the
single CI command covers them. They start their own ``tether serve`` with this Python."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_node_tests_pass() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (the SDK's Node tests need Node.js 20+)")
    env = {**os.environ, "TETHER_PYTHON": sys.executable}
    env.pop("NODE_TEST_CONTEXT", None)
    result = subprocess.run([node, "--test", "tests/web/"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    summary = [line for line in result.stdout.splitlines()
               if line.startswith(("# pass", "# fail", "not ok"))]
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert any(line.startswith("# pass") for line in summary), result.stdout[-2000:]
