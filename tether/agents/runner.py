"""Runs: agent work that lives in a session and outlives whoever started it.

A :class:`Run` is driven by one node (the one holding its lease) as an asyncio task. Everything
it does is an event in the session log — ``run.created``, ``run.state`` for every transition of
:mod:`tether.agents.state`, token streams, ``tool.call``, ``approval.request``, ``tool.result``
— so the log alone rebuilds it: after a restart the :class:`RunManager` folds the log, ends a
stream that was cut off with a visible ``interrupted`` marker, and continues where the run was
(a run waiting for an approval or a front-end tool keeps waiting).

Participants steer runs by publishing control events (``run.cancel``, ``run.steer``,
``approval.decision``, ``tool.result``). :meth:`RunManager.control` validates each one against
the run's state before anything is written, so an invalid one costs nothing; decisions and
results are deduplicated by the store (idempotency keys), so exactly one counts even when two
devices answer at once on two nodes. A control event addresses only the runs of the session it
is published in, and finds them in the :class:`~tether.agents.index.RunIndex` (kept current
from committed events), never by reading the session's log. Run and call ids are random.

Reading a whole session log happens once per run, for its conversation: in the run's own task
(:meth:`Run.load`) or at recovery, in pages that yield to the event loop.

The session ``tether.runs`` is the index: which runs exist and which are active, schedules,
webhooks, and the leases (``run.claim`` events keyed per lease period, so the store decides
atomically who owns a run; a node that dies stops renewing and another node claims the run).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from tether.agents.agent import Agent, BusyPolicy
from tether.agents.index import RunIndex
from tether.agents.models import Message, ToolCall
from tether.agents.state import (
    FINAL_STATES,
    WAITING_STATES,
    IllegalTransition,
    RunRecord,
    RunState,
    Trigger,
    apply,
    next_state,
)
from tether.protocol.codes import ErrorCode, RequestError
from tether.protocol.events import STREAM_APPEND, STREAM_END, Event, Sender
from tether.store.base import Appended, SessionStore, StoreError

if TYPE_CHECKING:
    from tether.server.auth import Grant

log = logging.getLogger("tether.runs")

RUN_INDEX = "tether.runs"
LEASE_SECONDS = 10.0  # default; ServerConfig.lease_seconds (TETHER_LEASE_SECONDS) overrides
ANSWER_TYPES = frozenset({"approval.decision", "tool.result"})
FINAL = frozenset(str(s) for s in FINAL_STATES)
PAGE = 1000  # events per read of a whole log (recovery, a run's conversation)


class RunStore(SessionStore, Protocol):
    """What runs need of a store: the log, and presence (who declared a front-end tool)."""

    async def presence(self, session: str) -> list[dict[str, Any]]: ...


def new_run_id() -> str:
    """A run id: unguessable (96 random bits), since control events address runs by id."""
    return "run_" + secrets.token_hex(12)


def new_call_id() -> str:
    """A tool call id: unguessable (64 random bits), since a decision or result names it."""
    return "call_" + secrets.token_hex(8)


def conversation(events: list[tuple[int, str, Any, Sender]], instructions: str
                 ) -> list[Message]:
    """The model's view of a session: user messages, answers, tool calls and results."""
    messages = [Message("system", instructions)] if instructions else []
    called: set[str] = set()
    for _, type_, data, sender in events:
        if not isinstance(data, dict):
            if type_ == "message" and isinstance(data, str) and sender.kind != "agent":
                messages.append(Message("user", data))
            continue
        if (type_ == "message" and sender.kind != "agent") or type_ == "run.steer":
            messages.append(Message("user", str(data.get("text", ""))))
        elif type_ == "run.created" and data.get("trigger") != "message":
            # Runs started by the API or a schedule carry their input instead of a message.
            given = data.get("input")
            text = given.get("text") if isinstance(given, dict) else given
            if text:
                messages.append(Message("user", str(text)))
        elif type_ == STREAM_END and data.get("role") == "assistant" and data.get("text"):
            messages.append(Message("assistant", data["text"]))
        elif type_ in ("tool.call", "approval.request") and data.get("call") not in called:
            called.add(data["call"])
            call = ToolCall(data["call"], data["name"], orjson.dumps(data.get("arguments"))
                            .decode())
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant" and last.tool_calls:
                messages[-1] = Message("assistant", last.content, (*last.tool_calls, call))
            else:
                messages.append(Message("assistant", "", (call,)))
        elif type_ == "tool.result":
            body = data["result"] if "result" in data else {"error": data.get("error")}
            messages.append(Message("tool", orjson.dumps(body).decode(),
                                    tool_call_id=data["call"]))
    return messages


