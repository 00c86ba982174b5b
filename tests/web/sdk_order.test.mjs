// Publish order across temporary refusals in the browser SDK, as in the Python SDK
// (tests/client/test_publish_order.py): by hand, against a model server with random
// interleavings, and against a real `tether serve` with a small publish rate.
//
// Node 22+ has a global WebSocket; on Node 20 the real-server part re-runs this file with
// --experimental-websocket.

import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { after, before, describe, test } from "node:test";
import { fileURLToPath } from "node:url";

import { Client, ClientProtocol } from "../../tether/web/sdk/tether.js";
import { TetherServer, token } from "./helpers.mjs";

const EPOCH = "AAAAAAAAxxxxxx";
const REFUSED = { op: "error", code: "rate_limited", message: "slow down", temporary: true };

function online() {
  const proto = new ClientProtocol({ clientId: "c" });
  const hello = proto.hello("t");
  proto.receive({ op: "welcome", id: hello.id, heartbeat: 15 });
  return proto;
}

const sent = (outcomes) => outcomes.filter((o) => o.kind === "send" && o.frame.op === "publish").map((o) => o.frame.id);
const published = (proto, id, seq) => proto.receive({ op: "published", id, session: "s", seq, cursor: `${EPOCH}:${seq}`, duplicate: false });

function inversions(order) {
  let count = 0;
  for (let i = 0; i < order.length; i += 1) for (let j = i + 1; j < order.length; j += 1) if (order[i] > order[j]) count += 1;
  return count;
}

// --- by hand ------------------------------------------------------------------------------

test("a refused publish and later ones are re-sent one at a time, in call order", () => {
  const proto = online();
  const ids = [];
  for (let i = 0; i < 6; i += 1) {
    const [id, frame] = proto.publish("s", "n", { i });
    assert.ok(frame); // pipelined
    ids.push(id);
  }
  const [p0, p1, p2, p3, p4, p5] = ids;
  published(proto, p0, 1);
  const [retry] = proto.receive({ ...REFUSED, id: p1, retry_after: 40 });
  assert.deepEqual(retry, { kind: "retryLater", op: "publish", id: p1, attempt: 0, code: "rate_limited", message: "slow down", session: "s", retryAfter: 40 });
  assert.deepEqual(proto.receive({ ...REFUSED, id: p2 }), []); // held behind p1: no second backoff
  published(proto, p3, 2); // in flight behind p1 and accepted: keeps its place
  const [held, frame] = proto.publish("s", "n", { i: 6 });
  assert.equal(frame, null); // made after the refusal: held
  assert.deepEqual(sent(proto.retry(retry)), []); // p4, p5 still in flight
  assert.deepEqual(proto.receive({ ...REFUSED, id: p4 }), []);
  assert.deepEqual(sent(published(proto, p5, 3)), [p1]); // nothing in flight: the earliest, alone
  assert.deepEqual(sent(published(proto, p1, 4)), [p2]);
  const [again] = proto.receive({ ...REFUSED, id: p2 });
  assert.equal(again.kind, "retryLater");
  assert.equal(again.attempt, 1);
  assert.deepEqual(sent(proto.retry(again)), [p2]);
  assert.deepEqual(sent(published(proto, p2, 5)), [p4]);
  assert.deepEqual(sent(published(proto, p4, 6)), [held]);
  assert.deepEqual(sent(published(proto, held, 7)), []);
  assert.equal(proto.retrying.size, 0);
  assert.ok(proto.publish("s", "n", {})[1]); // pipelining again
});

test("other sessions, transient events and run interrupts are not held", () => {
  const proto = online();
  const [id] = proto.publish("s", "n", {});
  proto.receive({ ...REFUSED, id });
  assert.equal(proto.publish("s", "n", {})[1], null);
  assert.ok(proto.publish("other", "n", {})[1]);
  assert.ok(proto.publish("s", "typing", {}, { transient: true })[1]);
  assert.ok(proto.publish("s", "run.cancel", { run: "r" })[1]);
  const [steer] = proto.publish("s", "run.steer", { run: "r", text: "t" });
  const [retry] = proto.receive({ ...REFUSED, id: steer });
  assert.equal(retry.session, null); // retried on its own
  assert.deepEqual(sent(proto.retry(retry)), [steer]);
});

