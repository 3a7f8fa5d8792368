"""The recommended retrofit: TTT added to a pretrained, *frozen* Moshi (docs/retrofit.md).

Measured on the demo task (``benchmarks/retrofit_study.py``, 3 seeds): what decides whether a
frozen base uses the new memory is the **training window**. With the attention seeing as much
as at inference, the base's own in-window solution is a basin the TTT branch never leaves
(7-23 % of the available gain); with the attention context cut to a quarter while training
(``model.train_context``), the memory has to carry the task, and at inference, with the full
window back, the frozen layers combine both (≈ 90 %).
"""

from __future__ import annotations

from typing import Any

TRAIN_CONTEXT_FRACTION = 0.25  # training window / inference window

# The TTT branch: on the frozen base's first layer, before its attention, so the frozen
# attention and FFN read what the memory writes (as they read token embeddings); a non-zero
# gate so the branch gets gradient from step 1.
RETROFIT_TTT: dict[str, Any] = {
    "layers": "0",
    "placement": "before_attention",
    "kind": "linear",
    "mini_batch_size": 8,
    "base_lr": 1.0,
    "gate_init": 1.0,
}


def retrofit_train_context(context: int) -> int:
    """The attention context (frames) to train a retrofit with, for a model whose attention
    sees ``context`` frames at inference (Moshi: 3000 -> 750)."""
    if context < 1:
        raise ValueError(f"context must be >= 1 frame, got {context}")
    return max(1, round(TRAIN_CONTEXT_FRACTION * context))
