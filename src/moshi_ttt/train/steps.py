"""The pieces of a training step, used by the loop in ``trainer``: the learning-rate schedule,
the optimizer, the data loaders, the forward pass with its loss terms (autocast, attention
context per step, the gate-0 output for ``kl_to_base``), the retrofit advice and evaluation.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.files import BadFileCounter, DataError
from ..data.pipeline import Batch, WindowLoader, open_source
from ..format import NUM_STREAMS, ZERO_TOKEN
from ..integration.apply import set_gates
from ..integration.carry import StateCarry
from ..integration.e2e import e2e_layers
from ..integration.e2e_scan import InnerLoop, e2e_forward
from ..integration.hybrid import GatedTTT
from ..recipes import HARM_TOLERANCE, retrofit_window
from .config import TrainConfig
from .loss import LossTerms, compute_loss_terms, covered_ce_sums, weight_totals
from .metrics import gate_values
from .model import resolve_dtype
from .parallel import (
    Dist,
    all_reduce_sum,
)


# -- schedule ---------------------------------------------------------------------------------
def lr_multiplier(cfg: TrainConfig, step: int) -> float:
    """The learning rate of optimizer step ``step`` (1-based) as a fraction of the peak.

    ``cosine``: linear warm-up from 0 over ``warmup_steps``, then cosine to ``min_lr_ratio``;
    ``constant``: the same warm-up, then 1; ``onecycle``: torch ``OneCycleLR``'s shape (cosine
    from 1/25 up to 1 over the warm-up, then cosine down to 1/2.5e5), without its momentum
    cycling (AdamW keeps ``optim.betas``).
    """
    warm, total = cfg.warmup_steps, cfg.max_steps
    s = step - 1  # 0-based
    if cfg.optim.schedule == "onecycle":  # phases as OneCycleLR: peak at step pct*total - 1
        start, end = 1 / 25, 1 / 25 / 1e4
        peak = cfg.optim.pct_start * total - 1
        if s <= peak and peak > 0:
            return start + (1 - start) * (1 - math.cos(math.pi * s / peak)) / 2
        frac = (s - max(peak, 0)) / max(1e-9, total - 1 - max(peak, 0))
        return end + (1 - end) * (1 + math.cos(math.pi * min(1.0, frac))) / 2
    if s < warm:
        return (s + 1) / (warm + 1)
    if cfg.optim.schedule == "constant":
        return 1.0
    frac = (s - warm) / max(1, total - warm)
    floor = cfg.optim.min_lr_ratio
    return floor + (1 - floor) * (1 + math.cos(math.pi * min(1.0, frac))) / 2


def build_optimizer(groups: dict[str, list[tuple[str, nn.Parameter]]], lrs: dict[str, float],
                    cfg: TrainConfig) -> torch.optim.AdamW:  # fmt: skip
    """AdamW with one parameter group per (trainable group, decay or not); weight decay on
    matrices only (not on biases, norms, gates). Each group remembers its ``peak_lr``."""
    param_groups = []
    for group, named in groups.items():
        for decay in (True, False):
            params = [p for _, p in named if (p.dim() >= 2) == decay]
            if params:
                param_groups.append({
                    "params": params, "name": group, "peak_lr": lrs[group], "lr": lrs[group],
                    "weight_decay": cfg.optim.weight_decay if decay else 0.0,
                })  # fmt: skip
    return torch.optim.AdamW(param_groups, betas=cfg.optim.betas, eps=cfg.optim.eps)


# -- data -------------------------------------------------------------------------------------
def make_loader(cfg: TrainConfig, paths: list[str], d: Dist, codec: Any, *, train: bool,
                stats: BadFileCounter | None = None,
                on_bad: Any = None) -> WindowLoader:  # fmt: skip
    """A ``WindowLoader`` over ``paths`` for this rank: looping and shuffled for training, one
    ordered pass for evaluation (build a fresh one for every evaluation)."""
    encoder, tokenizer = codec() if any(not is_shards(p) for p in paths) else (None, None)
    source = open_source(
        paths, encoder, tokenizer,
        min_duration_sec=cfg.data.min_duration_sec,
        require_alignments=cfg.data.require_alignments,
        main_speaker=cfg.data.main_speaker,
        encode_chunk_sec=cfg.data.encode_chunk_sec,
    )  # fmt: skip
    return WindowLoader(
        source, frames=cfg.frames_per_window, batch_size=cfg.batch_size, loop=train,
        shuffle=cfg.data.shuffle and train, seed=cfg.seed, rank=d.rank, world_size=d.world_size,
        max_bad_fraction=cfg.data.max_bad_fraction, stats=stats,
        num_workers=cfg.data.num_workers if train else 0, on_bad=on_bad,
    )  # fmt: skip


def is_shards(path: str) -> bool:
    p = Path(path)
    return p.is_dir() or p.name == "shards.json"


# -- one forward ------------------------------------------------------------------------------
def autocast_for(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward's autocast: bfloat16 on GPU (whatever ``model.dtype``) and wherever the base
    is bfloat16 (``model.dtype: bfloat16`` on CPU: CPU autocast, the same mixed-precision path
    as on GPU: frozen bf16 base, float32 trainables cast per op); float32 otherwise."""
    if device.type == "cuda" or resolve_dtype(cfg.model.dtype, device) == torch.bfloat16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def forward_terms(lm: nn.Module, codes: torch.Tensor, cfg: TrainConfig) -> LossTerms:
    """``LossTerms`` of ``lm(codes)`` under ``autocast_for`` (the loss itself is float32)."""
    return forward_output_terms(lm, codes, cfg)[1]


