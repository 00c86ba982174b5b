// Type declarations for tether.js, the browser (and Node) SDK of the tether wire protocol v1.
// Times are in milliseconds. Documentation: docs/web.md.

export const VERSION: string;
export const SUBPROTOCOL: "tether.v1.json";
export const WS_PATH: "/v1/ws";
export const SNAPSHOT_TYPE: "tether.snapshot";

export type ConnectionStateName = "connecting" | "connected" | "reconnecting" | "closed";

export const ConnectionState: Readonly<{
  CONNECTING: "connecting";
  CONNECTED: "connected";
  RECONNECTING: "reconnecting";
  CLOSED: "closed";
}>;

export const CloseCode: Readonly<{
  SHUTDOWN: 4000;
  SLOW_CONSUMER: 4001;
  TOO_MANY_CONNECTIONS: 4002;
  TRY_AGAIN_LATER: 4003;
  UNAUTHORIZED: 4500;
  TOKEN_EXPIRED: 4501;
  HELLO_TIMEOUT: 4502;
  UNSUPPORTED_CODEC: 4503;
  TOO_MANY_ERRORS: 4504;
}>;

/** Whether a client should reconnect after a close with `code` (null: the socket dropped). */
export function shouldReconnect(code: number | null | undefined): boolean;
/** The delay, in ms, of a TRY_AGAIN_LATER close reason ("retry_after=SECONDS"), or null. */
export function retryAfterFromReason(reason: string | null | undefined): number | null;
/** Exponential backoff with full jitter: uniform(0, min(cap, base * 2**attempt)). */
export function backoffDelay(attempt: number, base: number, cap: number, random?: () => number): number;
/** Parse "{epoch}:{seq}"; throws a TypeError when malformed. */
export function parseCursor(text: string): { epoch: string; seq: number };
/** `ws://host:port` → `ws://host:port/v1/ws`; http(s) → ws(s); relative URLs use the page's. */
export function wsUrl(url: string): string;
/** A fresh idempotency key. */
export function newKey(): string;

export interface Sender {
  sub: string;
  client: string;
  kind: "human" | "agent" | "system" | string;
}

/** One event of a session. Transient events have `seq` 0 and `cursor` null. */
export interface SessionEvent {
  session: string;
  seq: number;
  cursor: string | null;
  epoch: string | null;
  type: string;
  data: any;
  sender: Sender;
  /** Milliseconds since the Unix epoch, assigned by the store at commit. */
  time: number;
  transient: boolean;
  /** The stream id of a `stream.append` / `stream.end` event, else null. */
  stream: string | null;
  snapshot: false;
}

/** Continuity was lost (`attached{resumed: false}`): discard what was derived from the old
 * cursor and rebuild from `events` and `presence`. Events after it continue from `cursor`.
 * `reason`: epoch_changed | cursor_expired | history_trimmed | cursor_rejected (a cursor saved
 * in storage that the server refused; `cursor` is then null and the log replays from the start). */
export interface Snapshot {
  session: string;
  seq: number;
  cursor: string | null;
  epoch: string | null;
  type: "tether.snapshot";
  data: { reason: string; previous: string | null; events: number };
  sender: Sender;
  time: number;
  transient: false;
  stream: null;
  snapshot: true;
  reason: string;
  previous: string | null;
  events: SessionEvent[];
  presence: PresenceMember[];
}

export type SessionItem = SessionEvent | Snapshot;

export interface PresenceMember {
  member: string;
  sub: string;
  client: string;
  device: string;
  kind: "human" | "agent" | string;
  tools: string[];
  state: Record<string, any>;
  since: number;
}

export type PresenceAction = "list" | "join" | "leave" | "update" | "set";

export interface StateInfo {
  /** Failed attempts so far in this outage. */
  attempt?: number;
  /** The backoff delay before the next attempt. */
  delay?: number;
  /** When the next attempt starts (Date.now() clock), or null while waiting for the network. */
  retryAt?: number | null;
  /** An attempt is in progress. */
  connecting?: boolean;
  /** `navigator.onLine` is false: waiting for the `online` event. */
  offline?: boolean;
  reason?: string;
  code?: number | null;
}

export interface Saved {
  cursor: string | null;
  /** What `saveState` returned when the cursor was saved (absent without saveState). */
  state?: any;
  time: number;
}

