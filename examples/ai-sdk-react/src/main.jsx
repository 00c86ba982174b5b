// useChat from @ai-sdk/react against tether. The chat is a tether session, so a reload resumes
// the reply where it is and Stop cancels the run for everyone. Two transports:
//
// - default: tether's TetherChatTransport (the session's WebSocket): every tab and person on
//   the chat also sees every message and answer live;
// - `?transport=http`: the SDK's stock DefaultChatTransport with only `api` and `headers` set,
//   against tether's /v1/ai-sdk/chat endpoints, with `resume: true`.
//
// Query parameters: `server` (tether's URL, default http://127.0.0.1:8765), `chat` (the
// session, `chat-…`; a new one when absent) and `transport`. The token: `#token=…` in the
// address (kept in localStorage), else the dev login of a tether server bound to localhost
// (it allows CORS from loopback origins, such as this page's static server).

import { Chat, useChat } from "@ai-sdk/react";
import {
  DefaultChatTransport,
  lastAssistantMessageIsCompleteWithApprovalResponses,
  lastAssistantMessageIsCompleteWithToolCalls,
} from "ai";
import { useEffect, useState } from "react";
import { createRoot } from "react-dom/client";

import { TetherChatTransport } from "../../../tether/web/sdk/tether.js";

const params = new URLSearchParams(location.search);
const server = (params.get("server") || "http://127.0.0.1:8765").replace(/\/+$/, "");
const mode = params.get("transport") === "http" ? "http" : "tether";
let chatId = params.get("chat");
if (!chatId) {
  chatId = `chat-${Math.random().toString(16).slice(2, 10)}`;
  params.set("chat", chatId);
  history.replaceState(null, "", `?${params}`);
}

async function getToken() {
  const key = `tether-token:${server}`;
  const fragment = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fragment) {
    localStorage.setItem(key, fragment);
    history.replaceState(null, "", location.pathname + location.search); // not in the history
    return fragment;
  }
  const saved = localStorage.getItem(key);
  if (saved) return saved;
  // tether's dev login (localhost only; it allows CORS from loopback origins).
  const response = await fetch(`${server}/v1/dev/login`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ name: "ai-sdk-example" }),
  });
  if (!response.ok) throw new Error(`dev login: ${response.status}`);
  const { token } = await response.json();
  localStorage.setItem(key, token);
  return token;
}

function Part({ part, chat }) {
  if (part.type === "text") return <span className="text">{part.text}</span>;
  if (part.type !== "dynamic-tool" && !part.type.startsWith("tool-")) return null;
  const name = part.toolName ?? part.type.slice(5);
  return (
    <div className="tool" data-tool={name} data-state={part.state}>
      {name}: {part.state}
      {part.state === "output-available" && <code> {JSON.stringify(part.output)}</code>}
      {part.state === "approval-requested" && (
        <>
          {" "}
          <button type="button" onClick={() => chat.addToolApprovalResponse({ id: part.approval.id, approved: true })}>Approve</button>
          <button type="button" onClick={() => chat.addToolApprovalResponse({ id: part.approval.id, approved: false })}>Reject</button>
        </>
      )}
      {part.state === "input-available" && name === "pick_color" && (
        <button type="button" onClick={() => chat.addToolOutput({ tool: name, toolCallId: part.toolCallId, output: { color: "#30a46c" } })}>
          Pick green
        </button>
      )}
    </div>
  );
}

// Approvals and front-end tool answers go back to the run through sendMessages.
const sendAutomaticallyWhen = (options) => lastAssistantMessageIsCompleteWithApprovalResponses(options)
  || lastAssistantMessageIsCompleteWithToolCalls(options);

function View({ chat, messages, sendMessage, status, error, canStop, onStop, conn, transportName }) {
  const [input, setInput] = useState("");
  const onSubmit = (event) => {
    event.preventDefault();
    if (!input.trim()) return;
    sendMessage({ text: input });
    setInput("");
  };
  return (
    <>
      <header>
        <h1>useChat over tether</h1>
        <span id="conn" data-state={conn}>{conn}</span>
        <span id="transport" data-transport={transportName}>{transportName}</span>
        <code id="chat-id">{chat.id}</code>
        <span id="status" data-status={status}>{status}</span>
      </header>
      <main id="messages">
        {messages.map((message) => (
          <div key={message.id} className="msg" data-role={message.role} data-id={message.id}>
            {message.parts.map((part, i) => <Part key={i} part={part} chat={chat} />)}
          </div>
        ))}
      </main>
      {error && <p id="error">{String(error.message || error)}</p>}
      <form onSubmit={onSubmit}>
        <input id="input" value={input} onChange={(e) => setInput(e.target.value)} placeholder="Say something (try: tools)" autoFocus />
        <button id="send" type="submit" disabled={!input.trim()}>Send</button>
        {canStop && <button id="stop" type="button" onClick={onStop}>Stop</button>}
      </form>
    </>
  );
}

