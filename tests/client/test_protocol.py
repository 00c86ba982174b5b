"""The pure client state machine, fed frames by hand: no sockets, no event loop."""

from __future__ import annotations

import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tether.client.protocol import (
    Attached,
    AttachFailed,
    ClientProtocol,
    Completed,
    Deliver,
    Failed,
    Heartbeat,
    Notice,
    Outcome,
    PresenceChanged,
    RetryLater,
    Send,
    SessionEvent,
    Snapshot,
    Welcomed,
    backoff_delay,
)

EPOCH = "AAAAAAAA"
OTHER = "BBBBBBBB"


def event(seq: int, epoch: str = EPOCH, session: str = "demo", **extra: Any) -> dict[str, Any]:
    return {"op": "event", "session": session, "seq": seq, "cursor": f"{epoch}:{seq}",
            "type": "message", "data": {"n": seq},
            "sender": {"sub": "alice", "client": "c1", "kind": "human"}, "time": 1, **extra}


def welcome(proto: ClientProtocol, token: str | None = "tok") -> list[Outcome]:
    hello = proto.hello(token)
    return proto.receive({"op": "welcome", "id": hello["id"], "heartbeat": 15.0})


def sends(outcomes: list[Outcome]) -> list[dict[str, Any]]:
    return [o.frame for o in outcomes if isinstance(o, Send)]


def delivered(outcomes: list[Outcome]) -> list[Any]:
    return [o.item for o in outcomes if isinstance(o, Deliver)]


def seqs(outcomes: list[Outcome]) -> list[int]:
    return [i.seq for i in delivered(outcomes) if isinstance(i, SessionEvent)]


def attached(proto: ClientProtocol, frame: dict[str, Any], cursor: str, resumed: bool = True,
             **extra: Any) -> list[Outcome]:
    return proto.receive({"op": "attached", "id": frame["id"], "session": frame["session"],
                          "resumed": resumed, "cursor": cursor,
                          "epoch": cursor.split(":")[0], **extra})


def online(session: str = "demo", cursor: str | None = None) -> ClientProtocol:
    """A protocol welcomed and attached to ``session`` at ``cursor`` (default EPOCH:0)."""
    proto = ClientProtocol(client_id="c1")
    welcome(proto)
    frame = proto.attach(session, cursor)
    assert frame is not None
    attached(proto, frame, cursor or f"{EPOCH}:0")
    return proto


def test_hello_carries_identity_and_omits_empty_fields() -> None:
    proto = ClientProtocol(client_id="c1", kind="agent", tools=("search",))
    hello = proto.hello("tok")
    assert hello == {"op": "hello", "id": hello["id"], "client": "c1", "kind": "agent",
                     "token": "tok", "tools": ["search"]}
    assert "device" not in hello  # the server rejects an empty device string


def test_request_ids_are_unique_across_connections() -> None:
    proto = online()
    ids = []
    for _ in range(3):
        ids.append(proto.publish("demo", "message", {})[0])
        proto.connection_lost()
        ids.append(proto.hello(None)["id"])
    assert len(set(ids)) == len(ids) and ids == sorted(ids)


def test_attach_offline_is_sent_after_welcome() -> None:
    proto = ClientProtocol(client_id="c1")
    assert proto.attach("demo", f"{EPOCH}:4") is None
    outcomes = welcome(proto)
    assert isinstance(outcomes[0], Welcomed) and outcomes[0].heartbeat == 15.0
    (frame,) = sends(outcomes)
    assert frame["op"] == "attach" and frame["cursor"] == f"{EPOCH}:4"
    outcomes = attached(proto, frame, f"{EPOCH}:4")
    assert outcomes == [Attached("demo", True, f"{EPOCH}:4")]
    assert seqs(proto.receive(event(5))) == [5]


