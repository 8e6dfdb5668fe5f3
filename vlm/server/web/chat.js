// The vlm chat page. Plain JS, no framework and no build step. It talks to this server only through its public
// Messages API (POST /v1/messages with stream: true, read as server-sent events) and renders every reply with
// text nodes: model output is never parsed as HTML.
"use strict";

const STORE_KEY = "vlm.chat.settings";
const CHAT_KEY = "vlm.chat.conversation"; // sessionStorage: this tab's conversation, kept across a reload
const $ = (id) => document.getElementById(id);

const state = {
  config: null, // GET /web/config: the server's limits
  turns: [], // the conversation: {role, text, images, el, answerEl, failed, forgotten, stopped}
  attached: [], // images waiting to be sent: {name, url, ready: Promise, mediaType, data}
  busy: null, // {controller} while an answer streams
  sending: false, // while send() waits for its images to be ready: a second Enter must not send twice
  unsaved: false, // the conversation is over the browser's storage quota (said once)
  settings: { model: "", temperature: "auto", maxTokens: null, kvCache: "", system: "", apiKey: "" },
};

// ---------- the conversation across a reload ----------

// Kept in sessionStorage, so it lasts as long as the tab and no other tab sees it. Failed turns are left out (their
// text went back into the message box). A conversation over the browser's quota is not kept, and the page says so.
function saveChat() {
  const turns = state.turns.filter((t) => !t.failed).map((t) => ({
    role: t.role,
    text: t.text,
    forgotten: Boolean(t.forgotten),
    stopped: Boolean(t.stopped),
    usage: t.usage,
    images: t.images.map(({ name, mediaType, data, width, height }) => ({ name, mediaType, data, width, height })),
  }));
  try {
    if (turns.length) sessionStorage.setItem(CHAT_KEY, JSON.stringify(turns));
    else sessionStorage.removeItem(CHAT_KEY);
    state.unsaved = false;
  } catch {
    try {
      sessionStorage.removeItem(CHAT_KEY); // an older, shorter copy would come back on a reload
    } catch {
      // storage blocked (some private modes): nothing is kept
    }
    if (!state.unsaved) notify("This conversation is too large for the browser to keep: a reload will lose it.");
    state.unsaved = true;
  }
}

function restoreChat() {
  let saved = [];
  try {
    saved = JSON.parse(sessionStorage.getItem(CHAT_KEY) || "[]");
  } catch {
    // unreadable or blocked storage: start a new chat
  }
  let question = null;
  for (const { role, text, forgotten, stopped, usage, images } of saved) {
    const turn = { role, text, forgotten, stopped, usage, images: images.map((i) => ({ ...i, ok: true })) };
    for (const image of turn.images) image.url = dataUrl(image);
    if (role === "user") {
      turn.el = addUserMessage(turn);
      question = turn;
    } else {
      turn.el = addAnswer();
      renderMarkdown(text, turn.el.querySelector(".content"));
      finishAnswer(turn.el, stopped ? "stopped" : "done", usage || null);
      if (question) question.answerEl = turn.el;
    }
    if (forgotten) forget([turn]);
    state.turns.push(turn);
  }
  if (question && !question.answerEl) { // the page was reloaded while its answer streamed: Regenerate asks again
    question.answerEl = addAnswer();
    finishAnswer(question.answerEl, "stopped", { stop: "not answered: the page was reloaded" });
  }
}

// ---------- settings ----------

function loadSettings() {
  try {
    Object.assign(state.settings, JSON.parse(localStorage.getItem(STORE_KEY) || "{}"));
  } catch {
    // unreadable or blocked storage: start from the defaults
  }
}

function saveSettings() {
  try {
    localStorage.setItem(STORE_KEY, JSON.stringify(state.settings));
  } catch {
    // private mode or a full quota: the settings last for this page only
  }
}

