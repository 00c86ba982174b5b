"""Errors in OpenAI's shape; the connection stays open wherever OpenAI keeps it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from tests.helpers import token
from tests.responses.conftest import (
    MODEL,
    TOOLS,
    GateBackend,
    Harness,
    RawSocket,
    start_harness,
)


async def still_serves(sock: RawSocket, stream_id: str | None = None) -> None:
    """The connection survived the error: a normal create completes."""
    await sock.create(stream_id=stream_id, input="still there?")
    events = await sock.response(stream_id)
    assert events[-1]["type"] == "response.completed", events[-1]


def error(code: str | None, param: str | None, status: int = 400,
          stream_id: str | None = None) -> Callable[[dict[str, Any]], None]:
    def check(event: dict[str, Any]) -> None:
        assert event["type"] == "error", event
        assert event["status"] == status
        assert event["error"]["type"] == "invalid_request_error"
        assert event["error"]["code"] == code
        assert event["error"]["param"] == param
        assert isinstance(event["error"]["message"], str) and event["error"]["message"]
        assert event.get("stream_id") == stream_id

    return check


@pytest.mark.parametrize("stream_id", [None, "main"])
@pytest.mark.parametrize("previous", ["resp_" + "ab" * 16, "resp_nope", "not-an-id"])
async def test_unknown_previous_response(harness: Harness, stream_id: str | None,
                                         previous: str) -> None:
    sock = await harness.raw()
    await sock.create(stream_id=stream_id, input="x", previous_response_id=previous)
    event = await sock.recv()
    error("previous_response_not_found", "previous_response_id", stream_id=stream_id)(event)
    assert event["error"]["message"] == f"Previous response with id '{previous}' not found."
    await still_serves(sock, stream_id)
    await sock.close()


@pytest.mark.parametrize("where", ["node memory", "store"])
async def test_another_subjects_response_is_not_found(harness: Harness, where: str) -> None:
    alice = await harness.raw("alice")
    await alice.create(input="a secret plan", tools=TOOLS)
    rid = (await alice.response())[-1]["response"]["id"]
    if where == "store":
        harness.service.chains._cache.clear()
    bob = await harness.raw("bob")
    await bob.create(input="tell me", previous_response_id=rid)
    event = await bob.recv()  # the error, and nothing of alice's before it
    error("previous_response_not_found", "previous_response_id")(event)
    await still_serves(bob)
    client = harness.client("bob")
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(rid)
    await client.close()
    # alice herself continues fine
    await alice.create(input="go on", previous_response_id=rid)
    assert (await alice.response())[-1]["type"] == "response.completed"
    await alice.close()
    await bob.close()


@pytest.mark.parametrize("stream_id", ["", "has space", "x" * 257, "ünïcode", "lane\n", 42,
                                       ["a"]])
async def test_invalid_stream_id(harness: Harness, stream_id: Any) -> None:
    sock = await harness.raw()
    await sock.send({"type": "response.create", "model": MODEL, "input": "x",
                     "stream_id": stream_id})
    event = await sock.recv()
    error("invalid_stream_id", "stream_id")(event)
    assert "stream_id" not in event
    await still_serves(sock, "x" * 256)  # the longest valid one
    await sock.close()


@pytest.mark.parametrize("text", ["{not json", "[1, 2", "", "\x00"])
async def test_malformed_json(harness: Harness, text: str) -> None:
    sock = await harness.raw()
    await sock.ws.send_str(text)
    error("invalid_json", None)(await sock.recv())
    await still_serves(sock)
    await sock.close()


@pytest.mark.parametrize("message", [
    {"type": "response.cancel"}, {"type": "session.update"}, {"type": 7}, {"input": "x"},
    [{"type": "response.create"}], "response.create",
])
async def test_unknown_or_missing_event_type(harness: Harness, message: Any) -> None:
    sock = await harness.raw()
    await sock.ws.send_str(orjson.dumps(message).decode())
    event = await sock.recv()
    assert event["type"] == "error" and event["status"] == 400
    if isinstance(message, dict) and isinstance(message.get("type"), str):
        error("invalid_value", "type")(event)
        assert "'response.create'" in event["error"]["message"]
    elif isinstance(message, dict) and "type" in message:
        error("invalid_type", "type")(event)
    elif isinstance(message, dict):
        error("missing_required_parameter", "type")(event)
    else:
        error("invalid_type", None)(event)
    await still_serves(sock)
    await sock.close()


async def test_steering_is_refused_as_openai_does_when_unsupported(harness: Harness) -> None:
    sock = await harness.raw()
    await sock.send({"type": "response.steer", "previous_response_id": "resp_x",
                     "input": "also check the docs"})
    event = await sock.recv()
    assert event["type"] == "response.steer.failed"
    assert event["error"]["code"] == "steering_not_supported"
    assert event["steer"]["input"] == "also check the docs"
    await still_serves(sock)
    await sock.close()


@pytest.mark.parametrize(("body", "code", "param"), [
    ({"model": None}, "missing_required_parameter", "model"),
    ({"model": "gpt-nonexistent"}, "model_not_found", "model"),
    ({"input": 5}, "invalid_type", "input"),
    ({"input": [{"role": "robot", "content": "x"}]}, "invalid_value", "input[0].role"),
    ({"input": [{"type": "web_search_call"}]}, "invalid_value", "input[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "invalid_value", "input[0].content[0].type"),
    ({"tools": [{"type": "web_search"}]}, "invalid_value", "tools[0].type"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "name": "nope"}},
     "invalid_value", "tool_choice"),
    ({"input": [{"type": "function_call_output", "call_id": "call_x", "output": "1"}]},
     None, "input"),
    ({"temperature": 3}, "invalid_value", "temperature"),
    ({"metadata": {"k": 1}}, "invalid_value", "metadata"),
    ({"background": True}, "invalid_value", "background"),
])
async def test_invalid_create(harness: Harness, body: dict[str, Any], code: str | None,
                              param: str) -> None:
    sock = await harness.raw()
    event: dict[str, Any] = {"type": "response.create", "model": MODEL, "input": "x",
                             "stream_id": "s", **body}
    await sock.send({k: v for k, v in event.items() if v is not None})
    error(code, param, stream_id="s")(await sock.recv())
    await still_serves(sock, "s")
    await sock.close()


async def test_the_stream_field_is_accepted_and_ignored(harness: Harness) -> None:
    sock = await harness.raw()
    await sock.create(input="x", stream=True)
    assert (await sock.response())[-1]["type"] == "response.completed"
    await sock.close()


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer not-a-token"},
                                     {"Authorization": "Basic abc"}])
async def test_upgrade_without_a_valid_token_is_refused(harness: Harness,
                                                        headers: dict[str, str]) -> None:
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(f"{harness.base_url}/responses", headers=headers)
        assert refused.value.status == 401
        async with http.post(f"{harness.base_url}/responses", headers=headers,
                             json={"model": MODEL, "input": "x"}) as resp:
            assert resp.status == 401
            body = await resp.json()
    assert body["error"]["code"] == "invalid_api_key"
    assert body["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("tok", [token(caps=["subscribe"]), token(sessions=["demo*"])])
async def test_a_token_without_the_responses_grant_is_forbidden(harness: Harness,
                                                                tok: str) -> None:
    headers = {"Authorization": f"Bearer {tok}"}
    async with aiohttp.ClientSession() as http, http.post(
            f"{harness.base_url}/responses", headers=headers,
            json={"model": MODEL, "input": "x"}) as resp:
        assert resp.status == 403
        assert (await resp.json())["error"]["code"] == "insufficient_permissions"
    scoped = token(sessions=["responses"], caps=["publish"])
    sock = await RawSocket.connect(harness.port, scoped)
    await still_serves(sock)
    await sock.close()


async def test_http_errors(harness: Harness) -> None:
    headers = {"Authorization": f"Bearer {token()}"}
    async with aiohttp.ClientSession() as http:
        url = f"{harness.base_url}/responses"
        async with http.post(url, headers=headers, data=b"{nope") as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["code"] == "invalid_json"
        async with http.post(url, headers=headers,
                             json={"model": MODEL, "input": "x", "stream_id": "a"}) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["param"] == "stream_id"
        async with http.post(url, headers=headers, json={
                "model": MODEL, "input": "x", "previous_response_id": "resp_" + "0" * 32,
                "stream": True}) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["code"] == "previous_response_not_found"
        async with http.get(url, headers=headers) as resp:  # no upgrade
            assert resp.status == 400


async def test_connection_lifetime_ends_with_the_documented_error(
        make_harness: Callable[..., Awaitable[Harness]]) -> None:
    harness = await make_harness(max_connection_seconds=0.5)
    gate = GateBackend()
    harness.service.models.register("gated", gate)
    sock = await harness.raw()
    await sock.create(stream_id="a", model="gated", input="x", metadata={"gate": "A1"})
    await sock.create(stream_id="a", model="gated", input="x", metadata={"gate": "A2"})
    assert await gate.started.get() == "A1"
    # At the limit the queued create is refused on its lane...
    events = await sock.until(lambda e: e["type"] == "error")
    error("websocket_connection_limit_reached", None, stream_id="a")(events[-1])
    assert events[-1]["error"]["message"].startswith(
        "Responses websocket connection limit reached")
    # ...the response already generating may finish...
    gate.open("A1")
    events = await sock.until(lambda e: e["type"] == "response.completed")
    # ...then the connection-level error, then the close.
    error("websocket_connection_limit_reached", None)(await sock.recv())
    with pytest.raises(ConnectionError):
        await sock.recv()
    assert sock.close_code == 1000
    await sock.close()
    assert gate.started.empty()


async def test_shutdown_closes_with_going_away(tmp_path: Path) -> None:
    """1001: the SDK's reconnecting mode treats it as recoverable; the chain is in the store."""
    harness = await start_harness(tmp_path)
    gate = GateBackend()
    harness.service.models.register("gated", gate)
    sock = await harness.raw()
    await sock.create(input="done before")
    assert (await sock.response())[-1]["type"] == "response.completed"
    await sock.create(model="gated", input="x", metadata={"gate": "held"})
    assert await gate.started.get() == "held"
    await harness.server.stop()
    with pytest.raises(ConnectionError):
        await sock.until(lambda e: False)
    assert sock.close_code == 1001
    await sock.close()


async def test_too_many_input_items_are_refused_before_any_work(harness: Harness) -> None:
    items = [{"type": "message", "role": "user", "content": "x"}] * 10_001
    async with aiohttp.ClientSession() as http:
        resp = await http.post(f"{harness.base_url}/responses", json={
            "model": MODEL, "input": items}, headers={"Authorization": f"Bearer {token()}"})
        body = await resp.json()
    assert resp.status == 400 and body["error"]["code"] == "invalid_value"
    assert body["error"]["param"] == "input"
