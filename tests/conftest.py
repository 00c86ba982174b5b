"""Shared fixtures: a real redis-server on a free loopback port, stores of every kind."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tether.store import Retention, SessionStore, open_store


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (each held until all are found)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


def wait_replicas_acked(port: int, deadline: float) -> None:
    """Wait until every replica of the (empty) master on ``port`` acknowledges a write.

    A replica is listed online before the master streams writes to it (Redis 7 starts after
    its first acknowledgement, sent once a second), so WAIT answers only from then on.
    """
    import redis

    node = redis.Redis(port=port, decode_responses=True)
    try:
        while True:
            info = node.info("replication")
            replicas = int(info.get("connected_slaves", 0))
            node.flushall()  # a write that replicates
            timeout = max(1, int((deadline - time.monotonic()) * 1000))
            if replicas and int(node.execute_command("WAIT", replicas, timeout)) >= replicas:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the replicas of redis {port} do not acknowledge")
            time.sleep(0.02)
    finally:
        node.close()


class RedisServer:
    """A real redis-server process on 127.0.0.1, with its data in a temporary folder."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed (apt-get install -y redis-server)")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="tether-redis-")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)
        self.db = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/{self.db}"

    def flush(self) -> None:
        import redis

        redis.Redis(port=self.port).flushall()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis_server.flush()
    return redis_server.url


class RedisCluster:
    """A real Redis Cluster (``--cluster-enabled yes``) on loopback ports: 3 masters, and
    ``replicas`` replicas of each."""

    MASTERS = 3

    def __init__(self, replicas: int = 0, node_timeout: int | None = None) -> None:
        binary, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if binary is None or cli is None:
            pytest.skip("redis-server is not installed (apt-get install -y redis-server)")
        self.dir = tempfile.mkdtemp(prefix="tether-redis-cluster-")
        # Every node, masters first: redis-cli makes the first MASTERS of them masters.
        count = self.MASTERS * (1 + replicas)
        # Each node's port and its cluster bus port (by default port + 10000, which may be
        # taken or past 65535).
        ports = free_ports(2 * count)
        self.nodes, bus = ports[:count], ports[count:]
        extra: list[str] = []
        if node_timeout is not None:
            # How long a node may be unreachable before it is failed over (default 15 s).
            extra += ["--cluster-node-timeout", str(node_timeout)]
        if replicas:
            # A replica's first sync starts at once rather than after the default 5 s
            # diskless delay.
            extra += ["--repl-diskless-sync-delay", "0"]
        self.argv = {port: [
            binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", self.dir, "--protected-mode", "no",
            "--cluster-enabled", "yes", "--cluster-port", str(bus_port),
            "--cluster-config-file", f"nodes-{port}.conf", "--dbfilename", f"dump-{port}.rdb",
            *extra] for port, bus_port in zip(self.nodes, bus, strict=True)}
        self.procs = {port: subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                             stderr=subprocess.DEVNULL)
                      for port, argv in self.argv.items()}
        for port in self.nodes:
            wait_for_port(port)
        subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{port}" for port in self.nodes),
             "--cluster-replicas", str(replicas), "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
        self.wait_ok()
        self.ports = self.masters()
        if replicas:
            self.wait_replicas_synced()

    def masters(self) -> list[int]:
        """The ports of the live masters that serve slots, as the cluster says now."""
        import redis

        for port in self.live():
            node = redis.Redis(port=port)
            try:
                slots = node.execute_command("CLUSTER SLOTS")
            except redis.RedisError:
                continue
            finally:
                node.close()
            return sorted({int(master[1]) for _, _, master, *_ in slots})
        raise RuntimeError("no live redis cluster node")

    def live(self) -> list[int]:
        return [port for port, proc in self.procs.items() if proc.poll() is None]

    def replicas_of(self, master: int) -> list[int]:
        """The ports of ``master``'s replicas."""
        import redis

        node = redis.Redis(port=master, decode_responses=True)
        try:
            info = node.info("replication")
        finally:
            node.close()
        return [int(info[key]["port"]) for key in info
                if key.startswith("slave") and isinstance(info[key], dict)]

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Wait until every live node reports ``cluster_state:ok``."""
        import redis

        deadline = time.monotonic() + timeout
        for port in self.live():
            node = redis.Redis(port=port)
            while node.cluster("info").get("cluster_state") != "ok":
                if time.monotonic() > deadline:
                    raise TimeoutError(f"redis cluster node {port} is not ok")
                time.sleep(0.05)
            node.close()

    def wait_replicas_synced(self, timeout: float = 30.0) -> None:
        """Wait until every master's replicas have synced and acknowledge writes."""
        deadline = time.monotonic() + timeout
        for port in self.ports:
            wait_replicas_acked(port, deadline)

    def kill(self, port: int) -> None:
        """SIGKILL the node on ``port``: no shutdown, unsent replication data is lost."""
        proc = self.procs[port]
        proc.kill()
        proc.wait(10)

    def restart(self, port: int) -> None:
        """Start the killed node on ``port`` again: from its nodes.conf it rejoins the
        cluster, as a replica of the node that took its slots over."""
        self.procs[port] = subprocess.Popen(self.argv[port], stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL)
        wait_for_port(port)

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def flush(self) -> None:
        import redis

        for port in self.ports:
            node = redis.Redis(port=port)
            node.flushall()
            node.close()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    cluster = RedisCluster()
    yield cluster
    cluster.stop()


@pytest.fixture
def redis_cluster_url(redis_cluster: RedisCluster) -> str:
    redis_cluster.flush()
    return redis_cluster.url


@pytest.fixture
def redis_failover_cluster() -> Iterator[RedisCluster]:
    """A cluster of the test's own, with a replica per master that takes over ~2 s after
    its master dies (``cluster-node-timeout`` 1 s): a test may kill nodes."""
    cluster = RedisCluster(replicas=1, node_timeout=1000)
    yield cluster
    cluster.stop()


@pytest.fixture
async def chat_upstream() -> AsyncIterator[tuple[Any, str]]:
    """A local streaming Chat Completions server (the upstream, not a mock of tether)."""
    from aiohttp import web

    from tests.helpers import ChatUpstream

    up = ChatUpstream()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", up.completions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield up, f"http://127.0.0.1:{port}/v1"
    await runner.cleanup()


STORE_KINDS = ["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis),
               pytest.param("redis-cluster", marks=pytest.mark.redis)]


async def make_store(kind: str, request: pytest.FixtureRequest, tmp_path: Path,
                     retention: Retention | None = None) -> SessionStore:
    if kind == "memory":
        url = "memory://"
    elif kind == "sqlite":
        url = f"sqlite://{tmp_path / 'data'}"
    elif kind == "redis-cluster":
        url = request.getfixturevalue("redis_cluster_url")
    else:
        url = request.getfixturevalue("redis_url")
    store = open_store(url, retention)
    await store.start()
    return store


@pytest.fixture(params=STORE_KINDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SessionStore]:
    store = await make_store(request.param, request, tmp_path)
    yield store
    await store.close()


os.environ.setdefault("TETHER_LOG_LEVEL", "warning")