function showSettings() {
  const s = state.settings;
  const auto = s.temperature === "auto";
  $("temperature-auto").checked = auto;
  $("temperature").disabled = auto;
  if (!auto) $("temperature").value = s.temperature;
  $("temperature-value").textContent = auto ? "auto" : Number(s.temperature).toFixed(2);
  $("max-tokens").max = state.config.max_tokens_limit;
  $("max-tokens").value = s.maxTokens ?? ""; // empty: the server's default, shown as the placeholder
  $("max-tokens").placeholder = `${state.config.max_tokens} (the server's default)`;
  $("kv-cache-default").textContent = `The server's default (${state.config.kv_cache === "h2o" ? "H2O" : "full"})`;
  $("kv-cache").value = ["dynamic", "h2o"].includes(s.kvCache) ? s.kvCache : "";
  showCacheHelp();
  $("system").value = s.system;
  $("api-key").value = s.apiKey;
  $("api-key-field").hidden = !state.config.api_key_required && !s.apiKey;
  const serverDefault = state.config.temperature;
  $("temperature-help").textContent = serverDefault === "auto"
    ? "Auto picks 0.2 for code, 0.8 for creative writing and 0.7 otherwise; 0 is greedy."
    : `Auto uses the server's default (${serverDefault}); 0 is greedy.`;
}

// What the chosen KV cache keeps: H2O's budget is the server's, a share of each prompt's length.
function showCacheHelp() {
  const cache = $("kv-cache").value || state.config.kv_cache;
  $("kv-cache-help").textContent = cache === "h2o"
    ? `Keeps ${state.config.h2o_budget}: less memory on long chats, and answers may differ.`
    : "Keeps every past token.";
}

function readSettings() {
  const s = state.settings;
  s.temperature = $("temperature-auto").checked ? "auto" : Number($("temperature").value);
  $("temperature").disabled = s.temperature === "auto";
  $("temperature-value").textContent = s.temperature === "auto" ? "auto" : s.temperature.toFixed(2);
  const typed = $("max-tokens").value.trim();
  const tokens = Number(typed); // "1e2" is 100, as the field itself reads it; "1.7" is no count of tokens
  const limit = state.config.max_tokens_limit;
  const given = typed !== "" && Number.isInteger(tokens) && tokens >= 1;
  s.maxTokens = given ? Math.min(tokens, limit) : null;
  const valid = typed === "" || (given && tokens <= limit);
  $("max-tokens").setAttribute("aria-invalid", String(!valid));
  $("max-tokens-help").textContent = valid ? ""
    : `From 1 to ${limit}; answers use ${s.maxTokens ?? state.config.max_tokens}.`;
  s.kvCache = $("kv-cache").value;
  showCacheHelp();
  s.system = $("system").value;
  s.model = $("model").value || s.model;
  s.apiKey = $("api-key").value.trim();
  saveSettings();
}

// At phone width (chat.css's breakpoint) the open settings cover the page: a modal sheet, with what is behind it
// out of reach of focus and screen readers until Done. Beside the chat on wider screens, they are not modal.
const PHONE = window.matchMedia("(max-width: 720px)");
const TOUCH = window.matchMedia("(pointer: coarse)"); // no Shift on a phone's keyboard: Enter adds a line, Send sends

function sheetMode() {
  const modal = !$("settings").hidden && PHONE.matches;
  for (const behind of document.querySelectorAll(".topbar, main")) behind.inert = modal;
  if (modal) {
    $("settings").setAttribute("role", "dialog");
    $("settings").setAttribute("aria-modal", "true");
  } else {
    $("settings").removeAttribute("role");
    $("settings").removeAttribute("aria-modal");
  }
}

function toggleSettings(open) {
  const panel = $("settings");
  panel.hidden = !open;
  $("settings-toggle").setAttribute("aria-expanded", String(open));
  sheetMode();
  if (open) $("model").focus();
  else $("settings-toggle").focus();
}

function authHeaders() {
  return state.settings.apiKey ? { "x-api-key": state.settings.apiKey } : {};
}

async function loadModels() {
  const select = $("model");
  let names = [];
  try {
    const response = await fetch("/v1/models", { headers: authHeaders() });
    if (response.ok) names = (await response.json()).data.map((m) => m.id);
    else if (response.status === 401) $("api-key-field").hidden = false;
    $("api-key-help").textContent = response.status !== 401 ? ""
      : state.settings.apiKey ? "The server refused this key." : "This server needs an API key.";
  } catch {
    // the server is unreachable: the first message will say so
  }
  select.replaceChildren();
  for (const name of names.length ? names : [state.settings.model || "vlm"]) {
    select.append(new Option(name, name, false, name === state.settings.model));
  }
  if (!names.includes(state.settings.model) && names.length) {
    state.settings.model = names[0];
    saveSettings();
  }
  $("model-name").textContent = names.length ? select.value : "";
}

// ---------- images ----------

function blobToBase64(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).slice(String(reader.result).indexOf(",") + 1));
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

