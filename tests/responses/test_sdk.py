"""The official openai SDK, unchanged, as the client: WebSocket mode and the HTTP API."""

from __future__ import annotations

import json
from typing import Any

import openai
import orjson
import pytest
from openai.resources.responses.responses import AsyncResponsesConnection
from openai.types.responses import Response

from tests.responses.conftest import (
    MODEL,
    TERMINAL,
    TOOLS,
    Harness,
    RecordingBackend,
    check_response_events,
    parse_event,
)
from tether.agents.models import Message

TASK = "The test test_cursor_resume fails on CI. Find out why and propose a fix."


def tool_output(call: Any) -> str:
    return f"# output of {call.name}({call.arguments})\n" + "line of a log or a file\n" * 40


async def next_response(conn: AsyncResponsesConnection) -> tuple[list[dict[str, Any]], Any]:
    """Events of the next response as raw dicts (checked against the SDK's types) and the last
    one parsed by the SDK."""
    raws: list[dict[str, Any]] = []
    while True:
        data = await conn.recv_bytes()
        raw = orjson.loads(data)
        event = parse_event(raw)
        raws.append(raw)
        if event.type in TERMINAL or event.type == "error":
            return raws, event


async def run_loop(conn: AsyncResponsesConnection, calls: int, *, previous: str | None = None,
                   first_input: Any = TASK) -> list[Response]:
    """An agent loop: ``calls`` function calls answered with tool outputs, then an answer."""
    responses: list[Response] = []
    pending: Any = first_input
    for turn in range(calls + 1):
        await conn.response.create(model=MODEL, input=pending, tools=TOOLS,
                                   instructions="You are a careful coding agent.",
                                   tool_choice="none" if turn == calls else "auto",
                                   previous_response_id=previous)
        raws, event = await next_response(conn)
        assert event.type == "response.completed", raws[-1]
        check_response_events(raws)
        response = event.response
        assert isinstance(response, Response)
        assert response.previous_response_id == previous
        responses.append(response)
        previous = response.id
        called = [item for item in response.output if item.type == "function_call"]
        if turn < calls:
            assert called and not response.output_text
            pending = [{"type": "function_call_output", "call_id": c.call_id,
                        "output": tool_output(c)} for c in called]
        else:
            assert not called and response.output_text
    return responses


async def test_function_call_loop_over_one_connection(harness: Harness) -> None:
    recorder = RecordingBackend()
    harness.service.models.register(MODEL, recorder)
    client = harness.client()
    async with client.responses.connect() as conn:
        responses = await run_loop(conn, calls=4)
    await client.close()
    assert len({r.id for r in responses}) == 5
    assert all(r.id.startswith("resp_") and r.status == "completed" for r in responses)
    # Each turn sent only its new items, yet the model saw the whole conversation.
    last = recorder.conversations[-1]
    assert last[0] == Message("system", "You are a careful coding agent.")
    assert last[1] == Message("user", TASK)
    assert [m.role for m in last[2:]] == ["assistant", "tool"] * 4
    for assistant, tool in zip(last[2::2], last[3::2], strict=True):
        assert tool.tool_call_id == assistant.tool_calls[0].id
    usage = [r.usage.input_tokens for r in responses if r.usage]
    assert usage == sorted(usage) and usage[-1] > usage[0] * 4


async def test_events_carry_lane_and_sequence(harness: Harness) -> None:
    client = harness.client()
    async with client.responses.connect() as conn:
        await conn.response.create(model=MODEL, input="hi", stream_id="main")
        raws, event = await next_response(conn)
        assert event.type == "response.completed"
        assert {raw.get("stream_id") for raw in raws} == {"main"}
        check_response_events(raws)
        await conn.response.create(model=MODEL, input="hi again")  # default lane
        raws, event = await next_response(conn)
        assert all("stream_id" not in raw for raw in raws)
    await client.close()


