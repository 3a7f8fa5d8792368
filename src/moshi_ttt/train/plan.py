"""``moshi-ttt plan CONFIG`` / ``moshi-ttt train CONFIG --dry-run``: a run's size before any load.

The model is built on the **meta device** (shapes and dtypes, no storage, no weights read, no
download: the architecture comes from the config files, or for a Hub repo from its cached
``config.json`` or else moshi's 7B defaults), with LoRA and TTT as the config says, exactly as
``train.model.build_model`` builds it. From it:

- parameters per group (``base``, ``embeddings``, ``lora``, ``ttt``), frozen or trainable;
- bytes per GPU for N GPUs: the frozen base in the compute dtype (bfloat16 on GPU), float32
  trainables, their gradients and AdamW's two moments, all sharded 1/N under FSDP2 (N > 1),
  plus FSDP's unsharded working set (the root unit and the two largest layer units at once:
  one computing, one prefetched);
- the FSDP units (``parallel.fsdp_units``: one per transformer layer, then the root);
- an activation estimate per micro-batch for several window lengths (``activation_bytes``);
- tokens per optimizer step (9 per frame: text + 8 codebooks);
- rank 0's host memory while the model loads (``host_load_bytes``).

Units: bytes unless named; GiB = 2**30 bytes. Everything here is an estimate of *allocated*
memory: the CUDA context, the allocator's fragmentation and NCCL buffers (a few GiB) are not
counted.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import try_to_load_from_cache
from moshi.models import loaders
from moshi.models.lm import LMModel
from torch import nn

from ..format import FRAME_RATE
from ..integration.apply import ttt_modules
from ..integration.tiny import tiny_lm_kwargs
from ..models.build import meta_base, parameter_groups
from ..models.load import built_whole, describe_spec
from ..models.lora import lora_modules
from ..models.sources import MERGED_KEY, lm_kwargs_of
from ..models.spec import GROUPS, resolve_dtype
from .config import TrainConfig
from .model import LOAD_BATCH_BYTES, add_trainables
from .parallel import fsdp_units

ADAM_STATES = 2  # exp_avg, exp_avg_sq (float32 each)
GIB = 2**30
DEFAULT_GPUS = (1, 8, 16)
DEFAULT_WINDOWS_SEC = (30.0, 100.0, 120.0, 300.0)


@dataclass
class Unit:
    """One FSDP unit: its name (``""`` = the root), parameters it holds, bytes in storage."""

    name: str
    params: int
    trainable: int
    bytes: int


@dataclass
class Plan:
    """What a training run will hold in memory; see the module docstring.

    ``groups``: group -> (parameters, trainable?); ``frozen_bytes`` / ``trainable``: the frozen
    parameters' bytes in their storage dtype and the trainable parameter count (float32);
    ``activation_per_token``: bytes per (batch row x frame) of one micro-batch, the ``fixed``
    part independent of the window; ``tokens_per_frame``: 9.
    """

    config: TrainConfig
    source: str
    arch: dict[str, Any]
    compute_dtype: torch.dtype
    groups: dict[str, tuple[int, bool]]
    frozen_bytes: int
    trainable: int
    units: list[Unit]
    activation_per_frame: int
    activation_per_frame_nockpt: int
    window_sec: list[float] = field(default_factory=lambda: list(DEFAULT_WINDOWS_SEC))
    new_bytes: int = 0  # the new LoRA/TTT parameters in the base dtype, as drawn
    largest_linear_bytes: int = 0  # the largest base linear LoRA wraps (0 without LoRA)
    whole_bytes: int | None = None  # a base built whole on rank 0 (a run, tiny): its bytes

    # -- numbers ------------------------------------------------------------------------------
    @property
    def total_params(self) -> int:
        return sum(n for n, _ in self.groups.values())

    def memory(self, gpus: int) -> dict[str, int]:
        """Bytes per GPU with ``gpus`` GPUs (one process each): frozen base, float32
        trainables, gradients, AdamW states (all 1/N under FSDP2 when N > 1), FSDP's unsharded
        working set (0 for one GPU: no FSDP), activations of one micro-batch of the config's
        window (``activation_bytes``), and their total."""
        n = max(1, gpus)
        out = {
            "frozen": math.ceil(self.frozen_bytes / n),
            "trainable": math.ceil(4 * self.trainable / n),
            "grads": math.ceil(4 * self.trainable / n),
            "adamw": math.ceil(4 * ADAM_STATES * self.trainable / n),
            "fsdp_unsharded": self.fsdp_working_set() if n > 1 else 0,
            "activations": self.activation_bytes(self.config.frames_per_window),
        }
        out["total"] = sum(out.values())
        return out

    def fsdp_working_set(self) -> int:
        """Bytes of whole (gathered) parameters at once under FSDP2: the root unit (kept
        gathered from forward to backward) and the two largest layer units (one running, one
        prefetched); the gradient of a unit is reduce-scattered as it is produced."""
        layers = sorted((u.bytes for u in self.units if u.name), reverse=True)
        root = sum(u.bytes for u in self.units if not u.name)
        return root + sum(layers[:2])

    def activation_bytes(self, frames: int, checkpointing: bool | None = None) -> int:
        """Estimated activation bytes of one micro-batch (``batch_size`` rows of ``frames``):
        with activation checkpointing (``model.gradient_checkpointing``, the default of the
        config), each layer's input is kept and one layer's internals are recomputed at a time;
        without it, every layer's internals are kept."""
        ckpt = self.config.model.gradient_checkpointing if checkpointing is None else checkpointing
        per = self.activation_per_frame if ckpt else self.activation_per_frame_nockpt
        return per * frames * self.config.batch_size

    def host_load_bytes(self, gpus: int) -> int:
        """Rank 0's host memory while the model loads (``train.model``), above the process
        itself and the allocator's slack: the new LoRA/TTT parameters (drawn on the CPU) and one
        base linear at a time (moshi's ``LoRALinear`` draws a full-size weight it drops); with
        several GPUs also one batch of the weights file (``LOAD_BATCH_BYTES``), or the whole
        model for a base built whole on rank 0 (a training run). One GPU: moshi reads the base
        straight to the GPU."""
        loading = self.new_bytes + self.largest_linear_bytes
        if gpus > 1:
            loading += LOAD_BATCH_BYTES if self.whole_bytes is None else self.whole_bytes
        return loading

    def windows_per_step(self, gpus: int) -> int | None:
        """The global batch (windows per optimizer step) on ``gpus`` GPUs: ``global_batch``
        if set (None when it does not divide over the GPUs), else batch_size x grad_accum x
        GPUs (it then grows with the GPU count, the learning rates do not)."""
        c = self.config
        if c.global_batch is not None:
            return c.global_batch if c.global_batch % (c.batch_size * gpus) == 0 else None
        return c.batch_size * c.grad_accum * gpus

    def tokens_per_step(self, gpus: int) -> int | None:
        """Tokens per optimizer step: frames x windows per step x 9 (None: see
        ``windows_per_step``)."""
        windows = self.windows_per_step(gpus)
        return None if windows is None else self.config.frames_per_window * windows * 9

    # -- report -------------------------------------------------------------------------------
    def report(self, gpus: tuple[int, ...] | list[int] = DEFAULT_GPUS) -> str:
        """The plan as markdown (what ``moshi-ttt plan`` prints)."""
        c = self.config
        a = self.arch
        lines = [
            f"# Plan: {c.run_dir}",
            "",
            f"- model: {self.source}; dim {a['dim']}, {a['num_layers']} layers, depformer "
            f"{a['depformer_dim']} x {a['depformer_num_layers']}, context {a['context']} frames"
            + (f" (training: {c.model.train_context})" if c.model.train_context else ""),
            f"- frozen base in {str(self.compute_dtype).removeprefix('torch.')} (on GPU), "
            "trainable parameters and AdamW state in float32; built on the meta device "
            "(no weights read)",
            f"- window {c.duration_sec:g} s = {c.frames_per_window} frames; batch_size "
            f"{c.batch_size} per GPU x grad_accum {c.grad_accum}"
            + (
                f" (global_batch {c.global_batch}: grad_accum derived per GPU count)"
                if c.global_batch is not None
                else ""
            )
            + "; activation checkpointing "
            f"{'on' if c.model.gradient_checkpointing else 'off'}",
            "",
            "| group | parameters | trains |",
            "|---|---|---|",
        ]
        for g in GROUPS:
            n, trains = self.groups.get(g, (0, False))
            lines.append(f"| {g} | {_m(n)} | {'yes' if trains else 'no'} |")
        lines.append(f"| total | {_m(self.total_params)} | {_m(self.trainable)} trainable |")
        small = sum(1 for u in self.units if u.params < 2_000_000)
        layer = [u for u in self.units if u.name]
        root = next(u for u in self.units if not u.name)
        lines += [
            "",
            f"FSDP units: {len(self.units)} ({len(layer)} transformer layers + the root), "
            f"{small} under 2 M parameters; largest layer unit "
            f"{_m(max((u.params for u in layer), default=0))} parameters "
            f"({_gib(max((u.bytes for u in layer), default=0))} GiB), root "
            f"{_m(root.params)} ({_gib(root.bytes)} GiB).",
            "",
            "| GiB per GPU | " + " | ".join(f"{n} GPU{'s' if n > 1 else ''}" for n in gpus) + " |",
            "|---|" + "---|" * len(gpus),
        ]
        mems = [self.memory(n) for n in gpus]
        labels = {
            "frozen": "frozen base",
            "trainable": "trainable (fp32)",
            "grads": "gradients (fp32)",
            "adamw": "AdamW states (fp32)",
            "fsdp_unsharded": "FSDP unsharded units",
            "activations": f"activations ({c.frames_per_window} frames x {c.batch_size})",
            "total": "**total**",
        }
        for key, label in labels.items():
            lines.append(f"| {label} | " + " | ".join(_gib(m[key]) for m in mems) + " |")
        for label, fn in (("windows per optimizer step", self.windows_per_step),
                          ("tokens per optimizer step", self.tokens_per_step)):  # fmt: skip
            cells = [fn(n) for n in gpus]
            lines.append(f"| {label} | " + " | ".join(
                "does not divide" if v is None else f"{v:,}" for v in cells) + " |")  # fmt: skip
        lines.append("| rank 0 host memory while loading (GiB, not GPU) | "
                     + " | ".join(_gib(self.host_load_bytes(n)) for n in gpus) + " |")  # fmt: skip
        lines += [
            "",
            f"Activations of one micro-batch ({c.batch_size} row(s)), GiB:",
            "",
            "| window | frames | checkpointing on | off |",
            "|---|---|---|---|",
        ]
        for sec in sorted({*self.window_sec, c.duration_sec}):
            frames = round(sec * FRAME_RATE)
            lines.append(
                f"| {sec:g} s | {frames} | {_gib(self.activation_bytes(frames, True))} | "
                f"{_gib(self.activation_bytes(frames, False))} |"
            )
        lines += [
            "",
            "Estimates of allocated memory (no CUDA context, allocator slack or NCCL buffers); "
            "one GPU runs without FSDP. Host memory while loading: the new LoRA/TTT parameters "
            "and one linear at a time, plus, on several GPUs, "
            + (
                "one batch of the weights file (rank 0 reads it a batch at a time)."
                if self.whole_bytes is None
                else "the whole model: this base (a training run, a stored LoRA, Hibiki or "
                "the tiny model) is built whole on rank 0; an export of a run is read a batch "
                "at a time."
            ),
        ]
        return "\n".join(lines) + "\n"