// The first bytes of each format the server takes (its own check, `sniff_media_type`, reads the same ones)
const SIGNATURES = {
  "image/jpeg": [[0xff, 0xd8, 0xff]],
  "image/png": [[0x89, 0x50, 0x4e, 0x47]],
  "image/gif": [[0x47, 0x49, 0x46, 0x38]],
  "image/webp": [[0x52, 0x49, 0x46, 0x46]],
};

async function isImageOfType(file, type) {
  const head = new Uint8Array(await file.slice(0, 4).arrayBuffer());
  return (SIGNATURES[type] || []).some((sig) => sig.every((byte, i) => head[i] === byte));
}

function canvasBlob(canvas, type, quality) {
  return new Promise((resolve) => canvas.toBlob(resolve, type, quality));
}

// Large photos are scaled down to the tiler's pixel budget (max_tiles tiles of tile_size^2): the tiler would pick
// the same grid and cut the same tiles from them anyway, and the upload stays small. Images the server would refuse
// (another format, over max_image_bytes) are re-encoded too. The server's own checks still apply to everything.
async function prepareImage(file) {
  const { image_pixels: budget, max_image_bytes: maxBytes, media_types: types } = state.config;
  let bitmap = null;
  try {
    bitmap = await createImageBitmap(file);
  } catch {
    // a format the browser cannot decode but the server reads is sent as it is, once its bytes say it is one
    if (!types.includes(file.type) || !(await isImageOfType(file, file.type))) {
      throw new Error(`${file.name || "image"}: not a readable image`);
    }
  }
  if (!bitmap && file.size > maxBytes) { // not decodable here, so not scaled down: the server would refuse it
    throw new Error(`${file.name || "image"}: ${file.size.toLocaleString("en")} bytes, over this server's `
      + `${maxBytes.toLocaleString("en")}-byte limit for an image`);
  }
  const pixels = bitmap ? bitmap.width * bitmap.height : 0;
  const shown = bitmap ? { width: bitmap.width, height: bitmap.height } : {}; // as chosen, for the chat's view
  if (!bitmap || (types.includes(file.type) && file.size <= maxBytes && pixels <= budget)) {
    return { ...shown, mediaType: file.type, data: await blobToBase64(file) };
  }
  const scale = Math.min(1, Math.sqrt(budget / pixels));
  const canvas = document.createElement("canvas");
  canvas.width = Math.max(1, Math.floor(bitmap.width * scale)); // floor: width * height stays within the budget
  canvas.height = Math.max(1, Math.floor(bitmap.height * scale));
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#fff"; // transparency goes onto white, as the tiler composites it
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  bitmap.close();
  // the smallest encoding: JPEG for photos, PNG for drawings and screenshots; if even that is over the limit, the
  // server's answer explains
  const candidates = [await canvasBlob(canvas, "image/jpeg", 0.9)];
  if (file.type !== "image/jpeg") candidates.push(await canvasBlob(canvas, "image/png"));
  if (types.includes(file.type) && pixels <= budget) candidates.push(file);
  const blob = candidates.filter(Boolean).reduce((a, b) => (b.size < a.size ? b : a));
  return { ...shown, mediaType: blob.type, data: await blobToBase64(blob) };
}

// the images the next request carries: those of failed and forgotten turns are no longer sent
function imagesInChat() {
  return state.turns.reduce((n, t) => n + (t.failed || t.forgotten ? 0 : t.images.length), 0);
}

function attachFiles(files) {
  const images = [...files].filter((f) => f.type.startsWith("image/"));
  if (files.length && !images.length) notify("Only images can be attached.");
  for (const file of images) {
    const room = state.config.max_images - imagesInChat() - state.attached.length;
    if (room <= 0) {
      const most = state.config.max_images;
      notify(`This server takes at most ${most} images per conversation; start a new chat for more.`);
      break;
    }
    const entry = { name: file.name || "pasted image", url: URL.createObjectURL(file) };
    entry.ready = prepareImage(file).then(
      (prepared) => Object.assign(entry, prepared, { ok: true }),
      (err) => {
        removeAttachment(entry);
        notify(err.message);
      },
    ).finally(renderAttachments);
    state.attached.push(entry);
  }
  renderAttachments();
}

function dataUrl(image) {
  return `data:${image.mediaType};base64,${image.data}`;
}

// The images a failed message put back into the attachments, while they are still there
function restoredImages(turn) {
  return state.attached.filter((entry) => entry.from === turn);
}