async def test_warm_up_then_continue(harness: Harness) -> None:
    recorder = RecordingBackend()
    harness.service.models.register(MODEL, recorder)
    client = harness.client()
    async with client.responses.connect() as conn:
        await conn.response.create(model=MODEL, generate=False, tools=TOOLS,
                                   input=[{"role": "developer", "content": "Repository: tether"}])
        raws, event = await next_response(conn)
        assert [r["type"] for r in raws] == ["response.created", "response.in_progress",
                                             "response.completed"]
        warm = event.response
        assert warm.output == [] and warm.id.startswith("resp_")
        assert recorder.conversations == []  # nothing was generated
        await conn.response.create(model=MODEL, previous_response_id=warm.id, input=TASK,
                                   tool_choice="none")
        _, event = await next_response(conn)
        assert event.type == "response.completed" and event.response.output_text
    await client.close()
    assert recorder.conversations[0] == [Message("system", "Repository: tether"),
                                         Message("user", TASK)]


async def test_http_stateless_and_streaming(harness: Harness) -> None:
    client = harness.client()
    # A client without continuation sends the whole history each time.
    first = await client.responses.create(model=MODEL, input=TASK, tools=TOOLS,
                                          store=False)
    call = next(item for item in first.output if item.type == "function_call")
    history: list[Any] = [{"role": "user", "content": TASK},
                          *[item.model_dump(exclude_none=True) for item in first.output],
                          {"type": "function_call_output", "call_id": call.call_id,
                           "output": "3 passed, 1 failed"}]
    stream = await client.responses.create(model=MODEL, input=history, tools=TOOLS,
                                           tool_choice="none", stream=True, store=False)
    events = [event async for event in stream]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    check_response_events([e.model_dump(exclude_unset=True) for e in events])
    final = events[-1]
    assert final.type == "response.completed" and final.response.output_text
    # store=False responses are not kept; stored ones can be fetched.
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(first.id)
    stored = await client.responses.create(model=MODEL, input="hello")
    fetched = await client.responses.retrieve(stored.id)
    assert fetched.id == stored.id and fetched.output_text == stored.output_text
    await client.close()


async def test_http_continues_a_websocket_chain(harness: Harness) -> None:
    client = harness.client()
    async with client.responses.connect() as conn:
        responses = await run_loop(conn, calls=1)
    followed = await client.responses.create(model=MODEL, input="and now?",
                                             previous_response_id=responses[-1].id)
    assert followed.previous_response_id == responses[-1].id and followed.output_text
    await client.close()


async def test_sdk_sees_errors_as_its_error_type(harness: Harness) -> None:
    client = harness.client()
    async with client.responses.connect() as conn:
        await conn.response.create(model=MODEL, input="x", stream_id="lane-1",
                                   previous_response_id="resp_" + "0" * 32)
        raws, event = await next_response(conn)
        assert event.type == "error"
        assert event.error.code == "previous_response_not_found"
        assert event.error.param == "previous_response_id"
        assert event.status == 400 and event.stream_id == "lane-1"
        # the connection stays usable
        await conn.response.create(model=MODEL, input="x", stream_id="lane-1")
        _, event = await next_response(conn)
        assert event.type == "response.completed"
    await client.close()
    assert json.loads(json.dumps(raws[0]))["type"] == "error"


async def test_sdk_asks_for_inheritance_with_extra_query(harness: Harness) -> None:
    recorder = RecordingBackend()
    harness.service.models.register(MODEL, recorder)
    client = harness.client()
    async with client.responses.connect(
            extra_query={"inherit": "tools,instructions"}) as conn:
        await conn.response.create(model=MODEL, input=TASK, tools=TOOLS,
                                   instructions="Be brief.")
        _, event = await next_response(conn)
        call = next(i for i in event.response.output if i.type == "function_call")
        # Only the id and the new item: tools and instructions come from the chain.
        await conn.response.create(model=MODEL, previous_response_id=event.response.id,
                                   input=[{"type": "function_call_output",
                                           "call_id": call.call_id, "output": "ok"}])
        _, event = await next_response(conn)
    await client.close()
    assert event.type == "response.completed"
    assert [t.name for t in event.response.tools] == [t["name"] for t in TOOLS]
    assert recorder.conversations[-1][0] == Message("system", "Be brief.")
