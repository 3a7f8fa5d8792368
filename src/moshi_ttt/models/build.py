"""Spec -> module, the steps after the base is loaded: LoRA, memory, and which groups train.

``add_lora_and_memory`` adds what a ``ModelSpec`` asks for to a loaded (or meta-device) base:
LoRA on the base linears (initialised from ``seed + 1``), then the TTT layers (from
``seed + 2``); a base that already has TTT layers (an export) keeps them. ``meta_base`` builds
a base's structure on the meta device from its LM kwargs (no weights), for ``plan``, FSDP and
exports. Parameter groups are found by the module that owns a parameter, never by name:

- ``ttt``: every parameter of a TTT branch (``integration.apply.ttt_modules``);
- ``lora``: ``lora_A`` / ``lora_B`` of every moshi ``LoRALinear``;
- ``embeddings``: moshi's text and audio embedding tables;
- ``base``: everything else.
"""

from __future__ import annotations

from typing import Any

import torch
from moshi.models import loaders
from moshi.models.lm import LMModel
from torch import nn

from ..integration.apply import apply_ttt, ttt_modules
from ..integration.config import TTTConfig, parse_layer_spec
from .lora import apply_lora, lora_modules
from .spec import GROUPS, ModelSpec


def recorded_ttt_config(record: Any) -> TTTConfig | None:
    """The ``TTTConfig`` recorded by an export's ``"moshi_ttt"`` entry or an ``adapter.json``
    (``ttt_config`` with ``ttt_layers`` as its layer list); None without TTT."""
    if not isinstance(record, dict) or record.get("ttt_config") is None:
        return None
    return TTTConfig.from_dict({**record["ttt_config"], "layers": list(record["ttt_layers"])})


def meta_base(lm_kwargs: dict[str, Any], merged: Any, dtype: torch.dtype) -> LMModel:
    """The base's structure on the meta device (no storage): ``LMModel(**lm_kwargs)`` and, for
    an export (``merged``: its ``"moshi_ttt"`` entry), its TTT layers."""
    with torch.device("meta"):  # also what moshi creates without a device argument
        lm = loaders.get_moshi_lm(None, lm_kwargs, device="meta", dtype=dtype)
        ttt = recorded_ttt_config(merged)
        if ttt is not None:
            apply_ttt(lm, ttt)
    return lm


def add_lora_and_memory(lm: LMModel, spec: ModelSpec, device: torch.device, base: str) -> None:
    """LoRA and TTT as ``spec`` says, their new parameters on ``device`` (the meta device
    included), seeded: the same values on the CPU whether the base is there or on the meta
    device. ``base``: what the model was loaded from, for messages."""
    devices = [device] if device.type == "cuda" else []
    if spec.lora.enable:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(spec.seed + 1)
            apply_lora(lm, rank=spec.lora.rank, scaling=spec.lora.scaling, device=device)
    if spec.ttt is not None and ttt_modules(lm):  # an exported TTT model: train its layers on
        check_same_ttt(lm, spec.ttt, base)
    elif spec.ttt is not None:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(spec.seed + 2)
            apply_ttt(lm, spec.ttt, device)


def check_same_ttt(lm: LMModel, config: TTTConfig, base: str = "?") -> None:
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
            f"ttt: the base ({base}) already has TTT layers "
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


def mark_trained(lm: nn.Module, spec: ModelSpec) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Freeze everything, then unfreeze, in float32 (master weights), the groups ``spec``
    trains; returns them (group -> ``(name, parameter)`` pairs, groups without parameters
    left out). None at all is a ``ValueError``."""
    owned = parameter_groups(lm)
    for p in lm.parameters():
        p.requires_grad_(False)
    params: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for group in spec.trained_groups:
        if owned[group]:
            for _, p in owned[group]:
                p.data = p.data.float()
                p.requires_grad_(True)
            params[group] = owned[group]
    if not params:
        raise ValueError("nothing to train: no TTT layers, LoRA, embeddings or base selected")
    return params
