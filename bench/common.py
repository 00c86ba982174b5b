"""Shared plumbing for the benchmarks: pinning, server subprocesses, a raw protocol client, stats.

Method (see ``docs/benchmarks.md``): the server under test runs as a subprocess pinned to core 0
(``taskset -c 0``), the load generator runs in this process pinned to core 1, uvloop everywhere,
~100-byte JSON deltas, compression off. Every benchmark measures its baseline in the same run and
reports ratios, because absolute figures drift with the machine.

The load generator is picows (a Cython WebSocket client): it costs the client core far less per
frame than aiohttp's client, so the server, not the client, is what gets measured. It speaks the
tether wire protocol by hand; nothing from ``tests/`` is imported.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

try:
    import picows
except ImportError:  # pragma: no cover - a clear message instead of a traceback
    sys.exit("the benchmarks need picows as their load generator: pip install -r "
             "bench/requirements.txt")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SECRET = "bench-secret-" + "x" * 32
ALL_CAPS = ["subscribe", "publish", "presence"]
# Override with BENCH_SERVER_CORE / BENCH_CLIENT_CORE when core 0 is busy with something else.
SERVER_CORE = int(os.environ.get("BENCH_SERVER_CORE", "0"))
CLIENT_CORE = int(os.environ.get("BENCH_CLIENT_CORE", "1"))
JSON_SUBPROTOCOL = "tether.v1.json"

# ~100 bytes of JSON once encoded, like a model's token delta with its bookkeeping.
DELTA_TEXT = "hello world, this is one token delta of a model stream "


# --- machine ------------------------------------------------------------------------------------

def can_pin() -> bool:
    return (hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2
            and shutil.which("taskset") is not None)


def pin_self(core: int = CLIENT_CORE) -> None:
    """Pin this process (and the children it spawns without taskset) to ``core``."""
    if can_pin():
        os.sched_setaffinity(0, {core})


def pinned(cmd: Sequence[str], core: int = SERVER_CORE) -> list[str]:
    return ["taskset", "-c", str(core), *cmd] if can_pin() else list(cmd)


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def install_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def realtime() -> None:
    """``BENCH_REALTIME=1``: run the benchmark, and so every server it starts (children inherit
    the policy), under ``SCHED_RR``, ahead of every ordinary process of the machine. On a machine
    saturated by other work this measures what a quiet one would show, alike for tether and its
    baselines; the kernel still keeps 5 % of each core for the others (``sched_rt_runtime_us``).
    Needs root (or CAP_SYS_NICE); said in the results (``machine.scheduler``)."""
    if os.environ.get("BENCH_REALTIME") and hasattr(os, "sched_setscheduler"):
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(10))


def setup() -> None:
    """What every benchmark does first: file descriptors, core 1, uvloop, the scheduler."""
    raise_nofile()
    pin_self()
    install_uvloop()
    realtime()


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    from importlib import metadata

    versions: dict[str, str] = {}
    for name in ("aiohttp", "picows", "uvloop", "orjson", "redis", "python-socketio",
                 "uvicorn", "websockets"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    load = ""
    with contextlib.suppress(OSError):
        load = Path("/proc/loadavg").read_text().strip()
    return {"cpus": os.cpu_count(), "cpu": model, "loadavg_at_end": load,
            "python": platform.python_version(), "platform": platform.platform(),
            "pinned": can_pin(), "scheduler": _scheduler(), "versions": versions}


def _scheduler() -> str:
    if not hasattr(os, "sched_getscheduler"):
        return ""
    policy = os.sched_getscheduler(0)
    return {os.SCHED_OTHER: "other", os.SCHED_RR: "rr"}.get(policy, str(policy))


# --- processes ----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30.0,
                  proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of process ``pid`` and its descendants (``tether serve --workers N``)."""
    total = cpu_seconds(pid)
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                with contextlib.suppress(OSError):
                    total += tree_cpu_seconds(int(child))
    return total


