"""Pydantic AI agents served as durable tether runs: ``serve(agent)``.

A run drives the agent with ``agent.iter(...)`` and maps what it does onto the session:

- **streaming**: the text parts of each model response go into one coalesced text stream
  (``stream.append`` / ``stream.end``) per model request;
- **tools**: ``FunctionToolCallEvent`` / ``FunctionToolResultEvent`` of the tools Pydantic AI
  runs itself become ``tool.call`` / ``tool.result`` (target ``server``);
- **approvals**: Pydantic AI's deferred tools. A tool with ``requires_approval=True`` (or one
  raising ``ApprovalRequired``) ends the run with ``DeferredToolRequests`` (added to the
  agent's output types for tether's runs); each approval becomes a tether approval that waits
  durably in the log; the decision goes back as ``DeferredToolResults(approvals={id: True |
  ToolApproved(override_args=…) | ToolDenied(…)})`` to a new ``agent.iter`` over the message
  history, which runs the approved tool;
- **front-end tools**: external tools (an ``ExternalToolset``, a tool raising ``CallDeferred``,
  or ``client_tools=`` given to :func:`serve`) become ``run.client_tool`` calls; the client's
  result goes back as ``DeferredToolResults(calls={id: result | ToolFailed(…)})``;
- **cancel**: the run's task is cancelled; Pydantic AI lets the ``CancelledError`` through at
  its next await, and tether ends the open stream as ``cancelled``;
- **steer**: ``AgentRun.enqueue(text)``, Pydantic AI's own way to add user input to a live run:
  delivered with the next model request, or redirecting a run that would end into one more
  request. Steers are enqueued only where that cannot skip a deferred call (before a model
  request, or before a final answer is processed); one that arrives as the run ends starts a
  follow-up ``agent.iter`` over the message history before the tether run completes;
- **durability**: Pydantic AI's message history (``ModelMessagesTypeAdapter``) is the run's
  checkpoint (``run.checkpoint``): written when the run waits for deferred calls and before
  each model request that carries tool results. After a SIGKILL the run resumes from it (an
  answered approval or front-end call is not asked again; a server tool whose result is in the
  checkpoint is not run again); work after the last checkpoint is done again;
- **memory**: the earlier turns of the session are derived from its log (the same messages,
  answers, tool calls and results the UIs show), so the agent remembers the conversation,
  including turns other agents or people took.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import pydantic_core
from pydantic_ai import (
    Agent as PydanticAgent,
)
from pydantic_ai import (
    DeferredToolRequests,
    DeferredToolResults,
    ExternalToolset,
    ModelMessagesTypeAdapter,
    ToolApproved,
    ToolDefinition,
    ToolDenied,
    ToolFailed,
)
from pydantic_ai.messages import (
    EnqueuedMessagesEvent,
    FunctionToolCallEvent,
    FunctionToolResultEvent,
    ModelMessage,
    ModelRequest,
    ModelRequestPart,
    ModelResponse,
    ModelResponsePart,
    PartDeltaEvent,
    PartStartEvent,
    TextPart,
    TextPartDelta,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.run import AgentRun
from pydantic_ai.toolsets import AbstractToolset

from tether.agents.agent import Agent, BusyPolicy
from tether.agents.models import Message
from tether.agents.runner import Run, conversation, new_call_id
from tether.agents.tools import Tool

CHECKPOINT_FORMAT = "pydantic-ai/1"  # the ``format`` of this module's run.checkpoint states

# A tool of these kinds never runs in the step that calls it: Pydantic AI defers it (approval,
# or a result from outside). Its call is recorded as an approval or a front-end tool call.
_DEFERRED_KINDS = frozenset({"unapproved", "external"})


def serve(obj: PydanticAgent[Any, Any], *, sessions: Sequence[str] = ("*",),
          name: str | None = None, client_tools: Sequence[ToolDefinition | Tool] = (),
          deps: Any = None, busy: BusyPolicy | str = BusyPolicy.QUEUE,
          approval_expires_in: float | None = None,
          client_tool_expires_in: float | None = 300.0,
          coalesce_window: float = 0.020, coalesce_bytes: int = 256) -> PydanticAIAgent:
    """A tether agent that runs the Pydantic AI agent ``obj`` on ``sessions``.

    ``client_tools`` are front-end tools to offer the agent besides its own (Pydantic AI
    ``ToolDefinition``\\ s, or tether's :func:`~tether.agents.tools.client_tool`\\ s); ``deps``
    are the agent's dependencies for every run. ``name`` names the tether agent (stable across
    restarts: a recovered run finds its agent by name); it defaults to the agent's own name.
    """
    return PydanticAIAgent(obj, name=name or obj.name or "pydantic-ai", sessions=sessions,
                           client_tools=client_tools, deps=deps, busy=busy,
                           approval_expires_in=approval_expires_in,
                           client_tool_expires_in=client_tool_expires_in,
                           coalesce_window=coalesce_window, coalesce_bytes=coalesce_bytes)


@dataclass
class _Deferred:
    """A call Pydantic AI deferred: an approval, or a call for a client to make."""

    kind: str  # "approval" | "call"
    id: str  # Pydantic AI's (the model's) tool call id
    name: str
    arguments: dict[str, Any]


@dataclass
class _Turn:
    """Where one tether run is in the Pydantic AI agent's work: what a checkpoint holds."""

    messages: list[ModelMessage]  # the whole history: ``earlier``, then the run's own
    earlier: list[ModelMessage] = field(default_factory=list)  # derived from the log
    prompt: str | None = None  # the user prompt of the next agent.iter, if any
    ids: dict[str, str] = field(default_factory=dict)  # Pydantic AI call id → tether call id
    deferred: list[_Deferred] = field(default_factory=list)
    steers: list[str] = field(default_factory=list)  # taken from the log, not yet enqueued
    enqueued: dict[str, str] = field(default_factory=dict)  # enqueue id → steer, undelivered

    def state(self) -> dict[str, Any]:
        # The earlier turns are in the log already: a checkpoint holds the run's own messages
        # only (its size is the run's, not the session's), unless the agent rewrote the
        # earlier ones (a history processor), when it holds them all.
        own, base = self.messages, "none"
        if self.messages[:len(self.earlier)] == self.earlier:
            own, base = self.messages[len(self.earlier):], "log"
        return {"format": CHECKPOINT_FORMAT, "base": base,
                "messages": ModelMessagesTypeAdapter.dump_python(own, mode="json"),
                "ids": self.ids, "steers": [*self.enqueued.values(), *self.steers],
                "deferred": [{"kind": d.kind, "id": d.id, "name": d.name,
                              "arguments": d.arguments} for d in self.deferred]}

    @classmethod
    def restore(cls, state: Any, run: Run) -> _Turn | None:
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            return None
        own = ModelMessagesTypeAdapter.validate_python(state["messages"])
        earlier = earlier_turns(run) if state.get("base") == "log" else []
        return cls(messages=[*earlier, *own], earlier=earlier,
                   ids=dict(state["ids"]), steers=list(state["steers"]),
                   deferred=[_Deferred(d["kind"], d["id"], d["name"], d["arguments"])
                             for d in state["deferred"]])


