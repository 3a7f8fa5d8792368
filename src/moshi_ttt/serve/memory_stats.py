"""What the memory of each conversation is doing, for the web page's memory panel.

``MemoryStats`` watches a streaming model's memories, one batch row per conversation:
- the end-to-end memory (``integration.e2e``): every update of a row, its inner loss on the
  chunk before and after the step (how much the memory learned from it; computed only for rows
  someone watches: two more forwards of the chunk through the memory layers and the heads), the
  update and rollback counts;
- gated TTT layers (``integration.hybrid``): the gate ``tanh(alpha)`` (mean over channels) and
  the inner loss before and after each token's step (``InnerLoss.lprev`` / ``lafter``, mean over
  heads and the frames since the last report; only while a row is watched);
- every fast-weight memory: the distance of the row's fast weights from where a conversation
  starts (the end-to-end memory: ``|W - W0|``; TTT layers: the committed delta; In-Place TTT:
  its accumulator; the recall memory: ``|W|``).

``report(row)`` gives a JSON-able dict: the counters, and the points and updates since the last
report (the page plots them over the conversation's time). ``export(row)`` / ``join(row,
saved)`` carry the counters and a bounded history through a saved session, so a resumed
conversation's panel goes on where it stopped. Everything runs on the engine's thread.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..integration.e2e import E2EState, e2e_layers
from ..integration.e2e_stream import ChunkUpdate, LiveE2E, chunk_loss
from ..integration.hybrid import GatedTTT
from ..integration.recall import RecallState
from ..integration.streaming import ttt_states
from ..layer import TTTLayer, TTTState

FRAME_S = 0.08  # one Moshi frame
HISTORY = 1000  # points and updates kept per row (and saved with a session)


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


@dataclass
class RowMemory:
    """One conversation's counters and recent history."""

    frames: int = 0  # frames of the conversation (resumed ones included)
    updates: int = 0  # end-to-end memory updates
    rollbacks: int = 0
    resets: int = 0  # memory resets asked by the client
    points: deque = field(default_factory=lambda: deque(maxlen=HISTORY))
    events: deque = field(default_factory=lambda: deque(maxlen=HISTORY))
    new_points: int = 0  # points / events appended since the last report
    new_events: int = 0
    inner: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # before, after, n
    e2e_distance: float | None = None  # cached: the weights change only at updates and resets


class _Probe:
    """Stands in for ``InnerLossProbe`` on the gated TTT layers: keeps each call's per-row inner
    loss before and after the step (mean over heads and frames), for the engine to fold."""

    def __init__(self) -> None:
        self.last: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(self, layer: TTTLayer, loss: Any) -> None:
        self.last.append((loss.lprev.float().mean((1, 2)), loss.lafter.float().mean((1, 2))))


def _norm(tensors: list[torch.Tensor]) -> float:
    """The norm of all ``tensors`` together (reductions only: no copy of a 1 GB memory)."""
    return math.sqrt(sum(float(torch.linalg.vector_norm(t)) ** 2 for t in tensors))


