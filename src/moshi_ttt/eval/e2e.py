"""Evaluating the end-to-end memory (``integration.e2e_scan``) on long files.

``e2e_losses`` scores one file with the scan (every chunk before its own update, the fast
weights reset per file), in the per-position form of the long-context evaluation, so its curves
and totals compare with ``stream_losses`` and ``dyneval_losses``. ``sweep_e2e`` picks the inner
learning rate and the chunk K on a *validation* split, the zero-training use (dynamic evaluation
on fast weights).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from moshi.models.lm import LMModel
from moshi.utils.compile import no_compile
from tqdm import tqdm

from ..integration.e2e import e2e_layers
from ..integration.e2e_scan import InnerLoop, e2e_scan
from ..integration.streaming import delayed_inputs
from .long_context import FileLosses, PositionLosses, attention_context, check_codes
from .long_context.scoring import undelay_losses


@dataclass
class E2EStats:
    """Counts over the files of an evaluation: inner updates, their wall time, rollbacks."""

    updates: int = 0
    update_seconds: float = 0.0
    rollbacks: int = 0

    def ms_per_update(self) -> float:
        return 1000 * self.update_seconds / self.updates if self.updates else float("nan")


def e2e_losses(lm: LMModel, codes: torch.Tensor, loop: InnerLoop | None = None,
               stats: E2EStats | None = None) -> FileLosses:  # fmt: skip
    """Per-position losses of one file ``codes [17, T]`` under the end-to-end memory."""
    check_codes(lm, codes)
    if lm.training:
        raise ValueError("evaluation needs the model in eval mode (lm.eval())")
    loop = loop or InnerLoop.of(lm)
    device = next(lm.parameters()).device
    codes = codes.to(device=device, dtype=torch.long)[None]
    inputs, delayed = delayed_inputs(lm, codes)
    eager = no_compile() if device.type == "cpu" else contextlib.nullcontext()
    with eager, torch.no_grad():
        res = e2e_scan(lm, inputs, delayed, loop, train=False)
    if stats is not None:
        stats.updates += res.updates
        stats.update_seconds += res.update_seconds
        stats.rollbacks += res.rollbacks
    return undelay_losses(lm, res.ce[0].cpu(), codes[0].cpu())


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