def forward_output_terms(
    lm: nn.Module, codes: torch.Tensor, cfg: TrainConfig
) -> tuple[Any, LossTerms]:
    """``lm(codes)`` under ``autocast_for`` and its ``LossTerms`` (float32). A model with an
    end-to-end memory runs its inner loop (``e2e_forward``: every chunk scored before its own
    update; the graph kept through the updates when gradients are on); the output then carries
    ``e2e_rollbacks``, the sequence-chunks whose inner update was not finite."""
    with autocast_for(cfg, codes.device):
        if e2e_layers(lm):
            loop = InnerLoop.of(lm, first_codebook_weight=cfg.first_codebook_weight,
                                text_padding_weight=cfg.text_padding_weight)  # fmt: skip
            out, res = e2e_forward(lm, codes, loop, train=torch.is_grad_enabled())
            out.e2e_rollbacks = res.rollbacks  # non-finite inner updates rolled back (logged)
        else:
            out = lm(codes)
    return out, compute_loss_terms(
        out, codes,
        first_codebook_weight=cfg.first_codebook_weight,
        text_padding_weight=cfg.text_padding_weight,
    )  # fmt: skip


def step_context(cfg: TrainConfig, step: int, full: int) -> int | None:
    """The attention context of optimizer step ``step`` while training: ``train_context``, or
    with ``train_context_min`` a uniform draw from ``[train_context_min, train_context or
    full]`` that depends on the run's seed and the step only (resumes stay exact)."""
    m = cfg.model
    if m.train_context_min is None:
        return m.train_context
    hi = m.train_context or full
    lo = min(m.train_context_min, hi)
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    return int(torch.randint(lo, hi + 1, (1,), generator=g))


@torch.no_grad()
def gate0_output(lm: nn.Module, codes: torch.Tensor, cfg: TrainConfig) -> Any:
    """The output of ``lm`` with every TTT gate forced to 0 (the teacher of ``kl_to_base``).

    The branches add nothing then, so they run from their initial state and a ``StateCarry``
    attached to them is neither read nor written: the carried state stays the training pass's.
    """
    carries = [(m, m.carry) for m in lm.modules() if isinstance(m, GatedTTT)]
    set_gates(lm, 0.0)
    for m, _ in carries:
        m.carry = None
    try:
        with autocast_for(cfg, codes.device):
            return lm(codes)
    finally:
        set_gates(lm, None)
        for m, carry in carries:
            m.carry = carry


def retrofit_advice(cfg: TrainConfig, context: int) -> str | None:
    """A note when TTT is retrofitted into a frozen base without the shipped recipe's training
    (a random window per step and the KL-to-gate-0 term): with the full window the memory was
    not learned, with one short window it learned to stand in for the attention and did harm on
    real text (docs/retrofit.md). ``context``: the model's attention window at inference
    (frames; 0 = unlimited)."""
    m = cfg.model
    if (
        cfg.ttt is None
        or cfg.ttt.kind == "e2e"
        or m.train_base
        or m.train_context_min
        or cfg.kl_to_base > 0
    ):  # the end-to-end memory learns on the next-token loss
        return None
    if not context:
        return None
    keys = ", ".join(f"model.{k}: {v}" for k, v in retrofit_window(context).items())
    how = (f"one training window of {m.train_context} frames" if m.train_context
           else f"the full attention window ({context} frames)")  # fmt: skip
    return (
        f"note: TTT on a frozen base, trained with {how} and no harm term: in the retrofit "
        f"study this either left the memory unlearned or made the model worse on real text "
        f"inside its window (docs/retrofit.md). The shipped recipe (moshi_ttt.recipes) uses "
        f"{keys}, kl_to_base: 1.0."
    )


