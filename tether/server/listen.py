"""The listening sockets of ``tether serve``, opened before anything else is loaded.

A restarted server is reached by every client of the one that died, at once. A connection
attempt to a port nobody listens on is refused, and each refusal doubles the client's backoff
window, so a crowd that meets a closed port for a few seconds comes back spread over a window
several times that long (``docs/scaling.md``, "Reconnect storms"). A port that *listens*
completes the TCP handshake in the kernel and keeps the connection in its accept queue until
the server accepts it: the client waits inside its handshake timeout instead of backing off.
So ``tether serve`` binds and listens first, with the largest backlog the kernel allows, and
only then imports the server, opens and recovers the store and starts workers.

This module imports nothing of tether's, to be loadable that early.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass

# listen()'s backlog: the kernel caps it at net.core.somaxconn (4096 by default since Linux
# 5.4); a connection beyond a full queue has its SYN dropped and retried by the client's
# kernel 1 s, then 3 s, 7 s … later, which costs it no backoff. One queue per serving process
# is deliberate: the server accepts whatever is queued at once, and a deeper queue (measured
# with 4 sockets per worker) only held connections that waited past the clients' 10 s connect
# timeout, which the server then served for nobody while their clients retried.
BACKLOG = 65535


def _addresses(host: str | None, port: int) -> list[tuple[int, int, int, tuple[object, ...]]]:
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    seen: set[tuple[int, tuple[object, ...]]] = set()
    out: list[tuple[int, int, int, tuple[object, ...]]] = []
    for family, kind, proto, _, address in infos:
        if (family, address) not in seen:  # getaddrinfo may repeat an address
            seen.add((family, address))
            out.append((family, kind, proto, tuple(address)))
    return out


def listen(host: str | None, port: int, *, reuse_port: bool = False,
           backlog: int = BACKLOG) -> list[socket.socket]:
    """Bind ``host:port`` (every address the name resolves to, as aiohttp would) and listen.

    With ``reuse_port`` each socket joins the port's ``SO_REUSEPORT`` group: the kernel spreads
    new connections over the group's listening sockets, each with its own accept queue. With
    port 0 the first socket's port is used for the other addresses. Raises ``OSError``.
    """
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, address in _addresses(host, port):
            if port == 0 and sockets:
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                # As asyncio does: "::" takes IPv6 only, and 0.0.0.0 can be bound alongside.
                with contextlib.suppress(OSError, AttributeError):
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def hold(host: str | None, port: int) -> socket.socket:
    """A bound, not listening, ``SO_REUSEPORT`` socket on ``host:port``: holds the port for
    workers that join its group, and takes no connection itself. Raises ``OSError``
    (``EADDRINUSE`` if anybody holds the port)."""
    family, kind, proto, address = _addresses(host, port)[0]
    # Any process of this user could join a SO_REUSEPORT group, another tether too: a plain
    # bind first proves that nobody holds the port.
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


# Set in the environment of each worker of ``tether serve --workers N`` (JSON, see
# :class:`tether.server.workers.Worker`).
WORKER_ENV = "TETHER_WORKER"


def default_workers() -> int:
    """The number of cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@dataclass
class Listening:
    """The port of ``tether serve``, listening: one process's sockets, or a held port and one
    set of ``SO_REUSEPORT`` sockets per worker (each worker gets its own accept queue, as the
    kernel spreads connections over the group)."""

    held: socket.socket | None
    slots: list[list[socket.socket]]

    @classmethod
    def open(cls, host: str | None, port: int, workers: int) -> Listening:
        """Raises ``OSError`` (``EADDRINUSE`` if anybody holds the port)."""
        if workers <= 1:
            return cls(None, [listen(host, port)])
        held = hold(host, port)
        slots: list[list[socket.socket]] = []
        try:
            for _ in range(workers):
                slots.append(listen(host, port, reuse_port=True))
        except BaseException:
            cls(held, slots).close()
            raise
        return cls(held, slots)

    def close(self) -> None:
        for sock in [self.held, *(s for slot in self.slots for s in slot)]:
            if sock is not None:
                sock.close()
        self.held = None
        self.slots = []
