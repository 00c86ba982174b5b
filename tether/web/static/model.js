// The web app's view of a session: a pure fold of the session log into a transcript.
//
// No DOM, no I/O: `apply(model, item)` takes one SDK item (event or snapshot) and returns the
// ids of the timeline entries it changed (or "reset" for a snapshot). The model is plain JSON
// so the SDK can save it with the cursor (saveState) and a reload restores both together.

export const FINAL_STATES = new Set(["completed", "failed", "cancelled"]);
export const ACTIVE_STATES = new Set(["running", "awaiting_tool", "awaiting_approval"]);

export function emptyModel() {
  return {
    v: 1,
    items: [], // the timeline, in log order
    index: {}, // item id → position in items
    runs: {}, // run id → {id, agent, trigger, state, error, by, input, order}
    runOrder: [],
    epoch: null,
    lastSeq: 0,
    deltas: 0, // stream.append events applied
    dupes: 0, // events ignored because their seq was already applied (should stay 0)
    mismatches: 0, // stream.end whose text differs from the deltas applied (should stay 0)
  };
}

function put(model, item) {
  if (item.id in model.index) {
    model.items[model.index[item.id]] = item;
  } else {
    model.index[item.id] = model.items.length;
    model.items.push(item);
  }
  return item.id;
}

function get(model, id) {
  const at = model.index[id];
  return at === undefined ? undefined : model.items[at];
}

function run(model, id) {
  if (!model.runs[id]) {
    model.runs[id] = { id, agent: "", trigger: "", state: "queued", error: null, by: null, input: null };
    model.runOrder.push(id);
  }
  return model.runs[id];
}

function toolItem(model, data) {
  const id = `c:${data.call}`;
  let item = get(model, id);
  if (!item) {
    item = {
      id, kind: "tool", run: data.run, call: data.call, name: String(data.name ?? "tool"),
      arguments: data.arguments ?? null, target: "server", status: "pending",
      approval: null, result: undefined, error: null, by: null, expiresAt: null,
    };
  } else {
    item = { ...item };
  }
  return item;
}

/** Apply one SDK item. Returns "reset" (rebuild everything) or the ids of changed entries. */
export function apply(model, item) {
  if (item.snapshot) {
    const fresh = emptyModel();
    Object.assign(model, fresh);
    for (const event of item.events) applyEvent(model, event);
    if (item.cursor) {
      const at = item.cursor.lastIndexOf(":");
      model.epoch = item.cursor.slice(0, at);
      model.lastSeq = Number(item.cursor.slice(at + 1));
    }
    return "reset";
  }
  return applyEvent(model, item);
}

