"""The recommended memories for a pretrained, *frozen* Moshi (docs/retrofit.md).

**The end-to-end memory with the associative recall memory** (``E2E_MEMORY`` +
``RECALL_MEMORY``, ``e2e_memory``; the shipped default). The recall memory: a delta-rule
fast-weight memory from a key of the base's recent context to the next token, mixed into the
text distribution while streaming; it recalls what was said beyond the window (docs/retrofit.md,
"Recall"). The end-to-end memory: a prime MLP
after the last layer whose fast weights take SGD steps on the model's own next-token loss every
C/8 frames, zero-init output (the model starts as the base); used with no training (its inner
lr and chunk chosen on validation files, no harm inside the window) or meta-trained (its
initial weights and inner lr learned through the inner loop). On real text it helps beyond the
window with no training, more than dynamic evaluation, and more again meta-trained.

Two layer-local TTT recipes, both measured (``benchmarks/realdata_study.py``,
``benchmarks/retrofit_study.py``):

- ``RETROFIT_TTT`` + ``RETROFIT_TRAIN`` (**the shipped default**): branches after the attention of
  the upper half of the layers, output projection initialised to zero (the model starts exactly
  as the base), trained with a random attention window per step (C/8 .. C) and a KL term to the
  gate-0 model on the frames the attention covers. On real text (source code, English docs,
  3 seeds) it does no harm inside the window and helps a little beyond it; on the Markov task it
  captures only a few % of the gain.
- ``FORCED_TTT`` + ``FORCED_TRAIN`` (the mechanism recipe): a branch before layer 0's attention,
  trained with the attention cut to a quarter of its window, so the memory has to carry the
  task. ~90 % of the Markov task's gain -- and on real text it makes the frozen model *worse*,
  inside its window too: the branch learns to stand in for the attention it then competes with.
"""

from __future__ import annotations

from typing import Any

# nats per token: a memory worse than its base by more than this inside the attention window
# (where the attention sees everything the memory saw) does harm; reports warn past it.
HARM_TOLERANCE = 0.005

# The shipped branch: contextual features (upper half, after the attention), zero-init output
# projection (no change at step 0, yet a gradient from step 1), gate open.
RETROFIT_TTT: dict[str, Any] = {
    "layers": "upper",
    "placement": "after_attention",
    "kind": "linear",
    "mini_batch_size": 8,
    "base_lr": 1.0,
    "gate_init": 1.0,
    "output_init": "zero",
}

# How the branch is trained (``retrofit_training``): the attention window while training as a
# fraction of the inference window (None = the full window), an optional lower end of a
# random window per step (fraction of the window), and the weight of the KL-to-gate-0 harm term.
RETROFIT_TRAIN: dict[str, Any] = {
    "train_context_fraction": None,
    "train_context_min_fraction": 0.125,
    "kl_to_base": 1.0,
}

# The mechanism recipe (the Markov demo): layer 0 before attention, a quarter window.
FORCED_TTT: dict[str, Any] = {
    "layers": "0",
    "placement": "before_attention",
    "kind": "linear",
    "mini_batch_size": 8,
    "base_lr": 1.0,
    "gate_init": 1.0,
}
FORCED_TRAIN: dict[str, Any] = {
    "train_context_fraction": 0.25,
    "train_context_min_fraction": None,
    "kl_to_base": 0.0,
}


# The end-to-end memory: after the last layer (an update then recomputes only its chunk: real
# time at 7B, docs/benchmarks.md), inner lr 0.3 (the tiny benchmark's validation choice, every
# corpus and seed). Width: a multiple of the model's (the benchmark chose 16x over 4x on
# validation; the 7B config uses 4x, 0.8 GB of float32 fast weights per conversation).
E2E_MEMORY: dict[str, Any] = {"kind": "e2e", "layers": "top:1", "e2e_lr": 0.3}
E2E_WIDTH_RATIO = 4


# The associative recall memory beside it (``integration.recall``, docs/retrofit.md "Recall"):
# 8192 key units, 64 on per key, keys from the base's last hidden state and its last 4 inputs,
# the delta rule at full strength, the read squared; its mixing weight lam is a validation
# choice (the tiny benchmark chose 0.5-0.7 on source code, 0.1-0.2 on English prose, or a
# learned gate fitted on the base: ``eval.recall.fit_memory_gate``). Moshi 7B: 1.05 GB of
# float32 state per conversation (32,000 text tokens x 8192).
RECALL_MEMORY: dict[str, Any] = {
    "recall_keys": 8192, "recall_active": 64, "recall_context": 4, "recall_beta": 1.0,
    "recall_sharpen": 2.0, "recall_scale": 1.0, "recall_lam": 0.3,
}  # fmt: skip


def e2e_memory(dim: int, context: int, width_ratio: float = E2E_WIDTH_RATIO,
               recall: bool = True) -> dict[str, Any]:  # fmt: skip
    """The ``ttt`` config of the end-to-end memory for a model of width ``dim`` whose attention
    sees ``context`` frames (K = C/8; Moshi 7B: width 16384, K 375), with the associative recall
    memory beside it (``recall``: ``RECALL_MEMORY``)."""
    if dim < 1 or context < 1:
        raise ValueError(f"dim and context must be >= 1, got {dim}, {context}")
    out = {**E2E_MEMORY, "e2e_hidden": round(width_ratio * dim), "e2e_chunk": max(1, context // 8)}
    return {**out, **RECALL_MEMORY} if recall else out


def retrofit_training(context: int, recipe: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``TrainConfig`` keys of a retrofit for a model whose attention sees ``context``
    frames: ``{"model": {train_context, train_context_min}, "kl_to_base"}``."""
    r = {**RETROFIT_TRAIN, **(recipe or {})}
    unknown = set(r) - set(RETROFIT_TRAIN)
    if unknown:
        raise ValueError(f"retrofit recipe: unknown key(s) {sorted(unknown)}; expected "
                         f"{sorted(RETROFIT_TRAIN)}")  # fmt: skip
    model: dict[str, Any] = {}
    if r["train_context_fraction"] is not None:
        model["train_context"] = max(1, round(r["train_context_fraction"] * context))
    if r["train_context_min_fraction"] is not None:
        model["train_context_min"] = max(1, round(r["train_context_min_fraction"] * context))
    return {"model": model, "kl_to_base": float(r["kl_to_base"])}


def retrofit_window(context: int) -> dict[str, int]:
    """The shipped recipe's ``model`` keys for a model whose attention sees ``context`` frames
    at inference (Moshi: 3000 -> ``{"train_context_min": 375}``)."""
    if context < 1:
        raise ValueError(f"context must be >= 1 frame, got {context}")
    return retrofit_training(context)["model"]