@torch.no_grad()
def branch_gain(lm: nn.Module, batch: Batch, cfg: TrainConfig, d: Dist) -> float:
    """What the TTT branches bring on ``batch``: the text+audio CE with every gate forced to 0
    minus the CE with the learned gates (nats, over all ranks; > 0 = the branches help)."""
    codes = batch.codes.to(d.device)
    losses = []
    for gate in (None, 0.0):
        set_gates(lm, gate)
        try:
            m = forward_terms(lm, codes, cfg).all_reduce().metrics()
        finally:
            set_gates(lm, None)
        losses.append(m["loss"])
    return float(losses[1] - losses[0])


def step_totals(batches: list[Batch], lm: nn.Module, cfg: TrainConfig, d: Dist) -> torch.Tensor:
    """Global ``(text, audio)`` loss weight totals of a step's micro-batches over all ranks."""
    t = torch.zeros(2, dtype=torch.float32)
    for b in batches:
        tw, aw = weight_totals(
            b.codes, lm.delays,
            first_codebook_weight=cfg.first_codebook_weight,
            text_padding_weight=cfg.text_padding_weight,
        )  # fmt: skip
        t += torch.stack([tw, aw]).cpu()
    return all_reduce_sum(t.to(d.device)).cpu()


@torch.no_grad()
def evaluate(lm: nn.Module, cfg: TrainConfig, d: Dist, codec: Any,
             carry: StateCarry | None) -> dict[str, float]:  # fmt: skip
    """Token-weighted metrics over the eval set (``data.eval``), all ranks, a fresh pass.

    Every rank runs the same number of forwards (FSDP gathers parameters collectively): a rank
    out of data runs an empty batch (all -1, weight 0). With ``state_carry`` the TTT state is
    carried over the windows of each eval file as in training.

    With gated TTT branches and no carried state it also logs ``within_window_vs_gate0``: the CE
    change the memory makes (model - gate 0, nats per token) on the frames that the attention
    window in effect covers entirely, where a memory can only do harm.
    """
    was_training = lm.training
    lm.eval()
    stats = BadFileCounter()
    loader = make_loader(cfg, cfg.data.eval, d, codec, train=False, stats=stats)
    eval_carry = StateCarry(lm) if carry is not None else None
    total: LossTerms | None = None
    harm = torch.zeros(2, 2, device=d.device)  # rows: model, gate 0; columns: CE sum, count
    check_harm = carry is None and bool(gate_values(lm))
    window = int(lm.transformer.layers[0].self_attn.context or cfg.frames_per_window)
    it = iter(loader)
    batches = 0
    try:
        while cfg.eval_max_batches is None or batches < cfg.eval_max_batches:
            batch = next(it, None)
            if int(all_reduce_sum(torch.tensor([batch is not None], device=d.device))) == 0:
                break
            if batch is None:
                batch = empty_batch(cfg)
            codes = batch.codes.to(d.device)
            if eval_carry is not None:
                eval_carry.begin(batch.reset, batch.lanes)
            out, terms = forward_output_terms(lm, codes, cfg)
            terms = terms.detach()
            if check_harm:
                harm[0] += covered_ce_sums(out, codes, window)
                harm[1] += covered_ce_sums(gate0_output(lm, codes, cfg), codes, window)
            if eval_carry is not None:
                eval_carry.commit()
            total = terms if total is None else total + terms
            batches += 1
    finally:
        loader.close()
        if eval_carry is not None:
            eval_carry.detach_from_model()
        if carry is not None:
            carry.attach()
        lm.train(was_training)
    if total is None:
        raise DataError(f"no usable evaluation data in {cfg.data.eval}: {stats.summary()}")
    metrics = total.all_reduce().metrics()
    metrics["bad_files"] = float(stats.num_bad)
    if check_harm:
        h = all_reduce_sum(harm).cpu()
        if h[0, 1] > 0:
            metrics["within_window_vs_gate0"] = float(h[0, 0] / h[0, 1] - h[1, 0] / h[1, 1])
    return metrics


def harm_note(metrics: dict[str, float]) -> str:
    """The eval log's note on ``within_window_vs_gate0`` (a warning past the tolerance)."""
    harm = metrics.get("within_window_vs_gate0")
    if harm is None:
        return ""
    note = f"; inside the window the memory changes the CE by {harm:+.4f} nats vs gate 0"
    if harm > HARM_TOLERANCE:
        note += " (WARNING: harm where the attention sees everything)"
    return note


def empty_batch(cfg: TrainConfig) -> Batch:
    codes = torch.full((1, NUM_STREAMS, cfg.frames_per_window), ZERO_TOKEN, dtype=torch.long)
    return Batch(codes, torch.ones(1, dtype=torch.bool), [0], [-1], [0])
