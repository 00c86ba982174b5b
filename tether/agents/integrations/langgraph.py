"""LangGraph graphs served as durable tether runs, and a LangGraph checkpointer in tether's store.

``serve(graph, sessions=[...])`` wraps a compiled graph (``StateGraph(...).compile()``,
``create_react_agent(...)``: any ``Pregel``) in a tether :class:`~tether.agents.agent.Agent`.
Each run of a session is one or more invocations of the graph on the thread named after the
session (``thread_id`` = the session id), streamed with ``stream_mode=["messages", "updates"]``
and its subgraphs:

* the model's tokens (``AIMessageChunk`` text) go out through ``run.stream_text()``, one stream
  per model message; the tool calls of the model's messages and the ``ToolMessage`` answers are
  ``tool.call`` / ``tool.result`` events;
* ``interrupt(payload)`` inside a tool or node becomes a tether approval (or, for the tools
  named in ``client_tools``, a front-end tool call) that waits in the log, and the graph is
  resumed with ``Command(resume=...)`` once it is answered — see :func:`serve` for the
  payloads and the resume values;
* a steer (``run.steer``) is new user input at a safe point: a follow-up invocation on the same
  thread once the current one has finished, before the run completes;
* durability comes from LangGraph's own checkpoints: when the graph was compiled without a
  checkpointer, the run uses a :class:`TetherCheckpointer`, which keeps them in the session's
  own log (server-only ``tether.langgraph`` events), so after a SIGKILL the run resumes from
  the graph's last checkpoint — a pending interrupt keeps waiting, a step cut off runs again.

Every checkpoint a run writes carries ``tether_run`` (the run id) and ``tether_input`` (the seq
of the newest input fed to the graph) in its metadata: that is how a restarted run knows
whether the thread's newest checkpoint is its own and which steers the graph has already seen.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import time
import zlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    ToolMessage,
)
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    WRITES_IDX_MAP,
    BaseCheckpointSaver,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    PendingWrite,
    get_checkpoint_id,
    get_checkpoint_metadata,
    writes_sort_key,
)
from langgraph.checkpoint.serde.base import SerializerProtocol
from langgraph.pregel import Pregel
from langgraph.types import Command, Interrupt, StateSnapshot

from tether.agents.agent import Agent, BusyPolicy
from tether.agents.runner import new_call_id
from tether.protocol.events import Event, Sender
from tether.store.base import SessionStore

if TYPE_CHECKING:
    from tether.agents.runner import Run, TextStream

log = logging.getLogger("tether.langgraph")

EVENT_TYPE = "tether.langgraph"  # a server-only type (SERVER_TYPES): no client can forge one
PAGE = 1000
FALLBACK = 16  # checkpoints tried, newest first, when the newest cannot be read
DELTA_DEPTH = 16  # checkpoints in a row that store a growing list as what it gained
RUN_KEY = "tether_run"  # checkpoint metadata: the run that wrote it
INPUT_KEY = "tether_input"  # checkpoint metadata: the seq of the newest input fed to the graph


# --- the checkpointer ---------------------------------------------------------------------------


COMPRESS_ABOVE = 512  # bytes: a checkpoint repeats the whole conversation, and text packs well


def _encode(typed: tuple[str, bytes]) -> list[str]:
    """``[type, base64]``, or ``[type, base64, "zlib"]`` for a payload worth compressing."""
    kind, data = typed
    if len(data) > COMPRESS_ABOVE:
        return [kind, base64.b64encode(zlib.compress(data, 6)).decode(), "zlib"]
    return [kind, base64.b64encode(data).decode()]


def _decode(value: Any) -> tuple[str, bytes]:
    if not (isinstance(value, list) and len(value) in (2, 3)
            and all(isinstance(v, str) for v in value)):
        raise ValueError("not a [type, base64(, zlib)] list")
    data = base64.b64decode(value[1], validate=True)
    if len(value) == 3:
        if value[2] != "zlib":
            raise ValueError(f"unknown compression {value[2]!r}")
        try:
            data = zlib.decompress(data)
        except zlib.error as exc:
            raise ValueError(f"corrupt zlib data: {exc}") from exc
    return value[0], data


@dataclass
class _Saved:
    """Where one checkpoint is in the log: its event, its parent, its writes' events."""

    seq: int
    parent: str | None


@dataclass
class _Written:
    """The newest checkpoint this process wrote for a (thread, namespace): what the next one
    may be stored against."""

    id: str
    seq: int
    lists: dict[str, list[Any]]  # its list channels' values
    depth: int  # checkpoints since the last one stored whole
    root_seq: int  # the event of that one, and when it was written
    root_time: float


