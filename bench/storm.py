"""Reconnect storm: every client of a SIGKILLed server comes back, resumes, and misses nothing.

``--clients`` Python SDK clients (:class:`tether.client.Client`, default 10,000) in
``--procs`` client processes follow ``--sessions`` sessions (default 1,000; client ``j`` follows
session ``j % sessions``). A publisher process (SDK clients too) publishes ``--rate`` events/s
in all, each session's events numbered 0, 1, 2, … by its one publisher. Once everything flows,
the server's whole process group is SIGKILLed and started again on the same port and data
directory while the publishers keep publishing (their publishes wait in the SDK and are re-sent
with the same idempotency key). Then:

- time to all resumed: from the kill until every client's session is attached again with
  ``resumed: true`` (server restart included);
- re-attach rate: completed re-attaches per second, peak over 0.5 s bins, against the
  ceiling the SDK's backoff allows (see ``docs/scaling.md``);
- lost / duplicated / gaps / snapshots: every client checks that its session's numbers arrive
  as 0, 1, 2, … with nothing skipped, repeated, or replaced by a snapshot; after the publishers
  stop, every client must hold every committed event.

Run: ``python -m bench.storm`` (10,000 clients; a few minutes) or ``--quick`` (1,000 / 100).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common as c

PER_PROC_MAX = 6000  # SDK clients per process: well under the open-file cap
CONNECT_TIMEOUT = 10.0  # the SDKs' default connect_timeout


# --- client process -----------------------------------------------------------------------------

class Follower:
    """One SDK client following one session, checking the numbering as it goes."""

    def __init__(self, client: Any, session: str) -> None:
        self.client = client
        self.session_name = session
        self.session: Any = None
        self.next = 0
        self.events = 0
        self.gaps = 0
        self.dups = 0
        self.snapshots = 0
        self.lost_at: float | None = None  # when the kill was marked, if not yet back
        self.back_after: float | None = None

    async def run(self) -> None:
        from tether.client.protocol import Snapshot

        self.session = await self.client.attach(self.session_name)
        async for item in self.session:
            if isinstance(item, Snapshot):
                self.snapshots += 1
                continue
            n = item.data["n"]
            if n == self.next:
                self.next += 1
                self.events += 1
            elif n < self.next:
                self.dups += 1
            else:
                self.gaps += n - self.next
                self.next = n + 1
                self.events += 1


class RawFollower:
    """A light client speaking the protocol by hand with the SDKs' reconnect policy.

    Python SDK clients cost the client processes more CPU per reconnect than the server's
    attach: on a small machine 10,000 of them measure the clients. This one reuses
    the raw WebSocket of ``bench.connections`` and the SDK's own policy, resume and numbering
    check: ``backoff_delay`` (full jitter, the SDKs' base and cap), ``retry_after`` of a
    ``4003`` close, re-attach from the cursor of the last event received.
    """

    def __init__(self, port: int, session: str, tok: str, rng: Any) -> None:
        self.port = port
        self.session_name = session
        self.tok = tok
        self.rng = rng
        self.cursor: str | None = None
        self.next = 0
        self.events = 0
        self.gaps = 0
        self.dups = 0
        self.snapshots = 0
        self.attached = False
        self.resumed = False
        self.lost_at: float | None = None  # when the last connection was lost
        self.back_at: float | None = None  # when it was attached again after that
        self.stopping = False
        self.failures: dict[str, int] = {}  # why attempts failed (shared by a process)

    def back_after(self, mark: float | None) -> float | None:
        """Seconds from the kill to this client's re-attach, if it lost the kill's socket."""
        if mark is None or self.lost_at is None or self.lost_at < mark - 5.0:
            return None
        return None if self.back_at is None else self.back_at - mark

    def on_event(self, payload: bytes) -> None:
        event = orjson.loads(payload)
        n = event["data"]["n"]
        self.cursor = event["cursor"]
        if n < self.next:
            self.dups += 1
            return
        self.gaps += n - self.next
        self.next = n + 1
        self.events += 1

    async def run(self) -> None:
        from bench.connections import RawWS
        from tether.client.protocol import BACKOFF_BASE, BACKOFF_CAP, backoff_delay

        # --backoff-cap measures another cap than the SDKs' (the orchestrator's env).
        cap = float(os.environ.get("BENCH_BACKOFF_CAP") or BACKOFF_CAP)
        from tether.protocol.codes import CloseCode, retry_after_from_reason

        loop = asyncio.get_running_loop()
        attempt = 0
        while not self.stopping:
            code: int | None = None
            reason = ""
            transport: asyncio.BaseTransport | None = None
            try:
                # The SDK's connect_timeout (10 s) bounds the connection and upgrade, and then
                # the welcome: a client queued longer by a busy server gives up and backs off.
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    transport, conn = await loop.create_connection(
                        lambda: _StormWS(self), "127.0.0.1", self.port)
                    assert isinstance(conn, RawWS)
                    await conn.open(self.port, "/v1/ws", False)
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    await conn.request({"op": "hello", "id": 1, "token": self.tok})
                reply = await conn.request({"op": "attach", "id": 2,
                                            "session": self.session_name,
                                            "cursor": self.cursor})
                if not reply["resumed"]:
                    if self.cursor is not None:
                        self.snapshots += 1  # continuity lost: never expected here
                    for event in reply["snapshot"]["events"]:
                        self.on_event(orjson.dumps(event))
                self.resumed = bool(reply["resumed"])
                self.attached = True
                attempt = 0
                if self.lost_at is not None:
                    self.back_at = time.time()
                code, reason = await conn.ended
            except (OSError, ConnectionError, TimeoutError, RuntimeError, KeyError) as exc:
                why = f"{type(exc).__name__}: {str(exc)[:40]}"
                self.failures[why] = self.failures.get(why, 0) + 1
                if transport is not None:
                    transport.close()
            if self.attached:
                # The loss may be seen before the orchestrator's "mark" arrives: keep the time.
                self.lost_at = time.time()
                self.back_at = None
            self.attached = False
            if self.stopping:
                return
            delay = backoff_delay(attempt, BACKOFF_BASE, cap, self.rng)
            if code == CloseCode.TRY_AGAIN_LATER:
                after = retry_after_from_reason(reason)
                if after is not None:
                    delay = after * self.rng.uniform(1.0, 1.2)
            attempt += 1
            await asyncio.sleep(delay)


def _storm_ws_class() -> Any:
    from bench.connections import RawWS

    class StormWS(RawWS):
        """RawWS that hands events to its follower and reports how the socket ended."""

        def __init__(self, follower: RawFollower) -> None:
            super().__init__([])
            self.follower = follower
            self.ended: asyncio.Future[tuple[int | None, str]] = (
                asyncio.get_running_loop().create_future())

        def _frame(self, b0: int, payload: bytes) -> None:
            opcode = b0 & 0x0F
            if opcode == 0x8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                if not self.ended.done():
                    self.ended.set_result((code, payload[2:].decode(errors="replace")))
                return
            if opcode == 0x1 and payload.startswith(b'{"op":"event"'):
                self.follower.on_event(payload)
                return
            super()._frame(b0, payload)

        def connection_lost(self, exc: Exception | None) -> None:
            super().connection_lost(exc)
            if not self.ended.done():
                self.ended.set_result((None, "lost"))

    return StormWS


_StormWS: Any = None


async def raw_follower_proc(port: int, sessions: list[str], tok: str) -> None:
    import random

    global _StormWS
    _StormWS = _storm_ws_class()
    loop = asyncio.get_running_loop()
    rng = random.Random()
    followers = [RawFollower(port, s, tok, rng) for s in sessions]
    failures: dict[str, int] = {}
    for f in followers:
        f.failures = failures
    mark: list[float | None] = [None]
    tasks = [loop.create_task(f.run()) for f in followers]
    t0 = time.perf_counter()
    while sum(1 for f in followers if f.attached) < len(followers):
        await asyncio.sleep(0.05)
    print(orjson.dumps({"ready": len(followers), "seconds": time.perf_counter() - t0}).decode(),
          flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = (await reader.readline()).decode().split()
        if not line or line[0] == "quit":
            break
        if line[0] == "mark":
            mark[0] = float(line[1])
            continue
        backs = [f.back_after(mark[0]) for f in followers]
        print(orjson.dumps({
            "clients": len(followers),
            "attached": sum(1 for f in followers if f.attached),
            "lost": sum(1 for f in followers if mark[0] is not None and f.lost_at is not None
                        and f.lost_at >= mark[0] - 5.0),
            "back": [b for b in backs if b is not None],
            "resumed": sum(1 for f, b in zip(followers, backs, strict=True)
                           if b is not None and f.resumed),
            "events": sum(f.events for f in followers),
            "gaps": sum(f.gaps for f in followers), "dups": sum(f.dups for f in followers),
            "snapshots": sum(f.snapshots for f in followers),
            "failed": sum(1 for t in tasks if t.done()),
            "failures": failures,
        }).decode(), flush=True)
    for f in followers:
        f.stopping = True
    for t in tasks:
        t.cancel()


async def follower_proc(url: str, sessions: list[str], tok: str) -> None:
    import aiohttp

    from tether.client import Client
    from tether.client.client import SessionState

    loop = asyncio.get_running_loop()
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    followers = [Follower(Client(url, token=tok, http_session=http), s) for s in sessions]
    tasks: list[asyncio.Task[None]] = []
    sem = asyncio.Semaphore(200)

    async def start(f: Follower) -> None:
        async with sem:
            await f.client.connect()
            tasks.append(loop.create_task(f.run()))
            while f.session is None or f.session.state is not SessionState.ATTACHED:
                await asyncio.sleep(0.01)

    t0 = time.perf_counter()
    await asyncio.gather(*(start(f) for f in followers))
    print(orjson.dumps({"ready": len(followers), "seconds": time.perf_counter() - t0}).decode(),
          flush=True)
    mark: float | None = None

    async def watch() -> None:
        # Every 20 ms: which clients are attached again after the kill.
        while True:
            await asyncio.sleep(0.02)
            if mark is None:
                continue
            now = time.time()
            for f in followers:
                if f.back_after is None and f.session is not None:
                    state = f.session.state
                    if state is SessionState.REATTACHING:
                        f.lost_at = mark
                    elif state is SessionState.ATTACHED and f.lost_at is not None:
                        f.back_after = now - mark

    watcher = loop.create_task(watch())
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = (await reader.readline()).decode().split()
        if not line or line[0] == "quit":
            break
        if line[0] == "mark":
            mark = float(line[1])
            for f in followers:
                f.lost_at = None
                f.back_after = None
            continue
        print(orjson.dumps({
            "clients": len(followers),
            "attached": sum(1 for f in followers if f.session is not None
                            and f.session.state is SessionState.ATTACHED),
            "lost": sum(1 for f in followers if f.lost_at is not None),
            "back": [f.back_after for f in followers if f.back_after is not None],
            "resumed": sum(1 for f in followers if f.back_after is not None
                           and f.session.resumed),
            "events": sum(f.events for f in followers),
            "gaps": sum(f.gaps for f in followers), "dups": sum(f.dups for f in followers),
            "snapshots": sum(f.snapshots for f in followers),
            "failed": sum(1 for t in tasks if t.done() and t.exception() is not None),
        }).decode(), flush=True)
    watcher.cancel()
    for f in followers:
        await f.client.close()
    await http.close()


async def publisher_proc(url: str, sessions: list[str], rate: float, tok: str) -> None:
    from tether.client import Client

    loop = asyncio.get_running_loop()
    per_client = 100
    clients = [Client(url, token=tok, kind="agent")
               for _ in range(0, len(sessions), per_client)]
    await asyncio.gather(*(cl.connect() for cl in clients))
    published = {s: 0 for s in sessions}
    stop = asyncio.Event()
    interval = len(sessions) / rate
    drains: list[asyncio.Task[None]] = []

    async def drain(session: Any) -> None:
        async for _ in session:
            pass

    async def one(client: Any, name: str, offset: float) -> None:
        session = await client.attach(name)
        drains.append(loop.create_task(drain(session)))
        await asyncio.sleep(offset)
        n = 0
        next_at = loop.time()
        while not stop.is_set():
            await session.publish("tick", {"n": n})
            n += 1
            published[name] = n
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - loop.time()))

    tasks = [loop.create_task(one(clients[i // per_client], s, interval * i / len(sessions)))
             for i, s in enumerate(sessions)]
    print(orjson.dumps({"ready": True}).decode(), flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await reader.readline()
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(orjson.dumps({"published": published}).decode(), flush=True)
    for cl in clients:
        await cl.close()


# --- orchestration ------------------------------------------------------------------------------

class Server:
    """``tether serve`` on a fixed port and data directory, in its own process group."""

    def __init__(self, port: int, data: Path, workers: int, connect_rate: float) -> None:
        self.connect_rate = connect_rate
        self.port = port
        self.data = data
        self.workers = workers
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = open(data.parent / "server.log", "ab")  # noqa: SIM115 - closed in stop()

    def start(self) -> tuple[float, float]:
        """Start it; (seconds until its port listens, seconds until it serves).

        ``tether serve`` listens before it loads anything (connections wait in the accept
        queue meanwhile), and prints its startup line once every worker serves.
        """
        t0 = time.perf_counter()
        log_path = self.data.parent / "server.log"
        self.log.flush()
        lines_before = _startup_lines(log_path)
        env = {**c.child_env(), **c.TETHER_LOAD_ENV,
               "TETHER_MAX_SESSIONS_PER_CONNECTION": "1000",
               "TETHER_MAX_CONNECT_RATE": str(self.connect_rate)}
        cmd = [sys.executable, "-m", "tether", "serve", "--port", str(self.port), "--data",
               str(self.data), "--secret", c.SECRET, "--log-level", "warning",
               "--workers", str(self.workers)]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log, env=env,
                                     cwd=c.ROOT, start_new_session=True)
        c.wait_for_port(self.port, 60, self.proc)
        listening = time.perf_counter() - t0
        deadline = time.monotonic() + 60
        while _startup_lines(log_path) <= lines_before:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start (see {log_path})")
            time.sleep(0.01)
        return listening, time.perf_counter() - t0

    def kill(self) -> float:
        """SIGKILL the process group; seconds until all of it is gone."""
        assert self.proc is not None
        t0 = time.perf_counter()
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        # Workers die a moment after the supervisor: until the whole group is gone one of them
        # may still answer on the port, and the restart would look instant.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.01)
        return time.perf_counter() - t0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def _startup_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"tether serving on")
    except FileNotFoundError:
        return 0


class Child:
    def __init__(self, args: list[str], tok: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.storm", *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=c.ROOT,
                                     env={**c.child_env(), "BENCH_TOKEN": tok,
                                          "BENCH_BACKOFF_CAP": os.environ.get(
                                              "BENCH_BACKOFF_CAP", "")})

    def say(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"a storm process exited with {self.proc.wait(60)}")
        out: dict[str, Any] = orjson.loads(line)
        return out

    def end(self) -> None:
        try:
            self.say("quit")
            self.proc.wait(60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


def listen_overflows() -> int:
    """The kernel's count of connections dropped because an accept queue was full: each costs
    its client a SYN retransmission (1 s, then 3, 7, 15 s later)."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for head, values in zip(lines[::2], lines[1::2], strict=False):
        if head.startswith("TcpExt:"):
            fields = dict(zip(head.split()[1:], values.split()[1:], strict=False))
            return int(fields.get("ListenOverflows", 0))
    return 0


def stats(procs: list[Child]) -> dict[str, Any]:
    for p in procs:
        p.say("stats")
    parts = [p.read() for p in procs]
    out: dict[str, Any] = {k: sum(x[k] for x in parts) for k in (
        "clients", "attached", "lost", "resumed", "events", "gaps", "dups", "snapshots",
        "failed")}
    out["back"] = sorted(b for x in parts for b in x["back"])
    out["failures"] = {}
    for x in parts:
        for why, n in x.get("failures", {}).items():
            out["failures"][why] = out["failures"].get(why, 0) + n
    return out


def run(args: Any) -> dict[str, Any]:
    import tempfile

    tok = c.token(caps=["subscribe", "publish", "presence"])
    names = [f"storm-{i}" for i in range(args.sessions)]
    tmp = tempfile.TemporaryDirectory(prefix="bench-storm-")
    server = Server(c.free_port(), Path(tmp.name) / "data", args.workers, args.connect_rate)
    server.start()
    url = f"ws://127.0.0.1:{server.port}"
    procs: list[Child] = []
    publisher: Child | None = None
    try:
        n_procs = max(args.procs, -(-args.clients // PER_PROC_MAX))
        per = [args.clients // n_procs + (1 if i < args.clients % n_procs else 0)
               for i in range(n_procs)]
        start = 0
        for count in per:
            mine = [names[j % len(names)] for j in range(start, start + count)]
            start += count
            path = Path(tmp.name) / f"sessions-{len(procs)}.json"
            path.write_bytes(orjson.dumps(mine))
            procs.append(Child(["--follower", "--url", url, "--list", str(path),
                                *(["--sdk"] if args.sdk else [])], tok))
        t0 = time.perf_counter()
        ready = [p.read() for p in procs]
        attach_seconds = time.perf_counter() - t0
        print(f"{args.clients:,} clients attached in {attach_seconds:.1f} s", flush=True)
        path = Path(tmp.name) / "sessions-pub.json"
        path.write_bytes(orjson.dumps(names))
        publisher = Child(["--publisher", "--url", url, "--list", str(path), "--rate",
                           str(args.rate)], tok)
        publisher.read()
        time.sleep(args.before)
        before = stats(procs)
        overflows = listen_overflows()
        death_seconds = server.kill()
        killed = time.time()
        for p in procs:
            p.say(f"mark {killed}")
        listen_seconds, restart_seconds = server.start()
        print(f"killed (group gone after {death_seconds:.1f} s); listening after "
              f"{listen_seconds:.1f} s, serving after {restart_seconds:.1f} s", flush=True)
        deadline = time.monotonic() + args.timeout
        while True:
            time.sleep(1.0)
            now = stats(procs)
            print(f"  {time.time() - killed:5.1f} s: {len(now['back']):,} of "
                  f"{now['clients']:,} back", flush=True)
            if len(now["back"]) >= now["clients"] or time.monotonic() > deadline:
                break
        overflows = listen_overflows() - overflows
        time.sleep(args.after)
        publisher.say("stop")
        published: dict[str, int] = publisher.read()["published"]
        expected = sum(published[names[j % len(names)]] for j in range(args.clients))
        deadline = time.monotonic() + 60
        while True:
            final = stats(procs)
            if final["events"] + final["gaps"] >= expected or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        back = final["back"] or now["back"]
        bins: dict[int, int] = {}
        for b in now["back"]:
            bins[int(b / 0.5)] = bins.get(int(b / 0.5), 0) + 1
        return {
            "clients": args.clients, "sessions": args.sessions, "workers": args.workers,
            "connect_rate": args.connect_rate,
            "rate": args.rate, "initial_attach_seconds": attach_seconds,
            "initial_attach_per_s": args.clients / attach_seconds,
            "ready": ready, "death_seconds": death_seconds, "listen_seconds": listen_seconds,
            "restart_seconds": restart_seconds,
            "lost_connections": now["lost"], "resumed": now["resumed"],
            "back": len(now["back"]),
            "all_resumed_seconds": max(now["back"]) if now["back"] else float("nan"),
            "resume_p50_seconds": c.percentile(now["back"], 50),
            "resume_p99_seconds": c.percentile(now["back"], 99),
            "peak_reattach_per_s": max(bins.values()) / 0.5 if bins else 0.0,
            "events_before_kill": before["events"], "published": sum(published.values()),
            "expected_deliveries": expected, "delivered": final["events"],
            "lost_events": expected - final["events"] - final["gaps"],
            "gaps": final["gaps"], "dups": final["dups"], "snapshots": final["snapshots"],
            "failed_followers": final["failed"], "back_final": len(back),
            "failed_attempts": final["failures"],
            "listen_overflows": overflows,
        }
    finally:
        if publisher is not None:
            publisher.end()
        for p in procs:
            p.end()
        server.stop()
        tmp.cleanup()


def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=10_000)
    p.add_argument("--sessions", type=int, default=1_000)
    p.add_argument("--procs", type=int, default=4, help="client processes")
    p.add_argument("--workers", type=int, default=1, help="tether serve --workers N")
    p.add_argument("--rate", type=float, default=200.0, help="publishes/s, all sessions")
    p.add_argument("--connect-rate", type=float, default=0.0,
                   help="the server's max_connect_rate per worker (0: no shedding)")
    p.add_argument("--before", type=float, default=3.0, help="seconds flowing before the kill")
    p.add_argument("--after", type=float, default=3.0, help="seconds flowing after all resumed")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--backoff-cap", type=float, default=0.0,
                   help="raw followers' backoff cap in seconds (default: the SDKs')")
    p.add_argument("--sdk", action="store_true",
                   help="followers are Python SDK clients (default: raw clients with the "
                        "SDK's reconnect policy; SDK clients cost the client side far more)")
    p.add_argument("--follower", action="store_true", help=_hidden())
    p.add_argument("--publisher", action="store_true", help=_hidden())
    p.add_argument("--url", default="", help=_hidden())
    p.add_argument("--list", default="", help=_hidden())
    args = p.parse_args()
    if args.backoff_cap:
        os.environ["BENCH_BACKOFF_CAP"] = str(args.backoff_cap)
    if args.follower or args.publisher:
        c.raise_nofile()
        c.install_uvloop()
        names = orjson.loads(Path(args.list).read_bytes())
        tok = os.environ["BENCH_TOKEN"]
        port = int(args.url.rsplit(":", 1)[1])
        coro = ((follower_proc(args.url, names, tok) if args.sdk
                 else raw_follower_proc(port, names, tok)) if args.follower
                else publisher_proc(args.url, names, args.rate, tok))
        asyncio.run(coro)
        return
    c.raise_nofile()
    if args.quick:
        args.clients, args.sessions, args.rate = 1000, 100, 100.0
    r = run(args)
    print(c.table(["figure", "value"], [[k, v] for k, v in r.items() if k != "ready"]))
    ok = (r["back"] == r["clients"] and r["resumed"] == r["clients"] and r["lost_events"] == 0
          and r["dups"] == 0 and r["gaps"] == 0 and r["snapshots"] == 0)
    print(f"every client resumed, nothing lost/duplicated/skipped: {'YES' if ok else 'NO'}; "
          f"all resumed in {r['all_resumed_seconds']:.1f} s (goal <= 15 s)")
    path = c.write_results("storm" + ("_quick" if args.quick else ""), {"config": vars(args),
                                                                         "result": r})
    print(f"wrote {path.relative_to(c.ROOT)}")


def _hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