def test_events_are_delivered_in_order_and_duplicates_dropped() -> None:
    proto = online()
    out: list[Outcome] = []
    for seq in (1, 2, 2, 1, 3, 3, 4):
        out += proto.receive(event(seq))
    assert seqs(out) == [1, 2, 3, 4]
    assert proto.sessions["demo"].cursor == f"{EPOCH}:4"


def test_event_of_another_epoch_or_session_is_dropped() -> None:
    proto = online()
    assert proto.receive(event(1, epoch=OTHER)) == []
    assert proto.receive(event(1, session="nope")) == []
    assert seqs(proto.receive(event(1))) == [1]


def test_gap_triggers_one_resync_from_last_cursor_and_never_delivers_out_of_order() -> None:
    proto = online()
    proto.receive(event(1))
    out = proto.receive(event(3))
    assert seqs(out) == []
    (frame,) = sends(out)
    assert frame["op"] == "attach" and frame["cursor"] == f"{EPOCH}:1"
    assert proto.receive(event(4)) == []  # no second resync while one is in flight
    assert seqs(proto.receive(event(2))) == [2]  # the old subscription may still fill in
    attached(proto, frame, f"{EPOCH}:1")  # replies with the cursor it was sent: not a rewind
    out = []
    for seq in (2, 3, 4):
        out += proto.receive(event(seq))
    assert seqs(out) == [3, 4]


def test_transient_events_bypass_dedupe_and_are_marked() -> None:
    proto = online()
    frame = {**event(0), "cursor": None, "transient": True}
    items = delivered(proto.receive(frame) + proto.receive(frame))
    assert len(items) == 2  # no seq: each one is new
    assert all(isinstance(i, SessionEvent) and i.transient and i.cursor is None for i in items)
    assert proto.sessions["demo"].cursor == f"{EPOCH}:0"  # the position does not move


def test_epoch_change_surfaces_a_snapshot_and_resets_the_cursor() -> None:
    proto = online()
    for seq in (1, 2):
        proto.receive(event(seq))
    proto.connection_lost()
    (frame,) = sends(welcome(proto))
    assert frame["cursor"] == f"{EPOCH}:2"
    snap = {"events": [event(1, epoch=OTHER), event(2, epoch=OTHER)],
            "presence": [{"member": "m1"}]}
    out = attached(proto, frame, f"{OTHER}:7", resumed=False, snapshot=snap,
                   reason="epoch_changed")
    (item,) = delivered(out)
    assert isinstance(item, Snapshot)
    assert item.reason == "epoch_changed" and item.previous == f"{EPOCH}:2"
    assert item.cursor == f"{OTHER}:7" and [e.seq for e in item.events] == [1, 2]
    assert item.presence == ({"member": "m1"},)
    assert Attached("demo", False, f"{OTHER}:7") in out
    assert proto.receive(event(3)) == []  # the old epoch is over
    assert proto.receive(event(7, epoch=OTHER)) == []  # covered by the snapshot
    assert seqs(proto.receive(event(8, epoch=OTHER))) == [8]


def test_first_attach_without_resume_is_a_snapshot_with_no_previous() -> None:
    proto = ClientProtocol(client_id="c1")
    welcome(proto)
    frame = proto.attach("demo")
    assert frame is not None
    (item,) = delivered(attached(proto, frame, f"{EPOCH}:50", resumed=False,
                                 snapshot={"events": [], "presence": []},
                                 reason="history_trimmed"))
    assert isinstance(item, Snapshot) and item.previous is None


def test_publish_reply_matching() -> None:
    proto = online()
    rid, frame = proto.publish("demo", "message", {"a": 1})
    assert frame is not None and frame["id"] == rid and len(frame["key"]) == 32
    assert proto.has_outstanding()
    out = proto.receive({"op": "published", "id": rid, "session": "demo", "seq": 1,
                         "cursor": f"{EPOCH}:1", "duplicate": False})
    assert out == [Completed(rid, f"{EPOCH}:1", duplicate=False)]
    assert not proto.has_outstanding()
    assert proto.receive({"op": "published", "id": rid, "seq": 1}) == []  # answered already