@dataclass
class _Thread:
    """What the log says of one thread, folded up to ``seq``; bodies are read on demand."""

    epoch: str
    seq: int = 0
    saved: dict[str, dict[str, _Saved]] = field(default_factory=dict)  # ns → id → where
    writes: dict[tuple[str, str], list[int]] = field(default_factory=dict)  # (ns, id) → seqs
    bodies: OrderedDict[int, dict[str, Any]] = field(default_factory=OrderedDict)
    values: OrderedDict[tuple[str, str, str], list[Any]] = field(default_factory=OrderedDict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class TetherCheckpointer(BaseCheckpointSaver[int]):
    """A LangGraph checkpointer whose data live in tether's store, in the log of the session
    named by ``thread_id`` — the same log the UIs follow, so there is no second database.

    Each ``aput`` appends one ``tether.langgraph`` event holding the checkpoint, each
    ``aput_writes`` one holding the task's writes; both serialised with the graph's serializer
    (msgpack, zlib-compressed above 512 bytes, base64 in the event). A list channel that only
    grew since the parent checkpoint (a conversation's messages) is stored as what it gained,
    and a checkpoint is stored whole every DELTA_DEPTH, or sooner near the store's retention
    (see ``_deltas``): a thread's log grows with its conversation, not with the conversation
    at every step, and never depends on a trimmed event.
    Reads fold the log incrementally — each call reads only what was appended since the
    previous one, so checkpoints written by another node are seen too — and keep an index in
    memory (threads least recently used first out, bodies read back from the log when not
    cached). ``adelete_thread`` appends a marker after which the thread starts empty: the log
    itself is append-only.

    Async only (``ainvoke``, ``astream``, ``aget_state``): the store is.
    """

    def __init__(self, store: SessionStore, *, sender: Sender | None = None,
                 serde: SerializerProtocol | None = None, max_threads: int = 256,
                 max_bodies: int = 16) -> None:
        super().__init__(serde=serde)
        self.store = store
        self.sender = sender or Sender("tether", "langgraph", "agent")
        self.max_threads = max_threads
        self.max_bodies = max_bodies
        self.unreadable = 0  # events of ours that could not be decoded (logged, skipped)
        self._bad: set[tuple[str, int]] = set()  # (thread, seq) counted already
        self._threads: OrderedDict[str, _Thread] = OrderedDict()
        self._last: OrderedDict[tuple[str, str], _Written] = OrderedDict()  # see _deltas

    # --- folding the log ---

    async def _thread(self, thread_id: str) -> _Thread:
        """The thread's index, caught up with the log."""
        thread = self._threads.get(thread_id)
        head = await self.store.head(thread_id)
        if thread is None or thread.epoch != head.epoch or thread.seq > head.last_seq:
            thread = _Thread(head.epoch)  # new to us, or the session was started over
        self._threads[thread_id] = thread
        self._threads.move_to_end(thread_id)
        while len(self._threads) > self.max_threads:
            self._threads.popitem(last=False)
        async with thread.lock:
            while thread.seq < head.last_seq:
                page = await self.store.read(thread_id, thread.seq, PAGE)
                for event in page:
                    self._fold(thread_id, thread, event.seq, event.type, event.data)
                    thread.seq = event.seq
                if len(page) < PAGE:
                    break
        return thread

    def _fold(self, thread_id: str, thread: _Thread, seq: int, type_: str, data: Any
              ) -> None:
        if type_ != EVENT_TYPE or not isinstance(data, dict):
            return
        kind, ns, cid = data.get("kind"), data.get("ns", ""), data.get("id")
        if kind == "delete":
            thread.saved.clear()
            thread.writes.clear()
            thread.bodies.clear()
            thread.values.clear()
            for key in [k for k in self._last if k[0] == thread_id]:
                del self._last[key]
            return
        if not isinstance(ns, str) or not isinstance(cid, str):
            self._unreadable(thread_id, seq, "no ns or id")
            return
        if kind == "checkpoint":
            parent = data.get("parent")
            thread.saved.setdefault(ns, {})[cid] = _Saved(
                seq, parent if isinstance(parent, str) else None)
        elif kind == "writes":
            thread.writes.setdefault((ns, cid), []).append(seq)
        else:
            self._unreadable(thread_id, seq, f"unknown kind {kind!r}")
            return
        self._cache(thread, seq, data)

    def _cache(self, thread: _Thread, seq: int, data: dict[str, Any]) -> None:
        thread.bodies[seq] = data
        while len(thread.bodies) > self.max_bodies:
            thread.bodies.popitem(last=False)

    def _unreadable(self, thread_id: str, seq: int, why: str) -> None:
        if (thread_id, seq) in self._bad:
            return  # counted and logged when first read
        self._bad.add((thread_id, seq))
        self.unreadable += 1
        log.warning("langgraph checkpoint event %d of %r skipped: %s", seq, thread_id, why)

    async def _body(self, thread_id: str, thread: _Thread, seq: int) -> dict[str, Any] | None:
        data = thread.bodies.get(seq)
        if data is None:
            page = await self.store.read(thread_id, seq - 1, 1)
            if not page or page[0].seq != seq or not isinstance(page[0].data, dict):
                return None  # trimmed by retention
            data = page[0].data
            self._cache(thread, seq, data)
        return data

    async def _pending_writes(self, thread_id: str, thread: _Thread, ns: str, cid: str
                              ) -> list[PendingWrite]:
        # Regular writes (index >= 0) keep the first value stored for (task, index); special
        # ones (errors, interrupts, resumes: negative indexes) the last, as LangGraph's own
        # savers do.
        found: dict[tuple[str, int], tuple[str, str, Any, str]] = {}
        for seq in thread.writes.get((ns, cid), ()):
            data = await self._body(thread_id, thread, seq)
            if data is None:
                continue
            task, path = str(data.get("task", "")), str(data.get("path", ""))
            try:
                for idx, channel, value in data.get("writes") or ():
                    key = (task, int(idx))
                    if key[1] >= 0 and key in found:
                        continue
                    found[key] = (task, str(channel), self.serde.loads_typed(_decode(value)),
                                  path)
            except Exception as exc:  # whatever the serializer raises on bad bytes
                self._unreadable(thread_id, seq, f"{type(exc).__name__}: {exc}")
        ordered = sorted(found, key=lambda k: writes_sort_key(found[k][3], *k))
        return [found[k][:3] for k in ordered]

    async def _tuple(self, thread_id: str, thread: _Thread, ns: str, cid: str
                     ) -> CheckpointTuple | None:
        saved = thread.saved.get(ns, {}).get(cid)
        if saved is None:
            return None
        data = await self._body(thread_id, thread, saved.seq)
        if data is None:
            return None
        try:
            checkpoint: Checkpoint = self.serde.loads_typed(_decode(data.get("checkpoint")))
            metadata: CheckpointMetadata = self.serde.loads_typed(_decode(data.get("metadata")))
            for channel in data.get("deltas") or {}:
                checkpoint["channel_values"][channel] = await self._list(
                    thread_id, thread, ns, cid, channel)
        except Exception as exc:  # whatever the serializer raises on bad bytes
            self._unreadable(thread_id, saved.seq, f"{type(exc).__name__}: {exc}")
            return None
        conf = {"thread_id": thread_id, "checkpoint_ns": ns}
        return CheckpointTuple(
            config={"configurable": {**conf, "checkpoint_id": cid}},
            checkpoint=checkpoint,
            metadata=metadata,
            parent_config=({"configurable": {**conf, "checkpoint_id": saved.parent}}
                           if saved.parent else None),
            pending_writes=await self._pending_writes(thread_id, thread, ns, cid),
        )

    async def _list(self, thread_id: str, thread: _Thread, ns: str, cid: str, channel: str
                    ) -> list[Any]:
        """A list channel's value at a checkpoint stored as what it gained since its parent:
        the parent's value (recursively, back to one stored whole), extended."""
        chain: list[list[Any]] = []
        at: str | None = cid
        base: list[Any] | None = None
        while base is None:
            if at is None or len(chain) > 4 * DELTA_DEPTH:
                raise ValueError(f"no whole value of {channel!r} before {cid}")
            cached = thread.values.get((ns, at, channel))
            if cached is not None:
                base = cached
                break
            saved = thread.saved.get(ns, {}).get(at)
            data = await self._body(thread_id, thread, saved.seq) if saved else None
            if saved is None or data is None:
                raise ValueError(f"the checkpoint {at} that {cid} extends is gone")
            delta = (data.get("deltas") or {}).get(channel)
            if delta is None:
                whole = self.serde.loads_typed(_decode(data.get("checkpoint")))
                base = list(whole["channel_values"].get(channel) or [])
                break
            chain.append(self.serde.loads_typed(_decode(delta)))
            at = saved.parent
        value = list(base)
        for gained in reversed(chain):
            value += gained
        thread.values[(ns, cid, channel)] = value
        while len(thread.values) > 8:
            thread.values.popitem(last=False)
        return list(value)

    # --- the saver interface ---

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        conf = config.get("configurable") or {}
        thread_id = str(conf["thread_id"])
        ns = str(conf.get("checkpoint_ns", ""))
        thread = await self._thread(thread_id)
        cid = get_checkpoint_id(config)
        if cid is not None:
            return await self._tuple(thread_id, thread, ns, cid)
        # The newest checkpoint that reads: one that does not (a corrupt event) must not make
        # the thread look empty and its conversation lost.
        for newest in sorted(thread.saved.get(ns, {}), reverse=True)[:FALLBACK]:
            found = await self._tuple(thread_id, thread, ns, newest)
            if found is not None:
                return found
        return None

    async def alist(self, config: RunnableConfig | None, *,
                    filter: dict[str, Any] | None = None,
                    before: RunnableConfig | None = None,
                    limit: int | None = None) -> AsyncIterator[CheckpointTuple]:
        if config is None:
            raise ValueError("TetherCheckpointer lists the checkpoints of one thread: "
                             "give a config with a thread_id")
        conf = config.get("configurable") or {}
        thread_id = str(conf["thread_id"])
        thread = await self._thread(thread_id)
        wanted_ns = conf.get("checkpoint_ns")
        wanted_id = get_checkpoint_id(config)
        before_id = get_checkpoint_id(before) if before else None
        for ns in list(thread.saved):
            if wanted_ns is not None and ns != wanted_ns:
                continue
            for cid in sorted(thread.saved.get(ns, {}), reverse=True):
                if (wanted_id and cid != wanted_id) or (before_id and cid >= before_id):
                    continue
                found = await self._tuple(thread_id, thread, ns, cid)
                if found is None:
                    continue
                metadata: dict[str, Any] = dict(found.metadata)
                if filter and not all(metadata.get(k) == v for k, v in filter.items()):
                    continue
                if limit is not None:
                    if limit <= 0:
                        return
                    limit -= 1
                yield found

    async def aput(self, config: RunnableConfig, checkpoint: Checkpoint,
                   metadata: CheckpointMetadata, new_versions: ChannelVersions
                   ) -> RunnableConfig:
        conf = config["configurable"]
        thread_id, ns = str(conf["thread_id"]), str(conf.get("checkpoint_ns", ""))
        parent = conf.get("checkpoint_id")
        values = checkpoint["channel_values"]
        deltas = self._deltas(thread_id, ns, parent, values)
        stored = {**checkpoint, "channel_values": {k: v for k, v in values.items()
                                                   if k not in deltas}}
        data: dict[str, Any] = {
            "kind": "checkpoint", "ns": ns, "id": checkpoint["id"], "parent": parent,
            "checkpoint": _encode(self.serde.dumps_typed(stored)),
            "metadata": _encode(self.serde.dumps_typed(get_checkpoint_metadata(config,
                                                                               metadata)))}
        if deltas:
            data["deltas"] = {k: _encode(self.serde.dumps_typed(v)) for k, v in deltas.items()}
        # Keyed, so a retry of the same put (a reconnect) stores it once.
        event = await self._append(thread_id, data, key=f"lg:{ns}:{checkpoint['id']}")
        lists = {k: list(v) for k, v in values.items() if isinstance(v, list)}
        previous = self._last.get((thread_id, ns))
        if deltas and previous is not None:
            written = _Written(checkpoint["id"], event.seq, lists, previous.depth + 1,
                               previous.root_seq, previous.root_time)
        else:
            written = _Written(checkpoint["id"], event.seq, lists, 0, event.seq, time.time())
        self._last[(thread_id, ns)] = written
        self._last.move_to_end((thread_id, ns))
        while len(self._last) > self.max_threads:
            self._last.popitem(last=False)
        return {"configurable": {"thread_id": thread_id, "checkpoint_ns": ns,
                                 "checkpoint_id": checkpoint["id"]}}

    def _deltas(self, thread_id: str, ns: str, parent: Any, values: dict[str, Any]
                ) -> dict[str, list[Any]]:
        """The list channels (a conversation's messages) to store as what they gained since
        the parent checkpoint, when this process wrote that parent: a thread's log then grows
        with its conversation, not with the conversation at every step. Every DELTA_DEPTH
        checkpoints, or when the chain's first one is old enough for retention to come near
        it, a checkpoint is stored whole, so a reader never needs a trimmed event."""
        previous = self._last.get((thread_id, ns))
        retention = self.store.retention
        if (previous is None or previous.id != parent or previous.depth + 1 >= DELTA_DEPTH
                or previous.seq - previous.root_seq > retention.max_events // 4
                or time.time() - previous.root_time > retention.max_age / 4):
            return {}
        deltas: dict[str, list[Any]] = {}
        for channel, value in values.items():
            before = previous.lists.get(channel)
            if (isinstance(value, list) and before is not None and len(value) >= len(before)
                    and value[:len(before)] == before):
                deltas[channel] = value[len(before):]
        return deltas

    async def aput_writes(self, config: RunnableConfig, writes: Sequence[tuple[str, Any]],
                          task_id: str, task_path: str = "") -> None:
        conf = config["configurable"]
        thread_id, ns = str(conf["thread_id"]), str(conf.get("checkpoint_ns", ""))
        cid = str(conf["checkpoint_id"])
        thread = await self._thread(thread_id)
        known = {k for k in await self._written(thread_id, thread, ns, cid)
                 if k[0] == task_id}
        rows = []
        for idx, (channel, value) in enumerate(writes):
            index = WRITES_IDX_MAP.get(channel, idx)
            if index >= 0 and (task_id, index) in known:
                continue  # stored already: a regular write is kept once
            rows.append([index, channel, _encode(self.serde.dumps_typed(value))])
        if rows:
            await self._append(thread_id, {"kind": "writes", "ns": ns, "id": cid,
                                           "task": task_id, "path": task_path,
                                           "writes": rows})

    async def _written(self, thread_id: str, thread: _Thread, ns: str, cid: str
                       ) -> set[tuple[str, int]]:
        keys: set[tuple[str, int]] = set()
        for seq in thread.writes.get((ns, cid), ()):
            data = await self._body(thread_id, thread, seq)
            if data is not None:
                keys.update((str(data.get("task", "")), int(row[0]))
                            for row in data.get("writes") or ()
                            if isinstance(row, list) and row and isinstance(row[0], int))
        return keys

    async def adelete_thread(self, thread_id: str) -> None:
        await self._append(thread_id, {"kind": "delete"})

    async def _append(self, thread_id: str, data: dict[str, Any], key: str | None = None
                      ) -> Event:
        appended = await self.store.append(thread_id, EVENT_TYPE, data, self.sender, key=key)
        thread = self._threads.get(thread_id)
        if thread is not None and thread.epoch == appended.event.epoch:
            async with thread.lock:
                if thread.seq == appended.event.seq - 1:  # caught up: fold it now
                    self._fold(thread_id, thread, appended.event.seq, EVENT_TYPE,
                               appended.event.data)
                    thread.seq = appended.event.seq
        return appended.event

    # The store is asynchronous: the synchronous interface says so instead of blocking.

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        raise NotImplementedError("TetherCheckpointer is async: use ainvoke/astream/aget_state")

    def list(self, config: RunnableConfig | None, *, filter: dict[str, Any] | None = None,
             before: RunnableConfig | None = None, limit: int | None = None
             ) -> Iterator[CheckpointTuple]:
        raise NotImplementedError("TetherCheckpointer is async: use alist")

    def put(self, config: RunnableConfig, checkpoint: Checkpoint,
            metadata: CheckpointMetadata, new_versions: ChannelVersions) -> RunnableConfig:
        raise NotImplementedError("TetherCheckpointer is async: use ainvoke/astream")

    def put_writes(self, config: RunnableConfig, writes: Sequence[tuple[str, Any]],
                   task_id: str, task_path: str = "") -> None:
        raise NotImplementedError("TetherCheckpointer is async: use ainvoke/astream")


# --- the agent ----------------------------------------------------------------------------------


def _text(content: Any) -> str:
    """The text of a message's content: a string, or the text blocks of a list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(b.get("text", "")) if isinstance(b, dict) and b.get("type") == "text"
                       else b if isinstance(b, str) else "" for b in content)
    return ""


def _result(message: ToolMessage) -> Any:
    """A ToolMessage's content as the tool's result: LangGraph's ToolNode stores a tool's
    non-string value as JSON, so JSON text is read back as the value."""
    content = message.content
    if isinstance(content, str):
        try:
            return orjson.loads(content)
        except orjson.JSONDecodeError:
            return content
    return content


def _messages(update: Any) -> list[BaseMessage]:
    """The messages a node's update writes (a dict, or a list of them)."""
    found: list[BaseMessage] = []
    for part in update if isinstance(update, list | tuple) else (update,):
        if isinstance(part, dict):
            value = part.get("messages")
            items = value if isinstance(value, list | tuple) else (value,)
            found += [m for m in items if isinstance(m, BaseMessage)]
    return found


def _unanswered(values: Any) -> list[dict[str, Any]]:
    """The tool calls of the thread's messages that no ToolMessage answers yet."""
    messages = values.get("messages") if isinstance(values, dict) else None
    if not isinstance(messages, list):
        return []
    answered = {m.tool_call_id for m in messages if isinstance(m, ToolMessage)}
    return [dict(c) for m in messages if isinstance(m, AIMessage)
            for c in m.tool_calls if c.get("id") not in answered]


def _pending(snap: StateSnapshot) -> list[dict[str, Any]]:
    """The unanswered tool calls of a state and of the subgraphs its tasks are in."""
    found = _unanswered(snap.values)
    for task in snap.tasks:
        if isinstance(task.state, StateSnapshot):
            found += [c for c in _pending(task.state) if c not in found]
    return found


def _logged(run: Run, type_: str, call: str) -> dict[str, Any]:
    """The data of the run's ``type_`` event for ``call`` in the log, or {}."""
    for _, t, data, _ in run.events:
        if t == type_ and isinstance(data, dict) and data.get("call") == call:
            return data
    return {}


def default_input(texts: list[str], ids: list[str], state: StateSnapshot | None) -> Any:
    """The graph input for new user text: ``{"messages": [HumanMessage, ...]}``.

    Tool calls left unanswered by an earlier run (cancelled, or stopped while it waited) get
    a ToolMessage saying so first: chat models refuse a conversation in which a tool call has
    no answer."""
    messages: list[BaseMessage] = []
    for call in _unanswered(state.values if state is not None else None):
        messages.append(ToolMessage("not run: the run stopped before this call finished",
                                    tool_call_id=call["id"], name=call.get("name"),
                                    status="error"))
    messages += [HumanMessage(text, id=i) for text, i in zip(texts, ids, strict=True)]
    return {"messages": messages}


Graph = Pregel[Any, Any, Any, Any]
InputBuilder = Callable[[list[str], list[str], StateSnapshot | None], Any]


class LangGraphAgent(Agent):
    """A compiled LangGraph graph driven as tether runs; made by :func:`serve`."""

    def __init__(self, graph: Graph, *, name: str, sessions: Sequence[str],
                 client_tools: Sequence[str] = (), input: InputBuilder | None = None,
                 approval_timeout: float | None = None, client_timeout: float | None = 300.0,
                 busy: BusyPolicy | str = BusyPolicy.QUEUE, coalesce_window: float = 0.020,
                 coalesce_bytes: int = 256) -> None:
        super().__init__(name, sessions=sessions, busy=busy, coalesce_window=coalesce_window,
                         coalesce_bytes=coalesce_bytes)
        if graph.checkpointer is False:
            raise ValueError("the graph was compiled with checkpointer=False: tether needs "
                             "LangGraph's checkpoints for interrupts and durability")
        self.graph = graph
        self.client_tools = frozenset(client_tools)
        self.input = input or default_input
        self.approval_timeout = approval_timeout
        self.client_timeout = client_timeout
        self._graphs: dict[int, Graph] = {}  # id(store) → the graph, with a checkpointer

    def graph_for(self, run: Run) -> Graph:
        """The graph with a checkpointer: its own, or one keeping its data in the store."""
        if self.graph.checkpointer is not None:
            return self.graph
        store = run.manager.store
        graph = self._graphs.get(id(store))
        if graph is None:
            saver = TetherCheckpointer(store, sender=Sender(f"agent:{self.name}",
                                                            run.manager.node, "agent"))
            graph = self._graphs[id(store)] = self.graph.copy({"checkpointer": saver})
        return graph

    async def recover(self, run: Run) -> None:
        # The graph's checkpoints say where it was: respond() resumes from them.
        await run.restart_step()

    async def respond(self, run: Run) -> None:
        await _Driver(self, run).drive()


class _Driver:
    """One run of a graph: invocations on the session's thread until nothing is left."""

    def __init__(self, agent: LangGraphAgent, run: Run) -> None:
        self.agent = agent
        self.run = run
        self.graph = agent.graph_for(run)
        self.thread: RunnableConfig = {"configurable": {"thread_id": run.session}}
        state = run.last_checkpoint()
        calls = state.get("calls") if isinstance(state, dict) else None
        # Interrupts ("i:" + interrupt id) → the tether call id each was asked under (and the
        # tool calls they belong to), kept in run.checkpoint so a restart asks again under the
        # same id: which interrupt of a tool call came first cannot be derived.
        self.calls: dict[str, str] = dict(calls) if isinstance(calls, dict) else {}
        self.text: TextStream | None = None
        self.text_cm: contextlib.AbstractAsyncContextManager[TextStream] | None = None
        self.message: str | None = None  # the id of the message being streamed
        self.streamed: set[str] = set()  # ids of the messages streamed so far
        self.asked: dict[str, Any] = {}  # tool_call_id → the model's tool call

    async def drive(self) -> None:
        last: str | None = None
        while True:
            snap = await self.graph.aget_state(self.thread, subgraphs=True)
            self.asked.update({c["id"]: c for c in _pending(snap) if c.get("id")})
            meta: dict[str, Any] = dict(snap.metadata or {})
            mine = meta.get(RUN_KEY) == self.run.id
            fed = int(meta.get(INPUT_KEY) or 0) if mine else 0
            source: Any
            if mine and snap.interrupts:
                source = Command(resume={i.id: await self.answer(i, snap)
                                         for i in snap.interrupts})
            elif mine and snap.next:
                # A step cut off (a restart) or a static breakpoint: run on from the checkpoint.
                here = (snap.config.get("configurable") or {}).get("checkpoint_id")
                if here == last:
                    raise RuntimeError(f"the graph makes no progress at {list(snap.next)}")
                last = here
                source = None
            else:
                texts, ids, fed = self.inputs(fed if mine else None)
                if not texts:
                    return
                source = self.agent.input(texts, ids, None if mine else snap)
            config: RunnableConfig = {**self.thread,
                                      "metadata": {RUN_KEY: self.run.id, INPUT_KEY: fed}}
            await self.stream(source, config)

    def inputs(self, after: int | None) -> tuple[list[str], list[str], int]:
        """User input the graph has not seen: the run's own (when ``after`` is None), then the
        steers (and, for ``busy="merge"``, messages) that arrived after ``after``."""
        run = self.run
        texts: list[str] = []
        ids: list[str] = []
        start = run.record.created_seq or 0
        if after is None:
            texts.append(run.input_text())
            ids.append(f"{run.id}:{start}")
            after = start
        upto = after
        merge = self.agent.busy == BusyPolicy.MERGE
        for seq, type_, data, sender in run.events:
            if seq <= after:
                continue
            steer = type_ == "run.steer" and isinstance(data, dict) and data.get("run") == run.id
            if steer or (merge and type_ == "message" and sender.kind != "agent"):
                texts.append(str(data.get("text", "")) if isinstance(data, dict) else str(data))
                ids.append(f"{run.id}:{seq}")
                upto = seq
        return texts, ids, upto

    # --- one invocation ---

    async def stream(self, source: Any, config: RunnableConfig) -> None:
        # subgraphs=True: a subgraph's model streams its tokens (otherwise LangGraph gives its
        # message whole at the end) and its tool calls are recorded too.
        async for _, mode, chunk in self.graph.astream(source, config, subgraphs=True,
                                                       stream_mode=["messages", "updates"]):
            if mode == "messages" and isinstance(chunk, tuple):
                await self.token(chunk[0])  # (message, metadata)
            elif mode == "updates" and isinstance(chunk, dict):
                await self.end_text()
                for node, update in chunk.items():
                    if node != "__interrupt__":
                        await self.record(update)
        await self.end_text()

    async def token(self, message: Any) -> None:
        if not isinstance(message, AIMessage):  # AIMessageChunk is one too
            return
        delta = _text(message.content)
        whole = not isinstance(message, AIMessageChunk)
        if not delta or (whole and message.id in self.streamed):
            return  # nothing to show, or a whole message whose chunks were streamed
        if self.text is not None and message.id != self.message:
            await self.end_text()
        if self.text is None:
            self.text_cm = self.run.stream_text()
            self.text = await self.text_cm.__aenter__()
            self.message = message.id
            if message.id:
                self.streamed.add(message.id)
        self.text.write(delta)

    async def end_text(self) -> None:
        # Only on the way out of a step that went well: on a cancel or an error the stream
        # stays open in run.text and whoever stops the run ends it, marked.
        if self.text_cm is not None:
            cm, self.text_cm, self.text = self.text_cm, None, None
            await cm.__aexit__(None, None, None)

    async def record(self, update: Any) -> None:
        """Record the tool calls a step answered: ``tool.call`` then ``tool.result``, as a
        native run does. A call is recorded when its ToolMessage comes, not when the model
        asks for it: only then is it known whether the tool ran on the server, waited for an
        approval, or was a front-end tool (an ``interrupt`` says so while the tool runs)."""
        for message in _messages(update):
            if isinstance(message, AIMessage):
                self.asked.update({c["id"]: c for c in message.tool_calls if c["id"]})
            elif isinstance(message, ToolMessage):
                call_id = self.calls.get(message.tool_call_id) or self.derived(
                    message.tool_call_id)
                if _logged(self.run, "tool.result", call_id):
                    continue  # a refusal, or a front-end tool's answer: recorded already
                asked = self.asked.get(message.tool_call_id) or {}
                edited = _logged(self.run, "approval.decision", call_id).get("arguments")
                await self.run.record_tool_call(
                    call_id, message.name or str(asked.get("name", "tool")),
                    edited if isinstance(edited, dict) else asked.get("args") or {})
                if message.status == "error":
                    await self.run.record_tool_result(call_id, error=_text(message.content)
                                                      or "error")
                else:
                    await self.run.record_tool_result(call_id, _result(message))

    # --- interrupts ---

    async def answer(self, interrupt: Interrupt, snap: StateSnapshot) -> Any:
        """Wait, durably, for what resumes ``interrupt``: an approval decision, or a
        front-end tool's result."""
        value = interrupt.value
        if isinstance(value, dict) and isinstance(value.get("action_requests"), list):
            return await self.answer_actions(interrupt, value["action_requests"], snap)
        name, arguments, tool_call = self.describe(interrupt, value, snap)
        call = await self.interrupt_call(interrupt.id, tool_call)
        client = name in self.agent.client_tools or (
            isinstance(value, dict) and value.get("target") == "client")
        if client:
            result = await self.run.client_tool(call, name, arguments,
                                                expires_in=self.agent.client_timeout)
            data = result.data
            return data["result"] if "result" in data else {"error": str(data.get("error"))}
        decision = await self.decide(call, name, arguments)
        return decision

    async def decide(self, call: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        """An approval: the resume value is ``{"decision", "arguments", "by"}``."""
        event: Event = await self.run.approval(call, name, arguments,
                                               expires_in=self.agent.approval_timeout)
        verdict = str(event.data.get("decision"))
        by = str((event.data.get("by") or {}).get("sub", "nobody"))
        if verdict != "approve":
            # Recorded now, like a native refusal: whatever the tool then answers is not a
            # result of running it.
            await self.run.record_tool_result(call, error=f"{verdict} by {by}")
        edited = event.data.get("arguments")
        return {"decision": verdict, "by": by,
                "arguments": edited if isinstance(edited, dict) else arguments}

    async def answer_actions(self, interrupt: Interrupt, actions: list[Any],
                             snap: StateSnapshot) -> dict[str, Any]:
        """LangChain's HumanInTheLoopMiddleware shape: ``{"action_requests": [{"name",
        "args"}, ...]}`` resumed with ``{"decisions": [...]}``, one per action."""
        decisions: list[dict[str, Any]] = []
        pending = _pending(snap)
        for index, action in enumerate(actions):
            action = action if isinstance(action, dict) else {}
            name = str(action.get("name", "action"))
            arguments = action.get("args", action.get("arguments"))
            arguments = arguments if isinstance(arguments, dict) else {}
            match = next((c for c in pending if c.get("name") == name
                          and c.get("args") == arguments), None)
            if match is not None:
                pending.remove(match)
            call = await self.interrupt_call(f"{interrupt.id}:{index}",
                                             match.get("id") if match else None)
            if name in self.agent.client_tools:
                event = await self.run.client_tool(call, name, arguments,
                                                   expires_in=self.agent.client_timeout)
                result = event.data.get("result", {"error": event.data.get("error")})
                decisions.append({"type": "respond", "message": result if isinstance(
                    result, str) else orjson.dumps(result).decode()})
                continue
            decided = await self.decide(call, name, arguments)
            if decided["decision"] != "approve":
                decisions.append({"type": "reject", "message":
                                  f"{decided['decision']} by {decided['by']}"})
            elif decided["arguments"] != arguments:
                decisions.append({"type": "edit", "edited_action": {
                    "name": name, "args": decided["arguments"]}})
            else:
                decisions.append({"type": "approve"})
        return {"decisions": decisions}

    def describe(self, interrupt: Interrupt, value: Any, snap: StateSnapshot
                 ) -> tuple[str, dict[str, Any], str | None]:
        """The name and arguments an interrupt asks about, and the tool call it belongs to.

        The payload convention is ``{"name": ..., "arguments": {...}}`` (``args`` is read
        too; ``tool_call_id`` names the call exactly); any other payload is asked about as
        ``{"value": payload}`` under the name of the node that raised it."""
        name: str | None = None
        arguments: Any = None
        tool_call = None
        if isinstance(value, dict):
            name = value.get("name") if isinstance(value.get("name"), str) else None
            arguments = value.get("arguments", value.get("args"))
            tool_call = value.get("tool_call_id")
        pending = _pending(snap)
        if not isinstance(tool_call, str) or all(c.get("id") != tool_call for c in pending):
            # The first unanswered call of that name (and arguments) not yet asked about.
            used = {v for k, v in self.calls.items() if k.startswith("i:")}
            matches = [c["id"] for c in pending if c.get("id") and c.get("name") == name
                       and (arguments is None or c.get("args") == arguments)]
            tool_call = next((c for c in matches if self.calls.get(c) not in used),
                             matches[0] if matches else None)
        if name is None:
            name = next((t.name for t in snap.tasks if any(i.id == interrupt.id
                                                           for i in t.interrupts)),
                        "interrupt")
            arguments = value if isinstance(value, dict) else {"value": value}
        if not isinstance(arguments, dict):
            arguments = {"value": arguments} if arguments is not None else {}
        return name, arguments, tool_call

    async def interrupt_call(self, key: str, tool_call: str | None) -> str:
        """The tether call id an interrupt is asked under: its tool call's (the first time a
        tool call interrupts), else one of its own."""
        mine = self.calls.get("i:" + key)
        if mine is not None:
            return mine
        if tool_call is not None:
            call = self.calls.get(tool_call) or self.derived(tool_call)
            if call not in {v for k, v in self.calls.items() if k.startswith("i:")}:
                self.calls[tool_call] = call
                self.calls["i:" + key] = call
                await self.run.checkpoint({"calls": self.calls})
                return call
        call = self.calls["i:" + key] = new_call_id()
        await self.run.checkpoint({"calls": self.calls})
        return call

    def derived(self, tool_call: str) -> str:
        """The tether id of a model's tool call: derived from the run id (96 random bits) so
        that a restart finds it again without storing it, and unguessable, which the model's
        own id need not be."""
        digest = hashlib.blake2b(f"{self.run.id}\0{tool_call}".encode(), digest_size=8)
        return "call_" + digest.hexdigest()


def serve(obj: Any, *, sessions: Sequence[str] = ("*",), name: str | None = None,
          client_tools: Sequence[str] = (), input: InputBuilder | None = None,
          approval_timeout: float | None = None, client_timeout: float | None = 300.0,
          busy: BusyPolicy | str = BusyPolicy.QUEUE, coalesce_window: float = 0.020
          ) -> LangGraphAgent:
    """A tether agent running the compiled LangGraph graph ``obj`` on ``sessions``.

    - The graph is invoked on the thread ``thread_id`` = the session, with ``input(texts,
      ids, state)`` for new user text (default :func:`default_input`: ``{"messages":
      [HumanMessage(text), ...]}``), streamed with ``stream_mode=["messages", "updates"]``.
    - ``interrupt({"name": ..., "arguments": {...}})`` in a tool or node asks for an approval
      (``approval.request``, expiring after ``approval_timeout`` seconds if given); the graph
      resumes with ``{"decision": "approve" | "reject" | "expired", "arguments": {...}, "by":
      sub}`` (``arguments``: as edited by the approver, else as asked). A refusal is recorded
      as the call's ``tool.result`` error at once.
    - For a tool named in ``client_tools`` (or a payload with ``"target": "client"``) the
      interrupt is a front-end tool call instead, answered by a client; the graph resumes with
      its ``result`` (or ``{"error": ...}``).
    - LangChain's HumanInTheLoopMiddleware payload (``{"action_requests": [...]}``) is
      answered with ``{"decisions": [...]}``: approve, edit, reject, or respond for a
      front-end tool.
    - Without a checkpointer of its own, the graph gets a :class:`TetherCheckpointer` on the
      server's store; ``checkpointer=False`` is refused.
    """
    if not isinstance(obj, Pregel):
        raise TypeError(f"serve() needs a compiled LangGraph graph, not {type(obj).__name__}")
    graph_name = name or (obj.name if obj.name != "LangGraph" else "langgraph")
    return LangGraphAgent(obj, name=graph_name, sessions=sessions, client_tools=client_tools,
                          input=input, approval_timeout=approval_timeout,
                          client_timeout=client_timeout, busy=busy,
                          coalesce_window=coalesce_window)
