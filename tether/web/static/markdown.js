// A small, safe Markdown renderer for streamed model output.
//
// `parse(text)` turns Markdown into a plain tree (no DOM); `render(tree, document)` builds DOM
// nodes with createElement and textContent only: no HTML from the text is ever interpreted,
// so model output cannot inject markup or script. Links are kept only for http(s) and mailto
// URLs. Unfinished constructs (an open code fence mid-stream) render as what they will become.
//
// Supported: paragraphs (single newlines are line breaks), ATX headings, fenced and indented
// code, block quotes, ordered / unordered / task lists (nested by indentation), tables,
// horizontal rules; inline code, **strong**, *emphasis*, ~~strike~~, [links](https://…),
// bare https:// links, backslash escapes.

const SAFE_URL = /^(https?:\/\/|mailto:)/i;

export function safeUrl(url) {
  const trimmed = String(url).trim();
  // Control characters and whitespace are stripped by browsers before the scheme is read.
  if (/[\u0000-\u001f\u007f\s]/.test(trimmed)) return null;
  return SAFE_URL.test(trimmed) ? trimmed : null;
}

// --- blocks -----------------------------------------------------------------------------------

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)\s*$/;
const HEADING = /^ {0,3}(#{1,6})(?:[ \t]+(.*?))?[ \t#]*$/;
const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
const QUOTE = /^ {0,3}> ?(.*)$/;
const ITEM = /^( {0,12})([-*+]|\d{1,9}[.)])[ \t]+(.*)$/;
const TABLE_SEP = /^ {0,3}\|?\s*:?-{1,}:?\s*(\|\s*:?-{1,}:?\s*)*\|?\s*$/;

export function parse(text) {
  const lines = String(text ?? "").replace(/\r\n?/g, "\n").split("\n");
  return parseLines(lines, 0);
}

function parseLines(lines, depth) {
  const blocks = [];
  let i = 0;
  let paragraph = [];
  const flush = () => {
    if (paragraph.length) {
      blocks.push({ t: "p", c: inline(paragraph.join("\n")) });
      paragraph = [];
    }
  };
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (!line.trim()) {
      flush();
      i += 1;
    } else if ((m = FENCE.exec(line))) {
      flush();
      const fence = m[1];
      const body = [];
      i += 1;
      while (i < lines.length && !(lines[i].trim().startsWith(fence) && lines[i].trim().replace(fence[0].repeat(fence.length), "").trim() === "" && lines[i].trim()[0] === fence[0])) {
        body.push(lines[i]);
        i += 1;
      }
      i += 1; // the closing fence (or the end, while the stream is still open)
      blocks.push({ t: "code", lang: m[2] || "", v: body.join("\n") });
    } else if ((m = HEADING.exec(line))) {
      flush();
      blocks.push({ t: "h", level: m[1].length, c: inline(m[2] ?? "") });
      i += 1;
    } else if (RULE.test(line) && !paragraph.length) {
      blocks.push({ t: "hr" });
      i += 1;
    } else if (QUOTE.test(line)) {
      flush();
      const body = [];
      while (i < lines.length && (m = QUOTE.exec(lines[i]))) {
        body.push(m[1]);
        i += 1;
      }
      blocks.push({ t: "quote", c: depth < 8 ? parseLines(body, depth + 1) : [{ t: "p", c: [{ t: "text", v: body.join("\n") }] }] });
    } else if (ITEM.test(line) && (!paragraph.length || /^\s*([-*+]|1[.)])\s/.test(line))) {
      flush();
      const [list, next] = parseList(lines, i, depth);
      blocks.push(list);
      i = next;
    } else if (line.includes("|") && i + 1 < lines.length && TABLE_SEP.test(lines[i + 1]) && lines[i + 1].includes("-")) {
      flush();
      const header = cells(line);
      const align = cells(lines[i + 1]).map((c) => (c.startsWith(":") && c.endsWith(":") ? "center" : c.endsWith(":") ? "right" : c.startsWith(":") ? "left" : ""));
      const rows = [];
      i += 2;
      while (i < lines.length && lines[i].includes("|") && lines[i].trim()) {
        rows.push(cells(lines[i]).map((c) => inline(c)));
        i += 1;
      }
      blocks.push({ t: "table", align, head: header.map((c) => inline(c)), rows });
    } else if (/^( {4}|\t)/.test(line) && !paragraph.length) {
      const body = [];
      while (i < lines.length && (/^( {4}|\t)/.test(lines[i]) || !lines[i].trim())) {
        body.push(lines[i].replace(/^( {4}|\t)/, ""));
        i += 1;
      }
      while (body.length && !body[body.length - 1].trim()) body.pop();
      blocks.push({ t: "code", lang: "", v: body.join("\n") });
    } else {
      paragraph.push(line.replace(/^ {0,3}/, ""));
      i += 1;
    }
  }
  flush();
  return blocks;
}

