"""The ``tether`` command: serve, token, tail, publish.

Every expected failure (a refused token, an unreachable server, a port in use, a bad
argument) is one ``tether: error: …`` line on stderr and a non-zero exit, never a traceback;
Ctrl-C stops any command quietly with exit status 130.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import gc
import inspect
import os
import signal
import sqlite3
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import orjson

from tether.server.auth import (
    CAPABILITIES,
    KeyConfigError,
    issue_token,
    parse_ttl,
    signing_secret,
    user_secret_path,
)

if TYPE_CHECKING:
    from tether.client import Client

T = TypeVar("T")
PUBLISH_TIMEOUT = 10.0  # seconds `tether publish` waits for the server by default


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, non-zero exit
        sys.stderr.write(f"tether: error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(2)


class CommandError(Exception):
    """An expected failure: :func:`main` prints it as one ``tether: error:`` line, exit 1."""


def fail(message: str) -> NoReturn:
    raise CommandError(message)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: give a number from 1 "
                                         "to 65535") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is out of range (1-65535)")
    return port


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: give seconds, e.g. 5")
    return value


class _Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def run_command(main: Callable[[], Awaitable[T]]) -> T:
    """``asyncio.run(main())`` for a command: SIGINT (Ctrl-C) or SIGTERM cancels ``main``,
    which cleans up (closes its client), then the process exits with 128 + the signal
    number, quietly."""
    received: list[int] = []

    async def wrapper() -> T:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def on_signal(signum: int) -> None:
            if not received:
                task.cancel()
            received.append(signum)

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)

        def on_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            if not received:  # once interrupted, sockets torn down mid-way are expected
                loop.default_exception_handler(context)

        loop.set_exception_handler(on_loop_error)
        try:
            return await main()
        except asyncio.CancelledError:
            if received:
                raise _Interrupted(received[0]) from None
            raise

    try:
        return asyncio.run(wrapper())
    except _Interrupted as exc:
        raise SystemExit(128 + exc.signum) from None
    except KeyboardInterrupt:  # before the handlers were installed
        raise SystemExit(128 + signal.SIGINT) from None


def _install_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _cmd_serve(args: argparse.Namespace) -> int:
    from tether import logs
    from tether.server.config import ServerConfig
    from tether.server.workers import Worker, default_workers
    from tether.store import Retention

    worker = Worker.from_env()  # set when this process is one of --workers N

    try:
        config = ServerConfig.from_env(
            host=args.host, port=args.port, data_dir=Path(args.data) if args.data else None,
            store_url=args.store, secret=args.secret, heartbeat=args.heartbeat,
            outbound_buffer_bytes=args.buffer, log_level=args.log_level, node_id=args.node,
            secret_file=Path(args.secret_file) if args.secret_file else None,
            public_key_file=tuple(args.public_key) if args.public_key else None,
            jwks=tuple(args.jwks) if args.jwks else None, jwks_refresh=args.jwks_refresh,
            user_secret=user_secret_path(),
            anonymous=tuple(args.anonymous) if args.anonymous else None,
            anonymous_public=True if args.anonymous_public else None,
            ws_engine=args.ws_engine,
        )
        config.check_anonymous()
        if args.retention_events is not None or args.retention_age is not None:
            config.retention = Retention(
                max_events=args.retention_events or config.retention.max_events,
                max_age=parse_ttl(args.retention_age) if args.retention_age
                else config.retention.max_age,
                idempotency_window=config.retention.idempotency_window)
    except ValueError as exc:
        fail(str(exc))
    if not 1 <= config.port <= 65535:  # the flag is checked by argparse; TETHER_PORT here
        fail(f"port {config.port} is out of range (1-65535)")
    if args.workers is not None:
        config.workers = args.workers
    if config.workers < 0:
        fail(f"--workers {config.workers}: give 1 or more (0: one per core)")
    if worker is not None:
        worker.configure(config)
    workers = 1 if worker is not None else config.workers or default_workers()
    logs.configure(config.log_level)
    _install_uvloop()

    agents = [load_agent(spec, args.sessions or ("*",))
              for spec in (args.agent or ["tether.agents.demo:demo_agent"]) if spec != "none"]
    if workers > 1:
        return _serve_workers(config, workers, args.argv)
    # Only a process that serves loads the server: a supervisor starts its workers sooner.
    from tether.server import Server

    async def run() -> int:
        stop = asyncio.Event()
        received: list[int] = []
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            received.append(signum)
            stop.set()

        try:
            # A worker of --workers N: the supervisor's store (or Redis), and it stops when
            # the supervisor goes away.
            store = worker.store(config, lambda: on_signal(signal.SIGTERM)) if worker else None
            server = Server(config, store=store)
        except (KeyConfigError, ValueError) as exc:
            fail(str(exc))
        for agent in agents:
            server.runs.register(agent)

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        starting = loop.create_task(_start(server, config))  # JWKS URLs are fetched first
        stopping = loop.create_task(stop.wait())
        await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # interrupted while starting
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            await server.stop()
            return 128 + received[0]
        stopping.cancel()
        starting.result()  # a failure to start: one line (CommandError)
        # Everything allocated so far lives as long as the process: keep it out of every
        # collection, and collect the young generation less often (the hot path allocates).
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 20, 20)
        if worker is not None:
            worker.ready()
            worker.watch_parent(lambda: on_signal(signal.SIGTERM))
        else:
            print(f"tether serving on http://{config.host}:{server.port} "
                  f"(WebSocket {server.url}/v1/ws, store {config.resolved_store_url()}, "
                  f"secret {server.auth.secret_source})", flush=True)
        await stop.wait()
        await server.stop()
        # Ctrl-C: 130, as a shell expects of an interrupted command; SIGTERM is the
        # ordinary way to stop a service: 0.
        return 128 + received[0] if received[0] == signal.SIGINT else 0

    try:
        return asyncio.run(run())
    except KeyboardInterrupt:
        return 128 + signal.SIGINT


def _serve_workers(config: Any, workers: int, argv: list[str]) -> int:
    """``tether serve --workers N``: the supervisor of N workers (tether/server/workers.py)."""
    from tether.server.auth import Authenticator
    from tether.server.workers import StartError, Supervisor, describe, run_supervisor

    try:
        auth = Authenticator.from_config(config)  # creates the secret once, for every worker
    except (KeyConfigError, ValueError) as exc:
        fail(str(exc))
    # Keys that exist only in memory (Redis with public keys only) must be the same in every
    # worker, or a token minted by one would be refused by another.
    secret = auth.secret if auth.secret_source.startswith("a random secret") else None

    def started(supervisor: Supervisor) -> None:
        print(f"tether serving on http://{config.host}:{config.port} "
              f"(WebSocket ws://{config.host}:{config.port}/v1/ws, store "
              f"{config.resolved_store_url()}, secret {auth.secret_source}, "
              f"{describe(config, workers)})", flush=True)

    try:
        return run_supervisor(config, workers, argv, started, secret=secret,
                              start=lambda supervisor: _start(supervisor, config))
    except StartError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        return 128 + signal.SIGINT


def _os_reason(exc: OSError) -> str:
    """"Address already in use" rather than aiohttp's and asyncio's longer wording."""
    return os.strerror(exc.errno) if exc.errno else (exc.strerror or str(exc))


async def _start(server: Any, config: Any) -> None:
    """``server.start()``, with the expected failures as one line each."""
    try:
        await server.start()
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL) or \
                "bind" in str(exc):
            reason = _os_reason(exc)
            hint = " (is another server running there? choose another --port)" \
                if exc.errno == errno.EADDRINUSE else ""
            fail(f"cannot listen on {config.host}:{config.port}: {reason}{hint}")
        fail(f"cannot start: {exc}")
    except Exception as exc:
        from tether.store.base import StoreError

        if isinstance(exc, StoreError) or type(exc).__module__.split(".")[0] == "redis":
            fail(f"cannot use the store: {exc}")
        raise


def load_agent(spec: str, sessions: Sequence[str] = ("*",)) -> Any:
    """``module:object`` or ``path/to/file.py:object``: a tether Agent, an agent of a
    framework tether adapts (OpenAI Agents SDK, Pydantic AI, LangGraph; served on
    ``sessions``), or a callable returning either."""
    import importlib
    import importlib.util

    from tether.agents.agent import Agent
    from tether.agents.integrations import adapt

    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        fail(f"--agent {spec!r} must look like module:object or path/to/file.py:object")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                fail(f"cannot load agent {spec!r}: no file {module_name}")
            found = importlib.util.spec_from_file_location(path.stem, path)
            assert found is not None and found.loader is not None
            module = importlib.util.module_from_spec(found)
            sys.modules[path.stem] = module
            found.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
        obj = getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        fail(f"cannot load agent {spec!r}: {exc}")
    if inspect.isfunction(obj) or isinstance(obj, type):
        obj = obj()  # a factory
    if isinstance(obj, Agent):
        return obj
    try:
        agent = adapt(obj, sessions=sessions, name=attr)
    except ImportError as exc:
        fail(f"cannot serve {spec!r}: {exc}")
    if agent is None:
        fail(f"{spec!r} is not a tether Agent nor an agent of a framework tether adapts "
             "(OpenAI Agents SDK, Pydantic AI, LangGraph)")
    return agent


def _signing_key(args: argparse.Namespace) -> tuple[str, str | None]:
    """(secret, kid) that signs tokens, found as ``tether serve`` finds it; never created.

    --secret-file / TETHER_SECRET_FILE, --secret / TETHER_SECRET, DATA/secret, then the
    per-user secret that ``tether serve`` creates (see :func:`user_secret_path`).
    """
    from tether.server.config import ServerConfig

    try:
        config = ServerConfig.from_env(
            data_dir=Path(args.data) if args.data else None, secret=args.secret,
            secret_file=Path(args.secret_file) if args.secret_file else None)
        return signing_secret(config.secret, config.secret_file, config.data_dir,
                              user_secret=user_secret_path(), create=False)
    except (KeyConfigError, ValueError) as exc:
        fail(str(exc))


def _cmd_token(args: argparse.Namespace) -> int:
    # Arguments first (and no secret is ever created here).
    caps = [c.strip() for c in args.caps.split(",") if c.strip()]
    unknown = set(caps) - set(CAPABILITIES)
    if unknown:
        fail(f"unknown capability {sorted(unknown)[0]!r} "
             f"(choose from {', '.join(CAPABILITIES)})")
    try:
        ttl = None if args.ttl in ("0", "none", "never") else parse_ttl(args.ttl)
    except ValueError:
        fail(f"bad --ttl {args.ttl!r} (e.g. 90s, 15m, 1h, 7d)")
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


def connect_reason(exc: BaseException | None) -> str:
    """Why the client could not connect, as the end of an error line (empty if unknown)."""
    if exc is None:
        return ""
    os_error = getattr(exc, "os_error", None)  # aiohttp's ClientConnectorError
    if isinstance(os_error, OSError) and (os_error.errno or os_error.strerror):
        return f": {_os_reason(os_error).lower()}"
    status = getattr(exc, "status", None)  # a handshake refused with an HTTP status
    if isinstance(status, int) and status:
        return f": HTTP {status} (is it a tether server?)"
    return f": {exc}" if str(exc) else f": {type(exc).__name__}"


def client_error(exc: BaseException, url: str) -> str:
    """One line for an error the client SDK raised."""
    from tether.client import AttachError, ConnectionFailed, RequestFailed
    from tether.protocol.codes import CloseCode

    if isinstance(exc, ConnectionFailed):
        reason = exc.reason or str(exc)
        if exc.code == CloseCode.UNAUTHORIZED:
            if "signature" in reason.lower():
                return ("the server refused the token (signed with another secret? mint it "
                        "with the server's secret: run `tether token` as the user running the "
                        "server, or pass --secret-file FILE): " + reason)
            return f"the server refused the token: {reason}"
        if exc.code == CloseCode.TOKEN_EXPIRED:
            return "the token has expired: mint a new one with `tether token`"
        if exc.code is not None:
            return f"{url} closed the connection (code {exc.code}): {reason}"
        return f"{url}: {reason}"
    if isinstance(exc, RequestFailed):
        what = "attach" if isinstance(exc, AttachError) else "request"
        if exc.code == "forbidden":
            return f"forbidden: {exc.message} (mint a token that allows it: `tether token " \
                   "--session … --caps …`)"
        if exc.code == "bad_cursor":
            return f"bad cursor: {exc.message}"
        return f"{what} refused: {exc}"
    return str(exc) or type(exc).__name__


def _check_cursor(cursor: str | None) -> None:
    from tether.protocol.cursor import Cursor, CursorError

    if cursor is not None:
        try:
            Cursor.parse(cursor)
        except CursorError as exc:
            fail(f"bad cursor {cursor!r}: {exc} (a cursor looks like EPOCH:SEQ)")


def _client(args: argparse.Namespace, **options: Any) -> Client:
    from tether.client import Client

    try:
        return Client(args.url, token=_token_for(args), **options)
    except ValueError as exc:
        fail(f"--url {args.url}: {exc}")


def _cmd_tail(args: argparse.Namespace) -> int:
    from tether.client import ConnectionState, Snapshot, TetherError

    _check_cursor(args.cursor)
    _install_uvloop()
    client = _client(args)
    say = _StateLines(args.url)
    client.on_state(say)

    async def run() -> None:
        try:
            async with client:
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
        except (TetherError, ValueError) as exc:
            fail(client_error(exc, args.url))
        if client.state is not ConnectionState.CLOSED:
            fail(f"{args.url} ended the session")

    try:
        run_command(run)
    except BrokenPipeError:  # piped into head(1) and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


class _StateLines:
    """Says on stderr when ``tether tail`` loses its server and when it is back."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.connected = False
        self.away = False

    def __call__(self, state: Any) -> None:
        from tether.client import ConnectionState

        if state is ConnectionState.RECONNECTING and not self.away:
            self.away = True
            what = "lost the connection to" if self.connected else "cannot reach"
            print(f"tether: {what} {self.url}; retrying (Ctrl-C to stop)", file=sys.stderr,
                  flush=True)
        elif state is ConnectionState.CONNECTED:
            if self.away:
                print(f"tether: connected to {self.url}", file=sys.stderr, flush=True)
            self.connected = True
            self.away = False


