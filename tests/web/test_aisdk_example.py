"""The Vercel AI SDK over tether: ``TetherChatTransport`` (tether/web/sdk/tether.js) with the
real, pinned packages of ``examples/ai-sdk-react`` (``npm ci`` there once per run when its
node_modules is missing or older than its package-lock.json).

* The SDK's own chat class (``AbstractChat`` of ``ai``) in Node against ``tether serve``:
  examples/ai-sdk-react/test/transport.test.mjs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "ai-sdk-react"


def _npm_ci() -> None:
    """``npm ci`` unless node_modules was installed from this very package-lock.json."""
    lock = EXAMPLE / "package-lock.json"
    stamp = EXAMPLE / "node_modules" / ".tether-lock-sha256"
    digest = hashlib.sha256(lock.read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        return
    started = time.monotonic()
    result = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                            cwd=EXAMPLE, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"npm ci failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    stamp.write_text(digest)
    print(f"npm ci in {EXAMPLE.relative_to(ROOT)}: {time.monotonic() - started:.1f}s")


@pytest.fixture(scope="session")
def example_packages() -> Iterator[Path]:
    """examples/ai-sdk-react with its pinned packages installed (once per run)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed (the AI SDK tests need Node.js 20+)")
    _npm_ci()
    yield EXAMPLE


@pytest.mark.slow
def test_ai_sdk_chat_over_tether_chat_transport(example_packages: Path) -> None:
    env = {**os.environ, "TETHER_PYTHON": sys.executable}
    env.pop("NODE_TEST_CONTEXT", None)
    result = subprocess.run(["node", "--test", "test/"], cwd=example_packages, env=env,
                            capture_output=True, text=True, timeout=300)
    summary = [line for line in result.stdout.splitlines()
               if line.startswith(("# pass", "# fail", "not ok"))]
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert any(line.startswith("# pass") for line in summary), result.stdout[-2000:]
