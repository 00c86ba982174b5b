// The browser SDK against a real `tether serve` (a Python subprocess): delivery, resume after
// drops and restarts, idempotent publish, heartbeat timeout, presence, storage, runs.
//
// Node 22+ has a global WebSocket; on Node 20 this file re-runs itself with
// --experimental-websocket so `node --test tests/web/` works as is.

import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { after, before, describe, test } from "node:test";
import { fileURLToPath } from "node:url";

import { Client, ConnectionFailed, ConnectionState, PublishError } from "../../tether/web/sdk/tether.js";
import {
  collect,
  faultySocketClass,
  MemoryStorage,
  sleep,
  TetherServer,
  token,
  until,
} from "./helpers.mjs";

if (typeof globalThis.WebSocket === "undefined") {
  test("SDK against a real server (re-run with --experimental-websocket)", () => {
    const env = { ...process.env };
    delete env.NODE_TEST_CONTEXT; // or the child thinks it runs inside this test and skips
    const result = spawnSync(process.execPath, ["--experimental-websocket", "--test", fileURLToPath(import.meta.url)], {
      stdio: "inherit", env,
    });
    assert.equal(result.status, 0, "the SDK tests failed; see the output above");
  });
} else {
  defineTests();
}

function defineTests() {
  let server;
  const clients = [];

  function client(options = {}) {
    const c = new Client(server.url, { token: token(options.sub ?? "alice"), storage: null, backoffBase: 50, backoffCap: 500, connectTimeout: 2000, ...options });
    clients.push(c);
    return c;
  }

  before(async () => {
    server = await new TetherServer({ agent: "tests.agents.fast_demo:agent" }).start();
  });

  after(async () => {
    await Promise.all(clients.map((c) => c.close()));
    await server.close();
  });

  describe("delivery", () => {
    test("publish resolves after commit; every client sees every event once, in order", async () => {
      const a = client();
      const b = client({ sub: "bob" });
      const sa = await a.attach("order");
      const sb = await b.attach("order");
      const seenA = collect(sa);
      const seenB = collect(sb);
      const cursors = [];
      for (let i = 0; i < 30; i += 1) cursors.push(sa.publish("n", { i }));
      const committed = await Promise.all(cursors);
      await until(() => seenA.length === 30 && seenB.length === 30, { what: "30 events on both" });
      assert.deepEqual(seenA.map((e) => e.data.i), [...Array(30).keys()]);
      assert.deepEqual(seenB.map((e) => e.cursor), committed);
      assert.equal(sa.cursor, committed.at(-1));
      assert.equal(seenB[0].sender.sub, "alice");
    });

    test("async iteration yields the same items; callbacks and iteration do not mix", async () => {
      const a = client();
      const session = await a.attach("iterate");
      await session.publish("n", 1);
      await session.publish("n", 2);
      const got = [];
      for await (const item of session) {
        got.push(item.data);
        if (got.length === 2) break;
      }
      assert.deepEqual(got, [1, 2]);
      assert.throws(() => session.onEvent(() => {}), /not both/);
    });

    test("attach from a cursor delivers only what follows it", async () => {
      const a = client();
      const s = await a.attach("from-cursor");
      const first = await s.publish("n", 1);
      await s.publish("n", 2);
      await s.publish("n", 3);
      const b = client();
      const items = collect(await b.attach("from-cursor", { cursor: first }));
      await until(() => items.length === 2, { what: "two events" });
      assert.deepEqual(items.map((e) => e.data), [2, 3]);
    });

    test("transient events reach others without a cursor and resolve to null", async () => {
      const a = client();
      const b = client({ sub: "bob" });
      const sa = await a.attach("typing");
      const seen = collect(await b.attach("typing"));
      assert.equal(await sa.publish("typing", { typing: true }, { transient: true }), null);
      await until(() => seen.length === 1, { what: "the typing event" });
      assert.equal(seen[0].transient, true);
      assert.equal(seen[0].cursor, null);
      assert.equal(seen[0].seq, 0);
    });
  });

  describe("failures", () => {
    test("a dropped connection reconnects and resumes: nothing lost, nothing doubled", async () => {
      const Faulty = faultySocketClass();
      const a = client({ WebSocket: Faulty });
      const writer = client({ sub: "bob" });
      const sa = await a.attach("drop");
      const sw = await writer.attach("drop");
      const seen = collect(sa);
      const states = [];
      a.onState((state) => states.push(state));
      await sw.publish("n", 0);
      await until(() => seen.length === 1, { what: "first event" });
      Faulty.cutAll();
      const published = [];
      for (let i = 1; i <= 20; i += 1) published.push(await sw.publish("n", i));
      await until(() => seen.length === 21, { what: "all 21 events after the resume" });
      assert.deepEqual(seen.map((e) => e.data), [...Array(21).keys()]);
      assert.equal(sa.resumed, true);
      assert.ok(states.includes(ConnectionState.RECONNECTING));
      assert.equal(a.state, ConnectionState.CONNECTED);
    });

    test("a publish whose reply was lost commits once (same key re-sent)", async () => {
      const Faulty = faultySocketClass();
      let dropped = false;
      Faulty.filter = (frame, socket) => {
        if (frame.op === "published" && !dropped) {
          dropped = true;
          setTimeout(() => socket.cut(), 0);
          return false;
        }
        return true;
      };
      const a = client({ WebSocket: Faulty });
      const session = await a.attach("idem");
      const cursor = await session.publish("message", { text: "once" });
      const publishes = Faulty.sent.filter((f) => f.op === "publish");
      assert.equal(publishes.length, 2, "sent, then re-sent after the reconnect");
      assert.equal(publishes[0].key, publishes[1].key);
      const replies = Faulty.received.filter((f) => f?.op === "published");
      assert.equal(replies.at(-1).duplicate, true);
      const events = await server.events("idem");
      assert.deepEqual(events.map((e) => e.data.text), ["once"]);
      assert.equal(events[0].cursor, cursor);
    });

    test("a server restart (4000) is survived; publishes made meanwhile commit once", async () => {
      const a = client();
      const session = await a.attach("restart");
      const seen = collect(session);
      await session.publish("n", "before");
      await server.stop();
      await until(() => a.state === ConnectionState.RECONNECTING, { what: "reconnecting" });
      const during = session.publish("n", "during");
      await server.start();
      await during;
      await session.publish("n", "after");
      await until(() => seen.length === 3, { what: "three events" });
      assert.deepEqual(seen.map((e) => e.data), ["before", "during", "after"]);
      assert.deepEqual((await server.events("restart")).map((e) => e.data), ["before", "during", "after"]);
    });

    test("a silent connection is detected by the heartbeat and replaced", async () => {
      const Faulty = faultySocketClass();
      const a = client({ WebSocket: Faulty, heartbeatTimeout: 300 });
      const writer = client({ sub: "bob" });
      const session = await a.attach("silent");
      const sw = await writer.attach("silent");
      const seen = collect(session);
      Faulty.hold = true; // half-open: nothing arrives any more, not even the pong
      await sw.publish("n", 1);
      await until(() => a.state === ConnectionState.RECONNECTING, { what: "the heartbeat drop", timeout: 3000 });
      assert.ok(Faulty.sent.some((f) => f.op === "ping"), "a ping frame was sent first");
      Faulty.hold = false;
      await until(() => seen.length === 1, { what: "the event after the resume" });
      assert.equal(seen[0].data, 1);
    });

    test("a refused token stops the client for good with its close code", async () => {
      const a = client({ token: "not-a-jwt" });
      const error = await a.connect().then(() => null, (e) => e);
      assert.ok(error instanceof ConnectionFailed);
      assert.equal(error.closeCode, 4500);
      assert.equal(a.state, ConnectionState.CLOSED);
      await assert.rejects(a.attach("x"), ConnectionFailed);
    });

    test("a refused publish rejects with its code; the connection stays", async () => {
      const a = client({ token: token("reader", { caps: ["subscribe"] }) });
      const session = await a.attach("readonly");
      await assert.rejects(session.publish("message", {}), (e) => e instanceof PublishError && e.code === "forbidden");
      assert.equal(a.state, ConnectionState.CONNECTED);
    });
  });

  describe("continuity and storage", () => {
    test("a cursor of an older epoch gives a snapshot, then live events", async () => {
      const a = client();
      const s = await a.attach("epoch");
      await s.publish("n", 1);
      const last = await s.publish("n", 2);
      const [epoch, seq] = last.split(":");
      const older = `ZZZZZZZZ${epoch.slice(8)}:${seq}`;
      const b = client();
      const sb = await b.attach("epoch", { cursor: older });
      const items = collect(sb);
      await until(() => items.length === 1, { what: "the snapshot" });
      assert.equal(sb.resumed, false);
      const [snapshot] = items;
      assert.equal(snapshot.snapshot, true);
      assert.equal(snapshot.reason, "epoch_changed");
      assert.equal(snapshot.previous, older);
      assert.deepEqual(snapshot.events.map((e) => e.data), [1, 2]);
      await s.publish("n", 3);
      await until(() => items.length === 2, { what: "the live event" });
      assert.equal(items[1].data, 3);
    });

    test("the cursor and state saved in storage resume a new client after a 'refresh'", async () => {
      const storage = new MemoryStorage();
      const writer = client({ sub: "bob" });
      const sw = await writer.attach("refresh");
      let state = { seen: [] };
      const first = client({ storage });
      await first.attach("refresh", { saveState: () => state, onEvent: (e) => state.seen.push(e.data) });
      for (let i = 0; i < 5; i += 1) await sw.publish("n", i);
      await until(() => state.seen.length === 5, { what: "five events" });
      await first.close(); // flushes like pagehide does
      for (let i = 5; i < 8; i += 1) await sw.publish("n", i);

      const second = client({ storage });
      const saved = second.saved("refresh");
      assert.deepEqual(saved.state.seen, [0, 1, 2, 3, 4]);
      state = saved.state;
      const session = await second.attach("refresh", { saveState: () => state, onEvent: (e) => state.seen.push(e.data) });
      assert.equal(session.resumed, true);
      assert.equal(session.restored.cursor, saved.cursor);
      await until(() => state.seen.length === 8, { what: "the rest" });
      assert.deepEqual(state.seen, [0, 1, 2, 3, 4, 5, 6, 7]);
    });

    test("a saved cursor the server refuses restarts from the beginning, announced", async () => {
      const storage = new MemoryStorage();
      const a = client({ storage });
      const s = await a.attach("other-session");
      const foreign = await s.publish("n", "x"); // a cursor of another session
      const w = client();
      const sw = await w.attach("rejected");
      await sw.publish("n", 1);
      storage.setItem(`tether:v1:${a.url}#rejected`, JSON.stringify({ cursor: foreign, state: { v: 0 } }));
      const b = client({ storage });
      const items = [];
      await b.attach("rejected", { saveState: () => ({}), onEvent: (e) => items.push(e) });
      await until(() => items.length === 2, { what: "snapshot and replay" });
      assert.equal(items[0].snapshot, true);
      assert.equal(items[0].reason, "cursor_rejected");
      assert.equal(items[1].data, 1);
    });
  });

  describe("presence", () => {
    test("join, update and leave reach the others", async () => {
      const a = client({ device: "laptop" });
      const b = client({ sub: "bob", device: "phone" });
      const sa = await a.attach("room", { presence: { status: "here" } });
      const actions = [];
      sa.onPresence((action, members) => actions.push([action, members.map((m) => m.sub)]));
      const sb = await b.attach("room", { presence: { status: "hi" } });
      await until(() => Object.values(sa.presence).some((m) => m.sub === "bob"), { what: "bob joins" });
      const bob = Object.values(sa.presence).find((m) => m.sub === "bob");
      assert.equal(bob.device, "phone");
      assert.deepEqual(bob.state, { status: "hi" });
      await sb.setPresence({ status: "typing" });
      await until(() => Object.values(sa.presence).find((m) => m.sub === "bob")?.state.status === "typing", { what: "update" });
      await sb.detach();
      await until(() => !Object.values(sa.presence).some((m) => m.sub === "bob"), { what: "bob leaves" });
      assert.ok(actions.some(([action]) => action === "leave"));
    });
  });

  describe("runs", () => {
    test("a message starts a run of the demo agent; the deltas add up to the final text", async () => {
      const a = client();
      const session = await a.attach("chat-node");
      const items = collect(session);
      await session.publish("message", { text: "hello" });
      await until(() => items.some((e) => e.type === "run.state" && e.data.state === "completed"), { what: "the run" });
      const deltas = items.filter((e) => e.type === "stream.append").map((e) => e.data.text).join("");
      const end = items.find((e) => e.type === "stream.end");
      assert.equal(deltas, end.data.text);
      assert.ok(end.data.text.length > 20);
    });
  });

  test("close() ends iteration and rejects later calls", async () => {
    const a = client();
    const session = await a.attach("closing");
    const iteration = (async () => {
      const got = [];
      for await (const item of session) got.push(item);
      return got;
    })();
    await sleep(20);
    await a.close();
    assert.deepEqual(await iteration, []);
    await assert.rejects(session.publish("n", 1), /closed/);
    assert.equal(a.state, ConnectionState.CLOSED);
  });
}
