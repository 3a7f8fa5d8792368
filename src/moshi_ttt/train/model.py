"""The model a training run fine-tunes, and which of its parameters train.

``build_model(cfg, device)`` loads the base (tiny / HF / a local directory, export or run), adds
LoRA to the base linears and TTT layers as configured (a base exported with TTT layers keeps
them), freezes everything, then unfreezes the parameter groups by the modules that own them
(never by substrings of names):

- ``ttt``: every parameter of a TTT branch (``integration.apply.ttt_modules``);
- ``lora``: ``lora_A`` / ``lora_B`` of every moshi ``LoRALinear``;
- ``embeddings``: moshi's text and audio embedding tables (``model.train_embeddings``);
- ``base``: everything else (``model.train_base``: training a small model from scratch).

Trainable parameters are float32 (master weights, optimizer state in float32); the frozen base
keeps the compute dtype (bfloat16 on GPU). ``TrainableGroups`` maps each group to its
``(name, parameter)`` pairs and to its peak learning rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from moshi.models.lm import LMModel
from moshi.modules.transformer import StreamingTransformerLayer
from torch import nn

from ..checkpoints.loading import (
    OVERRIDE_KEYS,
    apply_lora,
    load_base_lm,
    lora_modules,
    mark_origin,
)
from ..integration import TTTConfig, apply_ttt, parse_layer_spec
from ..integration.apply import ttt_modules
from ..integration.tiny import build_tiny_lm
from .config import ModelConfig, TrainConfig

GROUPS = ("ttt", "lora", "embeddings", "base")


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


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``model.dtype``: ``auto`` = bfloat16 on GPU, float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def file_overrides(m: ModelConfig) -> dict[str, str]:
    """``model.moshi_weights`` / ``mimi_weights`` / ``tokenizer`` / ``config_path`` that are set
    (``CheckpointInfo.from_hf_repo`` overrides)."""
    return {k: str(getattr(m, k)) for k in OVERRIDE_KEYS if getattr(m, k) is not None}


def load_base(cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> tuple[LMModel, Any]:
    """The base LM named by ``cfg.model`` (eval mode) and its ``CheckpointInfo`` (None if tiny).

    ``source: local`` takes a checkpoint directory with a config.json, an exported run
    (``moshi-ttt export``), a run directory or a ``checkpoints/step_*`` directory.
    """
    m = cfg.model
    if m.source == "tiny":
        lm = build_tiny_lm(cfg.seed, **m.tiny_overrides).to(device=device, dtype=dtype)
        mark_origin(lm, f"tiny:{cfg.seed}", f"tiny:{cfg.seed}")
        return lm, None
    source = m.hf_repo if m.source == "hf" else m.path
    if m.source == "local" and not Path(str(source)).is_dir():
        raise FileNotFoundError(f"model.path: {source!r} is not a checkpoint or run directory")
    return load_base_lm(
        source, device=device, dtype=dtype, overrides=file_overrides(m),
        legacy_7b=m.source == "hf",
    )  # fmt: skip


def build_model(cfg: TrainConfig, device: torch.device) -> tuple[LMModel, TrainableGroups, Any]:
    """``(lm, trainable groups, checkpoint info)`` for ``cfg``, in train mode on ``device``.

    Order: base -> LoRA (base linears only) -> TTT (new parameters initialised from
    ``cfg.seed``) -> freeze all -> unfreeze the configured groups and cast them to float32.
    """
    dtype = resolve_dtype(cfg.model.dtype, device)
    lm, info = load_base(cfg, device, dtype)
    if cfg.lora.enable:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(cfg.seed + 1)
            apply_lora(lm, rank=cfg.lora.rank, scaling=cfg.lora.scaling)
    if cfg.ttt is not None and ttt_modules(lm):  # an exported TTT model: train its layers on
        check_same_ttt(lm, cfg.ttt)
    elif cfg.ttt is not None:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(cfg.seed + 2)
            apply_ttt(lm, cfg.ttt)
    groups = select_trainable(lm, cfg)
    lm.train()
    return lm, groups, info


def check_same_ttt(lm: LMModel, config: TTTConfig) -> None:
    """A base that already has TTT layers (an export) keeps them; ``ttt`` must then describe
    them (same layers and settings; ``gate_init`` / ``output_init`` only initialise), else a
    ``ValueError`` naming the differences."""
    have = lm.ttt_config.to_dict()
    want = config.to_dict()
    layers = parse_layer_spec(config.layers, len(lm.transformer.layers))
    diff = [f"layers: {layers} vs {list(lm.ttt_layers)}"] if layers != list(lm.ttt_layers) else []
    for key in sorted(set(want) - {"layers", "gate_init", "output_init"}):
        if want[key] != have.get(key):
            diff.append(f"{key}: {want[key]!r} vs {have.get(key)!r}")
    if diff:
        raise ValueError(
            f"ttt: the base ({getattr(lm, 'moshi_ttt_base', '?')}) already has TTT layers "
            f"{list(lm.ttt_layers)} with other settings ({'; '.join(diff)}, config vs base): "
            "set ttt to the base's settings to train them further, or ttt: null to keep them "
            "frozen"
        )


def select_trainable(lm: LMModel, cfg: TrainConfig) -> TrainableGroups:
    """Freeze everything, then unfreeze (in float32) the groups ``cfg`` trains."""
    owned: dict[str, list[tuple[str, nn.Parameter]]] = {g: [] for g in GROUPS}
    seen: set[int] = set()

    def take(group: str, prefix: str, module: nn.Module) -> None:
        for name, p in module.named_parameters(prefix=prefix):
            if id(p) not in seen:
                seen.add(id(p))
                owned[group].append((name, p))

    for name, module in ttt_modules(lm):
        take("ttt", name, module)
    for name, module in lora_modules(lm):
        take("lora", f"{name}.lora_A", module.lora_A)
        take("lora", f"{name}.lora_B", module.lora_B)
    for attr in ("emb", "text_emb", "depformer_emb", "depformer_text_emb"):  # LMModel's tables
        owner = getattr(lm, attr, None)
        if owner is not None:
            take("embeddings", attr, owner)
    take("base", "", lm)

    wanted = {
        "ttt": cfg.ttt is not None,
        "lora": cfg.lora.enable,
        "embeddings": cfg.model.train_embeddings or cfg.model.train_base,
        "base": cfg.model.train_base,
    }
    lrs = {
        "ttt": cfg.effective_ttt_lr,
        "lora": cfg.effective_lora_lr,
        "embeddings": cfg.lr,
        "base": cfg.lr,
    }
    for p in lm.parameters():
        p.requires_grad_(False)
    params: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for group in GROUPS:
        if wanted[group] and owned[group]:
            for _, p in owned[group]:
                p.data = p.data.float()
                p.requires_grad_(True)
            params[group] = owned[group]
    if not params:
        raise ValueError("nothing to train: no TTT layers, LoRA, embeddings or base selected")
    return TrainableGroups(params, {g: lrs[g] for g in params})


def transformer_layers(lm: LMModel) -> list[nn.Module]:
    """Every moshi transformer layer (temporal transformer and depformer): the FSDP units."""
    return [m for m in lm.modules() if isinstance(m, StreamingTransformerLayer)]
