"""The OpenAI Agents SDK (``openai-agents``): an ``agents.Agent`` served as a durable tether run.

::

    agent = agents.Agent(name="helper", model=..., tools=[add, deploy, ask])
    server.runs.register(serve(agent, sessions=["chat-*"]))   # or tether serve --agent m:agent

How each part of a run maps (docs/agents.md has the table):

- **Streaming.** ``Runner.run_streamed``; the text deltas of its raw response events go into a
  coalesced tether stream, one per model step.
- **Server tools.** The SDK runs them; its ``tool_called`` / ``tool_output`` items become
  ``tool.call`` / ``tool.result`` (the result is the function's own return value).
- **Approvals.** A ``@function_tool(needs_approval=True)`` call interrupts the SDK run: the
  adapter checkpoints the SDK's own serialised ``RunState`` in the log (``run.checkpoint``),
  asks for a tether approval and waits in the log; the decision is applied with
  ``state.approve`` / ``state.reject`` and the run goes on from that state — after a SIGKILL
  too, from the checkpoint.
- **Front-end tools.** :func:`client_function_tool` declares one in the SDK's idiom (a typed
  stub, like ``@function_tool``); ``serve(client_tools=[...])`` adds tether ``client_tool``
  specs. Such a tool interrupts the SDK run the same way: the call goes to the browsers that
  declared it (``run.client_tool``), waits durably, and the tool returns the client's answer
  when the run goes on.
- **Cancel.** The run's task is cancelled: the SDK's stream is cancelled at its next await.
- **Steer.** The SDK takes no input mid-turn, so a steer is the user input of a follow-up turn,
  started when the current one ends, before the run completes.
- **Memory.** :class:`TetherSession` is an SDK ``Session`` whose items are ``tether.items``
  events in the tether session itself, so the SDK's conversation memory is the log the UIs
  follow; every run of a session continues its conversation.
- **Durability.** After a SIGKILL a run restarts from its newest checkpoint (an interruption's
  ``RunState``, or the input of a follow-up turn); the items the cut-off step had written to
  the memory are dropped first (one ``tether.items`` pop), and the step runs again. Server
  tools of a step run again are called again (at least once, as in native runs); their
  ``tool.call`` / ``tool.result`` are recorded once.

The SDK is imported only here, when an agent is served.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, cast, overload

import orjson

from tether.agents.agent import Agent as TetherAgent
from tether.agents.agent import BusyPolicy
from tether.agents.runner import Run, TextStream, new_call_id
from tether.agents.tools import Tool
from tether.protocol.events import Event, Sender
from tether.store.base import SessionStore

if TYPE_CHECKING:
    import agents
    from agents.items import TResponseInputItem
    from agents.memory.session_settings import SessionSettings
    from agents.tool_context import ToolContext

MEMORY = "tether.items"  # the event type of the SDK's session items (server-written only)
_PAGE = 1000
# The answers of the front-end tools of the run being driven: SDK call id → tool.result data.
# The SDK runs tools in tasks it creates inside the run's task, so they see this context.
_ANSWERS: contextvars.ContextVar[dict[str, dict[str, Any]]] = contextvars.ContextVar(
    "tether_client_answers")


def _plain(value: Any) -> Any:
    """``value`` as plain JSON data (the SDK's items may hold pydantic models)."""
    return orjson.loads(orjson.dumps(value, default=_model_dump))


def _model_dump(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return dump(mode="json", exclude_unset=True)
    raise TypeError(f"{type(value).__name__} is not JSON")


# --- memory ---------------------------------------------------------------------------------


class TetherSession:
    """An OpenAI Agents SDK ``Session`` whose items live in a tether session's log.

    Each change is one ``tether.items`` event in ``session``: ``{"memory": id, "add": [...]}``,
    ``{"memory": id, "pop": n}`` or ``{"memory": id, "clear": true}``; the items are the fold
    of those events, so the memory is replicated, retained and deleted with the session like
    everything else in it. ``memory`` (the SDK's ``session_id``) defaults to the session's
    name; several memories may share one session. Reads are incremental: the first reads the
    log once, each later one reads only what was appended since.

    ``writer`` appends an event (default: ``store.append`` as ``sender``); a run passes its
    own ``emit``. ``run`` tags the items this run adds, so :meth:`rewind` can drop the items of
    a step that a restart cut off.
    """

    def __init__(self, store: SessionStore, session: str, *, memory: str | None = None,
                 sender: Sender | None = None, run: str | None = None,
                 writer: Callable[[str, Any], Awaitable[Event]] | None = None,
                 session_settings: SessionSettings | None = None) -> None:
        self.store = store
        self.session = session
        self.session_id = memory or session
        self.session_settings = session_settings
        self.sender = sender or Sender("tether", "memory", "system")
        self.run = run
        self._writer = writer
        self._items: list[tuple[int, str | None, Any]] = []  # (seq, run that added it, item)
        self._after = 0  # the log is folded up to this seq
        self._lock = asyncio.Lock()

    def prime(self, events: Iterable[tuple[int, str, Any, Sender]]) -> None:
        """Fold events already read (a run's log, in seq order), so the next read starts after
        them. Only their gapless prefix counts: an event delivered late is read again."""
        for seq, type_, data, _ in events:
            if seq <= self._after:
                continue
            if self._after and seq != self._after + 1:
                return
            self._fold(seq, type_, data)
            self._after = seq

    def _fold(self, seq: int, type_: str, data: Any) -> None:
        if type_ != MEMORY or not isinstance(data, dict) or data.get("memory") != self.session_id:
            return
        if data.get("clear") is True:
            self._items.clear()
        pop = data.get("pop")
        if isinstance(pop, int) and pop > 0:
            del self._items[max(0, len(self._items) - pop):]
        added = data.get("add")
        if isinstance(added, list):
            run = data.get("run")
            self._items += [(seq, run if isinstance(run, str) else None, item)
                            for item in added]

    async def _sync(self) -> None:
        while True:
            page = await self.store.read(self.session, self._after, _PAGE)
            for event in page:
                self._fold(event.seq, event.type, event.data)
                self._after = event.seq
            if len(page) < _PAGE:
                return

    async def _write(self, data: dict[str, Any]) -> None:
        data = {"memory": self.session_id, **data}
        if self._writer is not None:
            await self._writer(MEMORY, data)
        else:
            await self.store.append(self.session, MEMORY, data, self.sender)
        await self._sync()

    async def get_items(self, limit: int | None = None) -> list[TResponseInputItem]:
        """The items, oldest first; with ``limit`` (or the settings' limit), the newest."""
        if limit is None and self.session_settings is not None:
            limit = self.session_settings.limit
        async with self._lock:
            await self._sync()
            items = [item for _, _, item in self._items]
        if limit is not None:
            items = items[-limit:] if limit > 0 else []
        return copy.deepcopy(items)

    async def add_items(self, items: list[TResponseInputItem]) -> None:
        if not items:
            return
        data: dict[str, Any] = {"add": _plain(items)}
        if self.run is not None:
            data["run"] = self.run
        async with self._lock:
            await self._write(data)

    async def pop_item(self) -> TResponseInputItem | None:
        async with self._lock:
            await self._sync()
            if not self._items:
                return None
            item = self._items[-1][2]
            await self._write({"pop": 1})
        result: TResponseInputItem = copy.deepcopy(item)
        return result

    async def clear_session(self) -> None:
        async with self._lock:
            await self._write({"clear": True})

    async def rewind(self, run: str, after: int) -> int:
        """Drop the newest items ``run`` added after seq ``after`` (the items of a step that a
        restart cut off: the step runs again and adds them again). Returns how many."""
        async with self._lock:
            await self._sync()
            count = 0
            for seq, by, _ in reversed(self._items):
                if by != run or seq <= after:
                    break
                count += 1
            if count:
                await self._write({"pop": count, "run": run})
        return count

    async def close_calls(self, why: str) -> int:
        """Answer the function calls that have no output (a run cancelled while it waited for
        an approval or a client left them): a model is never sent a call without its answer.
        Returns how many."""
        async with self._lock:
            await self._sync()
            answered = {item.get("call_id") for _, _, item in self._items
                        if isinstance(item, dict) and item.get("type") == "function_call_output"}
            open_calls = [item["call_id"] for _, _, item in self._items
                          if isinstance(item, dict) and item.get("type") == "function_call"
                          and isinstance(item.get("call_id"), str)
                          and item["call_id"] not in answered]
            if open_calls:
                data: dict[str, Any] = {"add": [{"type": "function_call_output",
                                                 "call_id": call, "output": why}
                                                for call in open_calls]}
                if self.run is not None:
                    data["run"] = self.run
                await self._write(data)
        return len(open_calls)


# --- front-end tools ------------------------------------------------------------------------


class ClientAnswer:
    """The invocation of a front-end tool: the answer a client gave (the run got it durably
    before letting the SDK run the tool). It also marks the tool as a front-end one, in a way
    that survives the SDK copying the tool, and holds its ``timeout`` (seconds; None: none)."""

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout

    async def __call__(self, context: ToolContext[Any], arguments: str) -> Any:
        answered = _ANSWERS.get(None)
        data = answered.get(context.tool_call_id) if answered is not None else None
        if data is None:
            return orjson.dumps({"error": f"{context.tool_name} runs in a tether client, and "
                                          "no client answered"}).decode()
        if "result" in data:
            return data["result"]
        return orjson.dumps({"error": data.get("error")}).decode()


def _client(name: str, description: str, schema: dict[str, Any], timeout: float | None, *,
            strict: bool) -> agents.FunctionTool:
    from agents import FunctionTool

    # needs_approval makes the SDK stop before the call, with a state it can serialise: the
    # adapter then asks the clients (durably) and lets the SDK "run" the tool with the answer.
    return FunctionTool(name=name, description=description, params_json_schema=schema,
                        on_invoke_tool=ClientAnswer(timeout), strict_json_schema=strict,
                        needs_approval=True)


def _client_timeout(tool: Any) -> tuple[bool, float | None]:
    """Whether ``tool`` is a front-end tool, and its timeout."""
    answer = getattr(tool, "on_invoke_tool", None)
    return (True, answer.timeout) if isinstance(answer, ClientAnswer) else (False, None)


@overload
def client_function_tool(function: Callable[..., Any], /) -> agents.FunctionTool: ...


@overload
def client_function_tool(*, name: str | None = None, description: str | None = None,
                         timeout: float | None = 300.0
                         ) -> Callable[[Callable[..., Any]], agents.FunctionTool]: ...


def client_function_tool(function: Callable[..., Any] | None = None, /, *,
                         name: str | None = None, description: str | None = None,
                         timeout: float | None = 300.0
                         ) -> agents.FunctionTool | Callable[[Callable[..., Any]],
                                                             agents.FunctionTool]:
    """A front-end tool written like ``@function_tool``: the stub's signature is the schema,
    its docstring the description; its body never runs — a tether client that declared the
    tool answers it (``timeout`` seconds, then the call fails)::

        @client_function_tool
        def ask(q: str) -> str:
            \"\"\"Ask the user a question.\"\"\"
    """
    from agents import FunctionTool
    from agents.function_schema import function_schema

    def make(fn: Callable[..., Any]) -> FunctionTool:
        schema = function_schema(fn, name_override=name, description_override=description)
        return _client(schema.name, schema.description or "", schema.params_json_schema,
                       timeout, strict=True)

    return make(function) if function is not None else make


def function_tool_of(spec: Tool) -> agents.FunctionTool:
    """A tether ``client_tool`` spec as an SDK function tool answered by a client."""
    if not spec.client_side:
        raise ValueError(f"{spec.name!r} is a server tool: give the SDK agent a @function_tool")
    # A tether spec's schema need not meet the SDK's strict mode (every property required).
    return _client(spec.name, spec.description, spec.parameters, spec.timeout, strict=False)


def _tool_named(agent: Any, name: str) -> Any:
    for tool in getattr(agent, "tools", None) or ():
        if getattr(tool, "name", None) == name:
            return tool
    return None


def _arguments(raw: str | None) -> Any:
    try:
        return orjson.loads(raw or "{}")
    except orjson.JSONDecodeError:
        return raw


# --- the adapter ------------------------------------------------------------------------------


class OpenAIAgentsAgent(TetherAgent):
    """A tether agent whose runs are driven by an OpenAI Agents SDK agent."""

    def __init__(self, agent: agents.Agent[Any], *, name: str, sessions: Sequence[str],
                 run_config: agents.RunConfig | None = None, max_turns: int | None = None,
                 context: Callable[[Run], Any] | None = None,
                 approval_timeout: float | None = None, busy: BusyPolicy | str = "queue",
                 coalesce_window: float = 0.020, coalesce_bytes: int = 256) -> None:
        super().__init__(name, sessions=sessions, busy=busy, coalesce_window=coalesce_window,
                         coalesce_bytes=coalesce_bytes)
        self.agent = agent
        self.run_config = run_config
        self.max_turns = max_turns
        self.context = context
        self.approval_timeout = approval_timeout

    async def recover(self, run: Run) -> None:
        # Only end what a stopped node cut off: respond() resumes from the SDK's own state.
        await run.restart_step()

    async def respond(self, run: Run) -> None:
        await _Driver(self, run).drive()


class _Driver:
    """One tether run of the SDK agent: turns, interruptions, steers."""

    def __init__(self, adapter: OpenAIAgentsAgent, run: Run) -> None:
        self.adapter = adapter
        self.run = run
        self.memory = TetherSession(run.manager.store, run.session, sender=run.sender,
                                    run=run.id, writer=run.emit)
        self.memory.prime(run.events)
        self.calls: dict[str, str] = {}  # SDK call id → tether call id
        self.held: dict[str, tuple[str, Any]] = {}  # calls that may need approval: not recorded
        self.client_calls: set[str] = set()
        self.answers: dict[str, dict[str, Any]] = {}  # front-end answers by SDK call id
        self.text: TextStream | None = None
        self.context: Any = None
        # Steers taken from the log but not yet given to the SDK: a checkpoint keeps them,
        # since after it Run.take_steers only returns newer ones.
        self.steers: list[str] = []
        self._text_cm: contextlib.AbstractAsyncContextManager[TextStream] | None = None

    def tid(self, sdk_call: str) -> str:
        """The tether call id of an SDK call: minted unguessable, kept in checkpoints."""
        if sdk_call not in self.calls:
            self.calls[sdk_call] = new_call_id()
        return self.calls[sdk_call]

    async def drive(self) -> None:
        from agents import RunState

        run = self.run
        _ANSWERS.set(self.answers)
        saved, at = self._newest_checkpoint()
        # A step a restart cut off runs again from the checkpoint: drop what it had written.
        await self.memory.rewind(run.id, at)
        pending: Any
        if isinstance(saved, dict) and isinstance(saved.get("steers"), list):
            self.steers = [str(text) for text in saved["steers"]]
        if isinstance(saved, dict) and isinstance(saved.get("state"), dict):
            self.calls = dict(saved.get("calls") or {})
            state = await RunState.from_json(self.adapter.agent, saved["state"],
                                             context_override=self._context())
            await self.decide(state)
            pending = state
        elif isinstance(saved, dict) and isinstance(saved.get("input"), list):
            pending = self._user_input(saved["input"])
        else:
            await self.memory.close_calls("Not run: the run that asked for it ended first.")
            pending = run.input_text()
        while True:
            result = await self.turn(pending)
            interruptions = result.interruptions
            if interruptions:
                state = result.to_state()
                for item in interruptions:
                    self.tid(str(item.call_id))
                self.steers += run.take_steers()
                await run.checkpoint({"state": state.to_json(), "calls": self.calls,
                                      "steers": self.steers})
                await self.decide(state)
                pending = state
                continue
            steers, self.steers = self.steers + run.take_steers(), []
            if not steers:
                return
            # The next turn's input is in the checkpoint, so a restart runs that turn.
            await run.checkpoint({"input": steers})
            pending = self._user_input(steers)

    def _newest_checkpoint(self) -> tuple[Any, int]:
        for seq, type_, data, _ in reversed(self.run.events):
            if type_ == "run.checkpoint" and isinstance(data, dict) \
                    and data.get("run") == self.run.id:
                return data.get("state"), seq
        return None, 0

    def _context(self) -> Any:
        """The SDK run context: made once per run, shared by its turns."""
        if self.adapter.context is not None and self.context is None:
            self.context = self.adapter.context(self.run)
        return self.context

    @staticmethod
    def _user_input(texts: Sequence[str]) -> list[Any]:
        return [{"role": "user", "content": text} for text in texts]

    async def turn(self, pending: Any) -> agents.RunResultStreaming:
        """Run the SDK from ``pending`` (user input or a decided state) until it ends or
        stops for decisions, recording its output in the session."""
        from agents import Runner

        kwargs: dict[str, Any] = {"session": self.memory}
        if isinstance(pending, (str, list)) and self.adapter.context is not None:
            kwargs["context"] = self._context()  # a state carries its own
        if self.adapter.max_turns is not None:
            kwargs["max_turns"] = self.adapter.max_turns
        if self.adapter.run_config is not None:
            kwargs["run_config"] = self.adapter.run_config
        result = Runner.run_streamed(self.adapter.agent, pending, **kwargs)
        try:
            stream = cast(AsyncGenerator[Any, None], result.stream_events())
            async with contextlib.aclosing(stream) as events:
                async for event in events:
                    await self.on_event(event)
            await self.end_text()
        except BaseException:
            # A cancel (or a failure): stop the SDK's own tasks too. The open text stream is
            # left to whoever stops the run, which ends it with an ``interrupted`` marker.
            result.cancel()
            raise
        return result

    async def on_event(self, event: Any) -> None:
        if event.type == "raw_response_event":
            kind = getattr(event.data, "type", "")
            if kind == "response.output_text.delta":
                delta = getattr(event.data, "delta", "")
                if delta:
                    if self.text is None:
                        self._text_cm = self.run.stream_text()
                        self.text = await self._text_cm.__aenter__()
                    self.text.write(delta)
            elif kind == "response.completed":
                await self.end_text()  # one tether stream per model step
            return
        if event.type != "run_item_stream_event":
            return
        await self.end_text()  # what the model wrote comes before its tool calls
        item = event.item
        if event.name == "tool_called":
            raw = item.raw_item
            sdk_call = getattr(raw, "call_id", None)
            name = getattr(raw, "name", None)
            if not isinstance(sdk_call, str) or not isinstance(name, str):
                return  # not a function call (hosted tools do not reach Chat Completions)
            tool = _tool_named(item.agent, name)
            arguments = _arguments(getattr(raw, "arguments", None))
            if _client_timeout(tool)[0]:
                self.client_calls.add(sdk_call)  # recorded when the clients are asked
            elif tool is not None and getattr(tool, "needs_approval", False) is not False:
                self.held[sdk_call] = (name, arguments)  # recorded once approved (or run)
            else:
                await self.run.record_tool_call(self.tid(sdk_call), name, arguments)
        elif event.name == "tool_output":
            sdk_call = item.call_id
            if not isinstance(sdk_call, str) or sdk_call in self.client_calls \
                    or sdk_call in self.answers:
                return  # a front-end tool: its result is the client's tool.result
            held = self.held.pop(sdk_call, None)
            tid = self.tid(sdk_call)
            if held is not None:  # a tool whose needs_approval said no after all
                await self.run.record_tool_call(tid, *held)
            await self.run.record_tool_result(tid, item.output)

    async def end_text(self) -> None:
        if self._text_cm is not None:
            cm, self._text_cm, self.text = self._text_cm, None, None
            await cm.__aexit__(None, None, None)

    async def decide(self, state: agents.RunState[Any]) -> None:
        """Get each interruption of ``state`` answered, durably, and apply the answers."""
        run = self.run
        for item in state.get_interruptions():
            sdk_call = str(item.call_id)
            name = item.name or ""
            tid = self.tid(sdk_call)
            arguments = _arguments(item.arguments)
            tool = _tool_named(item.agent, name)
            client, timeout = _client_timeout(tool)
            if client:
                self.client_calls.add(sdk_call)
                answer = await run.client_tool(tid, name, arguments, expires_in=timeout)
                self.answers[sdk_call] = dict(answer.data)
                state.approve(item)
                continue
            decision = await run.approval(tid, name, arguments if isinstance(arguments, dict)
                                          else {"arguments": arguments},
                                          expires_in=self.adapter.approval_timeout)
            verdict = decision.data.get("decision")
            edited = decision.data.get("arguments")
            if verdict == "approve" and (edited is None or edited == arguments):
                self.held.pop(sdk_call, None)
                await run.record_tool_call(tid, name, arguments)  # it runs when the SDK resumes
                state.approve(item)
                continue
            by = (decision.data.get("by") or {}).get("sub", "nobody")
            why = (f"approved by {by} with edited arguments, which an OpenAI Agents SDK run "
                   "cannot apply: not run") if verdict == "approve" else f"{verdict} by {by}"
            self.held.pop(sdk_call, None)
            # The refusal is the call's result; the SDK's tool_output for it records nothing.
            await run.record_tool_result(tid, error=why)
            state.reject(item, rejection_message=f"The call was not run: {why}.")


def serve(obj: agents.Agent[Any], *, sessions: Sequence[str] = ("*",), name: str | None = None,
          client_tools: Sequence[Tool | agents.FunctionTool] = (),
          run_config: agents.RunConfig | None = None, max_turns: int | None = None,
          context: Callable[[Run], Any] | None = None, approval_timeout: float | None = None,
          busy: BusyPolicy | str = "queue", tracing: bool = False,
          coalesce_window: float = 0.020, coalesce_bytes: int = 256) -> OpenAIAgentsAgent:
    """A tether agent serving the SDK agent ``obj`` on ``sessions``.

    ``client_tools``: front-end tools added to the agent's tools (tether ``client_tool`` specs,
    or :func:`client_function_tool` tools). ``context(run)`` makes the SDK run context of a
    run (default None). ``approval_timeout``: seconds an approval waits before it expires
    (default: no expiry). ``tracing=False`` turns the SDK's trace export off (the default:
    it would send traces to OpenAI).
    """
    import agents as sdk

    if BusyPolicy(busy) == BusyPolicy.MERGE:
        raise ValueError("busy='merge' needs input mid-turn, which the OpenAI Agents SDK "
                         "does not take: use 'queue' or 'interrupt' (a steer is a follow-up "
                         "turn)")
    if not tracing:
        sdk.set_tracing_disabled(True)
    if client_tools:
        extra = [function_tool_of(t) if isinstance(t, Tool) else t for t in client_tools]
        obj = obj.clone(tools=[*obj.tools, *extra])
    return OpenAIAgentsAgent(obj, name=name or obj.name, sessions=sessions,
                             run_config=run_config, max_turns=max_turns, context=context,
                             approval_timeout=approval_timeout, busy=busy,
                             coalesce_window=coalesce_window, coalesce_bytes=coalesce_bytes)
