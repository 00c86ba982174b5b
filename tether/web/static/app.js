// The tether web app: sessions, a streaming chat with tools and approvals, presence, and the
// connection state, on top of the browser SDK served at /sdk/tether.js.
//
// Everything shown is derived from the session log (model.js). The SDK saves the model with
// the cursor in sessionStorage, so a refresh restores the transcript and resumes after it.
// No HTML parsing anywhere: text reaches the DOM through textContent and markdown.js.

import { AttachError, Client, ConnectionState, PublishError } from "/sdk/tether.js";
import { renderMarkdown } from "./markdown.js";
import { apply, emptyModel, FINAL_STATES, runStatus, title as modelTitle } from "./model.js";

const $ = (id) => document.getElementById(id);
const AUTH_KEY = "tether.auth";
const RECENT_KEY = "tether.recent";
const DEVICE_KEY = "tether.device";
const THEME_KEY = "tether.theme";
const FRONTEND_TOOLS = ["pick_color"];
const COLORS = [
  ["#e5484d", "red"], ["#f76b15", "orange"], ["#ffc53d", "yellow"], ["#30a46c", "green"],
  ["#12a594", "teal"], ["#0090ff", "blue"], ["#6e56cf", "violet"], ["#d6409f", "pink"],
];
const SUGGESTIONS = [
  ["Say hello", "Hello! What can you do?"],
  ["Server tool", "What time is it?"],
  ["Front-end tool", "Pick a color for the chart"],
  ["Approval", "Publish the weekly report"],
  ["Everything", "Show me all the tools"],
];

const app = {
  config: null,
  auth: null,
  client: null,
  session: null,
  name: null, // the session shown
  model: emptyModel(),
  pending: [], // messages published but not yet seen in the log: {id, text, failed}
  typing: new Map(), // "sub/client" → {sub, until}
  drafts: new Map(), // call id → edited arguments text (approval edits)
  busy: new Set(), // call ids with a decision in flight
  dirty: new Set(),
  renderQueued: false,
  attachedOnce: false,
  resume: "",
  // Test and debugging hooks: the seqs of every delta applied to the page, in order.
  rendered: [],
  events: 0,
};
window.tetherApp = app;

// --- small DOM helpers ------------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function hue(text) {
  let x = 0;
  for (const ch of String(text)) x = (x * 31 + ch.codePointAt(0)) >>> 0;
  return x % 360;
}

function avatar(name, kind = "human") {
  const node = h("span", { class: kind === "agent" ? "avatar agent" : "avatar", "aria-hidden": "true", text: kind === "agent" ? "AI" : initials(name) });
  if (kind !== "agent") node.style.background = `hsl(${hue(name)} 55% 48%)`;
  return node;
}

function initials(name) {
  const parts = String(name || "?").replace(/^agent:/, "").split(/[\s._@-]+/).filter(Boolean);
  return (parts[0]?.[0] ?? "?") + (parts[1]?.[0] ?? "");
}

const clock = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
function timeTag(ms) {
  if (!ms) return null;
  const date = new Date(ms);
  return h("time", { datetime: date.toISOString(), title: date.toLocaleString(), text: clock.format(date) });
}

function relative(ms) {
  if (!ms) return "";
  const s = Math.round((Date.now() - ms) / 1000);
  if (s < 45) return "just now";
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return new Date(ms).toLocaleDateString();
}

function json(value, pretty = false) {
  try {
    // Short values on one line, longer ones indented. JSON strings hold no raw newline, so
    // folding the indented form's line breaks never changes a string's content.
    const indented = JSON.stringify(value, null, 2) ?? "null";
    const flat = indented.replace(/\n\s*/g, " ");
    return !pretty && flat.length <= 80 ? flat : indented;
  } catch {
    return String(value);
  }
}

const ICONS = {
  server: "M12 15a3 3 0 1 0 0-6 3 3 0 0 0 0 6zM19.4 15a1.7 1.7 0 0 0 .3 1.8l.1.1a2 2 0 1 1-2.8 2.8l-.1-.1a1.7 1.7 0 0 0-1.8-.3 1.7 1.7 0 0 0-1 1.5V21a2 2 0 1 1-4 0v-.1a1.7 1.7 0 0 0-1.1-1.5 1.7 1.7 0 0 0-1.8.3l-.1.1a2 2 0 1 1-2.8-2.8l.1-.1a1.7 1.7 0 0 0 .3-1.8 1.7 1.7 0 0 0-1.5-1H3a2 2 0 1 1 0-4h.1a1.7 1.7 0 0 0 1.5-1.1 1.7 1.7 0 0 0-.3-1.8l-.1-.1a2 2 0 1 1 2.8-2.8l.1.1a1.7 1.7 0 0 0 1.8.3H9a1.7 1.7 0 0 0 1-1.5V3a2 2 0 1 1 4 0v.1a1.7 1.7 0 0 0 1 1.5 1.7 1.7 0 0 0 1.8-.3l.1-.1a2 2 0 1 1 2.8 2.8l-.1.1a1.7 1.7 0 0 0-.3 1.8V9a1.7 1.7 0 0 0 1.5 1H21a2 2 0 1 1 0 4h-.1a1.7 1.7 0 0 0-1.5 1z",
  client: "M3 5h18v11H3zM8 20h8M12 16v4",
  approval: "M12 3l8 3v6c0 4.5-3.4 8.3-8 9-4.6-.7-8-4.5-8-9V6zM9 12l2 2 4-4",
};

function icon(name) {
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("aria-hidden", "true");
  const path = document.createElementNS("http://www.w3.org/2000/svg", "path");
  path.setAttribute("d", ICONS[name]);
  svg.append(path);
  return svg;
}

function toast(text) {
  const node = h("div", { class: "toast", role: "status", text });
  $("toasts").append(node);
  setTimeout(() => node.remove(), 3500);
}

