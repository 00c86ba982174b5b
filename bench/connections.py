"""Many idle connections: server memory per connection, heartbeat CPU at rest, attach rate,
p99 delivery latency of a low-rate publish to 1 % of them; and what permessage-deflate costs.

Client processes (``--clients``, each under the per-process open-file cap) open the connections,
each process from its own source address (127.0.0.2, 127.0.0.3, …) so that every one has the
whole ephemeral port range. Each connection is a raw WebSocket written here (not picows: it has
no permessage-deflate): it answers pings, says hello and attaches to its own session (tether)
or sends one request frame and reads one reply (bare aiohttp, ``--server bare``: the same
WebSocket stack with heartbeats, no protocol). With ``--deflate`` every client offers
``permessage-deflate; client_max_window_bits`` as browsers do, and compresses what it sends.

Phases, one server process tree per run (``--workers N`` is passed to ``tether serve`` when it
has that option; RSS and CPU are summed over the tree):

1. open ``--connections`` connections; the attach rate is connections / seconds;
2. RSS per connection: tree RSS once idle minus RSS before (after a warm-up of 50);
3. heartbeat CPU at rest: server CPU over ``--rest`` seconds with every connection idle
   (pings every ``--heartbeat`` seconds);
4. delivery latency: this process publishes ``--rate`` events/s for ``--publish-seconds`` to the
   sessions of 1 % of the connections; each subscriber records publish-to-receipt time.

``--bytes`` instead measures the wire bytes of a token stream (7,000 ``stream.append`` events
of 1–3 tokens) to one subscriber that offers deflate, for: compression off, aiohttp's own deflate
(``bench/experiments/aiohttp_deflate.py``) and tether's (tuned window and memory level).

Run: ``python -m bench.connections`` (15,000 connections, one worker, tether and bare),
``--deflate`` (with compression offered), ``--bytes``, or the full one, e.g.
``--connections 100000 --workers 6 --clients 6``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import random
import re
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import orjson

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common as c

KIB = 1024.0
PER_CLIENT_MAX = 18_000  # connections per client process: under the 20,000 open-file cap
OFFER = "permessage-deflate; client_max_window_bits"
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux


# --- a raw WebSocket client ----------------------------------------------------------------------

class RawWS(asyncio.Protocol):
    """One client WebSocket: upgrade, ping/pong, optional deflate both ways, JSON requests."""

    __slots__ = ("_buf", "_compress_bits", "_handshake", "_inflater", "_take", "bytes_in",
                 "close", "deflate", "events", "latencies", "on_reply", "transport")

    def __init__(self, latencies: list[float]) -> None:
        self.transport: asyncio.Transport | None = None
        self._buf = b""
        self._handshake: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.on_reply: asyncio.Future[bytes] | None = None
        self.deflate = False
        self._compress_bits = 15
        self._inflater: Any = None
        self._take = True
        self.bytes_in = 0
        self.events = 0
        self.latencies = latencies
        self.close = ""  # the server's close code and reason, when it sent one

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        for fut in (self._handshake, self.on_reply):
            if fut is not None and not fut.done():
                fut.set_exception(ConnectionError(f"lost {self.close or exc or ''}".strip()))

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        buf = self._buf + data
        if not self._handshake.done():
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self._buf = buf
                return
            head, buf = buf[:end].decode("latin-1"), buf[end + 4:]
            if not head.startswith("HTTP/1.1 101"):
                self._handshake.set_exception(ConnectionError(head.split("\r\n", 1)[0]))
                return
            ext = re.search(r"(?im)^sec-websocket-extensions:\s*(.+)$", head)
            self._handshake.set_result(ext.group(1).strip() if ext else "")
            if ext:
                self.deflate = True
                value = ext.group(1)
                bits = re.search(r"client_max_window_bits=(\d+)", value)
                self._compress_bits = int(bits.group(1)) if bits else 15
                self._take = "server_no_context_takeover" not in value
        while len(buf) >= 2:
            b0, b1 = buf[0], buf[1]
            n = b1 & 0x7F
            pos = 2
            if n == 126:
                if len(buf) < 4:
                    break
                n = struct.unpack_from("!H", buf, 2)[0]
                pos = 4
            elif n == 127:
                if len(buf) < 10:
                    break
                n = struct.unpack_from("!Q", buf, 2)[0]
                pos = 10
            if len(buf) < pos + n:
                break
            payload, buf = buf[pos:pos + n], buf[pos + n:]
            self._frame(b0, payload)
        self._buf = buf

    def _frame(self, b0: int, payload: bytes) -> None:
        opcode = b0 & 0x0F
        if opcode == 0x9:  # ping
            self._send(0xA, payload, compress=False)
            return
        if opcode == 0x8:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 0
            self.close = f"close {code} {payload[2:].decode(errors='replace')}"
            return
        if opcode not in (0x1, 0x2):
            return
        if b0 & 0x40:  # RSV1: compressed
            if self._inflater is None or not self._take:
                self._inflater = zlib.decompressobj(-15)
            payload = self._inflater.decompress(payload + b"\x00\x00\xff\xff")
        if payload.startswith(b'{"op":"event"'):
            self.events += 1
            m = re.search(rb'"t":(\d+)', payload)
            if m:
                self.latencies.append((time.time_ns() - int(m.group(1))) / 1e6)
            return
        if self.on_reply is not None and not self.on_reply.done():
            self.on_reply.set_result(payload)

    def _send(self, opcode: int, data: bytes, compress: bool = True) -> None:
        assert self.transport is not None
        rsv = 0
        if compress and self.deflate:
            # Each message on its own (the server asks for client_no_context_takeover).
            z = zlib.compressobj(1, zlib.DEFLATED, -self._compress_bits)
            data = (z.compress(data) + z.flush(zlib.Z_SYNC_FLUSH))[:-4]
            rsv = 0x40
        n = len(data)
        head = bytes((0x80 | rsv | opcode,)) + (
            bytes((0x80 | n,)) if n < 126 else struct.pack("!BH", 0x80 | 126, n)
            if n < 65536 else struct.pack("!BQ", 0x80 | 127, n))
        # A zero masking key: the payload goes as is (servers accept any key).
        self.transport.write(head + b"\x00\x00\x00\x00" + data)

    async def open(self, port: int, path: str, deflate: bool) -> None:
        assert self.transport is not None
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket",
                 "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13",
                 f"Sec-WebSocket-Protocol: {c.JSON_SUBPROTOCOL}"]
        if deflate:
            lines.append(f"Sec-WebSocket-Extensions: {OFFER}")
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await asyncio.wait_for(self._handshake, 60)

    async def request(self, frame: dict[str, Any]) -> dict[str, Any]:
        self.on_reply = asyncio.get_running_loop().create_future()
        self._send(0x1, orjson.dumps(frame))
        reply: dict[str, Any] = orjson.loads(await asyncio.wait_for(self.on_reply, 60))
        if reply.get("op") == "error":
            raise RuntimeError(f"{frame.get('op')} failed: {reply}")
        return reply


async def open_one(port: int, source: str, mode: str, deflate: bool, session: str, tok: str,
                   latencies: list[float]) -> RawWS:
    loop = asyncio.get_running_loop()
    path = "/ws" if mode == "bare" else "/v1/ws"
    # Bound to the source address without a port: the port is picked at connect() (Linux's
    # IP_BIND_ADDRESS_NO_PORT). A bind() that picks one searches the bound ports, which grows
    # with every socket held: at ~70,000 connections it had the kernel at 100 % of both cores.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    _, conn = await loop.create_connection(lambda: RawWS(latencies), sock=sock)
    await conn.open(port, path, deflate)
    if mode == "bare":
        await conn.request({"op": "hello"})
    else:
        await conn.request({"op": "hello", "id": 1, "token": tok})
        await conn.request({"op": "attach", "id": 2, "session": session})
        # The presence list follows the attached reply; it is a reply-less frame, ignored.
    return conn


# --- worker: a client process --------------------------------------------------------------------

async def worker(port: int, count: int, mode: str, deflate: bool, prefix: str, source: str,
                 concurrency: int) -> None:
    loop = asyncio.get_running_loop()
    tok = os.environ.get("BENCH_TOKEN", "")
    latencies: list[float] = []
    failures: dict[str, int] = {}

    async def attempt(i: int) -> RawWS | None:
        try:
            return await open_one(port, source, mode, deflate, f"{prefix}-{i}", tok, latencies)
        except (OSError, TimeoutError, RuntimeError) as exc:  # counted, reported, not fatal
            why = str(exc)[:80] or type(exc).__name__
            failures[why] = failures.get(why, 0) + 1
            return None

    start = time.perf_counter()
    opened = await c.gather_limited([attempt(i) for i in range(count)], concurrency)
    conns = [conn for conn in opened if conn is not None]
    elapsed = time.perf_counter() - start
    negotiated = sum(1 for conn in conns if conn.deflate)
    print(orjson.dumps({"open": len(conns), "seconds": elapsed, "deflate": negotiated,
                        "failures": failures}).decode(), flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = (await reader.readline()).strip()
        if line == b"stats":
            lost = sum(1 for conn in conns if conn.transport is None
                       or conn.transport.is_closing())
            print(orjson.dumps({"events": sum(conn.events for conn in conns),
                                "latencies": latencies, "closed": lost,
                                "bytes_in": sum(conn.bytes_in for conn in conns)}).decode(),
                  flush=True)
            latencies.clear()
        else:
            break
    for conn in conns:
        if conn.transport is not None:
            conn.transport.close()


class Clients:
    """Client worker processes, each from its own source address."""

    def __init__(self, port: int, total: int, mode: str, deflate: bool, tag: str, n: int,
                 tok: str, concurrency: int = 100) -> None:
        n = max(n, -(-total // PER_CLIENT_MAX))
        self.per = [total // n + (1 if i < total % n else 0) for i in range(n)]
        self.prefixes = [f"{tag}{i}" for i in range(n)]
        self.procs = [subprocess.Popen(
            [sys.executable, "-m", "bench.connections", "--worker", "--port", str(port),
             "--count", str(count), "--mode", mode, "--prefix", prefix,
             "--source", f"127.0.0.{2 + i}", "--concurrency", str(concurrency),
             *(["--deflate"] if deflate else [])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=c.ROOT,
            env={**c.child_env(), "BENCH_TOKEN": tok})
            for i, (count, prefix) in enumerate(zip(self.per, self.prefixes, strict=True))
            if count]

    def read(self) -> list[dict[str, Any]]:
        out = []
        for proc in self.procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"a client process exited with {proc.wait(60)}")
            out.append(orjson.loads(line))
        return out

    def stats(self) -> list[dict[str, Any]]:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(b"stats\n")
            proc.stdin.flush()
        return self.read()

    def sessions(self, every: int) -> list[str]:
        """Every ``every``-th connection's session."""
        names = [f"{p}-{i}" for p, n in zip(self.prefixes, self.per, strict=True)
                 for i in range(n)]
        return names[::every]

    def close(self) -> None:
        for proc in self.procs:
            with _quiet():
                assert proc.stdin is not None
                proc.stdin.write(b"quit\n")
                proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


