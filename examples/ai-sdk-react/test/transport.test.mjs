// TetherChatTransport driven by the AI SDK's own chat class (`AbstractChat` of the pinned `ai`
// package, with a small state object like @ai-sdk/react's) against a real `tether serve`:
// send and stream, two chats on one session, a dropped socket, a reload, Stop, an approval and
// a front-end tool. Run from pytest (tests/web/test_aisdk_example.py) after `npm ci` here.
//
// Node 22+ has a global WebSocket; on Node 20 this file re-runs itself with
// --experimental-websocket.

import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { after, before, describe, test } from "node:test";
import { fileURLToPath } from "node:url";

import {
  AbstractChat,
  DefaultChatTransport,
  lastAssistantMessageIsCompleteWithApprovalResponses,
  lastAssistantMessageIsCompleteWithToolCalls,
} from "ai";

import { TetherChatTransport } from "../../../tether/web/sdk/tether.js";
import { faultySocketClass, TetherServer, token, until } from "../../../tests/web/helpers.mjs";

if (typeof globalThis.WebSocket === "undefined") {
  test("TetherChatTransport with the AI SDK (re-run with --experimental-websocket)", () => {
    const env = { ...process.env };
    delete env.NODE_TEST_CONTEXT;
    const result = spawnSync(process.execPath, ["--experimental-websocket", "--test", fileURLToPath(import.meta.url)], {
      stdio: "inherit", env,
    });
    assert.equal(result.status, 0, "the AI SDK transport tests failed; see the output above");
  });
} else {
  defineTests();
}

/** The chat state of @ai-sdk/react without React: plain fields, copied on replace. */
class NodeChatState {
  constructor(messages = []) {
    this.messages = messages;
    this.status = "ready";
    this.error = undefined;
    this.statuses = ["ready"];
    this.pushMessage = (message) => {
      this.messages = this.messages.concat(message);
    };
    this.popMessage = () => {
      this.messages = this.messages.slice(0, -1);
    };
    this.replaceMessage = (index, message) => {
      this.messages = [...this.messages.slice(0, index), this.snapshot(message), ...this.messages.slice(index + 1)];
    };
    this.snapshot = (value) => (value && Array.isArray(value.parts)
      ? { ...value, parts: value.parts.map((part) => ({ ...part })) }
      : value);
  }
}

class NodeChat extends AbstractChat {
  constructor({ messages, ...init }) {
    const state = new NodeChatState(messages);
    super({ ...init, state });
    this.nodeState = state;
  }

  setStatus(update) {
    super.setStatus(update);
    if (this.nodeState.statuses.at(-1) !== this.status) this.nodeState.statuses.push(this.status);
  }
}

const textOf = (message) => message.parts.filter((p) => p.type === "text").map((p) => p.text).join("");
const assistants = (chat) => chat.messages.filter((m) => m.role === "assistant");

/** Record the chunks a transport hands out (to check that nothing is repeated). */
function recording(transport) {
  const chunks = [];
  const tap = (stream) => stream && stream.pipeThrough(new TransformStream({
    transform(chunk, controller) {
      chunks.push(chunk);
      controller.enqueue(chunk);
    },
  }));
  const send = transport.sendMessages.bind(transport);
  const reconnect = transport.reconnectToStream.bind(transport);
  transport.sendMessages = async (options) => tap(await send(options));
  transport.reconnectToStream = async (options) => tap(await reconnect(options));
  return chunks;
}

