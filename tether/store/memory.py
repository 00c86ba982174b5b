"""An in-process store for unit tests: the reference behaviour of the contract, no durability."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from tether.protocol.cursor import new_epoch
from tether.protocol.events import Event, Sender
from tether.store.base import (
    Appended,
    Head,
    InProcessFanout,
    InProcessPresence,
    Retention,
    Store,
    StreamText,
    now_ms,
)


class _Log:
    __slots__ = ("epoch", "events", "first_seq", "keys", "last_seq")

    def __init__(self, session: str) -> None:
        self.epoch = new_epoch(session)
        self.events: list[Event] = []
        self.last_seq = 0
        self.first_seq = 1
        self.keys: dict[tuple[str, str], tuple[Event, float]] = {}


class MemoryStore(InProcessFanout, InProcessPresence):
    """A :class:`~tether.store.base.Store` in process memory: the log, fan-out and presence."""

    live_is_lossy = False  # listeners are called in process, right after commit

    def __init__(self, retention: Retention | None = None) -> None:
        self.retention = retention or Retention()
        self._logs: dict[str, _Log] = {}
        InProcessFanout.__init__(self)
        InProcessPresence.__init__(self)
        self._streams = StreamText(lambda session, stream: ([], False))

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def _log(self, session: str) -> _Log:
        log = self._logs.get(session)
        if log is None:
            log = self._logs[session] = _Log(session)
        return log

    async def append(self, session: str, type: str, data: Any, sender: Sender,
                     key: str | None = None) -> Appended:
        return self._append(session, type, data, sender, key)

    def _append(self, session: str, type: str, data: Any, sender: Sender,
                key: str | None) -> Appended:
        log = self._log(session)
        if key is not None:
            seen = log.keys.get((sender.sub, key))
            if seen is not None and time.monotonic() - seen[1] < self.retention.idempotency_window:
                return Appended(seen[0], duplicate=True)
        data = self._streams.prepare(session, type, data)
        log.last_seq += 1
        event = Event(session, log.epoch, log.last_seq, type, data, sender, now_ms())
        log.events.append(event)
        self._streams.committed(session, type, data)
        if key is not None:
            log.keys[(sender.sub, key)] = (event, time.monotonic())
        self._enforce_count(log)
        self._listeners.dispatch(event)
        return Appended(event, duplicate=False)

    def append_future(self, session: str, type: str, data: Any, sender: Sender,
                      key: str | None = None) -> asyncio.Future[Appended]:
        """Commit now; a resolved future, for callers that take a done-callback."""
        future: asyncio.Future[Appended] = asyncio.get_running_loop().create_future()
        try:
            future.set_result(self._append(session, type, data, sender, key))
        except Exception as exc:
            future.set_exception(exc)
        return future

    def _enforce_count(self, log: _Log) -> int:
        excess = len(log.events) - self.retention.max_events
        if excess > 0:
            del log.events[:excess]
            log.first_seq = log.events[0].seq if log.events else log.last_seq + 1
            return excess
        return 0

    async def read(self, session: str, after: int, limit: int) -> list[Event]:
        log = self._logs.get(session)
        if log is None or limit <= 0:
            return []
        start = max(0, after + 1 - log.first_seq)
        return log.events[start:start + limit]

    async def head(self, session: str) -> Head:
        log = self._log(session)
        return Head(log.epoch, log.last_seq, log.first_seq)

    async def trim(self) -> int:
        removed = 0
        cutoff = now_ms() - int(self.retention.max_age * 1000)
        key_cutoff = time.monotonic() - self.retention.idempotency_window
        for log in self._logs.values():
            removed += self._enforce_count(log)
            old = 0
            while old < len(log.events) and log.events[old].time < cutoff:
                old += 1
            if old:
                del log.events[:old]
                log.first_seq = log.events[0].seq if log.events else log.last_seq + 1
                removed += old
            log.keys = {k: v for k, v in log.keys.items() if v[1] >= key_cutoff}
        return removed


if TYPE_CHECKING:
    # mypy fails here if MemoryStore stops conforming to SessionStore or PresenceStore.
    _conforms: type[Store] = MemoryStore
