// Demo page: streams from POST /stream (prompt mode), POST /v1/chat/completions (chat mode) or
// POST /stream_chat_beam (beam width > 1). fetch() with a streaming body, since EventSource cannot POST.
// With API keys on, every call carries `Authorization: Bearer <key>` from the API key field (kept for the tab's
// session only, in sessionStorage).
"use strict";

const $ = (id) => document.getElementById(id);
const run = { controller: null, jobId: null, started: 0, firstAt: 0, tokens: 0, text: "", finished: false };
let history = [];  // chat turns: {role, content}

const KEY_STORAGE = "llm-api-key";

// The Authorization header for the key typed in (none when the field is empty).
function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function mode() { return document.querySelector('input[name="mode"]:checked').value; }

function params() {
  return { max_tokens: Number($("max-tokens").value), temperature: Number($("temperature").value),
           backend: $("backend").value };
}

function setState(state) {
  $("output").dataset.state = state;
  $("send").disabled = state === "streaming";
  $("stop").disabled = state !== "streaming";
}

function say(text, info = false) {
  $("message").textContent = text;
  $("message").className = info ? "info" : "";
}

// ---- requests: each knows its URL, its body, and how to read its frames ----

function promptRequest(text) {
  return { url: "/stream", body: { prompt: text, ...params() }, onFrame: nativeFrame };
}

function chatRequest(messages) {
  return { url: "/v1/chat/completions", onFrame: openaiFrame,
           body: { messages, stream: true, stream_options: { include_usage: true }, ...params() } };
}

function beamRequest(messages, width) {
  const { max_tokens, backend } = params();  // beam search is deterministic: the route refuses a temperature
  return { url: "/stream_chat_beam", onFrame: nativeFrame, beam: true,
           body: { messages, beam_width: width, max_tokens, backend } };
}

// Native events: `token`, `done`, `error`, and for beams a `candidates` event first. True when terminal.
function nativeFrame(frame) {
  const data = JSON.parse(frame.data);
  if (frame.event === "token") addToken(data.text, 1);
  else if (frame.event === "candidates") showCandidates(data.candidates);
  else if (frame.event === "done") { complete(data.finish_reason, data.usage); return true; }
  else if (frame.event === "error") { fail(data.error.message); return true; }
  return false;
}

// OpenAI chunks: `data: {...}` with choices[0].delta.content, a usage chunk, then `data: [DONE]`.
function openaiFrame(frame) {
  if (frame.data === "[DONE]") { complete(run.finish, run.usage); return true; }
  const data = JSON.parse(frame.data);
  if (data.error) { fail(data.error.message); return true; }
  const choice = (data.choices || [])[0];
  if (choice && choice.delta && choice.delta.content) addToken(choice.delta.content, 1);
  if (choice && choice.finish_reason) run.finish = choice.finish_reason;
  if (data.usage) run.usage = data.usage;
  return false;
}

// ---- reading a streamed body as server-sent events ----

async function* sseFrames(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let match;
    while ((match = /\r?\n\r?\n/.exec(buffer)) !== null) {
      const block = buffer.slice(0, match.index);
      buffer = buffer.slice(match.index + match[0].length);
      const frame = parseFrame(block);
      if (frame) yield frame;
    }
  }
}

function parseFrame(block) {
  let event = "message";
  const data = [];
  for (const line of block.split(/\r?\n/)) {
    if (!line || line.startsWith(":")) continue;  // keep-alive comments
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") event = value;
    else if (field === "data") data.push(value);
  }
  return data.length ? { event, data: data.join("\n") } : null;
}

// ---- the run: output, live figures, endings ----

function addToken(text, count) {
  const now = performance.now();
  if (!run.firstAt) {
    run.firstAt = now;
    $("ttft").textContent = `${Math.round(now - run.started)} ms`;
  }
  run.tokens += count;
  run.text += text;
  $("output").textContent = run.text;
  $("token-count").textContent = run.tokens;
  const seconds = (now - run.firstAt) / 1000;
  if (run.tokens > 1 && seconds > 0) $("tps").textContent = ((run.tokens - 1) / seconds).toFixed(1);
}

function complete(finishReason, usage) {
  if (run.finished) return;
  run.finished = true;
  $("finish").textContent = finishReason || "–";
  if (usage && usage.completion_tokens) $("token-count").textContent = usage.completion_tokens;
  if (mode() === "chat") {
    history.push({ role: "user", content: run.userText }, { role: "assistant", content: run.text });
    renderHistory();
    $("prompt").value = "";
  }
  setState("done");
}