class TextStream:
    """Coalesces token deltas: one ``stream.append`` per window or size, whichever first.

    ``write`` never blocks the model; appends go out in order through one sender.
    """

    def __init__(self, run: Run, stream_id: str) -> None:
        self.run = run
        self.id = stream_id
        self.window = run.agent.coalesce_window
        self.limit = run.agent.coalesce_bytes
        self._buffer: list[str] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        self._sending: asyncio.Task[None] | None = None
        self._queue: list[str] = []
        self.started = False
        self.closed = False

    def write(self, text: str) -> None:
        if not text:
            return
        self._buffer.append(text)
        self._size += len(text.encode())
        # The first delta goes out at once: time to first token is what people feel.
        if self._size >= self.limit or (not self.started and self._sending is None):
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.window, self._flush)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._buffer or self.closed:
            return
        self._queue.append("".join(self._buffer))
        self._buffer, self._size = [], 0
        if self._sending is None or self._sending.done():
            self._sending = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        while self._queue:
            text = self._queue.pop(0)
            self.started = True
            await self.run.emit(STREAM_APPEND, {"stream": self.id, "text": text,
                                                "run": self.run.id})

    async def drain(self) -> None:
        """Send everything written so far and wait for its commit."""
        self._flush()
        while self._sending is not None and not self._sending.done():
            await asyncio.shield(self._sending)

    async def end(self, **extra: Any) -> None:
        await self.drain()
        self.closed = True
        if self.started:
            await self.run.emit(STREAM_END, {"stream": self.id, "run": self.run.id,
                                             "role": "assistant", **extra})
            self.started = False


