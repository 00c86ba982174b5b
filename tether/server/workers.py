"""``tether serve --workers N``: N worker processes on one port, and their supervisor.

The supervisor is the process that was started. It never serves a client; it

* holds the port: a bound (not listening) socket with ``SO_REUSEPORT``, so the workers, which
  bind the same port with ``SO_REUSEPORT`` and listen, share the kernel's spread of new
  connections and nobody else can take the port while a worker restarts;
* with the embedded store (SQLite, or memory), is the *sequencer*: it owns the store and serves
  it to every worker through a :class:`~tether.store.shared.StoreHost`, one Unix socket pair per
  worker. Workers hold a :class:`~tether.store.shared.SharedStore`, so they are to the
  sequencer what nodes are to Redis (see ``docs/architecture.md``, "Workers"). With Redis there
  is no sequencer: the workers are simply nodes of that Redis;
* starts each worker as ``python -m tether serve …`` with the same arguments, the worker's
  index, node id and descriptors in ``TETHER_WORKER`` (JSON), and restarts a worker that dies
  (after a back-off if it keeps dying young);
* on SIGTERM or SIGINT, stops every worker with SIGTERM (each closes its sockets with 4000 and
  finishes its commits), then closes the store. SIGKILL of the whole process group loses
  nothing committed: the store's commits are on disk before anyone is answered.

A worker tells the supervisor it is serving by writing to its *life pipe*, and keeps the pipe
open until it exits: the pipe's end is how the supervisor learns of a death, whatever the
cause. A worker learns of the supervisor's death from its store socket (sequencer) or from
``PR_SET_PDEATHSIG`` (Linux), and stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import orjson

from tether.server.config import ServerConfig, node_id
from tether.store import Store, open_store
from tether.store.shared import SharedStore, StoreHost

log = logging.getLogger("tether.workers")

WORKER_ENV = "TETHER_WORKER"
# How long stop() waits for workers to finish before SIGKILL.
STOP_GRACE = 15.0
# A worker that dies sooner than this after its start is restarted after a growing back-off.
YOUNG = 10.0
BACKOFF_MIN = 0.1
BACKOFF_MAX = 5.0
# How long start() waits for every worker to say it is serving.
START_TIMEOUT = 60.0


def default_workers() -> int:
    """The number of cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def sequenced(config: ServerConfig) -> bool:
    """Whether workers share the store through a sequencer (every store but Redis)."""
    return not config.shared_store


# -- in a worker -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Worker:
    """What a worker process was told by its supervisor (``TETHER_WORKER``)."""

    index: int
    node: str
    life_fd: int
    store_fd: int  # -1: the worker opens the store itself (Redis)
    parent: int

    @classmethod
    def from_env(cls) -> Worker | None:
        raw = os.environ.pop(WORKER_ENV, None)  # not for the worker's own subprocesses
        if not raw:
            return None
        values = orjson.loads(raw)
        worker = cls(int(values["index"]), str(values["node"]), int(values["life_fd"]),
                     int(values["store_fd"]), int(values["parent"]))
        for fd in (worker.life_fd, worker.store_fd):
            if fd >= 0:
                os.set_inheritable(fd, False)
        return worker

    def configure(self, config: ServerConfig) -> None:
        config.node_id = self.node
        config.reuse_port = True

    def store(self, config: ServerConfig, on_lost: Callable[[], None]) -> Store | None:
        """The shared store (sequencer), or None: open the configured one (Redis)."""
        if self.store_fd < 0:
            return None
        return SharedStore(socket.socket(fileno=self.store_fd), config.retention,
                           on_lost=on_lost)

    def watch_parent(self, on_death: Callable[[], None]) -> None:
        """Stop if the supervisor dies (SIGTERM from the kernel, Linux only)."""
        _set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != self.parent:  # it died before the line above
            on_death()

    def ready(self) -> None:
        """Tell the supervisor this worker serves; the pipe stays open until exit."""
        with contextlib.suppress(OSError):
            os.write(self.life_fd, b"ready\n")


def _set_parent_death_signal(signum: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signum, 0, 0, 0)


# -- the supervisor ----------------------------------------------------------------------------

