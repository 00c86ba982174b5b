// The web app's pure parts: the transcript fold (model.js) and the Markdown renderer's parser
// (markdown.js) — including that nothing in a message can become HTML or a script URL.

import assert from "node:assert/strict";
import { test } from "node:test";

import { inline, parse, safeUrl } from "../../tether/web/static/markdown.js";
import { apply, emptyModel, runStatus, title, waiting } from "../../tether/web/static/model.js";

const EPOCH = "AAAAAAAAxxxxxx";
let seq = 0;
function ev(type, data, sender = { sub: "agent:demo", client: "node", kind: "agent" }) {
  seq += 1;
  return { session: "s", seq, cursor: `${EPOCH}:${seq}`, epoch: EPOCH, type, data, sender, time: 1000 + seq, transient: false, snapshot: false };
}

function runOf(model, events) {
  for (const e of events) apply(model, e);
  return model;
}

test("a streamed answer folds into one message equal to stream.end's text", () => {
  seq = 0;
  const m = runOf(emptyModel(), [
    ev("message", { text: "hello" }, { sub: "alice", client: "c", kind: "human" }),
    ev("run.created", { run: "r1", agent: "demo", trigger: "message" }),
    ev("run.state", { run: "r1", state: "running" }),
    ev("stream.append", { stream: "r1.0", run: "r1", text: "Hel" }),
    ev("stream.append", { stream: "r1.0", run: "r1", text: "lo **there**" }),
  ]);
  assert.equal(runStatus(m).streaming, true);
  assert.equal(runStatus(m).active.id, "r1");
  runOf(m, [ev("stream.end", { stream: "r1.0", run: "r1", role: "assistant", text: "Hello **there**" }), ev("run.state", { run: "r1", state: "completed" })]);
  const answer = m.items.find((i) => i.kind === "assistant");
  assert.equal(answer.text, "Hello **there**");
  assert.equal(answer.done, true);
  assert.equal(m.mismatches, 0);
  assert.equal(m.deltas, 2);
  assert.equal(runStatus(m).active, null);
  assert.equal(title(m), "hello");
  assert.deepEqual(JSON.parse(JSON.stringify(m)), m, "the model is plain JSON (saved with the cursor)");
});

test("an event applied twice is counted, never shown twice", () => {
  seq = 0;
  const m = emptyModel();
  const delta = ev("stream.append", { stream: "x", run: "r", text: "a" });
  apply(m, delta);
  assert.deepEqual(apply(m, delta), []);
  assert.equal(m.items[0].text, "a");
  assert.equal(m.dupes, 1);
});

test("tool calls, approvals, front-end tools and cancels", () => {
  seq = 0;
  const m = runOf(emptyModel(), [
    ev("run.created", { run: "r", agent: "demo", trigger: "message" }),
    ev("approval.request", { run: "r", call: "c1", name: "publish_report", arguments: { title: "T" } }),
    ev("run.state", { run: "r", state: "awaiting_approval", call: "c1" }),
  ]);
  assert.equal(waiting(m).length, 1);
  runOf(m, [
    ev("approval.decision", { run: "r", call: "c1", decision: "approve", arguments: { title: "U" }, by: { sub: "bob", client: "b" } }),
    ev("tool.call", { run: "r", call: "c1", name: "publish_report", arguments: { title: "U" }, target: "server" }),
    ev("tool.result", { run: "r", call: "c1", result: { status: "sent" } }),
    ev("tool.call", { run: "r", call: "c2", name: "pick_color", arguments: { prompt: "?" }, target: "client" }),
  ]);
  const report = m.items.find((i) => i.call === "c1");
  assert.equal(report.status, "done");
  assert.deepEqual(report.arguments, { title: "U" });
  assert.equal(report.approval.by.sub, "bob");
  assert.equal(m.items.find((i) => i.call === "c2").status, "awaiting_client");
  runOf(m, [
    ev("run.cancel", { run: "r", by: { sub: "bob", client: "b" }, reason: "stop" }),
    ev("run.state", { run: "r", state: "cancelled", by: { sub: "bob", client: "b" } }),
  ]);
  assert.equal(waiting(m).length, 0, "nothing waits in a cancelled run");
  assert.ok(m.items.some((i) => i.kind === "notice" && i.text === "Stopped by bob"));
});

test("a rejected approval shows as rejected, not failed", () => {
  seq = 0;
  const m = runOf(emptyModel(), [
    ev("approval.request", { run: "r", call: "c", name: "t", arguments: {} }),
    ev("approval.decision", { run: "r", call: "c", decision: "reject", by: { sub: "bob" } }),
    ev("tool.result", { run: "r", call: "c", error: "reject by bob" }),
  ]);
  assert.equal(m.items[0].status, "rejected");
});

test("a snapshot replaces everything", () => {
  seq = 0;
  const m = runOf(emptyModel(), [ev("message", { text: "old" })]);
  const result = apply(m, {
    snapshot: true, cursor: "BBBBBBBBxxxxxx:9", reason: "epoch_changed", previous: `${EPOCH}:1`, presence: [],
    events: [{ seq: 9, cursor: "BBBBBBBBxxxxxx:9", epoch: "BBBBBBBBxxxxxx", type: "message", data: { text: "new" }, sender: { sub: "a" }, time: 1, transient: false }],
  });
  assert.equal(result, "reset");
  assert.deepEqual(m.items.map((i) => i.text), ["new"]);
  assert.equal(m.lastSeq, 9);
});

test("markdown never produces raw HTML or script URLs", () => {
  const tree = parse("<script>alert(1)</script>\n\n<img src=x onerror=alert(1)> [x](javascript:alert(1)) [y](JaVaScRiPt:1) [z](data:text/html,hi) ![i](https://e/x.png)");
  const text = JSON.stringify(tree);
  assert.ok(!text.includes('"t":"html"'));
  const links = [];
  const walk = (nodes) => {
    for (const n of nodes) {
      if (n.t === "a") links.push(n.href);
      for (const key of ["c", "items", "rows", "head"]) if (Array.isArray(n[key])) walk(n[key].flat(2));
    }
  };
  walk(tree);
  assert.deepEqual(links, ["https://e/x.png"], "only the https link survives (the image as a link)");
  assert.ok(text.includes("<script>alert(1)</script>"), "markup stays as text");
  assert.equal(safeUrl("java\nscript:alert(1)"), null);
  assert.equal(safeUrl(" https://ok.example/a "), "https://ok.example/a");
});

test("markdown structure: headings, lists, code, tables, emphasis", () => {
  const tree = parse("# T\n\nSome *em* and **strong** and `co*de*`.\n\n- a\n- b\n  1. c\n\n```py\nx = 1\n```\n\n| h | i |\n|---|---|\n| 1 | 2 |");
  assert.deepEqual(tree.map((b) => b.t), ["h", "p", "ul", "code", "table"]);
  assert.deepEqual(inline("a `*b*` c").map((n) => n.t), ["text", "code", "text"]);
  assert.deepEqual(inline("snake_case_name").map((n) => n.t), ["text"]);
  assert.equal(parse("```\nopen fence while streaming")[0].t, "code");
});