class _quiet:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is not None and issubclass(exc[0], OSError)  # type: ignore[arg-type]


# --- servers -------------------------------------------------------------------------------------

def bare_app(heartbeat: float, compress: bool) -> Any:
    """Bare aiohttp: WebSockets with heartbeats; any text frame gets a short reply."""
    from aiohttp import WSMsgType, web

    async def ws_handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=compress, heartbeat=heartbeat,
                                   max_msg_size=1 << 20, protocols=[c.JSON_SUBPROTOCOL])
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                await ws.send_str('{"op":"ok"}')
        return ws

    app = web.Application()
    app.router.add_get("/ws", ws_handler)
    return app


def has_workers_option() -> bool:
    out = subprocess.run([sys.executable, "-m", "tether", "serve", "--help"], cwd=c.ROOT,
                         capture_output=True, text=True, env=c.child_env()).stdout
    return "--workers" in out


def server(kind: str, workers: int, heartbeat: float, deflate: bool,
           wrapper: str | None = None) -> c.Proc:
    if kind == "bare":
        port = c.free_port()
        return c.Proc("bare", [sys.executable, "-m", "bench.connections", "--bare-server",
                               "--port", str(port), "--heartbeat", str(heartbeat),
                               *(["--deflate"] if deflate else [])], port)
    env = {"TETHER_HEARTBEAT": str(heartbeat), "TETHER_COMPRESSION": str(deflate).lower(),
           "TETHER_MAX_SESSIONS_PER_CONNECTION": "100"}
    if wrapper:
        env["BENCH_TETHER_WRAPPER"] = wrapper
    old = os.environ.pop("BENCH_TETHER_WRAPPER", None)
    if wrapper:
        os.environ["BENCH_TETHER_WRAPPER"] = wrapper
    try:
        proc = c.tether_server(store="memory://", env=env)
    finally:
        os.environ.pop("BENCH_TETHER_WRAPPER", None)
        if old is not None:
            os.environ["BENCH_TETHER_WRAPPER"] = old
    if has_workers_option():
        proc.cmd = [*proc.cmd, "--workers", str(workers)]
        if workers > 1 and proc.cmd[0] == "taskset":
            proc.cmd = proc.cmd[3:]  # several workers: every core
    elif workers > 1:
        raise SystemExit("this tether serve has no --workers option")
    return proc


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def tree_rss(pid: int) -> int:
    total = 0
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def tree_cpu(pid: int) -> float:
    total = 0.0
    for p in tree(pid):
        with contextlib.suppress(OSError):
            total += c.cpu_seconds(p)
    return total