/** Anything with getItem/setItem/removeItem: sessionStorage, localStorage, a Map wrapper. */
export interface StorageLike {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
  removeItem(key: string): void;
}

export type TokenSource = string | null | (() => string | Promise<string>);

export interface ClientOptions {
  /** A JWT, or a function called on every (re)connect (then 4501 token_expired reconnects). */
  token?: TokenSource;
  /** Stable for this object's lifetime (random by default). */
  clientId?: string;
  /** A label shown in presence ("Chrome on macOS"). */
  device?: string;
  kind?: "human" | "agent";
  /** Front-end tools this client can run (announced in hello and presence). */
  tools?: string[];
  /** Reconnects wait uniform(0, min(backoffCap, backoffBase * 2**attempt)) ms. Default 500. */
  backoffBase?: number;
  /** Default 8000. */
  backoffCap?: number;
  /** Failed attempts in a row before giving up; null (default) = never. */
  maxAttempts?: number | null;
  /** Idle ms before a `ping` frame, and again before dropping the socket.
   * Default: welcome.heartbeat + 5 s. */
  heartbeatTimeout?: number | null;
  /** No welcome within this many ms: drop and retry. Default 10000. */
  connectTimeout?: number;
  closeTimeout?: number;
  /** Where cursors (and saved state) are kept; default `sessionStorage` when available;
   * null disables persistence. */
  storage?: StorageLike | null;
  /** With `saveState`, cursor and state are saved at most this often (and on pagehide). */
  persistInterval?: number;
  /** A WebSocket constructor (default globalThis.WebSocket; in Node < 22 pass one from 'ws'). */
  WebSocket?: any;
  random?: () => number;
  /** Follow navigator.onLine and page visibility (default true). */
  watchNetwork?: boolean;
}

export interface AttachOptions {
  /** undefined: the cursor saved in storage, else from the start; null: from the start. */
  cursor?: string | null;
  /** Initial presence state, restored on every re-attach. */
  presence?: Record<string, any> | null;
  onEvent?: (item: SessionItem, session: Session) => void;
  onPresence?: (action: PresenceAction, members: PresenceMember[], session: Session) => void;
  onAttached?: (info: AttachedInfo) => void;
  /** Saved with the cursor (atomically) so a reload can restore both; read it back with
   * `client.saved(name).state` before attaching. */
  saveState?: () => any;
}

export interface AttachedInfo {
  resumed: boolean;
  cursor: string;
  reason: string | null;
}

export interface PublishOptions {
  /** Idempotency key (≤ 128 chars); a random one by default, reused on every re-send. */
  key?: string | null;
  /** Fan out without storing (typing indicators); resolves to null; best effort. */
  transient?: boolean;
}

export class TetherError extends Error {}
export class ConnectionFailed extends TetherError {
  closeCode: number | null;
  reason: string;
}
export class RequestFailed extends TetherError {
  code: string;
  detail: string;
}
export class PublishError extends RequestFailed {}
export class AttachError extends RequestFailed {}
export class ClientClosed extends TetherError {}
export class SessionClosed extends TetherError {}

export class Stream {
  readonly session: Session;
  readonly id: string;
  ended: boolean;
  append(text: string): Promise<string | null>;
  end(extra?: Record<string, any>): Promise<string | null>;
}

