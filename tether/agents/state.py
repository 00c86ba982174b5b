"""The run lifecycle: everything that affects a run's state lives here.

States and the transitions between them are one literal table, :data:`TRANSITIONS`; a
transition not in it raises :class:`IllegalTransition`. Every transition is written to the
session log as a ``run.state`` event, so folding a session's log with :func:`fold` rebuilds
every run, and ``docs/runs.md`` draws its diagram from the same table (:func:`mermaid`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class RunState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    AWAITING_TOOL = "awaiting_tool"
    AWAITING_APPROVAL = "awaiting_approval"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Trigger(enum.StrEnum):
    """What moves a run from one state to the next."""

    START = "start"  # a worker picked the run up
    CALL_CLIENT_TOOL = "call_client_tool"  # the model called a front-end tool
    REQUEST_APPROVAL = "request_approval"  # the model called a tool that needs approval
    TOOL_RESULT = "tool_result"  # a front-end tool answered (or timed out)
    DECISION = "decision"  # an approval was decided (or expired)
    COMPLETE = "complete"
    FAIL = "fail"
    CANCEL = "cancel"
    RESTART = "restart"  # the server restarted while the run was streaming


S, T = RunState, Trigger

TRANSITIONS: dict[RunState, dict[Trigger, RunState]] = {
    S.QUEUED: {T.START: S.RUNNING, T.CANCEL: S.CANCELLED, T.FAIL: S.FAILED},
    S.RUNNING: {
        T.CALL_CLIENT_TOOL: S.AWAITING_TOOL,
        T.REQUEST_APPROVAL: S.AWAITING_APPROVAL,
        T.COMPLETE: S.COMPLETED,
        T.FAIL: S.FAILED,
        T.CANCEL: S.CANCELLED,
        T.RESTART: S.RUNNING,
    },
    S.AWAITING_TOOL: {T.TOOL_RESULT: S.RUNNING, T.CANCEL: S.CANCELLED, T.FAIL: S.FAILED},
    S.AWAITING_APPROVAL: {T.DECISION: S.RUNNING, T.CANCEL: S.CANCELLED, T.FAIL: S.FAILED},
    S.COMPLETED: {},
    S.FAILED: {},
    S.CANCELLED: {},
}

FINAL_STATES = frozenset(state for state, moves in TRANSITIONS.items() if not moves)
WAITING_STATES = frozenset({S.AWAITING_TOOL, S.AWAITING_APPROVAL})


class IllegalTransition(Exception):
    def __init__(self, state: RunState, trigger: Trigger) -> None:
        super().__init__(f"a run that is {state} cannot {trigger}")
        self.state = state
        self.trigger = trigger


def next_state(state: RunState, trigger: Trigger) -> RunState:
    try:
        return TRANSITIONS[state][trigger]
    except KeyError:
        raise IllegalTransition(state, trigger) from None


@dataclass
class PendingCall:
    """A tool call the run is waiting on: a front-end tool or an approval."""

    call: str
    name: str
    arguments: Any
    kind: str  # "client" | "approval"
    expires_at: int | None = None  # ms since the epoch


@dataclass
class RunRecord:
    """A run as the log tells it."""

    run: str
    agent: str
    state: RunState = RunState.QUEUED
    trigger: str = "message"
    input: Any = None
    created_seq: int = 0
    pending: dict[str, PendingCall] = field(default_factory=dict)
    decided: set[str] = field(default_factory=set)
    results: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def apply(self, trigger: Trigger) -> RunState:
        self.state = next_state(self.state, trigger)
        return self.state


def fold(events: list[tuple[int, str, Any]]) -> dict[str, RunRecord]:
    """Rebuild every run from a session's log: ``(seq, type, data)`` in seq order."""
    runs: dict[str, RunRecord] = {}
    for seq, type_, data in events:
        apply(runs, seq, type_, data)
    return runs


def apply(runs: dict[str, RunRecord], seq: int, type_: str, data: Any) -> RunRecord | None:
    """Fold one event (the next in seq order) into ``runs``; return the run it touched.

    :func:`fold` is this over a whole log; :class:`tether.agents.index.RunIndex` calls it per
    committed event to keep its tables current without reading the log again.
    """
    if not isinstance(data, dict):
        return None
    run_id = data.get("run")
    if not isinstance(run_id, str):  # application events may carry any "run" value
        return None
    if type_ == "run.created":
        created = runs[run_id] = RunRecord(run_id, data.get("agent", ""),
                                           trigger=data.get("trigger", "message"),
                                           input=data.get("input"), created_seq=seq)
        return created
    record = runs.get(run_id)
    if record is None:
        return None
    if type_ == "run.state":
        record.state = RunState(data["state"])
        record.error = data.get("error", record.error)
    elif type_ == "tool.call" and data.get("target") == "client":
        record.pending[data["call"]] = PendingCall(data["call"], data["name"],
                                                   data.get("arguments"), "client",
                                                   data.get("expires_at"))
    elif type_ == "approval.request":
        record.pending[data["call"]] = PendingCall(data["call"], data["name"],
                                                   data.get("arguments"), "approval",
                                                   data.get("expires_at"))
    elif type_ == "approval.decision":
        record.pending.pop(data["call"], None)
        record.decided.add(data["call"])
    elif type_ == "tool.result":
        record.pending.pop(data["call"], None)
        record.results[data["call"]] = data.get("result", data.get("error"))
    else:
        return None
    return record


def mermaid() -> str:
    """The state diagram, generated from :data:`TRANSITIONS`."""
    lines = ["stateDiagram-v2", "    [*] --> queued"]
    for state, moves in TRANSITIONS.items():
        for trigger, target in moves.items():
            lines.append(f"    {state} --> {target}: {trigger}")
    lines += [f"    {state} --> [*]" for state in TRANSITIONS if state in FINAL_STATES]
    return "\n".join(lines)