def tree_cpu_by_pid(pid: int) -> dict[int, float]:
    """CPU seconds of process ``pid`` and of each of its descendants, by pid."""
    found = {pid: cpu_seconds(pid)}
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                with contextlib.suppress(OSError):
                    found.update(tree_cpu_by_pid(int(child)))
    return found


def _core_ticks() -> list[tuple[int, int]]:
    """(total, idle + iowait) ticks of each core since boot, from /proc/stat."""
    ticks = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("cpu") and line[3:4].isdigit():
                values = [int(v) for v in line.split()[1:]]
                ticks.append((sum(values), values[3] + values[4]))
    return ticks


class CpuWindow:
    """Where the CPU went during a measured window, process by process.

    The server's processes are read from ``/proc/PID/stat`` (all threads of each): the root
    is the server itself, or with ``--workers N`` the supervisor, which is the sequencer that
    owns SQLite; its children are the workers. The load generator is this process
    (``time.process_time``), and the machine's cores are read from ``/proc/stat``, which also
    counts whatever else runs on the machine. ``stop`` gives CPU-seconds per process and per
    event, and the rate the design would reach with a core for each process:
    1 / (the largest CPU-seconds per event of any one process).
    """

    def __init__(self, server: Proc | None, workers: int = 1) -> None:
        self.server = server
        self.workers = workers

    def start(self) -> CpuWindow:
        self.t0 = time.perf_counter()
        self.own0 = time.process_time()
        self.pids0 = tree_cpu_by_pid(self.server.pid) if self.server is not None else {}
        self.cores0 = _core_ticks()
        return self

    def stop(self, events: float) -> dict[str, Any]:
        """The window's figures; ``events``: what one event is for this benchmark, counted."""
        elapsed = time.perf_counter() - self.t0
        own = time.process_time() - self.own0
        pids1 = tree_cpu_by_pid(self.server.pid) if self.server is not None else {}
        cores1 = _core_ticks()
        root = self.server.pid if self.server is not None else -1
        processes = []
        for pid in sorted(pids1, key=lambda p: (p != root, p)):
            if pid not in self.pids0:
                continue  # started during the window (a restart): not comparable
            role = ("sequencer" if self.workers > 1 else "server") if pid == root else "worker"
            processes.append({"role": role, "pid": pid, "cpu_s": pids1[pid] - self.pids0[pid]})
        n = 0
        for p in processes:
            if p["role"] == "worker":
                n += 1
                p["role"] = f"worker {n}"
        per = max(events, 1)
        for p in processes:
            p["busy"] = p["cpu_s"] / elapsed
            p["us_per_event"] = p["cpu_s"] / per * 1e6
        busy = [1 - (i1 - i0) / (t1 - t0) if t1 > t0 else 0.0
                for (t0, i0), (t1, i1) in zip(self.cores0, cores1, strict=False)]
        server_s = sum(p["cpu_s"] for p in processes)
        stages = [p["us_per_event"] for p in processes]
        return {
            "elapsed": elapsed, "events": events, "processes": processes,
            "server_busy": server_s / elapsed, "server_us_per_event": server_s / per * 1e6,
            "client_busy": own / elapsed, "client_us_per_event": own / per * 1e6,
            # What the benchmark's own processes used, in cores, and what /proc/stat saw on
            # every core (ours and anything else running).
            "ours_busy": (server_s + own) / elapsed, "cores_busy": busy,
            "machine_busy": sum(busy),
            # A core per server process: the busiest stage per event sets the rate.
            "core_per_process_rate": 1e6 / max(stages) if stages and max(stages) > 0
            else float("nan"),
        }


