// The SDK's protocol state machine, fed frames by hand (no server): the same guarantees the
// Python SDK's tests check in tests/client/test_protocol.py.

import assert from "node:assert/strict";
import { test } from "node:test";

import {
  backoffDelay,
  ClientProtocol,
  Heartbeat,
  parseCursor,
  shouldReconnect,
  wsUrl,
} from "../../tether/web/sdk/tether.js";

const EPOCH = "AAAAAAAAxxxxxx";
const cur = (seq, epoch = EPOCH) => `${epoch}:${seq}`;

function welcomed(proto, token = "t") {
  const hello = proto.hello(token);
  const outcomes = proto.receive({ op: "welcome", id: hello.id, heartbeat: 15, caps: [] });
  return { hello, outcomes };
}

function attached(proto, session, frame, extra = {}) {
  return proto.receive({ op: "attached", id: frame.id, session, resumed: true, cursor: cur(0), epoch: EPOCH, ...extra });
}

function event(session, seq, extra = {}) {
  return { op: "event", session, seq, cursor: cur(seq, extra.epoch ?? EPOCH), type: "message", data: { n: seq }, sender: { sub: "a", client: "c", kind: "human" }, time: 1, ...extra };
}

const delivered = (outcomes) => outcomes.filter((o) => o.kind === "deliver").map((o) => o.item);

test("hello carries client id, kind, device and tools; omits an empty device", () => {
  const proto = new ClientProtocol({ clientId: "c1", tools: ["pick_color"] });
  const hello = proto.hello("tok");
  assert.deepEqual(hello, { op: "hello", id: 1, client: "c1", kind: "human", token: "tok", tools: ["pick_color"] });
  const other = new ClientProtocol({ clientId: "c2", device: "Chrome on Linux", kind: "agent" });
  assert.equal(other.hello(null).device, "Chrome on Linux");
  assert.equal(other.hello(null).token, undefined);
});

test("events are delivered in order, exactly once; a gap re-attaches instead", () => {
  const proto = new ClientProtocol({ clientId: "c" });
  welcomed(proto);
  const frame = proto.attach("s");
  attached(proto, "s", frame);
  assert.equal(delivered(proto.receive(event("s", 1))).length, 1);
  assert.equal(delivered(proto.receive(event("s", 1))).length, 0, "duplicate dropped");
  assert.equal(delivered(proto.receive(event("s", 2))).length, 1);
  const gap = proto.receive(event("s", 4));
  assert.equal(delivered(gap).length, 0, "no out-of-order delivery");
  assert.equal(gap[0].kind, "send");
  assert.equal(gap[0].frame.op, "attach");
  assert.equal(gap[0].frame.cursor, cur(2), "re-attach from the last accepted cursor");
  assert.equal(proto.receive(event("s", 5)).length, 0, "one re-attach at a time");
  attached(proto, "s", gap[0].frame, { cursor: cur(2) });
  assert.deepEqual(delivered(proto.receive(event("s", 3))).map((e) => e.seq), [3]);
  assert.deepEqual(delivered(proto.receive(event("s", 4))).map((e) => e.seq), [4]);
});

test("events of another epoch (a replaced subscription) are ignored", () => {
  const proto = new ClientProtocol({ clientId: "c" });
  welcomed(proto);
  attached(proto, "s", proto.attach("s"));
  assert.equal(delivered(proto.receive(event("s", 1, { epoch: "BBBBBBBBxxxxxx" }))).length, 0);
});

test("a resumed attach never moves the position backwards", () => {
  const proto = new ClientProtocol({ clientId: "c" });
  welcomed(proto);
  attached(proto, "s", proto.attach("s"));
  proto.receive(event("s", 1));
  proto.receive(event("s", 2));
  proto.connectionLost();
  const { outcomes } = welcomed(proto);
  const reattach = outcomes.find((o) => o.kind === "send" && o.frame.op === "attach").frame;
  assert.equal(reattach.cursor, cur(2));
  attached(proto, "s", reattach, { cursor: cur(1) });
  assert.equal(delivered(proto.receive(event("s", 2))).length, 0);
  assert.equal(delivered(proto.receive(event("s", 3))).length, 1);
});