function cells(line) {
  let s = line.trim();
  if (s.startsWith("|")) s = s.slice(1);
  if (s.endsWith("|") && !s.endsWith("\\|")) s = s.slice(0, -1);
  const out = [];
  let cell = "";
  for (let k = 0; k < s.length; k += 1) {
    if (s[k] === "\\" && s[k + 1] === "|") {
      cell += "|";
      k += 1;
    } else if (s[k] === "|") {
      out.push(cell.trim());
      cell = "";
    } else {
      cell += s[k];
    }
  }
  out.push(cell.trim());
  return out;
}

function parseList(lines, start, depth) {
  const first = ITEM.exec(lines[start]);
  const indent = first[1].length;
  const ordered = /\d/.test(first[2]);
  const list = { t: ordered ? "ol" : "ul", start: ordered ? parseInt(first[2], 10) : 1, items: [] };
  let i = start;
  while (i < lines.length) {
    const m = ITEM.exec(lines[i]);
    if (!m || m[1].length !== indent || /\d/.test(m[2]) !== ordered) break;
    const body = [m[3]];
    i += 1;
    // Continuation: deeper-indented lines (nested lists, wrapped text) and lazy lines.
    while (i < lines.length) {
      const line = lines[i];
      if (!line.trim()) {
        const nextLine = lines[i + 1];
        if (nextLine !== undefined && nextLine.trim() && leading(nextLine) > indent) {
          body.push("");
          i += 1;
          continue;
        }
        break;
      }
      const sub = ITEM.exec(line);
      if (sub && sub[1].length <= indent) break;
      if (!sub && leading(line) <= indent && (FENCE.test(line) || HEADING.test(line) || QUOTE.test(line))) break;
      body.push(line.slice(Math.min(leading(line), indent + 2)));
      i += 1;
    }
    let task = null;
    const taskMatch = /^\[([ xX])\]\s+/.exec(body[0]);
    if (taskMatch) {
      task = taskMatch[1] !== " ";
      body[0] = body[0].slice(taskMatch[0].length);
    }
    const content = depth < 8 ? parseLines(body, depth + 1) : [{ t: "p", c: [{ t: "text", v: body.join("\n") }] }];
    // A "tight" item renders its single paragraph without <p>.
    const tight = content.length >= 1 && content[0].t === "p" ? [{ t: "span", c: content[0].c }, ...content.slice(1)] : content;
    list.items.push({ task, c: tight });
    if (i < lines.length && !lines[i].trim()) break;
  }
  return [list, i];
}

function leading(line) {
  return line.length - line.trimStart().length;
}

// --- inline -----------------------------------------------------------------------------------

const ESCAPABLE = "\\`*_{}[]()#+-.!|~>";