function announce(text) {
  $("announce").textContent = text;
}

function store(key, value) {
  try {
    if (value === null) localStorage.removeItem(key);
    else localStorage.setItem(key, JSON.stringify(value));
  } catch {
    // storage disabled: the app still works, it just forgets
  }
}

function load(key) {
  try {
    return JSON.parse(localStorage.getItem(key) ?? "null");
  } catch {
    return null;
  }
}

// --- identity ---------------------------------------------------------------------------------

function deviceLabel() {
  const ua = navigator.userAgent;
  const browser = /Edg\//.test(ua) ? "Edge" : /Firefox\//.test(ua) ? "Firefox" : /Chrome\//.test(ua) ? "Chrome" : /Safari\//.test(ua) ? "Safari" : "Browser";
  const os = /Android/.test(ua) ? "Android" : /iPhone|iPad|iPod/.test(ua) ? "iOS" : /Mac OS X/.test(ua) ? "macOS" : /Windows/.test(ua) ? "Windows" : /Linux/.test(ua) ? "Linux" : "";
  return os ? `${browser} on ${os}` : browser;
}

function deviceId() {
  let id = load(DEVICE_KEY);
  if (typeof id !== "string") {
    id = `d-${Array.from(crypto.getRandomValues(new Uint8Array(6)), (b) => b.toString(16).padStart(2, "0")).join("")}`;
    store(DEVICE_KEY, id);
  }
  return id;
}

function jwtClaims(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part.padEnd(part.length + ((4 - (part.length % 4)) % 4), "=")));
  } catch {
    return null;
  }
}

function authFromToken(token, dev) {
  const claims = jwtClaims(token);
  if (!claims?.sub) return null;
  return { token, sub: claims.sub, caps: claims.caps ?? [], sessions: claims.sessions ?? [], expiresAt: claims.exp ? claims.exp * 1000 : null, dev };
}

function expired(auth) {
  return auth.expiresAt !== null && auth.expiresAt - Date.now() < 30000;
}

async function devLogin(name) {
  const response = await fetch("/v1/dev/login", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ name }),
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body?.error?.message ?? `login failed (${response.status})`);
  const auth = authFromToken(body.token, true);
  store(AUTH_KEY, auth);
  return auth;
}

/** The token for each (re)connect: refreshed through dev login when it is about to expire. */
async function currentToken() {
  const auth = app.auth;
  if (auth && expired(auth) && auth.dev && app.config?.dev_login) {
    try {
      app.auth = await devLogin(auth.sub);
    } catch {
      // keep the old one: the server answers 4501 and the page asks to sign in again
    }
  }
  return app.auth?.token ?? "";
}

/** Who "you" are: the welcome's subject, or before it arrives the token's (the same one). */
function me() {
  return app.client?.welcome?.sub ?? app.auth?.sub ?? null;
}

function can(cap) {
  const caps = app.client?.welcome?.caps ?? app.auth?.caps ?? [];
  return caps.includes(cap) || caps.includes("admin");
}

function matches(pattern, name) {
  const re = new RegExp(`^${pattern.replace(/[.+^${}()|\\]/g, "\\$&").replace(/\*/g, ".*").replace(/\?/g, ".")}$`);
  return re.test(name);
}

function allowed(name) {
  return (app.auth?.sessions ?? []).some((p) => p === name || matches(p, name));
}

function agentFor(name) {
  return app.config?.agents?.find((a) => a.sessions.some((p) => matches(p, name))) ?? null;
}

// --- views ------------------------------------------------------------------------------------

function setView(view) {
  $("app").dataset.view = view;
  $("login").hidden = view !== "login";
  $("home").hidden = view !== "home";
  $("chat").hidden = view !== "chat";
  $("share-button").hidden = view !== "chat";
  $("people-button").hidden = view !== "chat";
  $("me").hidden = view === "login" || !app.auth;
  closeDrawers();
}

function showLogin(message = "") {
  setView("login");
  if (!app.client) hideConnection();
  renderTitle();
  const dev = app.config?.dev_login === true;
  $("login-form").hidden = !dev;
  $("token-form").hidden = dev;
  const error = dev ? $("login-error") : $("token-error");
  error.hidden = !message;
  error.textContent = message;
  (dev ? $("login-name") : $("token-input")).focus();
}

function suggestionButtons(container) {
  container.replaceChildren(...SUGGESTIONS.map(([label, text]) => h("button", {
    class: "suggestion", type: "button", onclick: () => startWith(text),
  }, h("b", { text: label }), ` · ${text}`)));
}

async function startWith(text) {
  if (!app.name) await openSession(newSessionName(), true);
  await send(text);
}

function newSessionName() {
  const bytes = crypto.getRandomValues(new Uint8Array(5));
  return `chat-${Array.from(bytes, (b) => b.toString(36).padStart(2, "0")).join("").slice(0, 8)}`;
}

function navigate(path, replace = false) {
  if (location.pathname !== path) history[replace ? "replaceState" : "pushState"](null, "", path);
  route();
}

function sessionFromPath() {
  const match = /^\/s\/([^/]+)$/.exec(location.pathname);
  return match ? decodeURIComponent(match[1]) : null;
}

async function route() {
  if (!app.auth) return showLogin();
  const name = sessionFromPath();
  if (name) {
    if (name !== app.name) await openSession(name);
  } else {
    await closeSession();
    setView("home");
    renderSessionList();
  }
}

// --- the client -------------------------------------------------------------------------------

function startClient() {
  const client = new Client(location.origin, {
    token: currentToken,
    device: deviceLabel(),
    tools: FRONTEND_TOOLS,
  });
  app.client = client;
  client.onState((state, info) => {
    if (app.client === client) renderConnection(state, info);
  });
  client.on("welcome", () => {
    if (app.client !== client) return;
    $("me").hidden = false;
    renderComposerState();
    redrawOwnMessages();
  });
  renderConnection(client.state, client.stateInfo);
  client.connect().catch(() => {});
}

