// The chat page: keeps the conversation here, sends all of it to /v1/chat/completions with
// stream: true, and shows the answer as its server-sent events arrive.
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = $("conversation");
const input = $("message");
const statusLine = $("status");

const chat = {
  model: null,
  messages: [],       // {role, content}: what the next request sends
  controller: null,   // aborts the answer being streamed (Stop, New chat)
};

function headers() {
  const result = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) result.Authorization = `Bearer ${key}`;
  return result;
}

async function errorText(response) {
  try {
    return (await response.json()).error.message;
  } catch {
    return `HTTP ${response.status}`;
  }
}

// The oldest turn (a user message and what answered it; never the system prompt) leaves the
// conversation; false if only the question being asked is left.
function dropOldestTurn(messages) {
  const first = messages.findIndex((m) => m.role !== "system");
  const next = messages.findIndex((m, i) => i > first && m.role === "user");
  if (first < 0 || next < 0) return false;
  messages.splice(first, next - first);
  return true;
}

async function isContextExceeded(response) {
  if (response.status !== 400) return false;
  try {
    return (await response.clone().json()).error.code === "context_length_exceeded";
  } catch {
    return false;
  }
}

// Sends the request; while the server answers that the conversation exceeds the model's context,
// drops its oldest turn and asks again (as ollama does), with a one-line notice.
async function fetchWithinContext(request, signal) {
  let dropped = 0;
  for (;;) {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(request), signal,
    });
    if (!(await isContextExceeded(response)) || !dropOldestTurn(request.messages)) {
      if (dropped) {
        const answer = conversation.lastChild; // the notice goes above the answer it made room for
        conversation.insertBefore(bubble("notice", `The conversation outgrew the model's context: its ${dropped} `
          + `oldest turn${dropped > 1 ? "s were" : " was"} dropped.`), answer);
      }
      return response;
    }
    dropped += 1;
  }
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = `message ${role}`;
  div.textContent = text;
  conversation.appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function setBusy(busy) {
  document.body.dataset.state = busy ? "streaming" : "idle";
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

async function loadModel() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) {
    statusLine.textContent = `${await errorText(response)}${response.status === 401 ? " (enter the key under Settings)" : ""}`;
    return false;
  }
  chat.model = (await response.json()).data[0].id;
  $("model").textContent = chat.model;
  return true;
}

// Yields each JSON event of a server-sent event stream until "data: [DONE]".
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function showSpeed(tokens, sent, first, last) {
  const parts = [`${tokens} tokens`];
  if (first) parts.push(`first token after ${((first - sent) / 1000).toFixed(2)} s`);
  if (tokens > 1 && last > first) parts.push(`${((tokens - 1) / ((last - first) / 1000)).toFixed(1)} tokens/s`);
  statusLine.textContent = parts.join(" · ");
}

async function send(text) {
  if (!chat.model && !(await loadModel())) return;
  const system = $("system").value.trim();
  const messages = chat.messages; // "New chat" starts another list; this answer belongs to this one
  if (system && messages.length === 0) messages.push({ role: "system", content: system });
  messages.push({ role: "user", content: text });
  bubble("user", text);
  const answer = bubble("assistant", "");
  answer.dataset.state = "streaming";
  const request = {
    model: chat.model, messages, stream: true, stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
  };
  if ($("max-tokens").value) request.max_tokens = Number($("max-tokens").value);

  chat.controller = new AbortController();
  setBusy(true);
  const sent = performance.now();
  let tokens = 0, first = 0, last = 0;
  try {
    const response = await fetchWithinContext(request, chat.controller.signal);
    if (!response.ok) throw new Error(await errorText(response));
    for await (const event of events(response)) {
      if (event.error) throw new Error(event.error.message);
      if (event.usage) tokens = event.usage.completion_tokens;
      const delta = event.choices.length ? event.choices[0].delta : null;
      if (delta && delta.content) {
        answer.textContent += delta.content;
        tokens += 1;
        last = performance.now();
        if (!first) first = last;
        answer.scrollIntoView({ block: "end" });
      }
      showSpeed(tokens, sent, first, last);
    }
    messages.push({ role: "assistant", content: answer.textContent });
  } catch (error) {
    if (error.name === "AbortError") {
      // keep what arrived: the next turn continues from it
      messages.push({ role: "assistant", content: answer.textContent });
      const note = document.createElement("span");
      note.className = "stopped";
      note.textContent = " [stopped]";
      answer.appendChild(note);
    } else {
      messages.pop(); // the question did not get an answer: leave it out of the next request
      answer.className = "message error";
      answer.textContent = error.message;
    }
  } finally {
    answer.dataset.state = "done";
    chat.controller = null;
    setBusy(false);
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = input.value.trim();
  if (!text || chat.controller) return;
  input.value = "";
  send(text);
});

input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});

$("stop").addEventListener("click", () => chat.controller && chat.controller.abort());

$("new-chat").addEventListener("click", () => {
  if (chat.controller) chat.controller.abort();
  chat.messages = [];
  conversation.replaceChildren();
  statusLine.textContent = "";
  input.focus();
});

setBusy(false);
loadModel();
