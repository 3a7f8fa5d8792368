"""The one training loop: ``moshi-ttt train CONFIG.yaml`` alone or under ``torchrun``.

Reads top to bottom: set up the process group, build the model and freeze what does not train,
wrap it (activation checkpointing, FSDP2), build the optimizer and the data, resume if asked,
then for every optimizer step: fetch ``grad_accum`` micro-batches, compute the *global* loss
weight totals first (they depend on the codes only), backpropagate every micro-batch's share of
the global token-weighted mean, all-reduce the logged loss terms, check that loss and gradients
are finite, clip, step. Evaluate, log and checkpoint on schedule. The result does not depend on
how the global batch is split over ranks and micro-batches (tested to 1e-5).

Units: a step is an optimizer step; ``tokens`` count text + 8 Moshi codebooks per frame
(moshi-finetune's convention: 9 per frame), over all ranks.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from moshi.modules.transformer import set_attention_context
from torch import nn
from tqdm import tqdm

from ..data.pipeline import (
    BAD_FILES,
    BadFileCounter,
    Batch,
    DataError,
    ShardSource,
    WindowLoader,
    open_source,
    read_index,
)
from ..errors import TrainingStopped
from ..format import NUM_STREAMS, TOKENS_PER_FRAME, ZERO_TOKEN
from ..integration.apply import set_gates
from ..integration.carry import StateCarry
from ..integration.hybrid import GatedTTT
from ..models.load import describe_spec, load_codec
from ..models.spec import LoadedModel
from ..outputs import check_output_dir, existing
from ..recipes import HARM_TOLERANCE, retrofit_window
from .checkpoint import (
    CorruptCheckpoint,
    checkpoint_config,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from .config import TrainConfig
from .loss import LossTerms, compute_loss_terms, covered_ce_sums, covered_kl_sum, weight_totals
from .metrics import CollapseGuard, MetricsWriter, gate_values, grad_norms, truncate_metrics
from .model import build_model, build_sharded_model, resolve_dtype
from .parallel import (
    Dist,
    all_reduce_sum,
    apply_activation_checkpointing,
    apply_fsdp,
    barrier,
    init_distributed,
)

RUN_FILES = ("config.yaml", "metrics.jsonl", "train.log", "tensorboard", "checkpoints", BAD_FILES)
# Keys that do not change what a resumed run computes (all others must match the checkpoint's).
RESUME_FREE_KEYS = (
    "run_dir", "log_every", "eval_every", "eval_max_batches", "ckpt_every", "keep_last",
    "max_bad_steps", "data.eval", "data.num_workers", "data.max_bad_fraction",
    "data.encode_chunk_sec", "model.gradient_checkpointing",
)  # fmt: skip


@dataclass
class TrainResult:
    """What ``train`` returns (rank 0's view)."""

    run_dir: Path
    steps: int
    last_checkpoint: Path | None
    final_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    skipped_steps: int = 0
    is_main: bool = True
    bad_files: list[dict[str, str]] = field(default_factory=list)  # this rank's skipped files
    files_total: int = 0  # this rank's training files


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
    encoder, tokenizer = codec() if any(not _is_shards(p) for p in paths) else (None, None)
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


def _is_shards(path: str) -> bool:
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
    """``lm(codes)`` under ``autocast_for`` and its ``LossTerms`` (float32)."""
    with autocast_for(cfg, codes.device):
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
    if cfg.ttt is None or m.train_base or m.train_context_min or cfg.kl_to_base > 0:
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


def _totals(batches: list[Batch], lm: nn.Module, cfg: TrainConfig, d: Dist) -> torch.Tensor:
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
                batch = _empty_batch(cfg)
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


def _harm_note(metrics: dict[str, float]) -> str:
    """The eval log's note on ``within_window_vs_gate0`` (a warning past the tolerance)."""
    harm = metrics.get("within_window_vs_gate0")
    if harm is None:
        return ""
    note = f"; inside the window the memory changes the CE by {harm:+.4f} nats vs gate 0"
    if harm > HARM_TOLERANCE:
        note += " (WARNING: harm where the attention sees everything)"
    return note


def _empty_batch(cfg: TrainConfig) -> Batch:
    codes = torch.full((1, NUM_STREAMS, cfg.frames_per_window), ZERO_TOKEN, dtype=torch.long)
    return Batch(codes, torch.ones(1, dtype=torch.bool), [0], [-1], [0])


# -- the loop ---------------------------------------------------------------------------------
@dataclass
class _Run:
    """What one training run holds between its steps (``train`` threads it through the named
    phases below); ``step`` is the last optimizer step taken."""

    cfg: TrainConfig
    d: Dist
    run_dir: Path
    model: LoadedModel
    groups: Any  # TrainableGroups
    optimizer: torch.optim.Optimizer
    full_context: int  # the model's own attention context (frames; the window if unlimited)
    bad_files: BadFileCounter
    bad_path: Path
    loader: WindowLoader | None = None
    carry: StateCarry | None = None
    writer: MetricsWriter | None = None
    guard: CollapseGuard | None = None
    step: int = 0
    skipped: int = 0
    bad_in_row: int = 0
    last_ckpt: Path | None = None
    final_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    tokens_since: int = 0
    t_last: float = 0.0
    inference_context: int = 0  # the model's own attention context (frames; 0 = unlimited)
    _codec: tuple[Any, Any] | None = None

    @property
    def lm(self) -> nn.Module:
        return self.model.lm

    @property
    def named(self) -> list[tuple[str, nn.Parameter]]:
        return self.groups.named()

    def codec(self) -> tuple[Any, Any]:
        """Mimi and the tokenizer, loaded on first use (shards need neither)."""
        if self._codec is None:
            mimi, tokenizer = load_codec(self.model, device=self.d.device)
            if tokenizer is None:
                raise ValueError("data: a JSONL index needs the checkpoint's text tokenizer")
            self._codec = (mimi, tokenizer)
        return self._codec

    def on_bad(self, name: str, reason: str, detail: str) -> None:
        """A training file was skipped: rewrite the list and say so in the log."""
        self.bad_files.write(self.bad_path, self.loader.total)
        if self.writer is not None:
            self.writer.message(
                f"skipped {name}: {reason}: {detail} ({self.bad_files.num_bad} bad so far)"
            )

    def result(self) -> TrainResult:
        return TrainResult(self.run_dir, self.step, self.last_ckpt, self.final_metrics,
                           self.eval_metrics, self.skipped, self.d.is_main,
                           list(self.bad_files.files), self.loader.total)  # fmt: skip


def train(cfg: TrainConfig, *, resume: bool | str | Path = False, progress: bool = True,
          device: str = "auto", allow_inexact_resume: bool = False,
          overwrite: bool = False, requeue: bool = False) -> TrainResult:  # fmt: skip
    """Run (or ``resume``) the training described by ``cfg``; see the module docstring.

    ``resume``: True = the newest checkpoint of ``run_dir``, or a ``checkpoints/step_*``
    directory. Checked before the model is built: ``run_dir`` is writable and, without
    ``resume``, holds no previous run (``overwrite`` deletes one); ``ttt.layers`` fits the
    base; a resumed checkpoint is complete and was written with the same settings (any
    difference that changes the data order or the results is refused, or with
    ``allow_inexact_resume`` logged as a warning: the run is then not exact).

    ``requeue`` (a requeued SLURM job): resume if ``run_dir`` has a complete checkpoint, else
    start afresh, replacing what an earlier attempt that wrote no checkpoint left there.
    """
    cfg.resolve_grad_accum(int(os.environ.get("WORLD_SIZE", "1")))
    run_dir = check_output_dir(cfg.run_dir, "run_dir")
    if requeue:
        resume = bool(list_checkpoints(run_dir / "checkpoints"))
        overwrite = not resume
    start, differences = _preflight(cfg, run_dir, resume, overwrite, allow_inexact_resume)
    d = init_distributed(device)
    if overwrite and not resume and d.is_main:
        _clear_run_dir(run_dir)
    barrier()
    run = _setup(cfg, d, run_dir)
    if start is not None:
        _resume_from(run, start, differences)
    _announce(run, start)
    if start is not None and run.step >= cfg.max_steps:
        return _nothing_to_train(run, start)

    run.guard = CollapseGuard(gate_values(run.lm))
    bar = tqdm(total=cfg.max_steps, initial=run.step, desc="train", unit="step",
               disable=not (progress and d.is_main), dynamic_ncols=True)  # fmt: skip
    batches = iter(run.loader)
    run.t_last = time.perf_counter()
    try:
        while run.step < cfg.max_steps:
            run.step += 1
            last_batch, metrics = _train_step(run, batches)
            gates = _log_step(run, metrics, bar)
            _check_collapse(run, gates, last_batch)
            _evaluate_and_checkpoint(run)
    except KeyboardInterrupt:
        if run.writer is not None:
            run.writer.message(
                f"interrupted at step {run.step} of {cfg.max_steps}; last complete checkpoint: "
                f"{run.last_ckpt or 'none (nothing to resume: start again)'}"
                + ("; continue it with the same command and --resume" if run.last_ckpt else "")
            )
        raise
    except DataError as e:
        raise TrainingStopped(
            f"data: {e}; skipped files listed in {run.bad_path}; last good checkpoint: "
            f"{run.last_ckpt or 'none'}"
        ) from e
    finally:
        bar.close()
        _close(run)
    barrier()
    return run.result()


# -- the phases of train ------------------------------------------------------------------------
def _preflight(
    cfg: TrainConfig,
    run_dir: Path,
    resume: bool | str | Path,
    overwrite: bool,
    allow_inexact_resume: bool,
) -> tuple[Path | None, list[str]]:
    """Every check that needs no model, before any work: ``(checkpoint to resume or None, its
    settings that differ from cfg's)``."""
    if not resume:
        _check_fresh_run_dir(run_dir, overwrite)
    _check_ttt_layers_against_base(cfg)
    _check_data_paths(cfg)
    start = _checkpoint_to_resume(run_dir, resume)
    differences = _resume_differences(start, cfg) if start is not None else []
    if differences and not allow_inexact_resume:
        raise ValueError(
            f"--resume from {start}: these settings differ from the checkpoint's, so the "
            f"resumed run would not be exact: {'; '.join(differences)}. Use the checkpoint's "
            "values, or pass --allow-inexact-resume to continue anyway (not exact)"
        )
    return start, differences


def _setup(cfg: TrainConfig, d: Dist, run_dir: Path) -> _Run:
    """The model (base frozen + LoRA + TTT, trainable groups in float32, then wrappers), the
    optimizer, the training data and the metrics writer.

    Under torchrun, rank 0 reads the weights once and every rank holds only its FSDP shards.
    """
    built = build_sharded_model(cfg, d.device) if d.distributed else None
    model, groups = built if built is not None else build_model(cfg, d.device)
    lm = model.lm
    inference_context = int(lm.transformer.layers[0].self_attn.context or 0)  # 0: unlimited
    full_context = inference_context or cfg.frames_per_window
    if cfg.model.train_context is not None:  # training only: checkpoints keep the model's own
        set_attention_context(lm.transformer, cfg.model.train_context)
    if cfg.model.gradient_checkpointing:
        apply_activation_checkpointing(lm)
    if d.distributed and built is None:
        apply_fsdp(lm)
        groups.rebind(lm)
    optimizer = build_optimizer(groups.params, groups.lrs, cfg)
    bad_path = run_dir / (BAD_FILES if d.is_main else f"bad_files.rank{d.rank}.json")
    run = _Run(cfg, d, run_dir, model, groups, optimizer, full_context, BadFileCounter(), bad_path)
    run.inference_context = inference_context
    run.loader = make_loader(cfg, cfg.data.train, d, run.codec, train=True,
                             stats=run.bad_files, on_bad=run.on_bad)  # fmt: skip
    run.carry = StateCarry(lm) if cfg.data.state_carry == "detached" else None
    run.writer = MetricsWriter(run_dir) if d.is_main else None
    return run


def _resume_from(run: _Run, start: Path, differences: list[str]) -> None:
    """Parameters, optimizer, data position, RNG and carried TTT states of checkpoint
    ``start``; an inexact resume (``differences``) starts fresh TTT states and says so."""
    state, rank_tensors = load_checkpoint(start, run.named, run.optimizer, run.d)
    run.step, run.skipped = int(state["step"]), int(state.get("skipped_steps", 0))
    run.loader.load_state_dict(state["data"])
    _restore_rng(rank_tensors, run.d)
    if run.carry is not None and not differences:  # inexact resume: fresh TTT states
        run.carry.load_state_dict({k.removeprefix("carry."): v for k, v in rank_tensors.items()
                                   if k.startswith("carry.")})  # fmt: skip
    if run.writer is not None:
        truncate_metrics(run.writer.metrics_path, run.step)
        if differences:
            run.writer.message(
                f"warning: resumed from {start} with different settings "
                f"({'; '.join(differences)}): this run is not an exact continuation"
            )
    run.last_ckpt = start


def _announce(run: _Run, start: Path | None) -> None:
    """Rank 0: the resolved config beside the run, and one line on what trains."""
    cfg, d, writer = run.cfg, run.d, run.writer
    if writer is None:
        return
    cfg.to_yaml(run.run_dir / "config.yaml")
    counts = run.groups.num_params()
    writer.message(
        f"moshi-ttt train: {d.world_size} process(es) on {d.device.type}; trainable "
        + ", ".join(f"{g} {n:,}" for g, n in counts.items())
        + f"; {cfg.frames_per_window} frames x {cfg.batch_size} x {cfg.grad_accum} x "
        f"{d.world_size} per step" + (f"; resumed from {start}" if start is not None else "")
    )
    advice = retrofit_advice(cfg, run.inference_context)
    if advice:
        writer.message(advice)


def _nothing_to_train(run: _Run, start: Path) -> TrainResult:
    """A resumed run already at ``max_steps``."""
    if run.writer is not None:
        run.writer.message(
            f"--resume: {run.run_dir} is already at step {run.step} of {run.cfg.max_steps}: "
            f"nothing to train (its last checkpoint: {start})"
        )
        run.writer.close()
    run.loader.close()
    barrier()
    return TrainResult(run.run_dir, run.step, start, {}, {}, run.skipped, run.d.is_main, [],
                       run.loader.total)  # fmt: skip


def _train_step(run: _Run, batches: Iterator[Batch]) -> tuple[Batch, dict[str, float]]:
    """Optimizer step ``run.step``: ``grad_accum`` micro-batches, each weighted by the global
    totals, then the finiteness guard, clipping and the update. Returns the last micro-batch
    and the step's metrics (loss terms over all ranks, gradient norms, learning rates)."""
    cfg, d, lm, optimizer = run.cfg, run.d, run.lm, run.optimizer
    mult = lr_multiplier(cfg, run.step)
    for g in optimizer.param_groups:
        g["lr"] = g["peak_lr"] * mult

    # Forward/backward over the micro-batches, each weighted by the global totals.
    micro = [next(batches) for _ in range(cfg.grad_accum)]
    text_total, audio_total = _totals(micro, lm, cfg, d).tolist()
    window = step_context(cfg, run.step, run.full_context)
    if cfg.model.train_context_min is not None:
        set_attention_context(lm.transformer, window)
    step_terms: LossTerms | None = None
    kl_total = torch.zeros((), device=d.device)
    for batch in micro:
        codes = batch.codes.to(d.device)
        if run.carry is not None:
            run.carry.begin(batch.reset.to(d.device), batch.lanes)
        out, terms = forward_output_terms(lm, codes, cfg)
        objective = terms.objective(text_total, audio_total)
        if cfg.kl_to_base > 0:
            kl = covered_kl_sum(out, gate0_output(lm, codes, cfg), window or run.full_context,
                                rows=None if run.carry is None else batch.reset)  # fmt: skip
            objective = objective + cfg.kl_to_base * kl / max(text_total + audio_total, 1e-9)
            kl_total += kl.detach()
        objective.backward()
        if run.carry is not None:
            run.carry.commit()
        step_terms = terms.detach() if step_terms is None else step_terms + terms.detach()
        run.tokens_since += codes.shape[0] * codes.shape[-1] * TOKENS_PER_FRAME * d.world_size
    assert step_terms is not None
    metrics = step_terms.all_reduce().metrics()
    if cfg.kl_to_base > 0:  # nats per scored token weight, over all ranks
        kl_all = float(all_reduce_sum(kl_total.reshape(1)).cpu())
        metrics["kl_to_base"] = kl_all / max(text_total + audio_total, 1e-9)
    if cfg.model.train_context_min is not None:
        metrics["train_context"] = float(window)

    # Guards, clipping, step.
    sq = grad_norms(run.groups.params)
    sq_all = all_reduce_sum(torch.stack(list(sq.values())).to(d.device)).cpu()
    norms = {f"grad_norm/{g}": float(v.sqrt()) for g, v in zip(sq, sq_all)}
    total_norm = float(sq_all.sum().sqrt())
    if math.isfinite(metrics["loss"]) and math.isfinite(total_norm):
        if cfg.max_norm > 0 and total_norm > cfg.max_norm:
            scale = cfg.max_norm / (total_norm + 1e-6)
            for _, p in run.named:
                if p.grad is not None:
                    p.grad.mul_(scale)
        optimizer.step()
        run.bad_in_row = 0
    else:
        run.skipped, run.bad_in_row = run.skipped + 1, run.bad_in_row + 1
        if run.carry is not None:
            run.carry.clear()
        if run.writer is not None:
            run.writer.message(
                f"step {run.step}: non-finite loss {metrics['loss']} or gradient norm "
                f"{total_norm}: step skipped ({run.bad_in_row} in a row)"
            )
    optimizer.zero_grad(set_to_none=True)
    if run.bad_in_row >= cfg.max_bad_steps:
        raise TrainingStopped(
            f"{run.bad_in_row} non-finite steps in a row (max_bad_steps {cfg.max_bad_steps}) "
            f"at step {run.step}; last good checkpoint: {run.last_ckpt or 'none'}"
        )
    return micro[-1], {**metrics, "grad_norm": total_norm, **norms}


def _log_step(run: _Run, metrics: dict[str, float], bar: Any) -> dict[str, float]:
    """The step's record (metrics, learning rates, gates, throughput) to the metrics files
    every ``log_every`` steps, and to the progress bar; returns the gate values."""
    gates = gate_values(run.lm)
    now = time.perf_counter()
    optimizer = run.optimizer
    record = {
        "step": run.step, **metrics,
        **{f"lr/{g['name']}": g["lr"] for g in optimizer.param_groups},
        "lr": optimizer.param_groups[0]["lr"], **gates,
        "tokens_per_s": run.tokens_since / max(now - run.t_last, 1e-9),
        "bad_files": float(run.bad_files.num_bad), "skipped_steps": float(run.skipped),
    }  # fmt: skip
    run.final_metrics = record
    if run.writer is not None and (
        run.step % run.cfg.log_every == 0 or run.step == run.cfg.max_steps
    ):
        run.writer.log_metrics(record)
        run.t_last, run.tokens_since = now, 0
    bar.update(1)
    bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
    return gates


def _check_collapse(run: _Run, gates: dict[str, float], last_batch: Batch) -> None:
    """When a gate falls towards 0, whether the TTT branch still helps (``CollapseGuard``);
    every rank takes part (the gain check is a collective forward)."""
    if run.guard.fallen(run.step, gates):
        gain = None if run.carry is not None else branch_gain(run.lm, last_batch, run.cfg, run.d)
        warning = run.guard.verdict(run.step, gates, gain)
        if warning is not None and run.writer is not None:
            run.writer.message(warning)
            run.writer.log_metrics({"step": run.step, "split": "guard", "ttt_branch_gain": gain})


def _evaluate_and_checkpoint(run: _Run) -> None:
    """Evaluation every ``eval_every`` steps and a checkpoint every ``ckpt_every`` (both at the
    last step)."""
    cfg, step = run.cfg, run.step
    if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.max_steps):
        run.eval_metrics = evaluate(run.lm, cfg, run.d, run.codec, run.carry)
        if run.writer is not None:
            run.writer.log_metrics({"step": step, "split": "eval", **run.eval_metrics})
            run.writer.message(f"step {step}: eval loss {run.eval_metrics['loss']:.4f}"
                               + _harm_note(run.eval_metrics))  # fmt: skip
    if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.max_steps:
        run.last_ckpt = _save(run.run_dir / "checkpoints", step, run.named, run.optimizer,
                              run.loader, run.carry, run.skipped, run.optimizer.param_groups,
                              run.d, run.model, cfg)  # fmt: skip


