"""docs/web.md's examples run as written: every ```js block in Node and the ```html page in
Chromium, against ``tether serve`` with the demo agent. Only the server's address (the
documented default port) and, for Node, the SDK's path are adapted to the test."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ServerProcess, token
from tests.web.conftest import CHROMIUM, CHROMIUM_ARGS, _skip_reason

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "web.md"
SDK = ROOT / "tether" / "web" / "sdk" / "tether.js"
DEFAULT = "127.0.0.1:8765"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), re.S)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data = tmp_path_factory.mktemp("docs") / "data"
    data.mkdir()
    server = ServerProcess(data).start()
    yield server
    server.stop()


def test_the_page_has_examples() -> None:
    assert len(blocks("js")) >= 4
    assert len(blocks("html")) == 1


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(blocks("js"))))
def test_node_example_runs(index: int, server: ServerProcess, tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    source = blocks("js")[index]
    assert "./tether/web/sdk/tether.js" in source
    source = source.replace("./tether/web/sdk/tether.js", SDK.as_uri())
    source = source.replace(DEFAULT, f"127.0.0.1:{server.port}")
    script = tmp_path / f"example{index}.mjs"
    script.write_text(source)
    major = int(subprocess.run([node, "--version"], capture_output=True, text=True,
                               check=True).stdout.strip().lstrip("v").split(".")[0])
    flags = ["--experimental-websocket"] if major < 22 else []
    env = {**os.environ, "TETHER_TOKEN": token("alice", ["demo*", "chat-*"], [
        "subscribe", "publish", "presence", "approve"]), "TETHER_PYTHON": sys.executable}
    result = subprocess.run([node, *flags, str(script)], capture_output=True, text=True,
                            timeout=60, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Error" not in result.stderr, result.stderr


def test_html_example_runs_in_chromium(server: ServerProcess) -> None:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    [page_source] = blocks("html")
    page_source = page_source.replace(DEFAULT, f"127.0.0.1:{server.port}")
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page: Any = browser.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        # Load the example in the server's origin, as a page served next to it would be.
        page.goto(f"http://127.0.0.1:{server.port}/healthz")
        page.set_content(page_source)
        page.wait_for_function(
            "() => document.getElementById('out').textContent.trim().endsWith('.')",
            timeout=20000)
        text = page.inner_text("#out").strip()
        browser.close()
    assert not errors, errors
    assert len(text.split()) > 20