class PydanticAIAgent(Agent):
    """Runs a Pydantic AI agent as tether runs (see the module's docstring)."""

    def __init__(self, agent: PydanticAgent[Any, Any], *, name: str, sessions: Sequence[str],
                 client_tools: Sequence[ToolDefinition | Tool] = (), deps: Any = None,
                 busy: BusyPolicy | str = BusyPolicy.QUEUE,
                 approval_expires_in: float | None = None,
                 client_tool_expires_in: float | None = 300.0,
                 coalesce_window: float = 0.020, coalesce_bytes: int = 256) -> None:
        super().__init__(name, sessions=sessions, busy=busy, coalesce_window=coalesce_window,
                         coalesce_bytes=coalesce_bytes)
        self.agent = agent
        self.deps = deps
        self.approval_expires_in = approval_expires_in
        self.client_tool_expires_in = client_tool_expires_in
        definitions = [t if isinstance(t, ToolDefinition) else
                       ToolDefinition(name=t.name, description=t.description,
                                      parameters_json_schema=t.parameters)
                       for t in client_tools]
        self.toolsets: list[AbstractToolset[Any]] = \
            [ExternalToolset(definitions)] if definitions else []
        self.output_type = _with_deferred(agent.output_type)

    async def recover(self, run: Run) -> None:
        # Only end what a stopped node left open: respond() resumes from the checkpoint.
        await run.restart_step()

    async def respond(self, run: Run) -> None:
        turn = _Turn.restore(run.last_checkpoint(), run)
        if turn is None:  # a new run (or one stopped before its first checkpoint)
            earlier = earlier_turns(run)
            turn = _Turn(messages=list(earlier), earlier=earlier, prompt=run.input_text())
        while True:
            results = await self._resolve(run, turn) if turn.deferred else None
            output = await self._iterate(run, turn, results)
            if isinstance(output, DeferredToolRequests):
                turn.deferred = [_Deferred("approval", c.tool_call_id, c.tool_name,
                                           _arguments(c)) for c in output.approvals]
                turn.deferred += [_Deferred("call", c.tool_call_id, c.tool_name, _arguments(c))
                                  for c in output.calls]
                for d in turn.deferred:
                    known = turn.ids.get(d.id)
                    if known is None or (d.kind == "call" and _has_call(run, known)):
                        # A tool that raised CallDeferred was recorded as a server call: its
                        # front-end call gets an id of its own.
                        turn.ids[d.id] = new_call_id()
                turn.steers += run.take_steers()
                await run.checkpoint(turn.state())
                continue
            if not isinstance(output, str):  # a structured output: the session gets its JSON
                async with run.stream_text() as text:
                    text.write(pydantic_core.to_json(output).decode())
            turn.steers += run.take_steers()
            if not turn.steers:
                return
            # Steered as the run ended: the steer is the next user prompt, in the same run.
            turn.prompt = "\n\n".join(turn.steers)
            turn.steers = []

    async def _resolve(self, run: Run, turn: _Turn) -> DeferredToolResults:
        """Ask tether for each deferred call (idempotent over the log: after a restart, an
        answered one returns at once) and build Pydantic AI's results."""
        results = DeferredToolResults()
        for d in turn.deferred:
            call = turn.ids[d.id]
            if d.kind == "approval":
                decision = await run.approval(call, d.name, d.arguments,
                                              expires_in=self.approval_expires_in)
                data = decision.data
                if data.get("decision") == "approve":
                    edited = data.get("arguments")
                    results.approvals[d.id] = ToolApproved(override_args=edited) \
                        if isinstance(edited, dict) else True
                else:
                    by = (data.get("by") or {}).get("sub", "nobody")
                    why = f"{data.get('decision')} by {by}"
                    # As for native tools: a refused call gets an error result, never a run.
                    await run.record_tool_result(call, error=why)
                    results.approvals[d.id] = ToolDenied(f"The call was {why}.")
            else:
                answer = (await run.client_tool(call, d.name, d.arguments,
                                                expires_in=self.client_tool_expires_in)).data
                results.calls[d.id] = answer["result"] if "result" in answer \
                    else ToolFailed(str(answer.get("error")))
        turn.deferred = []
        return results

    async def _iterate(self, run: Run, turn: _Turn,
                       results: DeferredToolResults | None) -> Any:
        """One ``agent.iter`` over the turn's history: its output (DeferredToolRequests when
        it stopped for deferred calls); ``turn.messages`` is its whole history after it."""
        resolved = set(results.approvals) | set(results.calls) if results else set()
        denied = {i for i, r in results.approvals.items()
                  if isinstance(r, ToolDenied)} if results else set()
        async with self.agent.iter(turn.prompt, message_history=turn.messages,
                                   deferred_tool_results=results, output_type=self.output_type,
                                   deps=self.deps, toolsets=self.toolsets or None) as agent_run:
            turn.prompt = None
            async for node in agent_run:
                if PydanticAgent.is_model_request_node(node):
                    if any(isinstance(p, ToolReturnPart) for p in node.request.parts):
                        # Tool results are in: a restart resumes from here, running none of
                        # those tools again.
                        turn.messages = [*agent_run.all_messages(), node.request]
                        turn.steers += run.take_steers()
                        await run.checkpoint(turn.state())
                    self._enqueue_steers(run, turn, agent_run)
                    async with run.stream_text() as text, node.stream(agent_run.ctx) as events:
                        async for event in events:
                            if isinstance(event, PartStartEvent) \
                                    and isinstance(event.part, TextPart):
                                text.write(event.part.content)
                            elif isinstance(event, PartDeltaEvent) \
                                    and isinstance(event.delta, TextPartDelta):
                                text.write(event.delta.content_delta)
                            elif isinstance(event, EnqueuedMessagesEvent):
                                turn.enqueued.pop(event.enqueue_id, None)
                elif PydanticAgent.is_call_tools_node(node):
                    if not any(isinstance(p, ToolCallPart) for p in node.model_response.parts):
                        # A final answer: a steer now makes the run take one more request.
                        self._enqueue_steers(run, turn, agent_run)
                    async with node.stream(agent_run.ctx) as events:
                        async for event in events:
                            if isinstance(event, FunctionToolCallEvent):
                                await self._called(run, turn, agent_run, event, resolved,
                                                   denied)
                            elif isinstance(event, FunctionToolResultEvent):
                                await self._returned(run, turn, event, resolved)
                            elif isinstance(event, EnqueuedMessagesEvent):
                                turn.enqueued.pop(event.enqueue_id, None)
            assert agent_run.result is not None
            # A steer Pydantic AI did not deliver (the run stopped for deferred calls first)
            # goes to the next agent.iter.
            turn.steers[:0] = turn.enqueued.values()
            turn.enqueued.clear()
            turn.messages = agent_run.result.all_messages()
            return agent_run.result.output

    def _enqueue_steers(self, run: Run, turn: _Turn, agent_run: AgentRun[Any, Any]) -> None:
        turn.steers += run.take_steers()
        for text in turn.steers:
            enqueue_id = agent_run.enqueue(text)
            if enqueue_id is not None:
                turn.enqueued[enqueue_id] = text
        turn.steers = []

    async def _called(self, run: Run, turn: _Turn, agent_run: AgentRun[Any, Any],
                      event: FunctionToolCallEvent, resolved: set[str],
                      denied: set[str]) -> None:
        part = event.part
        fw_id = part.tool_call_id
        if fw_id in resolved:
            if fw_id not in denied and event.args_valid is not None:  # approved: runs now
                await run.record_tool_call(turn.ids[fw_id], part.tool_name, _arguments(part))
            return
        # The run's tool manager knows each tool's kind (the one place Pydantic AI exposes it
        # during a run): a deferred kind is not run in this step.
        tool = agent_run.ctx.deps.tool_manager.get_tool_def(part.tool_name)
        if tool is not None and tool.kind in _DEFERRED_KINDS:
            return  # recorded as the approval or the front-end call it becomes
        known = turn.ids.get(fw_id)
        if known is None or _has_result(run, known):
            # Model call ids need not be unique across a run's steps: each call gets its own.
            turn.ids[fw_id] = new_call_id()
        await run.record_tool_call(turn.ids[fw_id], part.tool_name, _arguments(part))

    async def _returned(self, run: Run, turn: _Turn, event: FunctionToolResultEvent,
                        resolved: set[str]) -> None:
        part = event.part
        call = turn.ids.get(part.tool_call_id)
        if call is None:
            return
        if part.outcome in ("failed", "retried"):
            await run.record_tool_result(call, error=part.model_response_str(wrap_if_error=False))
        elif part.outcome == "denied" and part.tool_call_id in resolved:
            return  # recorded when the approval was refused
        else:
            await run.record_tool_result(call, _jsonable(part.content))


