"""Distributed setup, FSDP2 sharding and activation checkpointing, each a small function.

One process needs nothing (no torchrun, no environment variables); under ``torchrun`` the
process group is NCCL on GPU and gloo on CPU. Sharding (``apply_fsdp``) uses FSDP2's
``fully_shard`` on every moshi transformer layer (temporal and depformer), with each TTT branch,
LoRA adapter and trainable embedding its own unit first (FSDP2 needs one dtype per unit: the
frozen base is bfloat16 on GPU, trainable parameters float32), then the root.

Gradients are *summed* over ranks (``set_gradient_divide_factor(1)``): every rank
backpropagates its share of the global token-weighted mean (``LossTerms.objective`` with global
weight totals), so the sum is exactly the gradient of the global loss.
"""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from ..checkpoints.loading import lora_modules
from ..integration.apply import ttt_modules
from .model import transformer_layers


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> Dist:
    """Join the ``torchrun`` job if there is one (``WORLD_SIZE`` > 1), else a single process.

    ``device``: ``auto`` (the local GPU if any, else CPU), ``cpu`` or ``cuda``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device cuda: CUDA is not available on this machine")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    return Dist(rank, world, local_rank, dev)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over ranks (``t`` itself in a single process)."""
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: object) -> object:
    """Rank 0's ``obj`` on every rank."""
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def apply_activation_checkpointing(lm: nn.Module) -> None:
    """Recompute every transformer layer in the backward (moshi's own switch: non-reentrant
    ``torch.utils.checkpoint`` around each layer of the temporal transformer and depformer)."""
    lm.transformer.checkpointing = True
    if getattr(lm, "depformer", None) is not None:
        lm.depformer.checkpointing = True


def apply_fsdp(lm: nn.Module) -> None:
    """FSDP2: shard the trainable sub-units, every transformer layer, then the root.

    Parameters stay in their storage dtype (no ``MixedPrecisionPolicy`` casts); on GPU the
    forward runs under bfloat16 autocast. Gradient reduction is a plain sum (see module doc).
    """
    from torch.distributed.fsdp import fully_shard

    _register_fsdp_classes(lm)
    units: list[nn.Module] = [m for _, m in ttt_modules(lm)]
    for _, lora in lora_modules(lm):
        units += [lora.lora_A, lora.lora_B]
    units += [m for m in lm.modules() if isinstance(m, nn.Embedding) and m.weight.requires_grad]
    for unit in units:
        fully_shard(unit)
    for layer in transformer_layers(lm):
        fully_shard(layer)
    fully_shard(lm)
    for m in lm.modules():
        if hasattr(m, "set_gradient_divide_factor"):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum


def _register_fsdp_classes(model: nn.Module) -> None:
    """Give FSDP2 a usable wrapper class for moshi's modules.

    ``fully_shard`` swaps a module's class for ``type("FSDP" + name, (FSDPModule, cls))``.
    moshi's ``StreamingModule`` lists ``abc.ABC`` before ``nn.Module``, and CPython then refuses
    the swap ("object layout differs"). Putting ``abc.ABC`` first in the FSDP side keeps the
    layout (MRO: cls ... ABC, FSDPModule, Module), and FSDPModule's ``_apply`` still wraps
    ``Module._apply``. Registered in FSDP2's own class cache, so ``fully_shard`` uses it.
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fully_shard import get_cls_to_fsdp_cls

    cache = get_cls_to_fsdp_cls()
    for module in model.modules():
        cls = type(module)
        if cls in cache or not issubclass(cls, abc.ABC):
            continue
        base = type("ABCFSDPModule", (abc.ABC, FSDPModule), {})
        cache[cls] = type(f"FSDP{cls.__name__}", (base, cls), {"__deepcopy__": _no_deepcopy})


def _no_deepcopy(self: nn.Module, memo: dict) -> None:
    raise AssertionError("FSDP does not support deepcopy; copy the model before fully_shard")


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (gathers a DTensor shard; a collective under FSDP)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def copy_full_(dst: torch.Tensor, full: torch.Tensor) -> None:
    """Write a whole tensor into ``dst`` (its local shard if ``dst`` is a DTensor)."""
    full = full.to(device=dst.device, dtype=dst.dtype)
    if isinstance(dst, DTensor):
        local = distribute_tensor(full, dst.device_mesh, dst.placements).to_local()
        dst.to_local().copy_(local)
    else:
        dst.copy_(full)