def _close(run: _Run) -> None:
    """The data threads, the list of skipped files and the log."""
    run.loader.close()
    if run.bad_files.num_bad:
        run.bad_files.write(run.bad_path, run.loader.total)
    if run.writer is not None:
        if run.bad_files.num_bad:
            run.writer.message(f"skipped files: {run.bad_files.summary()} (list: {run.bad_path})")
        run.writer.close()


def _check_fresh_run_dir(run_dir: Path, overwrite: bool) -> None:
    """A new run must not mix with (or replace) a previous one without ``overwrite``."""
    if list_checkpoints(run_dir / "checkpoints") and not overwrite:
        raise ValueError(
            f"run_dir {run_dir}: {run_dir / 'checkpoints'} already holds checkpoints: pass "
            "--resume to continue that run, --force to start afresh (deletes it), or choose "
            "another run_dir"
        )
    found = existing(run_dir, RUN_FILES)
    if found and not overwrite:
        raise ValueError(
            f"run_dir {run_dir}: already holds a run ({', '.join(found)}): pass --resume to "
            "continue it, --force to start afresh (deletes those), or choose another run_dir"
        )


def _clear_run_dir(run_dir: Path) -> None:
    for name in (*RUN_FILES, *[p.name for p in run_dir.glob("bad_files.rank*.json")]):
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _checkpoint_to_resume(run_dir: Path, resume: bool | str | Path) -> Path | None:
    """The checkpoint to resume from (checked complete), None for a new run."""
    if not resume:
        return None
    if resume is not True:
        ckpt = Path(resume)
        if not (ckpt / "state.json").is_file():
            raise FileNotFoundError(
                f"--resume-from {ckpt}: not a checkpoint directory (expected "
                f"{run_dir}/checkpoints/step_* with a state.json)"
            )
        return find_checkpoint(ckpt, use="pass --resume-from")
    root = run_dir / "checkpoints"
    if not list_checkpoints(root):
        raise FileNotFoundError(f"--resume: no checkpoint in {root}")
    try:
        return find_checkpoint(run_dir, use="pass --resume-from")
    except CorruptCheckpoint as e:
        raise ValueError(f"--resume: {e}") from e