class MemoryStats:
    """Per-row statistics of the memories of ``lm`` (streaming, ``batch_size`` rows); ``live``:
    the engine's ``LiveE2E`` (the end-to-end memory's updates), if any."""

    def __init__(self, lm: nn.Module, live: LiveE2E | None, batch_size: int) -> None:
        self.lm, self.live = lm, live
        self.rows = [RowMemory() for _ in range(batch_size)]
        self.watched = [False] * batch_size
        self.gated = [(n, m) for n, m in lm.named_modules() if isinstance(m, GatedTTT)]
        self.probe = _Probe()
        self.chunk = live.streamer.loop.chunk if live is not None else None
        if live is not None:
            live.streamer.on_update.append(self._on_update)

    # -- what the model has ---------------------------------------------------------------------
    def kinds(self) -> list[str]:
        """The memories this model has: "e2e", "gated", "inplace", "ttt", "recall"."""
        out = []
        if self.live is not None or e2e_layers(self.lm):
            out.append("e2e")
        if self.gated:
            out.append("gated")
        for _, st in ttt_states(self.lm):
            if isinstance(st, RecallState) and "recall" not in out:
                out.append("recall")
            if isinstance(st, TTTState):
                kind = "ttt" if hasattr(st.fast, "delta") else "inplace"
                if kind not in out and not (kind == "ttt" and self.gated):
                    out.append(kind)
        return out

    def describe(self) -> dict[str, Any]:
        return {"kinds": self.kinds(), "chunk": self.chunk, "frame_s": FRAME_S,
                "gated_layers": [n for n, _ in self.gated]}  # fmt: skip

    # -- conversations --------------------------------------------------------------------------
    def join(self, row: int, saved: dict[str, Any] | None = None) -> None:
        """A conversation starts in ``row``: fresh counters, or those ``export`` saved."""
        r = self.rows[row] = RowMemory()
        if not isinstance(saved, dict):
            return
        for key in ("frames", "updates", "rollbacks", "resets"):
            value = saved.get(key)
            if isinstance(value, int) and value >= 0:
                setattr(r, key, value)
        for key in ("points", "events"):
            items = saved.get(key)
            if isinstance(items, list):
                getattr(r, key).extend(x for x in items[-HISTORY:] if isinstance(x, dict))
        r.new_points, r.new_events = len(r.points), len(r.events)

    def export(self, row: int) -> dict[str, Any]:
        """The row's counters and history, JSON-able (saved with a session)."""
        r = self.rows[row]
        return {"frames": r.frames, "updates": r.updates, "rollbacks": r.rollbacks,
                "resets": r.resets, "points": list(r.points), "events": list(r.events)}  # fmt: skip

    def watch(self, row: int, on: bool) -> None:
        """Whether someone watches ``row`` (its losses are computed only then)."""
        self.watched[row] = on
        probe = self.probe if any(self.watched) else None
        for _, m in self.gated:
            m.layer.probe = probe  # type: ignore[assignment]

    def memory_reset(self, row: int) -> None:
        """The row's memory was reset (``Engine.reset_memory``): counted, marked on the plots."""
        r = self.rows[row]
        r.resets += 1
        r.e2e_distance = None
        self._event(r, {"t": round(r.frames * FRAME_S, 2), "reset": True})

    # -- streaming ------------------------------------------------------------------------------
    def after_step(self, active: torch.Tensor) -> None:
        """After an engine step of the ``active`` rows: count frames, fold the inner losses."""
        rows = torch.nonzero(active.cpu()).flatten().tolist()
        losses, self.probe.last = self.probe.last, []
        for b in rows:
            r = self.rows[b]
            r.frames += 1
            for before, after in losses:
                lb, la = float(before[b]), float(after[b])
                if math.isfinite(lb) and math.isfinite(la):
                    r.inner[0] += lb
                    r.inner[1] += la
                    r.inner[2] += 1

    def point(self, row: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Add the row's current values (and ``extra``'s) as a point of its history."""
        r = self.rows[row]
        p: dict[str, Any] = {"t": round(r.frames * FRAME_S, 2), **(extra or {})}
        dist = self.distances(row)
        for key, value in dist.items():
            p[key] = _finite(value)
        if self.gated:
            gates = [float(m.gate().detach().float().mean()) for _, m in self.gated]
            p["gate"] = _finite(sum(gates) / len(gates))
            if r.inner[2]:
                p["inner_before"] = _finite(r.inner[0] / r.inner[2])
                p["inner_after"] = _finite(r.inner[1] / r.inner[2])
            r.inner = [0.0, 0.0, 0.0]
        r.points.append(p)
        r.new_points += 1
        return p

    def distances(self, row: int) -> dict[str, float]:
        """The distance of each memory's fast weights of ``row`` from a conversation's start."""
        e2e, ttt, inplace, recall = [], [], [], []
        r = self.rows[row]
        for _, st in ttt_states(self.lm):
            if isinstance(st, E2EState):
                if r.e2e_distance is None:
                    e2e.append(st.w_in[row] - st.init[0].to(st.w_in))
                    e2e.append(st.w_out[row] - st.init[1].to(st.w_out))
            elif isinstance(st, TTTState):
                delta = getattr(st.fast, "delta", None)
                if delta is not None:
                    ttt += [t[row] for t in delta]
                else:
                    inplace.append(st.fast.acc[row])
            elif isinstance(st, RecallState):
                recall.append(st.w[row])
        if e2e:
            r.e2e_distance = _norm(e2e)
        out = {} if r.e2e_distance is None else {"e2e_distance": r.e2e_distance}
        for key, ts in (("ttt_distance", ttt), ("inplace_distance", inplace),
                        ("recall_distance", recall)):  # fmt: skip
            if ts:
                out[key] = _norm(ts)
        return out

    def report(self, row: int, point: dict[str, Any] | None = None) -> dict[str, Any]:
        """A new point (with ``point``'s values), then everything the page has not seen yet:
        ``{t, updates, rollbacks, resets, points, events}`` (JSON-able)."""
        self.point(row, point)
        r = self.rows[row]
        points = list(r.points)[len(r.points) - min(r.new_points, len(r.points)) :]
        events = list(r.events)[len(r.events) - min(r.new_events, len(r.events)) :]
        r.new_points = r.new_events = 0
        return {"t": round(r.frames * FRAME_S, 2), "updates": r.updates,
                "rollbacks": r.rollbacks, "resets": r.resets, "points": points,
                "events": events}  # fmt: skip

    # -- the end-to-end memory's updates ------------------------------------------------------
    def _event(self, r: RowMemory, event: dict[str, Any]) -> None:
        r.events.append(event)
        r.new_events += 1

    def _on_update(self, u: ChunkUpdate) -> None:
        """An end-to-end update of row ``u.row``: counted; for a watched row, its chunk's loss
        with the weights before and after it (two forwards of the chunk)."""
        streamer = self.live.streamer  # type: ignore[union-attr]
        r = self.rows[u.row]
        r.updates += streamer.loop.steps
        r.rollbacks += u.rolled_back
        r.e2e_distance = None  # its weights moved
        event: dict[str, Any] = {"t": round((r.frames + 1) * FRAME_S, 2)}
        if u.rolled_back:
            event["rolled_back"] = True
        if self.watched[u.row]:
            event["before"] = _finite(chunk_loss(streamer.lm, u, u.before, streamer.loop))
            event["after"] = _finite(chunk_loss(streamer.lm, u, u.after, streamer.loop))
        self._event(r, event)