async function stopClient() {
  const client = app.client;
  app.client = null;
  app.session = null;
  app.name = null;
  hideConnection();
  if (client) await client.close();
}

async function closeSession() {
  const session = app.session;
  app.session = null;
  app.name = null;
  app.typing.clear();
  if (session) await session.detach().catch(() => {});
}

async function openSession(name, fresh = false) {
  if (!/^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$/.test(name)) {
    toast("That is not a valid session id.");
    return navigate("/", true);
  }
  await closeSession();
  if (sessionFromPath() !== name) history.pushState(null, "", `/s/${encodeURIComponent(name)}`);
  app.name = name;
  app.pending = [];
  app.drafts.clear();
  app.attachedOnce = false;
  setResume("");
  $("banner").hidden = true;
  setView("chat");
  $("fact-session").textContent = name;
  renderTitle();
  if (!allowed(name)) {
    app.model = emptyModel();
    renderAll();
    banner(`Your token does not give access to ${name}.`);
    return;
  }
  // Restore what this tab showed before a refresh, with the cursor saved at the same moment.
  const saved = fresh ? null : app.client.saved(name);
  const restored = saved?.state?.v === 1 ? saved.state : null;
  if (saved && !restored) app.client.forget(name);
  app.model = restored ?? emptyModel();
  remember(name);
  renderAll();
  try {
    const session = await app.client.attach(name, {
      cursor: restored ? undefined : null,
      presence: { device: deviceLabel(), deviceId: deviceId() },
      saveState: () => app.model,
      onEvent: onItem,
      onPresence: renderPeople,
      onAttached: onAttached,
    });
    if (app.name !== name) {
      session.detach();
      return;
    }
    app.session = session;
    renderPeople();
    renderComposerState();
    if (matchMedia("(min-width: 761px)").matches) $("composer-input").focus();
  } catch (error) {
    if (app.name !== name) return;
    const message = error instanceof AttachError && error.code === "forbidden"
      ? `Your token does not give access to ${name}.` : `Could not open ${name}: ${error.message}`;
    banner(message);
  }
}

function onAttached(info) {
  const first = !app.attachedOnce;
  app.attachedOnce = true;
  if (info.resumed) {
    // A resume after a reconnect, or after a refresh from the saved cursor.
    if (!first || app.session?.restored || app.client.session(app.name)?.restored) setResume("resumed");
  }
  renderFacts();
}

function onItem(item) {
  if (item.transient) {
    if (item.type === "typing") onTyping(item);
    return;
  }
  app.events += 1;
  if (item.snapshot) {
    apply(app.model, item);
    app.pending = [];
    if (item.previous !== null || item.reason === "cursor_rejected") {
      setResume("lost");
      banner("Continuity lost — reloaded from history.");
      announce("Continuity lost, the conversation was reloaded from history");
    } else if (item.reason === "history_trimmed") {
      banner("Earlier history of this session was trimmed by retention.");
    }
    renderAll();
    return;
  }
  const changed = apply(app.model, item);
  if (item.type === "stream.append") app.rendered.push(item.seq);
  if (item.type === "message" && item.sender.client === app.client?.clientId) {
    const at = app.pending.findIndex((p) => p.text === (item.data?.text ?? ""));
    if (at !== -1) {
      app.pending.splice(at, 1);
      changed.push("pending");
    }
  }
  if (item.type === "message") app.typing.delete(`${item.sender.sub}/${item.sender.client}`);
  if (item.type === "approval.request") announce(`${item.data?.name ?? "A tool"} needs approval`);
  if (item.type === "run.state" && FINAL_STATES.has(item.data?.state)) {
    announce(`Run ${item.data.state}`);
    refreshSessionList();
  }
  for (const id of changed) app.dirty.add(id);
  if (item.type === "message" && app.model.items.length <= 2) remember(app.name);
  scheduleRender();
}

// --- connection state ---------------------------------------------------------------------------

let countdown = null;
let announcedState = null;

/** Before sign-in (and after sign-out) there is no connection, so no connection state. */
function hideConnection() {
  clearInterval(countdown);
  countdown = null;
  announcedState = null;
  const conn = $("conn");
  conn.hidden = true;
  conn.dataset.state = "";
  setResume("");
}

function renderConnection(state, info = {}) {
  const conn = $("conn");
  conn.hidden = false;
  conn.dataset.state = state;
  if (state !== announcedState) {
    // Screen readers hear state changes, not every second of a countdown.
    announcedState = state;
    announce({ connected: "Connected", reconnecting: "Connection lost, reconnecting", closed: "Disconnected", connecting: "Connecting" }[state] ?? state);
  }
  const label = conn.querySelector(".conn-label");
  const retry = conn.querySelector(".conn-retry");
  clearInterval(countdown);
  countdown = null;
  retry.hidden = !(state === ConnectionState.RECONNECTING && !info.connecting) && state !== ConnectionState.CLOSED;
  retry.textContent = state === ConnectionState.CLOSED ? "Reload" : "Retry now";
  if (state === ConnectionState.CONNECTED) {
    label.textContent = "Connected";
  } else if (state === ConnectionState.CONNECTING) {
    label.textContent = info.offline ? "Offline — waiting for the network" : "Connecting…";
  } else if (state === ConnectionState.RECONNECTING) {
    if (info.offline) {
      label.textContent = "Reconnecting — offline, waiting for the network";
    } else if (info.connecting || !info.retryAt) {
      label.textContent = "Reconnecting…";
    } else {
      const tick = () => {
        const left = Math.max(0, Math.ceil((info.retryAt - Date.now()) / 1000));
        label.textContent = `Reconnecting in ${left}s`;
      };
      tick();
      countdown = setInterval(tick, 250);
    }
    if (app.resume === "resumed") setResume("");
  } else if (state === ConnectionState.CLOSED) {
    label.textContent = "Disconnected";
    if (info.code === 4500 || info.code === 4501) {
      const message = info.code === 4501 ? "Your sign-in expired. Sign in again." : "The server refused your token. Sign in again.";
      store(AUTH_KEY, null);
      app.auth = null;
      stopClient().then(() => showLogin(message));
    } else if (info.reason) {
      label.textContent = `Disconnected: ${info.reason}`;
    }
  }
  renderComposerState();
}

