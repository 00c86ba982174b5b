from __future__ import annotations

import pytest

from tether.agents.state import (
    FINAL_STATES,
    TRANSITIONS,
    IllegalTransition,
    RunState,
    Trigger,
    fold,
    mermaid,
    next_state,
)


def test_happy_path_and_waits() -> None:
    state = RunState.QUEUED
    for trigger in (Trigger.START, Trigger.REQUEST_APPROVAL, Trigger.DECISION,
                    Trigger.CALL_CLIENT_TOOL, Trigger.TOOL_RESULT, Trigger.COMPLETE):
        state = next_state(state, trigger)
    assert state == RunState.COMPLETED


@pytest.mark.parametrize("final", sorted(FINAL_STATES))
@pytest.mark.parametrize("trigger", list(Trigger))
def test_final_states_accept_nothing(final: RunState, trigger: Trigger) -> None:
    with pytest.raises(IllegalTransition):
        next_state(final, trigger)


def test_illegal_transitions_raise() -> None:
    with pytest.raises(IllegalTransition):
        next_state(RunState.QUEUED, Trigger.COMPLETE)
    with pytest.raises(IllegalTransition):
        next_state(RunState.AWAITING_APPROVAL, Trigger.TOOL_RESULT)


def test_every_state_is_reachable_and_can_be_cancelled_until_final() -> None:
    reachable = {RunState.QUEUED}
    for moves in TRANSITIONS.values():
        reachable |= set(moves.values())
    assert reachable == set(RunState)
    for state, moves in TRANSITIONS.items():
        assert (Trigger.CANCEL in moves) == (state not in FINAL_STATES)


def test_fold_rebuilds_runs_from_the_log() -> None:
    log = [
        (1, "message", {"text": "hi"}),
        (2, "run.created", {"run": "r1", "agent": "a", "trigger": "message"}),
        (3, "run.state", {"run": "r1", "state": "running"}),
        (4, "approval.request", {"run": "r1", "call": "c1", "name": "t", "arguments": {}}),
        (5, "run.state", {"run": "r1", "state": "awaiting_approval"}),
    ]
    run = fold(log)["r1"]
    assert run.state == RunState.AWAITING_APPROVAL and list(run.pending) == ["c1"]
    log += [(6, "approval.decision", {"run": "r1", "call": "c1", "decision": "approve"}),
            (7, "run.state", {"run": "r1", "state": "completed"})]
    run = fold(log)["r1"]
    assert run.final and not run.pending and run.decided == {"c1"}


def test_diagram_is_generated_from_the_table() -> None:
    diagram = mermaid()
    for state, moves in TRANSITIONS.items():
        for trigger, target in moves.items():
            assert f"{state} --> {target}: {trigger}" in diagram


def test_docs_show_the_current_diagram() -> None:
    from pathlib import Path

    doc = (Path(__file__).parents[2] / "docs" / "runs.md").read_text()
    assert f"```mermaid\n{mermaid()}\n```" in doc