function removeAttachment(entry) {
  const index = state.attached.indexOf(entry);
  if (index >= 0) state.attached.splice(index, 1);
  URL.revokeObjectURL(entry.url);
  renderAttachments();
}

function renderAttachments() {
  const list = $("attachments");
  list.replaceChildren(...state.attached.map((entry, i) => {
    const item = el("li", "thumb");
    item.dataset.ready = String(Boolean(entry.ok));
    const img = el("img");
    img.src = entry.url;
    img.alt = entry.name;
    const remove = el("button", "thumb-remove", "×");
    remove.type = "button";
    remove.setAttribute("aria-label", `Remove image ${i + 1} (${entry.name})`);
    remove.addEventListener("click", () => {
      removeAttachment(entry);
      $("prompt").focus();
    });
    item.append(img, remove);
    return item;
  }));
  list.hidden = !state.attached.length;
}

function imageFiles(dataTransfer) {
  if (!dataTransfer) return [];
  const files = [...dataTransfer.files];
  if (files.length) return files;
  return [...dataTransfer.items].filter((i) => i.kind === "file").map((i) => i.getAsFile()).filter(Boolean);
}

// ---------- rendering (text nodes only) ----------

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// `code` and **bold** inside a line, as text nodes and elements (never innerHTML)
function inline(text) {
  const nodes = [];
  const pattern = /`([^`\n]+)`|\*\*([^*\n]+)\*\*/g;
  let last = 0;
  for (let match; (match = pattern.exec(text));) {
    if (match.index > last) nodes.push(document.createTextNode(text.slice(last, match.index)));
    if (match[1] !== undefined) {
      nodes.push(el("code", "", match[1]));
    } else {
      const strong = el("strong"); // its text may hold `code` too
      strong.append(...inline(match[2]));
      nodes.push(strong);
    }
    last = pattern.lastIndex;
  }
  if (last < text.length) nodes.push(document.createTextNode(text.slice(last)));
  return nodes;
}

// A small markdown subset: ``` code blocks (an unclosed one runs to the end, as while streaming), - / 1. lists,
// # headings and paragraphs.
// Lists nest by indentation: `lists` holds the open ones, outermost first, each with its items' indent.
function renderMarkdown(text, container) {
  const blocks = [];
  const lines = text.split("\n");
  let paragraph = [];
  let lists = [];
  const flush = () => {
    if (paragraph.length) {
      const p = el("p");
      paragraph.forEach((line, i) => p.append(...(i ? [el("br")] : []), ...inline(line)));
      blocks.push(p);
    }
    paragraph = [];
    lists = [];
  };
  const openList = (tag, indent, number) => {
    const list = el(tag);
    if (number && number !== "1") list.start = Number(number);
    const parent = lists.at(-1);
    if (parent) parent.list.lastElementChild.append(list); // inside the item above it
    else blocks.push(list);
    lists.push({ list, indent });
    return list;
  };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const fence = line.match(/^\s*```\s*([\w+.-]*)/);
    if (fence) {
      flush();
      const code = [];
      for (i++; i < lines.length && !/^\s*```\s*$/.test(lines[i]); i++) code.push(lines[i]);
      const pre = el("pre");
      const codeEl = el("code", "", code.join("\n"));
      if (fence[1]) pre.dataset.language = fence[1];
      pre.append(codeEl);
      blocks.push(pre);
      continue;
    }
    const item = line.match(/^(\s*)(?:([-*+])|(\d+)[.)])\s+(.*)$/);
    if (item) {
      const indent = item[1].replace(/\t/g, "    ").length;
      const tag = item[2] ? "ul" : "ol";
      if (paragraph.length) flush();
      while (lists.length && lists.at(-1).indent > indent) lists.pop();
      let top = lists.at(-1);
      if (top && top.indent === indent && top.list.tagName.toLowerCase() !== tag) {
        lists.pop(); // "1." after "-" at one depth: a new list beside the old one
        top = null;
      }
      const list = top && top.indent === indent ? top.list : openList(tag, indent, item[3]);
      const li = el("li");
      li.append(...inline(item[4]));
      list.append(li);
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    if (heading) {
      flush();
      const h = el("p", "heading");
      h.setAttribute("role", "heading"); // a heading to screen readers, below the page's own (h1) and Settings (h2)
      h.setAttribute("aria-level", String(Math.min(6, 2 + heading[1].length)));
      h.append(...inline(heading[2]));
      blocks.push(h);
    } else if (!line.trim()) {
      flush();
    } else if (lists.length && /^\s/.test(line)) {
      lists.at(-1).list.lastElementChild.append(el("br"), ...inline(line.trim())); // an item's indented next line
    } else {
      lists = [];
      paragraph.push(line);
    }
  }
  flush();
  container.replaceChildren(...blocks);
}