let resumeTimer = null;
function setResume(kind) {
  app.resume = kind;
  const conn = $("conn");
  conn.dataset.resume = kind;
  const chip = conn.querySelector(".conn-chip");
  chip.hidden = !kind;
  chip.textContent = kind === "resumed" ? "resumed" : kind === "lost" ? "continuity lost" : "";
  clearTimeout(resumeTimer);
  if (kind === "resumed") resumeTimer = setTimeout(() => app.resume === "resumed" && setResume(""), 8000);
}

function banner(text) {
  const node = $("banner");
  node.querySelector(".banner-text").textContent = text;
  node.hidden = false;
}

// --- transcript ---------------------------------------------------------------------------------

function scheduleRender() {
  if (app.renderQueued) return;
  app.renderQueued = true;
  // requestAnimationFrame does not run in hidden tabs; the timer keeps them current anyway.
  const run = () => {
    if (!app.renderQueued) return;
    app.renderQueued = false;
    flush();
  };
  requestAnimationFrame(run);
  setTimeout(run, 100);
}

function flush() {
  const stick = nearBottom();
  const dirty = [...app.dirty];
  app.dirty.clear();
  const transcript = $("transcript");
  for (const id of dirty) {
    if (id === "pending" || id.startsWith("run:")) continue;
    const item = app.model.items[app.model.index[id]];
    if (!item) continue;
    const node = renderItem(item);
    node.dataset.pos = String(app.model.index[id]);
    const existing = transcript.querySelector(`[data-id="${CSS.escape(id)}"]`);
    if (existing) existing.replaceWith(node);
    else insertInOrder(transcript, node, app.model.index[id]);
  }
  renderPending();
  renderRunbar();
  renderFacts();
  renderPeople();
  renderTitle();
  $("empty").hidden = app.model.items.length > 0 || app.pending.length > 0;
  if (stick) scrollToBottom();
  else $("jump").hidden = false;
}

function insertInOrder(transcript, node, position) {
  node.dataset.pos = String(position);
  for (const child of transcript.children) {
    const pos = Number(child.dataset.pos);
    if (!Number.isNaN(pos) && pos > position) {
      child.before(node);
      return;
    }
  }
  const firstPending = transcript.querySelector(".msg.pending");
  if (firstPending) firstPending.before(node);
  else transcript.append(node);
}

function renderAll() {
  app.dirty.clear();
  const nodes = app.model.items.map((item, position) => {
    const node = renderItem(item);
    node.dataset.pos = String(position);
    return node;
  });
  $("transcript").replaceChildren(...nodes);
  renderPending();
  renderRunbar();
  renderFacts();
  renderPeople();
  renderTitle();
  $("empty").hidden = app.model.items.length > 0 || app.pending.length > 0;
  scrollToBottom();
}

function renderItem(item) {
  let node;
  switch (item.kind) {
    case "message":
      node = renderMessage(item);
      break;
    case "assistant":
      node = renderAssistant(item);
      break;
    case "tool":
      node = renderTool(item);
      break;
    case "notice":
      node = h("div", { class: `notice ${item.tone ?? ""}`, text: item.text });
      break;
    default:
      node = h("div", { class: "event-line", text: `${item.sender?.sub ?? "?"} · ${item.type} ${json(item.data).slice(0, 400)}` });
  }
  node.dataset.id = item.id;
  return node;
}

function renderMessage(item) {
  const sub = item.sender?.sub ?? "someone";
  const mine = sub === me();
  return h("article", { class: `msg user${mine ? " mine" : ""}`, dataset: { seq: item.seq } },
    avatar(sub),
    h("header", {}, h("span", { class: "who", text: mine ? `${sub} (you)` : sub }), timeTag(item.time),
      item.steer ? h("span", { class: "tag", text: "steer" }) : null),
    h("div", { class: "body", text: item.text }));
}

/** Redraw the messages whose "(you)" is wrong for who the welcome says you are. */
function redrawOwnMessages() {
  const you = me();
  for (const node of $("transcript").querySelectorAll(".msg.user[data-id]")) {
    const item = app.model.items[app.model.index[node.dataset.id]];
    if (item && node.classList.contains("mine") !== ((item.sender?.sub ?? "someone") === you)) app.dirty.add(item.id);
  }
  if (app.dirty.size) scheduleRender();
}

function renderAssistant(item) {
  const agent = String(item.sender?.sub ?? "agent").replace(/^agent:/, "");
  const body = h("div", { class: "body md" });
  body.append(renderMarkdown(item.text));
  return h("article", { class: `msg assistant${item.done ? "" : " streaming"}`, dataset: { stream: item.stream, done: item.done ? "true" : "false" } },
    avatar(agent, "agent"),
    h("header", {}, h("span", { class: "who", text: agent }), timeTag(item.time),
      item.interrupted ? h("span", { class: "tag warn", text: `interrupted (${item.interrupted})` }) : null),
    body);
}

const STATUS_LABEL = {
  pending: "pending", running: "running…", done: "done", error: "failed",
  awaiting_approval: "needs approval", approved: "approved", rejected: "rejected", expired: "expired",
  awaiting_client: "waiting for you",
};

