"""Dynamic evaluation (Krause et al. 2018, 2019): the zero-training anchor for a frozen model.

A file is scored in chunks of ``K`` frames. Chunk ``[s, e)`` is scored with the current weights
(recomputed from the file's inputs over the whole receptive field of the stacked attention,
``L * C`` frames for ``L`` layers of context ``C``: exactly what streaming computes), then the
chosen weights take ``steps`` SGD steps on *that chunk's own* next-token loss (the tokens are
known once the frames are past), optionally with the gradient norm clipped and a decay toward
the original weights (Krause's rule without the RMS normaliser)::

    theta <- theta - lr * clip(g) + decay * (theta_0 - theta)

and the next chunk is scored with the updated weights. Weights are restored after every file,
so files never see each other. No training at all: only ``lr``, the layers and ``K`` are
chosen, on a validation split (``sweep_dyneval``).

The loss of an update is the mean CE over the chunk's scored tokens, text and audio alike
(audio tokens that are -1 are not scored, as everywhere).

``dyneval_losses`` is exact by construction: every chunk's forward is the model's parallel form
over ``[max(0, s - L * C), e)``, so with ``lr = 0`` it equals ``stream_losses`` of the frozen model
(tested).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from moshi.models.lm import LMModel
from moshi.utils.compile import no_compile
from torch import nn
from tqdm import tqdm

from ..integration.config import parse_layer_spec
from ..integration.streaming import delayed_inputs
from ..token_weights import step_ce
from .long_context import FileLosses, PositionLosses, attention_context, check_codes
from .long_context.scoring import undelay_losses


@dataclass(frozen=True)
class DynEvalConfig:
    """Dynamic evaluation settings.

    Attributes:
        lr: SGD learning rate (> 0; 0 scores the frozen model through the same code).
        layers: temporal-transformer layers whose weights are updated (``parse_layer_spec``
            syntax: ``"top:2"``, ``"all"``, ``"0,3"``).
        chunk_frames: K, frames scored between two updates (>= 1).
        steps: SGD steps per chunk.
        clip: gradient norm bound per step (0 = none).
        decay: pull toward the original weights per step, in [0, 1).
    """

    lr: float = 0.1
    layers: str = "top:2"
    chunk_frames: int = 64
    steps: int = 1
    clip: float = 0.0
    decay: float = 0.0

    def __post_init__(self) -> None:
        if not (self.lr >= 0 and math.isfinite(self.lr)):
            raise ValueError(f"dyneval lr must be a finite number >= 0, got {self.lr}")
        if self.chunk_frames < 1:
            raise ValueError(f"dyneval chunk_frames must be >= 1, got {self.chunk_frames}")
        if self.steps < 1:
            raise ValueError(f"dyneval steps must be >= 1, got {self.steps}")
        if self.clip < 0:
            raise ValueError(f"dyneval clip must be >= 0, got {self.clip}")
        if not 0 <= self.decay < 1:
            raise ValueError(f"dyneval decay must be in [0, 1), got {self.decay}")

    def label(self) -> str:
        return f"lr {self.lr:g}, layers {self.layers}, K {self.chunk_frames}"


def updated_parameters(lm: LMModel, layers: str) -> list[nn.Parameter]:
    """The parameters of the temporal-transformer layers named by ``layers``."""
    blocks = lm.transformer.layers
    chosen = parse_layer_spec(layers, len(blocks))
    return [p for i in chosen for p in blocks[i].parameters()]


def _chunk_losses(lm: LMModel, inputs: torch.Tensor, delayed: torch.Tensor, a: int, b: int,
                  s: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per-step CE ``[1 + dq, b - s]`` of the delayed steps ``[s, b)``, computed from the
    inputs ``[a, b)`` (parallel form), and the scored mask."""
    a0, dq = lm.audio_offset, lm.dep_q
    out, text_logits = lm.forward_text(inputs[:, :, a:b])
    target_text = delayed[0, 0, s:b]
    text = step_ce(text_logits[0, 0, s - a :], target_text)
    target_audio = delayed[0, a0 : a0 + dq, s:b]
    valid_audio = (target_audio >= 0) & (target_audio < lm.card)
    if bool(valid_audio.any()):
        logits = lm.forward_depformer_training(delayed[:, :, a:b], out)
        audio = step_ce(logits[0, :, s - a :], target_audio)
    else:  # nothing to score: skip the depformer (text-only data)
        audio = torch.zeros_like(target_audio, dtype=text.dtype)
    valid_text = (target_text >= 0) & (target_text < lm.text_card)
    return torch.cat([text[None], audio]), torch.cat([valid_text[None], valid_audio])


