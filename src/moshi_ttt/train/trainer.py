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

import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from moshi.modules.transformer import set_attention_context
from torch import nn
from tqdm import tqdm

from ..data.files import BAD_FILES, BadFileCounter, DataError
from ..data.pipeline import Batch, WindowLoader
from ..errors import TrainingStopped
from ..format import TOKENS_PER_FRAME
from ..integration.carry import StateCarry
from ..models.load import load_codec
from ..models.spec import LoadedModel
from ..outputs import check_output_dir
from .checkpoint import (
    list_checkpoints,
    load_checkpoint,
)
from .config import TrainConfig
from .loss import LossTerms, covered_kl_sum
from .metrics import CollapseGuard, MetricsWriter, gate_values, grad_norms, truncate_metrics
from .model import build_model, build_sharded_model
from .parallel import (
    Dist,
    all_reduce_sum,
    apply_activation_checkpointing,
    barrier,
    first_failure,
    init_distributed,
    shutdown_distributed,
    sum_replicated_grads,
)
from .rundir import (
    check_data_paths,
    check_fresh_run_dir,
    check_ttt_layers_against_base,
    checkpoint_to_resume,
    clear_run_dir,
    restartable,
    restore_rng,
    resume_differences,
    save_run_checkpoint,
)
from .steps import (
    branch_gain,
    build_optimizer,
    evaluate,
    forward_output_terms,
    gate0_output,
    harm_note,
    lr_multiplier,
    make_loader,
    retrofit_advice,
    step_context,
    step_totals,
)


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
          overwrite: bool = False, requeue: bool = False,
          command: str | None = None) -> TrainResult:  # fmt: skip
    """Run (or ``resume``) the training described by ``cfg``; see the module docstring.

    ``resume``: True = the newest checkpoint of ``run_dir``, or a ``checkpoints/step_*``
    directory. Checked before the model is built: ``run_dir`` is writable and, without
    ``resume``, holds no previous run (``overwrite`` deletes one); ``ttt.layers`` fits the
    base; a resumed checkpoint is complete and was written with the same settings (any
    difference that changes the data order or the results is refused, or with
    ``allow_inexact_resume`` logged as a warning: the run is then not exact).

    ``requeue`` (a requeued SLURM job): resume if ``run_dir`` has a complete checkpoint, else
    start afresh, replacing what an earlier attempt that wrote no checkpoint left there. A
    run_dir whose run wrote no checkpoint and has ``cfg``'s config (``config.yaml``) is
    started again from step 0 likewise, with or without ``resume``.

    ``command``: the command line that continues this run, for the message of an interrupt.
    """
    cfg.resolve_grad_accum(int(os.environ.get("WORLD_SIZE", "1")))
    run_dir = check_output_dir(cfg.run_dir, "run_dir")
    if requeue:
        resume = bool(list_checkpoints(run_dir / "checkpoints"))
        overwrite = not resume
    start, differences, restart = _preflight(cfg, run_dir, resume, overwrite,
                                             allow_inexact_resume)  # fmt: skip
    d = init_distributed(device)
    try:  # every exit, an error included, destroys the group it made (no rank aborts at exit)
        return _train(cfg, d, run_dir, start, differences, restart, overwrite, progress,
                      command)  # fmt: skip
    finally:
        if d.owns_group:
            shutdown_distributed()


def _train(cfg: TrainConfig, d: Dist, run_dir: Path, start: Path | None, differences: list[str],
           restart: str | None, overwrite: bool, progress: bool,
           command: str | None) -> TrainResult:  # fmt: skip
    """``train`` after its checks, inside the process group."""
    if start is None and (overwrite or restart is not None) and d.is_main:
        clear_run_dir(run_dir)
    barrier()
    run = _setup(cfg, d, run_dir)
    if restart is not None and run.writer is not None:
        run.writer.message(restart)
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
            run.writer.message(interrupt_message(run, command))
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
def interrupt_message(run: _Run, command: str | None) -> str:
    """The line an interrupted run ends with: where it stopped, its last complete checkpoint
    and the command that continues it (``command``: this run's, without ``--resume``,
    ``--resume-from``, ``--force`` or ``--requeue``; None: "the same command")."""
    cmd = command or "the same command"
    head = f"interrupted at step {run.step} of {run.cfg.max_steps}; last complete checkpoint: "
    if run.last_ckpt:
        return f"{head}{run.last_ckpt}; continue it with: {cmd} --resume"
    return f"{head}none yet; start it again (from step 0, in the same run_dir) with: {cmd}"