function renderTool(item) {
  const runState = app.model.runs[item.run]?.state;
  const live = !FINAL_STATES.has(runState);
  let status = item.status;
  if (!live && (status === "awaiting_approval" || status === "awaiting_client" || status === "running")) status = runState;
  const card = h("article", { class: "tool", dataset: { status, call: item.call, name: item.name } });
  card.append(h("header", {},
    icon(item.approval ? "approval" : item.target === "client" ? "client" : "server"),
    h("span", { class: "name", text: item.name }),
    h("span", { class: "muted", text: item.target === "client" ? "front-end tool" : item.approval ? "tool · needs approval" : "server tool" }),
    h("span", { class: "status", text: STATUS_LABEL[status] ?? status })));
  const body = h("div", { class: "tool-body" });
  const facts = h("dl");
  facts.append(h("dt", { text: "Arguments" }), h("dd", {}, h("pre", { text: json(item.arguments) })));
  if (item.approval?.arguments && item.approval.decision === "approve") {
    facts.append(h("dt", { text: "Edited" }), h("dd", { class: "by", text: "approved with edited arguments" }));
  }
  if (item.result !== undefined) {
    facts.append(h("dt", { text: "Result" }), h("dd", {}, resultView(item)));
  }
  if (item.error) facts.append(h("dt", { text: "Error" }), h("dd", {}, h("pre", { text: item.error })));
  body.append(facts);
  if (live && item.status === "awaiting_approval") body.append(approvalControls(item));
  if (live && item.status === "awaiting_client") body.append(clientToolControls(item));
  const by = decisionLine(item);
  if (by) body.append(h("div", { class: "by", text: by }));
  card.append(body);
  return card;
}

function resultView(item) {
  const color = item.result && typeof item.result === "object" ? item.result.color : null;
  if (item.name === "pick_color" && typeof color === "string" && /^#[0-9a-f]{6}$/i.test(color)) {
    const chip = h("i");
    chip.style.background = color;
    return h("span", { class: "swatch-result" }, chip, color);
  }
  return h("pre", { text: json(item.result) });
}

function decisionLine(item) {
  const parts = [];
  if (item.approval?.by?.sub) {
    const verb = { approve: "Approved", reject: "Rejected", expired: "Expired" }[item.approval.decision] ?? "Decided";
    parts.push(`${verb} by ${item.approval.by.sub}`);
  }
  if (item.by?.sub && item.target === "client" && item.status === "done") parts.push(`answered by ${item.by.sub}`);
  return parts.join(" · ");
}

function approvalControls(item) {
  if (!can("approve")) return h("p", { class: "muted small", text: "Waiting for someone who can approve." });
  const busy = app.busy.has(item.call);
  const draft = app.drafts.get(item.call);
  if (draft !== undefined) {
    const area = h("textarea", { "aria-label": `Arguments for ${item.name}`, spellcheck: "false" });
    area.value = draft;
    area.addEventListener("input", () => app.drafts.set(item.call, area.value));
    const error = h("p", { class: "error small", role: "alert", hidden: true });
    const approveEdited = () => {
      let parsed;
      try {
        parsed = JSON.parse(area.value);
      } catch (exc) {
        error.textContent = `Not valid JSON: ${exc.message}`;
        error.hidden = false;
        return;
      }
      if (!parsed || typeof parsed !== "object" || Array.isArray(parsed)) {
        error.textContent = "The arguments must be a JSON object.";
        error.hidden = false;
        return;
      }
      decide(item, "approve", parsed);
    };
    area.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) approveEdited();
      if (e.key === "Escape") {
        app.drafts.delete(item.call);
        rerender(item.id);
      }
    });
    queueMicrotask(() => area.isConnected && area.focus());
    return h("div", { class: "stack" }, area, error, h("div", { class: "actions" },
      h("button", { class: "button primary small", type: "button", disabled: busy, onclick: approveEdited, text: "Approve with changes" }),
      h("button", { class: "button small", type: "button", onclick: () => { app.drafts.delete(item.call); rerender(item.id); }, text: "Cancel" })));
  }
  return h("div", { class: "actions" },
    h("button", { class: "button primary small", type: "button", disabled: busy, onclick: () => decide(item, "approve"), "data-action": "approve", text: "Approve" }),
    h("button", { class: "button danger small", type: "button", disabled: busy, onclick: () => decide(item, "reject"), "data-action": "reject", text: "Reject" }),
    h("button", { class: "button small", type: "button", disabled: busy, onclick: () => { app.drafts.set(item.call, json(item.arguments, true)); rerender(item.id); }, "data-action": "edit", text: "Edit…" }),
    item.expiresAt ? h("span", { class: "by", text: `expires ${clock.format(new Date(item.expiresAt))}` }) : null);
}

function clientToolControls(item) {
  if (item.name !== "pick_color") {
    return h("p", { class: "muted small", text: `Waiting for a client that runs ${item.name}.` });
  }
  const busy = app.busy.has(item.call);
  const prompt = item.arguments?.prompt ? String(item.arguments.prompt) : "Pick a color";
  const custom = h("input", { type: "color", value: "#3f5bd8", "aria-label": "Custom color" });
  return h("div", { class: "stack" },
    h("p", { class: "small", text: prompt }),
    h("div", { class: "swatches", role: "group", "aria-label": "Colors" },
      COLORS.map(([hex, name]) => {
        const swatch = h("button", { class: "swatch", type: "button", title: name, "aria-label": name, disabled: busy, "data-color": hex, onclick: () => answerTool(item, { color: hex, name }) });
        swatch.style.background = hex;
        return swatch;
      }),
      custom,
      h("button", { class: "button small", type: "button", disabled: busy, onclick: () => answerTool(item, { color: custom.value }), text: "Use this color" })));
}

function rerender(id) {
  app.dirty.add(id);
  scheduleRender();
}