def _check_ttt_layers_against_base(cfg: TrainConfig) -> None:
    """``ttt.layers`` against the base's layer count, from its config files (no weights)."""
    if cfg.ttt is None:
        return
    if cfg.model.source == "local" and not Path(str(cfg.model.path)).is_dir():
        raise FileNotFoundError(
            f"model.path: {cfg.model.path!r} is not a checkpoint or run directory"
        )
    num_layers = describe_spec(cfg.spec).lm_kwargs.get("num_layers")
    if isinstance(num_layers, int):
        cfg.check_ttt_layers(num_layers)


def _check_data_paths(cfg: TrainConfig) -> None:
    """Every ``data.train`` / ``data.eval`` index or shards directory exists and parses (the
    index files only, no audio), before the model is built."""
    for key, paths in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
        for path in paths:
            try:
                ShardSource(path) if _is_shards(path) else read_index(path)
            except (OSError, ValueError) as e:
                raise type(e)(f"{key}: {e}") from None


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): data}


def _resume_differences(ckpt: Path, cfg: TrainConfig) -> list[str]:
    """``"key: CHECKPOINT -> NOW"`` for every setting that differs from the checkpoint's
    config and changes the data order, shapes or results (not in ``RESUME_FREE_KEYS``)."""
    old = _flat(checkpoint_config(ckpt).to_dict())
    new = _flat(cfg.to_dict())
    keys = sorted(set(old) | set(new))
    free = tuple(RESUME_FREE_KEYS)
    return [
        f"{k}: {old.get(k)!r} in the checkpoint, {new.get(k)!r} now"
        for k in keys
        if old.get(k) != new.get(k) and not k.startswith(free)
    ]


def _save(root: Path, step: int, named: list, optimizer: torch.optim.Optimizer,
          loader: WindowLoader, carry: StateCarry | None, skipped: int, param_groups: list,
          d: Dist, model: LoadedModel, cfg: TrainConfig) -> Path:  # fmt: skip
    rank_tensors = _rng_state(d)
    if carry is not None:
        rank_tensors.update({f"carry.{k}": v for k, v in carry.state_dict().items()})
    state = {
        "data": loader.state_dict(),
        "skipped_steps": skipped,
        "lr": {g["name"]: g["lr"] for g in param_groups},
        "config": cfg.to_dict(),
    }
    return save_checkpoint(root, step, named, optimizer, state, rank_tensors, d, model,
                           cfg.keep_last)  # fmt: skip


def _rng_state(d: Dist) -> dict[str, torch.Tensor]:
    out = {"rng.cpu": torch.get_rng_state()}
    if d.device.type == "cuda":
        out["rng.cuda"] = torch.cuda.get_rng_state(d.device)
    return out


def _restore_rng(tensors: dict[str, torch.Tensor], d: Dist) -> None:
    if "rng.cpu" in tensors:
        torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and d.device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], d.device)
