// The moshi-ttt serve page: talk to Moshi over /api/chat (moshi's protocol), resume a
// conversation by its session token, and watch its memory (kind 0x10 reports, ?memory=1).
import { hasWebCodecsOpus, loadCapture, Player, SAMPLE_RATE, startCapture } from "./audio.js";
import { parseMemory } from "./memory.js";
import { drawPlot } from "./plot.js";
import { closeMessage, micError, micProblem } from "./states.js";

const KIND = { handshake: 0x00, audio: 0x01, text: 0x02, memory: 0x10, resetMemory: 0x11 };
const STORE_KEY = "moshi-ttt.session";
const MAX_POINTS = 3000;
const $ = (id) => document.getElementById(id);

const state = {
  phase: "idle", // idle | connecting | connected | closed
  token: null,
  opened: false,
  byUser: false,
  resumed: false,
  audioSamples: 0,
  audioPackets: 0,
  sentPages: 0,
  textPieces: 0,
  memoryMessages: 0,
  badMemoryMessages: 0,
  message: null, // the state shown: {kind, title, text}
  memory: null,
};
let ws = null;
let ctx = null;
let stopCapture = null;
let player = null;

function freshMemory() {
  return { kinds: [], chunk: null, counters: {}, points: [], events: [], frame: {} };
}
state.memory = freshMemory();

// -- the session token ---------------------------------------------------------------------
function storedToken() {
  try {
    return localStorage.getItem(STORE_KEY);
  } catch {
    return null;
  }
}

function setToken(token) {
  state.token = token;
  try {
    if (token) localStorage.setItem(STORE_KEY, token);
    else localStorage.removeItem(STORE_KEY);
  } catch {
    // storage refused (private mode): the token is still shown to copy
  }
  $("token").textContent = token || "none yet: start a new conversation";
  $("copy-token").disabled = !token;
  $("copy-link").disabled = !token;
  renderButtons();
}

function resumeLink() {
  const url = new URL(location.href);
  url.search = "";
  url.searchParams.set("session", state.token);
  return url.toString();
}

async function copy(text, button) {
  try {
    await navigator.clipboard.writeText(text);
    button.textContent = "Copied";
  } catch {
    window.prompt("Copy:", text);
  }
  setTimeout(() => (button.textContent = button.dataset.label), 1500);
}

// -- what the user sees ----------------------------------------------------------------------
function show(message) {
  state.message = message;
  const box = $("notice");
  if (!message) {
    box.hidden = true;
    return;
  }
  box.hidden = false;
  box.dataset.kind = message.kind;
  box.className = `notice ${message.level || "error"}`;
  $("notice-title").textContent = message.title;
  $("notice-text").textContent = message.text;
}

function setPhase(phase, label) {
  state.phase = phase;
  const pill = $("status");
  pill.textContent = label;
  pill.dataset.phase = phase;
  renderButtons();
}

function renderButtons() {
  const busy = state.phase === "connecting" || state.phase === "connected";
  $("new").disabled = busy;
  $("resume").disabled = busy || !state.token;
  $("disconnect").disabled = !busy;
  $("reset-memory").disabled = state.phase !== "connected";
}

function addText(piece) {
  const current = $("transcript").lastElementChild;
  current.textContent += piece;
  $("transcript").scrollTop = $("transcript").scrollHeight;
}

// -- the memory panel ----------------------------------------------------------------------
function onMemory(bytes) {
  const report = parseMemory(bytes);
  if (report === null) {
    state.badMemoryMessages += 1;
    $("bad-memory").hidden = false;
    $("bad-memory").textContent = `${state.badMemoryMessages} malformed memory message(s) ignored`;
    return;
  }
  state.memoryMessages += 1;
  const m = state.memory;
  if (report.hello) {
    Object.assign(m, freshMemory());
    m.kinds = report.kinds || [];
    m.chunk = report.chunk;
    state.resumed = report.resumed;
    $("resumed").hidden = !report.resumed;
    if (state.phase === "connected") {
      setPhase("connected", report.resumed ? "connected (resumed)" : "connected");
    }
  }
  for (const key of ["updates", "rollbacks", "resets", "frames_dropped"]) {
    if (report[key] !== null) m.counters[key] = report[key];
  }
  if (report.t !== null) m.counters.t = report.t;
  if (report.frame_ms) m.frame = report.frame_ms;
  if (report.budget_ms !== null) m.budget = report.budget_ms;
  m.points.push(...report.points);
  m.events.push(...report.events);
  if (m.points.length > MAX_POINTS) m.points.splice(0, m.points.length - MAX_POINTS);
  if (m.events.length > MAX_POINTS) m.events.splice(0, m.events.length - MAX_POINTS);
  scheduleRender();
}