def test_publish_errors_permanent_and_temporary() -> None:
    proto = online()
    rid, _ = proto.publish("demo", "tether.bogus", {})
    out = proto.receive({"op": "error", "id": rid, "code": "unknown_event_type",
                         "message": "no"})
    assert out == [Failed(rid, "unknown_event_type", "no")]
    rid, frame = proto.publish("demo", "message", {}, key="k1")
    assert frame is not None
    for attempt in range(3):
        out = proto.receive({"op": "error", "id": rid, "code": "rate_limited",
                             "message": "slow down", "temporary": True})
        retry = RetryLater(rid, attempt, "rate_limited", "slow down", session="demo",
                           op="publish")
        assert out == [retry]
        assert not proto.has_outstanding()
        assert sends(proto.retry(retry)) == [frame]  # same id, same key
        assert proto.retry(retry) == []  # already in flight
    rid, frame = proto.publish("demo", "typing", {}, transient=True)
    out = proto.receive({"op": "error", "id": rid, "code": "rate_limited", "message": "",
                         "temporary": True, "retry_after": 250})
    # Unordered (transient): retried on its own, with the server's retry_after in seconds.
    assert out == [RetryLater(rid, 0, "rate_limited", "", op="publish", retry_after=0.25)]
    assert proto.resend(rid) == frame


def test_error_without_id_or_unknown_frame_is_a_notice() -> None:
    proto = online()
    frame = {"op": "error", "id": None, "code": "bad_frame", "message": "x"}
    assert proto.receive(frame) == [Notice(frame)]
    assert proto.receive({"op": "mystery"}) == [Notice({"op": "mystery"})]


def test_pending_publish_is_replayed_with_same_id_and_key_after_reconnect() -> None:
    proto = online()
    proto.receive(event(1))
    rid, frame = proto.publish("demo", "message", {"x": 1})
    assert frame is not None
    offline_rid, offline = proto.publish("demo", "message", {"x": 2})  # still connected
    assert offline is not None
    proto.connection_lost()
    queued_rid, queued = proto.publish("demo", "message", {"x": 3})
    assert queued is None  # offline: sent after the next welcome
    out = welcome(proto)
    frames = sends(out)
    assert [f["op"] for f in frames] == ["attach", "publish", "publish", "publish"]
    assert frames[0]["cursor"] == f"{EPOCH}:1"  # re-attach first, from the last cursor
    assert frames[1] == frame  # identical: same id, same idempotency key
    assert frames[2] == offline
    assert frames[3]["id"] == queued_rid
    out = proto.receive({"op": "published", "id": rid, "seq": 2, "cursor": f"{EPOCH}:2",
                         "duplicate": True})
    assert out == [Completed(rid, f"{EPOCH}:2", duplicate=True)]
    assert offline_rid in proto.publishes


def test_transient_publish_in_flight_is_not_replayed() -> None:
    proto = online()
    rid, _ = proto.publish("demo", "typing", {}, transient=True)
    assert proto.connection_lost() == [Completed(rid, None)]
    assert [f["op"] for f in sends(welcome(proto))] == ["attach"]


def test_attach_errors() -> None:
    proto = ClientProtocol(client_id="c1")
    welcome(proto)
    frame = proto.attach("secret")
    assert frame is not None
    out = proto.receive({"op": "error", "id": frame["id"], "code": "forbidden",
                         "message": "no"})
    assert out == [AttachFailed("secret", "forbidden", "no")]
    assert "secret" not in proto.sessions
    frame = proto.attach("demo")
    assert frame is not None
    out = proto.receive({"op": "error", "id": frame["id"], "code": "store_unavailable",
                         "message": "down", "temporary": True})
    assert out == [RetryLater(frame["id"], 0, "store_unavailable", "down", session="demo")]
    again = proto.retry_attach("demo")
    assert again is not None and again["id"] != frame["id"]
    out = proto.receive({"op": "error", "id": again["id"], "code": "store_unavailable",
                         "message": "down", "temporary": True, "retry_after": 1500})
    (retry,) = out
    assert isinstance(retry, RetryLater) and retry.retry_after == 1.5 and retry.attempt == 1
    assert proto.give_up(retry) == [AttachFailed("demo", "store_unavailable", "down")]
    assert "demo" not in proto.sessions


