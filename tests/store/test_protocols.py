"""Every store is a SessionStore and a PresenceStore, with the protocols' exact signatures.

mypy checks this statically in each store module (``_conforms: type[Store]``); this test
checks the same at run time, where it also covers the declared capability ``live_is_lossy``.
"""

from __future__ import annotations

import inspect
import socket
from pathlib import Path
from typing import Any

import pytest

from tests.store.conftest import STORE_KINDS, make_store
from tether.store import MemoryStore, PresenceStore, SessionStore, Store
from tether.store.redis import RedisStore
from tether.store.shared import SharedStore
from tether.store.sqlite import SqliteStore

LOSSY = {"memory": False, "sqlite": False, "redis": True, "redis-cluster": True, "shared": False}
CLASSES: dict[str, type[Any]] = {"memory": MemoryStore, "sqlite": SqliteStore,
                                 "redis": RedisStore, "shared": SharedStore}


def _methods(protocol: type[Any]) -> dict[str, Any]:
    return {name: value for name, value in vars(protocol).items()
            if inspect.isfunction(value) and not name.startswith("_")}


def test_protocols_split_the_log_from_presence() -> None:
    log = set(_methods(SessionStore)) | set(SessionStore.__annotations__)
    presence = set(_methods(PresenceStore)) | set(PresenceStore.__annotations__)
    assert log == {"retention", "live_is_lossy", "start", "close", "append", "append_future",
                   "read", "head", "trim", "publish_transient", "listen", "unlisten"}
    assert presence == {"set_presence", "clear_presence", "presence"}
    assert SessionStore in Store.__mro__ and PresenceStore in Store.__mro__


def _unstarted(kind: str, tmp_path: Path) -> Any:
    if kind == "memory":
        return MemoryStore()
    if kind == "sqlite":
        return SqliteStore(str(tmp_path / "data"))
    if kind == "shared":
        sock = socket.socket(socket.AF_UNIX)
        sock.close()
        return SharedStore(sock)  # constructing does not connect
    return RedisStore("redis://127.0.0.1:1/0")  # constructing does not connect


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis", "shared"])
def test_every_store_is_both_protocols(kind: str, tmp_path: Path) -> None:
    store = _unstarted(kind, tmp_path)
    assert isinstance(store, SessionStore)
    assert isinstance(store, PresenceStore)
    assert isinstance(store, Store)
    assert store.live_is_lossy is LOSSY[kind]
    assert type(store).live_is_lossy is LOSSY[kind]  # declared on the class, not probed


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis", "shared"])
@pytest.mark.parametrize("protocol", [SessionStore, PresenceStore])
def test_store_methods_have_the_protocol_signatures(kind: str, protocol: type[Any]) -> None:
    cls = CLASSES[kind]
    for name, declared in _methods(protocol).items():
        implemented = getattr(cls, name)
        assert (inspect.iscoroutinefunction(implemented)
                == inspect.iscoroutinefunction(declared)), name
        expected = [(p.name, p.kind, p.default)
                    for p in inspect.signature(declared).parameters.values()]
        actual = [(p.name, p.kind, p.default)
                  for p in inspect.signature(implemented).parameters.values()]
        assert actual == expected, f"{cls.__name__}.{name}"


def test_other_objects_are_not_stores() -> None:
    assert not isinstance(object(), PresenceStore)
    assert not isinstance(object(), SessionStore)


@pytest.mark.parametrize("kind", STORE_KINDS)
async def test_opened_stores_are_stores(kind: str, request: pytest.FixtureRequest,
                                        tmp_path: Path) -> None:
    store = await make_store(kind, request, tmp_path)
    try:
        assert isinstance(store, Store)
        assert store.live_is_lossy is LOSSY[kind]
    finally:
        await store.close()
