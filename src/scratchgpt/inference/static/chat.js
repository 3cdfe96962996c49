// The chat page's script (chat.html); a file of its own so the page's CSP needs no 'unsafe-inline'.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  model: null,         // the served model's name, from /v1/models
  messages: [],        // the conversation as OpenAI chat messages (system prompt added per request)
  controller: null,    // AbortController of the answer being streamed, if any
};

// ---- settings ------------------------------------------------------------------------------

function showTemperature() { $("temperature-value").textContent = Number($("temperature").value).toFixed(2); }
$("temperature").addEventListener("input", showTemperature);
showTemperature();

function apiKey() { return $("api-key").value.trim(); }
function headers() {
  const h = { "Content-Type": "application/json" };
  if (apiKey()) h["Authorization"] = "Bearer " + apiKey();
  return h;
}
function askForKey(message) {
  $("key-label").classList.remove("hidden");
  $("api-key").focus();
  return message || "This server needs an API key: enter it above and send again.";
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (response.status === 401) { $("model").textContent = "API key needed"; askForKey(); return; }
    const card = (await response.json()).data[0];
    state.model = card.id;
    $("model").textContent = card.id;
    const health = await (await fetch("/health")).json();
    if (health.chat === false) $("model").textContent = card.id + " (chat disabled: see the server's log)";
    if (card.max_model_len) {
      $("max-tokens").max = card.max_model_len;
      if (Number($("max-tokens").value) > card.max_model_len) $("max-tokens").value = card.max_model_len;
    }
  } catch (err) {
    $("model").textContent = "server unreachable";
  }
}
$("api-key").addEventListener("change", loadModel);

// ---- the conversation view -----------------------------------------------------------------

function addBubble(role, text) {
  $("empty").classList.add("hidden");
  const bubble = document.createElement("div");
  bubble.className = "message " + role;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;   // textContent, never innerHTML: model output is not trusted markup
  bubble.appendChild(body);
  $("log").appendChild(bubble);
  scrollDown();
  return bubble;
}
function addNote(bubble, text, isError) {
  const note = document.createElement("span");
  note.className = "note" + (isError ? " error" : "");
  note.textContent = text;
  bubble.appendChild(note);
  scrollDown();
}
function scrollDown() { $("log").scrollTop = $("log").scrollHeight; }

function setBusy(busy) {
  $("send").classList.toggle("hidden", busy);
  $("stop").classList.toggle("hidden", !busy);
}

// ---- talking to the server -----------------------------------------------------------------

// Yields the `data:` payload of each server-sent event in a fetch response body.
async function* serverSentEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) !== -1) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (data) yield data;
    }
  }
}

function requestBody(history) {
  const system = $("system").value.trim();
  return {
    model: state.model,
    messages: system ? [{ role: "system", content: system }, ...history] : history,
    stream: true,
    temperature: Number($("temperature").value),
    max_tokens: Math.min(Number($("max-tokens").max), Math.max(1, Math.floor(Number($("max-tokens").value) || 1))),
  };
}

// Streams one answer into `bubble`; returns its text. Older turns are dropped while the
// conversation is too long for the model's context.
async function streamAnswer(bubble, signal) {
  const textNode = bubble.querySelector(".text");
  let history = state.messages.slice();
  for (;;) {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody(history)), signal,
    });
    if (!response.ok) {
      let error = {};
      try { error = (await response.json()).error || {}; } catch (_) { /* not JSON */ }
      if (error.code === "context_length_exceeded" && history.length > 1) {
        history = history.slice(2);  // forget the oldest question and answer, then try again
        continue;
      }
      if (response.status === 401) throw new Error(askForKey());
      throw new Error(error.message || `the server answered ${response.status}`);
    }
    if (history.length < state.messages.length) {
      addNote(bubble, `(the oldest ${state.messages.length - history.length} messages no longer fit the context)`);
    }
    let text = "";
    for await (const data of serverSentEvents(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices[0];
      if (!choice) continue;
      if (choice.delta && choice.delta.content) {
        text += choice.delta.content;
        textNode.textContent = text;
        scrollDown();
      }
      if (choice.finish_reason === "length") addNote(bubble, "(stopped at the max tokens limit)");
    }
    return text;
  }
}

async function send(content) {
  if (!state.model) await loadModel();
  if (!state.model) return;
  state.messages.push({ role: "user", content });
  addBubble("user", content);
  const bubble = addBubble("assistant streaming", "");
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  let answer = "";
  try {
    answer = await streamAnswer(bubble, controller.signal);
  } catch (err) {
    answer = bubble.querySelector(".text").textContent;
    if (err.name === "AbortError") addNote(bubble, "(stopped)");
    else addNote(bubble, "Error: " + err.message, true);
  } finally {
    bubble.classList.remove("streaming");
    if (state.controller === controller) { state.controller = null; setBusy(false); }
  }
  // Only a conversation that is still shown keeps the answer (Clear may have run meanwhile).
  if (bubble.isConnected) state.messages.push({ role: "assistant", content: answer });
}

// ---- wiring --------------------------------------------------------------------------------

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const content = $("input").value.trim();
  if (!content || state.controller) return;
  $("input").value = "";
  autoGrow();
  send(content);
});
$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
function autoGrow() {
  const input = $("input");
  input.style.height = "auto";
  input.style.height = input.scrollHeight + 2 + "px";
}
$("input").addEventListener("input", autoGrow);
$("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
$("clear").addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  state.messages = [];
  for (const bubble of document.querySelectorAll(".message")) bubble.remove();
  $("empty").classList.remove("hidden");
  $("input").focus();
});

loadModel();
