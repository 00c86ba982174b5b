"""The mapping of session log events to the AI SDK's UI message chunks, without a server."""

from __future__ import annotations

from typing import Any

from tether.server.aisdk import Chat, Reply, apply_chunks

RUN = "run_" + "a" * 24
CALL = "call_" + "b" * 16

# A run that calls a server tool, then a front-end tool (and waits), then answers.
LOG: list[tuple[int, str, Any, str]] = [
    (1, "message", {"text": "tools", "message_id": "m1"}, "human"),
    (2, "run.created", {"run": RUN, "agent": "demo", "trigger": "message",
                        "input": {"text": "tools", "message_seq": 1}}, "agent"),
    (3, "run.state", {"run": RUN, "state": "running", "trigger": "start"}, "agent"),
    (4, "tool.call", {"run": RUN, "call": "call_t", "name": "current_time",
                      "arguments": {}, "target": "server"}, "agent"),
    (5, "tool.result", {"run": RUN, "call": "call_t", "result": {"time": "now"}}, "agent"),
    (6, "tool.call", {"run": RUN, "call": CALL, "name": "pick_color",
                      "arguments": {"prompt": "?"}, "target": "client"}, "agent"),
    (7, "run.state", {"run": RUN, "state": "awaiting_tool", "call": CALL}, "agent"),
    (8, "tool.result", {"run": RUN, "call": CALL, "result": {"color": "teal"}}, "agent"),
    (9, "run.state", {"run": RUN, "state": "running", "trigger": "tool_result"}, "agent"),
    (10, "stream.append", {"run": RUN, "stream": f"{RUN}.0", "text": "Hel"}, "agent"),
    (11, "stream.append", {"run": RUN, "stream": f"{RUN}.0", "text": "lo"}, "agent"),
    (12, "stream.end", {"run": RUN, "stream": f"{RUN}.0", "role": "assistant",
                        "text": "Hello"}, "agent"),
    (13, "run.state", {"run": RUN, "state": "completed", "trigger": "complete"}, "agent"),
]


def chunks(reply: Reply, upto: int = 99) -> list[dict[str, Any]]:
    out = reply.start()
    for seq, type_, data, _ in LOG:
        if seq <= upto:
            out += reply.feed(seq, type_, data)
    return out


def kinds(out: list[dict[str, Any]]) -> list[str]:
    return [c["type"] for c in out if c["type"] != "data-tether-run"]


def test_a_new_message_reply_ends_at_the_first_wait() -> None:
    reply = Reply(message_seq=1)
    out = chunks(reply)
    assert out[0] == {"type": "start", "messageId": RUN}
    assert kinds(out) == [
        "start", "start-step",
        "tool-input-start", "tool-input-delta", "tool-input-available", "tool-output-available",
        "tool-input-start", "tool-input-delta", "tool-input-available",
        "finish-step", "finish"]
    assert out[-1] == {"type": "finish", "finishReason": "tool-calls"}
    starts = [c for c in out if c["type"] == "tool-input-start"]
    assert starts[0]["providerExecuted"] is True  # a server tool: not the browser's to run
    assert "providerExecuted" not in starts[1]  # a front-end tool: onToolCall runs it
    assert reply.done


def test_a_continuation_sends_what_follows_the_wait() -> None:
    reply = Reply(run=RUN, emit_after=7, end_waits_from=8)
    out = chunks(reply)
    assert kinds(out) == ["start", "tool-output-available", "start-step", "text-start",
                          "text-delta", "text-delta", "text-end", "finish-step", "finish"]
    assert out[-1]["finishReason"] == "stop"


def test_a_resume_replays_resolved_waits_as_step_boundaries() -> None:
    reply = Reply(run=RUN, end_waits_from=14)
    assert "finish" not in kinds(chunks(reply, upto=9))
    assert kinds(chunks(Reply(run=RUN, end_waits_from=14)))[-1] == "finish"


def test_messages_use_the_ended_stream_text() -> None:
    chat = Chat()
    for seq, type_, data, kind in LOG:
        if seq != 11:  # a delta lost to retention: the end holds the text
            chat.take(seq, type_, data, kind)
    messages = chat.messages()
    assert [m["id"] for m in messages] == ["m1", RUN]
    parts = messages[1]["parts"]
    assert [p["type"] for p in parts] == ["step-start", "tool-current_time", "tool-pick_color",
                                          "step-start", "text"]
    assert parts[2]["state"] == "output-available"
    assert parts[2]["output"] == {"color": "teal"}
    assert parts[4] == {"type": "text", "text": "Hello", "state": "done"}


def test_a_cancelled_run_ends_open_text_then_aborts() -> None:
    reply = Reply(run=RUN)
    reply.feed(10, "stream.append", {"run": RUN, "stream": "s", "text": "Hi"})
    out = reply.feed(11, "run.state", {"run": RUN, "state": "cancelled"})
    assert kinds(out) == ["text-end", "finish-step", "abort"]


def test_approvals_map_to_approval_parts() -> None:
    parts: list[dict[str, Any]] = []
    reply = Reply(run=RUN, end_waits_from=99)
    for seq, type_, data in [
        (1, "approval.request", {"run": RUN, "call": CALL, "name": "publish_report",
                                 "arguments": {"title": "t"}}),
        (2, "run.state", {"run": RUN, "state": "awaiting_approval", "call": CALL}),
        (3, "approval.decision", {"run": RUN, "call": CALL, "decision": "reject"}),
        (4, "tool.call", {"run": RUN, "call": CALL, "name": "publish_report",
                          "arguments": {"title": "t"}, "target": "server"}),
        (5, "tool.result", {"run": RUN, "call": CALL, "error": "reject by alice"}),
    ]:
        apply_chunks(parts, reply.feed(seq, type_, data))
    tool = parts[1]
    assert tool["state"] == "output-denied"
    assert tool["approval"] == {"id": CALL, "approved": False}
