"""The web routes over real HTTP: the page and its headers, the SDK, static files, the dev
login (loopback only, and only for local, same-site requests), config and the session list."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.helpers import SECRET, Peer, token
from tether.agents.demo import demo_agent
from tether.server import Server, ServerConfig
from tether.server.auth import verify_token

ServerFactory = Callable[..., Any]


@pytest.fixture
async def make_server(tmp_path: Path) -> AsyncIterator[ServerFactory]:
    servers: list[Server] = []

    async def make(host: str = "127.0.0.1") -> Server:
        config = ServerConfig(host=host, port=0, secret=SECRET, data_dir=tmp_path,
                              store_url="memory://")
        server = Server(config)
        server.runs.register(demo_agent(tokens_per_second=0, ttft=0.0))
        await server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.stop()


@pytest.fixture
async def web(make_server: ServerFactory) -> Server:
    return await make_server()  # type: ignore[no-any-return]


def base(server: Server) -> str:
    return f"http://127.0.0.1:{server.port}"


async def test_the_page_is_served_with_a_strict_policy(web: Server) -> None:
    async with aiohttp.ClientSession() as http:
        for path in ("/", "/s/chat-abc"):
            async with http.get(base(web) + path) as resp:
                assert resp.status == 200
                assert resp.content_type == "text/html"
                body = await resp.text()
                assert '<script type="module" src="/static/app.js">' in body
                csp = resp.headers["Content-Security-Policy"]
                assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
                assert resp.headers["X-Content-Type-Options"] == "nosniff"
        async with http.get(base(web) + "/s/not%20valid") as resp:
            assert resp.status == 404


async def test_static_files_and_the_sdk(web: Server) -> None:
    async with aiohttp.ClientSession() as http:
        for name in ("app.js", "model.js", "markdown.js", "app.css", "favicon.svg"):
            async with http.get(f"{base(web)}/static/{name}") as resp:
                assert resp.status == 200, name
        async with http.get(base(web) + "/sdk/tether.js") as resp:
            assert resp.status == 200
            assert resp.content_type == "text/javascript"
            assert resp.headers["Access-Control-Allow-Origin"] == "*"
            etag = resp.headers["ETag"]
            assert "export class Client" in await resp.text()
        async with http.get(base(web) + "/sdk/tether.js",
                            headers={"If-None-Match": etag}) as resp:
            assert resp.status == 304
        async with http.get(base(web) + "/sdk/tether.d.ts") as resp:
            assert resp.status == 200 and "export class Client" in await resp.text()
        for bad in ("/static/..%2Froutes.py", "/static/.hidden", "/static/nope.js",
                    "/sdk/routes.py", "/static/app.js%00", "/static/a%5Cb"):
            async with http.get(base(web) + bad) as resp:
                assert resp.status == 404, bad


STATIC = Path(__file__).resolve().parents[2] / "tether" / "web" / "static"


def test_the_app_uses_no_html_injection_sinks() -> None:
    for name in ("app.js", "markdown.js", "model.js"):
        text = (STATIC / name).read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
            assert sink not in text, f"{name} uses {sink}"


async def test_dev_login_gives_a_token_for_the_demo_sessions(web: Server) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(base(web) + "/v1/dev/login", json={"name": "alice"}) as resp:
            assert resp.status == 200
            body = await resp.json()
        grant = verify_token(SECRET, body["token"])
        assert grant.sub == "alice"
        assert grant.allows("chat-xyz", "approve") and grant.allows("demo", "publish")
        assert not grant.allows("private", "subscribe")
        assert not grant.allows("chat-x", "admin")
        for bad in ({"name": ""}, {"name": "x" * 40}, {"name": "<b>"}, {}, []):
            async with http.post(base(web) + "/v1/dev/login", json=bad) as resp:
                assert resp.status == 400, bad
        async with http.post(base(web) + "/v1/dev/login", data="name=alice",
                             headers={"Content-Type": "application/x-www-form-urlencoded"}
                             ) as resp:
            assert resp.status == 400  # a cross-site form cannot mint a token either
    peer = await Peer.connect(web.port)
    welcome = await peer.hello(body["token"])
    assert welcome["op"] == "welcome" and welcome["sub"] == "alice"
    await peer.close()


async def test_dev_login_refuses_foreign_hosts_and_origins(web: Server) -> None:
    async with aiohttp.ClientSession() as http:
        url = base(web) + "/v1/dev/login"
        async with http.post(url, json={"name": "a"}, headers={"Host": "evil.example"}) as resp:
            assert resp.status == 404  # DNS rebinding: the page's own host name
        async with http.post(url, json={"name": "a"},
                             headers={"Origin": "https://evil.example"}) as resp:
            assert resp.status == 404
        async with http.post(url, json={"name": "a"},
                             headers={"Origin": f"http://localhost:{web.port}"}) as resp:
            assert resp.status == 200


async def test_dev_login_cors_only_for_loopback_origins(web: Server) -> None:
    """A page on another localhost port may sign in (preflight and answer carry CORS headers
    for its origin); a page of any other origin gets no CORS header, and no token."""
    url = base(web) + "/v1/dev/login"
    ask = {"Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "content-type"}
    async with aiohttp.ClientSession() as http:
        for origin in ("http://127.0.0.1:8080", "http://localhost:5173", "http://[::1]:3000"):
            async with http.options(url, headers={"Origin": origin, **ask}) as resp:
                assert resp.status == 204, origin
                assert resp.headers["Access-Control-Allow-Origin"] == origin
                assert "POST" in resp.headers["Access-Control-Allow-Methods"]
                assert "content-type" in resp.headers["Access-Control-Allow-Headers"].lower()
            async with http.post(url, json={"name": "a"}, headers={"Origin": origin}) as resp:
                assert resp.status == 200
                assert resp.headers["Access-Control-Allow-Origin"] == origin
        for origin in ("https://evil.example", "http://127.0.0.1.evil.example", "null"):
            async with http.options(url, headers={"Origin": origin, **ask}) as resp:
                assert resp.status == 404, origin
                assert "Access-Control-Allow-Origin" not in resp.headers
            async with http.post(url, json={"name": "a"}, headers={"Origin": origin}) as resp:
                assert resp.status == 404, origin
                assert "Access-Control-Allow-Origin" not in resp.headers
        # A loopback origin through a proxy is still refused, CORS or not.
        async with http.options(url, headers={"Origin": "http://127.0.0.1:8080",
                                              "X-Forwarded-For": "203.0.113.9", **ask}) as resp:
            assert resp.status == 404
            assert "Access-Control-Allow-Origin" not in resp.headers
        # Without an Origin (curl, same origin) the answer has no CORS header.
        async with http.post(url, json={"name": "a"}) as resp:
            assert resp.status == 200
            assert "Access-Control-Allow-Origin" not in resp.headers


async def test_dev_login_is_off_unless_bound_to_loopback(
        make_server: ServerFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    public = await make_server(host="0.0.0.0")
    async with aiohttp.ClientSession() as http:
        async with http.post(base(public) + "/v1/dev/login", json={"name": "a"}) as resp:
            assert resp.status == 404
            assert "loopback" in (await resp.json())["error"]["message"]
        async with http.get(base(public) + "/v1/web/config") as resp:
            assert (await resp.json())["dev_login"] is False
    monkeypatch.setenv("TETHER_DEV_LOGIN", "0")
    local = await make_server()
    async with aiohttp.ClientSession() as http, \
            http.post(base(local) + "/v1/dev/login", json={"name": "a"}) as resp:
        assert resp.status == 404


async def test_config_describes_the_agents_and_their_tools(web: Server) -> None:
    async with aiohttp.ClientSession() as http, http.get(base(web) + "/v1/web/config") as resp:
        config = await resp.json()
    assert config["dev_login"] is True
    [agent] = config["agents"]
    assert agent["name"] == "demo" and agent["sessions"] == ["demo*", "chat-*"]
    tools = {t["name"]: t for t in agent["tools"]}
    assert tools["pick_color"]["target"] == "client"
    assert tools["publish_report"]["approval"] is True


async def test_session_list_shows_sessions_with_runs_that_the_token_may_read(
        web: Server) -> None:
    peer = await Peer.connect(web.port)
    await peer.hello(token("alice"))
    for session in ("chat-one", "chat-two", "demo-x"):
        await peer.publish(session, "message", {"text": "hi"})
    async with aiohttp.ClientSession() as http:
        url = base(web) + "/v1/web/sessions"
        for _ in range(100):
            async with http.get(url, headers={"Authorization": f"Bearer {token()}"}) as resp:
                listed = (await resp.json())["sessions"]
            if len(listed) == 3 and all(s["state"] == "completed" for s in listed):
                break
            await asyncio.sleep(0.05)
        assert {s["session"] for s in listed} == {"chat-one", "chat-two", "demo-x"}
        assert listed[0]["runs"] == 1 and listed[0]["agent"] == "demo"
        narrow = token("bob", sessions=["chat-*"])
        async with http.get(url, headers={"Authorization": f"Bearer {narrow}"}) as resp:
            assert {s["session"] for s in (await resp.json())["sessions"]} == {
                "chat-one", "chat-two"}
        async with http.get(url) as resp:
            assert resp.status == 401
    await peer.close()


async def test_ai_sdk_endpoints_allow_any_origin(web: Server) -> None:
    """The AI SDK endpoints take bearer tokens, never cookies: any origin may call them, the
    preflight says which headers, and the stream's protocol header is readable."""
    origin = "https://app.example"
    ask = {"Origin": origin, "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization,content-type"}
    async with aiohttp.ClientSession() as http:
        for path in ("/v1/ai-sdk/chat", "/v1/ai-sdk/chat/chat-1/stop",
                     "/v1/ai-sdk/chat/chat-1/stream", "/v1/ai-sdk/chat/chat-1/messages"):
            async with http.options(base(web) + path, headers=ask) as resp:
                assert resp.status == 204, path
                assert resp.headers["Access-Control-Allow-Origin"] == "*"
                allowed = resp.headers["Access-Control-Allow-Headers"].lower()
                assert "authorization" in allowed and "content-type" in allowed
                assert {"GET", "POST"} <= set(
                    resp.headers["Access-Control-Allow-Methods"].replace(" ", "").split(","))
        auth = {"Origin": origin, "Authorization": f"Bearer {token(sessions=['chat-*'])}"}
        async with http.post(base(web) + "/v1/ai-sdk/chat", headers=auth, json={
                "id": "chat-1", "trigger": "submit-message",
                "messages": [{"id": "m1", "role": "user",
                              "parts": [{"type": "text", "text": "hi"}]}]}) as resp:
            assert resp.status == 200
            assert resp.headers["Access-Control-Allow-Origin"] == "*"
            assert resp.headers["x-vercel-ai-ui-message-stream"] == "v1"
            assert "x-vercel-ai-ui-message-stream" in \
                resp.headers["Access-Control-Expose-Headers"].lower()
            assert b"data: [DONE]" in await resp.read()
        async with http.get(base(web) + "/v1/ai-sdk/chat/chat-1/messages",
                            headers=auth) as resp:
            assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == "*"
            assert [m["role"] for m in await resp.json()] == ["user", "assistant"]
        async with http.get(base(web) + "/v1/ai-sdk/chat/chat-1/messages",
                            headers={"Origin": origin}) as resp:
            assert resp.status == 401  # an error is readable cross-origin too
            assert resp.headers["Access-Control-Allow-Origin"] == "*"
