"""The Vercel AI SDK's UI message stream protocol, served from sessions and runs.

A stock ``useChat`` (or any ``AbstractChat`` over ``DefaultChatTransport``) pointed at
``/v1/ai-sdk/chat`` with a Bearer token talks to tether: a chat id is a session id, the session
log is the truth, and each assistant message is one run (its UI message id is the run id).

=======================================  =======================================================
route                                    what it does
=======================================  =======================================================
``POST /v1/ai-sdk/chat``                 the body ``DefaultChatTransport`` sends. A new user
                                         message is published as a ``message`` (idempotency key
                                         from its UI message id and text, so a retried POST does
                                         not double it) and the agent's run starts as for any
                                         message; an assistant message carrying a front-end
                                         tool's output or an approval response is recorded as
                                         ``tool.result`` / ``approval.decision``; a
                                         ``regenerate-message`` marks the old answer superseded
                                         (``ai-sdk.superseded``) and starts a new run. The
                                         answer is the run's UI message stream, live, until the
                                         run ends or waits for a person.
``GET /v1/ai-sdk/chat/{id}/stream``      resume: the active run's reply replayed from its
                                         ``start``, then live; ``204`` when no run is active.
``POST /v1/ai-sdk/chat/{id}/stop``       cancels the active run (``run.cancel``).
``GET /v1/ai-sdk/chat/{id}/messages``    the session as ``UIMessage[]``.
=======================================  =======================================================

Capabilities are those of every transport: ``publish`` to post and to stop, ``subscribe`` to
read and resume (``approve`` for an approval response).

CORS: every answer under ``/v1/ai-sdk/`` allows any origin (and ``OPTIONS`` answers the
preflight), so a page served from elsewhere can point ``DefaultChatTransport`` here. That is safe
because these endpoints authenticate only by the ``Authorization: Bearer`` header, never by a
cookie: a foreign page gets nothing its own token would not give it.

The stream is SSE: ``data: {chunk}`` per UI message chunk, ``data: [DONE]`` last, with the
``x-vercel-ai-ui-message-stream: v1`` header. The mapping of log events to chunks is
:class:`Reply`; ``docs/ai-sdk.md`` has the table. Delivery goes through the hub like AG-UI:
:class:`ChunkOutbox` decodes the hub's SSE bytes and queues the chunks instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from tether.protocol.codes import ErrorCode, RequestError
from tether.protocol.cursor import Cursor
from tether.protocol.events import STREAM_APPEND, STREAM_END
from tether.server.http import caller_for, json_object, query
from tether.server.hub import Outbox
from tether.server.keys import CONFIG, METRICS, SESSIONS
from tether.server.metrics import Metrics
from tether.server.sessions import Caller, Catchup, SessionService, parse_session
from tether.server.sse import SseSink, SseStream

log = logging.getLogger("tether.aisdk")

SUPERSEDED = "ai-sdk.superseded"  # {"superseded": run, "by": run}: a regenerated answer
HEADERS = {"x-vercel-ai-ui-message-stream": "v1"}
DONE = b"data: [DONE]\n\n"
WAITING = frozenset({"awaiting_tool", "awaiting_approval"})
FINAL = frozenset({"completed", "failed", "cancelled"})
# Answers to a run that another tab (or a retry) already gave: the stream tells what counted.
ANSWERED = frozenset({ErrorCode.ALREADY_DECIDED, ErrorCode.UNKNOWN_CALL, ErrorCode.RUN_FINISHED})
MAX_ID = 100

Json = dict[str, Any]


def _chunk(type_: str, **fields: Any) -> Json:
    chunk: Json = {"type": type_}
    chunk.update((k, v) for k, v in fields.items() if v is not None)
    return chunk


def sse(chunks: Iterable[Json]) -> bytes:
    return b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks)


# --- the mapping -----------------------------------------------------------------------------


@dataclass
class Reply:
    """One assistant message: the chunks of one run's events, fed in seq order.

    ``run`` is None until the ``run.created`` answering the message at ``message_seq`` shows
    up. Events up to ``emit_after`` only build state (a continuation sends what follows the
    wait it continues); a wait transition at or after ``end_waits_from`` ends the reply (the
    SDK then answers with a tool output or an approval response in a new request), earlier
    ones were resolved already and only close a step.
    """

    run: str | None = None
    message_seq: int | None = None
    emit_after: int = 0
    end_waits_from: int = 0
    started: bool = False
    done: bool = False
    texts: dict[str, None] = field(default_factory=dict)  # open text parts
    step_open: bool = False
    step_tools: bool = False
    calls: dict[str, str] = field(default_factory=dict)  # announced call → tool name
    decisions: dict[str, str] = field(default_factory=dict)

    def start(self) -> list[Json]:
        if self.started or self.run is None:
            return []
        self.started = True
        return [_chunk("start", messageId=self.run)]

    def feed(self, seq: int, type_: str, data: Any) -> list[Json]:
        if self.done or not isinstance(data, dict):
            return []
        if self.run is None:
            given = data.get("input")
            if (type_ == "run.created" and isinstance(given, dict)
                    and given.get("message_seq") == self.message_seq
                    and isinstance(data.get("run"), str)):
                self.run = data["run"]
                return self.start()
            return []
        if data.get("run") != self.run:
            return []
        out = self._map(seq, type_, data)
        if seq <= self.emit_after and not self.done:
            return []
        return self.start() + out if out else out

    def _map(self, seq: int, type_: str, data: Json) -> list[Json]:
        out: list[Json] = []
        if type_ == "run.state":
            state = str(data.get("state"))
            out.append(_chunk("data-tether-run", id=self.run, transient=True,
                              data={"run": self.run, "state": state}))
            if state in WAITING:
                self._end_step(out)
                if seq >= self.end_waits_from:
                    out.append(_chunk("finish", finishReason="tool-calls"))
                    self.done = True
            elif state in FINAL:
                out += [_chunk("text-end", id=t) for t in self.texts]
                self.texts.clear()
                self._end_step(out)
                if state == "completed":
                    out.append(_chunk("finish", finishReason="stop"))
                elif state == "cancelled":
                    out.append(_chunk("abort", reason="cancelled"))
                else:
                    out.append(_chunk("error", errorText=str(data.get("error") or "run failed")))
                self.done = True
        elif type_ == STREAM_APPEND:
            stream = data.get("stream")
            if not isinstance(stream, str):
                return out
            if stream not in self.texts:
                self._begin_step(out, text=True)
                self.texts[stream] = None
                out.append(_chunk("text-start", id=stream))
            text = data.get("text")
            if isinstance(text, str) and text:
                out.append(_chunk("text-delta", id=stream, delta=text))
        elif type_ == STREAM_END:
            stream = data.get("stream")
            if stream in self.texts:
                del self.texts[stream]
                out.append(_chunk("text-end", id=stream))
        elif type_ in ("tool.call", "approval.request"):
            call, name = data.get("call"), data.get("name")
            if not isinstance(call, str) or not isinstance(name, str) or call in self.calls:
                return out  # a call already announced (its approval came first)
            self._begin_step(out, text=False)
            self.step_tools = True
            self.calls[call] = name
            server = True if type_ == "approval.request" or data.get("target") != "client" \
                else None
            arguments = data.get("arguments")
            out += [
                _chunk("tool-input-start", toolCallId=call, toolName=name, providerExecuted=server),
                _chunk("tool-input-delta", toolCallId=call,
                       inputTextDelta=orjson.dumps(arguments).decode()),
                _chunk("tool-input-available", toolCallId=call, toolName=name, input=arguments,
                       providerExecuted=server),
            ]
            if type_ == "approval.request":
                out.append(_chunk("tool-approval-request", approvalId=call, toolCallId=call))
        elif type_ == "approval.decision":
            call, decision = data.get("call"), data.get("decision")
            if isinstance(call, str) and call in self.calls and call not in self.decisions:
                self.decisions[call] = str(decision)
                out.append(_chunk("tool-approval-response", approvalId=call,
                                  approved=decision == "approve",
                                  reason="expired" if decision == "expired" else None))
        elif type_ == "tool.result":
            call = data.get("call")
            if not isinstance(call, str) or call not in self.calls:
                return out
            if self.decisions.get(call, "approve") != "approve":
                out.append(_chunk("tool-output-denied", toolCallId=call))
            elif "result" in data:
                out.append(_chunk("tool-output-available", toolCallId=call,
                                  output=data["result"]))
            else:
                out.append(_chunk("tool-output-error", toolCallId=call,
                                  errorText=str(data.get("error"))))
        elif type_ == "run.snapshot" and "snapshot" in data:
            out.append(_chunk("data-tether-state", id="state", data=data["snapshot"]))
        return out

    def _begin_step(self, out: list[Json], text: bool) -> None:
        if self.step_open and text and self.step_tools:
            self._end_step(out)  # text after tool calls: the model's next step
        if not self.step_open:
            self.step_open, self.step_tools = True, False
            out.append(_chunk("start-step"))

    def _end_step(self, out: list[Json]) -> None:
        if self.step_open:
            self.step_open = False
            out.append(_chunk("finish-step"))


# --- the chat as the log tells it --------------------------------------------------------------


def _user_message_id(seq: int, data: Any) -> str:
    """The UI message id of a person's ``message``: ``message_id`` (both transports write it;
    ``id`` from TetherChatTransport before), else one from its seq."""
    if isinstance(data, dict):
        for name in ("message_id", "id"):
            given = data.get(name)
            if isinstance(given, str) and given:
                return given
    return f"msg-{seq}"


@dataclass
class RunInfo:
    run: str
    created_seq: int
    state: str = "queued"
    last_wait: int | None = None  # seq of its latest awaiting_* transition
    final_seq: int | None = None
    superseded: bool = False
    pending: dict[str, str] = field(default_factory=dict)  # call → "client" | "approval"
    message_seq: int | None = None  # the person's message it answers


@dataclass
class Chat:
    """What the AI SDK endpoints need of a session's log."""

    events: list[tuple[int, str, Any, str]] = field(default_factory=list)  # seq, type, data, kind
    runs: dict[str, RunInfo] = field(default_factory=dict)
    epoch: str = ""
    last_seq: int = 0
    message_ids: dict[int, str] = field(default_factory=dict)  # seq → UI message id

    def take(self, seq: int, type_: str, data: Any, kind: str) -> None:
        self.events.append((seq, type_, data, kind))
        if not isinstance(data, dict):
            return
        if type_ == SUPERSEDED and isinstance(data.get("superseded"), str):
            old = self.runs.get(data["superseded"])
            if old is not None:
                old.superseded = True
            return
        if type_ == "message" and kind != "agent":
            message_id = _user_message_id(seq, data)
            if data.get("regenerate") is True:  # TetherChatTransport's regenerate
                for older in self.runs.values():
                    if self.message_ids.get(older.message_seq or -1) == message_id:
                        older.superseded = True
            self.message_ids[seq] = message_id
            return
        run = data.get("run")
        if not isinstance(run, str):
            return
        if type_ == "run.created":
            given = data.get("input")
            message_seq = given.get("message_seq") if isinstance(given, dict) else None
            self.runs[run] = RunInfo(run, seq, message_seq=message_seq
                                     if isinstance(message_seq, int) else None)
            return
        info = self.runs.get(run)
        if info is None:
            return
        call = data.get("call")
        if type_ == "run.state":
            info.state = str(data.get("state"))
            if info.state in WAITING:
                info.last_wait = seq
            elif info.state in FINAL:
                info.final_seq = seq
        elif type_ == "tool.call" and data.get("target") == "client" and isinstance(call, str):
            info.pending[call] = "client"
        elif type_ == "approval.request" and isinstance(call, str):
            info.pending[call] = "approval"
        elif type_ in ("tool.result", "approval.decision") and isinstance(call, str):
            info.pending.pop(call, None)

    def active(self) -> RunInfo | None:
        """The run whose reply a resume shows: the earliest unfinished one (runs of a session
        go one at a time)."""
        for info in self.runs.values():
            if info.state not in FINAL and not info.superseded:
                return info
        return None

    def latest(self) -> RunInfo | None:
        live = [i for i in self.runs.values() if not i.superseded]
        return live[-1] if live else None

    def messages(self) -> list[Json]:
        """The session as ``UIMessage[]``: people's messages and each run's reply."""
        ended = {d.get("stream"): d.get("text") for _, t, d, _ in self.events
                 if t == STREAM_END and isinstance(d, dict)}
        replies: dict[str, tuple[Reply, list[Json]]] = {}
        order: list[tuple[int, Json | str]] = []
        shown: set[str] = set()
        for seq, type_, data, kind in self.events:
            if type_ == "message" and kind != "agent":
                text = data.get("text") if isinstance(data, dict) else data
                message_id = _user_message_id(seq, data)
                if message_id in shown:
                    continue  # TetherChatTransport's regenerate: the message again
                shown.add(message_id)
                order.append((seq, {"id": message_id, "role": "user",
                                    "parts": [{"type": "text", "text": str(text or "")}]}))
                continue
            if type_ == "run.created" and isinstance(data, dict):
                run = data.get("run")
                info = self.runs.get(run) if isinstance(run, str) else None
                if info is not None and not info.superseded:
                    replies[info.run] = (Reply(run=info.run, end_waits_from=1 << 62), [])
                    order.append((seq, info.run))
                continue
            run = data.get("run") if isinstance(data, dict) else None
            if not isinstance(run, str) or run not in replies:
                continue
            reply, parts = replies[run]
            if type_ == STREAM_APPEND:
                stream = data.get("stream")
                if isinstance(ended.get(stream), str):
                    if stream in reply.texts:
                        continue  # the end holds the whole text
                    data = {**data, "text": ended[stream]}  # deltas may be trimmed
            apply_chunks(parts, reply.feed(seq, type_, data))
        out: list[Json] = []
        for _, item in order:
            if isinstance(item, str):
                parts = replies[item][1]
                for part in parts:
                    part.pop("_id", None)
                if parts:
                    out.append({"id": item, "role": "assistant", "parts": parts})
            else:
                out.append(item)
        return out