export class Session implements AsyncIterable<SessionItem> {
  readonly client: Client;
  readonly name: string;
  /** Cursor of the last item handed to the application. */
  cursor: string | null;
  /** The last (re-)attach's `resumed` flag (null until attached). */
  resumed: boolean | null;
  /** What attach read from storage, or null. */
  restored: Saved | null;
  /** Members present now, by member id. */
  readonly presence: Record<string, PresenceMember>;
  readonly members: PresenceMember[];
  /** Resolves with the committed cursor (null for transient events). Publishes pipelined on
   * one session commit in call order; after a temporary refusal (`rate_limited`,
   * `store_unavailable`) the session's publishes are held and re-sent one at a time in call
   * order, so only a publish already in flight behind the refused one can land ahead of it. */
  publish(type: string, data?: any, options?: PublishOptions): Promise<string | null>;
  stream(id?: string | null): Stream;
  /** Publish `run.cancel`. */
  cancelRun(run: string, reason?: string): Promise<string | null>;
  /** Publish `run.steer` (a message injected into the active run). */
  steer(run: string, text: string): Promise<string | null>;
  /** Publish `approval.decision` approve, optionally with edited arguments. */
  approve(run: string, call: string, args?: Record<string, any> | null): Promise<string | null>;
  reject(run: string, call: string): Promise<string | null>;
  /** Publish `tool.result` for a front-end tool call; the first valid answer wins. */
  answerTool(run: string, call: string, result?: any, options?: { error?: string | null }): Promise<string | null>;
  setPresence(state: Record<string, any>): Promise<void>;
  on(type: "event", callback: (item: SessionItem, session: Session) => void): () => void;
  on(type: "presence", callback: (action: PresenceAction, members: PresenceMember[], session: Session) => void): () => void;
  on(type: "attached", callback: (info: AttachedInfo) => void): () => void;
  on(type: "closed", callback: (error: Error | null) => void): () => void;
  onEvent(callback: (item: SessionItem, session: Session) => void): () => void;
  onPresence(callback: (action: PresenceAction, members: PresenceMember[], session: Session) => void): () => void;
  onAttached(callback: (info: AttachedInfo) => void): () => void;
  next(): Promise<SessionItem>;
  [Symbol.asyncIterator](): AsyncIterator<SessionItem>;
  detach(): Promise<void>;
}

export class Client {
  constructor(url: string, options?: ClientOptions);
  readonly url: string;
  readonly clientId: string;
  /** The last welcome frame: sub, caps, heartbeat, limits. */
  welcome: Record<string, any> | null;
  storage: StorageLike | null;
  readonly state: ConnectionStateName;
  readonly stateInfo: StateInfo;
  readonly sessions: Map<string, Session>;
  session(name: string): Session | undefined;
  on(type: "state", callback: (state: ConnectionStateName, info: StateInfo) => void): () => void;
  on(type: "welcome", callback: (frame: Record<string, any>) => void): () => void;
  on(type: "notice", callback: (frame: Record<string, any>) => void): () => void;
  onState(callback: (state: ConnectionStateName, info: StateInfo) => void): () => void;
  connect(): Promise<void>;
  attach(name: string, options?: AttachOptions): Promise<Session>;
  saved(name: string): Saved | null;
  forget(name: string): void;
  reconnectNow(): void;
  ping(): Promise<number>;
  close(): Promise<void>;
}

/** A temporary error: wait `retryAfter` ms (the server's, when it gave one) or the backoff, then
 * apply `ClientProtocol.retry(outcome)`; or `giveUp(outcome)` once the attempts are spent. */
export interface RetryLaterOutcome {
  kind: "retryLater";
  op: "attach" | "publish";
  id: number;
  attempt: number;
  code: string;
  message: string;
  /** The session of an attach, or of an ordered publish (whose retry resumes the session's
   * held publishes in call order); null for a transient publish or a run interrupt. */
  session: string | null;
  retryAfter: number | null;
}

/** The protocol state machine without I/O (advanced; used by tests). */
export class ClientProtocol {
  constructor(options: { clientId: string; device?: string; kind?: string; tools?: string[] });
  sessions: Map<string, any>;
  publishes: Map<number, any>;
  /** Sessions whose publishes are held after a temporary refusal: {backoff, head}. */
  retrying: Map<string, { backoff: boolean; head: number | null }>;
  connected: boolean;
  hello(token: string | null): Record<string, any>;
  connectionLost(): any[];
  attach(session: string, cursor?: string | null, presence?: Record<string, any> | null): Record<string, any> | null;
  detach(session: string): [number, Record<string, any> | null];
  publish(session: string, type: string, data: any, options?: PublishOptions): [number, Record<string, any> | null];
  setPresence(session: string, state: Record<string, any>): [number, Record<string, any> | null];
  ping(): [number, Record<string, any>] | null;
  retry(outcome: RetryLaterOutcome): any[];
  giveUp(outcome: RetryLaterOutcome): any[];
  resend(id: number): Record<string, any> | null;
  retryPublishes(session: string): any[];
  retryAttach(session: string): Record<string, any> | null;
  cancel(id: number): any[];
  receive(frame: Record<string, any>): any[];
}