function fail(message) {
  run.finished = true;
  say(message);
  setState("error");
}

function showCandidates(candidates) {
  const list = $("candidates");
  list.replaceChildren(...candidates.map((c) => {
    const item = document.createElement("li");
    const text = document.createElement("div");
    text.textContent = c.text;
    const scores = document.createElement("div");
    scores.className = "scores";
    scores.textContent = `beam ${fmt(c.beam_score)} · rerank ${fmt(c.rerank_score)} · combined ${fmt(c.combined_score)}`;
    item.append(text, scores);
    return item;
  }));
  list.hidden = false;
}

function fmt(x) { return typeof x === "number" ? x.toFixed(3) : "–"; }

function renderHistory() {
  const panel = $("history");
  panel.replaceChildren(...history.map((turn) => {
    const item = document.createElement("div");
    item.className = `turn ${turn.role}`;
    const role = document.createElement("span");
    role.className = "role";
    role.textContent = turn.role;
    item.append(role, document.createTextNode(turn.content));
    return item;
  }));
  panel.hidden = mode() !== "chat" || history.length === 0;
  panel.scrollTop = panel.scrollHeight;
}

function resetRun(userText) {
  Object.assign(run, { controller: new AbortController(), jobId: null, started: performance.now(), firstAt: 0,
                       tokens: 0, text: "", finished: false, finish: null, usage: null, userText });
  for (const id of ["ttft", "tps", "finish", "job-id"]) $(id).textContent = "–";
  $("token-count").textContent = "0";
  $("output").textContent = "";
  $("candidates").hidden = true;
  $("candidates").replaceChildren();
  say("");
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (response.status === 401) return `401: ${body.error.message} (enter a valid API key above)`;
    return `${response.status}: ${body.error.message}`;
  } catch (_) {
    return `${response.status} ${response.statusText}`;
  }
}

async function send(event) {
  event.preventDefault();
  const text = $("prompt").value;
  if (!text.trim()) { say("Type something to send first."); return; }
  const width = Number($("beam-width").value);
  const messages = mode() === "chat" ? [...history, { role: "user", content: text }] : [{ role: "user", content: text }];
  const request = width > 1 ? beamRequest(messages, width)
    : mode() === "chat" ? chatRequest(messages) : promptRequest(text);
  resetRun(text);
  setState("streaming");
  try {
    const response = await fetch(request.url, {
      method: "POST", headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(request.body), signal: run.controller.signal });
    run.jobId = response.headers.get("X-Job-Id");
    $("job-id").textContent = run.jobId || "–";
    if (response.status === 404 && request.beam) {
      fail("Beam search is not available on this server yet (POST /stream_chat_beam answered 404). "
           + "Set the beam width to 1 to generate without it.");
      return;
    }
    if (!response.ok) { fail(await errorText(response)); return; }
    for await (const frame of sseFrames(response.body)) {
      if (request.onFrame(frame)) break;
    }
    if (!run.finished) fail("The stream ended without a result.");
  } catch (error) {
    if (error.name === "AbortError") return;  // the stop button did it, and said so
    fail(`The request failed: ${error.message}`);
  }
}

function stop() {
  if (run.finished || !run.controller) return;
  run.finished = true;
  run.controller.abort();
  if (run.jobId) fetch(`/jobs/${run.jobId}`, { method: "DELETE", headers: authHeaders() }).catch(() => {});
  say("Stopped: the job was cancelled.", true);
  setState("stopped");
}

function modeChanged() {
  const chat = mode() === "chat";
  $("new-chat").hidden = !chat;
  renderHistory();
}

async function showModel() {
  try {
    const models = await (await fetch("/v1/models", { headers: authHeaders() })).json();
    $("model-name").textContent = models.data[0].id;
  } catch (_) { /* the page works without the name */ }
}

$("api-key").value = sessionStorage.getItem(KEY_STORAGE) || "";
$("api-key").addEventListener("change", () => {
  sessionStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
  showModel();
});
$("form").addEventListener("submit", send);
$("stop").addEventListener("click", stop);
$("new-chat").addEventListener("click", () => { history = []; renderHistory(); });
for (const radio of document.querySelectorAll('input[name="mode"]')) radio.addEventListener("change", modeChanged);
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("form").requestSubmit();
});
showModel();