def apply_chunks(parts: list[Json], chunks: list[Json]) -> None:
    """Build UI message parts from chunks, as the SDK's stream processing does (open text
    parts carry their chunk id in ``_id`` until the caller strips it)."""
    for chunk in chunks:
        kind = chunk["type"]
        if kind == "start-step":
            parts.append({"type": "step-start"})
        elif kind == "text-start":
            parts.append({"type": "text", "text": "", "state": "streaming",
                          "_id": chunk["id"]})
        elif kind in ("text-delta", "text-end"):
            for part in reversed(parts):
                if part.get("_id") == chunk["id"] and part["type"] == "text":
                    if kind == "text-delta":
                        part["text"] += chunk["delta"]
                    else:
                        part["state"] = "done"
                    break
        elif kind == "tool-input-start":
            part = {"type": f"tool-{chunk['toolName']}", "toolCallId": chunk["toolCallId"],
                    "state": "input-streaming", "input": None}
            if chunk.get("providerExecuted"):
                part["providerExecuted"] = True
            parts.append(part)
        elif (kind.startswith("tool-") and "toolCallId" in chunk) \
                or kind == "tool-approval-response":
            _tool_chunk(parts, chunk)
        elif kind.startswith("data-") and not chunk.get("transient"):
            for part in parts:
                if part["type"] == kind and part.get("id") == chunk.get("id"):
                    part["data"] = chunk["data"]
                    break
            else:
                parts.append({"type": kind, "id": chunk.get("id"), "data": chunk["data"]})


