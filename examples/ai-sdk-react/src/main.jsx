// useChat from @ai-sdk/react with tether's TetherChatTransport: the chat is a tether session,
// so a reload resumes the reply where it is, every tab and person on the chat sees it live,
// and Stop cancels the run for everyone.
//
// Query parameters: `server` (tether's URL, default http://127.0.0.1:8765) and `chat` (the
// session, `chat-…`; a new one when absent). The token: `#token=…` in the address (kept in
// localStorage), else the dev login of a tether server bound to localhost.

import { Chat, useChat } from "@ai-sdk/react";
import {
  lastAssistantMessageIsCompleteWithApprovalResponses,
  lastAssistantMessageIsCompleteWithToolCalls,
} from "ai";
import { useEffect, useState } from "react";
import { createRoot } from "react-dom/client";

import { TetherChatTransport } from "../../../tether/web/sdk/tether.js";

const params = new URLSearchParams(location.search);
const server = (params.get("server") || "http://127.0.0.1:8765").replace(/\/+$/, "");
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
  // Works when this page may call the dev login (same origin as tether, or CORS allowed).
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

function App({ chat, transport }) {
  const { messages, sendMessage, status, error, stop } = useChat({ chat });
  const [input, setInput] = useState("");
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

  const onSubmit = (event) => {
    event.preventDefault();
    if (!input.trim()) return;
    sendMessage({ text: input });
    setInput("");
  };
  const onStop = async () => {
    await transport.stop(chat.id); // run.cancel: stops the generation for everyone
    await stop(); // and stop reading
  };

  return (
    <>
      <header>
        <h1>useChat over tether</h1>
        <span id="conn" data-state={conn}>{conn}</span>
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
        {(busy || active) && <button id="stop" type="button" onClick={onStop}>Stop</button>}
      </form>
    </>
  );
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
  const transport = new TetherChatTransport({ url: server, token, device: navigator.userAgent.includes("Mobile") ? "phone" : "browser" });
  const chat = new Chat({
    id: chatId,
    transport,
    // Approvals and front-end tool answers go back to the run through sendMessages.
    sendAutomaticallyWhen: (options) => lastAssistantMessageIsCompleteWithApprovalResponses(options)
      || lastAssistantMessageIsCompleteWithToolCalls(options),
  });
  // Loads the history, adds messages from other tabs and people, and resumes the active reply
  // (after a reload too, like useChat's `resume: true`, and also for runs started elsewhere).
  transport.follow(chat);
  window.tetherExample = { chat, transport };
  root.render(<App chat={chat} transport={transport} />);
}

main();