def test_failed_resync_attach_is_retried_even_though_it_was_attached() -> None:
    proto = online()
    proto.receive(event(1))
    (frame,) = sends(proto.receive(event(3)))  # a gap: resync
    out = proto.receive({"op": "error", "id": frame["id"], "code": "store_unavailable",
                         "message": "down", "temporary": True})
    assert [type(o) for o in out] == [RetryLater]
    assert proto.receive(event(2)) == []  # the server dropped the subscription
    again = proto.retry_attach("demo")
    assert again is not None and again["cursor"] == f"{EPOCH}:1"
    attached(proto, again, f"{EPOCH}:1")
    assert seqs(proto.receive(event(2))) == [2]


def test_presence_maintenance_and_set_reply() -> None:
    proto = online()
    m1 = {"member": "m1", "state": {}}
    m2 = {"member": "m2", "state": {}}
    out = proto.receive({"op": "presence", "session": "demo", "action": "list",
                         "members": [m1]})
    assert out == [PresenceChanged("demo", "list", (m1,))]
    proto.receive({"op": "presence", "session": "demo", "action": "join", "members": [m2]})
    assert set(proto.sessions["demo"].presence) == {"m1", "m2"}
    proto.receive({"op": "presence", "session": "demo", "action": "leave", "members": [m1]})
    assert set(proto.sessions["demo"].presence) == {"m2"}
    rid, frame = proto.set_presence("demo", {"typing": True})
    assert frame == {"op": "presence.set", "id": rid, "session": "demo",
                     "state": {"typing": True}}
    me = {"member": "m2", "state": {"typing": True}}
    out = proto.receive({"op": "presence", "session": "demo", "action": "set", "id": rid,
                         "members": [me]})
    assert Completed(rid, [me]) in out
    assert proto.sessions["demo"].presence["m2"]["state"] == {"typing": True}


def test_presence_set_across_a_reconnect_rides_on_the_reattach() -> None:
    proto = online()
    rid, _ = proto.set_presence("demo", {"busy": 1})
    proto.connection_lost()
    (frame,) = sends(welcome(proto))
    assert frame["presence"] == {"busy": 1}
    assert Completed(rid, None) in attached(proto, frame, f"{EPOCH}:0")


def test_detach_online_and_offline() -> None:
    proto = online()
    rid, frame = proto.detach("demo")
    assert frame == {"op": "detach", "id": rid, "session": "demo"}
    assert proto.receive(event(1)) == []  # in flight before the detach: dropped
    assert proto.receive({"op": "detached", "id": rid, "session": "demo"}) == [Completed(rid)]
    proto.connection_lost()
    assert proto.detach("other")[1] is None


def test_detach_in_flight_completes_when_the_connection_drops() -> None:
    proto = online()
    rid, _ = proto.detach("demo")
    assert Completed(rid) in proto.connection_lost()


def test_overflow_drops_until_resync_then_resumes_from_the_rejected_event() -> None:
    proto = online()
    for seq in (1, 2, 3):
        proto.receive(event(seq))
    proto.overflow("demo", 2)  # the I/O layer could not queue seq 3
    assert proto.receive(event(4)) == []
    frame = proto.resync("demo")
    assert frame is not None and frame["cursor"] == f"{EPOCH}:2"
    assert proto.resync("demo") is None  # not overflowing any more
    out = proto.receive(event(3))  # the replaced subscription may still deliver
    assert seqs(out) == [3]
    attached(proto, frame, f"{EPOCH}:2")  # must not rewind below 3
    out = []
    for seq in (3, 4, 5):
        out += proto.receive(event(seq))
    assert seqs(out) == [4, 5]