def _tool_chunk(parts: list[Json], chunk: Json) -> None:
    kind = chunk["type"]
    key = "approvalId" if kind == "tool-approval-response" else "toolCallId"
    for part in reversed(parts):
        if part.get("toolCallId") == chunk[key]:
            break
    else:
        return
    if kind == "tool-input-available":
        part.update(state="input-available", input=chunk["input"])
    elif kind == "tool-approval-request":
        part.update(state="approval-requested", approval={"id": chunk["approvalId"]})
    elif kind == "tool-approval-response":
        approval = {"id": chunk["approvalId"], "approved": chunk["approved"]}
        if chunk.get("reason"):
            approval["reason"] = chunk["reason"]
        part.update(state="approval-responded", approval=approval)
    elif kind == "tool-output-available":
        part.update(state="output-available", output=chunk["output"])
    elif kind == "tool-output-error":
        part.update(state="output-error", errorText=chunk["errorText"])
    elif kind == "tool-output-denied":
        part.update(state="output-denied")


async def read_chat(service: SessionService, session: str) -> Chat:
    """The session's retained log, folded, a page at a time (yielding between pages)."""
    head = await service.store.head(session)
    chat = Chat(epoch=head.epoch, last_seq=head.last_seq)
    page = service.config.catchup_page
    after = max(0, head.first_seq - 1)
    while True:
        events = await service.store.read(session, after, page)
        for e in events:
            chat.take(e.seq, e.type, e.data, e.sender.kind)
        if len(events) < page:
            break
        after = events[-1].seq
        await asyncio.sleep(0)
    chat.last_seq = max(chat.last_seq, after, chat.events[-1][0] if chat.events else 0)
    return chat


