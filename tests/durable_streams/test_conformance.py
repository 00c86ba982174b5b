"""The official Durable Streams server conformance suite against `tether serve`, per store.

The suite is the pinned npm package in ``conformance/`` (installed here with ``npm ci``), run
by vitest programmatically (``conformance.test.mjs``) against a real ``tether serve`` process
on SQLite and on a real redis-server. Every test the suite does not skip must pass, except the
ones listed in ``KNOWN_FAILURES`` (each with its reason, and in docs/durable-streams.md).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RedisServer, free_port, wait_for_port

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent / "conformance"
TETHER = Path(sys.executable).with_name("tether")
# full test name → why tether cannot pass it. Empty: every test that is not skipped passes.
KNOWN_FAILURES: dict[str, str] = {}


@pytest.fixture(scope="module")
def suite() -> Path:
    """The pinned suite, installed once (``npm ci`` from the lock file)."""
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed (Node 20 + npm run the conformance suite)")
    if not (HERE / "node_modules" / ".package-lock.json").exists():
        subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=HERE,
                       check=True, timeout=240)
    return HERE


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    """Start ``tether serve`` with anonymous access on loopback; yields a starter."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(store: str | None) -> str:
        port = free_port()
        args = [str(TETHER), "serve", "--host", "127.0.0.1", "--port", str(port),
                "--data", str(tmp_path / "data"), "--agent", "none", "--log-level", "warning",
                "--anonymous", "*=subscribe,publish"]
        if store is not None:
            args += ["--store", store]
        # The suite's tests give up after 5 s: long-polls that find nothing answer after 3.
        # A shared store (Redis) wants an explicit secret: nodes must agree on it.
        env = {**os.environ, "TETHER_DS_LONG_POLL": "3", "TETHER_SECRET": secrets.token_hex(32)}
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL))
        wait_for_port(port)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as resp:
            assert resp.status == 200
        return f"http://127.0.0.1:{port}"

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(15)


def run_suite(suite: Path, base_url: str, report: Path) -> dict[str, list[str]]:
    """Run vitest with the JSON reporter; full test names by status."""
    npx = shutil.which("npx")
    assert npx is not None
    subprocess.run([npx, "vitest", "run", "conformance.test.mjs", "--reporter=json",
                    f"--outputFile={report}"], cwd=suite,
                   env={**os.environ, "TETHER_DS_URL": base_url, "CI": "1"},
                   stdout=subprocess.DEVNULL, timeout=240, check=False)
    results = json.loads(report.read_text())
    by_status: dict[str, list[str]] = {}
    for file in results["testResults"]:
        for test in file["assertionResults"]:
            by_status.setdefault(test["status"], []).append(test["fullName"])
    return by_status


def check(by_status: dict[str, list[str]]) -> None:
    failed = set(by_status.get("failed", []))
    passed = len(by_status.get("passed", []))
    skipped = len(by_status.get("pending", [])) + len(by_status.get("skipped", []))
    print(f"conformance: {passed} passed, {len(failed)} failed, {skipped} skipped")
    unexpected = sorted(failed - set(KNOWN_FAILURES))
    assert not unexpected, f"{len(unexpected)} conformance tests failed: {unexpected}"
    assert passed + skipped + len(failed) == 338, by_status.keys()  # the suite ran whole
    fixed = sorted(set(KNOWN_FAILURES) - failed)
    assert not fixed, f"listed as failing but passed (update KNOWN_FAILURES and docs): {fixed}"


def test_conformance_on_sqlite(suite: Path, serve: Any, tmp_path: Path) -> None:
    check(run_suite(suite, serve(None), tmp_path / "report.json"))


@pytest.mark.redis
def test_conformance_on_redis(suite: Path, serve: Any, tmp_path: Path,
                              redis_server: RedisServer) -> None:
    redis_server.flush()
    check(run_suite(suite, serve(redis_server.url), tmp_path / "report.json"))
