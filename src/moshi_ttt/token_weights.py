"""How much each scored token counts in the moshi-finetune loss (one home for the outer loss of
``train.loss`` and the inner loss of the end-to-end memory, ``integration.e2e_scan``).

- text: ``w = mask * (text_padding_weight if target in {PAD 3, EPAD 0} else 1)``
- audio: ``w = mask * (first_codebook_weight on codebook 0 else 1)``
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .format import TEXT_EPAD, TEXT_PAD

TEXT_PADDING_IDS = (TEXT_PAD, TEXT_EPAD)
FIRST_CODEBOOK_WEIGHT = 100.0  # moshi-finetune's first_codebook_weight_multiplier
TEXT_PADDING_WEIGHT = 0.5  # moshi-finetune's text_padding_weight


def step_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CE ``[...]`` of ``logits [..., V]`` against ``target [...]`` (float32; float64 for float64
    logits); exactly 0 where the target is outside ``[0, V)`` (-1, or the initial token
    standing in for a delayed frame)."""
    V = logits.shape[-1]
    valid = (target >= 0) & (target < V)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float64 stays
    ce = F.cross_entropy(logits.reshape(-1, V), target.clamp(0, V - 1).reshape(-1),
                         reduction="none")  # fmt: skip
    return torch.where(valid, ce.view_as(target), 0.0)


def is_text_padding(target: torch.Tensor) -> torch.Tensor:
    """Bool, same shape: the text target is PAD or EPAD (the tokens weighed ``padding_weight``)."""
    return (target == TEXT_PAD) | (target == TEXT_EPAD)


def text_weights(target: torch.Tensor, mask: torch.Tensor, padding_weight: float) -> torch.Tensor:
    """Float32 weights of text targets ``[B, 1, T]``: 0 off-mask, ``padding_weight`` on PAD/EPAD."""
    w = torch.where(is_text_padding(target), padding_weight, 1.0).to(torch.float32)
    return w * mask


def audio_weights(mask: torch.Tensor, first_codebook_weight: float) -> torch.Tensor:
    """Float32 weights of audio targets ``[B, K, T]``: 0 off-mask, the multiplier on codebook 0."""
    per_cb = torch.ones(mask.shape[1], dtype=torch.float32, device=mask.device)
    per_cb[0] = first_codebook_weight
    return mask * per_cb[None, :, None]