function scrollToEnd(force) {
  const log = $("messages");
  if (force || log.scrollHeight - log.scrollTop - log.clientHeight < 120) log.scrollTop = log.scrollHeight;
}

function addUserMessage(turn) {
  $("empty").hidden = true;
  const node = el("article", "message user");
  node.setAttribute("aria-label", "You");
  if (turn.images.length) {
    const row = el("div", "message-images");
    for (const image of turn.images) {
      const img = el("img");
      img.src = image.url;
      img.alt = image.name;
      if (image.width && image.height) { // the picture as chosen: the sent copy may be scaled down
        const fit = Math.min(1, 240 / image.width, 180 / image.height); // the box the CSS allows, ratio kept
        img.width = Math.max(1, Math.round(image.width * fit));
        img.height = Math.max(1, Math.round(image.height * fit));
      }
      row.append(img);
    }
    node.append(row);
  }
  if (turn.text) node.append(el("div", "content", turn.text));
  $("messages").append(node);
  scrollToEnd(true);
  return node;
}

function addAnswer() {
  const node = el("article", "message assistant");
  node.setAttribute("aria-label", "Answer");
  node.dataset.state = "waiting";
  node.setAttribute("aria-busy", "true"); // screen readers read the answer once it is complete
  node.append(el("div", "content"), el("div", "meta"));
  $("messages").append(node);
  scrollToEnd(true);
  return node;
}

function usageLine(usage) {
  const parts = [];
  if (usage.input !== undefined) parts.push(`${usage.input} in`);
  if (usage.output !== undefined) parts.push(`${usage.output} out`);
  if (usage.output && usage.seconds > 0) parts.push(`${(usage.output / usage.seconds).toFixed(1)} tok/s`);
  parts.push(usage.stop);
  return parts.join(" · ");
}

function finishAnswer(node, stateName, usage) {
  node.dataset.state = stateName;
  node.setAttribute("aria-busy", "false");
  const meta = node.querySelector(".meta");
  meta.replaceChildren(...(usage ? [el("span", "usage", usageLine(usage))] : []));
  for (const old of document.querySelectorAll(".regenerate")) old.remove();
  const again = el("button", "button ghost small regenerate", "Regenerate");
  again.type = "button";
  again.addEventListener("click", regenerate);
  meta.append(again);
}

function showError(node, message) {
  const box = el("div", "error");
  box.setAttribute("role", "alert");
  box.append(el("strong", "", "Error: "), document.createTextNode(message));
  node.querySelector(".content").after(box);
}

function notify(message) {
  $("notice").textContent = message;
  clearTimeout(notify.timer);
  notify.timer = setTimeout(() => ($("notice").textContent = ""), 8000);
}

// ---------- talking to the server ----------

class ServerError extends Error {
  constructor(message, status = 0, detail = "") {
    super(message);
    this.status = status; // the HTTP status, 0 for an error event in the stream
    this.detail = detail; // the API's own error message
  }
}

// The server's 400 for a conversation longer than the model's context. Its wordings ("the prompt is N tokens, more
// than the model's context of 512", "the conversation is at least N tokens ... and the model's context is 512", "the
// conversation's text is N characters, more than the model's context of 512 tokens can hold") all name it.
const CONTEXT_FULL = /\bmodel's context\b/i;

function contextFull(err) {
  return err instanceof ServerError && err.status === 400 && CONTEXT_FULL.test(err.detail);
}

async function serverError(response) {
  let message = `HTTP ${response.status}`;
  let detail = "";
  try {
    const body = await response.json();
    if (body.error) {
      detail = String(body.error.message);
      message = `${response.status} ${body.error.type}: ${detail}`;
    }
  } catch {
    // not JSON (a proxy's page): the status says enough
  }
  const hints = {
    401: " Set the API key in Settings.",
    413: " Send fewer or smaller images.",
    429: " Try again in a moment.",
    529: " Try again in a moment.",
  };
  const hint = hints[response.status] ?? (/over the [\d,]+-byte limit/.test(detail) ? hints[413] : undefined);
  return new ServerError(hint ? `${message.replace(/[.\s]*$/, "")}.${hint}` : message, response.status, detail);
}

