"""Test helpers: a raw protocol peer (no SDK) and a `tether serve` subprocess."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from tests.conftest import free_port, wait_for_port
from tether.protocol.codec import CODECS, JSON_SUBPROTOCOL
from tether.server.auth import issue_token

SECRET = "test-secret-" + "x" * 32
ALL_CAPS = ["subscribe", "publish", "presence"]


def nested(depth: int) -> Any:
    """``{"k": {"k": … "x"}}``: data ``depth`` objects deep."""
    value: Any = "x"
    for _ in range(depth):
        value = {"k": value}
    return value


# What serves plain WebSockets (tether/server/front.py): modules of the WebSocket contract
# run on both (pytestmark); the `ws_engine` fixture of tests/server/conftest.py is picows.
BOTH_WS_ENGINES = pytest.mark.parametrize("ws_engine", ["picows", "aiohttp"])


def token(sub: str = "alice", sessions: list[str] | None = None,
          caps: list[str] | None = None, ttl: float | None = 3600) -> str:
    return issue_token(SECRET, sub, sessions or ["*"], ALL_CAPS if caps is None else caps, ttl)


class Peer:
    """A raw WebSocket peer speaking the wire protocol by hand."""

    def __init__(self, http: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse,
                 subprotocol: str) -> None:
        self.http = http
        self.ws = ws
        self.codec = CODECS[subprotocol]
        self._next_id = 0
        self.frames: list[dict[str, Any]] = []
        self.received_close: int | None = None

    @property
    def close_code(self) -> int | None:
        """The code of the server's close frame; aiohttp's own may say 1006 after it."""
        return self.received_close if self.received_close is not None else self.ws.close_code

    @classmethod
    async def connect(cls, port: int, subprotocol: str = JSON_SUBPROTOCOL,
                      **kwargs: Any) -> Peer:
        http = aiohttp.ClientSession()
        ws = await http.ws_connect(f"http://127.0.0.1:{port}/v1/ws", protocols=[subprotocol],
                                   **kwargs)
        return cls(http, ws, subprotocol)

    def next_id(self) -> int:
        self._next_id += 1
        return self._next_id

    async def send(self, frame: dict[str, Any]) -> None:
        data = self.codec.encode(frame)
        if self.codec.binary:
            await self.ws.send_bytes(data)
        else:
            await self.ws.send_str(data.decode())

    async def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        msg = await asyncio.wait_for(self.ws.receive(), timeout)
        if msg.type == aiohttp.WSMsgType.CLOSE:
            self.received_close = int(msg.data)
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                        aiohttp.WSMsgType.CLOSING):
            raise ConnectionError(f"closed with {self.close_code}")
        if msg.type == aiohttp.WSMsgType.ERROR:
            raise ConnectionError(f"socket error {msg.data!r}")
        frame = self.codec.decode(msg.data)
        self.frames.append(frame)
        return frame

    async def expect(self, op: str, timeout: float = 10.0, **match: Any) -> dict[str, Any]:
        """The next frame with ``op`` (and matching fields); other frames are kept in order."""
        while True:
            frame = await self.recv(timeout)
            if frame.get("op") == op and all(frame.get(k) == v for k, v in match.items()):
                return frame

    async def request(self, frame: dict[str, Any], reply: str | None = None) -> dict[str, Any]:
        rid = self.next_id()
        await self.send({**frame, "id": rid})
        while True:
            got = await self.recv()
            if got.get("id") == rid and got.get("op") in (reply, "error"):
                return got

    async def hello(self, tok: str | None = None, **extra: Any) -> dict[str, Any]:
        return await self.request({"op": "hello", "token": token() if tok is None else tok,
                                   **extra}, "welcome")

    async def attach(self, session: str, cursor: str | None = None,
                     **extra: Any) -> dict[str, Any]:
        return await self.request({"op": "attach", "session": session, "cursor": cursor,
                                   **extra}, "attached")

    async def publish(self, session: str, type: str = "message", data: Any = None,
                      **extra: Any) -> dict[str, Any]:
        return await self.request({"op": "publish", "session": session, "type": type,
                                   "data": data, **extra}, "published")

    async def events(self, session: str, count: int, timeout: float = 10.0
                     ) -> list[dict[str, Any]]:
        got = [f for f in self.frames if f.get("op") == "event" and f["session"] == session]
        self.frames = [f for f in self.frames if f not in got]
        while len(got) < count:
            frame = await self.recv(timeout)
            if frame.get("op") == "event" and frame["session"] == session:
                got.append(frame)
                self.frames.remove(frame)
        return got

    async def close(self) -> None:
        await self.ws.close()
        await self.http.close()


class RawSocketPeer:
    """A WebSocket client on a plain stream, writing frames byte by byte: when it stops
    reading, nothing reads for it, so the kernel buffers fill and the server feels real
    backpressure; and it can send what a library would not (fragments, bad UTF-8)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.close_code: int | None = None

    @classmethod
    async def connect(cls, port: int) -> RawSocketPeer:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 16)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write((f"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                      "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: tether.v1.json\r\n"
                      "\r\n").encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    async def send(self, frame: dict[str, Any]) -> None:
        await self.send_frame(0x1, orjson.dumps(frame))

    async def send_frame(self, opcode: int, payload: bytes, fin: bool = True) -> None:
        """One masked frame, as a client must send it."""
        await self.send_frames([(opcode, payload)], fin)

    async def send_frames(self, frames: list[tuple[int, bytes]], fin: bool = True) -> None:
        """Several frames in one write: the server reads them together."""
        self.writer.write(b"".join(self._frame(opcode, payload, fin)
                                   for opcode, payload in frames))
        await self.writer.drain()

    @staticmethod
    def _frame(opcode: int, payload: bytes, fin: bool) -> bytes:
        mask = os.urandom(4)
        header = bytes([(0x80 if fin else 0) | opcode])
        n = len(payload)
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack("!Q", n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return header + mask + masked

    async def recv(self) -> dict[str, Any]:
        """The next text frame, pings answered; ConnectionError at a close (``close_code``)."""
        while True:
            b0, b1 = await self.reader.readexactly(2)
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
            payload = await self.reader.readexactly(n)
            opcode = b0 & 0x0F
            if opcode == 0x9:  # ping: answer so the heartbeat keeps us
                self.writer.write(bytes([0x8A, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)
                continue
            if opcode == 0x1:
                return orjson.loads(payload)  # type: ignore[no-any-return]
            if opcode == 0x8:
                self.close_code = struct.unpack("!H", payload[:2])[0] if payload else 1005
            raise ConnectionError(f"opcode {opcode}, close code {self.close_code}")

    def close(self) -> None:
        self.writer.close()


class ServerProcess:
    """``python -m tether serve`` in a subprocess, for crash and multi-node tests.

    ``workers`` > 1 runs ``--workers N`` in a process group of its own: :meth:`kill` then
    SIGKILLs the whole group (supervisor, sequencer and workers), :meth:`kill_worker` one
    worker.
    """

    def __init__(self, data: Path, store: str | None = None, port: int | None = None,
                 extra: list[str] | None = None, env: dict[str, str] | None = None,
                 workers: int = 1) -> None:
        self.env = env or {}
        self.workers = workers
        self.data = data
        self.store = store
        self.port = port or free_port()
        self.extra = extra or []
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServerProcess:
        args = [sys.executable, "-m", "tether", "serve", "--port", str(self.port),
                "--data", str(self.data), "--secret", SECRET, "--log-level", "warning",
                "--workers", str(self.workers), *self.extra]
        if self.store:
            args += ["--store", self.store]
        if hasattr(self, "log"):
            self.log.close()  # a restart: one log file per process
        self.log = open(self.data.parent / f"server-{self.port}.log", "ab")  # noqa: SIM115
        self._log_start = self.log.tell()
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=self.log,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
                                     start_new_session=self.workers > 1)
        wait_for_port(self.port, 30)
        if self.workers > 1:  # the port answers once one worker listens; this line, once all do
            log = self.data.parent / f"server-{self.port}.log"
            deadline = time.monotonic() + 60
            while b"tether serving on" not in log.read_bytes()[self._log_start:]:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"tether serve --workers {self.workers} did not start")
                time.sleep(0.02)
        return self

    def worker_pids(self) -> list[int]:
        """The pids of the worker processes (``--workers`` > 1)."""
        import psutil

        return [child.pid for child in psutil.Process(self.pid).children()]

    def worker_of(self, local_port: int) -> int:
        """The pid of the worker serving the connection from ``local_port`` on this host."""
        import psutil

        for pid in self.worker_pids():
            for conn in psutil.Process(pid).net_connections("tcp"):
                if conn.raddr and conn.raddr.port == local_port and conn.laddr.port == self.port:
                    return pid
        raise LookupError(f"no worker serves the connection from port {local_port}")

    def kill_worker(self, pid: int) -> None:
        os.kill(pid, signal.SIGKILL)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        assert self.proc is not None
        if self.workers > 1:
            os.killpg(self.proc.pid, signal.SIGKILL)
        else:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        if hasattr(self, "log"):
            self.log.close()


class ChatUpstream:
    """A local server speaking streaming Chat Completions: calls ``add`` until it sees a tool
    result, then answers. Every request body is kept."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.auth: list[str | None] = []  # the Authorization header of each request

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.auth.append(request.headers.get("Authorization"))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def send(chunk: dict[str, Any]) -> None:
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")

        base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": body["model"]}
        if body["messages"][-1]["role"] == "tool":
            for piece in ["The ", "sum ", "is 5."]:
                await send({**base, "choices": [{"index": 0, "delta": {"content": piece}}]})
            await send({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        else:
            await send({**base, "choices": [{"index": 0, "delta": {"role": "assistant",
                        "tool_calls": [{"index": 0, "id": f"call_up{len(self.requests)}",
                                        "type": "function",
                                        "function": {"name": "add", "arguments": ""}}]}}]})
            for piece in ['{"a": 2', ', "b": 3}']:
                await send({**base, "choices": [{"index": 0, "delta": {"tool_calls": [
                    {"index": 0, "function": {"arguments": piece}}]}}]})
            await send({**base, "choices": [{"index": 0, "delta": {},
                                             "finish_reason": "tool_calls"}]})
        await send({**base, "choices": [], "usage": {"prompt_tokens": 11,
                                                     "completion_tokens": 3}})
        await resp.write(b"data: [DONE]\n\n")
        return resp