async function decide(item, decision, edited = null) {
  if (!app.session) return;
  app.busy.add(item.call);
  rerender(item.id);
  try {
    if (decision === "approve") await app.session.approve(item.run, item.call, edited);
    else await app.session.reject(item.run, item.call);
    app.drafts.delete(item.call);
  } catch (error) {
    toast(error instanceof PublishError && ["already_decided", "unknown_call", "run_finished"].includes(error.code)
      ? "Someone else decided first." : `Could not send the decision: ${error.message}`);
  } finally {
    app.busy.delete(item.call);
    rerender(item.id);
  }
}

async function answerTool(item, result) {
  if (!app.session) return;
  app.busy.add(item.call);
  rerender(item.id);
  try {
    await app.session.answerTool(item.run, item.call, result);
  } catch (error) {
    toast(error instanceof PublishError && ["already_decided", "unknown_call", "run_finished"].includes(error.code)
      ? "Another tab answered first." : `Could not send the answer: ${error.message}`);
  } finally {
    app.busy.delete(item.call);
    rerender(item.id);
  }
}

function renderPending() {
  const transcript = $("transcript");
  for (const node of transcript.querySelectorAll(".msg.pending")) node.remove();
  const sub = me() ?? "you";
  for (const p of app.pending) {
    const retry = p.failed ? h("button", { class: "link-button small", type: "button", text: "Retry", onclick: () => { app.pending = app.pending.filter((x) => x !== p); send(p.text); } }) : null;
    transcript.append(h("article", { class: `msg user mine pending${p.failed ? " failed" : ""}` },
      avatar(sub),
      h("header", {}, h("span", { class: "who", text: `${sub} (you)` }),
        h("span", { class: p.failed ? "tag warn" : "tag", text: p.failed ? `not sent: ${p.failed}` : "sending…" }), retry),
      h("div", { class: "body", text: p.text })));
  }
}

function renderRunbar() {
  const bar = $("runbar");
  const status = runStatus(app.model);
  const active = status.active;
  if (!active && !status.queued) {
    bar.hidden = true;
    delete bar.dataset.state;
    renderPeople();
    return;
  }
  bar.hidden = false;
  const agent = active?.agent || agentFor(app.name ?? "")?.name || "agent";
  let label;
  if (!active) label = `${status.queued} run${status.queued > 1 ? "s" : ""} queued`;
  else if (active.state === "awaiting_approval") label = "Waiting for an approval";
  else if (active.state === "awaiting_tool") label = "Waiting for a front-end tool";
  else label = status.streaming ? `${agent} is writing…` : `${agent} is thinking…`;
  if (active && status.queued) label += ` · ${status.queued} queued`;
  bar.dataset.state = active?.state ?? "queued";
  bar.dataset.run = active?.id ?? "";
  bar.querySelector(".runbar-label").textContent = label;
  $("stop-button").hidden = !active || !can("publish");
}

async function stopRun() {
  const active = runStatus(app.model).active;
  if (!active || !app.session) return;
  $("stop-button").disabled = true;
  try {
    await app.session.cancelRun(active.id, "stopped from the web app");
  } catch (error) {
    if (!(error instanceof PublishError && error.code === "run_finished")) toast(`Could not stop: ${error.message}`);
  } finally {
    $("stop-button").disabled = false;
  }
}

function renderFacts() {
  $("fact-cursor").textContent = app.session?.cursor ?? app.client?.session(app.name ?? "")?.cursor ?? "–";
  $("fact-events").textContent = app.model.lastSeq ? String(app.model.lastSeq) : "–";
}

// --- presence and typing --------------------------------------------------------------------

let peopleSignature = "";
function renderPeople() {
  const session = app.client?.session(app.name ?? "");
  const members = session ? session.members : [];
  const you = me();
  const groups = new Map();
  for (const m of members) {
    const key = `${m.kind}:${m.sub}`;
    if (!groups.has(key)) groups.set(key, { sub: m.sub, kind: m.kind, tabs: 0, devices: new Map(), mine: false });
    const g = groups.get(key);
    g.tabs += 1;
    const deviceKey = m.state?.deviceId ?? m.device ?? m.client;
    g.devices.set(deviceKey, m.state?.device || m.device || "a device");
    if (m.client === app.client?.clientId) g.mine = true;
  }
  const typingSubs = new Set([...app.typing.values()].filter((t) => t.until > Date.now()).map((t) => t.sub));
  const items = [];
  const sorted = [...groups.values()].sort((a, b) => (b.sub === you) - (a.sub === you) || a.sub.localeCompare(b.sub));
  for (const g of sorted) {
    const devices = [...g.devices.values()];
    const detail = typingSubs.has(g.sub) ? "typing…"
      : `${g.tabs} tab${g.tabs > 1 ? "s" : ""} · ${devices.length > 1 ? `${devices.length} devices: ` : ""}${devices.join(", ")}`;
    items.push(h("li", { dataset: { sub: g.sub, tabs: g.tabs, devices: devices.length } },
      avatar(g.sub, g.kind),
      h("span", { class: "name" }, g.sub, g.sub === you ? h("span", { class: "you", text: " (you)" }) : null),
      h("span", { class: `detail${typingSubs.has(g.sub) ? " typing-now" : ""}`, text: detail })));
  }
  const agent = agentFor(app.name ?? "");
  if (agent && ![...groups.values()].some((g) => g.kind === "agent")) {
    const status = runStatus(app.model);
    const state = status.active?.state;
    const doing = !state ? "idle — answers new messages"
      : state === "awaiting_approval" ? "waiting for an approval"
        : state === "awaiting_tool" ? "waiting for a front-end tool"
          : status.streaming ? "writing…" : "thinking…";
    items.push(h("li", { dataset: { sub: `agent:${agent.name}`, agent: "true" } },
      avatar(agent.name, "agent"),
      h("span", { class: "name", text: `${agent.name} agent` }),
      h("span", { class: "detail", text: `${doing} · simulated model` })));
  }
  // Rebuilt only when something visible changed (this runs on every streamed delta).
  const signature = JSON.stringify([app.name, you, [...groups.values()].map((g) => [g.sub, g.tabs, [...g.devices.values()]]), [...typingSubs], items.length, runStatus(app.model).active?.state ?? "", runStatus(app.model).streaming]);
  if (signature === peopleSignature) return;
  peopleSignature = signature;
  $("people-list").replaceChildren(...items);
  const humans = sorted.filter((g) => g.kind !== "agent");
  const button = $("people-button");
  button.querySelector(".people-count").textContent = String(humans.length);
  button.querySelector(".avatars").replaceChildren(...humans.slice(0, 3).map((g) => avatar(g.sub)));
  renderTyping(typingSubs, you);
}