test("resumed:false is a snapshot item, never silent, and the position moves to its cursor", () => {
  const proto = new ClientProtocol({ clientId: "c" });
  welcomed(proto);
  const frame = proto.attach("s", cur(7, "OLDOLDOLxxxxxx"));
  const outcomes = proto.receive({
    op: "attached", id: frame.id, session: "s", resumed: false, reason: "epoch_changed", cursor: cur(3), epoch: EPOCH,
    snapshot: { events: [event("s", 2), event("s", 3)], presence: [{ member: "m1", sub: "bob" }] },
  });
  const [snapshot] = delivered(outcomes);
  assert.equal(snapshot.snapshot, true);
  assert.equal(snapshot.type, "tether.snapshot");
  assert.equal(snapshot.reason, "epoch_changed");
  assert.equal(snapshot.previous, cur(7, "OLDOLDOLxxxxxx"));
  assert.equal(snapshot.cursor, cur(3));
  assert.equal(snapshot.seq, 3);
  assert.deepEqual(snapshot.events.map((e) => e.seq), [2, 3]);
  assert.equal(snapshot.presence[0].sub, "bob");
  assert.equal(outcomes.at(-1).kind, "attached");
  assert.equal(delivered(proto.receive(event("s", 3))).length, 0);
  assert.equal(delivered(proto.receive(event("s", 4))).length, 1);
});

test("pending publishes are re-sent after a reconnect with the same id and key", () => {
  const proto = new ClientProtocol({ clientId: "c" });
  welcomed(proto);
  const [id, frame] = proto.publish("s", "message", { text: "hi" });
  assert.equal(typeof frame.key, "string");
  assert.ok(frame.key.length >= 16);
  proto.connectionLost();
  const [offlineId, offlineFrame] = proto.publish("s", "message", { text: "later" });
  assert.equal(offlineFrame, null, "nothing is sent without a connection");
  const { outcomes } = welcomed(proto);
  const resent = outcomes.filter((o) => o.kind === "send" && o.frame.op === "publish").map((o) => o.frame);
  assert.deepEqual(resent.map((f) => [f.id, f.key]), [[id, frame.key], [offlineId, resent[1].key]]);
  const done = proto.receive({ op: "published", id, session: "s", seq: 5, cursor: cur(5), duplicate: true });
  assert.deepEqual(done, [{ kind: "completed", id, value: cur(5), duplicate: true }]);
});

test("a transient publish in flight is not re-sent after a drop", () => {
  const proto = new ClientProtocol({ clientId: "c" });
  welcomed(proto);
  const [id, frame] = proto.publish("s", "typing", { typing: true }, { transient: true });
  assert.equal(frame.transient, true);
  const lost = proto.connectionLost();
  assert.deepEqual(lost, [{ kind: "completed", id, value: null, duplicate: false }]);
  const { outcomes } = welcomed(proto);
  assert.equal(outcomes.filter((o) => o.kind === "send" && o.frame.op === "publish").length, 0);
});

test("temporary errors retry; permanent ones fail", () => {
  const proto = new ClientProtocol({ clientId: "c" });
  welcomed(proto);
  const [id] = proto.publish("s", "message", {});
  const [retry] = proto.receive({ op: "error", id, code: "rate_limited", message: "slow down", temporary: true, retry_after: 250 });
  assert.equal(retry.kind, "retryLater");
  assert.equal(retry.attempt, 0);
  assert.equal(retry.retryAfter, 250);
  const [again] = proto.retry(retry);
  assert.equal(again.frame.id, id);
  const [failed] = proto.receive({ op: "error", id, code: "forbidden", message: "no" });
  assert.deepEqual(failed, { kind: "failed", id, code: "forbidden", message: "no" });
});

