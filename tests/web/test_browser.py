"""The web app in a real browser (Debian's Chromium via Playwright) against ``tether serve``.

Two tabs or two people on one session; refresh, offline and Stop in the middle of a streamed
answer; approvals and the front-end tool across tabs. A script injected in every page counts the
frames the WebSocket received, and the app records every delta it applied: no delta may be
rendered twice, and every transcript must equal the log's. Screenshots of each state go to
tests/artifacts/web/ (git-ignored).
"""

from __future__ import annotations

import re
import time
from typing import Any

import httpx
import pytest

from tests.helpers import ServerProcess, token

pytestmark = pytest.mark.browser

# Counts what the page's WebSocket receives, independently of the app and the SDK.
FRAME_COUNTER = """
(() => {
  const frames = { total: 0, ops: {}, deltas: [] };
  window.__frames = frames;
  const Native = window.WebSocket;
  class CountingWebSocket extends Native {
    constructor(...args) {
      super(...args);
      this.addEventListener("message", (event) => {
        let frame;
        try { frame = JSON.parse(event.data); } catch { return; }
        frames.total += 1;
        frames.ops[frame.op] = (frames.ops[frame.op] || 0) + 1;
        if (frame.op === "event" && frame.type === "stream.append") frames.deltas.push(frame.seq);
      });
    }
  }
  window.WebSocket = CountingWebSocket;
  window.__deltaCheck = () => {
    const rendered = window.tetherApp ? window.tetherApp.rendered : [];
    const twice = rendered.filter((seq, i) => rendered.indexOf(seq) !== i);
    const received = new Set(frames.deltas);
    return {
      rendered: rendered.length,
      twice,
      notReceived: rendered.filter((seq) => !received.has(seq)),
      dupes: window.tetherApp ? window.tetherApp.model.dupes : -1,
      mismatches: window.tetherApp ? window.tetherApp.model.mismatches : -1,
      frames: frames.total,
    };
  };
})();
"""

LAST_RUN_FINAL = """() => {
  const m = window.tetherApp && window.tetherApp.model;
  if (!m || !m.runOrder.length) return false;
  const last = m.runs[m.runOrder[m.runOrder.length - 1]];
  return ["completed", "failed", "cancelled"].includes(last.state);
}"""

VIEW = """() => {
  const items = window.tetherApp.model.items;
  const bodies = document.querySelectorAll("#transcript .msg.assistant .body");
  return {
    messages: items.filter((i) => i.kind === "message").map((i) => i.text),
    answers: [...bodies].map((n) => n.innerText.trim()),
    modelAnswers: items.filter((i) => i.kind === "assistant").map((i) => i.text),
    tools: items.filter((i) => i.kind === "tool").map((i) => [i.name, i.status]),
    items: items.map((i) => i.id),
  };
}"""


class Person:
    """One person in their own browser context (own storage, own network), signed in."""

    def __init__(self, browser: Any, server: ServerProcess, name: str, **context: Any) -> None:
        self.base = f"http://127.0.0.1:{server.port}"
        self.server = server
        options = {"viewport": {"width": 1280, "height": 800}, **context}
        self.context = browser.new_context(**options)
        self.context.add_init_script(FRAME_COUNTER)
        self.context.set_default_timeout(20000)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self._watch(self.page)
        self.page.goto(self.base + "/")
        self.page.fill("#login-name", name)
        self.page.click("#login-form button[type=submit]")
        self.page.wait_for_selector('#app[data-view="home"]')

    def _watch(self, page: Any) -> None:
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    def tab(self) -> Any:
        page = self.context.new_page()
        self._watch(page)
        return page

    def close(self) -> None:
        assert not self.errors, self.errors
        self.context.close()


def open_session(page: Any, base: str, session: str) -> None:
    page.goto(f"{base}/s/{session}")
    wait_attached(page)


def wait_attached(page: Any) -> None:
    page.wait_for_selector('#conn[data-state="connected"]')
    page.wait_for_function("() => window.tetherApp && window.tetherApp.session !== null")


