"""Fuzzing the WebSocket frame decoder and dispatch, and the HTTP API, against a real server.

One in-process :class:`~tether.server.Server` on 127.0.0.1 (SQLite in a temporary folder, or
the memory store) is hit by:

* raw WebSocket peers (``tether.v1.json`` and ``tether.v1.msgpack``) sending mostly-valid
  frames, mutated: wrong types, missing fields, nesting up to 300 levels, non-ASCII digits and
  trailing newlines in cursors and ids, bytes / ext types / NaN / giant ints in MessagePack
  values, unknown ops, reserved event types, run control events naming random runs,
  ``presence.set`` with odd states, ``attach`` with odd cursors, byte-level damage and random
  bytes. Frames are pipelined (a ``ping`` every few dozen frames keeps the error-in-row counter
  down and is the point where the peer checks the server is still answering);
* HTTP workers sending random methods, paths, query strings, headers and bodies to every
  route of the API;
* a bystander: the Python SDK (:class:`tether.Client`) attached to a session that the fuzzers
  also write into, publishing an ordered sequence throughout the run.

The structure of the generated values comes from Hypothesis strategies (a corpus drawn once
per seed); a ``random.Random(seed)`` mutator turns it into frames and requests fast.

Oracle (:attr:`FuzzReport.failures`): no 5xx except ``503`` from ``/healthz``; no WebSocket
closed with 1006 / 1011 or any code outside the documented ones; no ERROR log record from
``tether.*``, ``aiohttp.*`` or ``asyncio`` (tracebacks); no request left hanging; the server
still answers at the end; the bystander received each of its events exactly once and in
order; the session's log read over HTTP has no gap.

Long run: ``python -m bench.fuzz --inputs 1000000 --seed 1``; ``tests/security/test_fuzz.py``
runs the same harness with a bounded budget.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import math
import random
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import msgpack
import orjson
from aiohttp.http_exceptions import HttpProcessingError
from yarl import URL

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tether
from tether.server import Server, ServerConfig
from tether.server.auth import issue_token
from tether.store import MemoryStore, Retention

SECRET = "fuzz-secret-" + "z" * 32
WRONG_SECRET = "wrong-secret-" + "y" * 32
BYSTANDER_SESSION = "fuzz-by"
SESSIONS = [BYSTANDER_SESSION, "f0", "f1", "f2", "demo", "chat-x", "tether.runs"]
JSON_PROTO = "tether.v1.json"
MSGPACK_PROTO = "tether.v1.msgpack"

# Close codes a fuzzing peer may get: documented in docs/protocol.md, plus the standard codes
# for WebSocket-level damage the fuzzer causes on purpose (1002 bad framing, 1007 text that is
# not UTF-8). 1006 (dropped without a close frame) and 1011 (internal error) are failures.
ALLOWED_CLOSES = {1000, 1002, 1007, 1009, 4000, 4500, 4501, 4502, 4503, 4504}

WATCHED_LOGGERS = ("tether", "aiohttp", "asyncio")


def token(sub: str = "fuzz", sessions: list[str] | None = None, caps: list[str] | None = None,
          ttl: float | None = 3600, secret: str = SECRET) -> str:
    return issue_token(secret, sub, sessions or ["*"], caps or ["subscribe", "publish",
                                                                 "presence"], ttl)


# --- the corpus: structure from Hypothesis --------------------------------------------------


@dataclass
class Corpus:
    values: list[Any]  # JSON-ish values: nested lists/maps, unicode, giant ints, NaN, ±inf
    strings: list[str]  # ids, cursors, types: unicode, non-ASCII digits, control characters


def hypothesis_corpus(seed: int, examples: int = 300) -> Corpus:
    """Values and strings drawn from Hypothesis strategies, reproducibly for ``seed``."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed
    from hypothesis import strategies as st

    odd_chars = st.characters(categories=["Nd", "No", "Nl", "Zs", "Cc", "Cf", "So", "Lo", "Mn"])
    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(),
        st.integers(min_value=-(2 ** 80), max_value=2 ** 80),
        st.floats(), st.text(max_size=24), st.text(odd_chars, max_size=12),
    )
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                          max_leaves=16)
    strings = st.one_of(
        st.from_regex(r"\A[A-Za-z0-9_-]{0,33}:[0-9]{0,20}\Z"),
        st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.:@-]{0,130}\Z"),
        st.from_regex(r"\A[a-z]{1,8}\.[a-z_]{0,12}\Z"),
        st.text(max_size=40), st.text(odd_chars, min_size=1, max_size=8),
    )
    out = Corpus([], [])

    @hseed(seed)
    @settings(max_examples=examples, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(values, strings)
    def collect(value: Any, text: str) -> None:
        out.values.append(value)
        out.strings.append(text)

    collect()
    return out


# --- values and frames ----------------------------------------------------------------------

SPECIAL_STRINGS = [
    "", " ", "\n", "\x00", "²", "١٢", "１２", "𝟙", "⁴²", "Ⅻ", "\u200b", "\ufeff", "é", "👍🏽",
    "a" * 129, "a" * 300, "../..", "%00", "\\", "'\"", "${x}", "<script>", "null", "NaN",
]
ODD_CURSOR_TAILS = ["²", "١", "０", "\n", " ", "\t", "+1", "-1", "1e3", "0x1", "1_0", ".5",
                    "99999999999999999999", "999999999999999999", "18446744073709551616", ""]
OPS = ["hello", "attach", "detach", "publish", "ack", "presence.set", "ping"]
ODD_OPS = ["Publish", "publish ", "publish\n", "PING", "pong", "welcome", "event", "error",
           "teleport", "", "presence.get", "attach\x00", "ping²", "__proto__", "constructor"]
EVENT_TYPES = ["message", "message", "note", "stream.append", "stream.end", "run.cancel",
               "run.steer", "approval.decision", "tool.result", "run.created", "run.state",
               "tool.call", "approval.request", "tether.schedule", "run.explode",
               "presence.join", "stream.bogus", "tether.x", "9lives", "a" * 65, "typ\n",
               "msg²", "x y", ""]
FIELDS = ["op", "id", "session", "cursor", "type", "data", "key", "transient", "state",
          "presence", "token", "client", "device", "kind", "tools", "run", "call", "stream"]


class Mutator:
    """Turns the corpus into frames and values with a seeded ``random.Random``."""

    def __init__(self, corpus: Corpus, rng: random.Random) -> None:
        self.corpus = corpus
        self.rng = rng
        self.cursors: list[str] = []  # real cursors seen in replies, shared by all peers
        self.runs: list[str] = ["run_x", "run_" + "0" * 12]
        self.tokens = [token(), token(), token(), token("fuzz", ["f*", "demo"], ["subscribe"]),
                       token("admin", caps=["admin"]), token(ttl=-5), token(secret=WRONG_SECRET),
                       "not.a.jwt", "", "x" * 5000]

    # values

    def nested(self, depth: int, binary: bool) -> Any:
        value: Any = self.rng.choice([1, "x", None, [], {}])
        for _ in range(depth):
            value = [value] if self.rng.random() < 0.5 else {"k": value}
        return value

    def string(self) -> str:
        rng = self.rng
        r = rng.random()
        if r < 0.35:
            return rng.choice(self.corpus.strings)
        if r < 0.6:
            return rng.choice(SPECIAL_STRINGS)
        if r < 0.8:
            return rng.choice(SESSIONS) + rng.choice(["", "", "\n", "²", " ", "*", "/x"])
        return "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randrange(1, 20)))

    def value(self, binary: bool) -> Any:
        rng = self.rng
        r = rng.random()
        if r < 0.45:
            return rng.choice(self.corpus.values)
        if r < 0.55:
            return self.string()
        if r < 0.62:
            return self.nested(rng.choice([5, 31, 32, 33, 64, 100, 200, 300]), binary)
        if r < 0.66:
            return rng.choice([2 ** 63, -(2 ** 63) - 1, 2 ** 64 - 1, 2 ** 64, 10 ** 30,
                               -(10 ** 40), math.nan, math.inf, -math.inf, -0.0, 1e308])
        if r < 0.68:
            return "x" * rng.choice([1000, 70_000, 260_000, 300_000])
        if binary and r < 0.78:
            return rng.choice([
                b"\x00\xff", b"", bytes(rng.randrange(256) for _ in range(8)),
                msgpack.ExtType(rng.randrange(128), b"ext"),
                msgpack.Timestamp(rng.randrange(2 ** 34), 0),
                {b"bytes-key": 1}, {"k": b"v"}, [b"a", msgpack.ExtType(5, b"")],
            ])
        return rng.choice([None, True, 0, -1, 1.5, [], {}, {"text": "hi"}, [1, [2, [3]]]])

    def session(self) -> Any:
        r = self.rng.random()
        if r < 0.75:
            return self.rng.choice(SESSIONS[:4])
        if r < 0.85:
            return self.rng.choice(SESSIONS)
        return self.value(False) if r < 0.9 else self.string()

    def cursor(self) -> Any:
        rng = self.rng
        base = rng.choice(self.cursors) if self.cursors else "AAAAAAAA:1"
        epoch, _, seq = base.rpartition(":")
        r = rng.random()
        if r < 0.3:
            return base
        if r < 0.45:
            return f"{epoch}:{seq}{rng.choice(ODD_CURSOR_TAILS)}"
        if r < 0.55:
            return f"{epoch}:{rng.choice(ODD_CURSOR_TAILS)}"
        if r < 0.62:
            return f"{epoch}:{int(seq) + rng.choice([1, 2, 1000, 10 ** 17])}" if seq.isascii() \
                and seq.isdigit() else base
        if r < 0.68:
            return epoch + rng.choice(["²", "\n", "é", ""]) + ":" + seq
        if r < 0.74:
            return "A" * rng.choice([8, 14, 32, 33]) + ":" + str(rng.randrange(0, 50))
        if r < 0.8:
            return None
        if r < 0.9:
            return rng.choice(self.corpus.strings)
        return self.value(False)

    def run_id(self) -> Any:
        r = self.rng.random()
        if r < 0.6:
            return self.rng.choice(self.runs)
        return self.string() if r < 0.85 else self.value(False)

    def control_data(self, event_type: str, binary: bool) -> Any:
        data: dict[str, Any] = {"run": self.run_id()}
        if event_type == "run.steer":
            data["text"] = self.string()
        elif event_type == "approval.decision":
            data.update(call=self.string(), approved=self.rng.choice([True, False, "yes", 1]),
                        arguments=self.value(binary))
        elif event_type == "tool.result":
            data.update(call=self.string(), result=self.value(binary))
        elif event_type == "run.cancel":
            data["reason"] = self.string()
        return data

    def event_data(self, event_type: str, binary: bool) -> Any:
        rng = self.rng
        if event_type in ("stream.append", "stream.end"):
            data = {"stream": rng.choice(["m1", "m2", "s" + str(rng.randrange(20)),
                                          self.string()]),
                    "text": rng.choice(["hel", "", self.string()])}
            if rng.random() < 0.3:
                data["role"] = self.value(binary)
            return data
        if event_type in ("run.cancel", "run.steer", "approval.decision", "tool.result"):
            return self.control_data(event_type, binary)
        return self.value(binary) if rng.random() < 0.7 else {"text": self.string()}

    # frames

    def base_frame(self, binary: bool) -> dict[str, Any]:
        rng = self.rng
        op = rng.choices(OPS, [3, 12, 5, 40, 8, 10, 4])[0]
        frame: dict[str, Any] = {"op": op}
        if rng.random() < 0.9:
            frame["id"] = rng.choice([rng.randrange(1, 10 ** 6), "r" + str(rng.randrange(999)),
                                      "x" * 65, -1, 0, 1.5, True, None, "²"])
        if op == "hello":
            frame.update(token=rng.choice(self.tokens), client=self.string(),
                         kind=rng.choice(["human", "agent", "robot", None]),
                         tools=rng.choice([[], ["a"], ["a", 1], "t", None]))
        elif op in ("attach", "detach", "ack", "presence.set", "publish"):
            frame["session"] = self.session()
        if op == "attach":
            frame["cursor"] = self.cursor()
            if rng.random() < 0.3:
                frame["presence"] = self.value(binary)
        elif op == "ack":
            frame["cursor"] = self.cursor()
        elif op == "presence.set":
            frame["state"] = rng.choice([self.value(binary), {"typing": self.value(binary)},
                                         {"k" * 300: 1}, self.nested(rng.randrange(1, 300),
                                                                      binary)])
        elif op == "publish":
            event_type = rng.choice(EVENT_TYPES) if rng.random() < 0.9 else self.string()
            frame.update(type=event_type, data=self.event_data(event_type, binary))
            if rng.random() < 0.3:
                frame["key"] = rng.choice(["k" + str(rng.randrange(50)), "", "k" * 129,
                                           self.string()])
            if rng.random() < 0.15:
                frame["transient"] = rng.choice([True, False, "yes", 1, None])
        return frame

    def mutate(self, frame: dict[str, Any], binary: bool) -> Any:
        rng = self.rng
        for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
            r = rng.random()
            if r < 0.45:
                frame[rng.choice(FIELDS)] = self.value(binary)
            elif r < 0.6 and frame:
                frame.pop(rng.choice(list(frame)), None)
            elif r < 0.75:
                frame["op"] = rng.choice(ODD_OPS) if rng.random() < 0.7 else self.value(binary)
            elif r < 0.85:
                frame[self.string()] = self.value(binary)
            elif r < 0.9:
                return rng.choice([[frame], "frame", 42, None, self.nested(300, binary)])
            elif binary and r < 0.95:
                frame[rng.choice([1, b"op", 2.5])] = "k"  # non-str keys
            else:
                frame["session"] = self.session()
        return frame

    def frame(self, binary: bool) -> tuple[bool, bytes]:
        """One input for a peer: (send as binary?, payload)."""
        rng = self.rng
        r = rng.random()
        if r < 0.01:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
            return (not valid_text(data) and rng.random() < 0.85) or rng.random() < 0.5, data
        obj = self.mutate(self.base_frame(binary), binary)
        data = encode_msgpack(obj) if binary else encode_json(obj, rng)
        r = rng.random()
        if r < 0.04:
            data = damage(data, rng)
            # Invalid UTF-8 in a text frame closes the connection (1007): now and then.
            binary = binary or (not valid_text(data) and rng.random() < 0.85)
        elif r < 0.05 and (not binary or valid_text(data) or rng.random() < 0.1):
            binary = not binary  # text on the binary codec and the other way round
        elif not binary and r < 0.08:
            data = rng.choice([b"\n", b" \r\n\t", b"\n\n"]) + data + b"\n"
        elif not binary and r < 0.1:
            data = data.replace(b'{"op"', b'{"op":"ping","op"', 1)  # duplicate keys
        return binary, data


def encode_json(obj: Any, rng: random.Random) -> bytes:
    """JSON with NaN, Infinity and big integers as Python writes them (not all valid JSON)."""
    try:
        text = json.dumps(obj, ensure_ascii=rng.random() < 0.3, allow_nan=True,
                          default=repr)
    except (ValueError, RecursionError, TypeError):
        text = repr(obj)
    return text.encode("utf-8", "surrogatepass")


def encode_msgpack(obj: Any) -> bytes:
    try:
        return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]
    except (OverflowError, ValueError, TypeError):
        # An integer beyond 64 bits: write the frame with it as a float.
        return msgpack.packb(_clip(obj), use_bin_type=True)  # type: ignore[no-any-return]


