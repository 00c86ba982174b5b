"""``stream_id`` lanes: FIFO within a lane, lanes concurrent, 16 in flight, 32 named lanes.

A gated model holds every response until the test opens its gate, so the order of events is
decided by the test, never by a clock.
"""

from __future__ import annotations

from typing import Any

from tests.responses.conftest import (
    MODEL,
    TERMINAL,
    GateBackend,
    Harness,
    RawSocket,
    check_response_events,
)


async def barrier(sock: RawSocket) -> list[dict[str, Any]]:
    """A round trip: everything sent before has been read by the server. Returns what
    arrived meanwhile."""
    await sock.send({"type": "tether.barrier"})
    got = await sock.until(lambda e: e["type"] == "error" and e["error"]["param"] == "type")
    return got[:-1]


def by_lane(events: list[dict[str, Any]], lane: str) -> list[dict[str, Any]]:
    return [e for e in events if e.get("stream_id") == lane]


def split_responses(events: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    responses: list[list[dict[str, Any]]] = []
    for event in events:
        if event["type"] == "response.created":
            responses.append([])
        responses[-1].append(event)
    return responses


async def test_two_lanes_interleave_and_keep_their_order(harness: Harness) -> None:
    gate = GateBackend()
    harness.service.models.register("gated", gate)
    sock = await harness.raw()
    for lane, key in (("a", "A1"), ("a", "A2"), ("b", "B1"), ("b", "B2")):
        await sock.create(stream_id=lane, model="gated", input=key, metadata={"gate": key})
    # A1 and B1 start together although neither has finished: lanes run concurrently.
    assert {await gate.started.get(), await gate.started.get()} == {"A1", "B1"}
    events = await barrier(sock)
    assert gate.started.empty()  # A2 and B2 wait behind their lane's head
    gate.open("B1")
    events += await sock.until(lambda e: e["type"] in TERMINAL and e["stream_id"] == "b")
    assert await gate.started.get() == "B2"  # lane b moved on while lane a is still held
    gate.open("A1")
    events += await sock.until(lambda e: e["type"] in TERMINAL and e["stream_id"] == "a")
    assert await gate.started.get() == "A2"
    gate.open("A2")
    gate.open("B2")
    done = 0
    while done < 2:
        event = await sock.recv()
        events.append(event)
        done += event["type"] in TERMINAL
    await sock.close()

    for lane, keys in (("a", ["A1", "A2"]), ("b", ["B1", "B2"])):
        responses = split_responses(by_lane(events, lane))
        assert [r[-1]["response"]["output"][0]["content"][0]["text"] for r in responses] == keys
        for response in responses:  # each one whole, in order, before the next began
            check_response_events(response)
    # The lanes' events were interleaved on the one connection.
    lanes = [e["stream_id"] for e in events]
    first_b_done = next(i for i, e in enumerate(events)
                        if e["type"] in TERMINAL and e["stream_id"] == "b")
    assert "a" in lanes[:first_b_done] and "a" in lanes[first_b_done:]


async def test_at_most_16_in_flight_more_are_queued(harness: Harness) -> None:
    gate = GateBackend()
    harness.service.models.register("gated", gate)
    sock = await harness.raw()
    keys = [f"k{i}" for i in range(18)]
    for key in keys:
        await sock.create(stream_id=f"lane-{key}", model="gated", input=key,
                          metadata={"gate": key})
    started = {await gate.started.get() for _ in range(16)}
    await barrier(sock)
    assert gate.started.empty() and len(started) == 16  # two are queued, not refused
    first = sorted(started)[0]
    gate.open(first)
    late = await gate.started.get()
    assert late not in started
    for key in keys:
        gate.open(key)
    finished = set()
    while len(finished) < 18:
        event = await sock.recv()
        assert event["type"] != "error", event
        if event["type"] == "response.completed":
            finished.add(event["stream_id"])
    await sock.close()


async def test_lane_limit_refuses_the_33rd_named_lane(harness: Harness) -> None:
    sock = await harness.raw()
    for i in range(32):
        await sock.create(stream_id=f"agent_{i}", input="hi")
    await sock.create(stream_id="agent_32", input="hi")
    await sock.create(input="the default lane does not count")
    errors: list[dict[str, Any]] = []
    completed: set[str | None] = set()
    while len(completed) < 33:
        event = await sock.recv()
        if event["type"] == "error":
            errors.append(event)
        elif event["type"] == "response.completed":
            completed.add(event.get("stream_id"))
    assert errors == [{
        "type": "error", "status": 400, "stream_id": "agent_32",
        "error": {"type": "invalid_request_error", "code": "websocket_stream_limit_reached",
                  "param": "stream_id",
                  "message": "This WebSocket connection has reached its maximum number of "
                             "distinct stream IDs (32). Reuse an existing stream_id or open a "
                             "new WebSocket connection."}}]
    assert None in completed
    # Known lanes keep working on the same connection.
    await sock.create(stream_id="agent_7", input="again")
    assert (await sock.response("agent_7"))[-1]["type"] == "response.completed"
    await sock.close()


async def test_a_fork_on_another_lane_waits_for_its_parent(harness: Harness) -> None:
    gate = GateBackend()
    harness.service.models.register("gated", gate)
    sock = await harness.raw()
    await sock.create(stream_id="main", model="gated", input="plan", metadata={"gate": "p"})
    created = await sock.recv()
    parent = created["response"]["id"]
    # The parent is still generating; the fork names it and is served once it is done.
    await sock.create(stream_id="critic", model=MODEL, input="find gaps",
                      previous_response_id=parent)
    await barrier(sock)
    gate.open("p")
    fork = await sock.response("critic")
    assert fork[-1]["type"] == "response.completed"
    assert fork[-1]["response"]["previous_response_id"] == parent
    await sock.close()