export function applyEvent(model, event) {
  if (event.transient) return [];
  if (event.cursor) {
    if (event.epoch === model.epoch && event.seq <= model.lastSeq) {
      model.dupes += 1; // the SDK promises exactly once: count, never apply twice
      return [];
    }
    model.epoch = event.epoch;
    model.lastSeq = event.seq;
  }
  const data = event.data && typeof event.data === "object" ? event.data : {};
  const changed = [];
  switch (event.type) {
    case "message": {
      const text = typeof event.data === "string" ? event.data : String(data.text ?? "");
      changed.push(put(model, { id: `m:${event.seq}`, kind: "message", seq: event.seq, text, sender: event.sender, time: event.time }));
      break;
    }
    case "run.created": {
      const r = run(model, data.run);
      Object.assign(r, { agent: data.agent ?? "", trigger: data.trigger ?? "", input: data.input ?? null, created: event.time });
      if (data.trigger && data.trigger !== "message") {
        const text = data.input && typeof data.input === "object" ? String(data.input.text ?? "") : String(data.input ?? "");
        changed.push(put(model, { id: `r:${data.run}`, kind: "notice", tone: "info", run: data.run, text: `Run started by ${data.trigger === "schedule" ? "a schedule" : "the API"}${text ? `: ${text}` : ""}`, time: event.time }));
      }
      break;
    }
    case "run.state": {
      const r = run(model, data.run);
      r.state = String(data.state ?? r.state);
      if (data.error) r.error = String(data.error);
      if (data.by) r.by = data.by;
      if (r.state === "failed") {
        changed.push(put(model, { id: `f:${data.run}`, kind: "notice", tone: "error", run: data.run, text: `Run failed: ${r.error ?? "unknown error"}`, time: event.time }));
      } else if (r.state === "cancelled") {
        const by = r.cancelledBy ?? data.by;
        const who = by?.sub ? ` by ${by.sub}` : "";
        changed.push(put(model, { id: `x:${data.run}`, kind: "notice", tone: "warn", run: data.run, text: `Stopped${who}`, time: event.time }));
      }
      changed.push(`run:${data.run}`);
      break;
    }
    case "run.cancel": {
      const r = run(model, data.run);
      r.cancelledBy = data.by ?? null;
      break;
    }
    case "run.steer": {
      changed.push(put(model, { id: `m:${event.seq}`, kind: "message", steer: true, seq: event.seq, text: String(data.text ?? ""), sender: data.by ? { sub: data.by.sub, client: data.by.client, kind: "human" } : event.sender, time: event.time }));
      break;
    }
    case "stream.append": {
      const id = `s:${data.stream}`;
      const current = get(model, id);
      const item = current ? { ...current } : { id, kind: "assistant", stream: data.stream, run: data.run ?? null, text: "", done: false, interrupted: null, fromDeltas: true, sender: event.sender, time: event.time };
      if (!item.done) item.text += String(data.text ?? "");
      model.deltas += 1;
      changed.push(put(model, item));
      break;
    }
    case "stream.end": {
      const id = `s:${data.stream}`;
      const current = get(model, id);
      const full = typeof data.text === "string" ? data.text : current?.text ?? "";
      if (current?.fromDeltas && current.text !== full) model.mismatches += 1;
      const item = { ...(current ?? { id, kind: "assistant", stream: data.stream, run: data.run ?? null, fromDeltas: false, sender: event.sender, time: event.time }) };
      item.text = full;
      item.done = true;
      item.interrupted = data.interrupted ?? null;
      changed.push(put(model, item));
      break;
    }
    case "approval.request": {
      const item = toolItem(model, data);
      item.status = "awaiting_approval";
      item.arguments = data.arguments ?? item.arguments;
      item.approval = { status: "pending", requested: data.arguments ?? null, decision: null, by: null, arguments: null };
      item.expiresAt = data.expires_at ?? null;
      changed.push(put(model, item));
      break;
    }
    case "approval.decision": {
      const item = toolItem(model, data);
      const decision = String(data.decision ?? "");
      item.approval = { ...(item.approval ?? { requested: item.arguments }), status: decision, decision, by: data.by ?? null, arguments: data.arguments ?? null };
      item.status = decision === "approve" ? "approved" : decision === "expired" ? "expired" : "rejected";
      if (decision === "approve" && data.arguments && typeof data.arguments === "object") item.arguments = data.arguments;
      changed.push(put(model, item));
      break;
    }
    case "tool.call": {
      const item = toolItem(model, data);
      item.name = String(data.name ?? item.name);
      item.arguments = data.arguments ?? item.arguments;
      item.target = data.target === "client" ? "client" : "server";
      item.status = item.target === "client" ? "awaiting_client" : "running";
      item.expiresAt = data.expires_at ?? item.expiresAt;
      changed.push(put(model, item));
      break;
    }
    case "tool.result": {
      const item = toolItem(model, data);
      if ("error" in data && data.error !== null && data.error !== undefined) {
        item.error = String(data.error);
        item.status = item.status === "rejected" || item.status === "expired" ? item.status : "error";
      } else {
        item.result = data.result === undefined ? null : data.result;
        item.status = "done";
      }
      item.by = data.by ?? null;
      changed.push(put(model, item));
      break;
    }
    case "run.snapshot":
    case "run.delta":
    case "run.checkpoint": // an agent's own state (a framework's run state): not for people
      break;
    default: {
      if (event.type.startsWith("tether.")) break;
      changed.push(put(model, { id: `e:${event.seq}`, kind: "event", seq: event.seq, type: event.type, data: event.data, sender: event.sender, time: event.time }));
    }
  }
  return changed;
}

/** The run people should see in the status bar: the active one, else the newest queued. */
export function runStatus(model) {
  let active = null;
  let queued = 0;
  for (const id of model.runOrder) {
    const r = model.runs[id];
    if (ACTIVE_STATES.has(r.state)) active = r;
    else if (r.state === "queued") queued += 1;
  }
  const last = model.runOrder.length ? model.runs[model.runOrder[model.runOrder.length - 1]] : null;
  let streaming = false;
  if (active) {
    for (let i = model.items.length - 1; i >= 0; i -= 1) {
      const item = model.items[i];
      if (item.run === active.id && item.kind === "assistant") {
        streaming = !item.done;
        break;
      }
    }
  }
  return { active, queued, last, streaming };
}

/** Tool calls waiting for someone: approvals and front-end tools, newest last. */
export function waiting(model) {
  return model.items.filter((item) => item.kind === "tool" && (item.status === "awaiting_approval" || item.status === "awaiting_client")
    && !FINAL_STATES.has(model.runs[item.run]?.state));
}

/** A short title for the session list: the first message. */
export function title(model) {
  const first = model.items.find((item) => item.kind === "message" && item.text);
  return first ? first.text.slice(0, 80) : "";
}
