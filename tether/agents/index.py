"""Which runs each session has, and what each awaits: kept current without re-reading logs.

Control events (``run.cancel``, ``run.steer``, ``approval.decision``, ``tool.result``) are
validated against the run they name *in the session they are published in*. The
:class:`RunIndex` answers that in O(1): one :class:`RunTable` per session maps run id →
:class:`~tether.agents.state.RunRecord` (state and pending calls), built by
:func:`~tether.agents.state.apply`, the same state machine as :func:`~tether.agents.state.fold`.

* **Built once, in pages.** A session's table is built the first time it is needed, by one
  fold of its log read in pages, yielding to the event loop between pages, so a long log never
  blocks the loop for more than one page.
* **Kept current by the store's listener.** While a table is cached it listens to its session
  and applies each committed event whose seq is the next one; an event after a gap (a live
  channel that dropped something, or events committed while a page was being read) marks the
  table *behind*, and the next lookup reads only the tail after the last applied seq.
* **Exact on every node.** With a store whose live channel may drop or delay events
  (``live_is_lossy``, Redis pub/sub: another node may have created a run or decided a call a
  moment ago), every lookup first reads the tail after the last applied seq — usually nothing,
  at most what was committed since. With an in-process store listeners are called at commit,
  before ``append`` returns, so an in-step table needs no read at all.
* **Bounded.** Tables are evicted whole, least recently used first, beyond ``max_sessions``
  tables or ``max_runs`` records in all; an evicted session is rebuilt on its next lookup.
  Records keep only what validation needs: a finished run keeps its state, not its calls.

A run id unknown to a complete table is not in the session: the answer costs a dict lookup
(plus, on a lossy store, one read of the tail), never a read of the whole log.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Any

from tether.agents.state import RunRecord, apply
from tether.protocol.events import Event
from tether.store.base import SessionStore

PAGE = 500  # events per read while building or catching up: ~1 ms of decoding and folding


class RunTable:
    """The runs of one session as its log tells them, up to ``seq``."""

    __slots__ = ("behind", "built", "epoch", "lock", "runs", "seq", "session", "stale")

    def __init__(self, session: str) -> None:
        self.session = session
        self.runs: dict[str, RunRecord] = {}
        self.seq = 0  # the last event applied
        self.epoch: str | None = None  # the log's epoch (seqs restart with a new one)
        self.built = False  # the whole log up to ``seq`` has been applied
        self.behind = False  # an event after ``seq`` was seen but not applied: read the tail
        self.stale = False  # the log changed epoch: rebuild from scratch
        self.lock = asyncio.Lock()

    def take(self, event: Event) -> RunRecord | None:
        """Apply ``event`` (callers pass each event once, in seq order); return the run it
        touched, if any. An event of another epoch marks the table stale instead."""
        if self.epoch is not None and event.epoch != self.epoch:
            self.stale = True
            return None
        self.epoch = event.epoch
        self.seq = event.seq
        record = apply(self.runs, event.seq, event.type, event.data)
        if record is not None:
            _compact(record)
        return record


def _compact(record: RunRecord) -> None:
    """Keep what validating a control event needs (state and pending calls), drop the rest."""
    record.results.clear()
    if record.final:
        record.pending.clear()
        record.decided.clear()
        record.input = None


class RunIndex:
    """Run id → record, per session, for every session this node was asked about."""

    def __init__(self, store: SessionStore, *, max_sessions: int = 4096,
                 max_runs: int = 200_000, page: int = PAGE) -> None:
        self.store = store
        self.max_sessions = max_sessions
        self.max_runs = max_runs
        self.page = page
        self.tables: OrderedDict[str, RunTable] = OrderedDict()  # least recently used first
        self.records = 0  # runs across all cached tables
        self.lossy = store.live_is_lossy  # then every lookup first reads the log's tail
        self.reads = 0  # store reads made (builds and tails), for tests and metrics

    async def lookup(self, session: str, run_id: str) -> RunRecord | None:
        """The run ``run_id`` of ``session`` as the log tells it now, or ``None``.

        The record is the index's own: read it, do not change it.
        """
        table = await self.table(session)
        record = table.runs.get(run_id)
        if record is None and self.lossy and table.seq > 0:
            # Not there: make sure the log was not replaced under us (a new epoch restarts
            # seqs, so the tail read would find nothing).
            head = await self.store.head(session)
            if head.epoch != table.epoch or head.last_seq < table.seq:
                table.stale = True
                table = await self.table(session)
                record = table.runs.get(run_id)
        return record

    async def table(self, session: str) -> RunTable:
        """The session's table, built or brought up to date with the log."""
        table: RunTable | None = None
        for _ in range(3):  # a log replaced (new epoch) mid-read is read again
            table = self.tables.get(session)
            if table is None or table.stale:
                self._drop(session)
                table = RunTable(session)
                self.tables[session] = table
                self.store.listen(session, self._observe)
                self._shrink(keep=table)
            else:
                self.tables.move_to_end(session)
            if not table.built or table.behind or self.lossy:
                async with table.lock:
                    if not table.stale:
                        await self._catch_up(table)
            if not table.stale:
                break
        assert table is not None
        return table

    async def _catch_up(self, table: RunTable) -> None:
        """Apply what the log has after ``table.seq``, a page at a time."""
        first = True
        while True:
            if not first:
                await asyncio.sleep(0)  # one page per loop step, however long the log
            first = False
            table.behind = False
            self.reads += 1
            page = await self.store.read(table.session, table.seq, self.page)
            before = len(table.runs)
            for event in page:
                if event.seq > table.seq:  # the listener may have applied some meanwhile
                    table.take(event)
                    if table.stale:
                        return
            self._count(table, len(table.runs) - before)
            if len(page) < self.page:
                table.built = True
                return

    def _observe(self, event: Event) -> None:
        """The store's listener: apply committed events in seq order, note any gap."""
        if event.transient:
            return
        table = self.tables.get(event.session)
        if table is None:
            return
        if event.seq == table.seq + 1:
            before = len(table.runs)
            table.take(event)
            self._count(table, len(table.runs) - before)
        elif event.seq > table.seq:
            table.behind = True

    def _count(self, table: RunTable, added: int) -> None:
        if added and self.tables.get(table.session) is table:  # not a table evicted meanwhile
            self.records += added
            self._shrink(keep=table)

    def _shrink(self, keep: RunTable) -> None:
        """Evict least recently used tables (never ``keep``) beyond the bounds."""
        while len(self.tables) > self.max_sessions or self.records > self.max_runs:
            victim = next((s for s, t in self.tables.items() if t is not keep), None)
            if victim is None:
                return
            self._drop(victim)

    def _drop(self, session: str) -> None:
        table = self.tables.pop(session, None)
        if table is not None:
            self.records -= len(table.runs)
            self.store.unlisten(session, self._observe)

    def forget(self, session: str) -> None:
        """Drop a session's table; it is rebuilt on its next lookup."""
        self._drop(session)

    def close(self) -> None:
        """Stop listening to every session."""
        for session in list(self.tables):
            self._drop(session)

    def stats(self) -> dict[str, Any]:
        return {"sessions": len(self.tables), "runs": self.records, "reads": self.reads}