# --- delivery ----------------------------------------------------------------------------------


class ChunkOutbox(Outbox):
    """Takes the hub's SSE bytes of committed events and queues the reply's chunks; ends the
    stream with ``[DONE]`` when the reply is done."""

    __slots__ = ("on_done", "reply")

    def __init__(self, sink: SseSink, limit: int, metrics: Metrics, reply: Reply) -> None:
        super().__init__(sink, limit, metrics)
        self.reply = reply
        self.on_done: Callable[[], None] | None = None

    def push(self, data: bytes) -> None:
        if self.closed:
            return
        if not data.startswith(b"id: "):
            if data.startswith(b":"):
                super().push(data)  # keep-alive comments
            return
        if self.reply.done:
            return
        try:
            frame = orjson.loads(data[data.index(b"\ndata: ") + 7:])
            chunks = self.reply.feed(frame["seq"], frame["type"], frame["data"])
        except Exception:  # a mapping bug must not stop the session's other listeners
            log.exception("AI SDK translation failed")
            return
        if chunks:
            super().push(sse(chunks))
        if self.reply.done:
            self.finish()

    def push_raw(self, data: bytes) -> None:
        super().push(data)

    def finish(self) -> None:
        super().push(DONE)
        if self.on_done is not None:
            self.on_done()


