"""The Vercel AI SDK over tether: ``TetherChatTransport`` (tether/web/sdk/tether.js) with the
real, pinned packages of ``examples/ai-sdk-react`` (``npm ci`` there once per run when its
node_modules is missing or older than its package-lock.json).

* The SDK's own chat class (``AbstractChat`` of ``ai``) in Node against ``tether serve``:
  examples/ai-sdk-react/test/transport.test.mjs.
* The example page (``useChat`` of ``@ai-sdk/react``, bundled with esbuild once per run) in
  Debian's Chromium, served by a static file server on another port than tether: a reload in
  the middle of a reply, a second tab, Stop — over ``TetherChatTransport``, and over the stock
  ``DefaultChatTransport`` (``?transport=http``, ``resume: true``) against /v1/ai-sdk/chat.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import ServerProcess, token

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


# --- the example page in Chromium -----------------------------------------------------------

@pytest.fixture(scope="session")
def example_site(example_packages: Path) -> Iterator[str]:
    """The built example (``npm run build``) on a static file server; yields its URL."""
    result = subprocess.run(["node", "build.mjs"], cwd=example_packages, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(example_packages / "dist"))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()


# Records every text an assistant message showed, to prove it only ever grew towards the final
# answer (a doubled delta would show a text that is not a prefix of it).
TEXT_RECORDER = """
(() => {
  window.__texts = {};
  const record = () => {
    for (const node of document.querySelectorAll('.msg[data-role="assistant"]')) {
      const text = [...node.querySelectorAll(".text")].map((n) => n.textContent).join("");
      const seen = (window.__texts[node.dataset.id] ||= []);
      if (seen[seen.length - 1] !== text) seen.push(text);
    }
  };
  document.addEventListener("DOMContentLoaded", () => {
    new MutationObserver(record).observe(document.body,
      { subtree: true, childList: true, characterData: true });
  });
})();
"""

# True, after clicking Stop, once the newest assistant answer has begun streaming.
STOP_WHEN_STREAMING = """() => {
  const a = document.querySelectorAll('.msg[data-role="assistant"] .text');
  const stop = document.querySelector("#stop");
  if (a.length < 2 || a[a.length - 1].textContent.length <= 30 || !stop) return false;
  stop.click();
  return true;
}"""

VIEW = """() => [...document.querySelectorAll(".msg")].map((node) => ({
  id: node.dataset.id,
  role: node.dataset.role,
  text: [...node.querySelectorAll(".text")].map((n) => n.textContent).join(""),
}))"""


def _events(server: ServerProcess, session: str) -> list[dict[str, Any]]:
    response = httpx.get(f"http://127.0.0.1:{server.port}/v1/sessions/{session}/events",
                         params={"limit": 1000},
                         headers={"Authorization": f"Bearer {token()}"}, timeout=10)
    response.raise_for_status()
    events: list[dict[str, Any]] = response.json()["events"]
    return events


def _wait(check: Any, what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _assistant_text(page: Any, index: int = 0) -> str:
    answers = [m for m in page.evaluate(VIEW) if m["role"] == "assistant"]
    return str(answers[index]["text"]) if len(answers) > index else ""


def _only_grew(page: Any, message: str, final: str) -> None:
    """Every text the message showed was a beginning of its final answer."""
    texts = page.evaluate("() => window.__texts")[message]
    wrong = [text for text in texts if not final.startswith(text)]
    assert not wrong, f"{message} showed text that is not a prefix of the answer: {wrong}"
    assert texts[-1] == final


@pytest.mark.browser
@pytest.mark.slow
def test_use_chat_page_reload_second_tab_and_stop(
        browser: Any, slow_server: ServerProcess, example_site: str, shots: Any) -> None:
    base = f"http://127.0.0.1:{slow_server.port}"
    # The page could do this dev login itself (it allows CORS from loopback origins); here the
    # token is given in the address, the fallback README.md shows.
    login = httpx.post(f"{base}/v1/dev/login", json={"name": "ai-sdk-page"}, timeout=10)
    login.raise_for_status()
    session = f"chat-aisdk-{os.getpid()}"
    url = f"{example_site}?server={base}&chat={session}"

    context = browser.new_context(viewport={"width": 1000, "height": 800})
    context.add_init_script(TEXT_RECORDER)
    context.set_default_timeout(20000)
    errors: list[str] = []
    page = context.new_page()
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{url}#token={login.json()['token']}")
    page.wait_for_selector('#conn[data-state="connected"]')
    assert "#token" not in page.url

    # Send, then reload while the answer streams.
    page.fill("#input", "tell me about tether")
    page.click("#send")
    page.wait_for_function("""() => {
        const a = document.querySelector('.msg[data-role="assistant"] .text');
        return a && a.textContent.length > 40;
    }""")
    assert not any(e["type"] == "run.state" and e["data"]["state"] == "completed"
                   for e in _events(slow_server, session)), "reloaded mid-stream"
    page.reload()
    page.wait_for_selector('#conn[data-state="connected"]')
    page.wait_for_function("""() => {
        const a = document.querySelector('.msg[data-role="assistant"] .text');
        return a && a.textContent.length > 0;
    }""")
    assert page.evaluate("() => window.__texts") is not None
    _wait(lambda: any(e["type"] == "run.state" and e["data"]["state"] == "completed"
                      for e in _events(slow_server, session)), "the run to complete")
    final = next(e["data"]["text"] for e in _events(slow_server, session)
                 if e["type"] == "stream.end")
    page.wait_for_selector('#status[data-status="ready"]')
    _wait(lambda: _assistant_text(page) == final, "the whole answer after the reload")
    view = page.evaluate(VIEW)
    assert [m["role"] for m in view] == ["user", "assistant"]
    assert view[0]["text"] == "tell me about tether"
    _only_grew(page, view[1]["id"], final)
    shots(page, "reloaded")

    # A second tab sees the same chat, then both see the next answer live; Stop from tab 1.
    second = context.new_page()
    second.on("pageerror", lambda exc: errors.append(str(exc)))
    second.goto(url)
    second.wait_for_selector('#conn[data-state="connected"]')
    _wait(lambda: second.evaluate(VIEW) == page.evaluate(VIEW), "the same chat in the second tab")

    second.fill("#input", "and what about runs?")
    second.click("#send")
    # Stop is pressed from inside the page the moment the answer has begun: a click sent from
    # here waits for actionability checks, and on a loaded machine the answer could end first.
    page.wait_for_function(STOP_WHEN_STREAMING)
    assert page.evaluate(VIEW)[2]["text"] == "and what about runs?"
    _wait(lambda: any(e["type"] == "run.state" and e["data"]["state"] == "cancelled"
                      for e in _events(slow_server, session)), "the run to be cancelled")
    events = _events(slow_server, session)
    cancel = next(e for e in events if e["type"] == "run.cancel")
    assert cancel["data"]["by"]["sub"] == "ai-sdk-page"
    stopped = [e for e in events if e["type"] == "stream.end"][-1]
    assert stopped["data"]["interrupted"] == "cancelled"
    for tab in (page, second):
        _wait(lambda tab=tab: _assistant_text(tab, 1) == stopped["data"]["text"],
              "the stopped answer in both tabs")
        tab.wait_for_selector('#status[data-status="ready"]')
        tab.wait_for_selector("#stop", state="detached")
    assert len(stopped["data"]["text"]) < len(final), "stopped before the end"
    assert page.evaluate(VIEW) == second.evaluate(VIEW)
    shots(second, "stopped")
    assert not errors, errors
    context.close()


def _state_of(server: ServerProcess, session: str, state: str) -> list[dict[str, Any]]:
    return [e for e in _events(server, session)
            if e["type"] == "run.state" and e["data"]["state"] == state]


@pytest.mark.browser
@pytest.mark.slow
def test_use_chat_page_with_the_stock_transport(
        browser: Any, slow_server: ServerProcess, example_site: str, shots: Any) -> None:
    """``?transport=http``: the stock ``DefaultChatTransport`` (only ``api`` and ``headers``)
    with ``resume: true`` against tether's /v1/ai-sdk/chat endpoints, from another origin (CORS),
    signed in through the dev login by the page itself."""
    base = f"http://127.0.0.1:{slow_server.port}"
    session = f"chat-http-{os.getpid()}"
    url = f"{example_site}?server={base}&chat={session}&transport=http"

    context = browser.new_context(viewport={"width": 1000, "height": 800})
    context.add_init_script(TEXT_RECORDER)
    context.set_default_timeout(20000)
    errors: list[str] = []
    page = context.new_page()
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url)  # no #token: the page calls the dev login across origins
    page.wait_for_selector('#transport[data-transport="http"]')
    page.wait_for_selector('#status[data-status="ready"]')

    # Send, see it stream, reload mid-stream: resume replays the reply from its start.
    page.fill("#input", "tell me about tether")
    page.click("#send")
    page.wait_for_function("""() => {
        const a = document.querySelector('.msg[data-role="assistant"] .text');
        return a && a.textContent.length > 40;
    }""")
    assert not _state_of(slow_server, session, "completed"), "reloaded mid-stream"
    page.reload()
    page.wait_for_selector('#transport[data-transport="http"]')
    _wait(lambda: _state_of(slow_server, session, "completed"), "the run to complete")
    events = _events(slow_server, session)
    final = next(e["data"]["text"] for e in events if e["type"] == "stream.end")
    _wait(lambda: _assistant_text(page) == final, "the whole answer after the reload")
    page.wait_for_selector('#status[data-status="ready"]')
    view = page.evaluate(VIEW)
    assert [m["role"] for m in view] == ["user", "assistant"]
    assert view[0]["text"] == "tell me about tether"
    run = next(e["data"]["run"] for e in events if e["type"] == "run.created")
    assert view[1]["id"] == run  # the assistant message is the run
    message = next(e for e in events if e["type"] == "message")
    assert message["data"]["message_id"] == view[0]["id"]
    _only_grew(page, view[1]["id"], final)
    shots(page, "reloaded")

    # A second answer; a second tab opened mid-stream shows the chat and resumes the reply.
    page.fill("#input", "and what about runs?")
    page.click("#send")
    page.wait_for_function("""() => {
        const a = document.querySelectorAll('.msg[data-role="assistant"] .text');
        return a.length >= 2 && a[a.length - 1].textContent.length > 20;
    }""")
    second = context.new_page()
    second.on("pageerror", lambda exc: errors.append(str(exc)))
    second.goto(url)
    second.wait_for_selector('#transport[data-transport="http"]')
    _wait(lambda: [m["text"] for m in second.evaluate(VIEW)][:3]
          == [m["text"] for m in page.evaluate(VIEW)][:3], "the chat in the second tab")
    second.wait_for_function("""() => {
        const a = document.querySelectorAll('.msg[data-role="assistant"] .text');
        return a.length >= 2 && a[a.length - 1].textContent.length > 40;
    }""")
    assert not _state_of(slow_server, session, "cancelled")
    assert len(_state_of(slow_server, session, "completed")) == 1, "stopped mid-stream"

    # Stop in the first tab: run.cancel in the log, the run cancelled, both tabs settle.
    page.wait_for_function(STOP_WHEN_STREAMING)
    _wait(lambda: _state_of(slow_server, session, "cancelled"), "the run to be cancelled")
    events = _events(slow_server, session)
    cancel = next(e for e in events if e["type"] == "run.cancel")
    assert cancel["data"]["by"]["sub"] == "ai-sdk-example"  # the page's own dev login
    stopped = [e for e in events if e["type"] == "stream.end"][-1]
    assert stopped["data"]["interrupted"] == "cancelled"
    assert len(stopped["data"]["text"]) < len(final), "stopped before the end"
    _wait(lambda: _assistant_text(second, 1) == stopped["data"]["text"],
          "the stopped answer in the second tab")
    assert stopped["data"]["text"].startswith(_assistant_text(page, 1))
    for tab in (page, second):
        tab.wait_for_selector('#status[data-status="ready"]')
        tab.wait_for_selector("#stop", state="detached")
    _only_grew(second, second.evaluate(VIEW)[3]["id"], stopped["data"]["text"])
    assert [(m["id"], m["role"]) for m in page.evaluate(VIEW)] \
        == [(m["id"], m["role"]) for m in second.evaluate(VIEW)]
    shots(second, "stopped")
    assert not errors, errors
    context.close()
