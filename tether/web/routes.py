"""HTTP routes of the web app and the browser SDK.

* ``GET /`` and ``GET /s/{session}``: the web app (one HTML page; the session is in the path so
  a link can be shared);
* ``GET /static/{file}``: its scripts, styles and icon;
* ``GET /sdk/tether.js``, ``/sdk/tether.d.ts``, ``/sdk/package.json``: the browser SDK, with
  CORS so pages of any origin can import it;
* ``GET /v1/web/config``: what the page needs to start (is dev login on, which agents serve
  which sessions, with which tools);
* ``GET /v1/web/sessions``: sessions that had runs, newest first, filtered by the token;
* ``POST /v1/dev/login`` ``{"name"}``: a token for ``demo*`` and ``chat-*`` — only when the
  server listens on a loopback address and the request is local (see :func:`dev_login_allowed`);
  with CORS for loopback origins only (a page on another localhost port may sign in).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
from aiohttp import web

from tether.agents.runner import RUN_INDEX
from tether.protocol.events import valid_session_id
from tether.server.auth import AuthError
from tether.server.http import bearer_token
from tether.server.keys import AUTH, CONFIG, RUNS, STORE

HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"
SDK_DIR = HERE / "sdk"

DEV_SESSIONS = ["demo*", "chat-*"]
DEV_CAPS = ["subscribe", "publish", "presence", "approve"]
DEV_TTL = 12 * 3600.0
DEV_NAME = re.compile(r"^[\w][\w .@'-]{0,31}$")

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".json": "application/json",
    ".ts": "text/plain; charset=utf-8",  # .d.ts: readable in a browser tab
    ".md": "text/markdown; charset=utf-8",
}

# The page loads nothing from elsewhere and runs no inline script or style.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self' ws: wss:; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'; object-src 'none'")
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True)
class _File:
    mtime: float
    body: bytes
    etag: str


_cache: dict[Path, _File] = {}


def _load(path: Path) -> _File | None:
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return None
    cached = _cache.get(path)
    if cached is not None and cached.mtime == mtime:
        return cached
    body = path.read_bytes()
    loaded = _File(mtime, body, '"' + hashlib.sha256(body).hexdigest()[:20] + '"')
    _cache[path] = loaded
    return loaded


def _file_response(request: web.Request, path: Path, headers: dict[str, str]) -> web.Response:
    loaded = _load(path)
    if loaded is None:
        raise web.HTTPNotFound()
    suffix = ".ts" if path.name.endswith(".d.ts") else path.suffix
    all_headers = {"ETag": loaded.etag, "Cache-Control": "no-cache",
                   "X-Content-Type-Options": "nosniff", **headers}
    if request.headers.get("If-None-Match") == loaded.etag:
        return web.Response(status=304, headers=all_headers)
    all_headers["Content-Type"] = CONTENT_TYPES.get(suffix, "application/octet-stream")
    return web.Response(body=loaded.body, headers=all_headers)


def _child(directory: Path, name: str) -> Path:
    """``directory / name`` for a plain file name; anything with a path in it is refused."""
    if not name or "/" in name or "\\" in name or name.startswith(".") or "\0" in name:
        raise web.HTTPNotFound()
    return directory / name


async def index(request: web.Request) -> web.Response:
    session = request.match_info.get("session")
    if session is not None and not valid_session_id(session):
        raise web.HTTPNotFound()
    return _file_response(request, STATIC_DIR / "index.html", PAGE_HEADERS)


async def static_file(request: web.Request) -> web.Response:
    return _file_response(request, _child(STATIC_DIR, request.match_info["name"]), {})


async def sdk_file(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in ("tether.js", "tether.d.ts", "package.json", "README.md"):
        raise web.HTTPNotFound()
    return _file_response(request, SDK_DIR / name, {"Access-Control-Allow-Origin": "*"})


async def favicon(request: web.Request) -> web.Response:
    return _file_response(request, STATIC_DIR / "favicon.svg", {})


# --- dev login -----------------------------------------------------------------------------


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _host_of(header: str) -> str:
    """The host name of a ``Host`` header value (``127.0.0.1:8765``, ``[::1]:8765``)."""
    return urlsplit("//" + header).hostname or ""


FORWARDING_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto",
                      "X-Real-IP", "X-Client-IP", "CF-Connecting-IP", "True-Client-IP", "Via")


def dev_login_enabled(bind_host: str) -> bool:
    """Dev login exists only on servers bound to a loopback address (and not switched off with
    ``TETHER_DEV_LOGIN=0``)."""
    flag = os.environ.get("TETHER_DEV_LOGIN", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False
    return _is_loopback(bind_host)


def dev_login_allowed(bind_host: str, request: web.Request) -> str | None:
    """Why a dev login must be refused, or None when it may go ahead.

    Besides the loopback bind, the request must come from loopback, name a loopback ``Host``
    (a DNS-rebinding page would send its own name) and, if it has an ``Origin``, a loopback one
    (another site's page cannot mint tokens through a visitor's browser).
    """
    if not dev_login_enabled(bind_host):
        return "dev login is only available when tether listens on a loopback address"
    # Behind a reverse proxy on the same host every request comes from loopback; a proxy
    # says so with these headers, and then the real client may be anyone.
    if any(name in request.headers for name in FORWARDING_HEADERS):
        return "dev login refuses requests that came through a proxy"
    if not _is_loopback(request.remote):
        return "dev login is only available to local clients"
    if not _is_loopback(_host_of(request.headers.get("Host", ""))):
        return "dev login needs a loopback Host header"
    origin = request.headers.get("Origin")
    if origin is not None and not _is_loopback(urlsplit(origin).hostname):
        return "dev login refuses cross-site requests"
    return None


def _error(status: int, code: str, message: str) -> web.Response:
    return web.Response(body=orjson.dumps({"error": {"code": code, "message": message}}),
                        status=status, content_type="application/json")


def _dev_cors(request: web.Request) -> dict[str, str]:
    """CORS headers for a dev login that :func:`dev_login_allowed` let through: only a loopback
    ``Origin`` reaches here (a page on another localhost port, such as an example's static
    server), so it is echoed; any other origin was refused before and gets no CORS header."""
    origin = request.headers.get("Origin")
    if origin is None:
        return {}
    return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}


async def dev_login_preflight(request: web.Request) -> web.Response:
    """The CORS preflight of the dev login: allowed for loopback origins only (and only when
    the login itself would be: loopback bind, local client, loopback Host, no proxy)."""
    refused = dev_login_allowed(request.app[CONFIG].host, request)
    if refused is not None or "Origin" not in request.headers:
        return _error(404, "not_found", refused or "not a CORS preflight")
    return web.Response(status=204, headers={
        **_dev_cors(request),
        "Access-Control-Allow-Methods": "POST",
        "Access-Control-Allow-Headers": "Content-Type",
        "Access-Control-Max-Age": "600",
    })


async def dev_login(request: web.Request) -> web.Response:
    refused = dev_login_allowed(request.app[CONFIG].host, request)
    if refused is not None:
        return _error(404, "not_found", refused)
    cors = _dev_cors(request)
    if request.content_type != "application/json":
        return _error(400, "invalid", "send a JSON body: {\"name\": ...}")
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _error(400, "bad_frame", "malformed JSON")
    name = body.get("name") if isinstance(body, dict) else None
    if not isinstance(name, str) or not DEV_NAME.match(name.strip()):
        return _error(400, "invalid", "'name': 1–32 letters, digits, spaces, . @ ' - or _")
    sub = name.strip()
    auth = request.app[AUTH]
    token = auth.issue(sub, DEV_SESSIONS, DEV_CAPS, DEV_TTL)
    grant = auth.verify(token)
    return web.Response(body=orjson.dumps({
        "token": token, "sub": sub, "sessions": DEV_SESSIONS, "caps": DEV_CAPS,
        "expires_at": int(grant.exp * 1000) if grant.exp else None,
    }), content_type="application/json", headers={"Cache-Control": "no-store", **cors})


# --- app data ------------------------------------------------------------------------------


async def web_config(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    agents: list[dict[str, Any]] = []
    for agent in request.app[RUNS].agents:
        agents.append({
            "name": agent.name,
            "sessions": list(agent.sessions),
            "busy": str(agent.busy),
            "tools": [{"name": t.name, "description": t.description,
                       "target": "client" if t.client_side else "server",
                       "approval": t.requires_approval} for t in agent.tools.values()],
        })
    return web.Response(body=orjson.dumps({
        "dev_login": dev_login_enabled(config.host),
        "dev_sessions": DEV_SESSIONS,
        "heartbeat": config.heartbeat,
        "agents": agents,
        "version": 1,
    }), content_type="application/json", headers={"Cache-Control": "no-cache"})


SESSIONS_SCAN = 2000  # run-index events read per listing, newest first


async def web_sessions(request: web.Request) -> web.Response:
    """Sessions with runs that the token may read, newest activity first (at most 100)."""
    try:
        grant = request.app[AUTH].verify(bearer_token(request))
    except AuthError as exc:
        return _error(401, "unauthorized", exc.message)
    store = request.app[STORE]
    head = await store.head(RUN_INDEX)
    after = max(head.first_seq - 1, head.last_seq - SESSIONS_SCAN)
    found: dict[str, dict[str, Any]] = {}
    while True:
        page = await store.read(RUN_INDEX, after, 1000)
        for event in page:
            data = event.data
            if event.type != "run.index" or not isinstance(data, dict):
                continue
            session = data.get("session")
            if not isinstance(session, str) or not grant.allows(session, "subscribe"):
                continue
            entry = found.pop(session, None) or {"session": session, "runs": 0}
            if data.get("state") == "queued":
                entry["runs"] += 1
            entry.update(state=data.get("state"), agent=data.get("agent"), updated=event.time)
            found[session] = entry  # re-inserted: dict order is activity order
        if len(page) < 1000:
            break
        after = page[-1].seq
    sessions = list(reversed(found.values()))[:100]
    return web.Response(body=orjson.dumps({"sessions": sessions}),
                        content_type="application/json", headers={"Cache-Control": "no-store"})


def install(app: web.Application) -> None:
    """Serve the web app, the SDK and the dev login on ``app`` (a tether server's)."""
    app.router.add_get("/", index)
    app.router.add_get("/s/{session}", index)
    app.router.add_get("/static/{name}", static_file)
    app.router.add_get("/sdk/{name}", sdk_file)
    app.router.add_get("/favicon.ico", favicon)
    app.router.add_get("/v1/web/config", web_config)
    app.router.add_get("/v1/web/sessions", web_sessions)
    app.router.add_post("/v1/dev/login", dev_login)
    app.router.add_route("OPTIONS", "/v1/dev/login", dev_login_preflight)