class ChunkStream(SseStream):
    """An SSE stream of UI message chunks; it ends when its reply is done."""

    def __init__(self, request: web.Request, service: SessionService, caller: Caller,
                 reply: Reply) -> None:
        config, metrics = request.app[CONFIG], request.app[METRICS]
        boxes: list[ChunkOutbox] = []

        def make(sink: SseSink) -> Outbox:
            boxes.append(ChunkOutbox(sink, config.outbound_buffer_bytes, metrics, reply))
            return boxes[0]

        super().__init__(request, service, caller, config, metrics, make)
        self.chunks = boxes[0]
        self.chunks.on_done = self.end
        self.response.headers.update(HEADERS)

    def end(self) -> None:
        self._ended.set()

    def expiry_message(self) -> bytes:
        return sse([_chunk("error", errorText="token expired")]) + DONE

    def push_message(self, data: bytes) -> None:
        self.chunks.push_raw(data)


async def serve_reply(request: web.Request, caller: Caller, session: str, reply: Reply,
                      after: Cursor) -> web.StreamResponse:
    """Answer with ``reply``'s chunks: the log after ``after``, then live, until it is done."""
    service = request.app[SESSIONS]
    stream = ChunkStream(request, service, caller, reply)
    attachment = await stream.attach(session, after, Catchup.REPLAY)

    async def prelude() -> None:
        first = reply.start()
        if first:
            stream.chunks.push_raw(sse(first))

    return await stream.deliver(attachment, prelude)


def empty_reply(message_id: str | None = None) -> web.Response:
    """A reply with nothing to say (no agent serves the chat, or the run ended already)."""
    body = sse([_chunk("start", messageId=message_id), _chunk("finish")]) + DONE
    return web.Response(body=body, headers={"Content-Type": "text/event-stream",
                                            "Cache-Control": "no-cache", **HEADERS})


# --- handlers ----------------------------------------------------------------------------------


def _text_of(message: Json) -> str:
    parts = message.get("parts")
    if not isinstance(parts, list):
        return ""
    return "".join(p["text"] for p in parts
                   if isinstance(p, dict) and p.get("type") == "text"
                   and isinstance(p.get("text"), str))


def _message_id(message: Json) -> str:
    given = message.get("id")
    if not isinstance(given, str) or not 0 < len(given) <= MAX_ID:
        raise RequestError(ErrorCode.INVALID, f"a message id must be 1–{MAX_ID} characters")
    return given


