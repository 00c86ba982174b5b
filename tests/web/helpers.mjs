// Helpers for the Node tests of the browser SDK: a real `tether serve` in a subprocess, tokens,
// and WebSocket wrappers that simulate network faults.

import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

export const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
export const SDK = join(ROOT, "tether", "web", "sdk", "tether.js");
export const SECRET = "node-test-secret-" + "x".repeat(32);
const PYTHON = process.env.TETHER_PYTHON || "python3";

const b64 = (value) => Buffer.from(typeof value === "string" ? value : JSON.stringify(value)).toString("base64url");

/** An HS256 JWT like `tether token` makes. */
export function token(sub = "alice", { sessions = ["*"], caps = ["subscribe", "publish", "presence", "approve"], ttl = 3600 } = {}) {
  const header = b64({ alg: "HS256", typ: "JWT" });
  const now = Math.floor(Date.now() / 1000);
  const claims = b64({ sub, sessions, caps, iat: now, exp: now + ttl });
  const signature = createHmac("sha256", SECRET).update(`${header}.${claims}`).digest("base64url");
  return `${header}.${claims}.${signature}`;
}

export function freePort() {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.unref();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Poll `check` until it returns a truthy value. */
export async function until(check, { timeout = 10000, interval = 20, what = "condition" } = {}) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(interval);
  }
}

/** `python -m tether serve` on a free port with its own data folder. */
export class TetherServer {
  constructor({ agent = null, port = null, data = null } = {}) {
    this.agent = agent;
    this.port = port;
    this.data = data ?? mkdtempSync(join(tmpdir(), "tether-node-"));
    this.ownData = data === null;
    this.proc = null;
    this.output = "";
  }

  get url() {
    return `ws://127.0.0.1:${this.port}`;
  }

  get http() {
    return `http://127.0.0.1:${this.port}`;
  }

  async start() {
    this.port ??= await freePort();
    const args = ["-m", "tether", "serve", "--port", String(this.port), "--data", this.data,
      "--secret", SECRET, "--log-level", "warning", "--agent", this.agent ?? "none"];
    this.proc = spawn(PYTHON, args, { cwd: ROOT, env: { ...process.env, PYTHONUNBUFFERED: "1" } });
    this.proc.stdout.on("data", (d) => { this.output += d; });
    this.proc.stderr.on("data", (d) => { this.output += d; });
    const exited = new Promise((resolve) => this.proc.once("exit", resolve));
    this.exited = exited;
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

  /** SIGTERM (clients see 4000 and reconnect) or SIGKILL. */
  async stop(signal = "SIGTERM") {
    if (this.proc && this.proc.exitCode === null) {
      this.proc.kill(signal);
      await this.exited;
    }
    this.proc = null;
  }

  async close() {
    await this.stop();
    if (this.ownData) rmSync(this.data, { recursive: true, force: true });
  }

  async events(session, tok = token(), query = "") {
    const response = await fetch(`${this.http}/v1/sessions/${session}/events?limit=1000${query}`, {
      headers: { Authorization: `Bearer ${tok}` },
    });
    return (await response.json()).events;
  }
}

/**
 * A WebSocket class whose instances a test can break: `cut()` drops every open socket the way a
 * dead network does (no close frame reaches the server first), `hold` swallows incoming frames
 * (a half-open connection), `filter(frame)` can drop chosen frames.
 */
export function faultySocketClass(Base = globalThis.WebSocket) {
  const sockets = new Set();
  class FaultySocket {
    constructor(url, protocols) {
      this.inner = new Base(url, protocols);
      this.onopen = this.onmessage = this.onclose = this.onerror = null;
      sockets.add(this);
      this.inner.onopen = (e) => this.onopen?.(e);
      this.inner.onerror = (e) => this.onerror?.(e);
      this.inner.onclose = (e) => {
        sockets.delete(this);
        if (!this.cutDone) this.onclose?.(e);
      };
      this.inner.onmessage = (e) => {
        if (FaultySocket.hold || this.cutDone) return;
        let frame = null;
        try {
          frame = JSON.parse(e.data);
        } catch {
          // pass it on
        }
        if (frame && FaultySocket.filter && FaultySocket.filter(frame, this) === false) return;
        FaultySocket.received.push(frame);
        this.onmessage?.(e);
      };
    }

    get readyState() {
      return this.inner.readyState;
    }

    send(data) {
      FaultySocket.sent.push(JSON.parse(data));
      this.inner.send(data);
    }

    close(code, reason) {
      this.inner.close(code, reason);
    }

    /** The connection dies: the client sees 1006 at once. */
    cut() {
      this.cutDone = true;
      sockets.delete(this);
      try {
        this.inner.close();
      } catch {
        // already closed
      }
      this.onclose?.({ code: 1006, reason: "" });
    }

    static cutAll() {
      for (const socket of [...sockets]) socket.cut();
    }

    static get open() {
      return [...sockets];
    }
  }
  FaultySocket.hold = false;
  FaultySocket.filter = null;
  FaultySocket.sent = [];
  FaultySocket.received = [];
  return FaultySocket;
}

/** A sessionStorage stand-in. */
export class MemoryStorage {
  constructor() {
    this.map = new Map();
  }

  getItem(key) {
    return this.map.has(key) ? this.map.get(key) : null;
  }

  setItem(key, value) {
    this.map.set(key, String(value));
  }

  removeItem(key) {
    this.map.delete(key);
  }
}

/** Collect a session's items in an array (listener mode). */
export function collect(session) {
  const items = [];
  session.onEvent((item) => items.push(item));
  return items;
}

export function makeTempDir() {
  return mkdtempSync(join(tmpdir(), "tether-node-"));
}