def send(page: Any, text: str) -> None:
    page.fill("#composer-input", text)
    page.press("#composer-input", "Enter")


def wait_streaming(page: Any, chars: int) -> None:
    page.wait_for_function("""(n) => {
      const el = document.querySelector("#transcript .msg.assistant.streaming .body");
      return el !== null && el.innerText.length > n;
    }""", arg=chars)


def wait_done(*pages: Any) -> None:
    for page in pages:
        page.wait_for_function(LAST_RUN_FINAL)
        page.wait_for_selector("#runbar", state="hidden")


def view(page: Any) -> dict[str, Any]:
    result: dict[str, Any] = page.evaluate(VIEW)
    return result


def assert_no_double_rendering(page: Any) -> dict[str, Any]:
    check: dict[str, Any] = page.evaluate("window.__deltaCheck()")
    assert check["twice"] == [], f"deltas rendered twice: {check}"
    assert check["notReceived"] == [], check
    assert check["dupes"] == 0 and check["mismatches"] == 0, check
    return check


def log_answers(server: ServerProcess, session: str) -> list[str]:
    """The final text of every answer, from the log over HTTP (compacted history)."""
    response = httpx.get(f"http://127.0.0.1:{server.port}/v1/sessions/{session}/events",
                         params={"limit": "1000", "compact": "true"},
                         headers={"Authorization": f"Bearer {token()}"})
    response.raise_for_status()
    return [e["data"]["text"] for e in response.json()["events"] if e["type"] == "stream.end"]