def settled(pid: int, seconds: float = 3.0) -> int:
    last = tree_rss(pid)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = tree_rss(pid)
        if abs(now - last) < 256 * 1024:
            return now
        last = now
    return last


# --- the measurement -----------------------------------------------------------------------------

async def publish(port: int, sessions: list[str], rate: float, seconds: float) -> int:
    conn = await c.connect(port)
    await conn.hello()
    rng = random.Random(7)
    sent = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        session = rng.choice(sessions)
        conn.send({"op": "publish", "session": session, "type": "tick",
                   "data": {"t": time.time_ns()}, "id": sent})
        sent += 1
        await asyncio.sleep(max(0.0, start + sent / rate - time.perf_counter()))
    await asyncio.sleep(1.0)  # the last ones land
    conn.close()
    return sent


def run(kind: str, args: Any, deflate: bool, wrapper: str | None = None) -> dict[str, Any]:
    count = args.connections
    proc = server(kind, args.workers, args.heartbeat, deflate, wrapper)
    tok = "" if kind == "bare" else c.token(caps=["subscribe", "publish"])
    with proc:
        warm = Clients(proc.port, 50, kind, deflate, "warm", 1, tok)
        warm.read()
        warm.close()
        time.sleep(0.5)
        before = settled(proc.pid)
        cpu0 = tree_cpu(proc.pid)
        start = time.perf_counter()
        clients = Clients(proc.port, count, kind, deflate, "c", args.clients, tok,
                          args.concurrency)
        try:
            opened = clients.read()
            seconds = time.perf_counter() - start
            attach_cpu = tree_cpu(proc.pid) - cpu0
            total = sum(r["open"] for r in opened)
            negotiated = sum(r["deflate"] for r in opened)
            failures: dict[str, int] = {}
            for r in opened:
                for why, n in r.get("failures", {}).items():
                    failures[why] = failures.get(why, 0) + n
            after = settled(proc.pid)
            # At rest: every connection idle, pings only.
            cpu1, t1 = tree_cpu(proc.pid), time.perf_counter()
            time.sleep(args.rest)
            rest_cpu = tree_cpu(proc.pid) - cpu1
            rest_wall = time.perf_counter() - t1
            rest_rss = tree_rss(proc.pid)
            result: dict[str, Any] = {
                "server": kind, "deflate": deflate, "wrapper": wrapper, "connections": total,
                "deflate_negotiated": negotiated, "workers": args.workers,
                "failed": sum(failures.values()), "failures": failures,
                "client_processes": len(clients.procs),
                "rss_before_mib": before / KIB / KIB, "rss_after_mib": after / KIB / KIB,
                "kib_per_conn": (after - before) / KIB / total,
                "kib_per_conn_after_rest": (rest_rss - before) / KIB / total,
                "attach_per_s": total / seconds, "attach_cpu_ms": attach_cpu / total * 1000,
                "rest_cpu_percent": rest_cpu / rest_wall * 100,
                "rest_us_per_ping": rest_cpu / max(1.0, total * rest_wall / args.heartbeat) * 1e6,
            }
            if kind != "bare" and args.rate:
                clients.stats()  # reset
                sessions = clients.sessions(100)
                sent = asyncio.run(publish(proc.port, sessions, args.rate, args.publish_seconds))
                stats = clients.stats()
                lat = [x for s in stats for x in s["latencies"]]
                result.update({"published": sent, "delivered": len(lat),
                               "subscribers": len(sessions),
                               "latency_p50_ms": c.percentile(lat, 50),
                               "latency_p99_ms": c.percentile(lat, 99),
                               "latency_max_ms": max(lat) if lat else float("nan"),
                               "closed": sum(s["closed"] for s in stats)})
            result["alive"] = proc.alive()
        finally:
            clients.close()
    return result