test("an attach refused for good ends the session; presence is tracked per member", () => {
  const proto = new ClientProtocol({ clientId: "c" });
  welcomed(proto);
  const frame = proto.attach("secret");
  const outcomes = proto.receive({ op: "error", id: frame.id, code: "forbidden", message: "no" });
  assert.equal(outcomes.at(-1).kind, "attachFailed");
  assert.equal(proto.sessions.has("secret"), false);

  attached(proto, "s", proto.attach("s"));
  proto.receive({ op: "presence", session: "s", action: "list", members: [{ member: "a" }, { member: "b" }] });
  proto.receive({ op: "presence", session: "s", action: "leave", members: [{ member: "a" }] });
  proto.receive({ op: "presence", session: "s", action: "join", members: [{ member: "c", state: { x: 1 } }] });
  assert.deepEqual([...proto.sessions.get("s").presence.keys()], ["b", "c"]);
});

test("presence set while offline completes with the next re-attach, which carries it", () => {
  const proto = new ClientProtocol({ clientId: "c" });
  welcomed(proto);
  attached(proto, "s", proto.attach("s", null, { typing: false }));
  proto.connectionLost();
  const [id, frame] = proto.setPresence("s", { typing: true });
  assert.equal(frame, null);
  const { outcomes } = welcomed(proto);
  const reattach = outcomes.find((o) => o.kind === "send" && o.frame.op === "attach").frame;
  assert.deepEqual(reattach.presence, { typing: true });
  const done = attached(proto, "s", reattach);
  assert.ok(done.some((o) => o.kind === "completed" && o.id === id));
});

test("request ids are never reused across connections", () => {
  const proto = new ClientProtocol({ clientId: "c" });
  const seen = new Set();
  for (let i = 0; i < 3; i += 1) {
    const { hello, outcomes } = welcomed(proto);
    seen.add(hello.id);
    const [id] = proto.publish("s", "t", i);
    assert.equal(seen.has(id), false);
    seen.add(id);
    assert.ok(outcomes.length >= 1);
    proto.connectionLost();
  }
});

test("backoff is full jitter under an exponential cap", () => {
  assert.equal(backoffDelay(0, 500, 30000, () => 1), 500);
  assert.equal(backoffDelay(3, 500, 30000, () => 1), 4000);
  assert.equal(backoffDelay(20, 500, 30000, () => 1), 30000);
  assert.equal(backoffDelay(5000, 500, 30000, () => 0.5), 15000);
  assert.equal(backoffDelay(3, 500, 30000, () => 0), 0);
});

test("heartbeat: idle → ping → drop; anything received resets it; a probe is quicker", () => {
  const beat = new Heartbeat(1000, 0);
  assert.deepEqual(beat.poll(500), ["wait", 500]);
  assert.deepEqual(beat.poll(1000), ["ping", 1000]);
  assert.deepEqual(beat.poll(1500), ["wait", 500]);
  assert.deepEqual(beat.poll(2000), ["drop", 0]);
  beat.received(2100);
  assert.deepEqual(beat.poll(2200), ["wait", 900]);
  beat.probe(2300, 200);
  assert.deepEqual(beat.poll(2500), ["drop", 0]);
});

test("close codes, cursors and URLs", () => {
  assert.equal(shouldReconnect(null), true);
  assert.equal(shouldReconnect(1006), true);
  assert.equal(shouldReconnect(4000), true);
  assert.equal(shouldReconnect(4001), true);
  assert.equal(shouldReconnect(4500), false);
  assert.equal(shouldReconnect(4501), false);
  assert.equal(shouldReconnect(1009), false);
  assert.deepEqual(parseCursor("abc:12"), { epoch: "abc", seq: 12 });
  assert.throws(() => parseCursor("abc"), TypeError);
  assert.throws(() => parseCursor("abc:-1"), TypeError);
  assert.equal(wsUrl("ws://127.0.0.1:8765"), "ws://127.0.0.1:8765/v1/ws");
  assert.equal(wsUrl("https://example.com/"), "wss://example.com/v1/ws");
  assert.equal(wsUrl("http://h:1/custom/path"), "ws://h:1/custom/path");
  assert.throws(() => wsUrl("ftp://x"), TypeError);
});
