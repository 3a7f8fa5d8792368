"""Evaluating the end-to-end memory (``integration.e2e_scan``) on long files.

``e2e_losses`` (in ``long_context.scoring``, beside ``stream_losses``) scores one file with the
scan (every chunk before its own update, the fast weights reset per file), in the per-position
form of the long-context evaluation, so its curves and totals compare with ``stream_losses`` and
``dyneval_losses``. ``sweep_e2e`` picks the inner
learning rate and the chunk K on a *validation* split, the zero-training use (dynamic evaluation
on fast weights).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import replace

import torch
from moshi.models.lm import LMModel
from tqdm import tqdm

from ..integration.e2e import e2e_layers
from ..integration.e2e_scan import InnerLoop
from ..recipes import HARM_TOLERANCE
from .long_context import PositionLosses, attention_context
from .long_context.scoring import E2EStats, e2e_losses, stream_losses


def evaluate_e2e(lm: LMModel, files: Sequence[tuple[str, torch.Tensor]],
                 loop: InnerLoop | None = None, progress: bool = False, desc: str = "e2e",
                 block_frames: int | None = None,
                 stats: E2EStats | None = None) -> PositionLosses:  # fmt: skip
    """``e2e_losses`` of every file, summed per position (blocks of ``block_frames``, default
    the attention context, as ``evaluate_dyneval``)."""
    curve = PositionLosses(lm.dep_q, block_frames or attention_context(lm) or 50)
    for name, codes in tqdm(files, desc=desc, unit="file", leave=False, disable=not progress):
        curve.add(e2e_losses(lm, codes, loop, stats), name)
    return curve


def evaluate_static(
    lm: LMModel,
    files: Sequence[tuple[str, torch.Tensor]],
    block_frames: int | None = None,
    chunk_frames: int = 64,
) -> PositionLosses:
    """The model with its memory's initial fast weights, never updated (plain streaming): the
    control of a meta-trained memory, what its trained parameters give without learning at
    test time."""
    curve = PositionLosses(lm.dep_q, block_frames or attention_context(lm) or 50)
    for name, codes in files:
        curve.add(stream_losses(lm, codes, chunk_frames=chunk_frames), name)
    return curve


@contextlib.contextmanager
def inner_lr(lm: LMModel, lr: float) -> Iterator[None]:
    """Every memory layer's inner learning rate set to ``lr`` for a while (restored after)."""
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"e2e_lr must be a finite number > 0, got {lr}")
    layers = [m.e2e for _, m in e2e_layers(lm)]
    saved = [m.log_lr.detach().clone() for m in layers]
    try:
        with torch.no_grad():
            for m in layers:
                m.log_lr.fill_(math.log(lr))
        yield
    finally:
        with torch.no_grad():
            for m, v in zip(layers, saved):
                m.log_lr.copy_(v)


def sweep_e2e(lm: LMModel, files: Sequence[tuple[str, torch.Tensor]], lrs: Sequence[float],
              chunks: Sequence[int], metric: str = "text_ce", progress: bool = False,
              harm_tolerance: float | None = HARM_TOLERANCE,
              ) -> tuple[dict, list[dict]]:  # fmt: skip
    """Score every ``(lr, K)`` on ``files`` (a *validation* split) inside and beyond the
    attention context, against the model without updates (its memory's initial weights: the
    base for an untrained memory); return the chosen setting ``{"lr", "chunk"}`` and every
    score (``metric`` beyond, ``within`` and the differences to the base ``harm_within`` and
    ``gain_beyond``).

    The choice: the lowest ``metric`` beyond the context among the settings no worse than the
    base inside it by more than ``harm_tolerance`` (where the attention sees everything the
    memory saw, a memory can only compete with it); if none is, the least harmful inside.
    ``harm_tolerance=None``: the lowest ``metric`` beyond, whatever the harm."""
    if not lrs or not chunks:
        raise ValueError("sweep_e2e: the grid is empty")
    base = InnerLoop.of(lm)
    C = attention_context(lm)
    static = evaluate_static(lm, files)
    base_within, base_beyond = static.totals(0, C)[metric], static.totals(C)[metric]
    scores = []
    grid = [(lr, k) for k in chunks for lr in lrs]
    for lr, k in tqdm(grid, desc="e2e sweep (validation)", unit="setting", disable=not progress):
        with inner_lr(lm, lr):
            curve = evaluate_e2e(lm, files, replace(base, chunk=int(k)))
        within, beyond = curve.totals(0, C)[metric], curve.totals(C)[metric]
        scores.append({"lr": lr, "chunk": int(k), metric: beyond, "within": within,
                       "harm_within": within - base_within,
                       "gain_beyond": beyond - base_beyond})  # fmt: skip
    best = choose_setting(scores, metric, harm_tolerance)
    return {"lr": best["lr"], "chunk": best["chunk"]}, scores


def choose_setting(scores: Sequence[dict], metric: str = "text_ce",
                   harm_tolerance: float | None = HARM_TOLERANCE) -> dict:  # fmt: skip
    """The rule of ``sweep_e2e`` over its scores (of one or several sweeps)."""
    finite = [s for s in scores if math.isfinite(s[metric]) and math.isfinite(s["within"])]
    if not finite:
        raise ValueError("e2e: every validation setting gave a non-finite loss")
    if harm_tolerance is None:
        return min(finite, key=lambda s: s[metric])
    safe = [s for s in finite if s["harm_within"] <= harm_tolerance]
    if safe:
        return min(safe, key=lambda s: s[metric])
    return min(finite, key=lambda s: s["harm_within"])