export function inline(text) {
  const out = [];
  let buffer = "";
  const push = (node) => {
    if (buffer) {
      out.push({ t: "text", v: buffer });
      buffer = "";
    }
    out.push(node);
  };
  let i = 0;
  while (i < text.length) {
    const ch = text[i];
    if (ch === "\\" && i + 1 < text.length && ESCAPABLE.includes(text[i + 1])) {
      buffer += text[i + 1];
      i += 2;
    } else if (ch === "\\" && text[i + 1] === "\n") {
      push({ t: "br" });
      i += 2;
    } else if (ch === "\n") {
      push({ t: "br" });
      i += 1;
    } else if (ch === "`") {
      let ticks = 1;
      while (text[i + ticks] === "`") ticks += 1;
      const fence = "`".repeat(ticks);
      const end = text.indexOf(fence, i + ticks);
      if (end === -1) {
        buffer += fence;
        i += ticks;
      } else {
        let code = text.slice(i + ticks, end);
        if (/^ .* $/.test(code)) code = code.slice(1, -1);
        push({ t: "code", v: code });
        i = end + ticks;
      }
    } else if ((ch === "*" || ch === "_" || ch === "~") && text[i + 1] === ch) {
      const marker = ch + ch;
      const end = findClose(text, marker, i + 2);
      const t = ch === "~" ? "del" : "strong";
      if (end !== -1 && end > i + 2) {
        push({ t, c: inline(text.slice(i + 2, end)) });
        i = end + 2;
      } else {
        buffer += marker;
        i += 2;
      }
    } else if ((ch === "*" || ch === "_") && text[i + 1] && !/\s/.test(text[i + 1])) {
      // `_` only at word boundaries, so snake_case stays as it is.
      const leftOk = ch === "*" || i === 0 || !/[A-Za-z0-9]/.test(text[i - 1]);
      const end = leftOk ? findClose(text, ch, i + 1) : -1;
      const rightOk = end !== -1 && (ch === "*" || end + 1 >= text.length || !/[A-Za-z0-9]/.test(text[end + 1]));
      if (rightOk && !/\s/.test(text[end - 1])) {
        push({ t: "em", c: inline(text.slice(i + 1, end)) });
        i = end + 1;
      } else {
        buffer += ch;
        i += 1;
      }
    } else if (ch === "[" || (ch === "!" && text[i + 1] === "[")) {
      const image = ch === "!";
      const open = image ? i + 1 : i;
      const close = matchBracket(text, open);
      if (close !== -1 && text[close + 1] === "(") {
        const end = matchParen(text, close + 1);
        if (end !== -1) {
          const target = text.slice(close + 2, end).trim().split(/\s+/)[0] ?? "";
          const label = text.slice(open + 1, close);
          const href = safeUrl(target.replace(/^<|>$/g, ""));
          // Images are shown as links: no remote content is fetched by rendering a message.
          const children = image ? [{ t: "text", v: label || target }] : inline(label);
          push(href ? { t: "a", href, c: children } : { t: "span", c: children });
          i = end + 1;
          continue;
        }
      }
      buffer += ch;
      i += 1;
    } else if ((ch === "h" || ch === "H") && /^https?:\/\//i.test(text.slice(i, i + 8)) && (i === 0 || /[\s(]/.test(text[i - 1]))) {
      let end = i;
      while (end < text.length && !/[\s<>]/.test(text[end])) end += 1;
      while (end > i && /[.,;:!?)'"]/.test(text[end - 1])) end -= 1;
      const url = text.slice(i, end);
      const href = safeUrl(url);
      if (href) push({ t: "a", href, c: [{ t: "text", v: url }] });
      else buffer += url;
      i = end;
    } else {
      buffer += ch;
      i += 1;
    }
  }
  if (buffer) out.push({ t: "text", v: buffer });
  return out;
}

function findClose(text, marker, from) {
  let i = from;
  while (i < text.length) {
    if (text[i] === "\\") {
      i += 2;
      continue;
    }
    if (text[i] === "`") {
      const end = text.indexOf("`", i + 1);
      if (end === -1) return -1;
      i = end + 1;
      continue;
    }
    if (text.startsWith(marker, i) && (marker.length === 2 || text[i + 1] !== marker)) return i;
    if (marker.length === 1 && text.startsWith(marker + marker, i)) {
      i += 2;
      continue;
    }
    i += 1;
  }
  return -1;
}

function matchParen(text, open) {
  let depth = 0;
  for (let i = open; i < text.length; i += 1) {
    if (text[i] === "\\") i += 1;
    else if (text[i] === "(") depth += 1;
    else if (text[i] === ")" && --depth === 0) return i;
    else if (text[i] === "\n") return -1;
  }
  return -1;
}

function matchBracket(text, open) {
  let depth = 0;
  for (let i = open; i < text.length; i += 1) {
    if (text[i] === "\\") {
      i += 1;
    } else if (text[i] === "[") {
      depth += 1;
    } else if (text[i] === "]") {
      depth -= 1;
      if (depth === 0) return i;
    } else if (text[i] === "\n" && text[i + 1] === "\n") {
      return -1;
    }
  }
  return -1;
}

// --- DOM --------------------------------------------------------------------------------------

/** Build DOM nodes for `tree` (from parse) with `doc`; returns a DocumentFragment. */
export function render(tree, doc = globalThis.document) {
  const fragment = doc.createDocumentFragment();
  for (const block of tree) fragment.append(renderNode(block, doc));
  return fragment;
}

/** Markdown text → DocumentFragment, safely. */
export function renderMarkdown(text, doc = globalThis.document) {
  return render(parse(text), doc);
}

function el(doc, tag, children, attrs) {
  const node = doc.createElement(tag);
  if (attrs) for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const child of children ?? []) node.append(renderNode(child, doc));
  return node;
}