test("a reconnect while retrying re-sends only the earliest; give-up and cancel let the next go", () => {
  const proto = online();
  const [a] = proto.publish("s", "n", {});
  const [b] = proto.publish("s", "n", {});
  const [c] = proto.publish("s", "n", {});
  const [retry] = proto.receive({ ...REFUSED, id: a });
  proto.receive({ ...REFUSED, id: b });
  proto.receive({ ...REFUSED, id: c });
  proto.connectionLost();
  let hello = proto.hello("t");
  assert.deepEqual(sent(proto.receive({ op: "welcome", id: hello.id })), []); // backoff runs
  assert.deepEqual(sent(proto.retry(retry)), [a]);
  proto.connectionLost();
  hello = proto.hello("t");
  assert.deepEqual(sent(proto.receive({ op: "welcome", id: hello.id })), [a]);
  const [again] = proto.receive({ ...REFUSED, id: a });
  const out = proto.giveUp(again);
  assert.deepEqual(out[0], { kind: "failed", id: a, code: "rate_limited", message: "slow down" });
  assert.deepEqual(sent(out), [b]);
  assert.deepEqual(sent(proto.cancel(b)), [c]);
});

// --- against a model server that handles frames in order, random interleavings --------------

function mulberry32(seed) {
  let a = seed;
  return () => {
    a = (a + 0x6d2b79f5) | 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function runModel(random) {
  const proto = online();
  const m = {
    clock: 0, toServer: [], toClient: [], log: [], keys: new Map(), committedBy: new Map(),
    refused: new Set(), refusalSeen: new Map(), timers: [], index: new Map(), answered: new Set(),
  };
  const tick = () => (m.clock += 1);
  const apply = (outcomes) => {
    for (const o of outcomes) {
      if (o.kind === "send") m.toServer.push([tick(), o.frame]);
      else if (o.kind === "retryLater") m.timers.push(o);
      else if (o.kind === "completed" || o.kind === "failed") m.answered.add(o.id);
    }
  };
  const serverStep = (accept) => {
    const [at, frame] = m.toServer.shift();
    if (!accept) {
      m.refused.add(frame.data.i);
      m.toClient.push({ ...REFUSED, id: frame.id });
    } else if (m.keys.has(frame.key)) {
      m.toClient.push({ op: "published", id: frame.id, seq: m.keys.get(frame.key), duplicate: true, cursor: `${EPOCH}:1` });
    } else {
      m.log.push(frame.data.i);
      m.committedBy.set(frame.data.i, at);
      m.keys.set(frame.key, m.log.length);
      m.toClient.push({ op: "published", id: frame.id, seq: m.log.length, duplicate: false, cursor: `${EPOCH}:${m.log.length}` });
    }
  };
  const clientStep = () => {
    const reply = m.toClient.shift();
    if (reply.op === "error" && !m.refusalSeen.has(m.index.get(reply.id))) m.refusalSeen.set(m.index.get(reply.id), tick());
    apply(proto.receive(reply));
  };
  const steps = Math.floor(random() * 120);
  for (let n = 0; n < steps; n += 1) {
    const r = random();
    if (r < 0.25) {
      const [id, frame] = proto.publish("s", "n", { i: m.index.size });
      m.index.set(id, m.index.size);
      if (frame) m.toServer.push([tick(), frame]);
    } else if (r < 0.55) {
      if (m.toServer.length) serverStep(random() < 0.6);
    } else if (r < 0.8) {
      if (m.toClient.length) clientStep();
    } else if (r < 0.95) {
      if (m.timers.length) apply(proto.retry(m.timers.shift()));
    } else {
      // The connection dies after the server got some of the frames in flight.
      const delivered = Math.floor(random() * 4);
      for (let k = 0; k < delivered && m.toServer.length; k += 1) serverStep(true);
      m.toServer = [];
      m.toClient = [];
      apply(proto.connectionLost());
      const hello = proto.hello("t");
      apply(proto.receive({ op: "welcome", id: hello.id }));
    }
  }
  for (let guard = 0; m.answered.size < m.index.size; guard += 1) { // the server stops refusing
    assert.ok(guard < 100000, "publishes never settled");
    if (m.toServer.length) serverStep(true);
    else if (m.toClient.length) clientStep();
    else {
      assert.ok(m.timers.length, "stuck: nothing to send, receive or retry");
      apply(proto.retry(m.timers.shift()));
    }
  }
  return m;
}

test("model: the log order is the call order, but for publishes in flight at a refusal", () => {
  for (let seed = 1; seed <= 500; seed += 1) {
    const m = runModel(mulberry32(seed));
    assert.deepEqual([...m.log].sort((a, b) => a - b), [...m.index.values()], `seed ${seed}: lost or doubled`);
    m.log.forEach((later, pos) => {
      for (const earlier of m.log.slice(pos + 1)) {
        if (later < earlier) continue;
        // `later` committed before `earlier`: only if the server refused `earlier` and `later`
        // was sent before the client saw that refusal (or never saw it).
        assert.ok(m.refused.has(earlier), `seed ${seed}: ${later} before ${earlier} in ${m.log}`);
        assert.ok(m.committedBy.get(later) < (m.refusalSeen.get(earlier) ?? Infinity), `seed ${seed}: ${m.log}`);
      }
    });
  }
});

// --- against a real server -------------------------------------------------------------------

if (typeof globalThis.WebSocket === "undefined") {
  test("publish order against a real server (re-run with --experimental-websocket)", () => {
    const env = { ...process.env };
    delete env.NODE_TEST_CONTEXT;
    const result = spawnSync(process.execPath, ["--experimental-websocket", "--test", fileURLToPath(import.meta.url)], {
      stdio: "inherit", env,
    });
    assert.equal(result.status, 0, "the publish order tests failed; see the output above");
  });
} else {
  describe("against a real server with a small publish rate", () => {
    let server;

    before(async () => {
      // A token every 25 ms after a burst of 150: 200 pipelined publishes see ~50 refusals
      // (fewer than the 100 errors in a row after which the server closes a connection).
      process.env.TETHER_PUBLISH_RATE = "40";
      process.env.TETHER_PUBLISH_BURST = "150";
      server = await new TetherServer().start();
    });

    after(async () => {
      await server.close();
    });

    test("200 pipelined publishes: nothing lost or doubled, call order but for the allowed case", async () => {
      // Record, in one order, the publishes the SDK sends and the refusals it reads.
      const wire = { clock: 0, firstSent: new Map(), lastSent: new Map(), refused: new Map(), index: new Map() };
      class RecordingSocket extends globalThis.WebSocket {
        send(data) {
          const frame = JSON.parse(data);
          if (frame.op === "publish") {
            wire.clock += 1;
            wire.index.set(frame.id, frame.data.i);
            if (!wire.firstSent.has(frame.data.i)) wire.firstSent.set(frame.data.i, wire.clock);
            wire.lastSent.set(frame.data.i, wire.clock);
          }
          super.send(data);
        }

        set onmessage(handler) {
          super.onmessage = handler && ((event) => {
            const frame = JSON.parse(event.data);
            if (frame.op === "error" && frame.temporary) {
              wire.clock += 1;
              const i = wire.index.get(frame.id);
              if (!wire.refused.has(i)) wire.refused.set(i, wire.clock);
            }
            handler(event);
          });
        }

        get onmessage() {
          return super.onmessage;
        }
      }
      const client = new Client(server.url, { token: token(), storage: null, backoffBase: 20, backoffCap: 200, WebSocket: RecordingSocket });
      try {
        const session = await client.attach("order-rate");
        const cursors = await Promise.all(Array.from({ length: 200 }, (_, i) => session.publish("n", { i })));
        assert.equal(new Set(cursors).size, 200);
        const events = await server.events("order-rate");
        const order = events.map((e) => e.data.i);
        assert.deepEqual([...order].sort((a, b) => a - b), [...Array(200).keys()]);
        assert.deepEqual(events.map((e) => e.seq), [...Array(200).keys()].map((i) => i + 1));
        assert.ok(wire.refused.size > 0, "the limit did bite (~50 refusals unless the machine is slow)");
        order.forEach((later, pos) => {
          for (const earlier of order.slice(pos + 1)) {
            if (later < earlier) continue;
            assert.ok(wire.refused.has(earlier), `${later} before ${earlier}: ${order}`);
            assert.equal(wire.lastSent.get(later), wire.firstSent.get(later));
            assert.ok(wire.firstSent.get(later) < wire.refused.get(earlier), `${later} before ${earlier}: ${order}`);
          }
        });
        if (inversions(order)) console.log(`# ${inversions(order)} inversions, all of the allowed kind`);
      } finally {
        await client.close();
      }
    });
  });
}
