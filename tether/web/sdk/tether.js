// tether.js — the browser (and Node) SDK for the tether wire protocol v1.
//
// An ES module with no dependencies and no build step. Same semantics as the Python SDK
// (tether/client/): hello with a token, attach with a cursor, ordered exactly-once delivery,
// automatic reconnect with exponential backoff and full jitter, resume, dedupe by seq,
// idempotent publish, presence, heartbeat timeout. In a browser it also follows
// `navigator.onLine` and page visibility, and keeps each session's cursor in `sessionStorage`
// so that a refresh resumes where the page was.
//
//   import { Client } from "/sdk/tether.js";
//   const client = new Client("ws://127.0.0.1:8765", { token });
//   const session = await client.attach("demo", { onEvent: (event) => console.log(event) });
//   const cursor = await session.publish("message", { text: "hi" });   // after commit
//
// The protocol decisions live in `ClientProtocol` (no sockets, no timers, no clocks), the I/O in
// `Client`. Types: tether.d.ts next to this file. Documentation: docs/web.md.

export const VERSION = "0.1.0";
export const SUBPROTOCOL = "tether.v1.json";
export const WS_PATH = "/v1/ws";
export const SNAPSHOT_TYPE = "tether.snapshot";

/** Where the client's connection stands. */
export const ConnectionState = Object.freeze({
  CONNECTING: "connecting", // the first connection attempt (or before connect())
  CONNECTED: "connected", // welcomed; sessions are (being) re-attached
  RECONNECTING: "reconnecting", // connection lost; retrying with backoff
  CLOSED: "closed", // closed by the application or stopped for good
});

/** The close codes of protocol v1: 4000–4499 reconnect, 4500–4999 stop. */
export const CloseCode = Object.freeze({
  SHUTDOWN: 4000,
  SLOW_CONSUMER: 4001,
  TOO_MANY_CONNECTIONS: 4002,
  TRY_AGAIN_LATER: 4003, // load shedding: the reason says "retry_after=SECONDS"
  UNAUTHORIZED: 4500,
  TOKEN_EXPIRED: 4501,
  HELLO_TIMEOUT: 4502,
  UNSUPPORTED_CODEC: 4503,
  TOO_MANY_ERRORS: 4504,
});

const TEMPORARY_ERRORS = new Set(["rate_limited", "store_unavailable"]);
// Run interrupts go ahead of queued publishes on purpose: never held in a session's ordered retry.
const INTERRUPT_TYPES = new Set(["run.cancel", "run.steer"]);
const CURSOR_RE = /^([A-Za-z0-9_-]{1,64}):(0|[1-9][0-9]{0,18})$/;
const SYSTEM_SENDER = Object.freeze({ sub: "tether", client: "server", kind: "system" });
const STORAGE_PREFIX = "tether:v1:";

/** Whether a client should reconnect after a close with `code` (null: the socket dropped). */
export function shouldReconnect(code) {
  if (code === null || code === undefined) return true;
  if (code >= 4500 && code <= 4999) return false;
  return ![1002, 1003, 1007, 1008, 1009, 1010].includes(code);
}

/** The delay, in ms, of a TRY_AGAIN_LATER close reason ("retry_after=SECONDS"), or null. */
export function retryAfterFromReason(reason) {
  const match = /(?:^|[\s,])retry_after=([0-9]+(?:\.[0-9]+)?)(?:$|[\s,])/.exec(reason ?? "");
  if (!match) return null;
  const seconds = Number(match[1]);
  return seconds <= 60 ? seconds * 1000 : null;
}

/** Exponential backoff with full jitter: uniform(0, min(cap, base * 2**attempt)). */
export function backoffDelay(attempt, base, cap, random = Math.random) {
  const ceiling = Math.min(cap, base * 2 ** Math.min(attempt, 62));
  return random() * ceiling;
}

/** Parse a cursor "{epoch}:{seq}"; throws a TypeError when malformed. */
export function parseCursor(text) {
  const match = typeof text === "string" ? CURSOR_RE.exec(text) : null;
  if (!match) throw new TypeError(`malformed cursor ${JSON.stringify(text)}`);
  return { epoch: match[1], seq: Number(match[2]) };
}

/** `ws://host:port` → `ws://host:port/v1/ws`; http(s) become ws(s); a URL with a path is kept.
 * A relative URL ("/", "") is resolved against the page's location in a browser. */
export function wsUrl(url) {
  let parsed;
  try {
    parsed = new URL(url);
  } catch {
    const base = globalThis.location?.href;
    if (!base) throw new TypeError(`not an absolute URL: ${url}`);
    parsed = new URL(url, base);
  }
  const schemes = { "ws:": "ws:", "wss:": "wss:", "http:": "ws:", "https:": "wss:" };
  if (!schemes[parsed.protocol]) {
    throw new TypeError(`unsupported URL scheme ${parsed.protocol}: use ws:// or wss://`);
  }
  parsed.protocol = schemes[parsed.protocol];
  if (parsed.pathname === "" || parsed.pathname === "/") parsed.pathname = WS_PATH;
  parsed.hash = "";
  return parsed.toString();
}