def _with_deferred(output_type: Any) -> Any:
    """The agent's output types, with ``DeferredToolRequests`` so a run can stop for them."""
    types = list(output_type) if isinstance(output_type, (list, tuple)) else [output_type]
    return types if DeferredToolRequests in types else [*types, DeferredToolRequests]


def _arguments(part: ToolCallPart) -> dict[str, Any]:
    try:
        return part.args_as_dict()
    except ValueError:  # the model sent arguments that are not a JSON object
        return {"_raw": part.args if isinstance(part.args, str) else str(part.args)}


def _jsonable(value: Any) -> Any:
    try:
        orjson.dumps(value)
        return value
    except TypeError:
        return pydantic_core.to_jsonable_python(value, fallback=str)


def _has_result(run: Run, call: str) -> bool:
    return _logged(run, "tool.result", call)


def _has_call(run: Run, call: str) -> bool:
    return _logged(run, "tool.call", call)


def _logged(run: Run, type_: str, call: str) -> bool:
    return any(t == type_ and isinstance(d, dict) and d.get("call") == call
               for _, t, d, _ in run.events)


# --- memory: the session's earlier turns, from its log -------------------------------------


def earlier_turns(run: Run) -> list[ModelMessage]:
    """The session's conversation before ``run``, as Pydantic AI messages.

    Derived from the log the UIs follow: people's messages, answers, tool calls and results of
    earlier runs, whichever agent made them. Left out: ``run``'s own input (it is the run's
    prompt) and events, and the messages that started runs queued after it.
    """
    own_input = run.record.input.get("message_seq") if isinstance(run.record.input, dict) \
        else None
    later_inputs = {d["input"].get("message_seq") for seq, t, d, _ in run.events
                    if t == "run.created" and isinstance(d, dict) and d.get("run") != run.id
                    and seq > run.record.created_seq and isinstance(d.get("input"), dict)}
    kept = [e for e in run.events
            if e[0] != own_input and e[0] not in later_inputs
            and not (isinstance(e[2], dict) and e[2].get("run") == run.id)]
    return to_model_messages(conversation(kept, ""))