// The request for `turns`, less the failed and forgotten turns and those in `left` (a Set being tried without).
function requestBody(turns, left) {
  const s = state.settings;
  const messages = [];
  for (const turn of turns) {
    if (turn.failed || turn.forgotten || left.has(turn)) continue;
    if (turn.role === "assistant" && !turn.text.trim()) continue;
    const content = turn.images.map((image) => ({
      type: "image",
      source: { type: "base64", media_type: image.mediaType, data: image.data },
    }));
    if (turn.text) content.push({ type: "text", text: turn.text });
    messages.push({ role: turn.role, content });
  }
  const body = {
    model: s.model || "vlm",
    max_tokens: s.maxTokens ?? state.config.max_tokens,
    stream: true,
    messages,
  };
  if (s.system.trim()) body.system = s.system;
  if (s.temperature !== "auto") body.temperature = s.temperature;
  if (s.kvCache) body.kv_cache = s.kvCache;
  return body;
}

// Reads the SSE stream: `onEvent(name, data)` for each event, then `onChunk()` after each network chunk (so the
// page re-renders once per chunk, not once per event). Resolves at the end of the stream.
async function readEvents(response, onEvent, onChunk) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    const events = buffer.split(/\r?\n\r?\n/);
    buffer = done ? "" : events.pop();
    for (const block of events) {
      let name = "message";
      const data = [];
      for (const line of block.split(/\r?\n/)) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) onEvent(name, JSON.parse(data.join("\n")));
    }
    onChunk();
    if (done) return;
  }
}

// The prompt's length in tokens, as the server counts it; null when it does not count it (the answer's request then
// says why).
async function promptTokens(body, signal) {
  const response = await fetch("/v1/messages/count_tokens", {
    method: "POST",
    headers: { "content-type": "application/json", ...authHeaders() },
    body: JSON.stringify(body),
    signal,
  });
  return response.ok ? (await response.json()).input_tokens : null;
}

// Adds the oldest exchange still sent before `userTurn` (a question and its answers) to `left`; false if none is.
function leaveOutOldest(turns, userTurn, left) {
  const end = turns.indexOf(userTurn);
  let i = turns.findIndex((t, k) => k < end && !t.failed && !t.forgotten && !left.has(t));
  if (i < 0) return false;
  do left.add(turns[i++]); while (i < end && turns[i].role !== "user");
  return true;
}

// Marks the turns left out as forgotten: later requests no longer send them, and they are dimmed on screen.
function forget(left) {
  for (const turn of left) {
    turn.forgotten = true;
    for (const node of [turn.el, turn.answerEl]) {
      node?.classList.add("forgotten");
      node?.setAttribute("title", "Forgotten: no longer sent to the model");
    }
  }
}