function defineTests() {
  let server;
  const transports = [];
  let counter = 0;

  const chatId = () => `chat-aisdk-${process.pid}-${(counter += 1)}`;

  function transport(options = {}) {
    const t = new TetherChatTransport({
      url: server.url, token: token(options.sub ?? "alice"), backoffBase: 50, backoffCap: 500,
      connectTimeout: 2000, ...options,
    });
    transports.push(t);
    return t;
  }

  /** The final answer of each run in the log, in order. */
  async function answers(id) {
    const events = await server.events(id);
    return events.filter((e) => e.type === "stream.end").map((e) => e.data.text);
  }

  async function runStates(id) {
    const events = await server.events(id);
    return events.filter((e) => e.type === "run.state").map((e) => e.data.state);
  }

  before(async () => {
    // 40 tokens a second: an answer takes about 1.5 s, long enough to act in the middle of it.
    server = await new TetherServer({ agent: "tests.agents.fast_demo:slow" }).start();
  });

  after(async () => {
    for (const t of transports) t.close();
    await server.close();
  });

  describe("TetherChatTransport with the AI SDK's chat", () => {
    test("send: the message is published once under its id, the reply streams into the chat", async () => {
      const id = chatId();
      const t = transport();
      const chunks = recording(t);
      const chat = new NodeChat({ id, transport: t });
      await chat.sendMessage({ text: "hello there" });
      assert.equal(chat.status, "ready");
      assert.deepEqual(chat.nodeState.statuses, ["ready", "submitted", "streaming", "ready"]);
      const [user, reply] = chat.messages;
      assert.equal(user.role, "user");
      assert.equal(reply.role, "assistant");
      const [final] = await answers(id);
      assert.ok(final.length > 20);
      assert.equal(textOf(reply), final);
      const events = await server.events(id);
      const messages = events.filter((e) => e.type === "message");
      assert.deepEqual(messages.map((e) => e.data), [{ text: "hello there", message_id: user.id }]);
      const created = events.find((e) => e.type === "run.created");
      assert.equal(reply.id, created.data.run, "the assistant message's id is the run's");
      assert.equal(chunks[0].type, "start");
      assert.equal(chunks.at(-1).type, "finish");
      assert.equal(chunks.at(-1).finishReason, "stop");
      assert.ok(chunks.filter((c) => c.type === "text-delta").length > 3, "streamed in several deltas");
      assert.equal(await t.reconnectToStream({ chatId: id }), null, "nothing active any more");
      assert.deepEqual((await t.messages(id)).map(textOf), ["hello there", final]);
    });

    test("two chats on one session: both see the message and the whole reply live", async () => {
      const id = chatId();
      const ta = transport();
      const tb = transport({ sub: "bob" });
      const a = new NodeChat({ id, transport: ta });
      const b = new NodeChat({ id, transport: tb });
      const stopA = ta.follow(a);
      const stopB = tb.follow(b);
      await tb.messages(id); // b is attached and caught up
      const sent = a.sendMessage({ text: "hi from alice" });
      await until(() => assistants(b).length === 1 && b.status === "streaming", { what: "b streaming the reply" });
      await sent;
      await until(() => b.status === "ready" && textOf(assistants(b)[0]).length > 0, { what: "b done" });
      const [final] = await answers(id);
      assert.equal(textOf(assistants(a)[0]), final);
      assert.equal(textOf(assistants(b)[0]), final);
      assert.deepEqual(b.messages.map((m) => m.id), a.messages.map((m) => m.id));
      assert.equal(b.messages[0].role, "user");
      assert.equal(textOf(b.messages[0]), "hi from alice");

      // And the other way round, while a is idle.
      await b.sendMessage({ text: "and bob answers" });
      await until(() => a.messages.length === 4 && a.status === "ready" && textOf(a.messages[3]).length > 0, { what: "a sees bob's turn" });
      const finals = await answers(id);
      assert.deepEqual(a.messages.map(textOf), ["hi from alice", finals[0], "and bob answers", finals[1]]);
      assert.deepEqual(b.messages.map(textOf), a.messages.map(textOf));
      stopA();
      stopB();
    });

    test("one chat, both transports: the stock HTTP transport and TetherChatTransport record alike", async () => {
      const id = chatId();
      const auth = { Authorization: `Bearer ${token("alice")}` };
      const http = new NodeChat({
        id,
        transport: new DefaultChatTransport({ api: `${server.http}/v1/ai-sdk/chat`, headers: auth }),
      });
      const t = transport({ sub: "bob" });
      const live = new NodeChat({ id, transport: t });
      const stop = t.follow(live);
      await t.messages(id); // attached and caught up

      // Started over HTTP, followed live by the TetherChatTransport chat.
      const sent = http.sendMessage({ text: "over http" });
      await until(() => assistants(live).length === 1 && live.status === "streaming", { what: "the socket chat streaming the HTTP reply" });
      await sent;
      const [first] = await answers(id);
      await until(() => live.status === "ready" && textOf(assistants(live)[0]) === first, { what: "the whole reply" });
      assert.equal(textOf(assistants(http)[0]), first);
      assert.deepEqual(live.messages.map((m) => [m.id, m.role]), http.messages.map((m) => [m.id, m.role]));

      // Sent over the socket: /messages (what the stock transport loads) says the same.
      await live.sendMessage({ text: "over the socket" });
      const finals = await answers(id);
      const listed = await (await fetch(`${server.http}/v1/ai-sdk/chat/${id}/messages`, { headers: auth })).json();
      assert.deepEqual(listed.map((m) => [m.id, m.role, textOf(m)]), live.messages.map((m) => [m.id, m.role, textOf(m)]));
      assert.deepEqual(listed.map(textOf), ["over http", finals[0], "over the socket", finals[1]]);

      // The same data and the same idempotency key (per sender): the same person's retry over
      // the other transport is no new message.
      const events = await server.events(id);
      const messages = events.filter((e) => e.type === "message");
      assert.deepEqual(messages.map((e) => e.data), [
        { text: "over http", message_id: http.messages[0].id },
        { text: "over the socket", message_id: live.messages[2].id },
      ]);
      const runs = events.filter((e) => e.type === "run.created").map((e) => e.data.run);
      assert.deepEqual(runs, [live.messages[1].id, live.messages[3].id], "assistant message id = run id");
      const retry = await fetch(`${server.http}/v1/ai-sdk/chat`, {
        method: "POST",
        headers: { Authorization: `Bearer ${token("bob")}`, "Content-Type": "application/json" },
        body: JSON.stringify({ id, trigger: "submit-message", messages: [live.messages[2]] }),
      });
      assert.equal(retry.status, 200);
      await retry.text();
      const again = await server.events(id);
      assert.equal(again.filter((e) => e.type === "message").length, 2, "the retried message is not doubled");
      assert.equal(again.filter((e) => e.type === "run.created").length, 2);
      stop();
    });

    test("a dropped socket mid-stream: the reply goes on after the reconnect, nothing lost or doubled", async () => {
      const id = chatId();
      const Faulty = faultySocketClass();
      const t = transport({ WebSocket: Faulty });
      const chunks = recording(t);
      const chat = new NodeChat({ id, transport: t });
      const sent = chat.sendMessage({ text: "tell me more" });
      await until(() => assistants(chat).length === 1 && textOf(assistants(chat)[0]).length > 10, { what: "some text" });
      Faulty.cutAll();
      await sent;
      const [final] = await answers(id);
      assert.equal(textOf(assistants(chat)[0]), final);
      const deltas = chunks.filter((c) => c.type === "text-delta").map((c) => c.delta).join("");
      assert.equal(deltas, final, "every delta exactly once");
      assert.ok(t.client.stateInfo !== null && t.client.state === "connected");
      assert.ok(Faulty.sent.filter((f) => f.op === "hello").length >= 2, "it did reconnect");
    });

    test("a reload mid-stream: a new chat resumes the reply from its start, nothing doubled", async () => {
      const id = chatId();
      const first = new NodeChat({ id, transport: transport() });
      const sent = first.sendMessage({ text: "a long story please" });
      await until(() => assistants(first).length === 1 && textOf(assistants(first)[0]).length > 10, { what: "some text" });

      const t = transport(); // the reloaded page: a new connection
      const chunks = recording(t);
      const reloaded = new NodeChat({ id, transport: t, messages: await t.messages(id) });
      assert.equal(reloaded.messages.length, 2, "history: the message and the partial reply");
      const partial = textOf(reloaded.messages[1]);
      await reloaded.resumeStream(); // what useChat({ resume: true }) does on mount
      await sent;
      const [final] = await answers(id);
      assert.ok(final.startsWith(partial));
      assert.equal(reloaded.messages.length, 2);
      assert.equal(textOf(reloaded.messages[1]), final);
      assert.equal(chunks[0].type, "start");
      assert.equal(chunks[0].messageId, reloaded.messages[1].id);
      assert.equal(chunks.filter((c) => c.type === "text-delta").map((c) => c.delta).join(""), final);
      assert.equal(await t.reconnectToStream({ chatId: id }), null);
    });

    test("Stop cancels the run for everyone; the chat's stop alone only stops reading", async () => {
      const id = chatId();
      const t = transport();
      const chunks = recording(t);
      const chat = new NodeChat({ id, transport: t });
      const sent = chat.sendMessage({ text: "go on and on" });
      await until(() => assistants(chat).length === 1 && textOf(assistants(chat)[0]).length > 5, { what: "some text" });
      await chat.stop(); // aborts the reading only: the run goes on
      await sent;
      await until(async () => (await runStates(id)).includes("completed"), { what: "the run completes anyway" });

      const sent2 = chat.sendMessage({ text: "again" });
      await until(() => assistants(chat).length === 2 && textOf(assistants(chat)[1]).length > 5, { what: "second reply" });
      assert.ok(await t.stop(id));
      await sent2;
      assert.equal(chunks.at(-1).type, "finish");
      assert.equal(chunks.at(-1).finishReason, "interrupted");
      assert.deepEqual((await runStates(id)).at(-1), "cancelled");
      const events = await server.events(id);
      const end = events.filter((e) => e.type === "stream.end").at(-1);
      assert.equal(end.data.interrupted, "cancelled");
      assert.equal(textOf(assistants(chat)[1]), end.data.text);
      assert.equal(await t.stop(id), null, "nothing left to stop");
    });

    test("an approval: the request shows as the SDK's approval part; the answer goes back to the run", async () => {
      const id = chatId();
      const t = transport();
      const chat = new NodeChat({
        id, transport: t, sendAutomaticallyWhen: lastAssistantMessageIsCompleteWithApprovalResponses,
      });
      await chat.sendMessage({ text: "publish the report" });
      const part = () => assistants(chat)[0].parts.find((p) => p.type === "dynamic-tool");
      assert.equal(part().toolName, "publish_report");
      assert.equal(part().state, "approval-requested");
      assert.equal(chat.status, "ready");
      await chat.addToolApprovalResponse({ id: part().approval.id, approved: true });
      await until(() => chat.status === "ready" && part().state === "output-available", { what: "the tool's output" });
      assert.equal(part().output.status, "sent");
      await until(async () => (await runStates(id)).at(-1) === "completed", { what: "the run completes" });
      await until(() => chat.status === "ready" && textOf(assistants(chat)[0]).length > 0, { what: "the answer" });
      const events = await server.events(id);
      const decision = events.find((e) => e.type === "approval.decision");
      assert.equal(decision.data.decision, "approve");
      assert.equal(assistants(chat).length, 1, "one assistant message for the whole run");
    });

    test("a front-end tool: onToolCall runs it, addToolOutput answers the run", async () => {
      const id = chatId();
      const t = transport({ tools: ["pick_color"] });
      let chat = null;
      chat = new NodeChat({
        id,
        transport: t,
        sendAutomaticallyWhen: lastAssistantMessageIsCompleteWithToolCalls,
        onToolCall({ toolCall }) {
          if (toolCall.toolName === "pick_color") {
            chat.addToolOutput({ tool: "pick_color", toolCallId: toolCall.toolCallId, output: { color: "#30a46c" } });
          }
        },
      });
      await chat.sendMessage({ text: "pick a color" });
      await until(async () => (await runStates(id)).at(-1) === "completed", { what: "the run completes" });
      await until(() => chat.status === "ready", { what: "the chat is done" });
      const events = await server.events(id);
      const result = events.find((e) => e.type === "tool.result");
      assert.deepEqual(result.data.result, { color: "#30a46c" });
      const part = assistants(chat)[0].parts.find((p) => p.type === "dynamic-tool");
      assert.equal(part.state, "output-available");
      const [final] = await answers(id);
      assert.equal(textOf(assistants(chat)[0]), final);
    });
  });
}