def to_model_messages(messages: Sequence[Message]) -> list[ModelMessage]:
    """tether's conversation (OpenAI-style messages) as Pydantic AI messages. A tool call with
    no result (a run stopped or cancelled before it came) is left out, with any result of a
    call not in the history: a model API refuses either."""
    answered = {m.tool_call_id for m in messages if m.role == "tool"}
    names: dict[str, str] = {}
    out: list[ModelMessage] = []

    def request(part: ModelRequestPart) -> None:
        if out and isinstance(out[-1], ModelRequest):
            out[-1] = ModelRequest(parts=[*out[-1].parts, part])
        else:
            out.append(ModelRequest(parts=[part]))

    for m in messages:
        if m.role == "user":
            if m.content:
                request(UserPromptPart(m.content))
        elif m.role == "assistant":
            parts: list[ModelResponsePart] = [TextPart(m.content)] if m.content else []
            for c in m.tool_calls:
                if c.id in answered:
                    names[c.id] = c.name
                    parts.append(ToolCallPart(c.name, c.arguments, tool_call_id=c.id))
            if parts:
                out.append(ModelResponse(parts=parts))
        elif m.role == "tool" and m.tool_call_id in names:
            try:
                content: Any = orjson.loads(m.content)
            except orjson.JSONDecodeError:
                content = m.content
            request(ToolReturnPart(names[m.tool_call_id], content, tool_call_id=m.tool_call_id))
    return out