class _Child:
    """One worker slot: its process, and the pipes and sockets of its current run."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.started = 0.0
        self.ready = asyncio.Event()
        self.exited = asyncio.Event()
        self.failures = 0


class _LifePipe(asyncio.Protocol):
    def __init__(self, child: _Child) -> None:
        self.child = child

    def data_received(self, data: bytes) -> None:
        if b"ready" in data:
            self.child.ready.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.child.exited.set()


class StartError(Exception):
    """A worker could not start (it exited before serving)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class Supervisor:
    """Runs ``workers`` workers of ``argv`` (``tether serve …`` arguments) on one port."""

    def __init__(self, config: ServerConfig, workers: int, argv: Sequence[str], *,
                 secret: str | None = None) -> None:
        self.config = config
        self.workers = workers
        self.argv = list(argv)
        self.secret = secret  # handed to workers when it exists only in this process
        self.node = ""
        self.store: Store | None = None
        self.host: StoreHost | None = None
        self._port_socket: socket.socket | None = None
        self._children = [_Child(i) for i in range(workers)]
        self._stopping = False
        self._watchers: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Open the store, hold the port, start every worker and wait until all serve."""
        config = self.config
        self.node = config.node_id or node_id(config.data_dir)
        self._port_socket = self._hold_port()
        try:
            if sequenced(config):
                self.store = _sequencer_store(config)
                await self.store.start()
                self.host = StoreHost(self.store)
            else:
                # Every worker would fail alike on a store it cannot reach: say it once, here.
                probe = open_store(config.resolved_store_url(), config.retention)
                try:
                    await probe.start()
                finally:
                    await probe.close()
            for child in self._children:
                await self._spawn(child)
            waits = [asyncio.ensure_future(self._started(child)) for child in self._children]
            try:
                await asyncio.wait_for(asyncio.gather(*waits), START_TIMEOUT)
            except BaseException:
                for wait in waits:
                    wait.cancel()
                raise
        except BaseException:
            await self.stop()
            raise
        self._watchers = [asyncio.ensure_future(self._watch(child))
                          for child in self._children]

    def _hold_port(self) -> socket.socket:
        config = self.config
        infos = socket.getaddrinfo(config.host or None, config.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        # Any process of this user could join a SO_REUSEPORT group, another tether too: a
        # plain bind first proves that nobody holds the port (EADDRINUSE otherwise).
        for reuse_port in (False, True):
            sock = socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind(address)
            except OSError:
                sock.close()
                raise
            if not reuse_port:
                sock.close()
        return sock

    async def _started(self, child: _Child) -> None:
        ready = asyncio.ensure_future(child.ready.wait())
        exited = asyncio.ensure_future(child.exited.wait())
        await asyncio.wait([ready, exited], return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        exited.cancel()
        if not child.ready.is_set():
            code = await self._reap(child)
            raise StartError(f"worker {child.index} exited with status {code} before serving",
                             code if code > 0 else 1)

    async def _spawn(self, child: _Child) -> None:
        loop = asyncio.get_running_loop()
        child.ready = asyncio.Event()
        child.exited = asyncio.Event()
        life_read, life_write = os.pipe()
        store_fd = -1
        theirs: socket.socket | None = None
        if self.host is not None:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            await self.host.serve(ours)
            store_fd = theirs.fileno()
        env = {**os.environ, WORKER_ENV: orjson.dumps({
            "index": child.index, "node": f"{self.node}-{child.index}", "life_fd": life_write,
            "store_fd": store_fd, "parent": os.getpid()}).decode()}
        if self.secret is not None:
            env["TETHER_SECRET"] = self.secret
        fds = [life_write] + ([store_fd] if store_fd >= 0 else [])
        try:
            child.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tether", *self.argv, pass_fds=fds, env=env)
        except BaseException:
            os.close(life_read)
            raise
        finally:
            os.close(life_write)  # the worker's copy is the only one: its exit ends the pipe
            if theirs is not None:
                theirs.close()  # the host's end sees EOF if the worker never started
        child.started = time.monotonic()
        await loop.connect_read_pipe(lambda: _LifePipe(child), os.fdopen(life_read, "rb", 0))

    async def _reap(self, child: _Child) -> int:
        proc = child.proc
        if proc is None:
            return 0
        return await proc.wait()

    async def _watch(self, child: _Child) -> None:
        """Restart ``child`` whenever it dies, until the supervisor stops."""
        while True:
            await child.exited.wait()
            code = await self._reap(child)
            if self._stopping:
                return
            young = time.monotonic() - child.started < YOUNG
            child.failures = child.failures + 1 if young else 0
            delay = min(BACKOFF_MAX, BACKOFF_MIN * 2 ** (child.failures - 1)) if young else 0.0
            log.warning("worker %d (pid %s) exited with status %s; restarting it%s",
                        child.index, child.proc.pid if child.proc else "?", code,
                        f" in {delay:.1f}s" if delay else "")
            if delay:
                await asyncio.sleep(delay)
            if self._stopping:
                return
            try:
                await self._spawn(child)
            except OSError as exc:
                log.error("cannot restart worker %d: %s", child.index, exc)
                child.exited.set()

    def pids(self) -> list[int]:
        """The workers' process ids (for operators and tests)."""
        return [child.proc.pid for child in self._children if child.proc is not None]

    async def stop(self, signum: int = signal.SIGTERM) -> None:
        """Stop every worker (SIGTERM, then SIGKILL after ``STOP_GRACE``), then the store."""
        self._stopping = True
        for watcher in self._watchers:
            watcher.cancel()
        running = [child.proc for child in self._children
                   if child.proc is not None and child.proc.returncode is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)
        if running:
            _, late = await asyncio.wait([asyncio.ensure_future(proc.wait()) for proc in running],
                                         timeout=STOP_GRACE)
            for proc in running:
                if proc.returncode is None:
                    log.warning("worker pid %d did not stop within %.0fs; killing it",
                                proc.pid, STOP_GRACE)
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            if late:
                await asyncio.wait(late)
        if self.host is not None:
            await self.host.close()
            self.host = None
        if self.store is not None:
            await self.store.close()
            self.store = None
        if self._port_socket is not None:
            self._port_socket.close()
            self._port_socket = None


