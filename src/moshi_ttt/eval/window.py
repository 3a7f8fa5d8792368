"""A frozen model's attention window extended at inference: what a user tries before any memory.

``extended_window(lm, context, scaling)`` sets the temporal transformer's attention context to
``context`` frames and, with ``scaling``, changes its RoPE frequencies for positions beyond the
window it was trained with (``factor = context / trained context``):

- ``"none"``: the same rotations (plain extension);
- ``"ntk"``: NTK-aware scaling, the base period raised to ``max_period * factor^(D / (D - 2))``
  so the slowest rotation is stretched by ``factor`` and the fastest is kept (bloc97, 2023);
- ``"yarn"``: YaRN (Peng et al. 2023, arXiv 2309.00071): each frequency is interpolated by
  ``factor`` where its wavelength is long compared with the trained window, kept where it is
  short, ramped in between (``beta_slow`` 1 and ``beta_fast`` 32 rotations per window), and
  queries and keys are both scaled by ``0.1 ln(factor) + 1`` (the attention temperature).

``ScaledRope`` replaces moshi's ``RotaryEmbedding`` with the same call signature; with factor 1
it equals moshi's (tested). Everything is restored when the context manager exits.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from moshi.models.lm import LMModel
from moshi.modules.transformer import set_attention_context
from torch import nn

SCALINGS = ("none", "ntk", "yarn")


def rope_frequencies(head_dim: int, max_period: float, scaling: str = "none", factor: float = 1.0,
                     trained_context: int = 1, beta_fast: float = 32.0,
                     beta_slow: float = 1.0) -> tuple[torch.Tensor, float]:  # fmt: skip
    """Angular frequencies ``[head_dim / 2]`` (float64, radians per frame) and the q/k scale."""
    if scaling not in SCALINGS:
        raise ValueError(f"rope scaling must be one of {SCALINGS}, got {scaling!r}")
    if factor < 1:
        raise ValueError(f"rope scaling factor must be >= 1, got {factor}")
    D = head_dim
    ds = torch.arange(D // 2, dtype=torch.float64)
    if scaling == "ntk" and factor > 1:
        max_period = max_period * factor ** (D / (D - 2))
    freqs = torch.exp(ds * (-math.log(max_period) * 2 / D))
    if scaling != "yarn" or factor == 1:
        return freqs, 1.0
    rotations = trained_context * freqs / (2 * math.pi)  # turns per trained window
    ramp = ((rotations - beta_slow) / (beta_fast - beta_slow)).clamp(0.0, 1.0)
    freqs = (1 - ramp) * freqs / factor + ramp * freqs
    return freqs, 0.1 * math.log(factor) + 1.0


class ScaledRope(nn.Module):
    """moshi's ``RotaryEmbedding`` interface with given frequencies and a q/k scale."""

    def __init__(self, freqs: torch.Tensor, scale: float, interleave: bool) -> None:
        super().__init__()
        self.register_buffer("freqs", freqs.float(), persistent=False)
        self.scale, self.interleave = float(scale), interleave

    def forward(self, q: torch.Tensor, k: torch.Tensor, offset: torch.Tensor,
                time_before_heads: bool = False) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        B = q.shape[0]
        T = q.shape[1] if time_before_heads else q.shape[2]
        D = q.shape[-1]
        ts = offset.float().view(-1, 1) + torch.arange(T, device=q.device, dtype=torch.float32)
        ts = ts.view(B, -1, 1, 1) if time_before_heads else ts.view(B, 1, -1, 1)
        angle = self.freqs.to(q.device) * ts
        cos, sin = torch.cos(angle) * self.scale, torch.sin(angle) * self.scale
        return _rotate(q, cos, sin, D, self.interleave), _rotate(k, cos, sin, D, self.interleave)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, D: int,
            interleave: bool) -> torch.Tensor:  # fmt: skip
    if interleave:
        pairs = x.view(*x.shape[:-1], D // 2, 2)
        re, im = pairs[..., 0].float(), pairs[..., 1].float()
    else:
        re, im = x[..., : D // 2].float(), x[..., D // 2 :].float()
    out_re, out_im = re * cos - im * sin, re * sin + im * cos
    if interleave:
        return torch.stack([out_re, out_im], dim=-1).view(x.shape).to(x.dtype)
    return torch.cat([out_re, out_im], dim=-1).to(x.dtype)


@contextlib.contextmanager
def extended_window(lm: LMModel, context: int, scaling: str = "none") -> Iterator[LMModel]:
    """The temporal transformer with attention context ``context`` frames and RoPE ``scaling``
    for ``factor = context / its trained context`` (module docstring); restored after."""
    if scaling not in SCALINGS:
        raise ValueError(f"rope scaling must be one of {SCALINGS}, got {scaling!r}")
    layers = lm.transformer.layers
    trained = int(layers[0].self_attn.context or 0)
    if trained < 1:
        raise ValueError("extended_window: the model's attention has no finite context")
    if context < trained:
        raise ValueError(f"extended_window: context {context} < the trained window {trained}")
    ropes = [layer.self_attn.rope for layer in layers]
    rope = ropes[0]
    if rope is None and scaling != "none":
        raise ValueError("extended_window: the model has no RoPE to scale")
    set_attention_context(lm.transformer, int(context))
    if scaling != "none":
        attn = layers[0].self_attn
        head_dim = attn.embed_dim // attn.num_heads
        freqs, scale = rope_frequencies(head_dim, rope.max_period, scaling, context / trained,
                                        trained)  # fmt: skip
        scaled = ScaledRope(freqs, scale, rope.interleave)
        for layer in layers:
            layer.self_attn.rope = scaled
    try:
        yield lm
    finally:
        set_attention_context(lm.transformer, trained)
        for layer, r in zip(layers, ropes):
            layer.self_attn.rope = r
