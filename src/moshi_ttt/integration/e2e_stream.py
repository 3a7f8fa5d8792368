"""The end-to-end memory while streaming: its inner loop per batch row (``E2EStreamer``) and
inside ``LMGen`` and the server (``LiveE2E``). The update is ``e2e_scan.update``, the same
function as the training and evaluation scan's, so streaming equals the scan (tested).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from moshi.models.lm import LMModel
from torch import nn

from .e2e_scan import (
    History,
    InnerLoop,
    Weights,
    chunk_ce,
    chunk_logits,
    has_audio,
    inner_loss,
    memory_layers,
    receptive_field,
    update,
)


@dataclass
class ChunkUpdate:
    """One row's update, as ``E2EStreamer.on_update`` callbacks get it: the chunk ``[s, e)``
    with its receptive field (``h`` from step ``a``, the earlier chunks' ``history``, the
    ``delayed`` tokens by absolute step), the row's weights ``before`` and ``after`` it, and
    how many inner steps were rolled back."""

    row: int
    h: torch.Tensor
    a: int
    s: int
    e: int
    history: History
    delayed: torch.Tensor
    before: Weights
    after: Weights
    rolled_back: int


@dataclass
class _Row:
    """One batch row's streamed past: recorded prime-MLP inputs and tokens of steps
    ``[start, seen)``, where its current chunk starts, and the weights of earlier chunks."""

    h: list[torch.Tensor] = field(default_factory=list)
    tokens: list[torch.Tensor] = field(default_factory=list)
    start: int = 0
    seen: int = 0
    chunk_start: int = 0
    history: History = field(default_factory=list)


class E2EStreamer:
    """The inner loop of a model streaming in moshi's API (``with lm.streaming(B)``), per row.

    After the model has processed steps, ``observe(delayed_steps [B, 17, n], active)`` gives
    their tokens (known once a step is past: the user's audio and Moshi's own output) for the
    ``active`` rows (default: all); at every K-th step of a row, the row's fast weights in the
    layers' streaming states are updated, through the same ``update`` as the scan, from the
    prime-MLP inputs recorded while streaming. Rows advance independently (moshi's exec masks)
    and a row reset by ``reset_streaming(mask)`` starts over (weights and past). The update is
    timed (``update_seconds``, ``updates``) and a non-finite one rolled back (``rollbacks``).
    """

    def __init__(self, lm: LMModel, loop: InnerLoop | None = None) -> None:
        self.lm, self.loop = lm, loop or InnerLoop.of(lm)
        self.layers = [m for _, m in memory_layers(lm)]
        self.states = [m.e2e._streaming_state for m in self.layers]
        if any(st is None for st in self.states):
            raise ValueError("E2EStreamer needs the model streaming (with lm.streaming(B))")
        first = self.states[0]
        first.record = True
        first.on_reset = self._reset
        self.R = receptive_field(lm)
        self.rows = [_Row() for _ in range(first.batch_size)]
        self.init = [(st.init[0][None], st.init[1][None]) for st in self.states]
        self.update_seconds, self.updates, self.rollbacks = 0.0, 0, 0
        self.on_update: list[Callable[[ChunkUpdate], None]] = []  # called after each update

    def _reset(self, mask: torch.Tensor) -> None:
        for b in torch.nonzero(mask.cpu()).flatten().tolist():
            self.rows[b] = _Row()

    def recorded(self) -> torch.Tensor | None:
        """The prime-MLP inputs recorded since the last call, ``[B, n, dim]`` (None: none)."""
        st0 = self.states[0]
        if not st0.inputs:
            return None
        h = torch.cat(st0.inputs, 1)
        st0.inputs.clear()
        return h

    def observe(self, delayed_steps: torch.Tensor, active: torch.Tensor | None = None,
                h: torch.Tensor | None = None) -> None:  # fmt: skip
        """Record the tokens of the steps just streamed (``h``: their recorded inputs, default
        ``recorded()``) and update the rows that completed a chunk."""
        h = self.recorded() if h is None else h
        if h is None or h.shape[1] != delayed_steps.shape[-1]:
            raise ValueError(f"observe: {delayed_steps.shape[-1]} steps given, the model "
                             f"streamed {0 if h is None else h.shape[1]}")  # fmt: skip
        rows = range(len(self.rows)) if active is None else (
            torch.nonzero(active.cpu()).flatten().tolist())  # fmt: skip
        for b in rows:
            row = self.rows[b]
            row.h.append(h[b : b + 1])
            row.tokens.append(delayed_steps[b : b + 1])
            row.seen += h.shape[1]
            while row.seen - row.chunk_start >= self.loop.chunk:
                self._update(b, row, row.chunk_start, row.chunk_start + self.loop.chunk)

    def _update(self, b: int, row: _Row, s: int, e: int) -> None:
        h_all, tokens = torch.cat(row.h, 1), torch.cat(row.tokens, -1)
        row.h, row.tokens = [h_all], [tokens]
        a = 0 if self.R < 0 else max(0, s - self.R)
        # ``delayed`` indexed by absolute step: the forgotten steps padded with -1
        pad = tokens.new_full(tokens.shape[:2] + (row.start,), -1)
        delayed = torch.cat([pad, tokens], -1)
        current = [(st.w_in[b : b + 1].clone(), st.w_out[b : b + 1].clone())
                   for st in self.states]  # fmt: skip
        start = time.perf_counter()
        new, _, bad = update(self.lm, h_all[:, a - row.start : e - row.start], a, s, e,
                             row.history, current, delayed, self.loop, False,
                             self.init)  # fmt: skip
        self.update_seconds += time.perf_counter() - start
        self.updates += self.loop.steps
        self.rollbacks += bad
        for st, (wi, wo) in zip(self.states, new):
            st.w_in[b].copy_(wi[0])
            st.w_out[b].copy_(wo[0])
        if self.on_update:
            event = ChunkUpdate(b, h_all[:, a - row.start : e - row.start], a, s, e,
                                list(row.history), delayed, current, new, bad)  # fmt: skip
            for callback in self.on_update:
                callback(event)
        row.history.append((s, e, current))
        row.chunk_start = e
        if self.R >= 0:  # keep what the next chunk's receptive field needs
            keep = max(0, e - self.R)
            row.history = [c for c in row.history if c[1] > keep]
            drop = keep - row.start
            if drop > 0:
                row.h, row.tokens = [h_all[:, drop:]], [tokens[..., drop:]]
                row.start = keep


@torch.no_grad()
def chunk_loss(lm: LMModel, u: ChunkUpdate, weights: Weights, loop: InnerLoop) -> float:
    """The inner loss of ``u``'s chunk (what its update descends) with ``weights``: with
    ``u.before``, the loss the update started from; with ``u.after``, where it took it."""
    audio = has_audio(lm, u.delayed, u.s, u.e)
    text, au = chunk_logits(lm, u.h, u.a, u.s, u.e, u.history, weights, u.delayed, audio)
    ce = chunk_ce(lm, text, au, u.delayed, u.s, u.e)
    return float(inner_loss(lm, ce, u.delayed, u.s, u.e, loop)[0])


class LiveE2E:
    """The inner loop inside any streaming use of the model (``LMGen``, the server).

    Forward pre-hooks read each step's input tokens at the embeddings: the input of a row's
    step is the delayed column of its previous step (what the model produced and heard then),
    so just before the transformer runs, the previous step's tokens and recorded input go to
    ``E2EStreamer.observe`` for the rows that run now (moshi's exec mask), and a row that just
    completed a chunk is updated before this step uses its weights. Use while streaming
    (``with lm.streaming(B)``, or ``LMGen.streaming``) and eager: CUDA graphs replay kernels
    without hooks (``moshi.utils.compile.no_cuda_graph``). ``close()`` removes the hooks.
    """

    def __init__(self, lm: LMModel, loop: InnerLoop | None = None) -> None:
        self.streamer = E2EStreamer(lm, loop)
        self.lm = lm
        B = len(self.streamer.rows)
        self.ids: dict[int, torch.Tensor] = {}
        self.pending: list[torch.Tensor | None] = [None] * B  # a row's last recorded input
        self.last_active = torch.zeros(B, dtype=torch.bool)
        self.streamer.states[0].on_reset = self._reset
        hooks = [lm.text_emb.register_forward_pre_hook(self._grab(0))]
        hooks += [emb.register_forward_pre_hook(self._grab(lm.audio_offset + k))
                  for k, emb in enumerate(lm.emb)]  # fmt: skip
        hooks.append(lm.transformer.register_forward_pre_hook(self._step))
        self.hooks = hooks

    def _reset(self, mask: torch.Tensor) -> None:
        self.streamer._reset(mask)
        for b in torch.nonzero(mask.cpu()).flatten().tolist():
            self.pending[b] = None

    def _grab(self, stream: int):  # noqa: ANN202 - a hook
        def hook(module: nn.Module, args: tuple) -> None:
            self.ids[stream] = args[0]

        return hook

    def _step(self, module: nn.Module, args: tuple) -> None:
        ids, lm = self.ids, self.lm
        self.ids = {}
        if args[0].shape[1] != 1:
            raise ValueError("the live end-to-end memory streams one step at a time")
        B = len(self.streamer.rows)
        column = torch.full((B, lm.num_codebooks, 1), -1, dtype=torch.long,
                            device=args[0].device)  # fmt: skip
        for k, v in ids.items():
            column[:, k] = v.reshape(B, -1)[:, :1]
        h = self.streamer.recorded()
        if h is not None:  # inputs recorded by the previous call, for the rows that ran then
            for b in torch.nonzero(self.last_active.cpu()).flatten().tolist():
                self.pending[b] = h[b : b + 1]
        active = self.streamer.states[0].exec_mask.detach().cpu().clone()
        ready = [b for b in torch.nonzero(active).flatten().tolist()
                 if self.pending[b] is not None]  # fmt: skip
        if ready:
            mask = torch.zeros(B, dtype=torch.bool)
            mask[ready] = True
            ref = self.pending[ready[0]]
            assert ref is not None
            full_h = ref.new_zeros((B,) + tuple(ref.shape[1:]))
            for b in ready:
                full_h[b] = self.pending[b][0]  # type: ignore[index]
                self.pending[b] = None
            self.streamer.observe(column, mask, full_h)
        self.last_active = active

    def close(self) -> None:
        for hk in self.hooks:
            hk.remove()
        self.hooks = []
        st = self.streamer.states[0]
        st.record, st.on_reset = False, None
        st.inputs.clear()
