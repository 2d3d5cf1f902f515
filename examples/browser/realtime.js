// A realtime session through Parkway: a WebSocket on a signed URL, no API key in the page.
//
// 1. POST /sign-realtime to our own backend, which answers {url}: a GET signed for the
//    upstream's realtime WebSocket URL (the backend holds the signing secret, not the key).
// 2. new WebSocket(url, ["realtime"]): Parkway verifies the URL before the upgrade, opens the
//    upstream WebSocket with the API key, and relays messages both ways.
// 3. Ask for a response (text), send a small binary message (echoed by the mock), render
//    the text deltas, then close with an application code the upstream sees as is.
//
// Each step is reported to window.parkwayReport when a test harness provides it.
"use strict";

const output = document.getElementById("output");
const eventsList = document.getElementById("events");
const errorBox = document.getElementById("error");
const startButton = document.getElementById("start");
const closeButton = document.getElementById("close");
let socket = null;

function report(kind, extra = {}) {
  if (typeof window.parkwayReport === "function") window.parkwayReport(JSON.stringify({ kind, ...extra }));
}

function note(text) {
  const item = document.createElement("li");
  item.textContent = text;
  eventsList.append(item);
}

function showError(message) {
  errorBox.textContent = message;
  errorBox.hidden = false;
  report("error", { message });
}

async function start(instructions) {
  const response = await fetch("/sign-realtime", { method: "POST" });
  if (!response.ok) throw new Error(`the backend refused to sign (${response.status})`);
  const { url } = await response.json();
  output.textContent = "";
  // SDKs sign http(s) URLs; the WebSocket is the same URL with the ws(s) scheme.
  socket = new WebSocket(url.replace(/^http/, "ws"), ["realtime"]);
  socket.binaryType = "arraybuffer";
  socket.onopen = () => {
    note(`open, subprotocol ${socket.protocol || "(none)"}`);
    report("open", { protocol: socket.protocol });
    socket.send(JSON.stringify({ type: "response.create", response: { instructions } }));
    socket.send(new Uint8Array([80, 75, 0, 255]).buffer);
    closeButton.disabled = false;
  };
  socket.onmessage = ({ data }) => {
    if (data instanceof ArrayBuffer) {
      note(`binary message, ${data.byteLength} bytes`);
      report("binary", { bytes: Array.from(new Uint8Array(data)) });
      return;
    }
    const event = JSON.parse(data);
    note(event.type);
    if (event.type === "response.output_text.delta") output.textContent += event.delta;
    report("event", { type: event.type, usage: event.response?.usage ?? null });
  };
  // A refused handshake shows here as a close with 1006: the page cannot read the HTTP answer.
  socket.onclose = ({ code, reason }) => {
    note(`closed ${code} ${reason}`);
    report("closed", { code, reason });
    startButton.disabled = false;
    closeButton.disabled = true;
  };
}

startButton.addEventListener("click", async () => {
  startButton.disabled = true;
  try {
    await start(document.getElementById("instructions").value);
  } catch (err) {
    showError(String(err));
    startButton.disabled = false;
  }
});

closeButton.addEventListener("click", () => socket?.close(4001, "user closed the page"));

report("ready");