def normal(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def session_name(tag: str) -> str:
    return f"chat-{tag}-{int(time.time() * 1000) % 10**8}"


# --- the tests ---------------------------------------------------------------------------------


def test_two_tabs_stream_identically(browser: Any, slow_server: ServerProcess,
                                     shots: Any) -> None:
    alice = Person(browser, slow_server, "alice")
    a, b = alice.page, alice.tab()
    session = session_name("tabs")
    open_session(a, alice.base, session)
    open_session(b, alice.base, session)
    a.wait_for_selector('#people-list li[data-sub="alice"][data-tabs="2"]')
    send(a, "Tell me how sessions stay in sync")
    wait_streaming(b, 20)  # tab B sees the answer live, not only at the end
    shots(a, "streaming-tab-a")
    shots(b, "streaming-tab-b")
    wait_done(a, b)
    seen_a, seen_b = view(a), view(b)
    assert seen_a == seen_b
    truth = log_answers(slow_server, session)
    assert [normal(t) for t in seen_a["modelAnswers"]] == [normal(t) for t in truth]
    assert [normal(t) for t in seen_b["answers"]] == [normal(t) for t in truth]
    assert_no_double_rendering(a)
    assert_no_double_rendering(b)
    shots(b, "done")
    alice.close()


def test_refresh_mid_stream_restores_and_resumes(browser: Any, slow_server: ServerProcess,
                                                 shots: Any) -> None:
    alice = Person(browser, slow_server, "alice")
    bob = Person(browser, slow_server, "bob")
    a, b = alice.page, bob.page
    session = session_name("refresh")
    open_session(a, alice.base, session)
    open_session(b, bob.base, session)
    send(a, "Explain the session log")
    wait_streaming(a, 40)
    before = a.evaluate("window.tetherApp.session.cursor")
    shots(a, "before-refresh")
    a.reload()
    wait_attached(a)
    # The transcript came back from sessionStorage and the SDK resumed after its cursor.
    a.wait_for_selector('#conn[data-resume="resumed"]')
    shots(a, "after-refresh")
    wait_done(a, b)
    seen_a, seen_b = view(a), view(b)
    assert seen_a["messages"] == seen_b["messages"]
    assert seen_a["answers"] == seen_b["answers"]
    truth = log_answers(slow_server, session)
    assert [normal(t) for t in seen_a["modelAnswers"]] == [normal(t) for t in truth]
    check = assert_no_double_rendering(a)
    # After the reload only the deltas after the saved cursor were received and applied.
    rendered = a.evaluate("window.tetherApp.rendered")
    assert rendered, "the answer was still streaming when the page came back"
    assert min(rendered) > int(before.rpartition(":")[2])
    assert check["rendered"] < len(b.evaluate("window.tetherApp.rendered"))
    assert_no_double_rendering(b)
    shots(a, "done")
    alice.close()
    bob.close()


def test_approve_in_another_tab(browser: Any, slow_server: ServerProcess, shots: Any) -> None:
    alice = Person(browser, slow_server, "alice")
    bob = Person(browser, slow_server, "bob", color_scheme="dark")
    a, b = alice.page, bob.page
    session = session_name("approve")
    open_session(a, alice.base, session)
    open_session(b, bob.base, session)
    b.type("#composer-input", "hmm")  # typing is a transient event: shown, never stored
    a.wait_for_selector('#typing:has-text("bob is typing")')
    a.wait_for_selector('#people-list li[data-sub="bob"] .typing-now')
    b.fill("#composer-input", "")
    b.press("#composer-input", "Backspace")
    a.wait_for_selector('#typing:not(:has-text("bob"))')
    send(a, "Publish the weekly report")
    b.wait_for_selector('.tool[data-status="awaiting_approval"] [data-action="approve"]')
    a.wait_for_selector('.tool[data-status="awaiting_approval"] [data-action="approve"]')
    assert "Waiting for an approval" in a.inner_text("#runbar")
    shots(b, "approval-prompt-dark")
    shots(a, "approval-prompt")
    b.click('[data-action="approve"]')
    card = '.tool[data-name="publish_report"][data-status="done"]'
    a.wait_for_selector(card)
    assert "Approved by bob" in a.inner_text(card)
    assert '"sent"' in a.inner_text(card)
    wait_done(a, b)
    assert view(a) == view(b)
    shots(a, "approved")
    assert_no_double_rendering(a)
    alice.close()
    bob.close()


def test_stop_in_another_tab_cancels_the_run(browser: Any, slow_server: ServerProcess,
                                             shots: Any) -> None:
    alice = Person(browser, slow_server, "alice")
    bob = Person(browser, slow_server, "bob")
    a, b = alice.page, bob.page
    session = session_name("stop")
    open_session(a, alice.base, session)
    open_session(b, bob.base, session)
    send(a, "Talk about durable sessions")
    wait_streaming(b, 20)
    shots(b, "streaming-with-stop")
    b.click("#stop-button")
    a.wait_for_selector('.notice:has-text("Stopped by bob")')
    wait_done(a, b)
    assert a.evaluate(LAST_RUN_FINAL)
    state = a.evaluate("(() => { const m = window.tetherApp.model;"
                       " return m.runs[m.runOrder[m.runOrder.length - 1]].state; })()")
    assert state == "cancelled"
    assert "interrupted (cancelled)" in a.inner_text("#transcript .msg.assistant")
    seen_a, seen_b = view(a), view(b)
    assert seen_a == seen_b
    truth = log_answers(slow_server, session)
    assert [normal(t) for t in seen_a["modelAnswers"]] == [normal(t) for t in truth]
    assert len(truth[0].split()) < 110, "stopped before the whole answer"
    shots(a, "stopped")
    assert_no_double_rendering(a)
    alice.close()
    bob.close()


def test_offline_during_a_stream_reconnects_and_resumes(browser: Any,
                                                        slow_server: ServerProcess,
                                                        shots: Any) -> None:
    alice = Person(browser, slow_server, "alice")
    bob = Person(browser, slow_server, "bob")
    a, b = alice.page, bob.page
    session = session_name("offline")
    open_session(a, alice.base, session)
    open_session(b, bob.base, session)
    send(a, "Say something while I lose the network")
    wait_streaming(a, 20)
    alice.context.set_offline(True)
    a.wait_for_selector('#conn[data-state="reconnecting"]')
    assert "Reconnecting" in a.inner_text("#conn")
    shots(a, "offline-reconnecting")
    frozen = view(a)["modelAnswers"]
    b.wait_for_function("(n) => document.querySelector('#transcript .msg.assistant .body')"
                        ".innerText.length > n + 40", arg=len(frozen[0]))
    alice.context.set_offline(False)
    a.wait_for_selector('#conn[data-state="connected"][data-resume="resumed"]')
    shots(a, "back-online-resumed")
    wait_done(a, b)
    seen_a, seen_b = view(a), view(b)
    assert seen_a == seen_b
    truth = log_answers(slow_server, session)
    assert [normal(t) for t in seen_a["answers"]] == [normal(t) for t in truth]
    assert_no_double_rendering(a)
    alice.close()
    bob.close()


def test_front_end_tool_and_edited_approval(browser: Any, slow_server: ServerProcess,
                                            shots: Any) -> None:
    alice = Person(browser, slow_server, "alice")
    bob = Person(browser, slow_server, "bob", color_scheme="dark")
    a, b = alice.page, bob.page
    session = session_name("tools")
    open_session(a, alice.base, session)
    open_session(b, bob.base, session)
    send(a, "Show me all the tools")
    picker = '.tool[data-name="pick_color"][data-status="awaiting_client"] .swatch'
    a.wait_for_selector(picker)
    b.wait_for_selector(picker)  # every browser tab can run the front-end tool
    shots(a, "color-picker")
    a.click('.swatch[data-color="#30a46c"]')
    b.wait_for_selector('.tool[data-name="pick_color"][data-status="done"]')
    assert "#30a46c" in b.inner_text('.tool[data-name="pick_color"]')
    b.click('.tool[data-status="awaiting_approval"] [data-action="edit"]')
    b.fill(".tool textarea", '{"title": "Weekly summary", "audience": "board"}')
    shots(b, "editing-approval-dark")
    b.click("text=Approve with changes")
    card = '.tool[data-name="publish_report"][data-status="done"]'
    a.wait_for_selector(card)
    assert '"board"' in a.inner_text(card)
    wait_done(a, b)
    seen_a, seen_b = view(a), view(b)
    assert seen_a == seen_b
    assert [name for name, _ in seen_a["tools"]] == ["current_time", "pick_color",
                                                     "publish_report"]
    assert all(status == "done" for _, status in seen_a["tools"])
    shots(a, "all-tools-done")
    shots(b, "all-tools-done-dark")
    alice.close()
    bob.close()


def test_lost_continuity_is_announced_and_rebuilt(browser: Any, slow_server: ServerProcess,
                                                  shots: Any) -> None:
    alice = Person(browser, slow_server, "alice")
    a = alice.page
    session = session_name("lost")
    open_session(a, alice.base, session)
    send(a, "time")
    wait_done(a)
    before = view(a)
    # Pretend the server's log was recreated since this tab saved its cursor: the saved
    # cursor now names an older epoch of the session, so the server answers resumed:false.
    a.evaluate("""(session) => {
      for (let i = 0; i < sessionStorage.length; i += 1) {
        const key = sessionStorage.key(i);
        if (!key.endsWith("#" + session)) continue;
        const saved = JSON.parse(sessionStorage.getItem(key));
        saved.cursor = "ZZZZZZZZ" + saved.cursor.slice(8);
        sessionStorage.setItem(key, JSON.stringify(saved));
      }
    }""", session)
    a.evaluate("window.tetherApp.client.storage = null")  # keep the edit through pagehide
    a.reload()
    wait_attached(a)
    a.wait_for_selector('#conn[data-resume="lost"]')
    assert "Continuity lost — reloaded from history" in a.inner_text("#banner")
    wait_done(a)  # the history is rebuilt, up to the finished run
    after = view(a)
    assert after["messages"] == before["messages"]
    assert after["answers"] == before["answers"]
    assert after["tools"] == before["tools"]
    shots(a, "continuity-lost")
    alice.close()


def test_messages_cannot_inject_html(browser: Any, slow_server: ServerProcess) -> None:
    alice = Person(browser, slow_server, "alice")
    a = alice.page
    open_session(a, alice.base, session_name("xss"))
    send(a, '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script> **hi**')
    a.wait_for_selector("#transcript .msg.user:not(.pending)")
    assert a.evaluate("window.__pwned") is None
    assert a.locator("#transcript img, #transcript script").count() == 0
    assert "<img src=x" in a.inner_text("#transcript .msg.user .body")
    rendered = a.evaluate("""async () => {
      const { renderMarkdown } = await import("/static/markdown.js");
      const box = document.createElement("div");
      box.append(renderMarkdown('<b>x</b> [a](javascript:alert(1)) [b](https://ok.example)'));
      return { html: box.innerHTML, links: [...box.querySelectorAll("a")].map((l) => l.href) };
    }""")
    assert "<b>" not in rendered["html"]
    assert rendered["links"] == ["https://ok.example/"]
    wait_done(a)
    alice.close()


# Records how each message of the transcript is drawn the moment it first appears, and whether
# the server's welcome (which names the subject) had arrived by then.
FIRST_DRAWN = """
(() => {
  window.__firstDrawn = {};
  new MutationObserver(() => {
    for (const node of document.querySelectorAll("#transcript .msg.user[data-id]")) {
      if (node.dataset.id in window.__firstDrawn) continue;
      window.__firstDrawn[node.dataset.id] = {
        who: node.querySelector(".who").textContent,
        mine: node.classList.contains("mine"),
        welcomed: Boolean(window.tetherApp?.client?.welcome),
      };
    }
  }).observe(document, { childList: true, subtree: true });
})();
"""

USER_MESSAGES = """() => [
  ...document.querySelectorAll("#transcript .msg.user:not(.pending)"),
].map((n) => ({
  id: n.dataset.id,
  who: n.querySelector(".who").textContent,
  mine: n.classList.contains("mine"),
  background: getComputedStyle(n.querySelector(".body")).backgroundColor,
}))"""


def test_own_messages_stay_yours_after_a_reload(browser: Any, slow_server: ServerProcess,
                                                shots: Any) -> None:
    alice = Person(browser, slow_server, "alice")
    bob = Person(browser, slow_server, "bob")
    a, b = alice.page, bob.page
    session = session_name("you")
    open_session(a, alice.base, session)
    open_session(b, bob.base, session)
    send(b, "Hello from bob")
    a.wait_for_selector("#transcript .msg.user")
    send(a, "Hello from alice")
    a.wait_for_function("() => window.tetherApp.model.runOrder.length === 2")
    wait_done(a)
    before = a.evaluate(USER_MESSAGES)
    assert [(m["who"], m["mine"]) for m in before] == [("bob", False), ("alice (you)", True)]
    assert before[0]["background"] != before[1]["background"]  # own messages look different
    alice.context.add_init_script(FIRST_DRAWN)
    a.reload()
    wait_attached(a)
    # The welcome's redraw runs in the welcome handler itself: once it is in, it has happened.
    a.wait_for_function("() => window.tetherApp.client?.welcome != null")
    after = a.evaluate(USER_MESSAGES)
    assert after == before
    first = a.evaluate("window.__firstDrawn")
    # The saved transcript is drawn at once, before the welcome; it is right from the start.
    assert first[before[1]["id"]] == {"who": "alice (you)", "mine": True, "welcomed": False}
    assert first[before[0]["id"]]["who"] == "bob" and not first[before[0]["id"]]["mine"]
    assert b.evaluate(USER_MESSAGES)[0]["who"] == "bob (you)"
    shots(a, "after-reload")
    alice.close()
    bob.close()


def test_no_connection_state_before_sign_in(browser: Any, slow_server: ServerProcess) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.set_default_timeout(20000)
    page = context.new_page()
    page.goto(f"http://127.0.0.1:{slow_server.port}/")
    page.wait_for_selector("#login-name:focus")
    assert page.evaluate("() => window.tetherApp.client === null")  # nothing can connect
    assert not page.is_visible("#conn")
    assert "Connecting" not in page.inner_text("#app")
    page.fill("#login-name", "dora")
    page.click("#login-form button[type=submit]")
    page.wait_for_selector('#app[data-view="home"]')
    page.wait_for_selector('#conn[data-state="connected"]', state="visible")
    assert page.inner_text("#conn .conn-label") == "Connected"
    page.click("#signout-button")
    page.wait_for_selector("#login-name:focus")
    page.wait_for_function("() => window.tetherApp.client === null")  # signed out: no client
    assert not page.is_visible("#conn")
    assert "Connect" not in page.inner_text("#app")
    context.close()


NAMES = """() => ({
  header: document.getElementById("session-title").textContent,
  sidebar: document.querySelector('#session-list a[aria-current="page"] .title')?.textContent,
  sidebarMeta: document.querySelector('#session-list a[aria-current="page"] .meta')?.textContent,
  id: document.getElementById("fact-session").textContent,
  page: document.title,
})"""


def test_one_name_per_session(browser: Any, slow_server: ServerProcess, shots: Any) -> None:
    alice = Person(browser, slow_server, "alice")
    a = alice.page
    session = session_name("name")
    open_session(a, alice.base, session)
    names = a.evaluate(NAMES)
    assert names["header"] == names["sidebar"] == names["id"] == session  # no title yet
    text = "Plan the launch of the new app"
    send(a, text)
    a.wait_for_function("(t) => document.getElementById('session-title').textContent === t",
                        arg=text)
    wait_done(a)
    names = a.evaluate(NAMES)
    assert names["header"] == names["sidebar"] == text
    assert names["page"] == f"{text} · tether"
    assert names["id"] == session  # the id is in the details panel …
    assert session not in names["sidebarMeta"]  # … and is not a second name in the list
    shots(a, "titled")
    a.reload()
    wait_attached(a)
    assert a.evaluate(NAMES) == names
    bob = Person(browser, slow_server, "bob")  # another person: the title comes from the log
    b = bob.page
    open_session(b, bob.base, session)
    b.wait_for_function("(t) => document.getElementById('session-title').textContent === t",
                        arg=text)
    b.wait_for_function(
        "(t) => document.querySelector('#session-list a[aria-current=\"page\"] .title')"
        ".textContent === t", arg=text)
    assert b.evaluate(NAMES)["id"] == session
    alice.close()
    bob.close()


def test_a_new_user_on_the_default_server_dark_and_narrow(browser: Any,
                                                          default_server: ServerProcess,
                                                          shots: Any) -> None:
    """`tether serve` with no flags: sign in, start from a suggestion, get an answer; by
    keyboard, on a phone-sized screen, in dark mode."""
    context = browser.new_context(viewport={"width": 390, "height": 844}, color_scheme="dark",
                                  is_mobile=True, has_touch=True, device_scale_factor=2)
    context.add_init_script(FRAME_COUNTER)
    context.set_default_timeout(20000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"http://127.0.0.1:{default_server.port}/")
    page.wait_for_selector("#login-name:focus")
    page.keyboard.type("carol")
    page.keyboard.press("Enter")
    page.wait_for_selector('#app[data-view="home"]')
    shots(page, "home-dark-narrow")
    page.click(".suggestion >> text=What time is it?")
    wait_attached(page)
    wait_done(page)
    seen = view(page)
    assert seen["messages"] == ["What time is it?"]
    assert seen["tools"] == [["current_time", "done"]]
    assert seen["answers"] and len(seen["answers"][0]) > 20
    page.focus("#composer-input")
    page.keyboard.type("hello again")
    page.keyboard.press("Enter")
    page.wait_for_function("() => window.tetherApp.model.runOrder.length === 2")
    wait_done(page)
    shots(page, "chat-dark-narrow")
    page.click("#menu-button")
    page.wait_for_selector('#app[data-sidebar="open"]')
    page.wait_for_function(  # the drawer has slid in
        "() => getComputedStyle(document.getElementById('sidebar')).transform === 'none'")
    assert page.locator("#session-list a").count() >= 1
    shots(page, "sessions-drawer-dark-narrow")
    page.keyboard.press("Escape")
    page.wait_for_selector('#app:not([data-sidebar="open"])')
    assert_no_double_rendering(page)
    assert not errors, errors
    context.close()