# --- wire bytes of a token stream ----------------------------------------------------------------

def token_texts(n: int = 7000) -> list[str]:
    text = (c.ROOT / "README.md").read_text() + (c.ROOT / "docs" / "architecture.md").read_text()
    tokens = re.findall(r"\s*\S+", text)
    rng = random.Random(1)
    out, i = [], 0
    while len(out) < n:
        k = rng.randint(1, 3)
        out.append("".join(tokens[i % len(tokens):i % len(tokens) + k]))
        i += k
    return out


async def stream_bytes(port: int, texts: list[str]) -> dict[str, Any]:
    tok = c.token(caps=["subscribe", "publish"])
    sub = await open_one(port, "127.0.0.1", "tether", True, "tokens", tok, [])
    pub = await c.connect(port)
    await pub.hello()
    base = sub.bytes_in
    publisher = c.WindowedPublisher(pub, b"", 32, limit=len(texts))
    payloads = iter(orjson.dumps({"op": "publish", "session": "tokens", "type": "stream.append",
                                  "data": {"stream": "r-8d1f2b.0", "text": t}}) for t in texts)

    def send_next() -> None:
        if publisher.limit is not None and publisher.sent >= publisher.limit:
            return
        publisher.sent += 1
        pub.transport.send(c.TEXT, next(payloads))

    publisher._send = send_next  # type: ignore[method-assign]
    publisher.start()
    while sub.events < len(texts):
        await asyncio.sleep(0.01)
    result = {"events": sub.events, "bytes": sub.bytes_in - base, "deflate": sub.deflate}
    pub.close()
    assert sub.transport is not None
    sub.transport.close()
    return result


