"""TetherCheckpointer: LangGraph's checkpoints kept in a session's log, against real stores
(memory, SQLite, redis), compared with LangGraph's own InMemorySaver on the same graphs."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest
from langchain_core.messages import AIMessage, HumanMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.types import Command, interrupt

from tether.agents.integrations.langgraph import DELTA_DEPTH, EVENT_TYPE, TetherCheckpointer
from tether.protocol.events import SERVER_TYPES, Sender
from tether.store import open_store
from tether.store.base import Retention, SessionStore

THREAD = {"configurable": {"thread_id": "lg-thread"}}


def echo(state: MessagesState) -> dict[str, Any]:
    return {"messages": [AIMessage(f"echo: {state['messages'][-1].content}")]}


def confirm(state: MessagesState) -> dict[str, Any]:
    answer = interrupt({"name": "confirm", "arguments": {"n": len(state["messages"])}})
    return {"messages": [AIMessage(f"confirmed: {answer}")]}


def builder(with_interrupt: bool) -> StateGraph[Any, Any, Any, Any]:
    graph = StateGraph(MessagesState)
    graph.add_node("echo", echo)
    graph.add_edge(START, "echo")
    if with_interrupt:
        graph.add_node("confirm", confirm)
        graph.add_edge("echo", "confirm")
    return graph


def contents(values: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(type(m).__name__, m.content) for m in values["messages"]]


async def test_a_conversation_reads_back_as_with_langgraphs_own_saver(
        store: SessionStore) -> None:
    """Two turns and an interrupt answered: a fresh checkpointer on the same store (a
    restarted server) sees what InMemorySaver sees, history included."""
    ours = builder(True).compile(checkpointer=TetherCheckpointer(store))
    theirs = builder(True).compile(checkpointer=InMemorySaver())
    for graph in (ours, theirs):
        await graph.ainvoke({"messages": [HumanMessage("one")]}, THREAD)
        await graph.ainvoke(Command(resume="yes"), THREAD)
        await graph.ainvoke({"messages": [HumanMessage("two")]}, THREAD)
    reopened = builder(True).compile(checkpointer=TetherCheckpointer(store))
    mine, expected = await reopened.aget_state(THREAD), await theirs.aget_state(THREAD)
    assert contents(mine.values) == contents(expected.values)
    assert mine.next == expected.next == ("confirm",)
    assert [i.value for i in mine.interrupts] == [i.value for i in expected.interrupts]
    history = [s async for s in reopened.aget_state_history(THREAD)]
    assert len(history) == len([s async for s in theirs.aget_state_history(THREAD)])
    assert [s.metadata["step"] for s in history] == sorted(
        (s.metadata["step"] for s in history), reverse=True)
    # The pending interrupt resumes on the reopened saver.
    done = await reopened.ainvoke(Command(resume="later"), THREAD)
    assert done["messages"][-1].content == "confirmed: later"


async def test_the_data_are_server_only_events_of_the_session(store: SessionStore) -> None:
    graph = builder(False).compile(checkpointer=TetherCheckpointer(store))
    await graph.ainvoke({"messages": [HumanMessage("hi")]}, THREAD)
    events = await store.read("lg-thread", 0, 100)
    assert events and {e.type for e in events} == {EVENT_TYPE}
    assert EVENT_TYPE in SERVER_TYPES  # no client can publish one
    kinds = [e.data["kind"] for e in events]
    assert "checkpoint" in kinds and "writes" in kinds


async def test_writes_are_kept_once_and_special_ones_replaced(store: SessionStore) -> None:
    saver = TetherCheckpointer(store)
    graph = builder(False).compile(checkpointer=saver)
    await graph.ainvoke({"messages": [HumanMessage("hi")]}, THREAD)
    latest = await saver.aget_tuple(THREAD)
    assert latest is not None
    config = latest.config
    await saver.aput_writes(config, [("a", 1), ("b", 2)], "task-1", "p")
    await saver.aput_writes(config, [("a", 10), ("b", 20)], "task-1", "p")  # a retry
    await saver.aput_writes(config, [("__error__", "first")], "task-1", "p")
    await saver.aput_writes(config, [("__error__", "second")], "task-1", "p")
    for reader in (saver, TetherCheckpointer(store)):
        found = await reader.aget_tuple(config)
        assert found is not None and found.pending_writes is not None
        assert [w for w in found.pending_writes if w[0] == "task-1"] == [
            ("task-1", "__error__", "second"), ("task-1", "a", 1), ("task-1", "b", 2)]


async def test_list_filters_and_limits(store: SessionStore) -> None:
    saver = TetherCheckpointer(store)
    graph = builder(False).compile(checkpointer=saver)
    await graph.ainvoke({"messages": [HumanMessage("one")]}, THREAD)
    await graph.ainvoke({"messages": [HumanMessage("two")]}, THREAD)
    every = [t async for t in saver.alist(THREAD)]
    assert len(every) >= 4
    assert [t.checkpoint["id"] for t in every] == sorted(
        (t.checkpoint["id"] for t in every), reverse=True)
    assert len([t async for t in saver.alist(THREAD, limit=2)]) == 2
    inputs = [t async for t in saver.alist(THREAD, filter={"source": "input"})]
    assert len(inputs) == 2
    before = [t async for t in saver.alist(THREAD, before=every[0].config)]
    assert [t.checkpoint["id"] for t in before] == [t.checkpoint["id"] for t in every[1:]]
    with pytest.raises(ValueError, match="thread_id"):
        _ = [t async for t in saver.alist(None)]


async def test_delete_thread_starts_it_over(store: SessionStore) -> None:
    saver = TetherCheckpointer(store)
    graph = builder(False).compile(checkpointer=saver)
    await graph.ainvoke({"messages": [HumanMessage("one")]}, THREAD)
    await saver.adelete_thread("lg-thread")
    for reader in (saver, TetherCheckpointer(store)):
        assert await reader.aget_tuple(THREAD) is None
    out = await graph.ainvoke({"messages": [HumanMessage("two")]}, THREAD)
    assert contents(out) == [("HumanMessage", "two"), ("AIMessage", "echo: two")]


async def test_an_unreadable_event_is_skipped_and_counted(store: SessionStore) -> None:
    saver = TetherCheckpointer(store)
    graph = builder(False).compile(checkpointer=saver)
    await graph.ainvoke({"messages": [HumanMessage("one")]}, THREAD)
    latest = await saver.aget_tuple(THREAD)
    assert latest is not None
    sender = Sender("tether", "langgraph", "agent")
    cid = latest.checkpoint["id"]
    await store.append("lg-thread", EVENT_TYPE, {"kind": "writes", "ns": "", "id": cid,
                                                 "task": "t", "writes": [[0, "a", "%%"]]},
                       sender)
    await store.append("lg-thread", EVENT_TYPE, {"kind": "nonsense"}, sender)
    await store.append("lg-thread", EVENT_TYPE, {
        "kind": "writes", "ns": "", "id": cid, "task": "u",
        "writes": [[0, "a", ["msgpack", base64.b64encode(b"not zlib").decode(), "zlib"]]]},
        sender)
    reader = TetherCheckpointer(store)
    found = await reader.aget_tuple(THREAD)
    assert found is not None and found.checkpoint["id"] == cid
    assert reader.unreadable == 3
    await reader.aget_tuple(THREAD)
    assert reader.unreadable == 3  # counted once
    assert contents(found.checkpoint["channel_values"]) == contents(
        latest.checkpoint["channel_values"])


async def test_a_corrupt_newest_checkpoint_falls_back_to_the_one_before(
        store: SessionStore) -> None:
    saver = TetherCheckpointer(store)
    graph = builder(False).compile(checkpointer=saver)
    await graph.ainvoke({"messages": [HumanMessage("one")]}, THREAD)
    good = await saver.aget_tuple(THREAD)
    assert good is not None
    await store.append("lg-thread", EVENT_TYPE, {
        "kind": "checkpoint", "ns": "", "id": good.checkpoint["id"] + "z", "parent": None,
        "checkpoint": ["msgpack", "!!"], "metadata": ["msgpack", "!!"]},
        Sender("tether", "langgraph", "agent"))
    reader = TetherCheckpointer(store)
    found = await reader.aget_tuple(THREAD)
    assert found is not None and found.checkpoint["id"] == good.checkpoint["id"]
    assert reader.unreadable == 1


async def test_large_values_are_compressed_and_read_back(store: SessionStore) -> None:
    saver = TetherCheckpointer(store)
    graph = builder(False).compile(checkpointer=saver)
    text = "a long message that repeats " * 400
    await graph.ainvoke({"messages": [HumanMessage(text)]}, THREAD)
    events = await store.read("lg-thread", 0, 100)
    stored = [e.data["checkpoint"] for e in events if e.data["kind"] == "checkpoint"]
    assert any(len(p) == 3 and p[2] == "zlib" for p in stored)
    # The text is in three checkpoints and two writes, compressed: less than once in all.
    assert sum(len(orjson.dumps(e.data)) for e in events) < len(text)
    state = await TetherCheckpointer(store).aget_tuple(THREAD)
    assert state is not None
    assert state.checkpoint["channel_values"]["messages"][0].content == text


async def test_a_growing_conversation_is_stored_as_what_it_gained(
        store: SessionStore) -> None:
    """A long thread: each checkpoint stores the messages the step added, with one stored
    whole every DELTA_DEPTH checkpoints; any of them reads back as LangGraph's own saver has
    it, from a fresh checkpointer (no cache) too."""
    ours = builder(False).compile(checkpointer=TetherCheckpointer(store))
    theirs = builder(False).compile(checkpointer=InMemorySaver())
    for turn in range(2 * DELTA_DEPTH):
        for graph in (ours, theirs):
            await graph.ainvoke({"messages": [HumanMessage(f"turn {turn} " + "x" * 300)]},
                                THREAD)
    events = await store.read("lg-thread", 0, 1000)
    checkpoints = [e.data for e in events if e.data.get("kind") == "checkpoint"]
    deltas = [c for c in checkpoints if "deltas" in c]
    assert deltas and len(deltas) < len(checkpoints)
    sizes = [len(orjson.dumps(c)) for c in deltas]
    assert max(sizes) < 3 * min(sizes)  # a delta does not grow with the conversation
    fresh = TetherCheckpointer(store)
    expected = [s async for s in theirs.aget_state_history(THREAD)]
    history = [s async for s in ours.aget_state_history(THREAD)]
    assert len(history) == len(expected)
    for snapshot, want in list(zip(history, expected, strict=True))[::7]:
        mine = await fresh.aget_tuple(snapshot.config)  # no cache: back along the chain
        assert mine is not None
        assert contents(mine.checkpoint["channel_values"]) == contents(want.values)


async def test_near_retention_checkpoints_are_stored_whole() -> None:
    """A delta chain never reaches back to where retention may have trimmed: with a short
    retention every checkpoint is stored whole."""
    store = open_store("memory://", Retention(max_age=1e-9))
    await store.start()
    try:
        graph = builder(False).compile(checkpointer=TetherCheckpointer(store))
        for turn in range(3):
            await graph.ainvoke({"messages": [HumanMessage(f"turn {turn}")]}, THREAD)
        events = await store.read("lg-thread", 0, 1000)
        assert not any("deltas" in e.data for e in events)
    finally:
        await store.close()


async def test_sync_calls_say_the_saver_is_async(store: SessionStore) -> None:
    graph = builder(False).compile(checkpointer=TetherCheckpointer(store))
    with pytest.raises(NotImplementedError, match="async"):
        graph.get_state(THREAD)