function renderNode(node, doc) {
  switch (node.t) {
    case "text":
      return doc.createTextNode(node.v);
    case "br":
      return doc.createElement("br");
    case "code": {
      if (node.lang !== undefined) {
        const pre = doc.createElement("pre");
        const code = doc.createElement("code");
        if (node.lang) code.dataset.lang = node.lang.replace(/[^A-Za-z0-9_+-]/g, "");
        code.textContent = node.v;
        pre.append(code);
        return pre;
      }
      const code = doc.createElement("code");
      code.textContent = node.v;
      return code;
    }
    case "p":
      return el(doc, "p", node.c);
    case "span":
      return el(doc, "span", node.c);
    case "strong":
      return el(doc, "strong", node.c);
    case "em":
      return el(doc, "em", node.c);
    case "del":
      return el(doc, "del", node.c);
    case "a": {
      const a = el(doc, "a", node.c);
      a.href = node.href; // already checked by safeUrl
      a.target = "_blank";
      a.rel = "noopener noreferrer nofollow";
      return a;
    }
    case "h":
      return el(doc, `h${Math.min(6, Math.max(1, node.level))}`, node.c);
    case "hr":
      return doc.createElement("hr");
    case "quote":
      return el(doc, "blockquote", node.c);
    case "ul":
    case "ol": {
      const list = doc.createElement(node.t);
      if (node.t === "ol" && node.start !== 1) list.setAttribute("start", String(node.start));
      for (const item of node.items) {
        const li = el(doc, "li", item.c);
        if (item.task !== null) {
          const box = doc.createElement("input");
          box.type = "checkbox";
          box.disabled = true;
          box.checked = item.task;
          li.prepend(box);
          li.className = "task";
        }
        list.append(li);
      }
      return list;
    }
    case "table": {
      const wrap = doc.createElement("div");
      wrap.className = "table-wrap";
      const table = doc.createElement("table");
      const thead = doc.createElement("thead");
      const tr = doc.createElement("tr");
      node.head.forEach((cell, k) => {
        const th = el(doc, "th", cell);
        if (node.align[k]) th.style.textAlign = node.align[k];
        tr.append(th);
      });
      thead.append(tr);
      const tbody = doc.createElement("tbody");
      for (const row of node.rows) {
        const r = doc.createElement("tr");
        row.forEach((cell, k) => {
          const td = el(doc, "td", cell);
          if (node.align[k]) td.style.textAlign = node.align[k];
          r.append(td);
        });
        tbody.append(r);
      }
      table.append(thead, tbody);
      wrap.append(table);
      return wrap;
    }
    default:
      return doc.createTextNode("");
  }
}
