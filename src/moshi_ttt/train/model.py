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
from moshi.models import loaders
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


def build_model(
    cfg: TrainConfig, device: torch.device, dtype: torch.dtype | None = None
) -> tuple[LMModel, TrainableGroups, Any]:
    """``(lm, trainable groups, checkpoint info)`` for ``cfg``, in train mode on ``device``.

    Order: base -> LoRA (base linears only) -> TTT (new parameters initialised from
    ``cfg.seed``) -> freeze all -> unfreeze the configured groups and cast them to float32.
    ``dtype``: of the frozen base (default: ``model.dtype`` resolved for ``device``).
    """
    dtype = dtype or resolve_dtype(cfg.model.dtype, device)
    lm, info = load_base(cfg, device, dtype)
    groups = add_trainables(lm, cfg, device)
    return lm, groups, info


def add_trainables(lm: LMModel, cfg: TrainConfig, device: torch.device) -> TrainableGroups:
    """LoRA and TTT as ``cfg`` says (seeded), then ``select_trainable``; ``lm`` in train mode.
    Works on the meta device too (``train.plan``)."""
    devices = [device] if device.type == "cuda" else []
    if cfg.lora.enable:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(cfg.seed + 1)
            apply_lora(lm, rank=cfg.lora.rank, scaling=cfg.lora.scaling)
    if cfg.ttt is not None and ttt_modules(lm):  # an exported TTT model: train its layers on
        check_same_ttt(lm, cfg.ttt)
    elif cfg.ttt is not None:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(cfg.seed + 2)
            apply_ttt(lm, cfg.ttt)
    groups = select_trainable(lm, cfg)
    lm.train()
    return groups


ORIGIN_ATTRS = ("moshi_ttt_base", "moshi_ttt_codec")  # set by checkpoints.loading.mark_origin


def build_sharded_model(
    cfg: TrainConfig, device: torch.device
) -> tuple[LMModel, TrainableGroups, Any] | None:
    """Under ``torchrun``: the model of ``build_model``, sharded with FSDP2, read once.

    Rank 0 builds the model on the CPU (the only rank that reads the weights or asks the Hub;
    LoRA/TTT initialised from ``cfg.seed`` as in one process); every rank builds the same
    structure on the meta device, shards it (``parallel.apply_fsdp``), allocates only its
    shards on ``device`` and receives rank 0's values by broadcast (``set_model_state_dict``
    with ``broadcast_from_rank0``). No rank holds the whole model on its GPU. Returns None
    for a base that is a training run (``model.path`` a run directory): the caller then builds
    on every rank.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from ..checkpoints.loading import MERGED_KEY, is_run_dir, lm_kwargs_of
    from ..integration.tiny import tiny_lm_kwargs
    from .parallel import apply_fsdp, broadcast_object

    m = cfg.model
    if m.source == "local" and is_run_dir(str(m.path)):
        return None
    dtype = resolve_dtype(m.dtype, device)
    src = None
    shared: Any = None
    if torch.distributed.get_rank() == 0:
        try:
            src, _, info = build_model(cfg, torch.device("cpu"), dtype)
            if m.source == "tiny":
                kwargs, merged = tiny_lm_kwargs(**m.tiny_overrides), None
            else:
                kwargs = lm_kwargs_of(m.hf_repo if m.source == "hf" else m.path, info)
                merged = (info.raw_config or {}).get(MERGED_KEY)
            shared = (kwargs, merged, info, {k: getattr(src, k, None) for k in ORIGIN_ATTRS})
        except Exception as e:  # every rank stops with rank 0's error (none waits for it)
            broadcast_object(e)
            raise
    shared = broadcast_object(shared)
    if isinstance(shared, BaseException):
        raise shared
    kwargs, merged, info, origin = shared
    with torch.device("meta"):
        lm = loaders.get_moshi_lm(None, kwargs, device="meta", dtype=dtype)
        if isinstance(merged, dict) and merged.get("ttt_config") is not None:
            apply_ttt(lm, TTTConfig.from_dict({**merged["ttt_config"],
                                               "layers": list(merged["ttt_layers"])}))  # fmt: skip
        groups = add_trainables(lm, cfg, torch.device("meta"))
    for key, value in origin.items():
        if value is not None:
            setattr(lm, key, value)
    apply_fsdp(lm)
    lm.to_empty(device=device)
    full = src.state_dict() if src is not None else {}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    set_model_state_dict(lm, full, options=options)
    del src, full
    groups.rebind(lm)
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


def parameter_groups(lm: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Every parameter of ``lm`` by the group of the module that owns it (``GROUPS``; each
    parameter once): TTT branches, LoRA A/B, embedding tables, and the rest (``base``)."""
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
    return owned


def select_trainable(lm: LMModel, cfg: TrainConfig) -> TrainableGroups:
    """Freeze everything, then unfreeze (in float32) the groups ``cfg`` trains."""
    owned = parameter_groups(lm)
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
