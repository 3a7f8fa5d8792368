"""A tiny random model with Moshi's architecture, for tests, the demo and CPU benchmarks.

It keeps every *kind* of choice of the 7B config (``moshi.models.loaders._lm_kwargs``: RMSNorm
in float32, SiLU gating with ``hidden_scale`` 4.125, RoPE, causal attention with a finite
context, 17 streams with the 7B delays, a depformer with weights per step) and shrinks the sizes.
"""

from __future__ import annotations

from typing import Any

import torch
from moshi.models import loaders
from moshi.models.lm import LMModel

TINY_SIZES: dict[str, Any] = {
    "dim": 64,
    "num_heads": 4,
    "num_layers": 4,
    "text_card": 64,
    "card": 32,
    "context": 12,  # frames: short, so that tests run past the attention window
    "depformer_dim": 32,
    "depformer_dim_feedforward": int(4.125 * 32),
    "depformer_num_heads": 2,
    "depformer_num_layers": 2,
}


def tiny_lm_kwargs(**overrides: Any) -> dict[str, Any]:
    """``LMModel(**kwargs)`` arguments of a tiny Moshi-architecture model.

    Sizes: dim 64, 4 heads, 4 layers, text vocab 64, audio vocab 32, n_q 16, dep_q 8,
    depformer dim 32 (2 heads, 2 layers), attention context 12 frames, the 7B delays.
    ``overrides`` replace or add keys (e.g. ``num_layers=2``, ``gradient_checkpointing=True``).
    """
    kwargs = dict(loaders._lm_kwargs)
    kwargs.update(TINY_SIZES)
    kwargs["delays"] = list(kwargs["delays"])
    kwargs.update(overrides)
    return kwargs


def build_tiny_lm(seed: int = 0, **overrides: Any) -> LMModel:
    """A tiny ``LMModel`` with random weights (float32, CPU, eval mode, like moshi's loaders).

    The global RNG is left untouched: the weights depend on ``seed`` only.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LMModel(device="cpu", dtype=torch.float32, **tiny_lm_kwargs(**overrides))
    return model.eval()