async def post_chat(request: web.Request) -> web.StreamResponse:
    query(request)
    body = await json_object(request)
    session = parse_session(body.get("id"))
    caller = caller_for(request, session, "publish")
    caller.require(session, "subscribe")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages \
            or not all(isinstance(m, dict) for m in messages):
        raise RequestError(ErrorCode.INVALID, "'messages' must be a non-empty list of messages")
    trigger = body.get("trigger", "submit-message")
    if trigger == "regenerate-message":
        return await _regenerate(request, caller, session, messages, body.get("messageId"))
    if trigger != "submit-message":
        raise RequestError(ErrorCode.INVALID,
                           "'trigger' must be submit-message or regenerate-message")
    last = messages[-1]
    if last.get("role") == "assistant":
        return await _continue(request, caller, session, last)
    if last.get("role") != "user":
        raise RequestError(ErrorCode.INVALID, "the last message must be a user or an "
                                              "assistant message")
    return await _submit(request, caller, session, last)


async def _submit(request: web.Request, caller: Caller, session: str,
                  message: Json) -> web.StreamResponse:
    """Record a person's message (once per id and text); answer with the run it starts."""
    service = request.app[SESSIONS]
    message_id = _message_id(message)
    text = _text_of(message)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    appended = await service.publish(caller, session, "message",
                                     {"text": text, "message_id": message_id},
                                     key=f"ai-sdk:{message_id}:{digest}")
    agent = service.runs.agent_for(session)
    if agent is None:
        return empty_reply()
    if agent.busy == "merge" and service.runs.active_in(session) is not None:
        return empty_reply()  # the active run takes the message in; no new reply starts
    event = appended.event
    return await serve_reply(request, caller, session, Reply(message_seq=event.seq),
                             Cursor(event.epoch, event.seq))


async def _continue(request: web.Request, caller: Caller, session: str,
                    message: Json) -> web.StreamResponse:
    """An assistant message came back with a front-end tool's output or an approval response:
    record each as the run's answer, then continue the run's reply after its wait."""
    service = request.app[SESSIONS]
    run = _message_id(message)
    chat = await read_chat(service, session)
    info = chat.runs.get(run)
    if info is None:
        raise RequestError(ErrorCode.RUN_NOT_FOUND, f"no run {run!r} in {session!r}")
    parts = message.get("parts")
    for part in parts if isinstance(parts, list) else []:
        if not isinstance(part, dict) or not isinstance(part.get("toolCallId"), str):
            continue
        call, state = part["toolCallId"], part.get("state")
        kind = info.pending.get(call)
        data: Json | None = None
        type_ = "tool.result"
        if kind == "client" and state == "output-available":
            data = {"run": run, "call": call, "result": part.get("output")}
        elif kind == "client" and state == "output-error":
            data = {"run": run, "call": call, "error": str(part.get("errorText") or "error")}
        elif kind == "approval" and state == "approval-responded":
            approval = part.get("approval")
            approved = isinstance(approval, dict) and approval.get("approved") is True
            type_ = "approval.decision"
            data = {"run": run, "call": call, "decision": "approve" if approved else "reject"}
        if data is None:
            continue
        try:
            await service.publish(caller, session, type_, data)
        except RequestError as exc:
            if exc.code not in ANSWERED:
                raise
    if info.last_wait is None or (info.final_seq is not None
                                  and info.final_seq <= info.last_wait):
        return empty_reply(run)
    reply = Reply(run=run, emit_after=info.last_wait, end_waits_from=info.last_wait + 1)
    for seq, type_, data_, _ in chat.events:  # what the client has: state, not output
        if seq > info.last_wait:
            break
        reply.feed(seq, type_, data_)
    return await serve_reply(request, caller, session, reply,
                             Cursor(chat.epoch, info.last_wait))