export class Heartbeat {
  constructor(timeout: number, now: number);
  received(now: number): void;
  probe(now: number, deadline: number): void;
  poll(now: number): ["wait" | "ping" | "drop", number];
}

export function eventFromFrame(frame: Record<string, any>): SessionEvent;

// --- TetherChatTransport: the Vercel AI SDK's ChatTransport over a session ---------------------

/** A UI message chunk of the AI SDK's UI message stream (`UIMessageChunk` of `ai`): `start`,
 * `start-step`, `text-start`/`-delta`/`-end`, `tool-input-available`, `tool-approval-request`,
 * `tool-approval-response`, `tool-output-available`/`-error`/`-denied`, `finish-step`,
 * `finish`, `error`, and the transient `data-tether-run` ({run, state}). */
export interface TetherUIMessageChunk {
  type: string;
  [field: string]: any;
}

/** The parts of a UI message that the transport reads and writes (`UIMessage` of `ai`). */
export interface TetherUIMessage {
  id: string;
  role: "system" | "user" | "assistant";
  parts: any[];
  metadata?: unknown;
}

/** What `follow` needs of a chat: `Chat` of `@ai-sdk/react` or any `AbstractChat`. */
export interface FollowableChat {
  readonly id: string;
  messages: any[];
  readonly status: "submitted" | "streaming" | "ready" | "error";
  resumeStream(): Promise<void>;
}

export interface TetherChatTransportOptions extends ClientOptions {
  /** A client of its own (the transport attaches each chat's session on it); or `url`. */
  client?: Client | null;
  /** The server (`ws(s)://` or `http(s)://`): the transport makes its client (storage null). */
  url?: string | null;
  /** No run started for a sent message within this many ms: the stream ends with an error
   * chunk (no agent serves the session). 0 disables. Default 30000. */
  startTimeout?: number;
  /** How long the replay of a session must be quiet before it counts as caught up when no
   * event newer than the attach arrived. Default 150. */
  settleTime?: number;
}

/**
 * A `ChatTransport` of the Vercel AI SDK over a tether session (the chat id is the session),
 * for `useChat({ transport })`, `new Chat({ transport })` or any `AbstractChat`. Imports
 * nothing from `ai`; the chunks it makes are the UI message stream's.
 */
export class TetherChatTransport<UI_MESSAGE extends TetherUIMessage = any> {
  constructor(options: TetherChatTransportOptions);
  readonly client: Client;
  /** true: `reconnectToStream` replays the active reply from its `start`. */
  readonly resumeStreamIsReplay: true;
  startTimeout: number;
  settleTime: number;
  /** Publishes the last message as a `message` event (key: its id) and streams the reply of
   * the run it starts. When the last message is the assistant's, publishes the approval
   * decisions and front-end tool results added to it and follows the run from here. */
  sendMessages(options: {
    trigger: "submit-message" | "regenerate-message";
    chatId: string;
    messageId: string | undefined;
    messages: UI_MESSAGE[];
    abortSignal: AbortSignal | undefined;
    [option: string]: any;
  }): Promise<ReadableStream<any>>;
  /** The active run's reply from its `start`, then live; null when no run is active. */
  reconnectToStream(options: { chatId: string; abortSignal?: AbortSignal; [option: string]: any }): Promise<ReadableStream<any> | null>;
  /** The chat's messages from the session log (user messages, and one assistant message per
   * run with the run id as its id), for the initial load. */
  messages(chatId: string): Promise<TetherUIMessage[]>;
  /** The id of the run `reconnectToStream` would replay, or null. */
  activeRun(chatId: string): Promise<string | null>;
  /** The chat's tether session (attached on first use). */
  session(chatId: string): Promise<Session>;
  /** Cancel the active run for everyone (`run.cancel`); resolves with its cursor, or null
   * when nothing was active. `chat.stop()` alone only stops reading. */
  stop(chatId: string, reason?: string): Promise<string | null>;
  /** Keep a chat in step with its session: load the history into an empty chat, add messages
   * sent by others, resume replies this chat is not reading. Returns a function that stops. */
  follow(chat: FollowableChat, options?: { loadMessages?: boolean; retryInterval?: number }): () => void;
  /** Stop reading every chat; closes the client when the transport made it. */
  close(): void;
}

export default Client;