def _preflight(
    cfg: TrainConfig,
    run_dir: Path,
    resume: bool | str | Path,
    overwrite: bool,
    allow_inexact_resume: bool,
) -> tuple[Path | None, list[str], str | None]:
    """Every check that needs no model, before any work: ``(checkpoint to resume or None, its
    settings that differ from cfg's, the line saying run_dir's run that wrote no checkpoint
    starts again from step 0 or None)``."""
    restart = None
    if resume is True and not list_checkpoints(run_dir / "checkpoints"):
        restart = restartable(run_dir, cfg, "--resume")  # no checkpoint yet: from step 0
        resume = resume if restart is None else False
    if not resume and restart is None:
        restart = check_fresh_run_dir(run_dir, overwrite, cfg)
    check_ttt_layers_against_base(cfg)
    check_data_paths(cfg)
    start = checkpoint_to_resume(run_dir, resume)
    differences = resume_differences(start, cfg) if start is not None else []
    if differences and not allow_inexact_resume:
        raise ValueError(
            f"--resume from {start}: these settings differ from the checkpoint's, so the "
            f"resumed run would not be exact: {'; '.join(differences)}. Use the checkpoint's "
            "values, or pass --allow-inexact-resume to continue anyway (not exact)"
        )
    return start, differences, restart


def _setup(cfg: TrainConfig, d: Dist, run_dir: Path) -> _Run:
    """The model (base frozen + LoRA + TTT, trainable groups in float32, then wrappers), the
    optimizer, the training data and the metrics writer.

    Under torchrun, rank 0 reads the weights once and every rank holds only its FSDP shards.
    """
    build = build_sharded_model if d.distributed else build_model
    model, groups = build(cfg, d.device)
    lm = model.lm
    inference_context = int(lm.transformer.layers[0].self_attn.context or 0)  # 0: unlimited
    full_context = inference_context or cfg.frames_per_window
    if cfg.model.train_context is not None:  # training only: checkpoints keep the model's own
        set_attention_context(lm.transformer, cfg.model.train_context)
    if cfg.model.gradient_checkpointing:
        apply_activation_checkpointing(lm)
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
    restore_rng(rank_tensors, run.d)
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

    # The micro-batches; a data limit tripped on any rank stops every rank, here, together.
    error, micro = None, []
    try:
        micro = [next(batches) for _ in range(cfg.grad_accum)]
    except DataError as e:
        error = str(e)
    failure = first_failure(error, d.device)
    if failure is not None:
        raise DataError(failure)

    # Forward/backward over the micro-batches, each weighted by the global totals.
    text_total, audio_total = step_totals(micro, lm, cfg, d).tolist()
    window = step_context(cfg, run.step, run.full_context)
    if cfg.model.train_context_min is not None:
        set_attention_context(lm.transformer, window)
    step_terms: LossTerms | None = None
    kl_total = torch.zeros((), device=d.device)
    rollbacks = 0
    for batch in micro:
        codes = batch.codes.to(d.device)
        if run.carry is not None:
            run.carry.begin(batch.reset.to(d.device), batch.lanes)
        out, terms = forward_output_terms(lm, codes, cfg)
        rollbacks += getattr(out, "e2e_rollbacks", 0)
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
    sum_replicated_grads(lm)  # the end-to-end memory's parameters are whole on every rank
    metrics = step_terms.all_reduce().metrics()
    if cfg.kl_to_base > 0:  # nats per scored token weight, over all ranks
        kl_all = float(all_reduce_sum(kl_total.reshape(1)).cpu())
        metrics["kl_to_base"] = kl_all / max(text_total + audio_total, 1e-9)
    if cfg.model.train_context_min is not None:
        metrics["train_context"] = float(window)
    if cfg.ttt is not None and cfg.ttt.kind == "e2e":  # inner updates rolled back, all ranks
        metrics["e2e_rollbacks"] = float(
            all_reduce_sum(torch.tensor([float(rollbacks)], device=d.device)).cpu()
        )

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
                               + harm_note(run.eval_metrics))  # fmt: skip
    if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.max_steps:
        run.last_ckpt = save_run_checkpoint(
            run.run_dir / "checkpoints", step, run.named, run.optimizer, run.loader, run.carry,
            run.skipped, run.optimizer.param_groups, run.d, run.model, cfg,
        )  # fmt: skip


def _close(run: _Run) -> None:
    """The data threads, the list of skipped files and the log."""
    run.loader.close()
    if run.bad_files.num_bad:
        run.bad_files.write(run.bad_path, run.loader.total)
    if run.writer is not None:
        if run.bad_files.num_bad:
            run.writer.message(f"skipped files: {run.bad_files.summary()} (list: {run.bad_path})")
        run.writer.close()