async def _regenerate(request: web.Request, caller: Caller, session: str,
                      messages: list[Json], message_id: Any) -> web.StreamResponse:
    """The old answer stays in the log, marked superseded; a new run answers again."""
    service = request.app[SESSIONS]
    chat = await read_chat(service, session)
    old = chat.runs.get(message_id) if isinstance(message_id, str) else None
    old = old or chat.latest()
    users = [m for m in messages if m.get("role") == "user"]
    text = _text_of(users[-1]) if users else ""
    if service.runs.agent_for(session) is None:
        raise RequestError(ErrorCode.NOT_FOUND, f"no agent serves {session!r}")
    marked = await service.publish(caller, session, SUPERSEDED,
                                   {"superseded": old.run if old else None})
    if old is not None and old.state not in FINAL:
        try:
            await service.publish(caller, session, "run.cancel",
                                  {"run": old.run, "reason": "regenerated"})
        except RequestError as exc:
            if exc.code not in ANSWERED:
                raise
    run, _ = await service.start_run(caller, session, None,
                                     {"text": text, "regenerates": old.run if old else None})
    event = marked.event
    return await serve_reply(request, caller, session, Reply(run=run),
                             Cursor(event.epoch, event.seq))


def _chat_param(request: web.Request) -> str:
    return parse_session(request.match_info["chat"])


async def get_stream(request: web.Request) -> web.StreamResponse:
    """Resume: the active run's reply from its ``start``, then live; 204 if none is active."""
    session = _chat_param(request)
    caller = caller_for(request, session, "subscribe")
    query(request)
    chat = await read_chat(request.app[SESSIONS], session)
    info = chat.active()
    if info is None:
        return web.Response(status=204)
    # A wait already resolved is replayed as a step boundary; the one the run is in ends it.
    ends = info.last_wait if info.state in WAITING and info.last_wait else chat.last_seq + 1
    reply = Reply(run=info.run, end_waits_from=ends)
    return await serve_reply(request, caller, session, reply,
                             Cursor(chat.epoch, info.created_seq - 1))


async def post_stop(request: web.Request) -> web.Response:
    """Cancel the active run, for everyone (a closed stream never does)."""
    session = _chat_param(request)
    caller = caller_for(request, session, "publish")
    query(request)
    service = request.app[SESSIONS]
    chat = await read_chat(service, session)
    info = chat.active()
    if info is None:
        return web.json_response({"cancelled": None})
    try:
        await service.publish(caller, session, "run.cancel",
                              {"run": info.run, "reason": "stopped"})
    except RequestError as exc:
        if exc.code not in ANSWERED:
            raise
        return web.json_response({"cancelled": None})
    return web.json_response({"cancelled": info.run})


async def get_messages(request: web.Request) -> web.Response:
    session = _chat_param(request)
    caller_for(request, session, "subscribe")
    query(request)
    chat = await read_chat(request.app[SESSIONS], session)
    return web.Response(body=orjson.dumps(chat.messages()), content_type="application/json")


# --- CORS ---------------------------------------------------------------------------------------

PREFIX = "/v1/ai-sdk/"
# Any origin: the endpoints take a bearer token in a header and never read cookies, so a page
# of another site can do nothing here that its own token would not let it do anyway.
CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Expose-Headers": "x-vercel-ai-ui-message-stream",
}
PREFLIGHT_HEADERS = {
    **CORS_HEADERS,
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type",
    "Access-Control-Max-Age": "600",
}


async def preflight(request: web.Request) -> web.Response:
    return web.Response(status=204, headers=PREFLIGHT_HEADERS)


async def _cors(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer under ``/v1/ai-sdk/`` (errors and streams too) carries the CORS headers."""
    # A WebSocket (none is under the prefix) is let through unread: reading ``request.path``
    # caches it on the request, which a socket keeps for its life (~0.2 KiB each).
    if not isinstance(response, web.WebSocketResponse) and request.path.startswith(PREFIX):
        for name, value in CORS_HEADERS.items():
            response.headers.setdefault(name, value)


def install(app: web.Application) -> None:
    """Serve the AI SDK chat endpoints under ``/v1/ai-sdk/chat``."""
    app.on_response_prepare.append(_cors)
    app.router.add_route("OPTIONS", "/v1/ai-sdk/chat", preflight)
    app.router.add_route("OPTIONS", "/v1/ai-sdk/chat/{chat}/{action}", preflight)
    app.router.add_post("/v1/ai-sdk/chat", post_chat)
    app.router.add_get("/v1/ai-sdk/chat/{chat}/stream", get_stream)
    app.router.add_post("/v1/ai-sdk/chat/{chat}/stop", post_stop)
    app.router.add_get("/v1/ai-sdk/chat/{chat}/messages", get_messages)