class Run:
    """One run, driven on this node."""

    def __init__(self, manager: RunManager, session: str, record: RunRecord, agent: Agent,
                 events: list[tuple[int, str, Any, Sender]] | None = None) -> None:
        """``events`` is the session log, if the caller has read it already (recovery);
        otherwise the run reads it in its own task (:meth:`load`), not in whoever started it.
        """
        self.manager = manager
        self.session = session
        self.record = record
        self.agent = agent
        self.id = record.run
        self.events: list[tuple[int, str, Any, Sender]] = []  # the log as seen, in seq order
        self.seen: set[int] = set()
        self.loaded = False
        self.task: asyncio.Task[None] | None = None
        self.text: TextStream | None = None
        self.arrived: dict[str, Event] = {}  # decisions and results by call id
        self.cancel_by: dict[str, Any] | None = None  # who a run.cancel in the log came from
        self.cancelling = False  # this node is stopping the run (and records the cancel)
        self._wakeup = asyncio.Event()
        self._steered_to: int | None = None  # take_steers: the seq read up to
        self.sender = Sender(f"agent:{agent.name}", manager.node, "agent")
        if events is not None:
            self._loaded(events)

    async def load(self) -> None:
        """Read the session log this run works from: the model's conversation.

        Once per run, in the run's task, in pages that yield to the event loop. Events the
        live channel delivered meanwhile are merged in by seq.
        """
        self._loaded(await self.manager.session_log(self.session))

    def _loaded(self, events: list[tuple[int, str, Any, Sender]]) -> None:
        if self.events:  # observed live while the log was read
            known = {e[0] for e in events}
            events = sorted(events + [e for e in self.events if e[0] not in known],
                            key=lambda e: e[0])
        self.events = events
        self.seen = {e[0] for e in events}
        self.loaded = True
        for seq, type_, data, sender in events:  # answers (and a cancel) already in the log
            if type_ in ANSWER_TYPES:
                self._take_answer(Event(self.session, "", seq, type_, data, sender, 0))
            elif type_ == "run.cancel":
                self._take_cancel(data)

    # --- output ---------------------------------------------------------------------------

    async def emit(self, type: str, data: Any) -> Event:
        appended = await self.manager.store.append(self.session, type, data, self.sender)
        self.observe(appended.event)
        return appended.event

    async def transition(self, trigger: Trigger, **extra: Any) -> None:
        state = next_state(self.record.state, trigger)  # raises before anything is written
        await self.emit("run.state", {"run": self.id, "state": str(state),
                                      "trigger": str(trigger), **extra})
        self.record.state = state
        await self.manager.index(self, state)

    def messages(self) -> list[Message]:
        return conversation(self.events, self.agent.instructions)

    @contextlib.asynccontextmanager
    async def stream_text(self) -> AsyncIterator[TextStream]:
        """A coalescing text stream for one model step; ended when the block exits."""
        streams = sum(1 for _, t, d, _ in self.events
                      if t == STREAM_END and isinstance(d, dict) and d.get("run") == self.id)
        text = self.text = TextStream(self, f"{self.id}.{streams}")
        # On an exception (a cancel, a failure) the stream stays in self.text: whoever stops
        # the run ends it with an ``interrupted`` marker, after what was written so far.
        yield text
        await text.end()
        self.text = None

    async def set_state(self, snapshot: Any) -> None:
        """Publish the agent's shared state (AG-UI STATE_SNAPSHOT)."""
        await self.emit("run.snapshot", {"run": self.id, "snapshot": snapshot})

    async def update_state(self, delta: list[dict[str, Any]]) -> None:
        """Change the agent's shared state with a JSON Patch (AG-UI STATE_DELTA)."""
        await self.emit("run.delta", {"run": self.id, "delta": delta})

    async def fail(self, error: str) -> None:
        if self.text is not None:
            await self.text.end(interrupted="failed")
            self.text = None
        await self.transition(Trigger.FAIL, error=error)

    # --- tools ----------------------------------------------------------------------------

    async def call_tool(self, call_id: str, name: str, arguments_json: str) -> None:
        """Call tool ``name``. ``call_id`` names the call in the log, and a decision or a
        front-end result must name it: pass ``""`` to get an unguessable one (as the default
        agent loop does) unless the id is already unique and unpredictable."""
        call_id = call_id or new_call_id()
        tool = self.agent.tools.get(name)
        try:
            arguments = orjson.loads(arguments_json or "{}")
        except orjson.JSONDecodeError:
            arguments = None
        if tool is None or not isinstance(arguments, dict):
            await self.emit("tool.call", {"run": self.id, "call": call_id, "name": name,
                                          "arguments": arguments, "target": "server"})
            problem = f"unknown tool {name!r}" if tool is None else "arguments are not an object"
            await self.emit("tool.result", {"run": self.id, "call": call_id, "error": problem})
            return
        if tool.requires_approval:
            decision = await self.approval(call_id, name, arguments, expires_in=tool.timeout)
            await self._decided(call_id, name, arguments, decision)
            return
        await self.run_tool(call_id, name, arguments)

    async def _decided(self, call_id: str, name: str, arguments: dict[str, Any],
                       decision: Event) -> None:
        """Run the tool an approval allowed (with edited arguments), or record the refusal."""
        if decision.data.get("decision") != "approve":
            by = decision.data.get("by", {}).get("sub", "nobody")
            verdict = decision.data.get("decision")
            await self.emit("tool.result", {"run": self.id, "call": call_id,
                                            "error": f"{verdict} by {by}"})
            return
        if isinstance(decision.data.get("arguments"), dict):
            arguments = decision.data["arguments"]
        await self.run_tool(call_id, name, arguments)

    async def run_tool(self, call_id: str, name: str, arguments: dict[str, Any]) -> None:
        tool = self.agent.tools[name]
        if tool.client_side:
            await self.client_tool(call_id, name, arguments, expires_in=tool.timeout)
            return
        await self.emit("tool.call", {"run": self.id, "call": call_id, "name": name,
                                      "arguments": arguments, "target": "server"})
        try:
            result = await tool.call(arguments)
            body: dict[str, Any] = {"result": result}
            orjson.dumps(result)
        except Exception as exc:
            body = {"error": f"{type(exc).__name__}: {exc}"}
        await self.emit("tool.result", {"run": self.id, "call": call_id, **body})

    # --- for agents that run their own loop (framework integrations) -----------------------
    #
    # Each of these is idempotent over the log: after a restart, an agent that replays its
    # own persisted state calls them again with the same call ids, and they write only what
    # the log does not hold yet, then wait (or return at once when the answer is in).

    async def record_tool_call(self, call_id: str, name: str, arguments: Any) -> None:
        """Record a server tool call the agent's framework runs itself."""
        if not self._data_of("tool.call", call_id):
            await self.emit("tool.call", {"run": self.id, "call": call_id, "name": name,
                                          "arguments": arguments, "target": "server"})

    async def record_tool_result(self, call_id: str, result: Any = None, *,
                                 error: str | None = None) -> None:
        """Record the result (or the error) of a server tool call the framework ran."""
        if self._data_of("tool.result", call_id):
            return
        if error is None:
            try:
                orjson.dumps(result)
            except TypeError:
                result = str(result)
        body: dict[str, Any] = {"result": result} if error is None else {"error": error}
        await self.emit("tool.result", {"run": self.id, "call": call_id, **body})

    async def approval(self, call_id: str, name: str, arguments: dict[str, Any], *,
                       expires_in: float | None = None) -> Event:
        """Ask for an approval of the call and wait, durably, for the decision (an
        ``approval.decision`` event: ``decision`` is approve, reject or expired, and an
        approval may carry edited ``arguments``)."""
        if not self._data_of("approval.request", call_id):
            expires = int((time.time() + expires_in) * 1000) if expires_in else None
            await self.emit("approval.request", {"run": self.id, "call": call_id, "name": name,
                                                 "arguments": arguments, "expires_at": expires})
        request = self._data_of("approval.request", call_id)
        if not self._transitioned(Trigger.REQUEST_APPROVAL, call_id):
            await self.transition(Trigger.REQUEST_APPROVAL, call=call_id)
        decision = await self.wait_for(call_id, request.get("expires_at"))
        if not self._transitioned(Trigger.DECISION, call_id):
            await self.transition(Trigger.DECISION, call=call_id)
        return decision

    async def client_tool(self, call_id: str, name: str, arguments: Any, *,
                          expires_in: float | None = 300.0) -> Event:
        """Call a front-end tool and wait, durably, for its ``tool.result`` (``result`` or
        ``error``). The call is addressed to the clients present that declared the tool (in
        hello or presence); any client may still answer, the first valid answer wins."""
        if not self._data_of("tool.call", call_id):
            expires = int((time.time() + expires_in) * 1000) if expires_in else None
            members = await self.manager.store.presence(self.session)
            clients = [m.get("member") for m in members
                       if name in (m.get("tools") or ())
                       or name in ((m.get("state") or {}).get("tools") or ())]
            await self.emit("tool.call", {"run": self.id, "call": call_id, "name": name,
                                          "arguments": arguments, "target": "client",
                                          "clients": clients, "expires_at": expires})
        call = self._data_of("tool.call", call_id)
        if not self._transitioned(Trigger.CALL_CLIENT_TOOL, call_id):
            await self.transition(Trigger.CALL_CLIENT_TOOL, call=call_id)
        result = await self.wait_for(call_id, call.get("expires_at"))
        if not self._transitioned(Trigger.TOOL_RESULT, call_id):
            await self.transition(Trigger.TOOL_RESULT, call=call_id)
        return result

    async def checkpoint(self, state: Any) -> None:
        """Persist the agent's own state (a framework's serialised run state) in the log, so
        the run resumes from it after a restart: :meth:`last_checkpoint` reads it back."""
        await self.emit("run.checkpoint", {"run": self.id, "state": state})

    def last_checkpoint(self) -> Any:
        """The state of this run's newest ``run.checkpoint``, or None."""
        for _, type_, data, _ in reversed(self.events):
            if type_ == "run.checkpoint" and isinstance(data, dict) \
                    and data.get("run") == self.id:
                return data.get("state")
        return None

    def input_text(self) -> str:
        """The text that started this run: a person's message, or the API's or a
        schedule's input."""
        given = self.record.input
        text = given.get("text") if isinstance(given, dict) else given
        return str(text) if text is not None else ""

    def take_steers(self) -> list[str]:
        """The ``run.steer`` texts for this run that arrived since the last call (or since
        its newest checkpoint, after a restart): steer is new user input at a safe point."""
        if self._steered_to is None:
            self._steered_to = max((seq for seq, t, d, _ in self.events
                                    if t == "run.checkpoint" and isinstance(d, dict)
                                    and d.get("run") == self.id), default=0)
        texts = [str(d.get("text", "")) for seq, t, d, _ in self.events
                 if seq > self._steered_to and t == "run.steer" and isinstance(d, dict)
                 and d.get("run") == self.id]
        self._steered_to = max(self.seen, default=self._steered_to)
        return texts

    def _transitioned(self, trigger: Trigger, call_id: str) -> bool:
        return any(t == "run.state" and isinstance(d, dict) and d.get("run") == self.id
                   and d.get("trigger") == str(trigger) and d.get("call") == call_id
                   for _, t, d, _ in self.events)

    async def wait_for(self, call_id: str, expires_at: int | None) -> Event:
        """Wait, durably, for the decision or result of ``call_id`` (or its expiry)."""
        while call_id not in self.arrived:
            timeout = 2.0  # re-read the log now and then: live channels may drop events
            if expires_at is not None:
                timeout = min(timeout, max(0.0, expires_at / 1000 - time.time()))
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            if call_id in self.arrived:
                break
            await self.sync()
            if expires_at is not None and time.time() * 1000 >= expires_at \
                    and call_id not in self.arrived:
                await self.manager.expire(self, call_id)
        return self.arrived[call_id]

    # --- input ------------------------------------------------------------------------------

    def observe(self, event: Event) -> None:
        """Take in one committed event of the session (own output, control, messages)."""
        if event.transient or event.seq in self.seen:
            return
        self.seen.add(event.seq)
        self.events.append((event.seq, event.type, event.data, event.sender))
        if len(self.events) > 1 and self.events[-2][0] > event.seq:
            self.events.sort(key=lambda e: e[0])  # an event that the live channel delayed
        self._take_answer(event)
        if event.type == "run.cancel" and self._take_cancel(event.data) and self.loaded:
            # Written by another node (this one sets ``cancelling`` before it writes one):
            # stop, and record the state. Before the log is loaded, drive() sees it instead.
            self.manager.background(self.manager.stop_cancelled(self))

    def _take_cancel(self, data: Any) -> bool:
        """Note a ``run.cancel`` of this run; True if this node has yet to act on it."""
        if not isinstance(data, dict) or data.get("run") != self.id or self.cancel_by is not None:
            return False
        by = data.get("by")
        self.cancel_by = by if isinstance(by, dict) else {}
        return not self.cancelling

    def _take_answer(self, event: Event) -> None:
        data = event.data
        if (isinstance(data, dict) and data.get("run") == self.id
                and event.type in ANSWER_TYPES
                and event.sender.kind != "agent"):
            self.arrived[data["call"]] = event
            self._wakeup.set()

    async def sync(self) -> None:
        """Read what the live channel may have missed from the log."""
        after = max(self.seen, default=0)
        for event in await self.manager.store.read(self.session, after, 1000):
            self.observe(event)

    # --- driving ----------------------------------------------------------------------------

    async def drive(self) -> None:
        try:
            if not self.loaded:
                await self.load()
            if self.cancel_by is not None and not self.cancelling:
                # Cancelled before it got going (while queued, or its cancel was written but
                # its node stopped before recording the state): record it, do nothing else.
                self.cancelling = True
                await self._end_cut_streams("cancelled")
                await self.transition(Trigger.CANCEL, by=self.cancel_by)
                return
            await self.agent.recover(self)
            if self.record.state == RunState.QUEUED:
                await self.transition(Trigger.START)
            await self.agent.respond(self)
            if self.record.state == RunState.RUNNING:
                await self.transition(Trigger.COMPLETE)
            elif not self.record.final:  # a custom respond() returned mid-wait
                await self.fail(f"the agent returned while the run was {self.record.state}")
        except asyncio.CancelledError:
            raise
        except (IllegalTransition, StoreError) as exc:
            log.warning("run %s stopped: %s", self.id, exc)
        except Exception as exc:
            log.exception("run %s failed", self.id)
            with contextlib.suppress(Exception):
                await self.fail(f"{type(exc).__name__}: {exc}")
        finally:
            self.manager.finished(self)

    async def restart_step(self) -> None:
        """A run that was ``running`` when its node stopped: end the streams that were cut
        off, visibly (``interrupted: restarted``), and record the restart. Nothing when the
        run was not running (queued, or waiting)."""
        if self.record.state == RunState.RUNNING:
            await self._end_cut_streams("restarted")
            await self.transition(Trigger.RESTART)

    async def resume(self) -> None:
        """Continue a run recovered from the log (after a restart or a lease change): what
        :meth:`Agent.recover` does for agents driven by :meth:`Agent.respond`'s loop."""
        if self.record.state == RunState.RUNNING:
            # It was streaming when its node stopped: end what was cut off, visibly, and
            # run the step again (the model sees the same history, so no text is lost).
            await self.restart_step()
            # A server tool whose result is missing is called again (at least once).
            for call in self._calls_without_result("server"):
                await self.run_tool(call["call"], call["name"], call.get("arguments") or {})
        state = self.record.state
        if state in WAITING_STATES:
            # Waiting when its node stopped: keep waiting (the answer may already be in the
            # log), then carry on exactly as the live run would have.
            awaited = self._awaited_call()
            if state == RunState.AWAITING_APPROVAL:
                request = self._data_of("approval.request", awaited)
                decision = await self.wait_for(awaited, request.get("expires_at"))
                await self.transition(Trigger.DECISION, call=awaited)
                await self._decided(awaited, request["name"], request.get("arguments") or {},
                                    decision)
            else:
                await self.wait_for(awaited, self._data_of("tool.call", awaited).get("expires_at"))
                await self.transition(Trigger.TOOL_RESULT, call=awaited)

    async def _end_cut_streams(self, why: str) -> None:
        """End this run's streams that a stopped node left open, marked ``interrupted``."""
        ended = {d.get("stream") for _, t, d, _ in self.events
                 if t == STREAM_END and isinstance(d, dict)}
        cut = [d["stream"] for _, t, d, _ in self.events
               if t == STREAM_APPEND and isinstance(d, dict) and d.get("run") == self.id
               and d["stream"] not in ended]
        for stream in dict.fromkeys(cut):
            await self.emit(STREAM_END, {"stream": stream, "run": self.id,
                                         "role": "assistant", "interrupted": why})

    def _awaited_call(self) -> str:
        for _, type_, data, _ in reversed(self.events):
            if type_ == "run.state" and isinstance(data, dict) and data.get("run") == self.id:
                return str(data["call"])
        raise IllegalTransition(self.record.state, Trigger.RESTART)

    def _data_of(self, type_: str, call: str) -> dict[str, Any]:
        for _, t, data, _ in self.events:
            if t == type_ and isinstance(data, dict) and data.get("call") == call:
                return data
        return {}

    def _calls_without_result(self, target: str) -> list[dict[str, Any]]:
        results = {d.get("call") for _, t, d, _ in self.events
                   if t == "tool.result" and isinstance(d, dict)}
        return [d for _, t, d, _ in self.events
                if t == "tool.call" and isinstance(d, dict) and d.get("run") == self.id
                and d.get("target") == target and d["call"] not in results]