function renderTyping(typingSubs, me) {
  const others = [...typingSubs].filter((s) => s !== me);
  $("typing").textContent = others.length === 0 ? ""
    : others.length === 1 ? `${others[0]} is typing…`
      : `${others.slice(0, -1).join(", ")} and ${others[others.length - 1]} are typing…`;
}

function onTyping(item) {
  if (item.sender.client === app.client?.clientId) return;
  const key = `${item.sender.sub}/${item.sender.client}`;
  if (item.data?.typing) app.typing.set(key, { sub: item.sender.sub, until: Date.now() + 6000 });
  else app.typing.delete(key);
  renderPeople();
}

setInterval(() => {
  let changed = false;
  for (const [key, t] of app.typing) {
    if (t.until <= Date.now()) {
      app.typing.delete(key);
      changed = true;
    }
  }
  if (changed) renderPeople();
}, 1000);

let typingSentAt = 0;
let typingOn = false;
function typingChanged() {
  const text = $("composer-input").value.trim();
  if (!app.session || !can("publish")) return;
  if (text && Date.now() - typingSentAt > 2500) {
    typingSentAt = Date.now();
    typingOn = true;
    app.session.publish("typing", { typing: true }, { transient: true }).catch(() => {});
  } else if (!text && typingOn) {
    typingStopped();
  }
}

function typingStopped() {
  if (!typingOn || !app.session) return;
  typingOn = false;
  typingSentAt = 0;
  app.session.publish("typing", { typing: false }, { transient: true }).catch(() => {});
}

// --- composer -------------------------------------------------------------------------------

function renderComposerState() {
  const input = $("composer-input");
  const allowedToPublish = can("publish");
  input.disabled = !allowedToPublish;
  $("send-button").disabled = !allowedToPublish;
  input.placeholder = allowedToPublish ? "Message the agent…" : "Your token is read-only in this session";
}

async function send(text) {
  text = text.trim();
  if (!text || !app.session) return;
  typingStopped();
  const pending = { text, failed: null };
  app.pending.push(pending);
  $("empty").hidden = true;
  renderPending();
  scrollToBottom();
  try {
    // Committed exactly once even if the connection drops meanwhile (idempotency key).
    await app.session.publish("message", { text });
    const at = app.pending.indexOf(pending);
    if (at !== -1) app.pending.splice(at, 1);
  } catch (error) {
    pending.failed = error.code ?? error.message;
  }
  remember(app.name, text);
  renderPending();
}

function autosize() {
  const input = $("composer-input");
  input.style.height = "auto";
  input.style.height = `${Math.min(input.scrollHeight, 200)}px`;
}

// --- session list -------------------------------------------------------------------------------

function recents() {
  const list = load(RECENT_KEY);
  return Array.isArray(list) ? list.filter((r) => r && typeof r.id === "string") : [];
}

function remember(name, firstText = null) {
  if (!name) return;
  const list = recents();
  const existing = list.find((r) => r.id === name);
  const titleText = modelTitle(app.model) || existing?.title || (firstText ?? "").slice(0, 80);
  const entry = { id: name, title: titleText, updated: Date.now() };
  store(RECENT_KEY, [entry, ...list.filter((r) => r.id !== name)].slice(0, 50));
  renderSessionList();
}

let serverSessions = [];
async function refreshSessionList() {
  if (!app.auth) return;
  try {
    const response = await fetch("/v1/web/sessions", { headers: { Authorization: `Bearer ${app.auth.token}` } });
    if (response.ok) serverSessions = (await response.json()).sessions ?? [];
  } catch {
    // offline: the local list still shows
  }
  renderSessionList();
}

/**
 * The one name of a session, in the header, the sidebar and the page title: its title (the
 * first message, model.js) once known, else its id. The id itself is in the details panel.
 */
function sessionTitle(id, recent = recents()) {
  const own = id === app.name ? modelTitle(app.model) : "";
  return own || recent.find((r) => r.id === id)?.title || id;
}

function renderTitle() {
  const name = app.name && !$("chat").hidden ? sessionTitle(app.name) : "";
  const heading = $("session-title");
  heading.textContent = name;
  if (name) heading.title = name;
  else heading.removeAttribute("title");
  document.title = name ? `${name} · tether` : "tether";
}

function renderSessionList() {
  renderTitle();
  const merged = new Map();
  const recent = recents();
  for (const r of recent) merged.set(r.id, { id: r.id, updated: r.updated, state: null });
  for (const s of serverSessions) {
    const entry = merged.get(s.session) ?? { id: s.session, updated: 0, state: null };
    entry.updated = Math.max(entry.updated, s.updated ?? 0);
    entry.state = s.state ?? null;
    merged.set(s.session, entry);
  }
  const list = [...merged.values()].filter((e) => allowed(e.id)).sort((a, b) => b.updated - a.updated);
  $("session-list").replaceChildren(...list.map((e) => h("li", {},
    h("a", {
      href: `/s/${encodeURIComponent(e.id)}`, "aria-current": e.id === app.name ? "page" : null,
      onclick: (ev) => {
        if (ev.metaKey || ev.ctrlKey || ev.shiftKey || ev.button !== 0) return;
        ev.preventDefault();
        navigate(`/s/${encodeURIComponent(e.id)}`);
      },
    },
    h("span", { class: "title", text: sessionTitle(e.id, recent) }),
    h("span", { class: "meta" }, h("span", { class: "state-dot", dataset: { state: e.state ?? "" }, "aria-hidden": "true" }),
      relative(e.updated))))));
  $("session-list-empty").hidden = list.length > 0;
}