let renderPending = false;
function scheduleRender() {
  if (renderPending) return;
  renderPending = true;
  requestAnimationFrame(() => {
    renderPending = false;
    try {
      renderMemory();
    } catch (e) {
      console.error("memory panel:", e);
    }
  });
}

const series = (points, key) => points.filter((p) => key in p).map((p) => [p.t, p[key]]);

function renderMemory() {
  const m = state.memory;
  const c = m.counters;
  const fmt = (v, d = 1) => (typeof v === "number" ? v.toFixed(d) : "–");
  $("kinds").textContent = m.kinds.length ? m.kinds.join(", ") : "none reported";
  $("m-updates").textContent = c.updates ?? "–";
  $("m-rollbacks").textContent = c.rollbacks ?? "–";
  $("m-resets").textContent = c.resets ?? "–";
  $("m-dropped").textContent = c.frames_dropped ?? "–";
  $("m-frame").textContent = `${fmt(m.frame.p50)} / ${fmt(m.frame.p99)} ms`;
  const budget = m.budget || 80;
  $("m-budget").textContent = `${budget} ms`;
  const resets = m.events.filter((e) => e.reset).map((e) => e.t);
  const updates = m.events.filter((e) => !e.reset);
  const scored = updates.filter((e) => e.before !== null && e.after !== null);
  const last = scored[scored.length - 1];
  $("m-learned").textContent = last
    ? `${last.before.toFixed(3)} → ${last.after.toFixed(3)} (${(last.after - last.before).toFixed(3)})`
    : "–";
  const times = [...m.points.map((p) => p.t), ...m.events.map((e) => e.t)];
  const range = times.length ? [Math.min(...times), Math.max(...times, c.t || 0)] : undefined;
  const e2e = m.kinds.includes("e2e");
  $("plot-learned-box").hidden = !e2e;
  if (e2e) {
    drawPlot($("plot-learned"), {
      series: [
        { label: "before its update", color: "#d9822b", dots: true, points: scored.map((e) => [e.t, e.before]) },
        { label: "after", color: "#2b9348", dots: true, points: scored.map((e) => [e.t, e.after]) },
      ],
      pairs: scored.map((e) => [e.t, e.before, e.after]),
      marks: resets,
      range,
      empty: m.chunk ? `the first update comes after ${m.chunk} frames` : "no update yet",
    });
  }
  const colors = { e2e_distance: "#5b5bd6", recall_distance: "#c2417d", ttt_distance: "#2a8fbd", inplace_distance: "#8a6d3b" };
  drawPlot($("plot-distance"), {
    series: Object.keys(colors)
      .map((key) => ({ label: key.replace("_distance", ""), color: colors[key], points: series(m.points, key) }))
      .filter((s) => s.points.length),
    marks: resets,
    range,
  });
  const gated = m.kinds.includes("gated");
  $("plot-gated-box").hidden = !gated;
  if (gated) {
    drawPlot($("plot-gated"), {
      series: [
        { label: "gate", color: "#555", points: series(m.points, "gate") },
        { label: "inner loss before", color: "#d9822b", points: series(m.points, "inner_before") },
        { label: "after", color: "#2b9348", points: series(m.points, "inner_after") },
      ],
      marks: resets,
      range,
    });
  }
  drawPlot($("plot-frame"), {
    series: [{ label: "frame time (ms)", color: "#2a6fdb", points: series(m.points, "frame_ms") }],
    hline: { y: budget, label: `budget ${budget} ms` },
    range,
  });
}

// -- a conversation ------------------------------------------------------------------------
function onMessage(data) {
  const bytes = new Uint8Array(data);
  if (bytes.length === 0) return;
  const payload = bytes.subarray(1);
  switch (bytes[0]) {
    case KIND.handshake:
      onOpen();
      break;
    case KIND.audio:
      if (player) {
        player.push(payload);
        state.audioPackets = player.packets;
      }
      break;
    case KIND.text:
      state.textPieces += 1;
      addText(new TextDecoder().decode(payload));
      break;
    case KIND.memory:
      onMemory(payload);
      break;
    default:
      break; // a kind this page does not know: ignored
  }
}

async function onOpen() {
  state.opened = true;
  setPhase("connected", "connected");
  show(null);
  const stream = state.stream;
  const socket = ws;
  try {
    stopCapture = await startCapture(
      ctx,
      stream,
      (page) => {
        if (ws && ws.readyState === WebSocket.OPEN) {
          const message = new Uint8Array(page.length + 1);
          message[0] = KIND.audio;
          message.set(page, 1);
          ws.send(message);
          state.sentPages += 1;
        }
      },
      (rms) => ($("level").value = Math.min(1, rms * 8)),
      (e) => fail({ kind: "codec", title: "Audio encoding failed", text: String(e) }),
    );
  } catch (e) {
    if (ws === socket && socket.readyState === WebSocket.OPEN) {
      fail({ kind: "codec", title: "Audio encoding failed", text: String(e) });
    }
  }
}

