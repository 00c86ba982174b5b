"""The ``tether`` command: serve, token, tail, publish."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import signal
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from tether.server.auth import (
    CAPABILITIES,
    KeyConfigError,
    issue_token,
    parse_ttl,
    signing_secret,
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one-line reason, non-zero exit
        self.print_usage(sys.stderr)
        sys.stderr.write(f"tether: error: {message}\n")
        raise SystemExit(2)


def _install_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _cmd_serve(args: argparse.Namespace) -> int:
    from tether import logs
    from tether.server import Server, ServerConfig
    from tether.store import Retention

    config = ServerConfig.from_env(
        host=args.host, port=args.port, data_dir=Path(args.data) if args.data else None,
        store_url=args.store, secret=args.secret, heartbeat=args.heartbeat,
        outbound_buffer_bytes=args.buffer, log_level=args.log_level, node_id=args.node,
        secret_file=Path(args.secret_file) if args.secret_file else None,
        public_key_file=tuple(args.public_key) if args.public_key else None,
        jwks=tuple(args.jwks) if args.jwks else None, jwks_refresh=args.jwks_refresh,
    )
    if args.retention_events is not None or args.retention_age is not None:
        config.retention = Retention(
            max_events=args.retention_events or config.retention.max_events,
            max_age=parse_ttl(args.retention_age) if args.retention_age
            else config.retention.max_age,
            idempotency_window=config.retention.idempotency_window)
    logs.configure(config.log_level)
    _install_uvloop()

    agents = [load_agent(spec) for spec in (args.agent or ["tether.agents.demo:demo_agent"])
              if spec != "none"]

    async def run() -> None:
        try:
            server = Server(config)
        except KeyConfigError as exc:
            raise SystemExit(f"tether: error: {exc}") from None
        for agent in agents:
            server.runs.register(agent)
        await server.start()  # JWKS URLs are fetched before it binds
        # Everything allocated so far lives as long as the process: keep it out of every
        # collection, and collect the young generation less often (the hot path allocates).
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 20, 20)
        print(f"tether serving on http://{config.host}:{server.port} "
              f"(WebSocket {server.url}/v1/ws, store {config.resolved_store_url()})",
              flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop()

    asyncio.run(run())
    return 0


def load_agent(spec: str) -> Any:
    """``module:object``: an Agent, or a callable returning one."""
    import importlib

    from tether.agents.agent import Agent

    module_name, _, attr = spec.partition(":")
    if not attr:
        raise SystemExit(f"tether: error: --agent {spec!r} must look like module:object")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise SystemExit(f"tether: error: cannot load agent {spec!r}: {exc}") from None
    agent = obj() if callable(obj) and not isinstance(obj, Agent) else obj
    if not isinstance(agent, Agent):
        raise SystemExit(f"tether: error: {spec!r} is not a tether Agent")
    return agent


def _signing_key(args: argparse.Namespace) -> tuple[str, str | None]:
    """(secret, kid) that signs tokens, found as ``tether serve`` finds it."""
    from tether.server.config import ServerConfig

    config = ServerConfig.from_env(
        data_dir=Path(args.data) if args.data else None, secret=args.secret,
        secret_file=Path(args.secret_file) if args.secret_file else None)
    try:
        return signing_secret(config.secret, config.secret_file, config.data_dir)
    except KeyConfigError as exc:
        raise SystemExit(f"tether: error: {exc}") from None


def _cmd_token(args: argparse.Namespace) -> int:
    # Arguments first: a refused command must not create DATA/secret.
    caps = [c.strip() for c in args.caps.split(",") if c.strip()]
    unknown = set(caps) - set(CAPABILITIES)
    if unknown:
        raise SystemExit(f"tether: error: unknown capability {sorted(unknown)[0]!r} "
                         f"(choose from {', '.join(CAPABILITIES)})")
    try:
        ttl = None if args.ttl in ("0", "none", "never") else parse_ttl(args.ttl)
    except ValueError:
        raise SystemExit(
            f"tether: error: bad --ttl {args.ttl!r} (e.g. 90s, 15m, 1h, 7d)") from None
    secret, kid = _signing_key(args)
    print(issue_token(secret, args.sub, args.session or ["*"], caps, ttl, kid=kid))
    return 0


def _token_for(args: argparse.Namespace) -> str:
    if args.token:
        return str(args.token)
    if os.environ.get("TETHER_TOKEN"):
        return os.environ["TETHER_TOKEN"]
    secret, kid = _signing_key(args)
    return issue_token(secret, "cli", [args.session_id], ["subscribe", "publish"], 3600,
                       kid=kid)


def _line(event: Any) -> dict[str, Any]:
    return {"seq": event.seq, "cursor": event.cursor, "type": event.type, "data": event.data,
            "sender": event.sender, "time": event.time}


def _cmd_tail(args: argparse.Namespace) -> int:
    from tether.client import Client, Snapshot

    _install_uvloop()

    async def run() -> None:
        async with Client(args.url, token=_token_for(args)) as client:
            session = await client.attach(args.session_id, cursor=args.cursor)
            async for event in session:
                if isinstance(event, Snapshot):
                    # Continuity lost (log recreated or trimmed): say so, then the history.
                    print(orjson.dumps({"continuity_lost": event.reason,
                                        "cursor": event.cursor}).decode(), flush=True)
                    for old in event.events:
                        print(orjson.dumps(_line(old)).decode(), flush=True)
                    continue
                print(orjson.dumps(_line(event)).decode(), flush=True)

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # piped into head(1) and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _cmd_publish(args: argparse.Namespace) -> int:
    from tether.client import Client

    try:
        data = orjson.loads(args.json)
    except orjson.JSONDecodeError as exc:
        raise SystemExit(f"tether: error: JSON argument does not parse: {exc}") from None

    async def run() -> str | None:
        async with Client(args.url, token=_token_for(args)) as client:
            session = await client.attach(args.session_id)
            return await session.publish(args.type, data)

    print(asyncio.run(run()))
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    """List stored events that readers would get as ``tether.unreadable`` placeholders."""
    from tether.store.doctor import scan

    data_dir = Path(args.data or os.environ.get("TETHER_DATA", "tether-data"))
    try:
        findings = list(scan(data_dir))
    except (FileNotFoundError, sqlite3.Error) as exc:
        print(f"tether: error: {exc}", file=sys.stderr)
        return 2
    for finding in findings:
        print(f"{finding.session}:{finding.seq}\t{finding.type}\t{finding.reason}")
    print(f"{len(findings)} unreadable event(s) in {data_dir}", file=sys.stderr)
    return 1 if findings else 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tether", description="Durable sessions over WebSocket for AI agents.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = sub.add_parser("serve", help="run a tether server")
    serve.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default 8765)")
    serve.add_argument("--data", default=None, help="data folder (default ./tether-data)")
    serve.add_argument("--store", default=None,
                       help="store URL: sqlite:///DIR (default: sqlite in --data), redis://HOST:PORT/DB")
    serve.add_argument("--secret-file", default=None, metavar="FILE",
                       help="file of the HS256 secret, or of kid=secret lines (the first "
                            "signs); default TETHER_SECRET_FILE, else DATA/secret")
    serve.add_argument("--secret", default=None,
                       help="HS256 secret inline (visible in ps: prefer --secret-file)")
    serve.add_argument("--public-key", action="append", metavar="[KID=]FILE",
                       help="PEM public key accepting RS256/ES256/EdDSA tokens with this kid "
                            "(default: the file name without extension); repeatable")
    serve.add_argument("--jwks", action="append", metavar="FILE|URL",
                       help="JWKS file or http(s) URL of public keys, by kid; repeatable")
    serve.add_argument("--jwks-refresh", type=float, default=None, metavar="SECONDS",
                       help="how often JWKS URLs are fetched again (default 300)")
    serve.add_argument("--heartbeat", type=float, default=None, help="ping interval, seconds")
    serve.add_argument("--buffer", type=int, default=None,
                       help="outbound buffer per connection, bytes (default 1 MiB)")
    serve.add_argument("--retention-events", type=int, default=None,
                       help="events kept per session (default 100000)")
    serve.add_argument("--retention-age", default=None,
                       help="how long events are kept: 90s, 15m, 1h, 30d (default 30d)")
    serve.add_argument("--agent", action="append",
                       help="agent to serve, module:object (repeatable; default: the demo "
                            "agent on sessions demo* and chat-*; 'none' for no agent)")
    serve.add_argument("--node", default=None, help="node id shown in /healthz and logs")
    serve.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"])
    serve.set_defaults(func=_cmd_serve)

    token = sub.add_parser("token", help="print a signed access token")
    token.add_argument("--sub", required=True, help="subject (user or agent id)")
    token.add_argument("--session", action="append",
                       help="allowed session id or glob, repeatable (default '*')")
    token.add_argument("--caps", default="subscribe,publish,presence",
                       help=f"comma-separated capabilities from {','.join(CAPABILITIES)}")
    token.add_argument("--ttl", default="1h", help="lifetime: 90s, 15m, 1h, 7d, or 'never'")
    token.add_argument("--secret-file", default=None, metavar="FILE",
                       help="the server's secret file: its first secret signs")
    token.add_argument("--secret", default=None,
                       help="secret inline (visible in ps: prefer --secret-file)")
    token.add_argument("--data", default=None)
    token.set_defaults(func=_cmd_token)

    doctor = sub.add_parser("doctor", help="find stored events that cannot be delivered")
    doctor.add_argument("--data", default=None, help="data folder (default ./tether-data)")
    doctor.set_defaults(func=_cmd_doctor)

    for name, func, text in (("tail", _cmd_tail, "print a session's events live, resuming"),
                             ("publish", _cmd_publish, "publish one event and print its cursor")):
        p = sub.add_parser(name, help=text)
        p.add_argument("session_id", metavar="SESSION")
        if name == "publish":
            p.add_argument("type", metavar="TYPE")
            p.add_argument("json", metavar="JSON")
        else:
            p.add_argument("--cursor", default=None, help="resume after this cursor")
        p.add_argument("--url", default="ws://127.0.0.1:8765", help="server URL")
        p.add_argument("--token", default=None,
                       help="access token (default TETHER_TOKEN, else minted from the data folder)")
        p.add_argument("--secret-file", default=None, metavar="FILE")
        p.add_argument("--secret", default=None,
                       help="secret inline (visible in ps: prefer --secret-file)")
        p.add_argument("--data", default=None)
        p.set_defaults(func=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
