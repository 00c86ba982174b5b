"""Fixtures for the real-browser tests: Debian's Chromium driven by Playwright for Python,
against a real ``tether serve`` subprocess.

Playwright cannot download browsers here; it launches ``/usr/bin/chromium`` (installed by
``scripts/test`` with ``apt-get install -y chromium``). Without it, the browser tests skip with
that reason.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ServerProcess

CHROMIUM = os.environ.get("TETHER_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "web"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "browser: drives Debian's Chromium with Playwright (skips without it)")


def _skip_reason() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is missing (apt-get install -y chromium; scripts/test installs it)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]')"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def _serve(agent: str | None) -> Iterator[ServerProcess]:
    folder = Path(tempfile.mkdtemp(prefix="tether-web-"))
    (folder / "data").mkdir()
    extra = ["--agent", agent] if agent else []
    server = ServerProcess(folder / "data", extra=extra).start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def slow_server() -> Iterator[ServerProcess]:
    """The demo agent with a 3-second answer, for refresh, offline and Stop mid-stream."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    yield from _serve("tests.web.agents:slow")


@pytest.fixture(scope="module")
def default_server() -> Iterator[ServerProcess]:
    """``tether serve`` with no agent flag: the demo agent as a new user gets it."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    yield from _serve(None)


@pytest.fixture
def shots(request: pytest.FixtureRequest) -> Any:
    """``shots(page, "state")`` saves tests/artifacts/web/{test}-{state}.png."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    name = request.node.name.removeprefix("test_")

    def take(page: Any, state: str, **kwargs: Any) -> Path:
        path = ARTIFACTS / f"{name}-{state}.png"
        page.screenshot(path=str(path), **kwargs)
        return path

    return take