def cpu_summary(windows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Medians over runs of :meth:`CpuWindow.stop` figures, process roles matched by name."""
    if not windows:
        return {}
    keys = ("server_busy", "server_us_per_event", "client_busy", "client_us_per_event",
            "ours_busy", "machine_busy", "core_per_process_rate")
    out: dict[str, Any] = {k: median([w[k] for w in windows]) for k in keys}
    roles: dict[str, list[dict[str, Any]]] = {}
    for w in windows:
        for p in w["processes"]:
            roles.setdefault(p["role"], []).append(p)
    out["processes"] = {role: {k: median([p[k] for p in ps])
                               for k in ("busy", "us_per_event")}
                        for role, ps in roles.items()}
    return out


def cpu_rows(name: str, s: dict[str, Any]) -> list[list[Any]]:
    """Table rows (system, process, busy, µs per event) for one :func:`cpu_summary`."""
    rows: list[list[Any]] = [[name, role, f"{p['busy']:.0%}", p["us_per_event"]]
                             for role, p in s["processes"].items()]
    rows.append([name, "load generator (clients)", f"{s['client_busy']:.0%}",
                 s["client_us_per_event"]])
    rows.append([name, "server + clients / all cores busy",
                 f"{s['ours_busy']:.0%} / {s['machine_busy']:.0%}", ""])
    rows.append([name, "a core per server process: events/s", "",
                 s["core_per_process_rate"]])
    return rows


def child_env() -> dict[str, str]:
    """The environment for child processes: unbuffered, with this checkout importable."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}


class Proc:
    """A server subprocess pinned to the server core; its output goes to a log file."""

    def __init__(self, name: str, cmd: Sequence[str], port: int,
                 env: dict[str, str] | None = None, workdir: Path | None = None) -> None:
        self.name = name
        self.cmd = pinned(cmd)
        self.port = port
        self.env = {**child_env(), **(env or {})}
        self._tmp = tempfile.TemporaryDirectory(prefix=f"bench-{name}-")
        self.dir = workdir or Path(self._tmp.name)
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_text: str | None = None  # a log line that says the server is all up

    def start(self) -> Proc:
        self.log_path = Path(self._tmp.name) / "server.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=self._log,
                                     env=self.env, cwd=ROOT)
        try:
            wait_for_port(self.port, 30, self.proc)
            # --workers N: the port answers once one worker listens; all do at this line.
            while self.ready_text and self.ready_text not in self.log_tail(50):
                if self.proc.poll() is not None:
                    raise RuntimeError("exited")
                time.sleep(0.05)
        except Exception:
            self.stop()
            raise RuntimeError(f"{self.name} did not start:\n{self.log_tail()}") from None
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss(self) -> int:
        """Resident set size in bytes."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.pid)

    def log_tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if hasattr(self, "_log"):
            self._log.close()

    def cleanup(self) -> None:
        self.stop()
        if os.environ.get("BENCH_KEEP_LOGS"):
            tail = self.log_tail(50)
            if tail:
                print(f"--- {self.name} log ---\n{tail}", file=sys.stderr, flush=True)
        self._tmp.cleanup()

    def __enter__(self) -> Proc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


# Server knobs for load tests: no per-connection publish limit, no compression.
TETHER_LOAD_ENV = {
    "TETHER_PUBLISH_RATE": "1e9",
    "TETHER_PUBLISH_BURST": "1000000000",
    "TETHER_SUBJECT_PUBLISH_RATE": "0",
    "TETHER_SUBJECT_ATTACH_RATE": "0",
    "TETHER_SUBJECT_CONNECTIONS": "0",
    "TETHER_SUBJECT_STREAMS": "0",
    "TETHER_COMPRESSION": "false",
}


def tether_server(store: str | None = None, env: dict[str, str] | None = None,
                  workers: int = 1) -> Proc:
    """``python -m tether serve`` on a free port, SQLite in a temp dir unless ``store``.

    ``workers`` > 1 runs ``--workers N`` on every core: it is there to use them all (on a
    2-core machine it shares the client's core; see docs/benchmarks.md, "--workers"). Said
    explicitly, since a child inherits this process's pinning to the client core.
    """
    port = free_port()
    proc = Proc("tether", [], port, {**TETHER_LOAD_ENV, **(env or {})})
    # BENCH_TETHER_WRAPPER=script.py runs the server through a script that patches it first
    # (see bench/experiments/): how a suggested server change is measured before it is made.
    wrapper = os.environ.get("BENCH_TETHER_WRAPPER")
    entry = [str(Path(wrapper).resolve())] if wrapper else ["-m", "tether"]
    cmd = [sys.executable, *entry, "serve", "--port", str(port),
           "--data", str(proc.dir / "data"), "--secret", SECRET, "--log-level", "warning"]
    cmd += ["--workers", str(workers)]
    if store:
        cmd += ["--store", store]
    every_core = f"0-{(os.cpu_count() or 1) - 1}"
    proc.cmd = pinned(cmd) if workers == 1 else ["taskset", "-c", every_core, *cmd] \
        if can_pin() else cmd
    if workers > 1:
        proc.ready_text = "tether serving on"
    return proc


def bare_server(mode: str, *args: str) -> Proc:
    """A baseline server from :mod:`bench.baselines` (``mode``: see that module)."""
    port = free_port()
    return Proc(f"bare-{mode}", [sys.executable, "-m", "bench.baselines", mode,
                                 "--port", str(port), *args], port)


def token(sub: str = "bench", caps: list[str] | None = None, sessions: list[str] | None = None
          ) -> str:
    from tether.server.auth import issue_token

    return issue_token(SECRET, sub, sessions or ["*"], ALL_CAPS if caps is None else caps,
                       24 * 3600)


# --- a raw protocol client on picows ------------------------------------------------------------

TEXT = picows.WSMsgType.TEXT
EVENT_PREFIX = b'{"op":"event"'
PUBLISHED_PREFIX = b'{"op":"published"'


class Conn(picows.WSListener):  # type: ignore[misc]
    """One client WebSocket speaking tether v1 JSON by hand.

    Event and ``published`` frames are only counted (and handed to ``on_event`` / ``on_ack`` when
    set) without decoding, so the client spends as little as possible per frame; every other
    frame is decoded and either answers a pending request or lands in ``other``.
    """

    def __init__(self) -> None:
        self.transport: Any = None
        self.events = 0
        self.acks = 0
        self.errors: list[dict[str, Any]] = []
        self.other: list[dict[str, Any]] = []
        self.on_event: Callable[[bytes], None] | None = None
        self.on_ack: Callable[[bytes], None] | None = None
        self.on_frame: Callable[[bytes], None] | None = None  # replaces all parsing when set
        self._replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self.disconnected: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_ws_connected(self, transport: Any) -> None:
        self.transport = transport

    def on_ws_disconnected(self, transport: Any) -> None:
        if not self.disconnected.done():
            self.disconnected.set_result(None)
        for future in self._replies.values():
            if not future.done():
                future.set_exception(ConnectionError("disconnected"))

    def on_ws_frame(self, transport: Any, frame: Any) -> None:
        if frame.msg_type is not TEXT:
            if frame.msg_type == picows.WSMsgType.CLOSE:
                transport.send_close(frame.get_close_code())
                transport.disconnect()
            return
        data = frame.get_payload_as_bytes()
        if self.on_frame is not None:
            self.on_frame(data)
            return
        if data.startswith(EVENT_PREFIX):
            self.events += 1
            if self.on_event is not None:
                self.on_event(data)
            return
        if data.startswith(PUBLISHED_PREFIX):
            self.acks += 1
            if self.on_ack is not None:
                self.on_ack(data)
            return
        msg = orjson.loads(data)
        if msg.get("op") == "error":
            self.errors.append(msg)
        future = self._replies.pop(msg.get("id"), None) if "id" in msg else None
        if future is not None and not future.done():
            future.set_result(msg)
        else:
            self.other.append(msg)

    def send_bytes(self, data: bytes) -> None:
        self.transport.send(TEXT, data)

    def send(self, frame: dict[str, Any]) -> None:
        self.transport.send(TEXT, orjson.dumps(frame))

    def next_id(self) -> int:
        return next(self._ids)

    async def request(self, frame: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        rid = self.next_id()
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[rid] = future
        self.send({**frame, "id": rid})
        reply = await asyncio.wait_for(future, timeout)
        if reply.get("op") == "error":
            raise RuntimeError(f"{frame['op']} failed: {reply}")
        return reply

    async def hello(self, tok: str | None = None) -> dict[str, Any]:
        return await self.request({"op": "hello", "token": tok or token(), "kind": "agent"})

    async def attach(self, session: str, cursor: str | None = None) -> dict[str, Any]:
        return await self.request({"op": "attach", "session": session, "cursor": cursor})

    def close(self) -> None:
        if self.transport is not None and not self.disconnected.done():
            self.transport.send_close(picows.WSCloseCode.OK)
            self.transport.disconnect()


async def connect(port: int, path: str = "/v1/ws", subprotocol: str | None = JSON_SUBPROTOCOL,
                  factory: Callable[[], Conn] = Conn, timeout: float = 30.0) -> Any:
    headers = {"Sec-WebSocket-Protocol": subprotocol} if subprotocol else None
    _, listener = await picows.ws_connect(factory, f"ws://127.0.0.1:{port}{path}",
                                          extra_headers=headers,
                                          websocket_handshake_timeout=timeout)
    return listener


async def gather_limited(coros: Sequence[Any], limit: int = 100) -> list[Any]:
    """Await ``coros`` with at most ``limit`` running at once, in order."""
    semaphore = asyncio.Semaphore(limit)

    async def run(coro: Any) -> Any:
        async with semaphore:
            return await coro

    return list(await asyncio.gather(*(run(c) for c in coros)))


async def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.005,
                     what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(step)


# --- statistics and reports ---------------------------------------------------------------------

def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of ``values`` (0 < p <= 100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-p * len(ordered) // 100))))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[fmt(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w)
                               for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_results(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    body = {"benchmark": name, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine(), **payload}
    path.write_bytes(orjson.dumps(body, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    return path


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="one short run (smoke test)")
    p.add_argument("--runs", type=int, default=None, help="runs per system (default 3)")
    return p


def runs(args: argparse.Namespace) -> int:
    return int(args.runs or (1 if args.quick else 3))


@contextlib.contextmanager
def timer() -> Iterator[Callable[[], float]]:
    start = time.perf_counter()
    yield lambda: time.perf_counter() - start


class CountingConn(Conn):
    """A client of a baseline server: every text frame counts as an event."""

    def on_ws_frame(self, transport: Any, frame: Any) -> None:
        if frame.msg_type is TEXT:
            self.events += 1
            if self.on_event is not None:
                self.on_event(frame.get_payload_as_bytes())
        elif frame.msg_type == picows.WSMsgType.CLOSE:
            transport.disconnect()


class SocketIOConn(Conn):
    """A raw Engine.IO v4 / Socket.IO v5 client over the websocket transport.

    Answers the server's pings, counts ``42`` (event) frames as events and ``43`` (ack) frames
    as acks.
    """

    def __init__(self) -> None:
        super().__init__()
        self.connected: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_ws_frame(self, transport: Any, frame: Any) -> None:
        if frame.msg_type is not TEXT:
            if frame.msg_type == picows.WSMsgType.CLOSE:
                transport.disconnect()
            return
        data = frame.get_payload_as_bytes()
        if data.startswith(b"42"):
            self.events += 1
            if self.on_event is not None:
                self.on_event(data)
        elif data.startswith(b"43"):
            self.acks += 1
            if self.on_ack is not None:
                self.on_ack(data)
        elif data == b"2":
            transport.send(TEXT, b"3")
        elif data.startswith(b"40"):
            if not self.connected.done():
                self.connected.set_result(None)
        elif data.startswith(b"0"):
            transport.send(TEXT, b"40")
        else:
            self.other.append({"raw": data})


SOCKETIO_PATH = "/socket.io/?EIO=4&transport=websocket"


async def socketio_connect(port: int, timeout: float = 30.0) -> SocketIOConn:
    conn: SocketIOConn = await connect(port, SOCKETIO_PATH, None, SocketIOConn, timeout)
    await asyncio.wait_for(conn.connected, timeout)
    return conn


class WindowedPublisher:
    """Sends ``payload`` over and over with at most ``window`` unacknowledged.

    Each acknowledgement sends the next message from the receive callback itself, so the
    publisher costs one send per ack and never sleeps. With ``limit``, it sends that many in
    all and resolves ``done`` when the last is acknowledged.
    """

    def __init__(self, conn: Conn, payload: bytes, window: int, hook: str = "on_ack",
                 limit: int | None = None) -> None:
        self.conn = conn
        self.payload = payload
        self.window = window
        self.limit = limit
        self.sent = 0
        self.acked = 0
        self.last_ack = b""
        self.running = False
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        setattr(conn, hook, self._on_ack)

    def start(self) -> None:
        self.running = True
        for _ in range(self.window - (self.sent - self.acked)):
            self._send()

    def _send(self) -> None:
        if self.limit is not None and self.sent >= self.limit:
            return
        self.sent += 1
        self.conn.transport.send(TEXT, self.payload)

    def _on_ack(self, data: bytes) -> None:
        self.acked += 1
        self.last_ack = data
        if self.running:
            self._send()
        if self.limit is not None and self.acked >= self.limit and not self.done.done():
            self.done.set_result(None)

    def stop(self) -> None:
        self.running = False

    @property
    def inflight(self) -> int:
        return self.sent - self.acked


def start_profile(proc: Proc | int, path: str | None, seconds: float
                  ) -> subprocess.Popen[bytes] | None:
    """Sample ``proc`` with py-spy for ``seconds`` into ``path`` (``.svg``: flame graph, else
    collapsed stacks). Profiled runs are for diagnosis: py-spy takes CPU from the client core.
    """
    if not path:
        return None
    spy = shutil.which("py-spy")
    if spy is None:
        print("--profile needs py-spy: pip install py-spy", file=sys.stderr)
        return None
    fmt = "flamegraph" if path.endswith(".svg") else "raw"
    # BENCH_PROFILE_NATIVE=1 adds C frames (but inflates syscalls: ptrace interrupts them).
    native = ["--native"] if os.environ.get("BENCH_PROFILE_NATIVE") else []
    rate = os.environ.get("BENCH_PROFILE_RATE", "250")
    # --nonblocking: py-spy otherwise stops the server for every sample, which at 10k paced
    # events/s is enough to put it seconds behind and profile a backlog instead of the load.
    return subprocess.Popen(
        pinned([spy, "record", "--pid", str(proc if isinstance(proc, int) else proc.pid),
                "--duration", str(max(1, round(seconds))), "--nonblocking",
                "--rate", rate, "--format", fmt, "-o", path, *native], CLIENT_CORE),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def add_profile_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", metavar="PATH", default=None,
                   help="py-spy the tether server during the first run's measured window into "
                        "PATH (.svg flame graph, else collapsed stacks); needs py-spy")


def cpu_busy(interval: float = 0.5) -> list[float]:
    """Busy fraction of each core over ``interval`` (from /proc/stat), all processes."""
    def sample() -> dict[str, tuple[int, int]]:
        out = {}
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("cpu") and line[3:4].isdigit():
                name, *values = line.split()
                ticks = [int(v) for v in values]
                out[name] = (sum(ticks), ticks[3] + ticks[4])  # total, idle + iowait
        return out

    try:
        a = sample()
        time.sleep(interval)
        b = sample()
    except OSError:
        return []
    busy = []
    for name in sorted(a, key=lambda n: int(n[3:])):
        total = b[name][0] - a[name][0]
        idle = b[name][1] - a[name][1]
        busy.append(1 - idle / total if total else 0.0)
    return busy


def settle(max_wait: float | None = None, threshold: float = 0.25) -> list[float]:
    """Wait (at most ``max_wait`` s, env ``BENCH_SETTLE``, default 5) until no core is more
    than ``threshold`` busy with other work; return the last reading. Call between runs, while
    nothing of the benchmark is running: the machine is shared and its noise is not ours."""
    if max_wait is None:
        max_wait = float(os.environ.get("BENCH_SETTLE", "5"))
    deadline = time.monotonic() + max_wait
    while True:
        busy = cpu_busy()
        if not busy or max(busy) <= threshold or time.monotonic() >= deadline:
            return [round(b, 2) for b in busy]
