"""The AI SDK tests' Node project: ``npm ci`` in ``tests/aisdk`` once per run when its
``node_modules`` is missing (CI machines start without it), from the committed lock file."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def aisdk_node_modules() -> Path:
    """``tests/aisdk/node_modules``, installed with ``npm ci`` if it is not there yet."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed (the AI SDK tests need Node.js 20+)")
    modules = HERE / "node_modules"
    # npm writes this file last: its absence means no install, or one that was cut short.
    if not (modules / ".package-lock.json").exists():
        result = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=HERE,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"npm ci failed:\n{result.stdout}\n{result.stderr}"
    return modules