class RunManager:
    """Starts, steers, recovers and hands over the runs of this node."""

    def __init__(self, store: RunStore, node: str,
                 on_change: Callable[[str, str, RunState], Any] | None = None,
                 lease_seconds: float = LEASE_SECONDS) -> None:
        self.store = store
        self.node = node
        self.lease_seconds = lease_seconds
        self.agents: list[Agent] = []
        self.runs: dict[str, Run] = {}  # driven on this node
        self.queued: dict[str, list[str]] = {}  # session → run ids waiting their turn
        self.locks: dict[str, asyncio.Lock] = {}
        self.system = Sender("tether", node, "system")
        self.on_change = on_change  # (session, run, state): webhooks
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self.claimed: dict[str, int] = {}  # run → last lease period this node holds
        self.run_tables = RunIndex(store)  # session → its runs, for validating control events
        # The active runs of the run index, followed incrementally (see active_runs).
        self._active: dict[str, str] = {}
        self._active_seq = 0
        self._active_epoch: str | None = None
        self._active_lock = asyncio.Lock()

    def register(self, agent: Agent) -> None:
        self.agents.append(agent)

    def agent_for(self, session: str, name: str | None = None) -> Agent | None:
        if session.startswith("tether."):
            return None
        for agent in self.agents:
            if (name is None or agent.name == name) and agent.serves(session):
                return agent
        return None

    def lock(self, session: str) -> asyncio.Lock:
        lock = self.locks.get(session)
        if lock is None:
            lock = self.locks[session] = asyncio.Lock()
        return lock

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        await self.reclaim()
        self._tasks.append(asyncio.get_running_loop().create_task(self._lease_loop()))

    async def stop(self) -> None:
        """Stop driving runs; they stay active in the log and resume on the next start."""
        for task in (*self._tasks, *self._background):
            task.cancel()
        for run in list(self.runs.values()):
            if run.task is not None:
                run.task.cancel()
        await asyncio.gather(*(r.task for r in self.runs.values() if r.task),
                             *self._background, return_exceptions=True)
        self.run_tables.close()

    async def _lease_loop(self) -> None:
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            try:
                await self.reclaim()
            except StoreError as exc:
                log.warning("lease renewal failed: %s", exc)

    def _period(self, offset: int = 0) -> int:
        return int(time.time() // self.lease_seconds) + offset

    async def claim(self, run: str, period: int) -> bool:
        """Own ``run`` for one lease period; the store's idempotency keys decide the race."""
        appended = await self.store.append(RUN_INDEX, "run.claim",
                                           {"run": run, "node": self.node, "period": period},
                                           Sender("tether", "lease", "system"),
                                           key=f"claim:{run}:{period}")
        return bool(appended.event.data.get("node") == self.node)

    async def reclaim(self) -> None:
        """Renew leases of our runs; claim active runs whose owner stopped renewing."""
        active = await self.active_runs()
        now = self._period()
        for run_id, session in active.items():
            if self.claimed.get(run_id, -1) > now:
                continue  # held through the next period already
            owned = await self.claim(run_id, now)
            if owned and await self.claim(run_id, now + 1):
                self.claimed[run_id] = now + 1
            local = self.runs.get(run_id)
            if owned and local is None and run_id not in self._queued_ids():
                await self.recover(session, run_id)
            elif not owned and local is not None and local.task is not None:
                log.warning("run %s is now owned by another node", run_id)
                local.task.cancel()

    def _queued_ids(self) -> set[str]:
        return {r for runs in self.queued.values() for r in runs}

    async def active_runs(self) -> dict[str, str]:
        """Runs the index says are not finished: run id → session.

        The run index gets a ``run.claim`` per run and lease period, so it is read once and
        then followed: each call reads only what was appended since the previous one.
        """
        async with self._active_lock:
            head = await self.store.head(RUN_INDEX)
            if head.epoch != self._active_epoch or head.last_seq < self._active_seq:
                self._active, self._active_seq = {}, 0  # a new log: read it from the start
                self._active_epoch = head.epoch
            while True:
                page = await self.store.read(RUN_INDEX, self._active_seq, PAGE)
                for event in page:
                    data = event.data
                    if event.type == "run.index" and isinstance(data, dict):
                        if data["state"] in FINAL:
                            self._active.pop(data["run"], None)
                        else:
                            self._active[data["run"]] = data["session"]
                if page:
                    self._active_seq = page[-1].seq
                if len(page) < PAGE:
                    return dict(self._active)
                await asyncio.sleep(0)

    async def index(self, run: Run, state: RunState) -> None:
        if state in FINAL_STATES:
            await self.store.append(RUN_INDEX, "run.index", {
                "run": run.id, "session": run.session, "state": str(state),
                "agent": run.agent.name}, self.system)
            self.claimed.pop(run.id, None)
            if run.task is not None:  # the session's active run ended (not a queued one)
                self._start_next(run.session)
        if self.on_change is not None:
            self.on_change(run.session, run.id, state)

    async def session_log(self, session: str) -> list[tuple[int, str, Any, Sender]]:
        """The whole log of ``session``, read in pages that yield to the event loop.

        Only a run's own conversation needs this (:meth:`Run.load`, :meth:`recover`): once
        per run, in the lease loop or the run's task, never in a request handler. Control
        events are validated against :attr:`run_tables` instead.
        """
        events: list[tuple[int, str, Any, Sender]] = []
        after = 0
        while True:
            page = await self.store.read(session, after, PAGE)
            events += [(e.seq, e.type, e.data, e.sender) for e in page]
            if len(page) < PAGE:
                return events
            after = page[-1].seq
            await asyncio.sleep(0)

    async def recover(self, session: str, run_id: str) -> Run | None:
        """Drive ``run_id`` here from where its log left it (after a restart, a lease change,
        or its turn in the queue). Reads the session log once, for the run's conversation,
        and folds it (per page) to find where the run was; called from the lease loop and
        from background tasks only."""
        events = await self.session_log(session)
        runs: dict[str, RunRecord] = {}
        for i, (seq, type_, data, _) in enumerate(events):
            apply(runs, seq, type_, data)
            if i % PAGE == PAGE - 1:
                await asyncio.sleep(0)
        record = runs.get(run_id)
        if record is None or record.final:
            return None
        agent = self.agent_for(session, record.agent)
        if agent is None:
            log.warning("run %s needs agent %r, which is not registered", run_id, record.agent)
            return None
        log.info("resuming run %s in %s (%s)", run_id, session, record.state)
        return self._launch(session, record, agent, events)

    def background(self, work: Any) -> None:
        """Run ``work`` (a coroutine) as a task this manager keeps until it is done."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _launch(self, session: str, record: RunRecord, agent: Agent,
                events: list[tuple[int, str, Any, Sender]] | None = None) -> Run:
        run = Run(self, session, record, agent, events)
        self.runs[run.id] = run
        self.store.listen(session, run.observe)
        run.task = asyncio.get_running_loop().create_task(run.drive())
        return run

    def finished(self, run: Run) -> None:
        """``run`` is no longer driven here (it ended, was cancelled, or changed owner)."""
        if self.runs.get(run.id) is run:
            del self.runs[run.id]
            self.store.unlisten(run.session, run.observe)

    def _start_next(self, session: str) -> None:
        queued = self.queued.get(session)
        if queued:
            next_id = queued.pop(0)
            if not queued:
                del self.queued[session]
            self.background(self.recover(session, next_id))

    def active_in(self, session: str) -> Run | None:
        for run in self.runs.values():
            if run.session == session and not run.record.final:
                return run
        return None

    # --- starting runs ----------------------------------------------------------------------

    async def on_committed(self, event: Event) -> None:
        """A publish committed on this node: a person's message may start a run."""
        if event.type != "message" or event.sender.kind == "agent" or event.transient:
            return
        agent = self.agent_for(event.session)
        if agent is None:
            return
        text = event.data.get("text") if isinstance(event.data, dict) else event.data
        active = self.active_in(event.session)
        if active is not None:
            if agent.busy == BusyPolicy.MERGE:
                return  # the active run sees the message in its history at its next step
            if agent.busy == BusyPolicy.INTERRUPT:
                await self.cancel(active, self.system.to_dict(), "interrupted by a new message")
        await self.create_run(event.session, agent, {"text": text, "message_seq": event.seq},
                              "message")

    async def create_run(self, session: str, agent: Agent, input: Any, trigger: str) -> str:
        run_id = new_run_id()
        async with self.lock(session):
            created = await self.store.append(session, "run.created", {
                "run": run_id, "agent": agent.name, "trigger": trigger, "input": input},
                Sender(f"agent:{agent.name}", self.node, "agent"))
            record = RunRecord(run_id, agent.name, trigger=trigger, input=input,
                               created_seq=created.event.seq)
            now = self._period()
            if await self.claim(run_id, now) and await self.claim(run_id, now + 1):
                self.claimed[run_id] = now + 1
            busy = self.active_in(session) is not None or self.queued.get(session)
            await self.store.append(RUN_INDEX, "run.index", {
                "run": run_id, "session": session, "state": "queued", "agent": agent.name},
                self.system)
            if busy:
                self.queued.setdefault(session, []).append(run_id)
                return run_id
            self._launch(session, record, agent)  # the run reads the log in its own task
        return run_id

    # --- control events -------------------------------------------------------------------

    async def control(self, session: str, type: str, data: Any, sender: Sender,
                      grant: Grant) -> Appended:
        """Validate and apply a control event; nothing is written when it is refused."""
        if not isinstance(data, dict) or not isinstance(data.get("run"), str):
            raise RequestError(ErrorCode.INVALID, f"{type} data needs a 'run' id")
        async with self.lock(session):
            # The run must be one of *this* session's runs: a grant on one session says
            # nothing about runs elsewhere, whatever their id.
            record = await self.run_tables.lookup(session, data["run"])
            if record is None:
                raise RequestError(ErrorCode.RUN_NOT_FOUND,
                                   f"no run {data['run']!r} in {session!r}")
            local = self.runs.get(record.run)
            if local is not None and local.session != session:
                local = None  # unreachable while run ids are unique; never act across sessions
            if record.final:
                raise RequestError(ErrorCode.RUN_FINISHED, f"run {record.run} is {record.state}")
            by = {"sub": sender.sub, "client": sender.client}
            if type == "run.cancel":
                if local is not None:
                    return await self.cancel(local, by, str(data.get("reason", "")))
                if record.run in self.queued.get(session, ()):
                    return await self._cancel_queued(session, record, by,
                                                     str(data.get("reason", "")))
                # Driven by another node (or by nobody until its lease is taken over): the
                # driving node stops on seeing the cancel, and records the state.
                return await self.store.append(session, "run.cancel", {
                    "run": record.run, "by": by, "reason": str(data.get("reason", ""))},
                    self.system, key=f"cancel:{record.run}")
            if type == "run.steer":
                if not isinstance(data.get("text"), str) or not data["text"]:
                    raise RequestError(ErrorCode.INVALID, "run.steer needs 'text'")
                return await self.store.append(session, "run.steer", {
                    "run": record.run, "text": data["text"], "by": by}, sender)
            call = data.get("call")
            pending = record.pending.get(call) if isinstance(call, str) else None
            if type == "approval.decision":
                if not grant.allows(session, "approve"):
                    raise RequestError(ErrorCode.FORBIDDEN, "deciding needs the 'approve' "
                                                            "capability")
                if pending is None or pending.kind != "approval":
                    raise RequestError(ErrorCode.UNKNOWN_CALL,
                                       f"run {record.run} awaits no approval for {call!r}")
                decision = data.get("decision")
                if decision not in ("approve", "reject"):
                    raise RequestError(ErrorCode.INVALID, "decision must be approve or reject")
                body = {"run": record.run, "call": call, "decision": decision, "by": by}
                if decision == "approve" and data.get("arguments") is not None:
                    if not isinstance(data["arguments"], dict):
                        raise RequestError(ErrorCode.INVALID, "edited arguments must be an "
                                                              "object")
                    body["arguments"] = data["arguments"]
                appended = await self.store.append(session, "approval.decision", body,
                                                   self.system, key=f"decide:{record.run}:{call}")
            else:  # tool.result from a front-end tool
                if pending is None or pending.kind != "client":
                    raise RequestError(ErrorCode.UNKNOWN_CALL,
                                       f"run {record.run} awaits no tool result for {call!r}")
                body = {"run": record.run, "call": call, "by": by}
                if "error" in data:
                    body["error"] = str(data["error"])
                else:
                    body["result"] = data.get("result")
                appended = await self.store.append(session, "tool.result", body, self.system,
                                                   key=f"result:{record.run}:{call}")
            if appended.duplicate:
                raise RequestError(ErrorCode.ALREADY_DECIDED,
                                   f"{call!r} of run {record.run} was already answered")
            if local is not None:
                local.observe(appended.event)
            return appended

    async def cancel(self, run: Run, by: dict[str, str], reason: str) -> Appended:
        """Stop ``run`` first, then record it: no delta can follow the cancel in the log."""
        run.cancelling = True
        await self._halt(run)
        appended = await self.store.append(run.session, "run.cancel", {
            "run": run.id, "by": by, "reason": reason}, self.system, key=f"cancel:{run.id}")
        run.observe(appended.event)
        if not run.record.final:
            await run.transition(Trigger.CANCEL, by=by)
        return appended

    async def _halt(self, run: Run) -> None:
        """Stop driving ``run``: its task, its wait, its stream (ended as ``cancelled``)."""
        task = run.task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if run.text is not None:
            await run.text.end(interrupted="cancelled")
            run.text = None
        self.finished(run)

    async def stop_cancelled(self, run: Run) -> None:
        """A ``run.cancel`` written by another node reached the run driven here: stop it,
        then record the state (the cancel itself is in the log already)."""
        if run.cancelling:
            return
        run.cancelling = True
        try:
            await self._halt(run)
            if not run.record.final:
                await run.transition(Trigger.CANCEL, by=run.cancel_by or {})
        except (IllegalTransition, StoreError) as exc:
            log.warning("run %s: recording its cancel failed: %s", run.id, exc)

    async def _cancel_queued(self, session: str, record: RunRecord, by: dict[str, str],
                             reason: str) -> Appended:
        """Cancel a run waiting its turn on this node: it leaves the queue, never starts."""
        queued = self.queued.get(session, [])
        if record.run in queued:
            queued.remove(record.run)
        if not queued:
            self.queued.pop(session, None)
        agent = self.agent_for(session, record.agent) or Agent(record.agent)
        run = Run(self, session, RunRecord(record.run, record.agent, state=record.state,
                                           trigger=record.trigger,
                                           created_seq=record.created_seq), agent, [])
        run.cancelling = True
        appended = await self.store.append(session, "run.cancel", {
            "run": run.id, "by": by, "reason": reason}, self.system, key=f"cancel:{run.id}")
        await run.transition(Trigger.CANCEL, by=by)  # run.task is None: the queue stays
        return appended

    async def expire(self, run: Run, call: str) -> None:
        """A decision or front-end result did not come in time: record that, once."""
        async with self.lock(run.session):
            if call in run.arrived:
                return
            pending_kind = "approval" if run.record.state == RunState.AWAITING_APPROVAL \
                else "client"
            if pending_kind == "approval":
                appended = await self.store.append(run.session, "approval.decision", {
                    "run": run.id, "call": call, "decision": "expired",
                    "by": {"sub": "tether", "client": self.node}},
                    self.system, key=f"decide:{run.id}:{call}")
            else:
                appended = await self.store.append(run.session, "tool.result", {
                    "run": run.id, "call": call, "error": "timed out",
                    "by": {"sub": "tether", "client": self.node}},
                    self.system, key=f"result:{run.id}:{call}")
            event = appended.event
            run.observe(event)
            if call not in run.arrived:  # a duplicate: the original answer is in the log
                run.arrived[call] = event
