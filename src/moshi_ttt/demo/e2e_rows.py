"""The end-to-end memory's rows in the demos (``realdata``, ``markov``): the zero-training
setting chosen on a validation split, and the memory added to a frozen base."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from moshi.models.lm import LMModel

from ..eval.e2e import choose_setting, sweep_e2e
from ..integration.apply import apply_ttt
from .corpus import sequence_counts
from .frozen import FrozenBase


def chunk_frames_of(context: int, fraction: float) -> int:
    """A chunk K given as a fraction of the window C, in frames (>= 1)."""
    return max(1, round(fraction * context))


def e2e_ttt(layers: str, choice: dict[str, Any]) -> dict[str, Any]:
    """The ``ttt`` config of the end-to-end memory for a choice ``{hidden, lr, chunk}``."""
    return {"kind": "e2e", "layers": layers, "e2e_hidden": int(choice["hidden"]),
            "e2e_lr": float(choice["lr"]), "e2e_chunk": int(choice["chunk"])}  # fmt: skip


def e2e_memory(base: FrozenBase, layers: str, choice: dict[str, Any], seed: int) -> LMModel:
    """The frozen ``base`` with an untrained end-to-end memory (its random ``w_in`` drawn from
    ``seed``), in eval mode."""
    lm = base.load()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        apply_ttt(lm, e2e_ttt(layers, choice))
    return lm.eval()


def e2e_choice(base: FrozenBase, layers: str, hiddens: Sequence[int], lrs: Sequence[float],
               chunks: Sequence[int], val: list, seed: int, progress: bool,
               metric: str = "text_ce") -> dict[str, Any]:  # fmt: skip
    """The zero-training memory's width, inner lr and K, chosen on the validation files by
    ``eval.e2e.choose_setting`` (the lowest ``metric`` beyond the window among the settings
    that do no harm inside it), and every setting's score."""
    scores = []
    chunks = sorted(set(chunks))
    for hidden in hiddens:
        lm = e2e_memory(base, layers, {"hidden": hidden, "lr": lrs[0], "chunk": chunks[0]},
                        seed)  # fmt: skip
        _, found = sweep_e2e(lm, val, lrs, chunks, metric=metric, progress=progress)
        scores += [{"hidden": hidden, **x} for x in found]
    best = choose_setting(scores, metric)
    chosen = {"hidden": best["hidden"], "lr": best["lr"], "chunk": best["chunk"]}
    label = f"width {chosen['hidden']}, lr {chosen['lr']:g}, K {chosen['chunk']}"
    return {"chosen": chosen, "label": label, "validation": scores, "metric": metric,
            **sequence_counts(val, "validation")}  # fmt: skip