def _clip(obj: Any) -> Any:
    if isinstance(obj, int) and not isinstance(obj, bool) and not -(2 ** 63) <= obj < 2 ** 64:
        return float(obj)
    if isinstance(obj, dict):
        return {_clip(k): _clip(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clip(v) for v in obj]
    return obj


def damage(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        r = rng.random()
        if r < 0.3 and buf:
            del buf[rng.randrange(len(buf)):]
        elif r < 0.6 and buf:
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif r < 0.8:
            buf.insert(rng.randrange(len(buf) + 1), rng.randrange(256))
        else:
            buf += buf[: rng.randrange(len(buf) + 1)]
    return bytes(buf)


# --- the report -----------------------------------------------------------------------------


@dataclass
class FuzzReport:
    seed: int
    store: str
    ws_frames: int = 0
    http_requests: int = 0
    duration: float = 0.0
    connections: int = 0
    close_codes: collections.Counter[int] = field(default_factory=collections.Counter)
    error_codes: collections.Counter[str] = field(default_factory=collections.Counter)
    http_status: collections.Counter[int] = field(default_factory=collections.Counter)
    tracebacks: list[str] = field(default_factory=list)
    parser_rejections_logged: int = 0  # aiohttp's own ERROR records for unparsable requests
    parser_samples: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    lost_close_frames: int = 0  # 1006 seen after a frame refused with 1007 / 1009
    bystander_published: int = 0
    bystander_received: int = 0
    bystander_losses: int = 0
    log_events: int = 0

    @property
    def inputs(self) -> int:
        return self.ws_frames + self.http_requests

    def fail(self, message: str) -> None:
        if len(self.failures) < 200:
            self.failures.append(message)

    def summary(self) -> str:
        lines = [
            f"seed {self.seed}, store {self.store}: {self.inputs} inputs "
            f"({self.ws_frames} WebSocket frames on {self.connections} connections, "
            f"{self.http_requests} HTTP requests) in {self.duration:.1f} s "
            f"({self.inputs / max(self.duration, 1e-9):.0f}/s)",
            f"tracebacks: {len(self.tracebacks)} (and {self.parser_rejections_logged} ERROR "
            f"records of aiohttp's HTTP parser refusing a request)",
            f"bystander: {self.bystander_published} published, "
            f"{self.bystander_received} received, losses {self.bystander_losses}; "
            f"session log: {self.log_events} events, gapless",
            "close codes: " + ", ".join(f"{c}×{n}" for c, n in sorted(self.close_codes.items()))
            + f" (1006 right after a frame refused with 1007/1009: {self.lost_close_frames})",
            "HTTP status: " + ", ".join(f"{s}×{n}" for s, n in sorted(self.http_status.items())),
            "error frames: " + ", ".join(f"{c}×{n}" for c, n in self.error_codes.most_common()),
            f"failures: {len(self.failures)}",
        ]
        lines += ["  " + f for f in self.failures[:20]]
        lines += ["  traceback: " + t[:3000] for t in self.tracebacks[:5]]
        return "\n".join(lines)


class LogWatch(logging.Handler):
    """Keeps every ERROR record of the watched loggers (the server runs in this process)."""

    def __init__(self, report: FuzzReport) -> None:
        super().__init__(logging.ERROR)
        self.report = report
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        if record.name == "aiohttp.server" and isinstance(exc, HttpProcessingError):
            # aiohttp's HTTP parser refused the request line or headers (the client got a 400)
            # and logged it with a traceback: counted apart, see docs/security.md.
            self.report.parser_rejections_logged += 1
            if len(self.report.parser_samples) < 5:
                self.report.parser_samples.append(f"{type(exc).__name__}: {exc}")
            return
        self.count += 1
        text = f"{record.name}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + "".join(traceback.format_exception(*record.exc_info))
        if len(self.report.tracebacks) < 100:
            self.report.tracebacks.append(text)

    def __enter__(self) -> LogWatch:
        for name in WATCHED_LOGGERS:
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        for name in WATCHED_LOGGERS:
            logging.getLogger(name).removeHandler(self)


# --- WebSocket peers ------------------------------------------------------------------------

SYNC_EVERY = 40  # frames between pings: keeps errors-in-row below the 100 that close with 4504
AWAIT_EVERY = 400  # frames between waits for the ping's answer (in-flight bound, liveness)


class Harness:
    def __init__(self, server: Server, report: FuzzReport, corpus: Corpus, seed: int,
                 watch: LogWatch) -> None:
        self.server = server
        self.report = report
        self.corpus = corpus
        self.seed = seed
        self.watch = watch
        self.base = f"http://127.0.0.1:{server.port}"
        self.cursors: list[str] = []
        self.runs: list[str] = ["run_x"]
        self.deadline_hit = False

    def mutator(self, name: str) -> Mutator:
        m = Mutator(self.corpus, random.Random(f"{self.seed}-{name}"))
        m.cursors = self.cursors
        m.runs = self.runs
        return m

    async def ws_worker(self, wid: int, budget: int, http: aiohttp.ClientSession) -> None:
        binary = wid % 2 == 1
        proto = MSGPACK_PROTO if binary else JSON_PROTO
        codec_decode = (lambda b: msgpack.unpackb(b, raw=False)) if binary else orjson.loads
        m = self.mutator(f"ws-{wid}")
        rng = m.rng
        report = self.report
        sent = 0
        while sent < budget:
            offered = [proto] if rng.random() < 0.98 else rng.choice([[], ["tether.v2"], ["x"]])
            try:
                ws = await http.ws_connect(f"{self.base}/v1/ws", protocols=offered,
                                           max_msg_size=0, heartbeat=None, autoping=True)
            except aiohttp.WSServerHandshakeError as exc:
                if offered and proto not in offered and exc.status == 400:
                    # Refused before the upgrade, as documented: the offer was the input.
                    report.http_status[400] += 1
                    report.ws_frames += 1
                    sent += 1
                    continue
                report.fail(f"ws connect failed: {exc!r}")
                await asyncio.sleep(0.1)
                continue
            except (aiohttp.ClientError, OSError) as exc:
                report.fail(f"ws connect failed: {exc!r}")
                await asyncio.sleep(0.1)
                continue
            report.connections += 1
            transport = ws.get_extra_info("socket")
            port = transport.getsockname()[1] if transport is not None else None
            recent: collections.deque[bytes] = collections.deque(maxlen=50)
            waiting: dict[str, asyncio.Future[None]] = {}
            closed: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            ending: list[str] = []  # how the socket ended, when not with a close frame

            async def read(ws: aiohttp.ClientWebSocketResponse = ws,
                           waiting: dict[str, asyncio.Future[None]] = waiting,
                           closed: asyncio.Future[int] = closed,
                           ending: list[str] = ending) -> None:
                code = None
                try:
                    while True:
                        msg = await ws.receive()
                        if msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                            frame = codec_decode(msg.data)
                            op = frame.get("op")
                            if op == "error":
                                report.error_codes[frame.get("code")] += 1
                            elif op == "published" and frame.get("cursor"):
                                if len(self.cursors) < 2000:
                                    self.cursors.append(frame["cursor"])
                                else:
                                    self.cursors[rng.randrange(2000)] = frame["cursor"]
                            rid = frame.get("id")
                            if isinstance(rid, str) and rid in waiting:
                                fut = waiting.pop(rid)
                                if not fut.done():
                                    fut.set_result(None)
                            continue
                        if msg.type == aiohttp.WSMsgType.CLOSE:
                            code = int(msg.data)
                        else:
                            ending.append(f"{msg.type.name} {msg.data!r} {msg.extra!r}"[:300])
                        break
                finally:
                    if code is None:
                        code = ws.close_code if ws.close_code is not None else 1006
                    if not closed.done():
                        closed.set_result(code)
                    for fut in waiting.values():
                        if not fut.done():
                            fut.set_result(None)

            last_risk = 0
            reader = asyncio.ensure_future(read())
            hello = rng.random() < 0.93
            loop = asyncio.get_running_loop()

            async def sync(wait: bool, ws: aiohttp.ClientWebSocketResponse = ws,
                           waiting: dict[str, asyncio.Future[None]] = waiting,
                           loop: asyncio.AbstractEventLoop = loop) -> bool:
                """Send a ping; with ``wait``, False if it got no answer within 30 s."""
                rid = f"sync-{wid}-{report.ws_frames}"
                fut: asyncio.Future[None] = loop.create_future()
                waiting[rid] = fut
                await _send(ws, {"op": "ping", "id": rid}, binary)
                if not wait:
                    return True
                try:
                    await asyncio.wait_for(asyncio.shield(fut), 30)
                except TimeoutError:
                    return False
                return True

            try:
                if hello:
                    await _send(ws, {"op": "hello", "id": "h", "token": m.tokens[0],
                                     "client": f"fz-{wid}"}, binary)
                n_here = 0
                # Without hello every frame is an error: stay below the 100 that close (4504).
                conn_budget = rng.choice([200, 1000, 5000]) if hello else 90
                while sent < budget and n_here < conn_budget and not closed.done():
                    as_binary, payload = m.frame(binary)
                    if rng.random() < 0.001:  # beyond max_frame_bytes: 1009
                        payload = b'{"op":"publish","data":"' + b"x" * (1 << 20) + b'"}'
                    recent.append(payload)
                    if as_binary:
                        await ws.send_bytes(payload)
                    else:
                        await ws.send_frame(payload, aiohttp.WSMsgType.TEXT)
                    sent += 1
                    n_here += 1
                    report.ws_frames += 1
                    risk = may_close(as_binary, payload, hello)
                    last_risk = max(last_risk, risk)
                    if risk:
                        # Send nothing more until the server closed (or clearly did not): a
                        # frame sent into a socket the server is closing makes its kernel
                        # answer with a reset, which loses the close frame (1006 here).
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(asyncio.shield(closed), 5.0 if risk > 1 else 0.3)
                    elif n_here % SYNC_EVERY == 0 and not await sync(n_here % AWAIT_EVERY == 0):
                        report.fail(f"ws peer {wid}: no answer to a ping within 30 s; "
                                    f"last frames: {_show(recent)}")
                        break
            except (ConnectionError, aiohttp.ClientError, RuntimeError):
                pass  # the server closed the socket under a pipelined send; the code says why
            if not closed.done():
                rid = f"end-{wid}-{sent}"
                fut = asyncio.get_running_loop().create_future()
                waiting[rid] = fut
                with contextlib.suppress(ConnectionError, aiohttp.ClientError, RuntimeError):
                    await _send(ws, {"op": "ping", "id": rid}, binary)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(fut), 30)
                if not closed.done():
                    # Our close, written by hand: aiohttp's close() would race the reader's
                    # pending receive(). The reader gets the server's echo and its code.
                    with contextlib.suppress(ConnectionError, aiohttp.ClientError,
                                             RuntimeError):
                        await ws._writer.close(1000, b"done")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(closed), 10)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            await ws.close()
            code = closed.result() if closed.done() else 1006
            report.close_codes[code] += 1
            if code == 1006 and last_risk == 2:
                # aiohttp refused the frame at the WebSocket layer (1007 / 1009) and closed
                # the socket at once; the close frame was lost: see docs/security.md.
                report.lost_close_frames += 1
            elif code not in ALLOWED_CLOSES:
                report.fail(f"ws peer {wid} ({proto}, hello={hello}, port {port}) closed with "
                            f"{code} {ending}; last frames: {_show(recent)}")

    # --- HTTP -------------------------------------------------------------------------------

    def http_request(self, m: Mutator) -> tuple[str, str, dict[str, str], bytes | None]:
        rng = m.rng
        session = m.session() if rng.random() < 0.85 else m.string()
        if not isinstance(session, str):
            session = str(session)
        seg = _quote(session) if rng.random() < 0.9 else session.replace("/", "%2F")
        routes = [
            ("POST", f"/v1/sessions/{seg}/events", 20), ("GET", f"/v1/sessions/{seg}/events", 15),
            ("GET", f"/v1/sessions/{seg}/stream", 5), ("GET", f"/v1/sessions/{seg}/agui", 5),
            ("POST", f"/v1/sessions/{seg}/runs", 5), ("POST", f"/v1/sessions/{seg}/schedules", 4),
            ("GET", f"/v1/sessions/{seg}/schedules", 2),
            ("DELETE", f"/v1/sessions/{seg}/schedules/sch_{rng.randrange(99)}", 2),
            ("PUT", f"/v1/sessions/{seg}/webhook", 4), ("POST", "/v1/responses", 6),
            ("GET", "/v1/responses", 2), ("GET", f"/v1/responses/resp_{rng.randrange(99)}", 2),
            ("GET", "/healthz", 2), ("POST", "/v1/dev/login", 5), ("GET", "/v1/web/config", 2),
            ("GET", "/v1/web/sessions", 3), ("GET", "/metrics", 1), ("GET", "/v1/ws", 1),
            ("GET", f"/s/{seg}", 1),
            ("GET", f"/static/{rng.choice(['app.js', '.x', '..', 'nope'])}", 1),
            ("GET", f"/sdk/{rng.choice(['tether.js', 'x', '..%2Fx', 'README.md'])}", 1),
        ]
        method, path, _ = rng.choices(routes, [w for *_, w in routes])[0]
        r = rng.random()
        if r < 0.08:
            method = rng.choice(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS",
                                 "TRACE", "FOO"])
        elif r < 0.12:
            path = rng.choice([path + "/", path + "/x", path + "%00", path + "/..",
                               path.replace("/v1/", "/v1//"), "/v1/sessions/", "/v1/sessions",
                               path + "?" + "a=" * 2000])
        query: list[str] = []
        for _ in range(rng.choice([0, 0, 1, 2, 3])):
            name = rng.choice(["after", "limit", "compact", "token", "inherit", "x", "after"])
            value = rng.choice([m.cursor(), rng.choice(["1", "0", "1001", "-5", "1e3", "²",
                                                        "true", "", "NaN", "9" * 30]),
                                m.string(), rng.choice(m.tokens)])
            query.append(f"{name}={_quote(str(value))}")
        if query:
            path += ("&" if "?" in path else "?") + "&".join(query)
        headers: dict[str, str] = {}
        if rng.random() < 0.8:
            headers["Authorization"] = rng.choice(
                ["Bearer " + rng.choice(m.tokens), "bearer " + m.tokens[0],
                 "Basic Zm9vOmJhcg==", "Bearer", "Bearer  " + m.tokens[0] + " x"])
        if rng.random() < 0.15:
            headers["Last-Event-ID"] = _header(str(m.cursor()) + rng.choice(["", ".0", ".7",
                                                                              ".x", ".²"]))
        if rng.random() < 0.3:
            headers["Content-Type"] = rng.choice(["application/json", "text/plain", "",
                                                  "application/json; charset=latin-1",
                                                  "multipart/form-data; boundary=x"])
        if rng.random() < 0.1:
            headers[rng.choice(["Origin", "Host", "X-Forwarded-For", "X-Tether-Client",
                                "If-None-Match", "Accept", "Range"])] = _header(m.string())
        body: bytes | None = None
        if method in ("POST", "PUT", "PATCH", "DELETE") or rng.random() < 0.05:
            body = self.http_body(m, path)
        return method, path, headers, body

    def http_body(self, m: Mutator, path: str) -> bytes:
        rng = m.rng
        r = rng.random()
        if r < 0.05:
            return bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
        if r < 0.07:
            return b""
        if r < 0.075:
            return b'{"type":"message","data":"' + b"x" * (1 << 20) + b'"}'
        if "/events" in path:
            event_type = rng.choice(EVENT_TYPES)
            obj: Any = {"type": event_type, "data": m.event_data(event_type, False)}
            if rng.random() < 0.3:
                obj["key"] = rng.choice(["k1", "", "k" * 129, m.string()])
            if rng.random() < 0.1:
                obj["transient"] = rng.choice([True, "yes", None])
        elif "/runs" in path:
            obj = {"agent": rng.choice([None, "demo", m.string()]), "input": m.value(False)}
        elif "/schedules" in path:
            obj = {rng.choice(["every", "cron"]): rng.choice(
                [3600, 86400.5, 0, -1, 1e309, "5", None, True, "*/5 * * * *", "61 * * * *",
                 "@reboot", "* * * * * * *", m.string()]), "input": m.value(False)}
        elif "/webhook" in path:
            obj = {"url": rng.choice([None, "http://127.0.0.1:9/hook", "https://", "ftp://x",
                                      "http://[::1", m.string()]),
                   "secret": rng.choice([None, "s", 5, m.string()])}
        elif "/responses" in path:
            obj = {"model": rng.choice(["tether-simulated", "", "nope", None, m.string()]),
                   "input": rng.choice(["hi", [], [{"role": "user", "content": "hi"}],
                                        [{"type": "function_call_output", "call_id": "x"}],
                                        m.value(False)]),
                   "generate": rng.choice([False, False, True]),
                   "stream": rng.choice([False, True, "yes"])}
            for key in rng.sample(["previous_response_id", "tools", "tool_choice",
                                   "instructions", "temperature", "store", "stream_id"],
                                  rng.randrange(3)):
                obj[key] = m.value(False)
        elif "/login" in path:
            obj = {"name": rng.choice(["alice", "", " ", "a" * 40, "al\nice", m.string()])}
        else:
            obj = m.value(False)
        obj = m.mutate(obj, False) if isinstance(obj, dict) and rng.random() < 0.5 else obj
        data = encode_json(obj, rng)
        return damage(data, rng) if rng.random() < 0.05 else data

    async def http_worker(self, wid: int, budget: int, http: aiohttp.ClientSession) -> None:
        m = self.mutator(f"http-{wid}")
        report = self.report
        for _ in range(budget):
            method, path, headers, body = self.http_request(m)
            report.http_requests += 1
            shown = f"{method} {path[:300]!r} headers={headers!r} body={(body or b'')[:300]!r}"
            try:
                async with http.request(method, URL(self.base + path, encoded=True),
                                        headers=headers, data=body, allow_redirects=False,
                                        timeout=aiohttp.ClientTimeout(total=30)) as resp:
                    status = resp.status
                    report.http_status[status] += 1
                    if resp.content_type == "text/event-stream":
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(resp.content.readany(), 0.2)
                        resp.close()
                        text = b""
                    else:
                        text = await resp.read()
            except TimeoutError:
                report.fail(f"HTTP request hung for 30 s: {shown}")
                continue
            except aiohttp.ClientResponseError as exc:  # an answer aiohttp's client refuses
                status, text = exc.status, exc.message.encode()
                report.http_status[status] += 1
            except ValueError:  # aiohttp will not write a CR or LF in the request line
                report.http_status[0] += 1
                continue
            except (aiohttp.ClientError, OSError) as exc:
                # aiohttp refuses some inputs itself (a method it cannot write); others mean
                # the server dropped the connection, which no request may cause.
                if isinstance(exc, aiohttp.InvalidURL | aiohttp.ClientPayloadError) \
                        or "header" in str(exc).lower():
                    report.http_status[0] += 1
                else:
                    report.fail(f"HTTP connection failed ({exc!r}): {shown}")
                continue
            if status >= 500 and not (status == 503 and path.startswith("/healthz")):
                report.fail(f"HTTP {status} {text[:300]!r}: {shown}")

    # --- the bystander ----------------------------------------------------------------------

    async def bystander(self, stop: asyncio.Event) -> tuple[int, list[int]]:
        """Publishes 0, 1, 2 … into the fuzzed session with the SDK, and reads them back."""
        received: list[int] = []
        published = 0
        async with tether.Client(f"ws://127.0.0.1:{self.server.port}",
                                 token=token("bystander"), backoff_cap=1.0) as client:
            session = await client.attach(BYSTANDER_SESSION)

            async def receive() -> None:
                async for item in session:
                    if isinstance(item, tether.SessionEvent):
                        if item.sender.sub == "bystander" and item.type == "message":
                            received.append(item.data["n"])
                    else:
                        self.report.fail(f"bystander got {item!r} (not an event)")

            receiver = asyncio.ensure_future(receive())
            while not stop.is_set():
                await session.publish("message", {"n": published})
                published += 1
                await asyncio.sleep(0.002)
            deadline = time.monotonic() + 30
            while len(received) < published and time.monotonic() < deadline \
                    and not receiver.done():
                await asyncio.sleep(0.02)
            receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await receiver
        return published, received

    async def check_log(self, http: aiohttp.ClientSession) -> tuple[int, list[int]]:
        """Reads the bystander's session over HTTP: seqs must be 1, 2, 3 … with no gap."""
        after = ""
        seqs: list[int] = []
        ours: list[int] = []
        headers = {"Authorization": "Bearer " + token("reader", caps=["subscribe"])}
        while True:
            url = f"{self.base}/v1/sessions/{BYSTANDER_SESSION}/events?limit=1000"
            async with http.get(url + (f"&after={after}" if after else ""),
                                headers=headers) as resp:
                page = await resp.json()
            for event in page["events"]:
                seqs.append(event["seq"])
                if event["sender"]["sub"] == "bystander" and event["type"] == "message":
                    ours.append(event["data"]["n"])
            if not page["more"]:
                break
            after = page["cursor"]
        if seqs != list(range(1, len(seqs) + 1)):
            missing = sorted(set(range(1, (max(seqs) if seqs else 0) + 1)) - set(seqs))
            self.report.fail(f"the session log has gaps or repeats: missing seqs "
                             f"{missing[:20]}, {len(seqs)} events read")
        return len(seqs), ours


