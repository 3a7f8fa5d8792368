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


def evaluate_static(lm: LMModel, files: Sequence[tuple[str, torch.Tensor]],
                    block_frames: int | None = None, chunk_frames: int = 64) -> PositionLosses:
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
              chunks: Sequence[int], metric: str = "text_ce",
              progress: bool = False) -> tuple[dict, list[dict]]:  # fmt: skip
    """Score every ``(lr, K)`` on ``files`` (a *validation* split); return the setting with the
    lowest ``metric`` beyond the attention context (``{"lr", "chunk"}``) and every score."""
    if not lrs or not chunks:
        raise ValueError("sweep_e2e: the grid is empty")
    base = InnerLoop.of(lm)
    C = attention_context(lm)
    scores = []
    grid = [(lr, k) for k in chunks for lr in lrs]
    for lr, k in tqdm(grid, desc="e2e sweep (validation)", unit="setting", disable=not progress):
        with inner_lr(lm, lr):
            curve = evaluate_e2e(lm, files, replace(base, chunk=int(k)))
        scores.append({"lr": lr, "chunk": int(k), metric: curve.totals(C)[metric]})
    finite = [s for s in scores if math.isfinite(s[metric])]
    if not finite:
        raise ValueError("sweep_e2e: every setting gave a non-finite loss")
    best = min(finite, key=lambda s: s[metric])
    return {"lr": best["lr"], "chunk": best["chunk"]}, scores