def bytes_run(args: Any) -> dict[str, Any]:
    texts = token_texts()
    variants = [("off", False, None), ("aiohttp deflate", True,
                                        "bench/experiments/aiohttp_deflate.py"),
                ("tether deflate", True, None)]
    rows = {}
    for name, deflate, wrapper in variants:
        proc = server("tether", 1, args.heartbeat, deflate, wrapper)
        with proc:
            cpu0 = proc.cpu_seconds()
            rows[name] = asyncio.run(stream_bytes(proc.port, texts))
            # Server CPU per event for the whole exchange (publish, commit, deliver, compress).
            rows[name]["server_us_per_event"] = (proc.cpu_seconds() - cpu0) / len(texts) * 1e6
        print(f"{name}: {rows[name]['bytes']:,} bytes for {rows[name]['events']} events, "
              f"{rows[name]['server_us_per_event']:.0f} us server CPU per event", flush=True)
    off = rows["off"]["bytes"]
    saving = {k: 1 - v["bytes"] / off for k, v in rows.items()}
    kept = saving["tether deflate"] / saving["aiohttp deflate"]
    return {"events": len(texts), "rows": rows, "saving": saving, "kept": kept}


def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--connections", type=int, default=15_000)
    p.add_argument("--workers", type=int, default=1, help="tether serve --workers N")
    p.add_argument("--clients", type=int, default=2, help="client processes (at least "
                   f"connections/{PER_CLIENT_MAX:,})")
    p.add_argument("--heartbeat", type=float, default=15.0)
    p.add_argument("--rest", type=float, default=31.0, help="seconds measured at rest")
    p.add_argument("--rate", type=float, default=50.0, help="publishes/s to 1%% of sessions")
    p.add_argument("--publish-seconds", type=float, default=10.0)
    p.add_argument("--deflate", action="store_true", help="clients offer permessage-deflate")
    p.add_argument("--servers", default="tether,bare")
    p.add_argument("--concurrency", type=int, default=100,
                   help="connections being opened at once per client process")
    p.add_argument("--aiohttp-deflate", action="store_true",
                   help="also run tether with aiohttp's own deflate (the 'before')")
    p.add_argument("--bytes", action="store_true", help="token-stream wire bytes instead")
    p.add_argument("--worker", action="store_true", help=_hidden())
    p.add_argument("--bare-server", action="store_true", help=_hidden())
    p.add_argument("--port", type=int, default=0, help=_hidden())
    p.add_argument("--count", type=int, default=0, help=_hidden())
    p.add_argument("--mode", default="tether", help=_hidden())
    p.add_argument("--prefix", default="c", help=_hidden())
    p.add_argument("--source", default="127.0.0.1", help=_hidden())
    args = p.parse_args()
    if args.worker:
        c.raise_nofile()
        c.install_uvloop()
        asyncio.run(worker(args.port, args.count, args.mode, args.deflate, args.prefix,
                           args.source, args.concurrency))
        return
    if args.bare_server:
        from aiohttp import web

        c.raise_nofile()
        c.install_uvloop()
        web.run_app(bare_app(args.heartbeat, args.deflate), host="127.0.0.1", port=args.port,
                    print=None, backlog=4096, access_log=None)
        return
    c.setup()
    if args.quick:
        args.connections, args.rest, args.publish_seconds = 2000, 5.0, 3.0
    if args.bytes:
        out = bytes_run(args)
        print(c.table(["server", "bytes", "saving", "server us/event"],
                      [[k, v["bytes"], f"{out['saving'][k]:.1%}", v["server_us_per_event"]]
                       for k, v in out["rows"].items()]))
        met = out["kept"] >= 0.5
        print(f"tether deflate keeps {out['kept']:.0%} of aiohttp deflate's saving "
              f"(goal >= 50%): {'MET' if met else 'MISSED'}")
        path = c.write_results("connections_bytes", out)
        print(f"wrote {path.relative_to(c.ROOT)}")
        return
    results = []
    for kind in args.servers.split(","):
        c.settle()
        results.append(run(kind, args, args.deflate))
        print(orjson.dumps(results[-1]).decode(), flush=True)
    if args.aiohttp_deflate:
        c.settle()
        results.append(run("tether", args, True, "bench/experiments/aiohttp_deflate.py"))
        print(orjson.dumps(results[-1]).decode(), flush=True)
    bare = next((r["kib_per_conn"] for r in results if r["server"] == "bare"), float("nan"))
    rows = [[("aiohttp-deflate " if r["wrapper"] else "") + r["server"], r["connections"],
             r["kib_per_conn"], r["kib_per_conn_after_rest"], r["kib_per_conn"] / bare,
             r["attach_per_s"], r["rest_cpu_percent"], r["rest_us_per_ping"],
             r.get("latency_p99_ms", float("nan"))] for r in results]
    print()
    print(f"{args.connections:,} connections, {args.workers} worker(s), deflate "
          f"{'offered' if args.deflate else 'off'}, heartbeat {args.heartbeat:g} s")
    print(c.table(["server", "conns", "KiB/conn", "after rest", "vs bare", "attach/s",
                   "rest CPU %", "us/ping", "p99 ms"], rows))
    name = "connections" + ("_deflate" if args.deflate else "")
    path = c.write_results(name, {"config": vars(args), "results": results})
    print(f"wrote {path.relative_to(c.ROOT)}")


def _hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
