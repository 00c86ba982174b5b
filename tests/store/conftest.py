"""The store kinds of the contract suite: every backend, plus the shared store of
``tether serve --workers N`` (a client over a socket to a host that owns a SQLite store)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import STORE_KINDS as BACKENDS
from tests.conftest import make_store as make_backend
from tether.store import Retention, SessionStore, Store, open_store
from tether.store.shared import SharedStore, StoreHost

STORE_KINDS = [*BACKENDS, "shared"]


class HostedStore(SharedStore):
    """A worker's store with its host (and the host's SQLite store) in this process."""

    host: StoreHost
    backend: Store

    async def close(self) -> None:
        await super().close()
        await self.host.close()
        await self.backend.close()


async def make_store(kind: str, request: pytest.FixtureRequest, tmp_path: Path,
                     retention: Retention | None = None) -> SessionStore:
    if kind != "shared":
        return await make_backend(kind, request, tmp_path, retention)
    return await open_shared(tmp_path / "data", retention)


async def open_shared(path: Path, retention: Retention | None = None) -> HostedStore:
    """A started shared store whose host serves a SQLite store in ``path``."""
    backend = open_store(f"sqlite://{path}", retention)
    await backend.start()
    host = StoreHost(backend)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    await host.serve(theirs)
    store = HostedStore(ours, retention)
    store.host, store.backend = host, backend
    await store.start()
    return store


@pytest.fixture(params=STORE_KINDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SessionStore]:
    store = await make_store(request.param, request, tmp_path)
    yield store
    await store.close()
