// The memory panel's messages (kind 0x10, JSON; docs/serving.md "The protocol"): checked field
// by field, so that a malformed message is dropped (or its bad fields ignored), never thrown.

const POINT_KEYS = [
  "frame_ms",
  "e2e_distance",
  "ttt_distance",
  "inplace_distance",
  "recall_distance",
  "gate",
  "inner_before",
  "inner_after",
];
const KINDS = ["e2e", "gated", "ttt", "inplace", "recall"];
const MAX_ITEMS = 5000;

const num = (x) => (typeof x === "number" && Number.isFinite(x) ? x : null);
const count = (x) => (Number.isInteger(x) && x >= 0 ? x : null);
const isObject = (x) => typeof x === "object" && x !== null && !Array.isArray(x);

// bytes: the payload after the kind byte. Returns the checked report, or null.
export function parseMemory(bytes) {
  let raw;
  try {
    raw = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes));
  } catch {
    return null;
  }
  if (!isObject(raw)) return null;
  const out = {
    t: num(raw.t),
    updates: count(raw.updates),
    rollbacks: count(raw.rollbacks),
    resets: count(raw.resets),
    frames_dropped: count(raw.frames_dropped),
    budget_ms: num(raw.budget_ms),
    hello: raw.hello === true,
    resumed: raw.resumed === true,
    chunk: count(raw.chunk),
    sessions: count(raw.sessions),
    max_sessions: count(raw.max_sessions),
    kinds: Array.isArray(raw.kinds) ? raw.kinds.filter((k) => KINDS.includes(k)) : null,
    frame_ms: null,
    points: [],
    events: [],
  };
  if (isObject(raw.frame_ms)) {
    out.frame_ms = { p50: num(raw.frame_ms.p50), p99: num(raw.frame_ms.p99) };
  }
  if (Array.isArray(raw.points)) {
    for (const p of raw.points.slice(-MAX_ITEMS)) {
      if (!isObject(p) || num(p.t) === null) continue;
      const point = { t: p.t };
      for (const key of POINT_KEYS) if (num(p[key]) !== null) point[key] = p[key];
      out.points.push(point);
    }
  }
  if (Array.isArray(raw.events)) {
    for (const e of raw.events.slice(-MAX_ITEMS)) {
      if (!isObject(e) || num(e.t) === null) continue;
      out.events.push({
        t: e.t,
        before: num(e.before),
        after: num(e.after),
        reset: e.reset === true,
        rolled_back: e.rolled_back === true,
      });
    }
  }
  return out;
}