function fail(message) {
  show(message);
  if (ws) ws.close(1000);
}

function cleanup() {
  if (stopCapture) stopCapture();
  stopCapture = null;
  if (state.stream) for (const t of state.stream.getTracks()) t.stop();
  state.stream = null;
  if (player) {
    state.audioSamples = player.played;
    player.close();
  }
  player = null;
  if (ctx) ctx.close();
  ctx = null;
  ws = null;
}

// What decides whether the page may use the microphone (states.js: micProblem).
function pageEnvironment() {
  return {
    secure: window.isSecureContext,
    mediaDevices: !!(navigator.mediaDevices && navigator.mediaDevices.getUserMedia),
    host: location.hostname,
    port: location.port,
    protocol: location.protocol,
  };
}

async function connect(fresh) {
  const problem = micProblem(pageEnvironment());
  if (problem) {
    show(problem);
    return;
  }
  if (!hasWebCodecsOpus()) {
    show({ kind: "codecs", title: "This browser cannot encode Opus", text: "The page needs WebCodecs (AudioEncoder): use a recent Chromium, Chrome or Edge." });
    return;
  }
  show({
    kind: "asking",
    level: "info",
    title: "Waiting for the microphone",
    text: "If the browser asks, allow this page to use the microphone.",
  });
  setPhase("connecting", "connecting…");
  state.opened = false;
  state.byUser = false;
  state.resumed = false;
  $("resumed").hidden = true;
  try {
    state.stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true },
    });
  } catch (e) {
    setPhase("idle", "not connected");
    show(micError(e));
    return;
  }
  if (fresh || !state.token) {
    try {
      const response = await fetch("api/sessions", { method: "POST" });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const body = await response.json();
      if (typeof body.session !== "string") throw new Error("no token in the answer");
      setToken(body.session);
    } catch (e) {
      cleanup();
      setPhase("idle", "not connected");
      show(closeMessage(1006, `new session: ${e.message}`, false, false));
      return;
    }
    state.memory = freshMemory();
    scheduleRender();
  }
  ctx = new AudioContext({ sampleRate: SAMPLE_RATE });
  try {
    await ctx.resume();
    await loadCapture(ctx);
  } catch (e) {
    cleanup();
    setPhase("idle", "not connected");
    show({ kind: "audio", title: "Audio could not start", text: `${e}. Reload the page and retry.` });
    return;
  }
  player = new Player(ctx, (e) => console.error("decoder:", e));
  const url = new URL("api/chat", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  url.searchParams.set("memory", "1");
  url.searchParams.set("session", state.token);
  const p = document.createElement("p");
  $("transcript").append(p);
  const socket = new WebSocket(url);
  ws = socket;
  socket.binaryType = "arraybuffer";
  socket.onmessage = (event) => {
    if (ws === socket) onMessage(event.data);
  };
  socket.onclose = (event) => {
    if (ws !== socket && ws !== null) return;
    const message = closeMessage(event.code, event.reason, state.opened, state.byUser);
    cleanup();
    setPhase("closed", message.kind === "disconnected" ? "not connected" : message.title);
    show(message);
  };
}

function disconnect() {
  state.byUser = true;
  if (ws) ws.close(1000, "the user disconnected");
}

function resetMemory() {
  if (ws && ws.readyState === WebSocket.OPEN && state.opened) {
    ws.send(new Uint8Array([KIND.resetMemory]));
  }
}

// -- start -----------------------------------------------------------------------------------
function init() {
  for (const b of document.querySelectorAll("button")) b.dataset.label = b.textContent;
  const fromUrl = new URLSearchParams(location.search).get("session");
  setToken(fromUrl || storedToken());
  $("new").onclick = () => connect(true);
  $("resume").onclick = () => connect(false);
  $("disconnect").onclick = disconnect;
  $("reset-memory").onclick = resetMemory;
  $("copy-token").onclick = () => copy(state.token, $("copy-token"));
  $("copy-link").onclick = () => copy(resumeLink(), $("copy-link"));
  setPhase("idle", "not connected");
  const problem = micProblem(pageEnvironment());
  if (problem) show(problem);
  renderMemory();
  window.addEventListener("resize", scheduleRender);
}

// For tests and the curious: the page's state, and a way to hand it a server message.
window.moshiTTT = {
  state,
  receive: (data) => onMessage(data),
  audioSamples: () => (player ? player.played : state.audioSamples),
};

init();