def _cmd_publish(args: argparse.Namespace) -> int:
    from tether.client import TetherError

    try:
        data = orjson.loads(args.json)
    except orjson.JSONDecodeError as exc:
        fail(f"JSON argument does not parse: {exc}")
    client = _client(args, connect_timeout=args.timeout)

    async def run() -> str | None:
        try:
            async with asyncio.timeout(args.timeout):
                async with client:
                    session = await client.attach(args.session_id)
                    return await session.publish(args.type, data)
        except TimeoutError:
            if client.welcome is None:
                fail(f"cannot reach {args.url} (is the server running?)"
                     f"{connect_reason(client.last_connect_error)}")
            fail(f"{args.url} did not confirm the publish within {args.timeout:g} s "
                 "(it may still commit; publish again to retry safely only with the same "
                 "idempotency key)")
        except TetherError as exc:
            fail(client_error(exc, args.url))

    print(run_command(run))
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


def _cmd_simulated_model(args: argparse.Namespace) -> int:
    from tether.agents.upstream import SimulatedUpstream, serve

    async def run() -> None:
        upstream = SimulatedUpstream(ttft=0.05, tokens_per_second=args.tokens_per_second,
                                     answer_tokens=40)
        runner = await serve(args.host, args.port, upstream)
        print(f"simulated model (a stand-in, not an LLM) on "
              f"http://{args.host}:{args.port}/v1/chat/completions", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except OSError as exc:
        fail(f"cannot listen on {args.host}:{args.port}: {_os_reason(exc)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tether", description="Durable sessions over WebSocket for AI agents.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = sub.add_parser("serve", help="run a tether server")
    serve.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=None, help="port (default 8765)")
    serve.add_argument("--data", default=None, help="data folder (default ./tether-data)")
    serve.add_argument("--store", default=None,
                       help="store URL: sqlite:///DIR (default: sqlite in --data), "
                            "redis://HOST:PORT/DB, redis+cluster://HOST:PORT[,HOST:PORT...]")
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
                            "agent on sessions demo* and chat-*; 'none' for no agent); an "
                            "OpenAI Agents SDK, Pydantic AI or LangGraph agent is served as is")
    serve.add_argument("--sessions", action="append", metavar="PATTERN",
                       help="sessions the framework agents of --agent serve (glob, "
                            "repeatable; default '*'); tether Agents name their own")
    serve.add_argument("--anonymous", action="append", metavar="PATTERN=CAPS",
                       help="grant requests without a token CAPS on sessions matching PATTERN "
                            "(Durable Streams routes), e.g. '*=subscribe,publish'; loopback "
                            "only unless --anonymous-public")
    serve.add_argument("--anonymous-public", action="store_true",
                       help="allow --anonymous on a non-loopback address")
    serve.add_argument("--node", default=None, help="node id shown in /healthz and logs")
    serve.add_argument("--workers", type=int, default=None, metavar="N",
                       help="worker processes serving the port (default: one per core; 1: "
                            "one process); see docs/operations.md")
    serve.add_argument("--ws-engine", default=None, choices=["picows", "aiohttp"],
                       help="what serves /v1/ws for clients without permessage-deflate "
                            "(default: picows); see docs/operations.md")
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

    model = sub.add_parser("simulated-model",
                           help="serve the simulated model as OpenAI Chat Completions, for "
                                "framework agents with no API key")
    model.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    model.add_argument("--port", type=_port, default=8766, help="port (default 8766)")
    model.add_argument("--tokens-per-second", type=float, default=40.0,
                       help="pace of the streamed answer (default 40; 0 = no pacing)")
    model.set_defaults(func=_cmd_simulated_model)

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
            p.add_argument("--timeout", type=_seconds, default=PUBLISH_TIMEOUT,
                           metavar="SECONDS",
                           help="give up when the server has not confirmed the publish "
                                f"within this time (default {PUBLISH_TIMEOUT:g})")
        else:
            p.add_argument("--cursor", "--after", dest="cursor", default=None,
                           metavar="CURSOR",
                           help="resume after this cursor (--after: the same, named like "
                                "the HTTP parameter)")
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
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # what --workers re-runs
    try:
        return int(args.func(args))
    except CommandError as exc:
        sys.stderr.write(f"tether: error: {exc}\n")
        raise SystemExit(1) from None
    except KeyboardInterrupt:  # Ctrl-C outside an event loop (loading, minting)
        raise SystemExit(128 + signal.SIGINT) from None


if __name__ == "__main__":
    raise SystemExit(main())
