// Streams a chat completion through Parkway and renders it token by token.
//
// 1. POST the exact request body to our own backend's /sign, which answers {url, headers}:
//    a URL signed for exactly this body (the backend holds the signing secret).
// 2. fetch() the signed URL with those headers and the same body: Parkway verifies the
//    signature, adds the API key and relays the upstream's Server-Sent Events unchanged.
// 3. Read response.body with getReader(), cut it into SSE events, append each token.
//
// Progress is recorded in window.parkwayProgress (one snapshot of the rendered length per
// token), and reported to window.parkwayReport when a test harness provides it.
"use strict";

const output = document.getElementById("output");
const errorBox = document.getElementById("error");
const statusLine = document.getElementById("status");
const sendButton = document.getElementById("send");

window.parkwayProgress = { snapshots: [], done: false, error: null };

function report(kind, extra = {}) {
  const entry = { kind, length: output.textContent.length, t: performance.now(), ...extra };
  if (kind === "token") window.parkwayProgress.snapshots.push({ length: entry.length, t: entry.t });
  if (typeof window.parkwayReport === "function") window.parkwayReport(JSON.stringify(entry));
}

function showError(message) {
  errorBox.textContent = message;
  errorBox.hidden = false;
  window.parkwayProgress.error = message;
  report("error", { message });
}

// Our backend signs exactly this body; a different body would be refused by Parkway.
async function signRequest(body) {
  const response = await fetch("/sign", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body,
  });
  if (!response.ok) throw new Error(`the backend refused to sign (${response.status}): ${await response.text()}`);
  return response.json(); // {url, headers}
}

// Yields the data of each Server-Sent Event as it arrives (events end with a blank line).
async function* serverSentEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer = (buffer + decoder.decode(value, { stream: true })).replace(/\r\n/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = event.split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (data) yield data;
      }
    }
  } finally {
    reader.releaseLock();
  }
}

// Parkway's refusals are OpenAI-shaped JSON with CORS headers, so the page can say why.
async function describeFailure(response) {
  const text = await response.text();
  try {
    const { error } = JSON.parse(text);
    return `Parkway said ${response.status} ${error.code}: ${error.message}`;
  } catch {
    return `HTTP ${response.status}: ${text.slice(0, 300)}`;
  }
}

async function ask(prompt) {
  output.textContent = "";
  errorBox.hidden = true;
  window.parkwayProgress = { snapshots: [], done: false, error: null };
  const body = JSON.stringify({
    model: "gpt-4o-mini",
    stream: true,
    messages: [{ role: "user", content: prompt }],
  });
  const started = performance.now();
  const { url, headers } = await signRequest(body);
  statusLine.textContent = "streaming…";
  const response = await fetch(url, { method: "POST", headers, body });
  if (!response.ok) {
    showError(await describeFailure(response));
    return;
  }
  let first = null;
  for await (const data of serverSentEvents(response)) {
    if (data === "[DONE]") break;
    const token = JSON.parse(data).choices?.[0]?.delta?.content;
    if (!token) continue;
    first ??= performance.now() - started;
    output.textContent += token;
    report("token", { token });
  }
  const total = performance.now() - started;
  statusLine.textContent = `first token after ${first?.toFixed(0)} ms, done after ${total.toFixed(0)} ms`;
  window.parkwayProgress.done = true;
  report("done");
}

document.getElementById("ask").addEventListener("submit", async (event) => {
  event.preventDefault();
  sendButton.disabled = true;
  try {
    await ask(document.getElementById("prompt").value);
  } catch (err) {
    showError(String(err)); // network failure, CORS refusal, backend down
  } finally {
    sendButton.disabled = false;
  }
});

report("ready");
