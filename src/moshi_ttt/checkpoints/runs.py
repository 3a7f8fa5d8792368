"""Training runs as base models: a run directory (its newest checkpoint) or a ``step_*`` dir.

``load_run_base`` rebuilds the model a run trained (``train.checkpoint.load_trained``: base,
LoRA, TTT, trained parameters) and merges its LoRA into the base linears, in memory: the same
model ``export_run`` writes to disk. ``describe_run`` reads only the run's ``config.yaml`` (and
the config files of its base), never weights.

A run directory means its newest checkpoint *when loaded*: name a ``checkpoints/step_*``
directory, or export it, for a base that stays fixed while the run goes on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from moshi.models import loaders
from moshi.models.lm import LMModel
from moshi.modules.lora import replace_lora_with_linear

from ..integration.tiny import tiny_lm_kwargs
from .loading import BaseRecord, describe_base, mark_origin


def config_base(cfg: Any) -> BaseRecord:
    """``BaseRecord`` of the base a ``TrainConfig`` names (tiny overrides and file overrides
    included), from config files only."""
    from ..train.model import file_overrides

    m = cfg.model
    if m.source == "tiny":
        return BaseRecord(tiny_lm_kwargs(**m.tiny_overrides), f"tiny:{cfg.seed}", None)
    source = m.hf_repo if m.source == "hf" else m.path
    return describe_base(source, file_overrides(m), legacy_7b=m.source == "hf")


def describe_run(run: str | Path) -> BaseRecord:
    """``BaseRecord`` of a run's model: its base's architecture, codec and checkpoint info."""
    from ..train.checkpoint import checkpoint_config, find_checkpoint

    return config_base(checkpoint_config(find_checkpoint(run)))


def load_run_base(
    run: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> tuple[LMModel, loaders.CheckpointInfo | None]:
    """The model run ``run`` trained, LoRA merged (``W + scaling B A``), as a frozen base in
    eval mode: ``(lm, CheckpointInfo of the run's own base or None)``.

    ``lm.moshi_ttt_base`` is the resolved checkpoint directory (what an adapter trained on it
    records), ``lm.moshi_ttt_codec`` the codec of the run's base.
    """
    from ..train.checkpoint import load_trained

    lm, cfg, info, ckpt = load_trained(run, device)
    codec = getattr(lm, "moshi_ttt_codec", None) or config_base(cfg).codec
    replace_lora_with_linear(lm)
    lm = lm.to(dtype=dtype)
    for p in lm.parameters():
        p.requires_grad_(False)
    mark_origin(lm, str(ckpt.resolve()), codec)
    return lm.eval(), info