async def _send(ws: aiohttp.ClientWebSocketResponse, frame: dict[str, Any],
                binary: bool) -> None:
    if binary:
        await ws.send_bytes(msgpack.packb(frame, use_bin_type=True))
    else:
        await ws.send_str(orjson.dumps(frame).decode())


def valid_text(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def may_close(binary: bool, payload: bytes, hello_sent: bool) -> int:
    """2 if the server closes the socket because of this frame, 1 if it may, else 0."""
    if len(payload) > 1 << 20:
        return 2  # 1009
    if not binary and not valid_text(payload):
        return 2  # 1007
    return int(not hello_sent and b"hello" in payload)  # 4500, 4501


def _show(recent: collections.deque[bytes]) -> str:
    return repr([p[:200] for p in list(recent)[-8:]])


def _quote(text: str) -> str:
    return quote(text, safe="")


def _header(text: str) -> str:
    return "".join(c for c in text if 0x20 <= ord(c) < 0x7F) or "x"


# --- running --------------------------------------------------------------------------------


async def run_fuzz(inputs: int, seed: int, *, store: str = "sqlite", data_dir: Path | None = None,
                   http_share: float = 0.15, ws_peers: int = 6, http_workers: int = 6,
                   examples: int = 300) -> FuzzReport:
    """Fuzz a fresh server with ``inputs`` inputs (WebSocket frames + HTTP requests)."""
    report = FuzzReport(seed, store)
    corpus = hypothesis_corpus(seed, examples)
    with contextlib.ExitStack() as stack:
        if data_dir is None:
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fuzz-")))
        config = ServerConfig(port=0, secret=SECRET, data_dir=data_dir,
                              store_url=f"sqlite://{data_dir / 'data'}" if store == "sqlite"
                              else "memory://")
        srv = Server(config, store=MemoryStore(Retention()) if store == "memory" else None)
        watch = stack.enter_context(LogWatch(report))
        await srv.start()
        try:
            await _drive(srv, report, corpus, seed, watch, inputs, http_share, ws_peers,
                         http_workers)
        finally:
            await srv.stop()
    return report


async def _drive(srv: Server, report: FuzzReport, corpus: Corpus, seed: int, watch: LogWatch,
                 inputs: int, http_share: float, ws_peers: int, http_workers: int) -> None:
    harness = Harness(srv, report, corpus, seed, watch)
    n_http = int(inputs * http_share)
    n_ws = inputs - n_http
    stop = asyncio.Event()
    started = time.monotonic()
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as http:
        bystander = asyncio.ensure_future(harness.bystander(stop))
        await asyncio.sleep(0.2)
        workers = [harness.ws_worker(i, n_ws // ws_peers + (i < n_ws % ws_peers), http)
                   for i in range(ws_peers)]
        workers += [harness.http_worker(i, n_http // http_workers + (i < n_http % http_workers),
                                        http) for i in range(http_workers)]
        results = await asyncio.gather(*workers, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                report.fail("a fuzz worker crashed: " + "".join(
                    traceback.format_exception(result))[-2000:])
        stop.set()
        published, received = await bystander
        report.duration = time.monotonic() - started
        report.bystander_published = published
        report.bystander_received = len(received)
        expected = list(range(published))
        if received != expected:
            report.bystander_losses = len(set(expected) - set(received))
            report.fail(f"bystander: published {published}, received {len(received)} "
                        f"(missing {sorted(set(expected) - set(received))[:10]}, "
                        f"duplicates {len(received) - len(set(received))}, "
                        f"in order {received == sorted(received)})")
        report.log_events, ours = await harness.check_log(http)
        if ours != expected:
            report.fail(f"bystander events in the log: {len(ours)} of {published}, in order "
                        f"{ours == sorted(ours)}")
        async with http.get(f"{harness.base}/healthz") as resp:
            if resp.status != 200:
                report.fail(f"/healthz answers {resp.status} after the run")
    if report.tracebacks:
        report.fail(f"{len(report.tracebacks)} ERROR log records (tracebacks) from the server")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--store", choices=["sqlite", "memory"], default="sqlite")
    parser.add_argument("--http-share", type=float, default=0.15)
    parser.add_argument("--ws-peers", type=int, default=6)
    parser.add_argument("--http-workers", type=int, default=6)
    parser.add_argument("--chunk", type=int, default=100_000,
                        help="inputs per fresh server (each chunk uses seed, seed+1, …)")
    args = parser.parse_args()
    total = FuzzReport(args.seed, args.store)
    done = 0
    chunk_seed = args.seed
    while done < args.inputs:
        n = min(args.chunk, args.inputs - done)
        report = asyncio.run(run_fuzz(n, chunk_seed, store=args.store,
                                      http_share=args.http_share, ws_peers=args.ws_peers,
                                      http_workers=args.http_workers))
        print(report.summary(), flush=True)
        _merge(total, report)
        done += n
        chunk_seed += 1
    print("\n=== total ===")
    print(total.summary())
    sys.exit(1 if total.failures else 0)


def _merge(total: FuzzReport, part: FuzzReport) -> None:
    total.ws_frames += part.ws_frames
    total.http_requests += part.http_requests
    total.duration += part.duration
    total.connections += part.connections
    total.close_codes.update(part.close_codes)
    total.error_codes.update(part.error_codes)
    total.http_status.update(part.http_status)
    total.tracebacks += part.tracebacks
    total.parser_rejections_logged += part.parser_rejections_logged
    total.parser_samples = (total.parser_samples + part.parser_samples)[:5]
    total.failures += [f"(seed {part.seed}) {f}" for f in part.failures]
    total.lost_close_frames += part.lost_close_frames
    total.bystander_published += part.bystander_published
    total.bystander_received += part.bystander_received
    total.bystander_losses += part.bystander_losses
    total.log_events += part.log_events


if __name__ == "__main__":
    main()
