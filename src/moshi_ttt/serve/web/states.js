// What the page tells the user when something stands in the way, and what to do about it.

// Why the microphone cannot be had here, or null. `env`: {secure, mediaDevices, host, port,
// protocol}, from window.isSecureContext, navigator.mediaDevices and location.
export function micProblem(env) {
  if (env.secure && env.mediaDevices) return null;
  const port = env.port || (env.protocol === "https:" ? "443" : "80");
  if (!env.secure) {
    return {
      kind: "insecure",
      title: "No microphone over plain http from another host",
      text:
        `Browsers give the microphone only to https pages or to localhost, and this page ` +
        `was opened as ${env.protocol}//${env.host}:${port}. Either forward the port and open ` +
        `it locally (ssh -L ${port}:localhost:${port} ${env.host}, then ` +
        `http://localhost:${port}), or serve it behind https (a reverse proxy with a ` +
        `certificate).`,
    };
  }
  return {
    kind: "no-media",
    title: "This browser has no microphone API",
    text: "navigator.mediaDevices is missing: use a recent Chromium, Chrome, Edge or Firefox.",
  };
}

// The message for a getUserMedia error.
export function micError(error) {
  const name = (error && error.name) || "";
  if (name === "NotAllowedError" || name === "SecurityError") {
    return {
      kind: "mic-denied",
      title: "Microphone permission denied",
      text:
        "The browser did not give this page the microphone. Allow it (the microphone or lock " +
        "icon in the address bar, then the site's permissions) and press Connect again.",
    };
  }
  if (name === "NotFoundError" || name === "OverconstrainedError") {
    return {
      kind: "no-mic",
      title: "No microphone found",
      text: "Plug in a microphone (or pick one in the system's sound settings) and press Connect again.",
    };
  }
  return {
    kind: "mic-error",
    title: "The microphone could not be opened",
    text: `${name || "Error"}: ${(error && error.message) || error}. Close other programs using it and retry.`,
  };
}

// The message for a websocket close: `opened` whether the handshake (0x00) came, `byUser`
// whether the user pressed Disconnect.
export function closeMessage(code, reason, opened, byUser) {
  if (byUser) {
    return {
      kind: "disconnected",
      title: "Disconnected",
      text: "The conversation and its memory are kept under its session token: press Resume to go on.",
      level: "info",
    };
  }
  if (code === 1013) {
    return {
      kind: "full",
      title: "The server is full",
      text:
        `${reason || "All its conversations are taken"}. Try again in a minute, or ask ` +
        "whoever runs it to raise --max-sessions.",
    };
  }
  if (code === 1008 && /unknown or expired/.test(reason || "")) {
    return {
      kind: "token",
      title: "This conversation cannot be resumed",
      text:
        "The server does not know its session token: it expired (--session-ttl, a day by " +
        "default), was pruned, or was saved by another server or --state-dir. Start a new " +
        "conversation.",
    };
  }
  if (code === 1000 && /replaced by a newer connection/.test(reason || "")) {
    return {
      kind: "replaced",
      title: "This conversation was opened elsewhere",
      text: "Another tab or window resumed it with the same token. Press Resume to take it back.",
    };
  }
  if (!opened) {
    return {
      kind: "unreachable",
      title: "Cannot reach the server",
      text:
        `No conversation was opened${reason ? ` (${reason})` : ""}. Check that moshi-ttt ` +
        "serve is running and reachable from this browser, then press Connect again.",
    };
  }
  if (code === 1006 || code === 1001 || code === 1011 || code === 1012) {
    return {
      kind: "lost",
      title: "Connection lost",
      text:
        "The server stopped or the network dropped. The conversation's memory is saved under " +
        "its token (as of its last snapshot): press Resume once the server is back.",
    };
  }
  return {
    kind: "closed",
    title: `The server closed the conversation (code ${code})`,
    text: `${reason || "No reason given"}. Press Resume to go on, or start a new conversation.`,
  };
}