async function answer(userTurn) {
  const turns = state.turns; // this conversation, even if New chat replaces it while the answer streams
  for (const old of document.querySelectorAll(".regenerate")) old.remove(); // it would redo the wrong answer
  const node = addAnswer();
  userTurn.answerEl = node;
  const content = node.querySelector(".content");
  const controller = new AbortController();
  state.busy = { controller };
  setBusy(true);
  const usage = { stop: "" };
  const reply = { role: "assistant", text: "", images: [], el: node, usage }; // usage: shown again after a reload
  let started = 0;
  let failed = false;
  try {
    // Like the REPL and ChatSession: while the conversation leaves the answer less than its room in the model's
    // context (max_tokens, at most a quarter of the context), or is over the context (the server's 400), the oldest
    // exchanges are left out and the prompt is measured or sent again. They are forgotten only once an answer
    // starts: if even the latest message alone is too long, its error shows and the earlier messages stay.
    const left = new Set();
    const context = state.config.context_tokens;
    let response;
    for (;;) {
      const body = requestBody(turns, left);
      const room = Math.min(body.max_tokens, Math.floor(context / 4));
      const tokens = await promptTokens(body, controller.signal);
      if (tokens !== null && context - tokens < room && leaveOutOldest(turns, userTurn, left)) continue;
      response = await fetch("/v1/messages", {
        method: "POST",
        headers: { "content-type": "application/json", ...authHeaders() },
        body: JSON.stringify(body),
        signal: controller.signal,
      });
      if (response.ok) break; // the server answers once the prompt is encoded, as generation starts
      const err = await serverError(response);
      if (!contextFull(err) || !leaveOutOldest(turns, userTurn, left)) throw err;
    }
    started = performance.now(); // tok/s: from here, not from message_start, which may share a chunk with the end
    if (left.size) {
      forget(left);
      const count = [...left].filter((t) => t.role === "user").length;
      const note = el("p", "context-note", `Older messages left out: the conversation no longer fits the model's `
        + `context with room for an answer, so the ${count === 1 ? "oldest exchange is" : `${count} oldest exchanges are`} forgotten.`);
      note.setAttribute("role", "status");
      node.prepend(note);
    }
    node.dataset.state = "streaming";
    let shown = "";
    const show = () => {
      if (reply.text === shown) return;
      shown = reply.text;
      renderMarkdown(shown, content);
      scrollToEnd(false);
    };
    await readEvents(response, (name, data) => {
      if (name === "message_start") {
        usage.input = data.message.usage.input_tokens;
      } else if (name === "content_block_delta" && data.delta.type === "text_delta") {
        reply.text += data.delta.text;
      } else if (name === "message_delta") {
        usage.output = data.usage.output_tokens;
        usage.stop = data.delta.stop_reason;
        usage.seconds = (performance.now() - started) / 1000;
      } else if (name === "error") {
        throw new ServerError(`${data.error.type}: ${data.error.message}`, 0, data.error.message);
      }
    }, show).finally(show);
    turns.push(reply);
    finishAnswer(node, "done", usage);
  } catch (err) {
    if (err.name === "AbortError") {
      usage.stop = "stopped";
      reply.stopped = true;
      if (reply.text) turns.push(reply);
      finishAnswer(node, "stopped", usage);
    } else {
      userTurn.failed = true; // left out of later requests, so the next message works
      node.classList.add("failed");
      userTurn.el.classList.add("failed");
      const message = err instanceof ServerError ? err.message : `could not reach the server (${err.message})`;
      showError(node, message);
      finishAnswer(node, "error", null);
      if (!$("prompt").value.trim() && !state.attached.length && turns === state.turns) {
        $("prompt").value = userTurn.text; // back in the box to edit, images too (Regenerate sends it as it was)
        autogrow();
        state.attached.push(...userTurn.images.map((image) => ({ ...image, url: dataUrl(image), from: userTurn })));
        renderAttachments();
      }
      failed = true;
    }
  } finally {
    state.busy = null;
    setBusy(false);
    scrollToEnd(failed); // the error, below a message box grown by the text put back, must be in sight
    if (turns === state.turns) saveChat();
  }
}

function setBusy(busy) {
  const hadFocus = document.activeElement === $(busy ? "send" : "stop");
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  document.body.classList.toggle("busy", busy);
  if (hadFocus) $(busy ? "stop" : "prompt").focus(); // a hidden button would drop focus to the page
  else if (!busy && document.activeElement === document.body) $("prompt").focus();
}

async function send() {
  if (state.busy || state.sending) return;
  const text = $("prompt").value.trim();
  if (!text && !state.attached.length) return;
  const images = state.attached.splice(0);
  renderAttachments();
  $("prompt").value = ""; // cleared now: what is typed while the images are prepared is the next draft
  autogrow();
  state.sending = true; // until answer() sets busy: an Enter while a photo is still scaled down sends nothing more
  try {
    await Promise.all(images.map((image) => image.ready));
  } finally {
    state.sending = false;
  }
  const turn = { role: "user", text, images: images.filter((image) => image.ok) };
  if (!turn.text && !turn.images.length) return;
  const refused = state.turns.at(-1);
  if (refused?.role === "user" && refused.failed) { // put back into the box to edit: this message replaces it
    refused.el.remove();
    refused.answerEl?.remove();
    state.turns.pop();
  }
  turn.el = addUserMessage(turn);
  state.turns.push(turn);
  saveChat(); // a reload while the answer streams keeps the question
  await answer(turn);
}

function regenerate() {
  if (state.busy || state.sending) return;
  const index = state.turns.findLastIndex((t) => t.role === "user");
  if (index < 0) return;
  const turn = state.turns[index];
  state.turns.length = index + 1; // drop the answer being redone
  turn.failed = false;
  turn.el.classList.remove("failed");
  turn.answerEl?.remove();
  if ($("prompt").value === turn.text) { // put back when it failed; asked again now, it is not a draft any more
    $("prompt").value = "";
    autogrow();
  }
  restoredImages(turn).forEach(removeAttachment);
  answer(turn);
}

