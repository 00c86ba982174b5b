"""AG-UI over SSE: a session's runs as the event stream of the AG-UI protocol.

``GET /v1/sessions/{id}/agui`` serves ``text/event-stream``: one ``data: {json}`` message per
AG-UI event, camelCase fields, optional fields left out (what ``ag_ui.encoder.EventEncoder``
writes), resumable with ``Last-Event-ID`` or ``?after=``. Auth is that of ``…/stream``: a
Bearer header or ``?token=``, with the ``subscribe`` capability. ``threadId`` is the session id,
``runId`` the run id; every event carries ``timestamp`` (ms, the source event's commit time).

Mapping (a *run event* is one whose data names a ``run``):

=====================================  ==========================================================
session log event                      AG-UI events
=====================================  ==========================================================
first event of a run that is mapped    ``RUN_STARTED`` (``protocolVersion`` "1.0") before what
(normally ``run.state`` running,       it maps to. A run cancelled or failed while queued gets
trigger ``start``)                     ``RUN_STARTED`` then its ending, so every run is framed.
``run.state`` running / awaiting_*     nothing more
``run.state`` completed                ``TEXT_MESSAGE_END`` for any stream still open, then
                                       ``RUN_FINISHED``
``run.state`` failed                   (open streams ended) ``RUN_ERROR`` message = ``error``,
                                       code ``"failed"``
``run.state`` cancelled                (open streams ended) ``RUN_FINISHED`` with outcome
                                       ``{"type": "cancelled"}`` — AG-UI 1.0's own word for a run
                                       stopped before it completed that did not fail
``stream.append`` of a started run     the stream's first append: ``TEXT_MESSAGE_START``
                                       (messageId = stream id, role assistant); then
                                       ``TEXT_MESSAGE_CONTENT`` (delta = text; empty deltas are
                                       left out)
``stream.end`` of an open stream       ``TEXT_MESSAGE_END`` (a stream never opened: nothing)
``tool.call``                          ``TOOL_CALL_START`` (toolCallId, toolCallName,
                                       parentMessageId when known), ``TOOL_CALL_ARGS`` (delta =
                                       JSON of the arguments), ``TOOL_CALL_END``; nothing if the
                                       call was already announced by its ``approval.request``
``approval.request``                   the same three, for a call pending approval
``tool.result``                        ``TOOL_CALL_RESULT`` (messageId ``"{call}.result"``,
                                       role tool, content = JSON text of ``result``, or of
                                       ``{"error": error}``)
``run.snapshot``                       ``STATE_SNAPSHOT``
``run.delta``                          ``STATE_DELTA`` (when ``delta`` is a JSON-patch list)
anything else                          nothing: ``run.created`` (a queued run has not started),
                                       ``approval.decision``, ``run.cancel``, ``run.steer``,
                                       user ``message`` events (AG-UI clients keep their own),
                                       application events, streams not tied to a started run,
                                       events of a run already ended, transient events
=====================================  ==========================================================

``TOOL_CALL_START`` carries ``metadata: {"tether": {...}}``: ``{"approval": "requested"}`` for a
call waiting on a decision, ``{"target": "client"}`` for a front-end tool the client answers.
``parentMessageId`` is the run's text stream that ended just before the call, given to the first
call after it only: the log does not say which later calls came from the same model step. A call
announced by its ``approval.request`` keeps the arguments it was announced with; arguments edited
in the decision show in its result, not in a second ``TOOL_CALL_ARGS``. ``RUN_ERROR`` has no
``runId`` in AG-UI: it ends the run that is open (tether runs one run of a session at a time).

**SSE ids.** One log event may become several AG-UI events; each gets the id
``"{cursor}.{i}"`` (the source event's cursor, ``i`` its index among them). ``Last-Event-ID:
{cursor}.{i}`` continues with sub-event ``i + 1`` of that event, then the events after it; a
plain cursor means "after that whole event". Log events that map to nothing send nothing.

**Resume.** The mapping depends on what came before (has this run started, is this stream
open), so on resume the handler first folds the retained log up to the cursor through the same
translator, page by page, discarding the output, then continues live (a resume costs a read of
the retained log before the cursor; memory stays bounded). When a given cursor cannot be
honoured (another epoch, older than retention) the stream starts again from the retained
beginning and says so with a ``CUSTOM`` event named ``tether.resync`` (value ``{"reason",
"cursor"}``, no SSE id) before anything else: discard what was derived from the old stream.
Every stream opens with an SSE comment ``: tether resumed=… cursor=… [reason=…]``; a client
without a cursor whose session lost its beginning to retention gets only that comment (it has
nothing to discard) and the retained events, runs whose start was trimmed being framed by the
``RUN_STARTED`` that their first retained event brings.

**Delivery** goes through the hub like ``…/stream`` (subscribe, read the store, merge by seq;
bounded outbound buffer, catch-up from the store when the client is slow). The hub hands an
outbox the bytes it encoded for SSE subscribers; :class:`AguiOutbox` decodes the event frame
back from them and pushes the AG-UI encoding instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from tether.protocol.codes import ErrorCode, RequestError
from tether.protocol.cursor import Cursor
from tether.protocol.events import STREAM_APPEND, STREAM_END
from tether.server.http import caller_for, query, session_param
from tether.server.hub import Outbox
from tether.server.keys import CONFIG, METRICS, SESSIONS
from tether.server.metrics import Metrics
from tether.server.sessions import Catchup, SessionService, parse_cursor
from tether.server.sse import SseSink, SseStream

log = logging.getLogger("tether.agui")

PROTOCOL_VERSION = "1.0"
RESYNC = "tether.resync"
FINISHED_MEMORY = 1024  # ended run ids remembered, so a stray late event cannot reopen one

Json = dict[str, Any]


@dataclass
class RunView:
    """What the stream has told a client about one started, unfinished run."""

    streams: dict[str, None] = field(default_factory=dict)  # open text messages, in order
    calls: set[str] = field(default_factory=set)  # announced calls without a result yet
    parent: str | None = None  # the text message a next tool call belongs to


class Translator:
    """Maps session log events, in seq order, to AG-UI events.

    Deterministic: the same log gives the same AG-UI events, which is what lets a resume fold
    the log up to the cursor and continue with the events the client did not get.
    """

    def __init__(self, session: str) -> None:
        self.session = session
        self.runs: dict[str, RunView] = {}
        self.finished: OrderedDict[str, None] = OrderedDict()

    def translate(self, type_: str, data: Any, time: int) -> list[Json]:
        if not isinstance(data, dict):
            return []
        run = data.get("run")
        if not isinstance(run, str) or run in self.finished:
            return []
        out: list[Json] = []
        if type_ == "run.state":
            view = self._start(run, out, time)
            state = data.get("state")
            if state in ("completed", "failed", "cancelled"):
                self._finish(run, view, str(state), data.get("error"), out, time)
        elif type_ in (STREAM_APPEND, STREAM_END):
            stream = data.get("stream")
            view_or_none = self.runs.get(run)
            if view_or_none is None or not isinstance(stream, str):
                return []  # a stream of no started run is not run output
            if type_ == STREAM_APPEND:
                self._append(view_or_none, stream, data.get("text"), out, time)
            elif stream in view_or_none.streams:
                del view_or_none.streams[stream]
                view_or_none.parent = stream
                out.append(_ev("TEXT_MESSAGE_END", time, messageId=stream))
        elif type_ in ("tool.call", "approval.request"):
            call, name = data.get("call"), data.get("name")
            if not isinstance(call, str) or not isinstance(name, str):
                return []
            view = self._start(run, out, time)
            if call not in view.calls:
                view.calls.add(call)
                tag = ({"approval": "requested"} if type_ == "approval.request"
                       else {"target": str(data.get("target", "server"))})
                start = _ev("TOOL_CALL_START", time, toolCallId=call, toolCallName=name,
                            parentMessageId=view.parent, metadata={"tether": tag})
                view.parent = None
                out += [start,
                        _ev("TOOL_CALL_ARGS", time, toolCallId=call,
                            delta=orjson.dumps(data.get("arguments")).decode()),
                        _ev("TOOL_CALL_END", time, toolCallId=call)]
        elif type_ == "tool.result":
            call = data.get("call")
            if not isinstance(call, str):
                return []
            view = self._start(run, out, time)
            view.calls.discard(call)
            body = data["result"] if "result" in data else {"error": data.get("error")}
            out.append(_ev("TOOL_CALL_RESULT", time, messageId=f"{call}.result",
                           toolCallId=call, content=orjson.dumps(body).decode(), role="tool"))
        elif type_ == "run.snapshot" and "snapshot" in data:
            self._start(run, out, time)
            out.append(_ev("STATE_SNAPSHOT", time, snapshot=data["snapshot"]))
        elif type_ == "run.delta" and _is_patch(data.get("delta")):
            self._start(run, out, time)
            out.append(_ev("STATE_DELTA", time, delta=data["delta"]))
        return out

    def _start(self, run: str, out: list[Json], time: int) -> RunView:
        view = self.runs.get(run)
        if view is None:
            view = self.runs[run] = RunView()
            out.append(_ev("RUN_STARTED", time, threadId=self.session, runId=run,
                           protocolVersion=PROTOCOL_VERSION))
        return view

    def _append(self, view: RunView, stream: str, text: Any, out: list[Json],
                time: int) -> None:
        if stream not in view.streams:
            view.streams[stream] = None
            view.parent = None
            out.append(_ev("TEXT_MESSAGE_START", time, messageId=stream, role="assistant"))
        if isinstance(text, str) and text:
            out.append(_ev("TEXT_MESSAGE_CONTENT", time, messageId=stream, delta=text))

    def _finish(self, run: str, view: RunView, state: str, error: Any, out: list[Json],
                time: int) -> None:
        out += [_ev("TEXT_MESSAGE_END", time, messageId=s) for s in view.streams]
        if state == "completed":
            out.append(_ev("RUN_FINISHED", time, threadId=self.session, runId=run))
        elif state == "cancelled":
            out.append(_ev("RUN_FINISHED", time, threadId=self.session, runId=run,
                           outcome={"type": "cancelled"}))
        else:
            out.append(_ev("RUN_ERROR", time, message=str(error or "run failed"),
                           code="failed"))
        del self.runs[run]
        self.finished[run] = None
        if len(self.finished) > FINISHED_MEMORY:
            self.finished.popitem(last=False)


def _ev(type_: str, time: int, **fields: Any) -> Json:
    """An AG-UI event object; optional fields without a value are left out, as AG-UI does."""
    event: Json = {"type": type_}
    event.update((k, v) for k, v in fields.items() if v is not None)
    event["timestamp"] = time
    return event


def _is_patch(delta: Any) -> bool:
    return isinstance(delta, list) and all(
        isinstance(op, dict) and isinstance(op.get("op"), str) and isinstance(op.get("path"), str)
        for op in delta)


def encode(cursor: str, events: list[Json], first: int = 0) -> bytes:
    """SSE messages for the AG-UI events of one log event, from index ``first`` on."""
    return b"".join(b"id: " + f"{cursor}.{i}".encode() + b"\ndata: " + orjson.dumps(events[i])
                    + b"\n\n" for i in range(first, len(events)))


class AguiOutbox(Outbox):
    """An :class:`Outbox` that takes the hub's SSE bytes and queues their AG-UI encoding.

    The hub delivers each committed event once, in seq order, which is what the translator
    needs. Transient events (presence, typing) are dropped: AG-UI has no place for them.
    """

    __slots__ = ("skip", "translator")

    def __init__(self, sink: SseSink, limit: int, metrics: Metrics, translator: Translator,
                 skip: tuple[int, int] | None) -> None:
        super().__init__(sink, limit, metrics)
        self.translator = translator
        self.skip = skip  # (seq, i): of that event, sub-events up to i were delivered already

    def push(self, data: bytes) -> None:
        if self.closed or not data.startswith(b"id: "):
            return
        try:
            frame = orjson.loads(data[data.index(b"\ndata: ") + 7:])
            events = self.translator.translate(frame["type"], frame["data"], frame["time"])
        except Exception:  # a translator bug must not stop the session's other listeners
            log.exception("AG-UI translation failed in %s", self.translator.session)
            return
        first = 0
        if self.skip is not None and frame["seq"] >= self.skip[0]:
            if frame["seq"] == self.skip[0]:
                first = self.skip[1] + 1
            self.skip = None
        if first < len(events):
            super().push(encode(frame["cursor"], events, first))

    def push_raw(self, data: bytes) -> None:
        super().push(data)


class AguiStream(SseStream):
    """An SSE stream whose token expiry ends the open run with ``RUN_ERROR``."""

    def expiry_message(self) -> bytes:
        error = {"type": "RUN_ERROR", "message": "token expired", "code": "token_expired"}
        return b"data: " + orjson.dumps(error) + b"\n\n"

    def push_message(self, data: bytes) -> None:
        assert isinstance(self.outbox, AguiOutbox)
        self.outbox.push_raw(data)  # past the translator, which takes only hub events


def parse_position(text: str | None, session: str) -> tuple[Cursor | None, int | None]:
    """``Last-Event-ID`` / ``after``: a cursor, or ``"{cursor}.{i}"`` with a sub-event index."""
    if not text:
        return None, None
    index: int | None = None
    if "." in text:  # epochs and seqs have no dot
        text, _, index_text = text.rpartition(".")
        if not index_text.isascii() or not index_text.isdigit() or len(index_text) > 6:
            raise RequestError(ErrorCode.BAD_CURSOR, "malformed AG-UI event id")
        index = int(index_text)
    return parse_cursor(text, session), index


async def _fold(service: SessionService, translator: Translator, session: str, after: int,
                upto: int) -> None:
    """Feed the log's events in (``after``, ``upto``] to ``translator``, discarding output.

    Page by page, yielding to the loop between pages: a resume deep into a long session must
    not hold the event loop for the whole fold.
    """
    page = service.config.catchup_page
    while after < upto:
        events = await service.store.read(session, after, page)
        for event in events:
            if event.seq > upto:
                return
            translator.translate(event.type, event.data, event.time)
        if len(events) < page:
            return
        after = events[-1].seq
        await asyncio.sleep(0)


async def get_agui(request: web.Request) -> web.StreamResponse:
    session = session_param(request)
    caller = caller_for(request, session, "subscribe")
    params = query(request, "after", "token")
    cursor, index = parse_position(request.headers.get("Last-Event-ID") or params.get("after"),
                                   session)
    service, config, metrics = request.app[SESSIONS], request.app[CONFIG], request.app[METRICS]
    translator = Translator(session)
    outbox: list[AguiOutbox] = []

    def make_outbox(sink: SseSink) -> Outbox:
        outbox.append(AguiOutbox(sink, config.outbound_buffer_bytes, metrics, translator, None))
        return outbox[0]

    stream = AguiStream(request, service, caller, config, metrics, make_outbox)
    agui = outbox[0]
    position = None
    if cursor is not None and index is not None and cursor.seq > 0:
        # Continue inside that event: deliver from the event itself, skipping what was sent.
        position = Cursor(cursor.epoch, cursor.seq - 1)
    attachment = await stream.attach(session, position if position is not None else cursor,
                                     Catchup.REPLAY)
    if attachment.resumed and position is not None and cursor is not None:
        agui.skip = (cursor.seq, index or 0)

    async def prelude() -> None:
        after = attachment.after
        comment = (f": tether resumed={str(attachment.resumed).lower()} "
                   f"cursor={attachment.cursor}")
        reason = attachment.reason
        agui.push_raw(comment.encode() + (f" reason={reason}".encode() if reason else b"")
                      + b"\n\n")
        if cursor is not None and not attachment.resumed:
            resync = {"type": "CUSTOM", "name": RESYNC,
                      "value": {"reason": reason, "cursor": str(attachment.cursor)}}
            agui.push_raw(b"data: " + orjson.dumps(resync) + b"\n\n")
        await _fold(service, translator, session, max(0, attachment.head.first_seq - 1), after)

    return await stream.deliver(attachment, prelude)


def install(app: web.Application) -> None:
    """Serve ``GET /v1/sessions/{session}/agui``."""
    app.router.add_get("/v1/sessions/{session}/agui", get_agui)