// --- scrolling, drawers, theme ------------------------------------------------------------------

function nearBottom() {
  const s = $("scroller");
  return s.scrollHeight - s.scrollTop - s.clientHeight < 120;
}

function scrollToBottom() {
  const s = $("scroller");
  s.scrollTop = s.scrollHeight;
  $("jump").hidden = true;
}

function closeDrawers() {
  const root = $("app");
  delete root.dataset.sidebar;
  delete root.dataset.people;
  $("menu-button").setAttribute("aria-expanded", "false");
  $("people-button").setAttribute("aria-expanded", "false");
  $("scrim").hidden = true;
}

function toggleDrawer(which) {
  const root = $("app");
  const open = root.dataset[which] === "open";
  closeDrawers();
  if (!open) {
    root.dataset[which] = "open";
    $("scrim").hidden = false;
    $(which === "sidebar" ? "menu-button" : "people-button").setAttribute("aria-expanded", "true");
  }
}

const THEMES = ["auto", "light", "dark"];
function applyTheme(theme) {
  if (theme === "auto") delete document.documentElement.dataset.theme;
  else document.documentElement.dataset.theme = theme;
  $("theme-button").setAttribute("aria-label", `Theme: ${theme === "auto" ? "automatic" : theme}`);
  $("theme-button").title = `Theme: ${theme === "auto" ? "automatic (follows the system)" : theme}`;
}

// --- wiring ---------------------------------------------------------------------------------------

function wire() {
  $("login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const name = $("login-name").value.trim();
    if (!name) return;
    try {
      app.auth = await devLogin(name);
      await signedIn();
    } catch (error) {
      showLogin(error.message);
    }
  });
  $("token-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const auth = authFromToken($("token-input").value.trim(), false);
    if (!auth) return showLogin("That does not look like a tether token.");
    if (expired(auth)) return showLogin("That token has expired.");
    app.auth = auth;
    store(AUTH_KEY, auth);
    await signedIn();
  });
  $("side-signout").addEventListener("click", () => $("signout-button").click());
  $("signout-button").addEventListener("click", async () => {
    store(AUTH_KEY, null);
    app.auth = null;
    await stopClient();
    history.pushState(null, "", "/");
    showLogin();
  });
  $("new-session").addEventListener("click", () => openSession(newSessionName(), true));
  $("home-new").addEventListener("click", () => openSession(newSessionName(), true));
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = $("composer-input");
    const text = input.value;
    input.value = "";
    autosize();
    send(text);
  });
  const input = $("composer-input");
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  input.addEventListener("input", () => {
    autosize();
    typingChanged();
  });
  input.addEventListener("blur", typingStopped);
  $("stop-button").addEventListener("click", stopRun);
  $("share-button").addEventListener("click", async () => {
    const link = `${location.origin}/s/${encodeURIComponent(app.name ?? "")}`;
    try {
      await navigator.clipboard.writeText(link);
      toast("Link copied. Anyone signed in here with access can open it.");
    } catch {
      toast(link);
    }
  });
  $("jump").addEventListener("click", scrollToBottom);
  $("scroller").addEventListener("scroll", () => {
    if (nearBottom()) $("jump").hidden = true;
  });
  $("banner").querySelector(".banner-close").addEventListener("click", () => { $("banner").hidden = true; });
  $("menu-button").addEventListener("click", () => toggleDrawer("sidebar"));
  $("people-button").addEventListener("click", () => toggleDrawer("people"));
  $("scrim").addEventListener("click", closeDrawers);
  $("theme-button").addEventListener("click", () => {
    const current = load(THEME_KEY) ?? "auto";
    const next = THEMES[(THEMES.indexOf(current) + 1) % THEMES.length];
    store(THEME_KEY, next);
    applyTheme(next);
  });
  $("conn").querySelector(".conn-retry").addEventListener("click", () => {
    if (app.client?.state === ConnectionState.CLOSED) location.reload();
    else app.client?.reconnectNow();
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape") closeDrawers();
    if (event.key === "/" && document.activeElement === document.body && !$("chat").hidden) {
      event.preventDefault();
      $("composer-input").focus();
    }
  });
  window.addEventListener("popstate", route);
  suggestionButtons($("home-suggestions"));
  suggestionButtons($("chat-suggestions"));
}

async function signedIn() {
  $("me").querySelector(".me-name").textContent = app.auth.sub;
  $("side-signout").textContent = `Sign out (${app.auth.sub})`;
  $("me").querySelector(".avatar").replaceWith(avatar(app.auth.sub));
  if (!app.client) startClient();
  refreshSessionList();
  await route();
}

async function boot() {
  applyTheme(load(THEME_KEY) ?? "auto");
  wire();
  try {
    app.config = await (await fetch("/v1/web/config")).json();
  } catch {
    app.config = { dev_login: false, agents: [] };
  }
  // A token can be handed over in the fragment (never sent to a server): /#token=…
  const fragment = new URLSearchParams(location.hash.slice(1));
  if (fragment.get("token")) {
    const auth = authFromToken(fragment.get("token"), false);
    if (auth) store(AUTH_KEY, auth);
    history.replaceState(null, "", location.pathname);
  }
  const auth = load(AUTH_KEY);
  if (auth?.token && (!expired(auth) || (auth.dev && app.config.dev_login))) {
    app.auth = auth;
    await signedIn();
  } else {
    store(AUTH_KEY, null);
    showLogin();
  }
  setInterval(refreshSessionList, 30000);
}

boot();