# The sequencer commits at most this many appends per transaction, and sends the answers
# before it commits more: the workers work on one batch's answers while the next commits,
# instead of the whole server moving in one convoy (docs/architecture.md, "Workers").
SEQUENCER_BATCH = int(os.environ.get("TETHER_SEQUENCER_BATCH", "256"))


def _sequencer_store(config: ServerConfig) -> Store:
    url = config.resolved_store_url()
    if url.startswith("sqlite:"):
        from tether.store.sqlite import SqliteStore

        return SqliteStore(url.removeprefix("sqlite://"), config.retention,
                           max_batch=SEQUENCER_BATCH or None)
    return open_store(url, config.retention)


def describe(config: ServerConfig, workers: int) -> str:
    how = "a sequencer serving the store" if sequenced(config) else "nodes of the store"
    return f"{workers} workers, {how}"


def run_supervisor(config: ServerConfig, workers: int, argv: Sequence[str],
                   on_started: Callable[[Supervisor], None], *, secret: str | None = None,
                   start: Callable[[Supervisor], Awaitable[None]] | None = None) -> int:
    """Run the supervisor until SIGTERM/SIGINT; the process's exit status.

    ``start`` wraps :meth:`Supervisor.start` (the CLI turns its failures into one line).
    """

    async def run() -> int:
        supervisor = Supervisor(config, workers, argv, secret=secret)
        stop = asyncio.Event()
        received: list[int] = []
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            received.append(signum)
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        starting = asyncio.ensure_future(
            start(supervisor) if start is not None else supervisor.start())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, StartError):
                await starting
            await supervisor.stop()
            return 128 + received[0]
        stopping.cancel()
        starting.result()
        # As in a worker (tether/cli.py): the sequencer allocates a few objects per event; at
        # Python's default thresholds it collected 50-70 times a second under load, ~5 % of
        # its time, in pauses up to 8 ms (p99) and 112 ms (bench/experiments/sequencer_gc.py).
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 20, 20)
        on_started(supervisor)
        await stop.wait()
        # Ctrl-C reached the workers too (one process group); SIGTERM is passed on.
        await supervisor.stop(signal.SIGTERM)
        return 128 + received[0] if received[0] == signal.SIGINT else 0

    return asyncio.run(run())