def _m(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def _gib(b: int) -> str:
    return f"{b / GIB:.2f}"


# -- building the plan ------------------------------------------------------------------------
def plan_lm_kwargs(cfg: TrainConfig) -> tuple[dict[str, Any], str, dict[str, Any] | None]:
    """``(LMModel kwargs, where they come from, merged TTT entry or None)`` of the base, from
    config files only, offline: a Hub repo's ``config.json`` is read only from the local
    Hugging Face cache (else moshi's 7B defaults: a repo without a config is the 7B)."""
    m = cfg.model
    if m.source == "tiny":
        return tiny_lm_kwargs(**m.tiny_overrides), f"tiny:{cfg.seed}", None
    if m.source == "hf" and not Path(m.hf_repo).expanduser().is_dir():
        config = m.config_path or _cached_hub_file(m.hf_repo, "config.json")
        if config is None:
            return dict(loaders._lm_kwargs), f"{m.hf_repo} (moshi's 7B defaults)", None
        raw = _read_json(config)
        info = loaders.CheckpointInfo("", "", "", dict(raw), raw)
        return lm_kwargs_of(m.hf_repo, info), f"{m.hf_repo} ({config})", raw.get(MERGED_KEY)
    record = describe_spec(cfg.spec)
    raw = (record.info.raw_config or {}) if record.info is not None else {}
    return dict(record.lm_kwargs), str(m.path or m.hf_repo), raw.get(MERGED_KEY)


def _cached_hub_file(repo: str, name: str) -> str | None:
    """A file of a Hub repo if it is in the local cache (never downloads)."""
    if str(name).startswith("hf://") or Path(name).is_file():
        return str(name)
    found = try_to_load_from_cache(repo.removeprefix("hf://"), name)
    return found if isinstance(found, str) else None


def _read_json(path: str) -> dict[str, Any]:
    if str(path).startswith("hf://"):
        raise ValueError(f"model.config_path {path}: give a local file for a plan (no download)")
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the model config ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of moshi's LM kwargs")
    return data


def build_meta_model(cfg: TrainConfig) -> tuple[LMModel, Any, str]:
    """``(lm on the meta device, TrainableGroups, source description)`` as ``build_model``
    would build it for a GPU run (the frozen base in the GPU compute dtype)."""
    kwargs, source, merged = plan_lm_kwargs(cfg)
    dtype = resolve_dtype(cfg.model.dtype, torch.device("cuda"))
    lm = meta_base(kwargs, merged, dtype)  # an export's TTT layers included
    with torch.device("meta"):
        if cfg.ttt is not None and not ttt_modules(lm):
            cfg.check_ttt_layers(len(lm.transformer.layers))
        groups = add_trainables(lm, cfg, torch.device("meta"))
    return lm, groups, source


def make_plan(cfg: TrainConfig) -> Plan:
    """The ``Plan`` of ``cfg`` (meta device: seconds and little memory, even for the 7B)."""
    lm, groups, source = build_meta_model(cfg)
    trainable_ids = {id(p) for _, p in groups.named()}
    owned = parameter_groups(lm)
    counts = {
        g: (sum(p.numel() for _, p in ps), bool(ps) and id(ps[0][1]) in trainable_ids)
        for g, ps in owned.items()
        if ps
    }
    frozen = sum(p.numel() * p.element_size() for p in lm.parameters() if not p.requires_grad)
    units, claimed = [], set()
    for name, module in fsdp_units(lm):
        own = [p for p in module.parameters() if id(p) not in claimed]
        claimed.update(id(p) for p in own)
        units.append(Unit(name, sum(p.numel() for p in own),
                          sum(p.numel() for p in own if p.requires_grad),
                          sum(p.numel() * p.element_size() for p in own)))  # fmt: skip
    dtype = resolve_dtype(cfg.model.dtype, torch.device("cuda"))
    ckpt, full = activation_per_frame(lm, dtype.itemsize)
    kwargs, _, _ = plan_lm_kwargs(cfg)
    arch = {k: kwargs.get(k) for k in ("dim", "num_layers", "depformer_dim",
                                       "depformer_num_layers", "context")}  # fmt: skip
    trainable = sum(p.numel() for _, p in groups.named())
    new = sum(p.numel() for g in ("ttt", "lora") for _, p in owned[g]) * dtype.itemsize
    linear = max((m.frozen_W.weight.numel() for _, m in lora_modules(lm)), default=0)
    whole = None
    if _built_whole(cfg):  # on rank 0's CPU, in the compute dtype
        whole = sum(p.numel() for p in lm.parameters()) * dtype.itemsize
    return Plan(cfg, source, arch, dtype, counts, frozen, trainable, units, ckpt, full,
                new_bytes=new, largest_linear_bytes=linear * dtype.itemsize,
                whole_bytes=whole)  # fmt: skip


def _built_whole(cfg: TrainConfig) -> bool:
    """``models.load.built_whole`` from config files only (a Hub repo's from the cache)."""
    m = cfg.model
    if built_whole(cfg.spec):
        return True
    if m.source == "hf" and not Path(m.hf_repo).expanduser().is_dir():
        config = m.config_path or _cached_hub_file(m.hf_repo, "config.json")
        return built_whole(cfg.spec, _read_json(config) if config is not None else None)
    info = describe_spec(cfg.spec).info
    return built_whole(cfg.spec, info.raw_config if info is not None else None)


# -- activations ------------------------------------------------------------------------------
def _layer_elements(layer: nn.Module) -> int:
    """Activation elements per token of one transformer layer's internals: the input and output
    of every linear (q, k, v are views of the input projection's output, the attention output
    is the output projection's input; a per-step copy of a depformer multi-linear counted once:
    one step runs per token; LoRA adds its rank) and the gated FFN's activation (hidden).
    Attention itself keeps O(T) (flash / memory-efficient kernels on GPU). TTT branches are
    counted apart (``_ttt_bytes``)."""
    skip = {id(m) for _, t in ttt_modules(layer) for m in t.modules()}
    total = 0
    for name, m in layer.named_modules():
        if id(m) in skip or not isinstance(m, nn.Linear):
            continue
        parts = name.split(".")
        if any(x.isdigit() and x != "0" for x in parts):
            continue  # the other steps' weights of a multi-linear
        if parts[-1] == "lora_A":
            total += m.out_features
        elif parts[-1] != "lora_B":
            total += m.in_features + m.out_features
    return total + _ffn_hidden(layer)


def _dim(layer: nn.Module) -> int:
    norm = layer.norm1
    return int(norm.alpha.shape[-1]) if hasattr(norm, "alpha") else int(norm.weight.shape[-1])


def _ffn_hidden(layer: nn.Module) -> int:
    gating = getattr(layer, "gating", None)
    if gating is None:
        return 0
    if isinstance(gating, nn.ModuleList):
        gating = gating[0]
    lin = getattr(gating, "linear_out", None)
    return int(getattr(lin, "in_features", 0))


def _ttt_bytes(layer: nn.Module) -> int:
    """Activation bytes per token of a TTT branch: its projections (compute dtype, counted as
    linears) plus the float32 inner loop (q, k, v, targets, gradients, outputs per head: about
    12 x dim floats)."""
    total = 0
    for _, t in ttt_modules(layer):
        dims = [m.in_features for m in t.modules() if isinstance(m, nn.Linear)]
        total += 12 * 4 * max(dims, default=0)
    return total


def activation_per_frame(lm: LMModel, itemsize: int) -> tuple[int, int]:
    """``(with checkpointing, without)``: activation bytes per batch row and frame.

    Temporal transformer: one token per frame; depformer: ``dep_q`` tokens per frame. With
    checkpointing each layer keeps its input (``dim`` values) and the largest layer's
    internals are alive once (recompute); without it every layer keeps its internals. The
    output logits (text: ``text_card``, audio: ``dep_q x card`` per frame) are kept in the
    compute dtype plus two float32 copies in the loss (upcast and log-softmax).
    """
    temporal = list(lm.transformer.layers)
    depformer = list(lm.depformer.layers) if getattr(lm, "depformer", None) is not None else []
    dep_q = int(lm.dep_q)
    kept, full, peak = 0, 0, 0
    for layers, tokens in ((temporal, 1), (depformer, dep_q)):
        for layer in layers:
            inner = tokens * (_layer_elements(layer) * itemsize + _ttt_bytes(layer))
            kept += tokens * _dim(layer) * itemsize
            full += inner
            peak = max(peak, inner)
    logits = (int(lm.text_card) + dep_q * int(lm.card)) * (itemsize + 8)
    dep_dim = _dim(depformer[0]) if depformer else 0
    embed = (int(lm.dim) + dep_q * dep_dim) * itemsize
    return kept + peak + logits + embed, full + logits + embed