def dyneval_losses(lm: LMModel, codes: torch.Tensor, cfg: DynEvalConfig,
                   params: Sequence[nn.Parameter] | None = None) -> FileLosses:  # fmt: skip
    """Per-position losses of one file ``codes [17, T]`` under dynamic evaluation (module
    docstring); the model's weights are the same before and after the call."""
    check_codes(lm, codes)
    if lm.training:
        raise ValueError("dynamic evaluation needs the model in eval mode (lm.eval())")
    params = list(updated_parameters(lm, cfg.layers) if params is None else params)
    device = next(lm.parameters()).device
    codes = codes.to(device=device, dtype=torch.long)[None]
    T = codes.shape[-1]
    C = attention_context(lm) or T
    reach = C * len(lm.transformer.layers)  # the stacked attention's receptive field
    inputs, delayed = delayed_inputs(lm, codes)
    rows = 1 + lm.dep_q
    per_step = torch.zeros(rows, T, device=device)
    original = [p.detach().clone() for p in params]
    flags = [p.requires_grad for p in params]
    eager = no_compile() if device.type == "cpu" else contextlib.nullcontext()
    previous: list[torch.Tensor] | None = None
    rollbacks = 0
    try:
        for p in params:
            p.requires_grad_(True)
        with eager:
            for s in range(0, T, cfg.chunk_frames):
                b = min(T, s + cfg.chunk_frames)
                a = max(0, s - reach)
                last = b >= T or cfg.lr == 0
                for step in range(1 if last else cfg.steps):
                    with torch.set_grad_enabled(not last):
                        ce, valid = _chunk_losses(lm, inputs, delayed, a, b, s)
                    if not bool(torch.isfinite(ce[valid]).all()) and previous is not None:
                        # the last update broke the model: back to the weights before it
                        rollbacks += 1
                        with torch.no_grad():
                            for p, q in zip(params, previous):
                                p.copy_(q)
                        previous = None
                        with torch.set_grad_enabled(not last):
                            ce, valid = _chunk_losses(lm, inputs, delayed, a, b, s)
                    if step == 0:
                        per_step[:, s:b] = ce.detach()
                    if last:
                        break
                    n = valid.sum()
                    if int(n) == 0:
                        break
                    loss = (ce * valid).sum() / n
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                    previous = [p.detach().clone() for p in params]
                    _sgd(params, grads, original, cfg)
    finally:
        with torch.no_grad():
            for p, p0, flag in zip(params, original, flags):
                p.copy_(p0)
                p.requires_grad_(flag)
    out = undelay_losses(lm, per_step.cpu(), codes[0].cpu())
    out.rollbacks = rollbacks  # type: ignore[attr-defined]
    return out


@torch.no_grad()
def _sgd(params: list[nn.Parameter], grads: Sequence[torch.Tensor | None],
         original: list[torch.Tensor], cfg: DynEvalConfig) -> None:  # fmt: skip
    gs = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    scale = 1.0
    if cfg.clip > 0:
        norm = torch.sqrt(sum((g.float() ** 2).sum() for g in gs))
        if not torch.isfinite(norm):
            return  # a non-finite update is skipped: the weights stay finite
        scale = min(1.0, cfg.clip / (float(norm) + 1e-6))
    for p, g, p0 in zip(params, gs, original):
        step = cfg.lr * scale * g
        if not bool(torch.isfinite(step).all()):
            return
        p.sub_(step.to(p.dtype))
        if cfg.decay:
            p.add_(cfg.decay * (p0 - p))


def evaluate_dyneval(lm: LMModel, files: Sequence[tuple[str, torch.Tensor]], cfg: DynEvalConfig,
                     progress: bool = False, desc: str = "dyneval",
                     block_frames: int | None = None) -> PositionLosses:  # fmt: skip
    """``dyneval_losses`` of every file, summed per position (comparable with the
    long-context evaluation's curves; per-file sums in blocks of ``block_frames``, default
    the attention context, so "within / beyond the window" splits are exact)."""
    curve = PositionLosses(lm.dep_q, block_frames or attention_context(lm) or 50)
    params = updated_parameters(lm, cfg.layers)
    for name, codes in tqdm(files, desc=desc, unit="file", leave=False, disable=not progress):
        curve.add(dyneval_losses(lm, codes, cfg, params), name)
    return curve


def sweep_dyneval(lm: LMModel, files: Sequence[tuple[str, torch.Tensor]],
                  grid: Sequence[DynEvalConfig], metric: str = "text_ce",
                  progress: bool = False) -> tuple[DynEvalConfig, list[dict]]:  # fmt: skip
    """Score every setting of ``grid`` on ``files`` (a *validation* split) and return the one
    with the lowest ``metric`` beyond the attention context, and every setting's score."""
    if not grid:
        raise ValueError("sweep_dyneval: the grid is empty")
    C = attention_context(lm)
    scores = []
    for cfg in tqdm(grid, desc="dyneval sweep (validation)", unit="setting", disable=not progress):
        curve = evaluate_dyneval(lm, files, cfg)
        value = curve.totals(C)[metric]
        scores.append({"config": cfg.__dict__.copy(), "label": cfg.label(), metric: value})
    finite = [i for i, s in enumerate(scores) if math.isfinite(s[metric])]
    if not finite:
        raise ValueError("sweep_dyneval: every setting gave a non-finite loss")
    best = min(finite, key=lambda i: scores[i][metric])
    return grid[best], scores
