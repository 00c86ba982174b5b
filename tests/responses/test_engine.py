"""The Responses engine on its own: ``plan`` and ``run`` over the real simulated backend and a
chain store in memory, with no socket and no server. Each event is numbered as a transport does
and validated against the openai SDK's own types."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson
import pytest

from tests.responses.conftest import MODEL, TERMINAL, TOOLS, check_response_events, parse_event
from tether.agents.models import (
    Chunk,
    Message,
    Model,
    ModelError,
    SimulatedModel,
    ToolCall,
    ToolSpec,
)
from tether.responses import engine
from tether.responses.backends import Backend, Models, SimulatedBackend
from tether.responses.chains import Chains, Node
from tether.responses.errors import ApiError, previous_not_found
from tether.responses.items import (
    CreateRequest,
    chain_of,
    new_response_id,
    parse_create,
)
from tether.store.base import StoreError
from tether.store.memory import MemoryStore

SUB = "alice"
ANSWER_TOKENS = 8
# No time to first token, no pacing; one tool call per user turn, then an answer.
SIM = {"ttft": 0, "tokens_per_second": 0, "answer_tokens": ANSWER_TOKENS,
       "tool_calls_per_turn": 1}


class Recorder:
    """An ``emit`` that numbers events as a transport does, validates and keeps them, and lets a
    test wait for an event type or hold the engine at one."""

    def __init__(self, hold_at: str | None = None) -> None:
        self.events: list[dict[str, Any]] = []
        self.hold_at = hold_at
        self.release = asyncio.Event()
        self._seen: dict[str, asyncio.Event] = {}

    def seen(self, type: str) -> asyncio.Event:
        return self._seen.setdefault(type, asyncio.Event())

    async def __call__(self, event: dict[str, Any]) -> None:
        event["sequence_number"] = len(self.events)
        parse_event(event)
        self.events.append(event)
        self.seen(event["type"]).set()
        if event["type"] == self.hold_at:
            await self.release.wait()

    @property
    def types(self) -> list[str]:
        return [e["type"] for e in self.events]

    def of(self, type: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == type]

    @property
    def final(self) -> dict[str, Any]:
        assert self.events and self.events[-1]["type"] in TERMINAL, self.types
        response: dict[str, Any] = self.events[-1]["response"]
        return response


class Engine:
    """What a transport does around the engine: find the parent, plan, run."""

    def __init__(self, backend: Backend | None = None, store: MemoryStore | None = None,
                 inherit: frozenset[str] = frozenset()) -> None:
        self.store = store or MemoryStore()
        self.chains = Chains(self.store)
        self.backend = backend or SimulatedBackend(**SIM)
        self.models = Models({MODEL: self.backend})
        self.inherit = inherit

    async def parent(self, request: CreateRequest, sub: str = SUB) -> Node | None:
        if request.previous_response_id is None:
            return None
        node = await self.chains.find(sub, request.previous_response_id)
        if node is None:
            raise previous_not_found(request.previous_response_id)
        return node

    async def turn(self, body: dict[str, Any], sub: str = SUB) -> engine.Turn:
        request = parse_create(body, transport="ws")
        parent = await self.parent(request, sub)
        plan = engine.plan(request, parent, self.inherit, self.models.get)
        chain = chain_of(parent.id) if parent is not None else None
        return engine.Turn(new_response_id(chain), sub, plan)

    async def respond(self, body: dict[str, Any], sub: str = SUB,
                      recorder: Recorder | None = None) -> tuple[Node, Recorder]:
        recorder = recorder or Recorder()
        node = await engine.run(await self.turn(body, sub), self.chains, recorder)
        return node, recorder


def answer_to(messages: Sequence[Message]) -> str:
    """The text the simulated model answers to exactly ``messages``."""
    return "".join(SimulatedModel(answer_tokens=ANSWER_TOKENS).answer(messages))


def input_tokens(messages: Sequence[Message]) -> int:
    return sum(len(m.content) // 4 + 1 for m in messages)


def output_text(response: dict[str, Any]) -> str:
    return "".join(part["text"] for item in response["output"] if item["type"] == "message"
                   for part in item["content"] if part["type"] == "output_text")


# --- one response -----------------------------------------------------------------------------


async def test_one_response_streams_openai_events_in_order() -> None:
    eng = Engine()
    node, rec = await eng.respond({"model": MODEL, "input": "Hello there.",
                                   "instructions": "Be brief.", "metadata": {"k": "v"}})
    check_response_events(rec.events)
    assert rec.types == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        *["response.output_text.delta"] * ANSWER_TOKENS,
        "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed"]

    created = rec.events[0]["response"]
    final = rec.final
    assert created["id"] == final["id"] == node.id
    assert created["status"] == "in_progress" and final["status"] == "completed"
    # The snapshot sent in response.created is not changed by what streamed after it.
    assert created["output"] == [] and created["usage"] is None
    assert created["completed_at"] is None and isinstance(final["completed_at"], int)
    assert final["model"] == MODEL and final["instructions"] == "Be brief."
    assert final["metadata"] == {"k": "v"} and final["previous_response_id"] is None
    assert final["error"] is None and final["incomplete_details"] is None

    # The deltas are the text: of the done events and of the final output item.
    deltas = "".join(e["delta"] for e in rec.of("response.output_text.delta"))
    item_ids = {e["item_id"] for e in rec.of("response.output_text.delta")}
    assert len(item_ids) == 1
    assert rec.of("response.output_text.done")[0]["text"] == deltas
    assert rec.of("response.content_part.done")[0]["part"]["text"] == deltas
    [item] = final["output"]
    assert item["id"] in item_ids and item["type"] == "message"
    assert item["role"] == "assistant" and item["status"] == "completed"
    assert output_text(final) == deltas

    # The model saw the instructions as a system message, then the input.
    seen = [Message("system", "Be brief."), Message("user", "Hello there.")]
    assert deltas == answer_to(seen)
    assert final["usage"]["input_tokens"] == input_tokens(seen)
    assert final["usage"]["output_tokens"] == ANSWER_TOKENS
    assert final["usage"]["total_tokens"] == input_tokens(seen) + ANSWER_TOKENS

    # The node is the response as finished, with the input it added to the chain.
    assert node.stored and node.parent is None and node.sub == SUB
    assert node.response == final
    assert node.input == [{"type": "message", "role": "user", "content": "Hello there."}]


async def test_the_terminal_event_comes_after_the_store_committed() -> None:
    eng = Engine()
    committed: dict[str, Node | None] = {}

    class Checking(Recorder):
        async def __call__(self, event: dict[str, Any]) -> None:
            if event["type"] in TERMINAL:
                # A fresh Chains over the same store: no memory, only what was committed.
                rid = event["response"]["id"]
                committed["node"] = await Chains(eng.store).load(SUB, rid)
            await super().__call__(event)

    node, rec = await eng.respond({"model": MODEL, "input": "hi"}, recorder=Checking())
    loaded = committed["node"]
    assert loaded is not None and loaded.id == node.id
    assert loaded.response == rec.final and loaded.input == node.input
    assert eng.chains.cached(SUB, node.id) is node  # and this node remembers it


async def test_store_false_is_not_committed_nor_remembered() -> None:
    eng = Engine()
    node, rec = await eng.respond({"model": MODEL, "input": "hi", "store": False})
    assert rec.final["status"] == "completed" and rec.final["store"] is False
    assert not node.stored
    assert await eng.chains.find(SUB, node.id) is None
    assert await Chains(eng.store).load(SUB, node.id) is None


async def test_a_store_failure_still_completes_the_response() -> None:
    class BrokenStore(MemoryStore):
        async def append(self, *args: Any, **kwargs: Any) -> Any:
            raise StoreError("disk full")

    eng = Engine(store=BrokenStore())
    node, rec = await eng.respond({"model": MODEL, "input": "hi"})
    assert rec.types[-1] == "response.completed"
    assert not node.stored  # continuable where it is held, and not claimed to be stored
    assert eng.chains.cached(SUB, node.id) is None


# --- function calls ---------------------------------------------------------------------------


async def test_function_call_output_item() -> None:
    eng = Engine()
    node, rec = await eng.respond({"model": MODEL, "input": "Fix the failing test.",
                                   "tools": TOOLS})
    check_response_events(rec.events)
    types = rec.types
    assert types[:3] == ["response.created", "response.in_progress",
                         "response.output_item.added"]
    assert types[-4:] == ["response.function_call_arguments.delta",
                          "response.function_call_arguments.done",
                          "response.output_item.done", "response.completed"]
    assert set(types[3:-3]) == {"response.function_call_arguments.delta"}

    added = rec.of("response.output_item.added")[0]["item"]
    assert added["type"] == "function_call" and added["status"] == "in_progress"
    assert added["arguments"] == ""
    [call] = rec.final["output"]
    assert call["type"] == "function_call" and call["status"] == "completed"
    assert call["id"] == added["id"] and call["call_id"] == added["call_id"]
    assert call["id"].startswith("fc_") and call["call_id"].startswith("call_")
    assert call["name"] == TOOLS[0]["name"]  # the simulation calls the offered tools in turn
    deltas = "".join(e["delta"] for e in rec.of("response.function_call_arguments.delta"))
    done = rec.of("response.function_call_arguments.done")[0]
    assert done["name"] == call["name"] and done["arguments"] == deltas == call["arguments"]
    arguments = orjson.loads(call["arguments"])
    assert isinstance(arguments["path"], str) and arguments["path"]
    assert rec.final["tools"][0]["name"] == "read_file"
    assert output_text(rec.final) == ""
    assert node.messages()[-1].tool_calls[0].id == call["call_id"]


@pytest.mark.parametrize(("choice", "kind", "name"), [
    ("none", "message", None),
    ("required", "function_call", "read_file"),
    ({"type": "function", "name": "run_tests"}, "function_call", "run_tests"),
])
async def test_tool_choice_reaches_the_model(choice: Any, kind: str, name: str | None) -> None:
    _, rec = await Engine().respond({"model": MODEL, "input": "go", "tools": TOOLS,
                                     "tool_choice": choice})
    check_response_events(rec.events)
    [item] = rec.final["output"]
    assert item["type"] == kind
    if name is not None:
        assert item["name"] == name
    assert rec.final["tool_choice"] == choice


# --- continuation -----------------------------------------------------------------------------


@pytest.mark.parametrize("from_store", [False, True], ids=["memory", "store"])
async def test_a_continuation_sends_only_the_new_items(from_store: bool) -> None:
    eng = Engine()
    first, rec1 = await eng.respond({"model": MODEL, "input": "Fix the failing test.",
                                     "tools": TOOLS, "instructions": "Use the tools."})
    [call] = rec1.final["output"]
    if from_store:  # as after a restart, or on another node: only the store knows the chain
        eng.chains = Chains(eng.store)
    # No model (the previous one's), only the tool output as input.
    second, rec2 = await eng.respond({
        "previous_response_id": first.id, "tools": TOOLS, "instructions": "Use the tools.",
        "input": [{"type": "function_call_output", "call_id": call["call_id"],
                   "output": "FAILED test_x"}]})
    check_response_events(rec2.events)
    final = rec2.final
    assert final["status"] == "completed" and final["model"] == MODEL
    assert final["previous_response_id"] == first.id
    assert chain_of(second.id) == chain_of(first.id) and second.id != first.id
    assert second.parent is not None and second.parent.id == first.id
    assert second.input == [{"type": "function_call_output", "call_id": call["call_id"],
                             "output": "FAILED test_x"}]

    # The model saw the whole conversation: its tool call was answered, so it answers in text
    # (one call per user turn); the text and the input tokens are those of the full history.
    seen = [Message("system", "Use the tools."),
            Message("user", "Fix the failing test."),
            Message("assistant", "", (ToolCall(call["call_id"], call["name"],
                                               call["arguments"]),)),
            Message("tool", "FAILED test_x", tool_call_id=call["call_id"])]
    [item] = final["output"]
    assert item["type"] == "message"
    assert output_text(final) == answer_to(seen)
    assert final["usage"]["input_tokens"] == input_tokens(seen)
    # The history for a next turn: the chain's items, without the instructions.
    assert second.messages() == (*seen[1:], Message("assistant", answer_to(seen)))


async def test_a_continuation_over_a_continuation_keeps_the_whole_chain() -> None:
    eng = Engine()
    node, _ = await eng.respond({"model": MODEL, "input": "one"})
    for word in ("two", "three"):
        node, _ = await eng.respond({"previous_response_id": node.id, "input": word})
    eng.chains = Chains(eng.store)
    loaded = await eng.chains.find(SUB, node.id)
    assert loaded is not None
    users = [m.content for m in loaded.messages() if m.role == "user"]
    assert users == ["one", "two", "three"]
    assert [m.role for m in loaded.messages()] == ["user", "assistant"] * 3
    last = loaded.messages()
    assert last[-1].content == answer_to(last[:-1])


async def test_instructions_and_tools_are_not_carried_over_unless_inherited() -> None:
    body: dict[str, Any] = {"model": MODEL, "input": "start", "tools": TOOLS,
                            "instructions": "Be terse."}
    strict = Engine()
    first, _ = await strict.respond(body)
    _, rec = await strict.respond({"previous_response_id": first.id, "input": "more",
                                   "tool_choice": "none"})
    assert rec.final["tools"] == [] and rec.final["instructions"] is None

    inheriting = Engine(inherit=frozenset({"tools", "instructions"}))
    first, _ = await inheriting.respond(body)
    _, rec = await inheriting.respond({"previous_response_id": first.id, "input": "more",
                                       "tool_choice": "none"})
    assert [t["name"] for t in rec.final["tools"]] == ["read_file", "run_tests"]
    assert rec.final["instructions"] == "Be terse."
    # An explicit null is an answer, not an omission: nothing is inherited.
    _, rec = await inheriting.respond({"previous_response_id": first.id, "input": "more",
                                       "instructions": None, "tool_choice": "none"})
    assert rec.final["instructions"] is None


# --- generate: false --------------------------------------------------------------------------


async def test_generate_false_is_a_warm_up_whose_input_joins_the_chain() -> None:
    eng = Engine()
    warm, rec = await eng.respond({"model": MODEL, "input": "Here is the context.",
                                   "generate": False})
    assert rec.types == ["response.created", "response.in_progress", "response.completed"]
    assert rec.final["output"] == [] and rec.final["status"] == "completed"
    assert rec.final["usage"]["input_tokens"] == 0 == rec.final["usage"]["output_tokens"]
    assert warm.stored and await Chains(eng.store).load(SUB, warm.id) is not None

    _, rec = await eng.respond({"previous_response_id": warm.id, "input": "Now the question."})
    check_response_events(rec.events)
    seen = [Message("user", "Here is the context."), Message("user", "Now the question.")]
    assert output_text(rec.final) == answer_to(seen)
    assert rec.final["usage"]["input_tokens"] == input_tokens(seen)


# --- limits and failures ----------------------------------------------------------------------


async def test_max_output_tokens_ends_incomplete_and_is_stored() -> None:
    eng = Engine()
    node, rec = await eng.respond({"model": MODEL, "input": "hi", "max_output_tokens": 3})
    check_response_events(rec.events)
    final = rec.final
    assert rec.types[-1] == "response.incomplete" and final["status"] == "incomplete"
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert len(rec.of("response.output_text.delta")) == 3
    assert final["output"][0]["status"] == "incomplete"
    assert final["usage"]["output_tokens"] == 3
    full = answer_to([Message("user", "hi")])
    assert full.startswith(output_text(final)) and full != output_text(final)
    assert node.stored and await Chains(eng.store).load(SUB, node.id) is not None


class FailingBackend:
    """The simulation, whose stream breaks after ``after`` chunks with ``error``."""

    def __init__(self, error: Exception, after: int) -> None:
        self.inner = SimulatedBackend(**SIM)
        self.error = error
        self.after = after

    def model(self, name: str, request: CreateRequest, tools: Sequence[ToolSpec]) -> Model:
        inner = self.inner.model(name, request, tools)
        error, after = self.error, self.after

        class Breaking:
            def __init__(self) -> None:
                self.name = name

            async def stream(self, messages: Sequence[Message], tools: Sequence[ToolSpec]
                             ) -> AsyncIterator[Chunk]:
                count = 0
                async for chunk in inner.stream(messages, tools):
                    if count == after:
                        raise error
                    count += 1
                    yield chunk

        return Breaking()

    async def aclose(self) -> None:
        return None


@pytest.mark.parametrize(("error", "message"), [
    (ModelError("upstream answered 502"), "The model failed: upstream answered 502"),
    (OSError("connection refused"), "The model could not be reached."),
    (RuntimeError("adapter bug"), "The model failed."),
])
async def test_a_failing_model_ends_with_response_failed(error: Exception,
                                                         message: str) -> None:
    eng = Engine(FailingBackend(error, after=2))
    node, rec = await eng.respond({"model": MODEL, "input": "hi"})
    check_response_events(rec.events)  # the open message is closed before the end
    final = rec.final
    assert rec.types[-1] == "response.failed" and final["status"] == "failed"
    assert final["error"] == {"code": "server_error", "message": message}
    assert output_text(final) == "".join(e["delta"] for e in
                                         rec.of("response.output_text.delta"))
    assert len(rec.of("response.output_text.delta")) == 2
    assert final["output"][0]["status"] == "incomplete"
    assert node.stored


async def test_a_model_failing_before_any_output() -> None:
    _, rec = await Engine(FailingBackend(ModelError("bad stream"), after=0)).respond(
        {"model": MODEL, "input": "hi"})
    assert rec.types == ["response.created", "response.in_progress", "response.failed"]
    assert rec.final["output"] == [] and rec.final["error"]["code"] == "server_error"


# --- refused requests -------------------------------------------------------------------------


async def test_an_unknown_previous_response_id_is_not_found() -> None:
    eng = Engine()
    for unknown in ("resp_" + "0" * 32, "resp_nope", "msg_123"):
        with pytest.raises(ApiError) as info:
            await eng.turn({"previous_response_id": unknown, "input": "hi"})
        error = info.value
        assert (error.code, error.param, error.status) == (
            "previous_response_not_found", "previous_response_id", 400)
        event = error.event()
        parse_event(event)
        assert event["error"]["message"] == f"Previous response with id '{unknown}' not found."


async def test_another_subjects_response_is_not_found() -> None:
    eng = Engine()
    node, _ = await eng.respond({"model": MODEL, "input": "secret"})
    # Neither from this node's memory nor from the store.
    assert await eng.chains.find("mallory", node.id) is None
    assert await Chains(eng.store).find("mallory", node.id) is None
    with pytest.raises(ApiError) as info:
        await eng.turn({"previous_response_id": node.id, "input": "hi"}, sub="mallory")
    assert info.value.code == "previous_response_not_found"


def _plan(body: dict[str, Any] | CreateRequest, parent: Node | None = None) -> engine.Plan:
    request = body if isinstance(body, CreateRequest) else parse_create(body, transport="ws")
    models = Models({MODEL: SimulatedBackend(**SIM)})
    return engine.plan(request, parent, frozenset(), models.get)


@pytest.mark.parametrize(("body", "code", "param"), [
    ({"model": "gpt-nothing", "input": "hi"}, "model_not_found", "model"),
    (CreateRequest(model=None, input=[]), "missing_required_parameter", "model"),
    ({"model": MODEL, "tools": TOOLS, "tool_choice": {"type": "function", "name": "deploy"}},
     "invalid_value", "tool_choice"),
    ({"model": MODEL, "tool_choice": "required"}, "invalid_value", "tool_choice"),
])
def test_plan_refuses(body: Any, code: str, param: str) -> None:
    with pytest.raises(ApiError) as info:
        _plan(body)
    assert (info.value.code, info.value.param, info.value.status) == (code, param, 400)
    parse_event(info.value.event())


def test_plan_resolves_the_model_and_the_backend() -> None:
    planned = _plan({"model": MODEL, "input": "hi", "tools": TOOLS})
    assert planned.model == MODEL and isinstance(planned.backend, SimulatedBackend)
    assert [t["name"] for t in planned.tools] == ["read_file", "run_tests"]
    assert planned.parent is None and planned.instructions is None


async def test_a_tool_output_for_no_call_is_refused_before_any_event() -> None:
    eng = Engine()
    first, _ = await eng.respond({"model": MODEL, "input": "go", "tools": TOOLS})
    for body in (
        {"model": MODEL, "input": [{"type": "function_call_output", "call_id": "call_nope",
                                    "output": "x"}]},
        {"previous_response_id": first.id, "tools": TOOLS,
         "input": [{"type": "function_call_output", "call_id": "call_nope", "output": "x"}]},
    ):
        turn = await eng.turn(body)
        rec = Recorder()
        with pytest.raises(ApiError) as info:
            await engine.run(turn, eng.chains, rec)
        assert (info.value.code, info.value.param) == (None, "input")
        assert "call_nope" in info.value.message
        assert rec.events == []
        assert await Chains(eng.store).load(SUB, turn.id) is None


# --- cancellation -----------------------------------------------------------------------------


async def test_cancelled_while_the_model_thinks() -> None:
    eng = Engine(SimulatedBackend(**{**SIM, "ttft": 3600}))  # the first token never comes
    turn = await eng.turn({"model": MODEL, "input": "hi"})
    rec = Recorder()
    task = asyncio.create_task(engine.run(turn, eng.chains, rec))
    await rec.seen("response.in_progress").wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Not turned into a failed response, and nothing committed.
    assert rec.types == ["response.created", "response.in_progress"]
    assert await Chains(eng.store).load(SUB, turn.id) is None
    assert eng.chains.cached(SUB, turn.id) is None


async def test_cancelled_mid_stream() -> None:
    eng = Engine()
    turn = await eng.turn({"model": MODEL, "input": "hi"})
    rec = Recorder(hold_at="response.output_text.delta")  # the client stalls on a delta
    task = asyncio.create_task(engine.run(turn, eng.chains, rec))
    await rec.seen("response.output_text.delta").wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert rec.types[-1] == "response.output_text.delta"
    assert not set(rec.types) & set(TERMINAL)
    assert await Chains(eng.store).load(SUB, turn.id) is None


async def test_a_slow_client_holds_the_response_until_it_reads() -> None:
    eng = Engine()
    turn = await eng.turn({"model": MODEL, "input": "hi"})
    rec = Recorder(hold_at="response.output_text.delta")
    task = asyncio.create_task(engine.run(turn, eng.chains, rec))
    await rec.seen("response.output_text.delta").wait()
    assert len(rec.of("response.output_text.delta")) == 1 and not task.done()
    rec.release.set()
    node = await task
    check_response_events(rec.events)
    assert node.response["status"] == "completed"
    assert output_text(node.response) == answer_to([Message("user", "hi")])
