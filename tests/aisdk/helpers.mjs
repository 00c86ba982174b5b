// Helpers for the AI SDK tests: the SDK's own chat class in Node (there is none ready-made in
// `ai` 7: `AbstractChat` over a small state object), a `tether serve` subprocess, and the
// session log read over HTTP.

import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

import { AbstractChat, DefaultChatTransport } from "ai";

import { ROOT, SECRET, freePort, token, until } from "../web/helpers.mjs";

export { token };

const PYTHON = process.env.TETHER_PYTHON || "python3";

/** The chat state: what `@ai-sdk/react` keeps in React state, plus change listeners. */
class NodeChatState {
  constructor(messages = []) {
    this._messages = messages;
    this._status = "ready";
    this._error = undefined;
    this.listeners = new Set();
  }

  changed() {
    for (const listener of [...this.listeners]) listener();
  }

  get messages() { return this._messages; }
  set messages(messages) { this._messages = messages; this.changed(); }
  get status() { return this._status; }
  set status(status) { this._status = status; this.changed(); }
  get error() { return this._error; }
  set error(error) { this._error = error; this.changed(); }

  pushMessage(message) { this.messages = this._messages.concat(message); }
  popMessage() { this.messages = this._messages.slice(0, -1); }
  replaceMessage(index, message) {
    this.messages = [...this._messages.slice(0, index), this.snapshot(message),
      ...this._messages.slice(index + 1)];
  }
  snapshot(value) { return structuredClone(value); }
}

/** The SDK's chat, over the stock `DefaultChatTransport` with only `api` and `headers`. */
export class NodeChat extends AbstractChat {
  constructor({ server, tok = token(), messages = [], ...init }) {
    const state = new NodeChatState(messages);
    super({
      ...init,
      state,
      transport: new DefaultChatTransport({
        api: `${server.http}/v1/ai-sdk/chat`,
        headers: { Authorization: `Bearer ${tok}` },
      }),
    });
    this.nodeState = state;
  }

  /** Resolves once `check(this)` holds, re-checked at every change of the chat's state. */
  waitFor(check, what = "chat state", timeout = 20000) {
    return new Promise((resolve, reject) => {
      const state = this.nodeState;
      const done = (fn, value) => {
        state.listeners.delete(listener);
        clearTimeout(timer);
        fn(value);
      };
      const listener = () => {
        let value;
        try {
          value = check(this);
        } catch (error) {
          done(reject, error);
          return;
        }
        if (value) done(resolve, value);
      };
      const timer = setTimeout(() => done(reject, new Error(`timed out waiting for ${what}`)), timeout);
      state.listeners.add(listener);
      listener();
    });
  }
}

export const assistant = (chat) => chat.messages.findLast((m) => m.role === "assistant");
export const textOf = (message) =>
  (message?.parts ?? []).filter((p) => p.type === "text").map((p) => p.text).join("");
export const toolPart = (message, name) => (message?.parts ?? []).find((p) => p.type === `tool-${name}`);

let counter = 0;
export const chatId = (what) => `chat-${what}-${process.pid}-${++counter}`;

/** `python -m tether serve` on a free port; `agent: null` leaves tether's default agent. */
export class Server {
  constructor({ agent = null } = {}) {
    this.agent = agent;
    this.data = mkdtempSync(join(tmpdir(), "tether-aisdk-"));
    this.output = "";
  }

  get http() {
    return `http://127.0.0.1:${this.port}`;
  }

  async start() {
    this.port = await freePort();
    const args = ["-m", "tether", "serve", "--port", String(this.port), "--data", this.data,
      "--secret", SECRET, "--log-level", "warning"];
    if (this.agent) args.push("--agent", this.agent);
    this.proc = spawn(PYTHON, args, { cwd: ROOT, env: { ...process.env, PYTHONUNBUFFERED: "1" } });
    this.proc.stdout.on("data", (d) => { this.output += d; });
    this.proc.stderr.on("data", (d) => { this.output += d; });
    this.exited = new Promise((resolve) => this.proc.once("exit", resolve));
    await until(async () => {
      if (this.proc.exitCode !== null) throw new Error(`tether serve exited: ${this.output}`);
      try {
        return (await fetch(`${this.http}/healthz`)).ok;
      } catch {
        return false;
      }
    }, { timeout: 30000, what: "tether serve" });
    return this;
  }

  async close() {
    if (this.proc && this.proc.exitCode === null) {
      this.proc.kill("SIGTERM");
      await this.exited;
    }
    rmSync(this.data, { recursive: true, force: true });
  }

  async request(method, path, tok = token(), body = undefined) {
    return fetch(`${this.http}${path}`, {
      method,
      headers: { Authorization: `Bearer ${tok}`, ...(body ? { "content-type": "application/json" } : {}) },
      body: body ? JSON.stringify(body) : undefined,
    });
  }

  async events(session, tok = token()) {
    const response = await this.request("GET", `/v1/sessions/${session}/events?limit=1000`, tok);
    return (await response.json()).events;
  }

  async messages(chat, tok = token()) {
    const response = await this.request("GET", `/v1/ai-sdk/chat/${chat}/messages`, tok);
    if (!response.ok) throw new Error(`messages: ${response.status} ${await response.text()}`);
    return response.json();
  }

  async stop(chat, tok = token()) {
    const response = await this.request("POST", `/v1/ai-sdk/chat/${chat}/stop`, tok);
    return response.json();
  }
}