function newChat() {
  state.busy?.controller.abort();
  for (const turn of state.turns) for (const image of turn.images) URL.revokeObjectURL(image.url);
  for (const entry of [...state.attached]) removeAttachment(entry);
  state.turns = [];
  saveChat();
  clearTimeout(notify.timer);
  $("notice").textContent = ""; // what it said was about the old chat
  $("messages").replaceChildren($("empty"));
  $("empty").hidden = false;
  $("prompt").value = "";
  autogrow();
  $("prompt").focus();
}

// the message box grows with its text up to 220px, then scrolls
function autogrow() {
  const box = $("prompt");
  box.style.height = "auto";
  box.style.height = `${Math.min(box.scrollHeight, 220)}px`;
  box.style.overflowY = box.scrollHeight > 220 ? "auto" : "hidden";
}

// ---------- wiring ----------

function wire() {
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  $("prompt").addEventListener("keydown", (event) => {
    // isComposing, or Safari's keyCode 229: the Enter that ends an IME composition only confirms the text
    if (event.key === "Enter" && !event.shiftKey && !TOUCH.matches && !event.isComposing && event.keyCode !== 229) {
      event.preventDefault();
      send();
    }
  });
  $("prompt").addEventListener("input", autogrow);
  $("stop").addEventListener("click", () => state.busy?.controller.abort());
  $("new-chat").addEventListener("click", newChat);
  $("file-input").addEventListener("change", (event) => {
    attachFiles(event.target.files);
    event.target.value = ""; // choosing the same file again fires change again
  });
  $("settings-toggle").addEventListener("click", () => toggleSettings($("settings").hidden));
  $("settings-close").addEventListener("click", () => toggleSettings(false));
  PHONE.addEventListener("change", sheetMode); // a phone turned, a window resized with the settings open
  for (const id of ["temperature-auto", "temperature", "max-tokens", "kv-cache", "system", "api-key", "model"]) {
    $(id).addEventListener("input", readSettings);
    $(id).addEventListener("change", readSettings);
  }
  $("api-key").addEventListener("change", loadModels); // once the key is typed, not per keystroke
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Escape") return;
    // in the open settings, Esc closes them (the answer goes on); elsewhere it stops the answer
    const inSettings = !$("settings").hidden && $("settings").contains(document.activeElement);
    if (state.busy && !inSettings) state.busy.controller.abort();
    else if (!$("settings").hidden) toggleSettings(false);
  });
  document.addEventListener("paste", (event) => {
    const files = imageFiles(event.clipboardData).filter((f) => f.type.startsWith("image/"));
    if (!files.length) return;
    attachFiles(files);
    // an image alone: not its file name into the message; with text (a spreadsheet's copy), the text goes in too
    if (!event.clipboardData.types.includes("text/plain")) event.preventDefault();
  });
  let depth = 0; // dragenter/dragleave fire for every child element crossed
  const overlay = $("drop-overlay");
  const carriesFiles = (event) => [...(event.dataTransfer?.types || [])].includes("Files");
  document.addEventListener("dragenter", (event) => {
    if (!carriesFiles(event)) return;
    depth++;
    overlay.hidden = false;
  });
  document.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (!depth) overlay.hidden = true;
  });
  document.addEventListener("dragover", (event) => {
    if (carriesFiles(event)) event.preventDefault(); // files land here; dragged text drops as usual
  });
  document.addEventListener("drop", (event) => {
    depth = 0;
    overlay.hidden = true;
    if (!carriesFiles(event)) return;
    event.preventDefault();
    attachFiles(imageFiles(event.dataTransfer));
  });
}

async function start() {
  loadSettings();
  wire();
  try {
    const response = await fetch("/web/config");
    state.config = await response.json();
  } catch (err) {
    notify(`Could not read the server's settings (${err.message}); reload the page.`);
    return;
  }
  showSettings();
  if (TOUCH.matches) {
    $("empty-hint").textContent = "Attach one with the paperclip, then type a question. The Send button sends; "
      + "Enter adds a line.";
  }
  await loadModels();
  restoreChat();
  renderAttachments();
  autogrow();
  document.body.dataset.ready = "true";
  $("prompt").focus();
}

start();
