"""The model a training run fine-tunes, and which of its parameters train.

``build_model(cfg, device)`` is ``models.build`` of the config's ``ModelSpec`` (base, LoRA on
the base linears, TTT layers; a base exported with TTT layers keeps them), then freezes
everything and unfreezes the parameter groups the config trains, by the modules that own them
(``models.build.parameter_groups``: ``ttt``, ``lora``, ``embeddings``, ``base``).

Trainable parameters are float32 (master weights, optimizer state in float32); the frozen base
keeps the compute dtype (bfloat16 on GPU). ``TrainableGroups`` maps each group to its
``(name, parameter)`` pairs and to its peak learning rate. ``build_sharded_model`` is the same
model under FSDP2, read once by rank 0, a batch of tensors at a time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from moshi.models.lm import LMModel
from moshi.modules.transformer import StreamingTransformerLayer
from torch import nn

from ..models.adapter import ttt_record
from ..models.build import (
    add_lora_and_memory,
    mark_trained,
    meta_base,
    parameter_groups,
)
from ..models.load import base_structure, build, describe_spec, load_base, read_base_tensors
from ..models.spec import GROUPS, LoadedModel, resolve_dtype
from .config import TrainConfig
from .parallel import apply_fsdp, broadcast_object, scatter_from_main_

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
    ``cfg.seed``, drawn on the CPU: the same values on any device and under
    ``build_sharded_model``) -> freeze all -> unfreeze the configured groups and cast them to
    float32. ``dtype``: of the frozen base (default: ``model.dtype`` resolved for ``device``).
    """
    model = build(cfg.spec, device, dtype, init_device=torch.device("cpu"))
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


LOAD_BATCH_BYTES = 512 * 2**20  # what rank 0 reads from the weights file at a time


def build_sharded_model(
    cfg: TrainConfig, device: torch.device, batch_bytes: int = LOAD_BATCH_BYTES
) -> tuple[LoadedModel, TrainableGroups]:
    """Under ``torchrun``: the model of ``build_model``, sharded with FSDP2, read once, by rank
    0 only, with bounded host memory.

    Every rank builds the structure on the meta device, shards it (``parallel.apply_fsdp``) and
    allocates only its shards on ``device``; rank 0 then reads the values in batches of about
    ``batch_bytes`` and sends each tensor's shards to their ranks (``scatter_from_main_``).
    Where the values come from on rank 0 (the only rank that reads a file or asks the Hub):

    - a base in one safetensors file (a Hub repo, a checkpoint directory, an export;
      ``models.load.base_structure``): read tensor by tensor, one batch at a time, the new
      LoRA/TTT parameters drawn on the CPU from ``cfg.seed`` as in one process. Rank 0's host
      memory above its own shards: one batch, the new parameters and one linear at a time;
    - any other base (tiny, a training run, a checkpoint with a stored LoRA): built whole on
      rank 0's CPU (``build``), which needs the whole model in host memory there.

    A failure on rank 0 (a missing file, a bad key) stops every rank with its message.
    """
    m = cfg.model
    dtype = resolve_dtype(m.dtype, device)
    values: Callable[[list[str]], dict[str, torch.Tensor]] | None = None
    shared: Any = None
    if torch.distributed.get_rank() == 0:
        try:
            values, shared = _rank0_source(cfg, dtype)
        except Exception as e:  # every rank stops with rank 0's error (none waits for it)
            broadcast_object(e)
            raise
    shared = broadcast_object(shared)
    if isinstance(shared, BaseException):
        raise shared
    kwargs, record, model = shared
    lm = meta_base(kwargs, record, dtype)
    with torch.device("meta"):
        groups = add_trainables(lm, cfg, torch.device("meta"), model.base)
    apply_fsdp(lm)
    lm.to_empty(device=device)
    _receive_values(lm, values, batch_bytes)
    groups.rebind(lm)
    return dataclasses.replace(model, lm=lm, spec=cfg.spec), groups


def _rank0_source(
    cfg: TrainConfig, dtype: torch.dtype
) -> tuple[Callable[[list[str]], dict[str, torch.Tensor]], tuple[Any, ...]]:
    """Rank 0: ``(names -> their whole values on the CPU, what every rank needs to build the
    same structure: (LM kwargs, the base's TTT record, the model's origin without its module))``.
    """
    cpu = torch.device("cpu")
    structure = base_structure(cfg.spec, dtype)
    if structure is None:  # built whole, here only
        model = load_base(cfg.spec, cpu, dtype)
        weights = None
    else:
        model, weights = structure
    config, layers = ttt_record(model.lm)
    record = None if config is None else {"ttt_config": config, "ttt_layers": layers}
    add_lora_and_memory(model.lm, cfg.spec, cpu, model.base)  # new parameters on the CPU
    state = model.lm.state_dict()
    kwargs = describe_spec(cfg.spec).lm_kwargs
    shared = (kwargs, record, dataclasses.replace(model, lm=None))

    def values(names: list[str]) -> dict[str, torch.Tensor]:
        stored = [n for n in names if state[n].is_meta]
        out = {n: state[n] for n in names if not state[n].is_meta}
        if stored:
            assert weights is not None, stored[:3]
            out.update(read_base_tensors(weights, stored, dtype))
        return out

    return values, shared


def _receive_values(
    lm: nn.Module,
    values: Callable[[list[str]], dict[str, torch.Tensor]] | None,
    batch_bytes: int,
) -> None:
    """Fill the sharded ``lm`` with rank 0's ``values`` (None on the other ranks), batch by
    batch of about ``batch_bytes``, tensor by tensor (``parallel.scatter_from_main_``); every
    rank cuts the same batches from the same structure. A read that fails on rank 0 stops
    every rank with its message."""
    state = lm.state_dict()
    with torch.no_grad():
        for names in _batches(state, batch_bytes):
            full: dict[str, torch.Tensor] = {}
            error = None
            if values is not None:
                try:
                    full = values(names)
                    for n in names:  # checked before anything is sent: no rank left waiting
                        if tuple(full[n].shape) != tuple(state[n].shape):
                            raise ValueError(f"the base's {n!r} has shape {list(full[n].shape)}, "
                                             f"the model {list(state[n].shape)}")  # fmt: skip
                except Exception as e:
                    error = e
            error = broadcast_object(error)
            if isinstance(error, BaseException):
                raise error
            for name in names:
                scatter_from_main_(state[name], full.pop(name, None))


def _batches(state: dict[str, torch.Tensor], batch_bytes: int) -> list[list[str]]:
    """The state dict's names in order, cut into runs of at most ``batch_bytes`` (a larger
    tensor alone)."""
    out: list[list[str]] = [[]]
    size = 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if out[-1] and size + n > batch_bytes:
            out.append([])
            size = 0
        out[-1].append(name)
        size += n
    return [b for b in out if b]


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