def test_ping_pong() -> None:
    proto = online()
    ping = proto.ping()
    assert ping is not None
    rid, frame = ping
    assert frame == {"op": "ping", "id": rid} and proto.has_outstanding()
    assert proto.receive({"op": "pong", "id": rid, "time": 1}) == [Completed(rid)]
    proto.connection_lost()
    assert proto.ping() is None
    assert proto.receive({"op": "pong", "id": rid}) == []


def test_backoff_is_full_jitter_within_bounds() -> None:
    base, cap = 0.5, 30.0
    rng, reference = random.Random(1234), random.Random(1234)
    for attempt in range(40):
        delay = backoff_delay(attempt, base, cap, rng)
        ceiling = min(cap, base * 2 ** attempt)
        assert 0.0 <= delay <= ceiling
        assert delay == reference.uniform(0.0, ceiling)  # full jitter: the whole window
    assert backoff_delay(10_000, base, cap, random.Random(0)) <= cap  # no float overflow


def test_backoff_uses_the_whole_window() -> None:
    rng = random.Random(7)
    delays = [backoff_delay(3, 1.0, 100.0, rng) for _ in range(2000)]
    assert max(delays) <= 8.0
    assert min(delays) < 0.5 and max(delays) > 7.5  # not "8 ± jitter": anywhere in [0, 8]


def test_heartbeat_pings_then_drops() -> None:
    hb = Heartbeat(10.0, now=0.0)
    assert hb.poll(4.0) == ("wait", 6.0)
    hb.received(5.0)
    assert hb.poll(14.0) == ("wait", 1.0)
    assert hb.poll(15.0) == ("ping", 10.0)
    assert hb.poll(20.0) == ("wait", 5.0)
    assert hb.poll(25.0) == ("drop", 0.0)
    hb.received(26.0)  # any frame (the pong) clears the pending ping
    assert hb.poll(27.0) == ("wait", 9.0)


# --- property: whatever the server replays, the app sees 1..N once, in order ---------------

feed_step = st.one_of(
    st.tuples(st.just("deliver"), st.integers(0, 5), st.integers(1, 6)),  # rewind, length
    st.tuples(st.just("reconnect"), st.just(0), st.just(0)),
    st.tuples(st.just("gap"), st.integers(2, 4), st.just(0)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(feed_step, max_size=40))
def test_any_overlapping_replay_is_delivered_exactly_once_in_order(
        steps: list[tuple[str, int, int]]) -> None:
    """A model server that resends overlapping ranges, skips ahead, and loses connections."""
    proto = online()
    server_next = 1  # the server believes the client has everything before this
    got: list[int] = []
    for kind, a, b in steps:
        if kind == "deliver":
            start = max(1, server_next - a)  # overlap: resend some already-sent events
            for seq in range(start, start + b):
                got += seqs(proto.receive(event(seq)))
            server_next = start + b
        elif kind == "gap":
            out = proto.receive(event(server_next + a))  # skipped ahead: a lost live frame
            got += seqs(out)
            for frame in sends(out):  # the client asks to resume from what it holds
                cursor = frame["cursor"]
                attached(proto, frame, cursor)
                server_next = int(cursor.split(":")[1]) + 1
        else:
            proto.connection_lost()
            (frame,) = sends(welcome(proto))
            attached(proto, frame, frame["cursor"])
            server_next = int(frame["cursor"].split(":")[1]) + 1
    for seq in range(server_next, server_next + 3):  # settle: the tail arrives
        got += seqs(proto.receive(event(seq)))
    assert got == list(range(1, len(got) + 1))