// The stock transport: DefaultChatTransport with only `api` and `headers`, `resume: true`
// (a reload replays the active reply from its start), the history from `…/messages`, and
// Stop through `POST …/stop` (useChat's `stop()` alone only stops reading).
function HttpApp({ token, initialMessages }) {
  const [transport] = useState(() => new DefaultChatTransport({
    api: `${server}/v1/ai-sdk/chat`,
    headers: { Authorization: `Bearer ${token}` },
  }));
  const chat = useChat({ id: chatId, transport, messages: initialMessages, resume: true, sendAutomaticallyWhen });
  const { messages, sendMessage, status, error, stop } = chat;
  useEffect(() => { window.tetherExample = { chat, mode }; });
  const onStop = async () => {
    await fetch(`${server}/v1/ai-sdk/chat/${encodeURIComponent(chatId)}/stop`, {
      method: "POST",
      headers: { Authorization: `Bearer ${token}` },
    }); // run.cancel: stops the generation for everyone
    await stop(); // and stop reading
  };
  const busy = status === "submitted" || status === "streaming";
  return (
    <View chat={{ id: chatId, addToolApprovalResponse: chat.addToolApprovalResponse, addToolOutput: chat.addToolOutput }}
      messages={messages} sendMessage={sendMessage} status={status} error={error}
      canStop={busy} onStop={onStop} conn="http" transportName="http" />
  );
}

function App({ chat, transport }) {
  const { messages, sendMessage, status, error, stop } = useChat({ chat });
  const [conn, setConn] = useState(transport.client.state);
  const [active, setActive] = useState(null);
  useEffect(() => transport.client.onState((state) => setConn(state)), [transport]);
  useEffect(() => {
    // The run that Stop cancels: whichever is active in the session, whoever started it.
    let live = true;
    transport.activeRun(chat.id).then((run) => live && setActive(run));
    return () => { live = false; };
  }, [transport, chat, messages, status]);
  const busy = status === "submitted" || status === "streaming";
  const onStop = async () => {
    await transport.stop(chat.id); // run.cancel: stops the generation for everyone
    await stop(); // and stop reading
  };
  return (
    <View chat={chat} messages={messages} sendMessage={sendMessage} status={status} error={error}
      canStop={busy || active} onStop={onStop} conn={conn} transportName="tether" />
  );
}

async function loadMessages(token) {
  const response = await fetch(`${server}/v1/ai-sdk/chat/${encodeURIComponent(chatId)}/messages`, {
    headers: { Authorization: `Bearer ${token}` },
  });
  if (!response.ok) throw new Error(`GET messages: ${response.status}`);
  return response.json();
}

async function main() {
  const root = createRoot(document.getElementById("root"));
  let token;
  try {
    token = await getToken();
  } catch (error) {
    root.render(
      <p id="error">
        No token ({String(error.message || error)}). Open this page with <code>#token=…</code> (see
        README.md: the dev login with curl, or <code>tether token</code>).
      </p>,
    );
    return;
  }
  if (mode === "http") {
    const initialMessages = await loadMessages(token);
    root.render(<HttpApp token={token} initialMessages={initialMessages} />);
    return;
  }
  const transport = new TetherChatTransport({ url: server, token, device: navigator.userAgent.includes("Mobile") ? "phone" : "browser" });
  const chat = new Chat({
    id: chatId,
    transport,
    sendAutomaticallyWhen,
  });
  // Loads the history, adds messages from other tabs and people, and resumes the active reply
  // (after a reload too, like useChat's `resume: true`, and also for runs started elsewhere).
  transport.follow(chat);
  window.tetherExample = { chat, transport };
  root.render(<App chat={chat} transport={transport} />);
}

main();
