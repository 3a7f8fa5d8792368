"""Distributed setup, FSDP2 sharding and activation checkpointing, each a small function.

One process needs nothing (no torchrun, no environment variables); under ``torchrun`` the
process group is NCCL on GPU and gloo on CPU. Sharding (``apply_fsdp``) uses FSDP2's
``fully_shard`` with one unit per moshi transformer layer (temporal and depformer), its LoRA
adapters and TTT branch inside it, then the root (embeddings, heads, the rest), as torchtitan
does: 39 units for Moshi 7B (32 + 6 + 1), whatever LoRA/TTT add. A unit mixes a frozen bfloat16
base with float32 trainables: FSDP2 all-gathers mixed dtypes (as bytes) and only requires the
*trainable* parameters of a unit to share one dtype (all are float32 here), so nothing is cast
and gradients are reduced in float32 (see docs/training.md, "Distributed").

Gradients are *summed* over ranks (``set_gradient_divide_factor(1)``): every rank
backpropagates its share of the global token-weighted mean (``LossTerms.objective`` with global
weight totals), so the sum is exactly the gradient of the global loss.
"""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass, fields, is_dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist
from moshi.modules.transformer import StreamingTransformerLayer
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from ..integration.e2e import e2e_layers
from ..models.files import row_sharded
from ..models.spec import resolve_device


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False  # this process's init_distributed created the process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launch_rank() -> tuple[int, int]:
    """``(rank, world size)`` of this process as its launcher (``torchrun``) set them, before
    any process group exists; ``(0, 1)`` alone."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: str = "auto") -> Dist:
    """Join the ``torchrun`` job if there is one (``WORLD_SIZE`` > 1), else a single process.

    ``device``: ``auto`` (the local GPU if any, else CPU), ``cpu`` or ``cuda``.
    """
    rank, world = launch_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if resolve_device(device, what="device").type == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    owns = world > 1 and not dist.is_initialized()
    if owns:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    return Dist(rank, world, local_rank, dev, owns)


def shutdown_distributed() -> None:
    """Destroy the process group, if any (before exit: a rank that exits with a live gloo
    group can abort while its peers exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over ranks (``t`` itself in a single process)."""
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def first_failure(error: str | None, device: torch.device) -> str | None:
    """Collective, at a step boundary: every rank passes its own error (None: none); every rank
    gets the first failing rank's, as ``"rank R: message"`` (None when no rank failed), so
    that all ranks stop together with the same message. One small all-reduce when no rank
    failed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return error
    flag = all_reduce_sum(torch.tensor([0.0 if error is None else 1.0], device=device))
    if float(flag.cpu()) == 0:
        return None
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    rank, first = next((r, e) for r, e in enumerate(errors) if e is not None)
    return f"rank {rank}: {first}"


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


def fsdp_units(lm: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the FSDP units, innermost first: every moshi transformer layer
    (temporal and depformer, with the LoRA adapters and TTT branch it holds), then the root
    (``""``: embeddings, output heads and every parameter no layer holds)."""
    layers = [(n, m) for n, m in lm.named_modules() if isinstance(m, StreamingTransformerLayer)]
    return [*layers, ("", lm)]


def check_unit_dtypes(lm: nn.Module) -> None:
    """FSDP2's rule, checked before sharding with a clear error: within a unit, the parameters
    that train share one dtype (frozen ones may differ)."""
    claimed: set[int] = set()
    for name, unit in fsdp_units(lm):
        own = [(n, p) for n, p in unit.named_parameters() if id(p) not in claimed]
        claimed.update(id(p) for _, p in own)
        dtypes = {p.dtype for _, p in own if p.requires_grad}
        if len(dtypes) > 1:
            raise ValueError(
                f"FSDP unit {name or '<root>'}: trainable parameters of several dtypes "
                f"{sorted(map(str, dtypes))}; trainable parameters must all be float32"
            )


def apply_fsdp(lm: nn.Module, mesh: object | None = None) -> None:
    """FSDP2: one unit per transformer layer (its LoRA and TTT included), then the root.

    Parameters keep their storage dtype (frozen base bfloat16 on GPU, trainables float32; no
    ``MixedPrecisionPolicy`` casts: the forward runs under bfloat16 autocast) and gradients are
    reduced in float32, as a plain sum (see module doc). ``mesh``: a 1-D device mesh (default:
    the whole default process group).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    check_unit_dtypes(lm)
    _register_fsdp_classes(lm)
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    kwargs = {"mp_policy": policy} if mesh is None else {"mp_policy": policy, "mesh": mesh}
    lm.register_forward_hook(_copy_view_outputs, prepend=True)  # before FSDP's post-forward
    replicated = set(replicated_parameters(lm))
    for _, unit in fsdp_units(lm):
        fully_shard(unit, ignored_params=replicated or None, **kwargs)
    if replicated:  # the memory's inner gradients run backward inside the forward: FSDP2's
        lm.set_reshard_after_backward(False)  # end-of-backward must not free the root's weights
    for m in lm.modules():
        if hasattr(m, "set_gradient_divide_factor"):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum


def replicated_parameters(lm: nn.Module) -> list[nn.Parameter]:
    """The parameters FSDP2 leaves whole on every rank: the end-to-end memory's (its initial
    fast weights and inner lr are read outside its layer's forward, by the scan, where a
    sharded parameter would not be gathered). Small; their gradients are summed over the ranks
    by ``sum_replicated_grads``."""
    return [p for _, m in e2e_layers(lm) for p in m.e2e.parameters()]


def sum_replicated_grads(lm: nn.Module) -> None:
    """All-reduce (sum, as FSDP2's reduction here) the gradients of ``replicated_parameters``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for p in replicated_parameters(lm):
        if p.grad is not None:
            dist.all_reduce(p.grad)


def _copy_view_outputs(module: nn.Module, args: object, output: object) -> object:
    """Give the root's output tensors that are views (and need a gradient) storage of their own.

    moshi's ``LMModel.forward`` returns ``text_logits`` as ``linear(x)[:, None]`` (its undelay is
    the identity for the text stream), a view. FSDP2's root post-forward hook registers its
    pre-backward hook on each output and warns, on every rank, that an in-place op on a view
    would drop that hook. Nothing here writes into the output, but a copy removes the hazard
    and the warning at its cause; it costs one copy of the text logits per forward (the view's
    base is freed with it: nothing saves it for backward). Registered with ``prepend=True`` so
    it runs before FSDP's hook. The values and gradients are unchanged.
    """

    def own(t: object) -> object:
        if isinstance(t, torch.Tensor) and t.requires_grad and t._base is not None:
            return t.clone()
        return t

    if isinstance(output, torch.Tensor):
        return own(output)
    if is_dataclass(output) and not isinstance(output, type):
        changes = {f.name: own(getattr(output, f.name)) for f in fields(output)}
        return replace(output, **changes)
    return output


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


def scatter_from_main_(dst: torch.Tensor, full: torch.Tensor | None) -> None:
    """Collective: rank 0's whole tensor ``full`` (None on the other ranks) into ``dst`` on
    every rank: a DTensor gets its local shard (``distribute_tensor`` scatters from rank 0: the
    others receive only their shard, though each allocates an empty tensor of the whole shape
    as its input), a plain tensor the whole (a broadcast)."""
    if full is not None:
        full = full.to(device=dst.device, dtype=dst.dtype)
    if isinstance(dst, DTensor):
        src = torch.empty(dst.shape, dtype=dst.dtype, device=dst.device) if full is None else full
        dst.to_local().copy_(distribute_tensor(src, dst.device_mesh, dst.placements).to_local())
        return
    buf = full.contiguous() if full is not None else torch.empty_like(dst)
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(buf, src=0)
    dst.copy_(buf)


def gather_to_main(t: torch.Tensor, is_main: bool) -> torch.Tensor | None:
    """The whole tensor, float32 on the CPU, on rank 0 only (None elsewhere; a collective for
    a DTensor). A dim-0 shard is sent with one ``dist.gather`` (shards padded to equal rows), so
    no other rank ever holds the whole tensor."""
    t = t.detach()
    if not isinstance(t, DTensor):
        return t.float().cpu().contiguous() if is_main else None
    if not row_sharded(t):
        full = t.full_tensor()
        return full.float().cpu().contiguous() if is_main else None
    local = t.to_local()
    world = t.device_mesh.size()
    chunk = -(-t.shape[0] // world)
    padded = local.new_zeros((chunk, *t.shape[1:]))
    padded[: local.shape[0]].copy_(local)
    group = t.device_mesh.get_group()
    if is_main:
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.gather(padded, parts, dst=dist.get_global_rank(group, 0), group=group)
        return torch.cat(parts)[: t.shape[0]].float().cpu().contiguous()
    dist.gather(padded, None, dst=dist.get_global_rank(group, 0), group=group)
    return None