function randomHex(bytes) {
  const buf = new Uint8Array(bytes);
  // getRandomValues works in insecure contexts too (randomUUID does not).
  globalThis.crypto.getRandomValues(buf);
  return Array.from(buf, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** A fresh idempotency key (128 random bits as hex). */
export function newKey() {
  return randomHex(16);
}

// --- errors ---------------------------------------------------------------------------------

export class TetherError extends Error {
  constructor(message) {
    super(message);
    this.name = new.target.name;
  }
}

/** The connection stopped for good: a close code that forbids reconnecting, too many attempts,
 * or a refused hello. `closeCode` is the code (null when none was received). */
export class ConnectionFailed extends TetherError {
  constructor(closeCode, reason) {
    super(closeCode === null || closeCode === undefined ? reason : `closed with ${closeCode}: ${reason}`);
    this.closeCode = closeCode ?? null;
    this.reason = reason;
  }
}

/** A request was refused with a non-temporary error code (see docs/protocol.md). */
export class RequestFailed extends TetherError {
  constructor(code, message) {
    super(`${code}: ${message}`);
    this.code = code;
    this.detail = message;
  }
}

export class PublishError extends RequestFailed {}
export class AttachError extends RequestFailed {}
export class ClientClosed extends TetherError {}
export class SessionClosed extends TetherError {}

// --- items ------------------------------------------------------------------------------------

function senderOf(value) {
  if (value && typeof value === "object") {
    return {
      sub: String(value.sub ?? ""),
      client: String(value.client ?? ""),
      kind: String(value.kind ?? "human"),
    };
  }
  return { ...SYSTEM_SENDER };
}

/** A SessionEvent from an `event` frame (or a snapshot entry). */
export function eventFromFrame(frame) {
  const cursor = typeof frame.cursor === "string" ? frame.cursor : null;
  const transient = frame.transient === true;
  const data = frame.data === undefined ? null : frame.data;
  const type = String(frame.type ?? "");
  return {
    session: String(frame.session ?? ""),
    seq: Number.isInteger(frame.seq) ? frame.seq : 0,
    cursor,
    epoch: cursor ? cursor.slice(0, cursor.lastIndexOf(":")) : null,
    type,
    data,
    sender: senderOf(frame.sender),
    time: Number.isInteger(frame.time) ? frame.time : 0,
    transient,
    stream: (type === "stream.append" || type === "stream.end") && data && typeof data.stream === "string"
      ? data.stream : null,
    snapshot: false,
  };
}

function makeSnapshot(session, cursor, reason, previous, events, presence) {
  const parsed = cursor ? parseCursor(cursor) : { epoch: null, seq: 0 };
  return {
    session,
    seq: parsed.seq,
    cursor,
    epoch: parsed.epoch,
    type: SNAPSHOT_TYPE,
    data: { reason, previous, events: events.length },
    sender: { ...SYSTEM_SENDER },
    time: events.reduce((max, e) => Math.max(max, e.time), 0),
    transient: false,
    stream: null,
    snapshot: true,
    reason,
    previous,
    events,
    presence,
  };
}

// --- the protocol state machine (no I/O) ------------------------------------------------------

class SessionState {
  constructor(name, requested, presenceState) {
    this.name = name;
    this.requested = requested; // the cursor asked for, until the first attached
    this.presenceState = presenceState; // desired presence state, restored on every re-attach
    this.epoch = null; // position of the last accepted event
    this.lastSeq = 0;
    this.attached = false; // attached on the current connection
    this.resumed = null;
    this.attachAttempts = 0;
    this.resyncing = false; // a re-attach on the same connection is in flight
    this.presence = new Map(); // member id → member
    this.presenceWaiters = [];
  }

  get cursor() {
    return this.epoch !== null ? `${this.epoch}:${this.lastSeq}` : this.requested;
  }

  attachFrame(id) {
    const frame = { op: "attach", id, session: this.name };
    const cursor = this.cursor;
    if (cursor !== null && cursor !== undefined) frame.cursor = cursor;
    if (this.presenceState) frame.presence = this.presenceState;
    return frame;
  }
}

/**
 * The client side of protocol v1 as a pure state machine, like the Python SDK's
 * `tether.client.protocol.ClientProtocol`: calls become frames to send, received frames become
 * outcomes (`{kind: "send" | "welcomed" | "deliver" | "attached" | "attachFailed" |
 * "completed" | "failed" | "retryLater" | "presence" | "notice", ...}`).
 * Request ids are never reused; pending publishes keep their idempotency key across
 * connections; an event with seq ≤ the last accepted one is dropped; a gap triggers a re-attach
 * from the last accepted cursor instead of an out-of-order delivery.
 *
 * Publish order (as in the Python SDK): the server commits the publishes of one connection in
 * the order it receives them. After a temporary refusal (`rate_limited`, `store_unavailable`)
 * a session's publishes are held (new ones are not sent) while a backoff runs (the error's
 * `retry_after` when given, else backoffDelay); then, once none of them is in flight, the
 * earliest unanswered one is re-sent alone, the next when it is committed, and so on in call
 * order; pipelining resumes when none is left. So a refused publish, and every publish made
 * after the client saw the refusal, commit in call order. The one inversion the protocol
 * cannot prevent: a publish already in flight behind the refused one that the server accepted
 * keeps its place ahead of it. Transient events and run interrupts (`run.cancel`,
 * `run.steer`) are not held.
 */
export class ClientProtocol {
  constructor({ clientId, device = "", kind = "human", tools = [] } = {}) {
    this.clientId = clientId;
    this.device = device;
    this.kind = kind;
    this.tools = [...tools];
    this.sessions = new Map();
    this.publishes = new Map(); // id → pending publish, in call order
    this.retrying = new Map(); // session → {backoff, head}: its ordered publishes are held
    this.connected = false;
    this._requests = new Map(); // id → {op, session}
    this._lastId = 0;
  }

  nextId() {
    this._lastId += 1;
    return this._lastId;
  }

  hello(token) {
    this.connected = false;
    const id = this.nextId();
    this._requests.set(id, { op: "hello", session: null });
    const frame = { op: "hello", id, client: this.clientId, kind: this.kind };
    if (token !== null && token !== undefined) frame.token = token;
    if (this.device) frame.device = this.device;
    if (this.tools.length) frame.tools = [...this.tools];
    return frame;
  }

  connectionLost() {
    this.connected = false;
    const outcomes = [];
    for (const state of this.sessions.values()) {
      state.attached = false;
      state.resyncing = false;
    }
    for (const [id, request] of this._requests) {
      if (request.op === "detach" || request.op === "ping") {
        outcomes.push({ kind: "completed", id, value: null, duplicate: false });
      } else if (request.op === "presence.set" && this.sessions.has(request.session)) {
        // The re-attach carries the desired state; it completes this request.
        this.sessions.get(request.session).presenceWaiters.push(id);
      }
    }
    this._requests.clear();
    for (const retry of this.retrying.values()) retry.head = null; // re-sent after welcome
    for (const [id, pub] of [...this.publishes]) {
      if (pub.inFlight && pub.transient) {
        // Best effort: re-sending a transient event could show it twice.
        this.publishes.delete(id);
        outcomes.push({ kind: "completed", id, value: null, duplicate: false });
      }
      pub.inFlight = false;
    }
    return outcomes;
  }

  attach(session, cursor = null, presence = null) {
    if (cursor !== null && cursor !== undefined) parseCursor(cursor);
    if (this.sessions.has(session)) throw new Error(`already attached to ${session}`);
    const state = new SessionState(session, cursor ?? null, presence);
    this.sessions.set(session, state);
    return this.connected ? this._attachRequest(state) : null;
  }

  detach(session) {
    this.sessions.delete(session);
    const id = this.nextId();
    if (!this.connected) return [id, null];
    this._requests.set(id, { op: "detach", session });
    return [id, { op: "detach", id, session }];
  }

  /** Register a publish; the frame is null while offline or while the session's publishes are
   * held after a temporary refusal (it is sent later, in call order). */
  publish(session, type, data, { key = null, transient = false } = {}) {
    const id = this.nextId();
    const pub = {
      id, session, type, data, key: key || newKey(), transient, inFlight: false, attempts: 0,
      ordered: !transient && !INTERRUPT_TYPES.has(type),
    };
    this.publishes.set(id, pub);
    if (!this.connected || (pub.ordered && this.retrying.has(session))) return [id, null];
    pub.inFlight = true;
    return [id, publishFrame(pub)];
  }

  setPresence(session, presenceState) {
    const state = this.sessions.get(session);
    if (!state) throw new Error(`not attached to ${session}`);
    state.presenceState = presenceState;
    const id = this.nextId();
    if (!(this.connected && state.attached)) {
      state.presenceWaiters.push(id);
      return [id, null];
    }
    this._requests.set(id, { op: "presence.set", session });
    return [id, { op: "presence.set", id, session, state: presenceState }];
  }

  ping() {
    if (!this.connected) return null;
    const id = this.nextId();
    this._requests.set(id, { op: "ping", session: null });
    return [id, { op: "ping", id }];
  }

  /** The backoff of a retryLater outcome is over: the outcomes to apply now. */
  retry(outcome) {
    if (outcome.op === "attach") {
      const frame = outcome.session !== null ? this.retryAttach(outcome.session) : null;
      return frame ? [{ kind: "send", frame }] : [];
    }
    if (outcome.session !== null) return this.retryPublishes(outcome.session);
    const frame = this.resend(outcome.id);
    return frame ? [{ kind: "send", frame }] : [];
  }

  /** Stop retrying: the request of a retryLater outcome fails with its last temporary error. */
  giveUp(outcome) {
    const { id, code, message } = outcome;
    if (outcome.op === "attach") {
      const state = outcome.session !== null ? this.sessions.get(outcome.session) : undefined;
      if (!state) return [];
      this.sessions.delete(state.name);
      const outcomes = state.presenceWaiters.map((w) => ({ kind: "failed", id: w, code, message }));
      outcomes.push({ kind: "attachFailed", session: state.name, code, message });
      return outcomes;
    }
    const outcomes = this.publishes.delete(id) ? [{ kind: "failed", id, code, message }] : [];
    // The backoff this outcome asked for will not run: the next publish goes now.
    if (outcome.session !== null) outcomes.push(...this.retryPublishes(outcome.session));
    return outcomes;
  }

  /** Re-send an unordered publish (transient, interrupt) that got a temporary error. */
  resend(id) {
    const pub = this.publishes.get(id);
    if (!pub || pub.inFlight || !this.connected) return null;
    pub.inFlight = true;
    return publishFrame(pub);
  }

  /** The backoff of `session`'s held publishes is over: re-send the earliest unanswered one
   * once none is in flight (now, or when the last in-flight reply comes). */
  retryPublishes(session) {
    const retry = this.retrying.get(session);
    if (retry) retry.backoff = false;
    return this._pump(session);
  }

  retryAttach(session) {
    const state = this.sessions.get(session);
    if (!state || state.attached || !this.connected) return null;
    return this._attachRequest(state);
  }

  /** Forget request `id` (the caller stopped waiting; a publish may still commit). Returns
   * the outcomes to apply: the next held publish of its session, if it waited for this one. */
  cancel(id) {
    this._requests.delete(id);
    const pub = this.publishes.get(id);
    if (!pub) return [];
    this.publishes.delete(id);
    return pub.ordered ? this._pump(pub.session) : [];
  }

  /** Advance `session`'s ordered retry: when no backoff runs and none of its publishes is in
   * flight, send the earliest unanswered one alone; when none is left, pipeline again. */
  _pump(session) {
    const retry = this.retrying.get(session);
    if (!retry || retry.backoff || !this.connected) return [];
    let head = null;
    for (const pub of this.publishes.values()) { // in call order
      if (pub.session !== session || !pub.ordered) continue;
      if (pub.inFlight) return []; // its reply (commit or refusal) must come first
      head ??= pub;
    }
    if (!head) {
      this.retrying.delete(session);
      return [];
    }
    head.inFlight = true;
    retry.head = head.id;
    return [{ kind: "send", frame: publishFrame(head) }];
  }

  hasOutstanding() {
    for (const pub of this.publishes.values()) if (pub.inFlight) return true;
    for (const request of this._requests.values()) if (request.op !== "hello") return true;
    return false;
  }

  _attachRequest(state) {
    const id = this.nextId();
    this._requests.set(id, { op: "attach", session: state.name });
    return state.attachFrame(id);
  }

  receive(frame) {
    const op = frame?.op;
    if (op === "event") return this._onEvent(frame);
    if (op === "presence") return this._onPresence(frame);
    if (op === "published") return this._onPublished(frame);
    if (op === "attached") return this._onAttached(frame);
    if (op === "error") return this._onError(frame);
    const id = frame?.id;
    const request = Number.isInteger(id) ? this._requests.get(id) : undefined;
    if (op === "welcome" && request?.op === "hello") {
      this._requests.delete(id);
      return this._onWelcome(frame);
    }
    if ((op === "pong" || op === "detached") && request) {
      this._requests.delete(id);
      return [{ kind: "completed", id, value: op === "pong" ? frame.time ?? null : null, duplicate: false }];
    }
    if (op === "pong") return [];
    return [{ kind: "notice", frame }];
  }

  _onWelcome(frame) {
    this.connected = true;
    const outcomes = [{ kind: "welcomed", frame }];
    // Re-attach first: the server handles frames in order, so the publishes that follow
    // cannot reach a session before its attach.
    for (const state of this.sessions.values()) {
      outcomes.push({ kind: "send", frame: this._attachRequest(state) });
    }
    for (const pub of this.publishes.values()) { // in call order
      if (pub.ordered && this.retrying.has(pub.session)) continue; // one at a time: _pump
      pub.inFlight = true;
      outcomes.push({ kind: "send", frame: publishFrame(pub) });
    }
    for (const session of [...this.retrying.keys()]) outcomes.push(...this._pump(session));
    return outcomes;
  }

  _onEvent(frame) {
    const state = typeof frame.session === "string" ? this.sessions.get(frame.session) : undefined;
    if (!state || !state.attached) return [];
    const event = eventFromFrame(frame);
    if (event.transient || event.cursor === null) return [{ kind: "deliver", session: state.name, item: event }];
    if (event.epoch !== state.epoch) return []; // from a subscription a later attach replaced
    if (event.seq <= state.lastSeq) return []; // already delivered
    if (event.seq !== state.lastSeq + 1) {
      // A gap: never deliver out of order; re-attach from the last accepted cursor.
      if (state.resyncing) return [];
      state.resyncing = true;
      return [{ kind: "send", frame: this._attachRequest(state) }];
    }
    state.lastSeq = event.seq;
    return [{ kind: "deliver", session: state.name, item: event }];
  }

  _onAttached(frame) {
    const id = frame.id;
    const request = Number.isInteger(id) ? this._requests.get(id) : undefined;
    if (request) this._requests.delete(id);
    const state = typeof frame.session === "string" ? this.sessions.get(frame.session) : undefined;
    if (!request || !state) return [];
    let cursor;
    try {
      cursor = parseCursor(frame.cursor);
    } catch {
      return [{ kind: "notice", frame }];
    }
    const resumed = frame.resumed === true;
    const outcomes = [];
    state.attached = true;
    state.resyncing = false;
    state.attachAttempts = 0;
    state.resumed = resumed;
    if (resumed) {
      if (state.epoch === cursor.epoch) {
        // Never move backwards: events of the replaced subscription may have been accepted.
        state.lastSeq = Math.max(state.lastSeq, cursor.seq);
      } else {
        state.epoch = cursor.epoch;
        state.lastSeq = cursor.seq;
      }
    } else {
      const previous = state.cursor ?? null;
      const snap = frame.snapshot && typeof frame.snapshot === "object" ? frame.snapshot : {};
      const events = (Array.isArray(snap.events) ? snap.events : [])
        .filter((e) => e && typeof e === "object").map(eventFromFrame);
      const members = (Array.isArray(snap.presence) ? snap.presence : []).filter((m) => m && typeof m === "object");
      state.epoch = cursor.epoch;
      state.lastSeq = cursor.seq;
      outcomes.push({
        kind: "deliver",
        session: state.name,
        item: makeSnapshot(state.name, frame.cursor, String(frame.reason || "fresh"), previous, events, members),
      });
    }
    state.requested = null;
    outcomes.push({ kind: "attached", session: state.name, resumed, cursor: frame.cursor, reason: frame.reason ?? null });
    for (const waiter of state.presenceWaiters) outcomes.push({ kind: "completed", id: waiter, value: null, duplicate: false });
    state.presenceWaiters = [];
    return outcomes;
  }

  _onPublished(frame) {
    const id = frame.id;
    const pub = Number.isInteger(id) ? this.publishes.get(id) : undefined;
    if (!pub) return [];
    this.publishes.delete(id);
    const outcomes = [{
      kind: "completed",
      id,
      value: typeof frame.cursor === "string" ? frame.cursor : null,
      duplicate: frame.duplicate === true,
    }];
    if (pub.ordered && this.retrying.has(pub.session)) outcomes.push(...this._pump(pub.session));
    return outcomes;
  }

  _onError(frame) {
    const id = frame.id;
    const code = String(frame.code ?? "internal");
    const message = String(frame.message ?? "");
    const temporary = frame.temporary === true || TEMPORARY_ERRORS.has(code);
    if (!Number.isInteger(id)) return [{ kind: "notice", frame }];
    const retryAfter = retryAfterOf(frame);
    const pub = this.publishes.get(id);
    if (pub) {
      if (temporary) {
        pub.inFlight = false;
        pub.attempts += 1;
        if (!pub.ordered) {
          return [{ kind: "retryLater", op: "publish", id, attempt: pub.attempts - 1, code, message, session: null, retryAfter }];
        }
        const retry = this.retrying.get(pub.session);
        // In flight behind one already refused: its turn comes, in call order.
        if (retry && retry.head !== id) return this._pump(pub.session);
        // The first refusal, or the publish re-sent alone refused again: hold and back off.
        this.retrying.set(pub.session, { backoff: true, head: null });
        return [{ kind: "retryLater", op: "publish", id, attempt: pub.attempts - 1, code, message, session: pub.session, retryAfter }];
      }
      this.publishes.delete(id);
      const outcomes = [{ kind: "failed", id, code, message }];
      if (pub.ordered && this.retrying.has(pub.session)) outcomes.push(...this._pump(pub.session));
      return outcomes;
    }
    const request = this._requests.get(id);
    if (!request) return [{ kind: "notice", frame }];
    this._requests.delete(id);
    if (request.op === "hello") return [{ kind: "failed", id, code, message }];
    if (request.op === "attach") {
      const state = this.sessions.get(request.session);
      if (!state) return [];
      state.resyncing = false;
      if (temporary) {
        state.attachAttempts += 1;
        return [{ kind: "retryLater", op: "attach", id, attempt: state.attachAttempts - 1, code, message, session: state.name, retryAfter }];
      }
      this.sessions.delete(state.name);
      const outcomes = state.presenceWaiters.map((w) => ({ kind: "failed", id: w, code, message }));
      outcomes.push({ kind: "attachFailed", session: state.name, code, message });
      return outcomes;
    }
    return [{ kind: "failed", id, code, message }];
  }

  _onPresence(frame) {
    const state = typeof frame.session === "string" ? this.sessions.get(frame.session) : undefined;
    const action = String(frame.action ?? "");
    const members = (Array.isArray(frame.members) ? frame.members : []).filter((m) => m && typeof m === "object");
    const outcomes = [];
    const id = frame.id;
    if (Number.isInteger(id) && this._requests.has(id)) {
      this._requests.delete(id);
      outcomes.push({ kind: "completed", id, value: members, duplicate: false });
    }
    if (!state) return outcomes;
    if (action === "list") {
      state.presence = new Map(members.map((m) => [String(m.member), m]));
    } else if (action === "leave") {
      for (const m of members) state.presence.delete(String(m.member));
    } else {
      for (const m of members) state.presence.set(String(m.member), m);
    }
    outcomes.push({ kind: "presence", session: state.name, action, members });
    return outcomes;
  }
}

/** An error frame's `retry_after` (ms, optional), or null. */
function retryAfterOf(frame) {
  const value = frame.retry_after;
  return typeof value === "number" && Number.isFinite(value) && value >= 0 ? Math.min(value, 86400000) : null;
}

function publishFrame(pub) {
  const frame = { op: "publish", id: pub.id, session: pub.session, type: pub.type, data: pub.data, key: pub.key };
  if (pub.transient) frame.transient = true;
  return frame;
}

/** Idle detection: after `timeout` ms with nothing received, ping; after another `timeout`
 * with still nothing, drop the connection. */
export class Heartbeat {
  constructor(timeout, now) {
    this.timeout = timeout;
    this.lastReceived = now;
    this.pingSentAt = null;
    this.deadline = timeout;
  }

  received(now) {
    this.lastReceived = now;
    this.pingSentAt = null;
    this.deadline = this.timeout;
  }

  /** Ping now and drop if nothing arrives within `deadline` ms (page became visible, …). */
  probe(now, deadline) {
    this.pingSentAt = now;
    this.deadline = Math.min(deadline, this.timeout);
  }

  /** What to do at `now`: ["wait" | "ping" | "drop", ms until the next poll]. */
  poll(now) {
    if (this.pingSentAt !== null) {
      const waited = now - this.pingSentAt;
      if (waited >= this.deadline) return ["drop", 0];
      return ["wait", this.deadline - waited];
    }
    const idle = now - this.lastReceived;
    if (idle >= this.timeout) {
      this.pingSentAt = now;
      this.deadline = this.timeout;
      return ["ping", this.timeout];
    }
    return ["wait", this.timeout - idle];
  }
}

// --- small helpers ----------------------------------------------------------------------------

class Emitter {
  constructor() {
    this._listeners = new Map();
  }

  on(type, callback) {
    if (typeof callback !== "function") throw new TypeError("callback must be a function");
    let set = this._listeners.get(type);
    if (!set) this._listeners.set(type, (set = new Set()));
    const entry = { callback };
    set.add(entry);
    return () => set.delete(entry);
  }

  count(type) {
    return this._listeners.get(type)?.size ?? 0;
  }

  emit(type, ...args) {
    const set = this._listeners.get(type);
    if (!set) return 0;
    for (const entry of [...set]) {
      try {
        entry.callback(...args);
      } catch (error) {
        console.error(`tether: a ${type} callback failed`, error);
      }
    }
    return set.size;
  }
}

function deferred() {
  let resolve;
  let reject;
  const promise = new Promise((res, rej) => {
    resolve = res;
    reject = rej;
  });
  promise.catch(() => {}); // failures are surfaced to whoever awaits; never "unhandled"
  return { promise, resolve, reject, settled: false };
}

function settle(d, error, value) {
  if (d.settled) return;
  d.settled = true;
  if (error) d.reject(error);
  else d.resolve(value);
}

function defaultStorage() {
  try {
    const storage = globalThis.sessionStorage;
    if (!storage) return null;
    const probe = `${STORAGE_PREFIX}probe`;
    storage.setItem(probe, "1");
    storage.removeItem(probe);
    return storage;
  } catch {
    return null; // disabled storage, sandboxed iframe, Safari private mode quota
  }
}

const now = () => (globalThis.performance?.now ? globalThis.performance.now() : Date.now());

// --- Stream ------------------------------------------------------------------------------------

/** A token stream in a session: `stream.append` deltas, then one `stream.end`. */
export class Stream {
  constructor(session, id) {
    this.session = session;
    this.id = id;
    this.ended = false;
  }

  append(text) {
    return this.session.publish("stream.append", { stream: this.id, text });
  }

  end(extra = {}) {
    this.ended = true;
    return this.session.publish("stream.end", { ...extra, stream: this.id });
  }
}

// --- Session -----------------------------------------------------------------------------------

/**
 * One attached session. Items (events, and a snapshot when continuity was lost) reach the
 * application in order and exactly once, either through `onEvent` callbacks or through
 * `for await (const item of session)`, not both. Items received before either is used wait
 * in a buffer, so nothing is missed between `attach()` and the first callback.
 */
export class Session {
  constructor(client, name, cursor, options) {
    this.client = client;
    this.name = name;
    /** Cursor of the last item handed to the application: persist it to resume there. */
    this.cursor = cursor;
    /** Whether the last (re-)attach resumed (null until attached). */
    this.resumed = null;
    /** What `attach` read from storage for this session ({cursor, state, time}) or null. */
    this.restored = options.restored ?? null;
    this.saveState = options.saveState ?? null;
    this._emitter = new Emitter();
    this._mode = null; // "listeners" | "iterator"
    this._buffer = [];
    this._waiters = [];
    this._ended = false;
    this._error = null;
    this._detached = false;
    this._ready = deferred();
    this._persistTimer = null;
    this._fromStorage = options.fromStorage === true;
  }

  /** Members present now, by member id (a copy). */
  get presence() {
    const state = this.client._proto.sessions.get(this.name);
    return state ? Object.fromEntries(state.presence) : {};
  }

  /** Members present now, as a list. */
  get members() {
    return Object.values(this.presence);
  }

  publish(type, data = null, { key = null, transient = false } = {}) {
    if (this._detached) return Promise.reject(new SessionClosed(`session ${this.name} is detached`));
    return this.client._publish(this.name, type, data, key, transient);
  }

  stream(id = null) {
    return new Stream(this, id || randomHex(8));
  }

  // --- steering runs (docs/runs.md); the same helpers as the Python SDK ---

  /** Cancel a run: the stream stops, then `run.cancel` and `run.state cancelled` follow. */
  cancelRun(run, reason = "") {
    return this.publish("run.cancel", { run, reason });
  }

  /** Inject a message into an active run. */
  steer(run, text) {
    return this.publish("run.steer", { run, text });
  }

  /** Approve a tool call, optionally with edited arguments (needs the `approve` capability). */
  approve(run, call, args = null) {
    const data = { run, call, decision: "approve" };
    if (args !== null && args !== undefined) data.arguments = args;
    return this.publish("approval.decision", data);
  }

  reject(run, call) {
    return this.publish("approval.decision", { run, call, decision: "reject" });
  }

  /** Answer a front-end tool call; the first valid answer wins (others: already_decided). */
  answerTool(run, call, result = null, { error = null } = {}) {
    const data = { run, call };
    if (error !== null && error !== undefined) data.error = String(error);
    else data.result = result;
    return this.publish("tool.result", data);
  }

  setPresence(state) {
    if (this._detached) return Promise.reject(new SessionClosed(`session ${this.name} is detached`));
    return this.client._setPresence(this.name, state);
  }

  /** `event` (item), `presence` (action, members), `attached` ({resumed, cursor, reason}),
   * `closed` (error or null). Returns a function that removes the callback. */
  on(type, callback) {
    if (type === "event") this._useMode("listeners");
    const off = this._emitter.on(type, callback);
    if (type === "event") this._flushBuffer();
    return off;
  }

  onEvent(callback) {
    return this.on("event", callback);
  }

  onPresence(callback) {
    return this.on("presence", callback);
  }

  onAttached(callback) {
    return this.on("attached", callback);
  }

  /** The next item; rejects with SessionClosed once detached and drained. */
  async next() {
    const result = await this._pull();
    if (result.done) throw this._error ?? new SessionClosed(`session ${this.name} is detached`);
    return result.value;
  }

  [Symbol.asyncIterator]() {
    this._useMode("iterator");
    return { next: () => this._pull(), return: async () => ({ done: true, value: undefined }) };
  }

  async detach() {
    if (this._detached) return;
    this._detached = true;
    await this.client._detach(this);
  }

  // --- internals ---

  _useMode(mode) {
    if (this._mode && this._mode !== mode) {
      throw new TetherError("a session is consumed either with onEvent callbacks or by iteration, not both");
    }
    this._mode = mode;
  }

  _pull() {
    this._useMode("iterator");
    if (this._buffer.length) {
      const item = this._buffer.shift();
      this._consumed(item);
      return Promise.resolve({ done: false, value: item });
    }
    if (this._ended) {
      return this._error ? Promise.reject(this._error) : Promise.resolve({ done: true, value: undefined });
    }
    return new Promise((resolve, reject) => this._waiters.push({ resolve, reject }));
  }

  _deliver(item) {
    if (this._mode === "listeners") {
      this._emitter.emit("event", item, this);
      this._consumed(item);
    } else if (this._mode === "iterator" && this._waiters.length) {
      this._waiters.shift().resolve({ done: false, value: item });
      this._consumed(item);
    } else {
      this._buffer.push(item);
    }
  }

  _flushBuffer() {
    while (this._buffer.length && this._mode === "listeners") {
      const item = this._buffer.shift();
      this._emitter.emit("event", item, this);
      this._consumed(item);
    }
  }

  _consumed(item) {
    if (item.cursor !== null || item.snapshot) {
      this.cursor = item.cursor;
      this.client._persist(this);
    }
  }

  _finish(error) {
    if (this._ended) return;
    this._ended = true;
    this._error = error;
    settle(this._ready, error ?? new SessionClosed(`session ${this.name} was detached`));
    for (const waiter of this._waiters.splice(0)) {
      if (error) waiter.reject(error);
      else waiter.resolve({ done: true, value: undefined });
    }
    this._emitter.emit("closed", error);
  }
}

// --- Client -----------------------------------------------------------------------------------

/**
 * A tether client: one logical connection, reconnected as long as that can help.
 * See tether.d.ts for the options; times are in milliseconds.
 */
export class Client {
  constructor(url, options = {}) {
    const {
      token = null,
      clientId = null,
      device = "",
      kind = "human",
      tools = [],
      backoffBase = 500,
      backoffCap = 8000, // bounds the stay away after a restart (docs/scaling.md)
      maxAttempts = null,
      heartbeatTimeout = null,
      connectTimeout = 10000,
      closeTimeout = 2000,
      storage,
      persistInterval = 250,
      WebSocket: WebSocketImpl = globalThis.WebSocket,
      random = Math.random,
      watchNetwork = true,
    } = options;
    if (kind !== "human" && kind !== "agent") throw new TypeError("kind must be 'human' or 'agent'");
    if (typeof WebSocketImpl !== "function") {
      throw new TypeError("no WebSocket implementation: pass { WebSocket } (Node < 22: the 'ws' package, or run with --experimental-websocket)");
    }
    this.url = wsUrl(url);
    this.clientId = clientId || `js-${randomHex(6)}`;
    this.backoffBase = backoffBase;
    this.backoffCap = backoffCap;
    this.maxAttempts = maxAttempts;
    this.heartbeatTimeout = heartbeatTimeout;
    this.connectTimeout = connectTimeout;
    this.closeTimeout = closeTimeout;
    this.persistInterval = persistInterval;
    /** The last welcome frame (sub, caps, heartbeat, limits), or null. */
    this.welcome = null;
    this.storage = storage === undefined ? defaultStorage() : storage;
    this._token = token;
    this._WebSocket = WebSocketImpl;
    this._random = random;
    this._watchNetwork = watchNetwork;
    this._proto = new ClientProtocol({ clientId: this.clientId, device, kind, tools });
    this._emitter = new Emitter();
    this._state = ConnectionState.CONNECTING;
    this._info = {};
    this._sessions = new Map();
    this._waiters = new Map(); // id → {d, kind, session}
    this._conn = null;
    this._running = null;
    this._connectedOnce = null;
    this._closing = false;
    this._error = null;
    this._fatal = null;
    this._wake = null; // resolves the current backoff wait early
    this._timers = new Set();
    this._cleanups = [];
  }

  get state() {
    return this._state;
  }

  /** Details of the current state: {attempt, delay, retryAt, reason, code, offline}. */
  get stateInfo() {
    return { ...this._info };
  }

  /** Attached sessions by name (a copy). */
  get sessions() {
    return new Map(this._sessions);
  }

  session(name) {
    return this._sessions.get(name);
  }

  /** `state` (state, info), `welcome` (frame), `notice` (frame). Returns a remover. */
  on(type, callback) {
    return this._emitter.on(type, callback);
  }

  /** Call `callback(state, info)` on every state change (and new reconnect countdowns). */
  onState(callback) {
    return this.on("state", callback);
  }

  /** Connect (retrying per the backoff policy); resolves once welcomed the first time. */
  connect() {
    if (!this._running) {
      if (this._closing) return Promise.reject(this._error ?? new ClientClosed("the client is closed"));
      this._connectedOnce = deferred();
      this._installWatchers();
      this._running = this._run();
    }
    return this._connectedOnce.promise;
  }

  /**
   * Follow `name`. `cursor`: undefined = the cursor saved in storage for this session if any,
   * else from the start; null = from the start; a cursor string = resume after it.
   * Resolves once attached; if the cursor cannot be resumed, the first item is a snapshot.
   */
  async attach(name, options = {}) {
    this._checkUsable();
    if (!this._running) this.connect();
    const existing = this._sessions.get(name);
    if (existing) {
      await existing._ready.promise;
      return existing;
    }
    let { cursor } = options;
    let restored = null;
    if (cursor === undefined) {
      restored = this.saved(name);
      // With saveState, a cursor saved without its state is useless: the text before it
      // would be missing. Start from the beginning instead.
      if (restored && options.saveState && !("state" in restored)) restored = null;
      cursor = restored?.cursor ?? null;
    }
    const frame = this._proto.attach(name, cursor, options.presence ?? null);
    const session = new Session(this, name, cursor, {
      restored,
      saveState: options.saveState,
      fromStorage: restored !== null && cursor !== null,
    });
    this._sessions.set(name, session);
    if (options.onEvent) session.onEvent(options.onEvent);
    if (options.onPresence) session.onPresence(options.onPresence);
    if (options.onAttached) session.onAttached(options.onAttached);
    if (frame) this._send(frame);
    await session._ready.promise;
    return session;
  }

  /** What is saved in storage for `name`: {cursor, state, time} or null. */
  saved(name) {
    if (!this.storage) return null;
    try {
      const raw = this.storage.getItem(this._storageKey(name));
      if (!raw) return null;
      const value = JSON.parse(raw);
      if (!value || typeof value !== "object") return null;
      if (value.cursor !== null) parseCursor(value.cursor);
      const saved = { cursor: value.cursor, time: value.time ?? 0 };
      if ("state" in value) saved.state = value.state;
      return saved;
    } catch {
      return null;
    }
  }

  /** Forget what is saved in storage for `name`. */
  forget(name) {
    try {
      this.storage?.removeItem(this._storageKey(name));
    } catch {
      // storage unavailable: nothing to forget
    }
  }

  /** Skip the current backoff wait and try to connect now. */
  reconnectNow() {
    if (this._wake) this._wake();
  }

  /** Measure the round trip of a `ping` frame, in ms. */
  async ping() {
    this._checkUsable();
    const pair = this._proto.ping();
    if (!pair) throw new TetherError("not connected");
    const started = now();
    await this._request(pair[0], pair[1], "ping", null);
    return now() - started;
  }

  /** Close the connection and stop; pending calls reject with ClientClosed, iterators end. */
  async close() {
    if (this._closing && !this._running) return;
    this._closing = true;
    for (const session of this._sessions.values()) this._flushPersist(session);
    const conn = this._conn;
    if (conn) this._drop(conn, "closed by the application");
    if (this._wake) this._wake();
    if (this._running) {
      let timer;
      await Promise.race([this._running, new Promise((r) => { timer = setTimeout(r, this.closeTimeout); })]);
      clearTimeout(timer);
    }
    this._finish(new ClientClosed("the client is closed"));
  }

  // --- internals: requests ---

  _checkUsable() {
    if (this._error) throw this._error;
    if (this._closing) throw new ClientClosed("the client is closed");
  }

  _request(id, frame, kind, session) {
    const d = deferred();
    this._waiters.set(id, { d, kind, session });
    if (frame) this._send(frame);
    return d.promise;
  }

  async _publish(session, type, data, key, transient) {
    this._checkUsable();
    JSON.stringify(data); // fail now (circular, BigInt) rather than on the socket later
    const [id, frame] = this._proto.publish(session, type, data, { key, transient });
    const done = await this._request(id, frame, "publish", session);
    return typeof done.value === "string" ? done.value : null;
  }

  async _setPresence(session, state) {
    this._checkUsable();
    const [id, frame] = this._proto.setPresence(session, state);
    await this._request(id, frame, "presence", session);
  }

  async _detach(session) {
    const name = session.name;
    const publishes = [...this._waiters.values()]
      .filter((w) => w.kind === "publish" && w.session === name).map((w) => w.d.promise);
    await Promise.allSettled(publishes);
    this._flushPersist(session);
    if (this._sessions.get(name) === session) this._sessions.delete(name);
    session._finish(null);
    if (this._closing || this._error) return;
    const [id, frame] = this._proto.detach(name);
    if (frame) {
      try {
        await this._request(id, frame, "detach", name);
      } catch {
        // the connection closed meanwhile: the server detached us anyway
      }
    }
  }

  // --- internals: persistence ---

  _storageKey(name) {
    return `${STORAGE_PREFIX}${this.url}#${name}`;
  }

  _persist(session) {
    if (!this.storage || session._detached) return;
    if (!session.saveState) {
      this._write(session, { cursor: session.cursor, time: Date.now() });
      return;
    }
    // Cursor and state are saved together so a restore never mixes two moments.
    if (session._persistTimer === null) {
      session._persistTimer = setTimeout(() => {
        session._persistTimer = null;
        this._flushPersist(session);
      }, this.persistInterval);
    }
  }

  _flushPersist(session) {
    if (session._persistTimer !== null) {
      clearTimeout(session._persistTimer);
      session._persistTimer = null;
    }
    if (!this.storage || !session.saveState || session.cursor === undefined) return;
    let state;
    try {
      state = session.saveState();
    } catch (error) {
      console.error("tether: saveState failed", error);
      this.forget(session.name);
      return;
    }
    this._write(session, { cursor: session.cursor, state, time: Date.now() });
  }

  _write(session, value) {
    try {
      this.storage.setItem(this._storageKey(session.name), JSON.stringify(value));
    } catch {
      // Quota exceeded (or storage gone): a cursor without its state would lose text on
      // restore, so forget both; the next load replays from the start instead.
      this.forget(session.name);
    }
  }

  // --- internals: connection loop ---

  _setState(state, info = {}) {
    const changed = state !== this._state || JSON.stringify(info) !== JSON.stringify(this._info);
    this._state = state;
    this._info = info;
    if (changed) this._emitter.emit("state", state, { ...info });
  }

  _permanent(code) {
    if (code === CloseCode.TOKEN_EXPIRED && typeof this._token === "function") return false;
    return !shouldReconnect(code);
  }

  _offline() {
    return this._watchNetwork && globalThis.navigator?.onLine === false;
  }

  _sleep(ms) {
    return new Promise((resolve) => {
      const timer = setTimeout(done, ms);
      const self = this;
      function done() {
        clearTimeout(timer);
        if (self._wake === done) self._wake = null;
        resolve();
      }
      this._wake = done;
    });
  }

  async _run() {
    let attempt = 0;
    let error = null;
    try {
      while (!this._closing) {
        if (this._offline()) {
          // No network: do not burn attempts; the `online` event (or the cap, in case it is
          // missed) wakes us.
          this._setState(this._state === ConnectionState.CONNECTING ? ConnectionState.CONNECTING : ConnectionState.RECONNECTING,
            { attempt, offline: true, retryAt: null, reason: "offline" });
          await this._sleep(this.backoffCap);
          if (this._closing) break;
        }
        if (this._state === ConnectionState.RECONNECTING) {
          this._setState(ConnectionState.RECONNECTING, { attempt, connecting: true, retryAt: null, reason: this._info.reason ?? "" });
        }
        const { code, reason, welcomed } = await this._connectOnce();
        if (this._closing) break;
        if (this._fatal) {
          error = this._fatal;
          break;
        }
        if (welcomed) attempt = 0;
        if (code !== null && this._permanent(code)) {
          error = new ConnectionFailed(code, reason);
          break;
        }
        if (this.maxAttempts !== null && attempt >= this.maxAttempts) {
          error = new ConnectionFailed(code, `gave up after ${attempt + 1} attempts: ${reason}`);
          break;
        }
        // A server shedding load says when to come back: its delay (plus up to 20 % jitter)
        // replaces the backoff, which would bring the whole crowd back sooner.
        const after = code === CloseCode.TRY_AGAIN_LATER ? retryAfterFromReason(reason) : null;
        const delay = this._offline() ? 0
          : after !== null ? after * (1 + 0.2 * this._random())
            : backoffDelay(attempt, this.backoffBase, this.backoffCap, this._random);
        attempt += 1;
        this._setState(ConnectionState.RECONNECTING, {
          attempt, delay, retryAt: Date.now() + delay, reason, code, offline: this._offline(),
        });
        if (delay > 0) await this._sleep(delay);
      }
    } catch (exc) {
      console.error("tether: client loop failed", exc);
      error = new ConnectionFailed(null, `client loop failed: ${exc}`);
    } finally {
      this._finish(error ?? new ClientClosed("the client is closed"));
    }
  }

  async _resolveToken() {
    const source = this._token;
    if (source === null || source === undefined || typeof source === "string") return source ?? null;
    const value = await source();
    if (typeof value !== "string") throw new TypeError("the token function must return a string");
    return value;
  }

  _connectOnce() {
    return new Promise((resolve) => {
      const conn = { ws: null, welcomed: false, dropped: null, heartbeat: null, watchdog: null, done: null };
      let finished = false;
      const finish = (code, reason) => {
        if (finished) return;
        finished = true;
        clearTimeout(conn.watchdog);
        if (conn.ws) {
          conn.ws.onopen = conn.ws.onmessage = conn.ws.onerror = conn.ws.onclose = null;
        }
        if (this._conn === conn) this._conn = null;
        for (const outcome of this._proto.connectionLost()) this._apply(conn, outcome);
        if (conn.dropped !== null) resolve({ code: null, reason: conn.dropped, welcomed: conn.welcomed });
        else resolve({ code, reason: reason || `closed with code ${code}`, welcomed: conn.welcomed });
      };
      conn.done = finish;
      this._resolveToken().then((token) => {
        if (this._closing) return finish(null, "closed by the application");
        let ws;
        try {
          ws = new this._WebSocket(this.url, [SUBPROTOCOL]);
        } catch (exc) {
          return finish(null, `connect failed: ${exc}`);
        }
        conn.ws = ws;
        this._conn = conn;
        conn.watchdog = setTimeout(() => this._drop(conn, "no welcome within connectTimeout"), this.connectTimeout);
        ws.onopen = () => {
          this._sendOn(conn, this._proto.hello(token));
        };
        ws.onmessage = (event) => this._onMessage(conn, event.data);
        ws.onerror = () => {}; // a close follows with the details we can get
        ws.onclose = (event) => finish(event.code === 1005 ? null : event.code, event.reason);
      }, (exc) => finish(null, `token source failed: ${exc}`));
    });
  }

  _onMessage(conn, data) {
    if (conn.heartbeat) conn.heartbeat.received(now());
    let frame;
    try {
      frame = JSON.parse(typeof data === "string" ? data : new TextDecoder().decode(data));
    } catch {
      console.warn("tether: undecodable frame");
      return;
    }
    if (!frame || typeof frame !== "object" || Array.isArray(frame)) return;
    for (const outcome of this._proto.receive(frame)) {
      if (this._conn !== conn) return; // dropped by an outcome (refused hello)
      this._apply(conn, outcome);
    }
  }

  _drop(conn, why) {
    if (conn.dropped === null) conn.dropped = why;
    try {
      conn.ws?.close(1000, why.slice(0, 100));
    } catch {
      // already closing
    }
    // Do not wait for a close handshake that may never come (offline): finish now and
    // ignore whatever the old socket delivers later.
    conn.done?.(null, why);
  }

  _startHeartbeat(conn, welcome) {
    const beat = typeof welcome.heartbeat === "number" ? welcome.heartbeat : 0;
    const timeout = this.heartbeatTimeout ?? (beat > 0 ? beat * 1000 + 5000 : 30000);
    conn.heartbeat = new Heartbeat(timeout, now());
    this._tickAfter(conn, timeout);
  }

  _tickAfter(conn, wait) {
    clearTimeout(conn.watchdog);
    conn.watchdog = setTimeout(() => {
      if (this._conn !== conn) return;
      const [action, next] = conn.heartbeat.poll(now());
      if (action === "drop") {
        this._drop(conn, "heartbeat timeout: nothing received after a ping");
        return;
      }
      if (action === "ping") this._sendPing(conn);
      this._tickAfter(conn, next);
    }, Math.max(wait, 50));
  }

  _sendPing(conn) {
    const pair = this._proto.ping();
    if (pair) this._sendOn(conn, pair[1]);
  }

  /** Check a connection that may have died silently (page visible again, device woke up):
   * ping now and drop it if nothing arrives within `deadline` ms. */
  _probe(deadline = 5000) {
    const conn = this._conn;
    if (!conn?.heartbeat) return;
    conn.heartbeat.probe(now(), deadline);
    this._sendPing(conn);
    this._tickAfter(conn, deadline);
  }

  _send(frame) {
    const conn = this._conn;
    if (conn) this._sendOn(conn, frame);
    // No connection: the protocol state re-sends what matters after the next welcome.
  }

  _sendOn(conn, frame) {
    const ws = conn.ws;
    if (!ws || ws.readyState !== 1) return;
    try {
      ws.send(JSON.stringify(frame));
    } catch (exc) {
      this._drop(conn, `send failed: ${exc}`);
    }
  }

  // --- internals: outcomes ---

  _apply(conn, outcome) {
    switch (outcome.kind) {
      case "send":
        this._sendOn(conn, outcome.frame);
        break;
      case "welcomed": {
        this.welcome = outcome.frame;
        conn.welcomed = true;
        this._startHeartbeat(conn, outcome.frame);
        this._setState(ConnectionState.CONNECTED, {});
        settle(this._connectedOnce, null);
        this._emitter.emit("welcome", outcome.frame);
        break;
      }
      case "deliver":
        this._sessions.get(outcome.session)?._deliver(outcome.item);
        break;
      case "attached": {
        const session = this._sessions.get(outcome.session);
        if (session) {
          session.resumed = outcome.resumed;
          session._fromStorage = false;
          settle(session._ready, null, session);
          session._emitter.emit("attached", { resumed: outcome.resumed, cursor: outcome.cursor, reason: outcome.reason });
        }
        break;
      }
      case "attachFailed":
        this._onAttachFailed(outcome);
        break;
      case "completed": {
        const waiter = this._waiters.get(outcome.id);
        if (waiter) {
          this._waiters.delete(outcome.id);
          settle(waiter.d, null, outcome);
        }
        break;
      }
      case "failed":
        this._onFailed(outcome);
        break;
      case "retryLater":
        this._onRetryLater(outcome);
        break;
      case "presence": {
        const session = this._sessions.get(outcome.session);
        session?._emitter.emit("presence", outcome.action, outcome.members, session);
        break;
      }
      case "notice":
        if (!this._emitter.emit("notice", outcome.frame)) {
          console.warn("tether: unexpected frame from server", outcome.frame);
        }
        break;
      default:
        break;
    }
  }

  _onFailed(outcome) {
    const waiter = this._waiters.get(outcome.id);
    if (!waiter) {
      const conn = this._conn;
      if (conn && !conn.welcomed) {
        // Only hello has no waiter before welcome: the server refused our hello.
        this._fatal = new ConnectionFailed(null, `hello refused: ${outcome.code}: ${outcome.message}`);
        this._drop(conn, "hello refused");
      }
      return;
    }
    this._waiters.delete(outcome.id);
    const ErrorClass = waiter.kind === "publish" ? PublishError : RequestFailed;
    settle(waiter.d, new ErrorClass(outcome.code, outcome.message));
  }

  _onAttachFailed(outcome) {
    const session = this._sessions.get(outcome.session);
    if (!session) return;
    if (session._fromStorage && outcome.code === "bad_cursor") {
      // The cursor saved before a refresh no longer fits the log (a server reset, another
      // server): forget it and start over, announced by a snapshot so state is rebuilt.
      const previous = session.cursor;
      session._fromStorage = false;
      this.forget(session.name);
      session._deliver(makeSnapshot(session.name, null, "cursor_rejected", previous, [], []));
      const frame = this._proto.attach(session.name, null, null);
      if (frame) this._send(frame);
      return;
    }
    this._sessions.delete(outcome.session);
    const error = new AttachError(outcome.code, outcome.message);
    if (!session._ready.settled) settle(session._ready, error);
    session._finish(error);
  }

  _onRetryLater(outcome) {
    if (this.maxAttempts !== null && outcome.attempt >= this.maxAttempts) {
      this._applyNow(this._proto.giveUp(outcome));
      return;
    }
    const delay = outcome.retryAfter ?? backoffDelay(outcome.attempt, this.backoffBase, this.backoffCap, this._random);
    const timer = setTimeout(() => {
      this._timers.delete(timer);
      this._applyNow(this._proto.retry(outcome));
    }, delay);
    this._timers.add(timer);
  }

  /** Apply outcomes produced outside a received frame (a timer, a give-up). */
  _applyNow(outcomes) {
    for (const outcome of outcomes) {
      if (outcome.kind === "send") this._send(outcome.frame);
      else this._apply(this._conn, outcome);
    }
  }

  _finish(error) {
    if (!this._error) this._error = error;
    this._closing = true;
    for (const timer of this._timers) clearTimeout(timer);
    this._timers.clear();
    for (const waiter of this._waiters.values()) settle(waiter.d, error);
    this._waiters.clear();
    const iteratorError = error instanceof ClientClosed ? null : error;
    for (const session of this._sessions.values()) {
      this._flushPersist(session);
      settle(session._ready, error);
      session._finish(iteratorError);
    }
    if (this._connectedOnce) settle(this._connectedOnce, error);
    for (const cleanup of this._cleanups.splice(0)) cleanup();
    this._setState(ConnectionState.CLOSED, error instanceof ClientClosed ? {} : { reason: error.message, code: error.closeCode ?? null });
  }

  _installWatchers() {
    if (!this._watchNetwork) return;
    const win = typeof window !== "undefined" ? window : null;
    const doc = typeof document !== "undefined" ? document : null;
    const listen = (target, type, fn) => {
      target.addEventListener(type, fn);
      this._cleanups.push(() => target.removeEventListener(type, fn));
    };
    if (win?.addEventListener) {
      listen(win, "offline", () => {
        // The browser knows the network is gone; the socket may look open for minutes while
        // holding frames back. Drop it now and wait for `online`.
        if (this._conn) this._drop(this._conn, "the browser went offline");
      });
      listen(win, "online", () => this.reconnectNow());
      listen(win, "pagehide", () => {
        for (const session of this._sessions.values()) this._flushPersist(session);
      });
    }
    if (doc?.addEventListener) {
      listen(doc, "visibilitychange", () => {
        if (doc.visibilityState === "hidden") {
          for (const session of this._sessions.values()) this._flushPersist(session);
        } else if (this._state === ConnectionState.RECONNECTING) {
          this.reconnectNow();
        } else if (this._state === ConnectionState.CONNECTED) {
          this._probe();
        }
      });
    }
  }
}

// --- TetherChatTransport: the Vercel AI SDK's ChatTransport over a session --------------------

const FINAL_RUN_STATES = new Set(["completed", "failed", "cancelled"]);
const AWAITING_RUN_STATES = new Set(["awaiting_tool", "awaiting_approval"]);

/** The text of a UI message: its text parts, joined. */
function uiMessageText(message) {
  const parts = Array.isArray(message?.parts) ? message.parts : [];
  return parts.filter((p) => p && p.type === "text" && typeof p.text === "string").map((p) => p.text).join("");
}

const SHA256_K = new Uint32Array([
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
]);

/** SHA-256 of a string's UTF-8 bytes, as hex (synchronous: crypto.subtle is async and absent
 * outside secure contexts). */
function sha256Hex(text) {
  const bytes = new TextEncoder().encode(text);
  const length = ((bytes.length + 9 + 63) >> 6) << 6;
  const buffer = new Uint8Array(length);
  buffer.set(bytes);
  buffer[bytes.length] = 0x80;
  const view = new DataView(buffer.buffer);
  view.setUint32(length - 8, Math.floor(bytes.length / 0x20000000));
  view.setUint32(length - 4, (bytes.length << 3) >>> 0);
  const h = new Uint32Array([0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19]);
  const w = new Uint32Array(64);
  const rotr = (x, n) => (x >>> n) | (x << (32 - n));
  for (let offset = 0; offset < length; offset += 64) {
    for (let i = 0; i < 16; i++) w[i] = view.getUint32(offset + i * 4);
    for (let i = 16; i < 64; i++) {
      const s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >>> 3);
      const s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >>> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    let [a, b, c, d, e, f, g, k] = h;
    for (let i = 0; i < 64; i++) {
      const t1 = k + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + SHA256_K[i] + w[i];
      const t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      k = g; g = f; f = e; e = (d + t1) >>> 0; d = c; c = b; b = a; a = (t1 + t2) >>> 0;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += k;
  }
  return [...h].map((x) => x.toString(16).padStart(8, "0")).join("");
}

/** The idempotency key of a person's UI message, as tether's /v1/ai-sdk/chat endpoint makes
 * it: the same message sent over either transport is recorded once. */
function uiMessageKey(id, text) {
  return `ai-sdk:${id}:${sha256Hex(text).slice(0, 16)}`;
}

function isToolPart(part) {
  return part && typeof part.type === "string" && (part.type === "dynamic-tool" || part.type.startsWith("tool-"));
}

/** One run as the AI SDK sees it: an assistant message (id = the run id) made of UI message
 * chunks. `chunks` is the whole reply from its `start`, so a reader that comes late (a reload,
 * a second tab) replays it and then follows live: no text is lost or repeated. */
class ChatRun {
  constructor(id, messageSeq) {
    this.id = id;
    this.messageSeq = messageSeq; // seq of the `message` event that started it, or null
    this.state = "queued";
    this.phase = 0; // +1 each time the run goes on after waiting for a person
    this.paused = false; // awaiting a tool result or an approval
    this.final = false;
    this.superseded = false; // a regenerated answer replaced it in the message list
    this.chunks = [{ type: "start", messageId: id }, { type: "start-step" }];
    this.stepEnded = false; // tool results came in: the model's next output is a new step
    this.sinks = new Set();
    this.streams = new Map(); // stream id → {text, ended}
    this.calls = new Map(); // call id → {name, target, approval, done}
  }
}

/** A stream handed to the AI SDK: chunks in, closed at a pause, the end, an abort. */
class ChunkSink {
  constructor(abortSignal, onClose) {
    this.closed = false;
    this.run = null;
    this._onClose = onClose;
    this.stream = new ReadableStream({
      start: (controller) => {
        this.controller = controller;
      },
      cancel: () => this.close(false),
    });
    if (abortSignal) {
      if (abortSignal.aborted) this.close();
      else abortSignal.addEventListener("abort", () => this.close(), { once: true });
    }
  }

  push(chunk) {
    if (this.closed) return;
    try {
      this.controller.enqueue(chunk);
    } catch {
      this.close(false);
    }
  }

  close(closeStream = true) {
    if (this.closed) return;
    this.closed = true;
    this.run?.sinks.delete(this);
    this._onClose?.(this);
    if (closeStream) {
      try {
        this.controller.close();
      } catch {
        // already closed or cancelled by the reader
      }
    }
  }
}

/** A chat's session folded into runs and user messages, kept current from its live events. */
class ChatFeed {
  constructor(transport, chatId) {
    this.transport = transport;
    this.chatId = chatId;
    this.session = null;
    this.listeners = new Set();
    this.delivered = new Set(); // `${run}:${phase}` handed to the SDK as a stream
    this.pendingIds = new Map(); // UI message id → sink waiting for the run it starts
    this.pendingSeqs = new Map(); // message seq → sink
    this._lastItemAt = 0;
    this._serverTime = null;
    this._caughtUp = false;
    this._reset();
    this.attached = this._attach();
    this.attached.catch(() => {});
    this.ready = this.attached.then(() => this._settle());
    this.ready.catch(() => {});
  }

  _reset() {
    this.entries = []; // in log order: {kind: "user", id, text, seq} | {kind: "run", run}
    this.users = new Map(); // UI message id → entry
    this.userBySeq = new Map();
    this.runs = new Map();
    this.runBySeq = new Map();
  }

  async _attach() {
    const { client } = this.transport;
    if (client.session(this.chatId)) {
      throw new TetherError(`session ${this.chatId} is already attached on this client: give TetherChatTransport a client of its own`);
    }
    this.session = await client.attach(this.chatId, {
      cursor: null, // the whole log: the replies of earlier runs and the active one from its start
      onEvent: (item) => this._receive(item),
    });
    this._lastItemAt = Math.max(this._lastItemAt, now()); // the replay starts after attached
    return this.session;
  }

  /** Resolves once the replay of the log is over. The protocol does not mark its end, so: an
   * event committed after the attach (by the server's clock, from a ping) has arrived — all
   * before it were delivered — or nothing arrived for `settleTime` ms. */
  async _settle() {
    const { client, settleTime } = this.transport;
    try {
      const pair = client._proto.ping();
      if (pair) {
        const pong = await client._request(pair[0], pair[1], "ping", null);
        if (Number.isFinite(pong?.value)) this._serverTime = pong.value;
      }
    } catch {
      // no server time: rely on the quiet period alone
    }
    for (;;) {
      if (this._caughtUp) return;
      const since = now() - this._lastItemAt;
      if (since >= settleTime) return;
      await new Promise((resolve) => setTimeout(resolve, Math.min(settleTime - since, 25)));
    }
  }

  _receive(item) {
    this._lastItemAt = now();
    if (this._serverTime !== null && !item.transient && item.time >= this._serverTime) this._caughtUp = true;
    if (item.snapshot) {
      // Continuity lost: rebuild from the snapshot; open streams end (followers resume).
      for (const run of this.runs.values()) for (const sink of [...run.sinks]) sink.close();
      this._reset();
      for (const event of item.events) this._apply(event);
    } else {
      this._apply(item);
    }
    for (const listener of [...this.listeners]) {
      try {
        listener(item);
      } catch (error) {
        console.error("tether: a chat listener failed", error);
      }
    }
  }

  _run(id) {
    let run = this.runs.get(id);
    if (!run) { // its run.created is older than the snapshot
      run = new ChatRun(id, null);
      run.state = "running";
      this.runs.set(id, run);
      this.entries.push({ kind: "run", run });
    }
    return run;
  }

  _emit(run, chunk) {
    run.chunks.push(chunk);
    for (const sink of [...run.sinks]) sink.push(chunk);
  }

  /** End the streams reading `run` with these chunks. */
  _endSinks(run, chunks) {
    for (const sink of [...run.sinks]) {
      for (const chunk of chunks) sink.push(chunk);
      sink.close();
    }
  }

  _apply(event) {
    if (event.transient) return;
    const data = event.data && typeof event.data === "object" ? event.data : {};
    const type = event.type;
    if (type === "message") {
      if (event.sender.kind === "agent") return;
      const text = typeof event.data === "string" ? event.data : String(data.text ?? "");
      const given = typeof data.message_id === "string" ? data.message_id : data.id;
      const id = typeof given === "string" && given ? given : `msg-${event.seq}`;
      const existing = this.users.get(id);
      let entry = existing;
      if (existing && data.regenerate === true) {
        for (const run of this.runs.values()) {
          if (run.messageSeq !== null && this.userBySeq.get(run.messageSeq) === existing) run.superseded = true;
        }
      } else if (!existing) {
        entry = { kind: "user", id, text, seq: event.seq };
        this.users.set(id, entry);
        this.entries.push(entry);
      }
      this.userBySeq.set(event.seq, entry);
      const sink = this.pendingIds.get(id);
      if (sink) {
        this.pendingIds.delete(id);
        this.pendingSeqs.set(event.seq, sink);
      }
      return;
    }
    if (type === "ai-sdk.superseded") {
      // A regenerate over /v1/ai-sdk/chat: the old answer leaves the message list.
      const old = typeof data.superseded === "string" ? this.runs.get(data.superseded) : null;
      if (old) old.superseded = true;
      return;
    }
    if (type === "run.created") {
      if (typeof data.run !== "string") return;
      const seq = Number.isInteger(data.input?.message_seq) ? data.input.message_seq : null;
      const run = new ChatRun(data.run, data.trigger === "message" ? seq : null);
      this.runs.set(run.id, run);
      this.entries.push({ kind: "run", run });
      if (run.messageSeq !== null) {
        this.runBySeq.set(run.messageSeq, run);
        const sink = this.pendingSeqs.get(run.messageSeq);
        if (sink) {
          this.pendingSeqs.delete(run.messageSeq);
          this.follow(run, sink, 0);
        }
      }
      return;
    }
    if (typeof data.run !== "string") return;
    const run = this._run(data.run);
    if (run.final) return;
    switch (type) {
      case "run.state": {
        const state = String(data.state ?? "");
        run.state = state;
        this._emit(run, { type: "data-tether-run", id: run.id, data: { run: run.id, state }, transient: true });
        if (FINAL_RUN_STATES.has(state)) {
          this._finish(run, state, data.error);
        } else if (AWAITING_RUN_STATES.has(state)) {
          run.paused = true;
          // The AI SDK ends a response where it waits for the user; the run goes on later.
          this._endSinks(run, [{ type: "finish", finishReason: "tool-calls" }]);
        } else if (state === "running" && run.paused) {
          run.paused = false;
          run.phase += 1;
        }
        break;
      }
      case "stream.append":
      case "stream.end": {
        const id = String(data.stream ?? "");
        let stream = run.streams.get(id);
        if (!stream) {
          stream = { text: "", ended: false };
          run.streams.set(id, stream);
          this._step(run);
          this._emit(run, { type: "text-start", id });
        }
        if (stream.ended) break;
        const text = typeof data.text === "string" ? data.text : "";
        if (type === "stream.append") {
          if (text) {
            stream.text += text;
            this._emit(run, { type: "text-delta", id, delta: text });
          }
        } else {
          // A stream seen only by its end (a snapshot) carries its whole text.
          if (text.length > stream.text.length && text.startsWith(stream.text)) {
            this._emit(run, { type: "text-delta", id, delta: text.slice(stream.text.length) });
            stream.text = text;
          }
          stream.ended = true;
          this._emit(run, { type: "text-end", id });
        }
        break;
      }
      case "tool.call":
      case "approval.request": {
        const call = String(data.call ?? "");
        let known = run.calls.get(call);
        if (!known) {
          const server = type === "approval.request" || data.target !== "client";
          known = { name: String(data.name ?? ""), client: !server, approval: false, done: false };
          run.calls.set(call, known);
          this._step(run);
          this._emit(run, {
            type: "tool-input-available", toolCallId: call, toolName: known.name,
            input: data.arguments ?? {}, dynamic: true, providerExecuted: server,
          });
        }
        if (type === "approval.request") {
          known.approval = true;
          this._emit(run, { type: "tool-approval-request", approvalId: call, toolCallId: call });
        }
        break;
      }
      case "approval.decision": {
        const call = String(data.call ?? "");
        const known = run.calls.get(call);
        if (!known) break;
        known.approval = false;
        const approved = data.decision === "approve";
        this._emit(run, { type: "tool-approval-response", approvalId: call, approved, ...(approved ? {} : { reason: String(data.decision) }) });
        if (!approved) {
          known.done = true;
          run.stepEnded = true;
          this._emit(run, { type: "tool-output-denied", toolCallId: call });
        }
        break;
      }
      case "tool.result": {
        const call = String(data.call ?? "");
        const known = run.calls.get(call);
        if (!known || known.done) break;
        known.done = true;
        run.stepEnded = true;
        if ("result" in data) this._emit(run, { type: "tool-output-available", toolCallId: call, output: data.result, dynamic: true });
        else this._emit(run, { type: "tool-output-error", toolCallId: call, errorText: String(data.error ?? "failed"), dynamic: true });
        break;
      }
      default:
        break;
    }
  }

  /** Steps as the AI SDK has them (`lastAssistantMessageIsCompleteWith…` look at the last one):
   * what follows tool results is the model's next step. */
  _step(run) {
    if (!run.stepEnded) return;
    run.stepEnded = false;
    this._emit(run, { type: "finish-step" });
    this._emit(run, { type: "start-step" });
  }

  _finish(run, state, error) {
    run.final = true;
    run.paused = false;
    const end = [];
    if (state === "failed") end.push({ type: "error", errorText: String(error || "the run failed") });
    end.push({ type: "finish", finishReason: state === "completed" ? "stop" : state === "cancelled" ? "interrupted" : "error" });
    for (const chunk of end) run.chunks.push(chunk);
    this._endSinks(run, end);
    run.chunks = compactChunks(run.chunks);
  }

  /** Hand `sink` the chunks of `run` from `from` on, then the live ones. */
  follow(run, sink, from) {
    if (sink.closed) return;
    sink.run = run;
    this.delivered.add(`${run.id}:${run.phase}`);
    for (const chunk of run.chunks.slice(from)) sink.push(chunk);
    if (run.final) sink.close();
    else if (run.paused && from === 0) {
      sink.push({ type: "finish", finishReason: "tool-calls" });
      sink.close();
    } else run.sinks.add(sink);
  }

  /** The run a reader should see now: the first one not finished (queued ones follow it). */
  current() {
    for (const entry of this.entries) {
      if (entry.kind === "run" && !entry.run.final) return entry.run;
    }
    return null;
  }

  uiMessages() {
    const messages = [];
    for (const entry of this.entries) {
      if (entry.kind === "user") {
        messages.push({ id: entry.id, role: "user", parts: [{ type: "text", text: entry.text }] });
      } else if (!entry.run.superseded) {
        messages.push({ id: entry.run.id, role: "assistant", parts: partsFromChunks(entry.run.chunks) });
      }
    }
    return messages;
  }
}

/** Merge consecutive text deltas of one part (a finished run's reply kept for replays). */
function compactChunks(chunks) {
  const out = [];
  for (const chunk of chunks) {
    const last = out[out.length - 1];
    if (chunk.type === "text-delta" && last?.type === "text-delta" && last.id === chunk.id) {
      out[out.length - 1] = { ...last, delta: last.delta + chunk.delta };
    } else if (!(chunk.type && chunk.type.startsWith("data-") && chunk.transient)) {
      out.push(chunk);
    }
  }
  return out;
}

/** The parts of the assistant message that `chunks` build (what the AI SDK would show). */
function partsFromChunks(chunks) {
  const parts = [];
  const texts = new Map();
  const tools = new Map();
  for (const chunk of chunks) {
    switch (chunk.type) {
      case "start-step":
        parts.push({ type: "step-start" });
        break;
      case "text-start": {
        const part = { type: "text", text: "", state: "streaming" };
        texts.set(chunk.id, part);
        parts.push(part);
        break;
      }
      case "text-delta":
        if (texts.has(chunk.id)) texts.get(chunk.id).text += chunk.delta;
        break;
      case "text-end":
        if (texts.has(chunk.id)) texts.get(chunk.id).state = "done";
        break;
      case "tool-input-available": {
        const part = {
          type: "dynamic-tool", toolName: chunk.toolName, toolCallId: chunk.toolCallId,
          state: "input-available", input: chunk.input, providerExecuted: chunk.providerExecuted,
        };
        tools.set(chunk.toolCallId, part);
        parts.push(part);
        break;
      }
      case "tool-approval-request": {
        const part = tools.get(chunk.toolCallId);
        if (part) Object.assign(part, { state: "approval-requested", approval: { id: chunk.approvalId } });
        break;
      }
      case "tool-approval-response": {
        const part = tools.get(chunk.approvalId);
        if (part) Object.assign(part, { state: "approval-responded", approval: { id: chunk.approvalId, approved: chunk.approved } });
        break;
      }
      case "tool-output-available": {
        const part = tools.get(chunk.toolCallId);
        if (part) Object.assign(part, { state: "output-available", output: chunk.output });
        break;
      }
      case "tool-output-error": {
        const part = tools.get(chunk.toolCallId);
        if (part) Object.assign(part, { state: "output-error", errorText: chunk.errorText });
        break;
      }
      case "tool-output-denied": {
        const part = tools.get(chunk.toolCallId);
        if (part) part.state = "output-denied";
        break;
      }
      default:
        break;
    }
  }
  return parts;
}

/**
 * A `ChatTransport` of the Vercel AI SDK (`ai` 5+, `useChat`, `Chat`, `AbstractChat`) over a
 * tether session: the chat id is the session. `sendMessages` publishes the new user message
 * (`message` event, idempotency key = the UI message id) and streams the reply of the run it
 * starts as UI message chunks; `reconnectToStream` replays the active run's reply from its
 * `start` (`resumeStreamIsReplay`), or returns null when no run is active. Everything rides
 * the session's WebSocket, so every tab and person on a chat sees every message and reply
 * live; `follow(chat)` brings those into a chat that did not send them. Plain JavaScript: it
 * imports nothing from `ai`.
 */
export class TetherChatTransport {
  constructor(options = {}) {
    const { client = null, url = null, startTimeout = 30000, settleTime = 150, ...clientOptions } = options;
    if (client) {
      this.client = client;
      this._ownsClient = false;
    } else {
      if (!url) throw new TypeError("TetherChatTransport needs { client } or { url, token }");
      this.client = new Client(url, { storage: null, ...clientOptions });
      this._ownsClient = true;
    }
    /** Replays the active reply from its `start`: the chat resets the message it resumes. */
    this.resumeStreamIsReplay = true;
    this.startTimeout = startTimeout;
    this.settleTime = settleTime;
    this._feeds = new Map();
  }

  _feed(chatId) {
    let feed = this._feeds.get(chatId);
    if (!feed) {
      feed = new ChatFeed(this, chatId);
      this._feeds.set(chatId, feed);
      feed.attached.catch(() => {
        if (this._feeds.get(chatId) === feed) this._feeds.delete(chatId);
      });
    }
    return feed;
  }

  /** The tether session of a chat (attached on first use). */
  async session(chatId) {
    return this._feed(chatId).attached;
  }

  /** The chat's messages as UI messages, from the session log (for the initial load). */
  async messages(chatId) {
    const feed = this._feed(chatId);
    await feed.ready;
    return feed.uiMessages();
  }

  /** The id of the run a reader sees now (see `reconnectToStream`), or null. */
  async activeRun(chatId) {
    const feed = this._feed(chatId);
    await feed.ready;
    return feed.current()?.id ?? null;
  }

  async sendMessages({ chatId, messages, trigger, messageId, abortSignal }) {
    const feed = this._feed(chatId);
    const session = await feed.attached;
    const last = messages[messages.length - 1];
    if (!last) throw new TetherError("sendMessages needs at least one message");
    if (last.role === "assistant") return this._continue(feed, session, last, abortSignal);
    const sink = new ChunkSink(abortSignal, () => {
      if (feed.pendingIds.get(last.id) === sink) feed.pendingIds.delete(last.id);
      for (const [seq, waiting] of feed.pendingSeqs) if (waiting === sink) feed.pendingSeqs.delete(seq);
      clearTimeout(timer);
    });
    let timer = null;
    const regenerate = trigger === "regenerate-message";
    // Recorded as tether's /v1/ai-sdk/chat endpoint records it, so both transports share a chat.
    const text = uiMessageText(last);
    const data = { text, message_id: last.id };
    if (regenerate) data.regenerate = true;
    feed.pendingIds.set(last.id, sink);
    const key = regenerate ? `ai-sdk:${last.id}:${newKey()}` : uiMessageKey(last.id, text);
    const cursor = await session.publish("message", data, { key });
    const seq = parseCursor(cursor).seq;
    if (!sink.closed && !sink.run) {
      const run = feed.runBySeq.get(seq); // a duplicate: the message was sent before
      if (run) {
        feed.pendingIds.delete(last.id);
        feed.follow(run, sink, 0);
      } else if (this.startTimeout > 0) {
        timer = setTimeout(() => {
          if (sink.run || sink.closed) return;
          sink.push({ type: "error", errorText: `no run started for message ${last.id} in ${chatId} (is an agent serving it?)` });
          sink.close();
        }, this.startTimeout);
      }
    }
    return sink.stream;
  }

  /** The last message is the assistant's (a tool output or an approval added in the chat):
   * publish the answers the run waits for, then follow the run from here. */
  async _continue(feed, session, message, abortSignal) {
    const run = feed.runs.get(message.id);
    const sink = new ChunkSink(abortSignal);
    if (!run || run.final) {
      sink.push({ type: "finish", finishReason: "stop" });
      sink.close();
      return sink.stream;
    }
    feed.follow(run, sink, run.chunks.length);
    feed.delivered.add(`${run.id}:${run.phase + 1}`);
    const answers = [];
    for (const part of message.parts ?? []) {
      if (!isToolPart(part)) continue;
      const call = run.calls.get(part.toolCallId);
      if (!call || call.done) continue;
      if (call.approval && part.state === "approval-responded" && part.approval) {
        answers.push(part.approval.approved ? session.approve(run.id, part.toolCallId) : session.reject(run.id, part.toolCallId));
      } else if (call.client && part.state === "output-available") {
        answers.push(session.answerTool(run.id, part.toolCallId, part.output ?? null));
      } else if (call.client && part.state === "output-error") {
        answers.push(session.answerTool(run.id, part.toolCallId, null, { error: part.errorText ?? "failed" }));
      }
    }
    const results = await Promise.allSettled(answers);
    for (const result of results) {
      // Another tab or person answered first: the run goes on with their answer.
      if (result.status === "rejected" && result.reason?.code !== "already_decided") throw result.reason;
    }
    return sink.stream;
  }

  async reconnectToStream({ chatId, abortSignal }) {
    const feed = this._feed(chatId);
    await feed.ready;
    const run = feed.current();
    if (!run || abortSignal?.aborted) return null;
    const sink = new ChunkSink(abortSignal);
    feed.follow(run, sink, 0);
    return sink.stream;
  }

  /** Stop the chat's active run for everyone (`run.cancel`); `chat.stop()` only stops reading. */
  async stop(chatId, reason = "stopped") {
    const feed = this._feed(chatId);
    const session = await feed.attached;
    const run = feed.current();
    if (!run) return null;
    try {
      return await session.cancelRun(run.id, reason);
    } catch (error) {
      if (error?.code === "run_finished") return null;
      throw error;
    }
  }

  /**
   * Keep an AI SDK chat (`Chat` of `@ai-sdk/react`, any `AbstractChat`) in step with its
   * session: loads the history into an empty chat, adds the messages others send, and resumes
   * a run's reply whenever one this chat is not reading starts or goes on (a run started from
   * another tab, or by a person answering an approval elsewhere). Returns a function that stops.
   */
  follow(chat, { loadMessages = true, retryInterval = 100 } = {}) {
    const feed = this._feed(chat.id);
    let stopped = false;
    let timer = null;
    let ready = false;
    const busy = () => chat.status === "submitted" || chat.status === "streaming";
    const check = () => {
      timer = null;
      if (stopped || !ready) return;
      const known = new Set(chat.messages.map((m) => m.id));
      const missing = feed.uiMessages().filter((m) => m.role === "user" && !known.has(m.id));
      if (missing.length) chat.messages = [...chat.messages, ...missing];
      const run = feed.current();
      if (run && !feed.delivered.has(`${run.id}:${run.phase}`)) {
        if (busy()) {
          timer = setTimeout(check, retryInterval);
        } else {
          feed.delivered.add(`${run.id}:${run.phase}`);
          Promise.resolve(chat.resumeStream()).catch((error) => console.error("tether: resumeStream failed", error));
        }
      }
    };
    const listener = () => {
      if (!timer) timer = setTimeout(check, 0);
    };
    feed.listeners.add(listener);
    feed.ready.then(() => {
      if (stopped) return;
      ready = true;
      if (loadMessages && chat.messages.length === 0 && !busy()) chat.messages = feed.uiMessages();
      check();
    }, (error) => console.error(`tether: could not follow ${chat.id}`, error));
    return () => {
      stopped = true;
      clearTimeout(timer);
      feed.listeners.delete(listener);
    };
  }

  /** Stop reading every chat; closes the client if the transport made it. */
  close() {
    for (const feed of this._feeds.values()) {
      for (const run of feed.runs.values()) for (const sink of [...run.sinks]) sink.close();
      feed.listeners.clear();
    }
    this._feeds.clear();
    if (this._ownsClient) this.client.close();
  }
}

export default Client;
