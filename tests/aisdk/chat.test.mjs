// The AI SDK's own chat class (AbstractChat over the stock DefaultChatTransport) against a real
// `tether serve`: send, resume, stop, regenerate, a front-end tool, an approval, two chats.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import {
  lastAssistantMessageIsCompleteWithApprovalResponses,
  lastAssistantMessageIsCompleteWithToolCalls,
} from "ai";

import { NodeChat, Server, assistant, chatId, textOf, token, toolPart } from "./helpers.mjs";

const OPTS = { timeout: 60000 };
const finished = (chat) => {
  const reply = assistant(chat);
  return chat.status === "ready" && reply && reply.parts.some((p) => p.type === "text" && p.state === "done");
};
const texts = (messages) => messages.map((m) => [m.role, textOf(m)]);

describe("AI SDK chat against tether", () => {
  let fast; // answers at once
  let slow; // 60 tokens at 40 tokens/s: long enough to act mid-stream

  before(async () => {
    [fast, slow] = await Promise.all([
      new Server({ agent: "tests.agents.fast_demo:agent" }).start(),
      new Server({ agent: "tests.agents.fast_demo:slow" }).start(),
    ]);
  });

  after(async () => {
    await Promise.all([fast?.close(), slow?.close()]);
  });

  test("send and stream: the reply is the run, and /messages says the same", OPTS, async () => {
    const id = chatId("send");
    const chat = new NodeChat({ server: fast, id });
    await chat.sendMessage({ text: "hello" });
    assert.equal(chat.status, "ready");
    assert.equal(chat.error, undefined);
    const reply = assistant(chat);
    assert.match(reply.id, /^run_[0-9a-f]{24}$/);
    assert.ok(textOf(reply).length > 20);
    const stored = await fast.messages(id);
    assert.deepEqual(stored.map((m) => m.id), chat.messages.map((m) => m.id));
    assert.deepEqual(texts(stored), texts(chat.messages));
    const events = await fast.events(id);
    assert.equal(events.filter((e) => e.type === "message").length, 1);
    assert.equal(events.find((e) => e.type === "message").data.message_id, chat.messages[0].id);
  });

  test("a retried POST does not double the message", OPTS, async () => {
    const id = chatId("retry");
    const body = { id, trigger: "submit-message",
      messages: [{ id: "m-1", role: "user", parts: [{ type: "text", text: "hello" }] }] };
    const first = await (await fast.request("POST", "/v1/ai-sdk/chat", token(), body)).text();
    const again = await fast.request("POST", "/v1/ai-sdk/chat", token(), body);
    assert.equal(again.headers.get("x-vercel-ai-ui-message-stream"), "v1");
    assert.equal(await again.text(), first); // the same run, replayed
    assert.ok(first.endsWith("data: [DONE]\n\n"));
    const events = await fast.events(id);
    assert.equal(events.filter((e) => e.type === "message").length, 1);
    assert.equal(events.filter((e) => e.type === "run.created").length, 1);
  });

  test("disconnect mid-stream, then resumeStream(): nothing lost, nothing doubled", OPTS, async () => {
    const id = chatId("resume");
    const chat = new NodeChat({ server: slow, id });
    const sending = chat.sendMessage({ text: "hello" });
    await chat.waitFor((c) => textOf(assistant(c)).length > 0, "first text");
    await chat.stop(); // aborts the fetch: the run goes on on the server
    await sending;
    const partial = textOf(assistant(chat));
    const run = assistant(chat).id;
    await chat.resumeStream();
    assert.equal(chat.status, "ready");
    assert.equal(chat.messages.length, 2);
    const reply = assistant(chat);
    assert.equal(reply.id, run);
    const stored = await slow.messages(id);
    assert.equal(textOf(reply), textOf(stored[1]));
    assert.ok(textOf(reply).startsWith(partial));
    assert.ok(textOf(reply).length > partial.length);
    assert.equal(reply.parts.filter((p) => p.type === "text").length, 1);
    // Nothing is active any more: the resume endpoint answers 204 and the chat stays ready.
    await chat.resumeStream();
    assert.equal(chat.status, "ready");
    assert.equal((await slow.request("GET", `/v1/ai-sdk/chat/${id}/stream`)).status, 204);
  });

  test("stop: the run is cancelled for everyone, and a resume finds nothing active", OPTS, async () => {
    const id = chatId("stop");
    const chat = new NodeChat({ server: slow, id });
    const sending = chat.sendMessage({ text: "hello" });
    await chat.waitFor((c) => textOf(assistant(c)).length > 0, "first text");
    const stopped = await slow.stop(id);
    assert.equal(stopped.cancelled, assistant(chat).id);
    await sending; // the POST's stream ends with the run
    assert.equal(chat.status, "ready");
    const events = await slow.events(id);
    const states = events.filter((e) => e.type === "run.state").map((e) => e.data.state);
    assert.equal(states.at(-1), "cancelled");
    const end = events.find((e) => e.type === "stream.end");
    assert.equal(end.data.interrupted, "cancelled");
    assert.equal(textOf(assistant(chat)), end.data.text);
    const stored = await slow.messages(id);
    assert.equal(textOf(stored[1]), end.data.text);
    assert.equal((await slow.request("GET", `/v1/ai-sdk/chat/${id}/stream`)).status, 204);
    assert.deepEqual(await slow.stop(id), { cancelled: null });
  });

  test("regenerate: a new run answers; the old answer stays in the log, marked", OPTS, async () => {
    const id = chatId("regen");
    const chat = new NodeChat({ server: fast, id });
    await chat.sendMessage({ text: "hello" });
    const old = assistant(chat).id;
    await chat.regenerate();
    assert.equal(chat.status, "ready");
    assert.equal(chat.messages.length, 2);
    const fresh = assistant(chat).id;
    assert.notEqual(fresh, old);
    assert.ok(textOf(assistant(chat)).length > 0);
    const events = await fast.events(id);
    assert.deepEqual(events.filter((e) => e.type === "ai-sdk.superseded").map((e) => e.data.superseded), [old]);
    assert.equal(events.filter((e) => e.type === "run.created").length, 2);
    assert.ok(events.some((e) => e.type === "stream.end" && e.data.run === old)); // still there
    const stored = await fast.messages(id);
    assert.deepEqual(stored.map((m) => m.id), [chat.messages[0].id, fresh]);
  });

  test("a front-end tool: onToolCall, addToolOutput, and the run carries on", OPTS, async () => {
    const id = chatId("tool");
    const calls = [];
    const chat = new NodeChat({
      server: fast,
      id,
      sendAutomaticallyWhen: lastAssistantMessageIsCompleteWithToolCalls,
      onToolCall: ({ toolCall }) => {
        calls.push(toolCall.toolName);
        if (toolCall.toolName === "pick_color") {
          chat.addToolOutput({ tool: "pick_color", toolCallId: toolCall.toolCallId, output: { color: "teal" } });
        }
      },
    });
    await chat.sendMessage({ text: "pick a color" });
    await chat.waitFor((c) => finished(c) && toolPart(assistant(c), "pick_color")?.state === "output-available",
      "the answer after the tool");
    assert.deepEqual(calls, ["pick_color"]);
    assert.equal(chat.messages.length, 2);
    const reply = assistant(chat);
    assert.deepEqual(toolPart(reply, "pick_color").output, { color: "teal" });
    assert.ok(textOf(reply).length > 0);
    const events = await fast.events(id);
    const results = events.filter((e) => e.type === "tool.result");
    assert.equal(results.length, 1);
    assert.deepEqual(results[0].data.result, { color: "teal" });
    assert.equal(results[0].data.by.sub, "alice");
    assert.equal(events.filter((e) => e.type === "run.created").length, 1); // one run throughout
    const stored = await fast.messages(id);
    assert.deepEqual(toolPart(stored[1], "pick_color").output, { color: "teal" });
    assert.deepEqual(texts(stored), texts(chat.messages));
  });

  test("an approval: addToolApprovalResponse decides; exactly one decision counts", OPTS, async () => {
    const id = chatId("approve");
    const a = new NodeChat({ server: fast, id, sendAutomaticallyWhen: lastAssistantMessageIsCompleteWithApprovalResponses });
    await a.sendMessage({ text: "publish the report" });
    const requested = toolPart(assistant(a), "publish_report");
    assert.equal(requested.state, "approval-requested");
    assert.equal(requested.approval.id, requested.toolCallId);
    // A second tab loads the chat while the approval waits.
    const b = new NodeChat({ server: fast, id, messages: await fast.messages(id),
      sendAutomaticallyWhen: lastAssistantMessageIsCompleteWithApprovalResponses });
    assert.equal(toolPart(assistant(b), "publish_report").state, "approval-requested");

    await a.addToolApprovalResponse({ id: requested.approval.id, approved: true });
    await a.waitFor((c) => finished(c) && toolPart(assistant(c), "publish_report").state === "output-available",
      "the answer after the approval");
    assert.equal(toolPart(assistant(a), "publish_report").output.status, "sent");

    // The other tab answers too, later: its rejection does not count, and it is told so.
    await b.addToolApprovalResponse({ id: requested.approval.id, approved: false });
    await b.waitFor((c) => finished(c), "the second tab's answer");
    const seen = toolPart(assistant(b), "publish_report");
    assert.equal(seen.state, "output-available");
    assert.equal(seen.approval.approved, true);

    const events = await fast.events(id);
    const decisions = events.filter((e) => e.type === "approval.decision");
    assert.equal(decisions.length, 1);
    assert.equal(decisions[0].data.decision, "approve");
    const stored = await fast.messages(id);
    assert.equal(toolPart(stored[1], "publish_report").state, "output-available");
    assert.deepEqual(toolPart(stored[1], "publish_report").approval, { id: requested.toolCallId, approved: true });
  });

  test("a rejected approval shows as denied", OPTS, async () => {
    const id = chatId("reject");
    const chat = new NodeChat({ server: fast, id, sendAutomaticallyWhen: lastAssistantMessageIsCompleteWithApprovalResponses });
    await chat.sendMessage({ text: "report" });
    const part = toolPart(assistant(chat), "publish_report");
    await chat.addToolApprovalResponse({ id: part.approval.id, approved: false });
    await chat.waitFor((c) => finished(c), "the answer after the rejection");
    assert.equal(toolPart(assistant(chat), "publish_report").state, "output-denied");
    const stored = await fast.messages(id);
    assert.equal(toolPart(stored[1], "publish_report").state, "output-denied");
  });

  test("two chat instances on one session: the second resumes the first one's stream", OPTS, async () => {
    const id = chatId("two");
    const a = new NodeChat({ server: slow, id });
    const sending = a.sendMessage({ text: "hello" });
    await a.waitFor((c) => textOf(assistant(c)).length > 0, "first text");
    const b = new NodeChat({ server: slow, id, messages: await slow.messages(id) });
    await b.resumeStream();
    await sending;
    assert.equal(b.status, "ready");
    assert.deepEqual(b.messages.map((m) => m.id), a.messages.map((m) => m.id));
    assert.deepEqual(texts(b.messages), texts(a.messages));
    // The second instance goes on with the conversation; the log has both turns.
    await b.sendMessage({ text: "and then?" });
    const stored = await slow.messages(id);
    assert.deepEqual(stored.map((m) => m.role), ["user", "assistant", "user", "assistant"]);
    assert.deepEqual(texts(stored), texts(b.messages));
  });

  test("capabilities: no token, no chat; subscribe-only cannot post or stop", OPTS, async () => {
    const id = chatId("caps");
    const body = { id, trigger: "submit-message",
      messages: [{ id: "m-1", role: "user", parts: [{ type: "text", text: "hi" }] }] };
    const anonymous = await fetch(`${fast.http}/v1/ai-sdk/chat`, { method: "POST", body: JSON.stringify(body) });
    assert.equal(anonymous.status, 401);
    const reader = token("bob", { caps: ["subscribe"] });
    assert.equal((await fast.request("POST", "/v1/ai-sdk/chat", reader, body)).status, 403);
    assert.equal((await fast.request("POST", `/v1/ai-sdk/chat/${id}/stop`, reader)).status, 403);
    assert.equal((await fast.request("GET", `/v1/ai-sdk/chat/${id}/messages`, reader)).status, 200);
    const elsewhere = token("carol", { sessions: ["other-*"] });
    assert.equal((await fast.request("GET", `/v1/ai-sdk/chat/${id}/stream`, elsewhere)).status, 403);
  });
});

describe("tether serve with its defaults", () => {
  let server;
  before(async () => { server = await new Server().start(); });
  after(async () => { await server?.close(); });

  test("the demo agent answers a stock chat in chat-* sessions", OPTS, async () => {
    const chat = new NodeChat({ server, id: chatId("default") });
    await chat.sendMessage({ text: "hello" });
    assert.equal(chat.status, "ready");
    assert.ok(textOf(assistant(chat)).length > 20);
  });
});
