"""The model a training run fine-tunes, and which of its parameters train.

``build_model(cfg, device)`` is ``models.build`` of the config's ``ModelSpec`` (base, LoRA on
the base linears, TTT layers; a base exported with TTT layers keeps them), then freezes
everything and unfreezes the parameter groups the config trains, by the modules that own them
(``models.build.parameter_groups``: ``ttt``, ``lora``, ``embeddings``, ``base``).

Trainable parameters are float32 (master weights, optimizer state in float32); the frozen base
keeps the compute dtype (bfloat16 on GPU). ``TrainableGroups`` maps each group to its
``(name, parameter)`` pairs and to its peak learning rate. ``build_sharded_model`` is the same
model under FSDP2, read once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from moshi.models.lm import LMModel
from moshi.modules.transformer import StreamingTransformerLayer
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from ..integration.tiny import tiny_lm_kwargs
from ..models.build import (
    add_lora_and_memory,
    mark_trained,
    meta_base,
    parameter_groups,
)
from ..models.load import build
from ..models.sources import MERGED_KEY, is_run_dir, lm_kwargs_of
from ..models.spec import GROUPS, LoadedModel, resolve_dtype
from .config import TrainConfig
from .parallel import apply_fsdp, broadcast_object

__all__ = [
    "GROUPS",
    "TrainableGroups",
    "add_trainables",
    "build_model",
    "build_sharded_model",
    "parameter_groups",
    "resolve_dtype",
    "select_trainable",
    "transformer_layers",
]


@dataclass
class TrainableGroups:
    """Trainable ``(name, parameter)`` pairs per group, and each group's peak learning rate."""

    params: dict[str, list[tuple[str, nn.Parameter]]]
    lrs: dict[str, float]

    def named(self) -> list[tuple[str, nn.Parameter]]:
        return [item for group in self.params.values() for item in group]

    def rebind(self, model: nn.Module) -> None:
        """Point at ``model``'s current parameters of the same names (``fully_shard`` replaces
        every parameter by a sharded one)."""
        current = dict(model.named_parameters())
        self.params = {g: [(n, current[n]) for n, _ in ps] for g, ps in self.params.items()}

    def num_params(self) -> dict[str, int]:
        return {g: sum(p.numel() for _, p in ps) for g, ps in self.params.items()}


def build_model(
    cfg: TrainConfig, device: torch.device, dtype: torch.dtype | None = None
) -> tuple[LoadedModel, TrainableGroups]:
    """``(the model of cfg.spec, its trainable groups)``, in train mode on ``device``.

    Order: base -> LoRA (base linears only) -> TTT (new parameters initialised from
    ``cfg.seed``) -> freeze all -> unfreeze the configured groups and cast them to float32.
    ``dtype``: of the frozen base (default: ``model.dtype`` resolved for ``device``).
    """
    model = build(cfg.spec, device, dtype)
    groups = select_trainable(model.lm, cfg)
    model.lm.train()
    return model, groups


def add_trainables(
    lm: LMModel, cfg: TrainConfig, device: torch.device, base: str = "?"
) -> TrainableGroups:
    """LoRA and TTT as ``cfg`` says (seeded), then ``select_trainable``; ``lm`` in train mode.
    Works on the meta device too (``train.plan``). ``base``: where ``lm`` comes from, for
    messages."""
    add_lora_and_memory(lm, cfg.spec, device, base)
    groups = select_trainable(lm, cfg)
    lm.train()
    return groups


def build_sharded_model(
    cfg: TrainConfig, device: torch.device
) -> tuple[LoadedModel, TrainableGroups] | None:
    """Under ``torchrun``: the model of ``build_model``, sharded with FSDP2, read once.

    Rank 0 builds the model on the CPU (the only rank that reads the weights or asks the Hub;
    LoRA/TTT initialised from ``cfg.seed`` as in one process); every rank builds the same
    structure on the meta device, shards it (``parallel.apply_fsdp``), allocates only its
    shards on ``device`` and receives rank 0's values by broadcast (``set_model_state_dict``
    with ``broadcast_from_rank0``). No rank holds the whole model on its GPU. Returns None
    for a base that is a training run (``model.path`` a run directory): the caller then builds
    on every rank.
    """
    m = cfg.model
    if m.source == "local" and is_run_dir(str(m.path)):
        return None
    dtype = resolve_dtype(m.dtype, device)
    src = None
    shared: Any = None
    if torch.distributed.get_rank() == 0:
        try:
            built, _ = build_model(cfg, torch.device("cpu"), dtype)
            src, info = built.lm, built.info
            if m.source == "tiny":
                kwargs, merged = tiny_lm_kwargs(**m.tiny_overrides), None
            else:
                kwargs = lm_kwargs_of(m.hf_repo if m.source == "hf" else m.path, info)
                merged = (info.raw_config or {}).get(MERGED_KEY)
            shared = (kwargs, merged, info, built.base, built.codec)
            del built  # src is the one reference to the CPU model, freed below
        except Exception as e:  # every rank stops with rank 0's error (none waits for it)
            broadcast_object(e)
            raise
    shared = broadcast_object(shared)
    if isinstance(shared, BaseException):
        raise shared
    kwargs, merged, info, base, codec = shared
    lm = meta_base(kwargs, merged, dtype)
    with torch.device("meta"):
        groups = add_trainables(lm, cfg, torch.device("meta"), base)
    apply_fsdp(lm)
    lm.to_empty(device=device)
    full = src.state_dict() if src is not None else {}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    set_model_state_dict(lm, full, options=options)
    del src, full
    groups.rebind(lm)
    return LoadedModel(lm, info, base, codec, cfg.spec), groups


def select_trainable(lm: LMModel, cfg: TrainConfig) -> TrainableGroups:
    """Freeze everything, then unfreeze (in float32) the groups ``cfg`` trains, each with its
    peak learning rate."""
    params = mark_trained(lm, cfg.spec)
    lrs = {
        "ttt": cfg.effective_ttt_lr,
        "lora": cfg.effective_lora_lr,
        "embeddings": cfg.lr,
        "base": cfg.lr,
    }
    return TrainableGroups(params, {g: lrs[g] for g in params})


def transformer_layers(lm: LMModel) -> list[nn.Module]:
    """Every moshi transformer layer (temporal transformer and depformer): the FSDP units."""
    return [m for m in lm.modules() if isinstance(m, StreamingTransformerLayer)]
