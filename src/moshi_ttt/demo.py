"""``moshi-ttt demo`` (``make demo``): does the TTT memory help? End to end, on a 2-core CPU.

1. **Data**: a synthetic long-context task (``demo_task.MarkovTask``): every sequence follows
   its own random transition table, so the next symbol is predictable only from what this
   sequence did before; written as shards in the project's tokenized format.
2. **Training**, through the real ``moshi_ttt.train.trainer.train`` (the same config schema,
   trainer and checkpoints as ``moshi-ttt train``): a tiny Moshi-architecture model with a short
   attention context, trained from scratch (``model.train_base``), once attention-only and once
   with a TTT layer, with the same data, steps and seed.
3. **Evaluation**, through the real ``eval long-context`` and ``eval inner-loss`` code: loss
   against position for both models, with the TTT model's controls (its state reset every
   ``context`` frames; its gate forced to 0) and the Bayes-optimal predictors of the task.
4. **Report**: ``OUT/report.md`` + ``report.json`` + plots, with the bar checked honestly.

The resolved training configs are written to ``OUT/configs/`` (rerun one with
``moshi-ttt train OUT/configs/ttt.yaml``). Deterministic given the seed (CPU, float32).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from moshi.utils.compile import no_compile

from .demo_task import MarkovTask, write_shards
from .eval.inner_loss import evaluate_inner_loss, write_inner_loss_section
from .eval.long_context import PositionLosses, evaluate_long_context, write_long_context_section
from .eval.report import Report
from .integration.apply import ttt_modules
from .train.checkpoint import load_trained_model
from .train.config import TrainConfig
from .train.data import FRAME_RATE, ShardSource
from .train.trainer import train

BASELINE, TTT = "attention-only", "TTT"
MIN_GAIN = 0.10  # the bar: TTT's loss beyond the window at least 10 % below the baseline's


@dataclass(frozen=True)
class DemoSettings:
    """Everything the demo does, with the settings found in ``docs/demo.md``."""

    task: MarkovTask = field(default_factory=lambda: MarkovTask(seq_len=256))
    train_sequences: int = 4000
    eval_sequences: int = 32
    steps: int = 300
    batch_size: int = 16
    lr: float = 5e-3
    ttt_lr: float = 2e-2
    model: dict[str, Any] = field(
        default_factory=lambda: {
            "context": 16,
            "num_layers": 2,
            "depformer_num_layers": 1,
            "depformer_dim": 16,
            "depformer_dim_feedforward": 64,
            "depformer_num_heads": 1,
        }
    )
    ttt: dict[str, Any] = field(
        default_factory=lambda: {
            "layers": "0",
            "placement": "before_attention",
            "kind": "linear",
            "mini_batch_size": 8,
            "base_lr": 1.0,
            "gate_init": 1.0,
        }
    )
    chunk_frames: int = 64
    bin_frames: int = 16

    @property
    def context(self) -> int:
        return int(self.model["context"])


QUICK = DemoSettings(
    task=MarkovTask(seq_len=64),
    train_sequences=32,
    eval_sequences=3,
    steps=4,
    batch_size=4,
    bin_frames=8,
)


def train_config(s: DemoSettings, name: str, data: Path, out: Path, seed: int) -> TrainConfig:
    """The ``moshi-ttt train`` config of one demo model (``ttt=None``: attention-only)."""
    return TrainConfig.from_dict(
        {
            "run_dir": str(out / "runs" / name),
            "seed": seed,
            "max_steps": s.steps,
            "duration_sec": s.task.seq_len / FRAME_RATE,
            "batch_size": s.batch_size,
            "lr": s.lr,
            "ttt_lr": s.ttt_lr,
            "max_norm": 1.0,
            "first_codebook_weight": 1.0,
            "log_every": 1,
            "ckpt_every": 0,
            "keep_last": 1,
            "model": {
                "source": "tiny",
                "tiny_overrides": {**s.model, "text_card": max(64, s.task.text_card)},
                "dtype": "float32",
                "gradient_checkpointing": False,
                "train_base": True,
            },
            "ttt": s.ttt if name == TTT else None,
            "data": {"train": [str(data)], "num_workers": 0, "state_carry": "none"},
            "optim": {"schedule": "cosine", "pct_start": 0.1, "weight_decay": 0.0},
        }
    )


def oracle_curves(task: MarkovTask, files: list[tuple[str, torch.Tensor]], context: int) -> dict:
    """The task's Bayes-optimal text CE per position, with a full memory and with only the last
    ``context`` frames visible, as ``PositionLosses`` (comparable with the models' curves)."""
    out = {}
    windows = (("oracle, full memory", None), (f"oracle, last {context} frames", context))
    for name, window in windows:
        nll = np.stack([task.oracle_nll(task.symbols_of(codes), window) for _, codes in files])
        curve = PositionLosses()
        curve.text_sum, curve.text_count = nll.sum(0), np.full(nll.shape[1], float(len(files)))
        curve.audio_sum = np.zeros((8, nll.shape[1]))
        curve.audio_count = np.zeros((8, nll.shape[1]))
        curve.files = np.full(nll.shape[1], float(len(files)))
        out[name] = curve
    return out


def run_demo(
    out_dir: str | Path = "demo_out", seed: int = 0, quick: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Run the whole demo (``quick``: a tiny version for tests); returns ``report.json``'s data.

    moshi's lazy ``torch.compile`` is off (on CPU it costs more than it saves here), and torch
    uses one thread: this model is too small to gain from more, and on a busy 2-core machine
    two threads wait on each other (several times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with no_compile():
            return _run(out_dir, seed, QUICK if quick else DemoSettings(), quick, progress)
    finally:
        torch.set_num_threads(threads)


def _run(out_dir: str | Path, seed: int, s: DemoSettings, quick: bool, progress: bool) -> dict:
    out = Path(out_dir)
    for sub in ("runs", "data", "configs"):  # a rerun starts clean (and stays deterministic)
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    say = print if progress else (lambda *a, **k: None)

    # 1. Data.
    say(f"[1/4] data: {s.train_sequences} + {s.eval_sequences} sequences of {s.task.seq_len} "
        f"frames, {s.task.num_symbols} symbols, a fresh transition table each")  # fmt: skip
    train_dir = write_shards(out / "data" / "train", s.task, s.train_sequences, seed=2 * seed)
    eval_dir = write_shards(out / "data" / "eval", s.task, s.eval_sequences, seed=2 * seed + 1)

    # 2. Training, through the real trainer.
    runs, timings = {}, {}
    (out / "configs").mkdir(parents=True, exist_ok=True)
    for k, name in enumerate((BASELINE, TTT)):
        cfg = train_config(s, name, train_dir, out, seed)
        cfg.to_yaml(out / "configs" / f"{'ttt' if name == TTT else 'baseline'}.yaml")
        say(f"[2/4] training {name} ({k + 1}/2): {s.steps} steps of {s.batch_size} x "
            f"{cfg.frames_per_window} frames")  # fmt: skip
        start = time.perf_counter()
        train(cfg, progress=progress, device="cpu")
        timings[f"train {name} (s)"] = time.perf_counter() - start
        runs[name] = Path(cfg.run_dir)

    # 3. Evaluation, through the real eval code (chunked streaming, carried state).
    source = ShardSource(eval_dir)
    files = [(source.name(i), source.codes(i)) for i in range(len(source))]
    say(f"[3/4] evaluating on {len(files)} held-out sequences")
    base_lm, _ = load_trained_model(runs[BASELINE])
    ttt_lm, _ = load_trained_model(runs[TTT])
    start = time.perf_counter()
    base = evaluate_long_context(base_lm, files, chunk_frames=s.chunk_frames,
                                 bin_frames=s.bin_frames, progress=progress)  # fmt: skip
    mem = evaluate_inner_loss(ttt_lm, files, chunk_frames=s.chunk_frames,
                              controls=("reset", "no_ttt"), reset_every=s.context,
                              bin_frames=s.bin_frames, progress=progress)  # fmt: skip
    timings["evaluation (s)"] = time.perf_counter() - start
    reset_name = f"reset_every_{s.context}"
    curves = {
        BASELINE: base.variants["no_ttt"],
        TTT: mem.variants["ttt"],
        f"TTT, state reset every {s.context} frames": mem.variants[reset_name],
        "TTT, gate forced to 0": mem.variants["no_ttt"],
        **oracle_curves(s.task, files, s.context),
    }
    gates = {
        name.removesuffix(".ttt"): float(m.gate().abs().mean())
        for name, m in ttt_modules(ttt_lm)
        if hasattr(m, "gate")
    }

    # 4. Report.
    say("[4/4] writing the report")
    timings["total (s)"] = time.perf_counter() - t0
    report = Report("moshi-ttt demo: does the TTT memory help?", out)
    summary = _summary(curves, s.context, gates)
    _write_intro(report, s, summary, timings)
    write_long_context_section(report, curves, context=s.context, bin_frames=s.bin_frames,
                               reference=BASELINE, metric="text_ce",
                               title="Loss against position (held-out sequences)")  # fmt: skip
    write_inner_loss_section(report, mem.inner, bin_frames=s.bin_frames,
                             model_curves={"ttt": curves[TTT], "no_ttt": curves[BASELINE]},
                             context=s.context)  # fmt: skip
    _plot_training(report, runs)
    report.data.update(
        summary=summary,
        timings=timings,
        settings={
            "seed": seed,
            "quick": quick,
            "task": s.task.to_dict(),
            "train_sequences": s.train_sequences,
            "eval_sequences": s.eval_sequences,
            "steps": s.steps,
            "batch_size": s.batch_size,
            "lr": s.lr,
            "ttt_lr": s.ttt_lr,
            "model": s.model,
            "ttt": s.ttt,
        },  # fmt: skip
        runs={k: str(v) for k, v in runs.items()},
    )
    path = report.write()
    verdict = "MET" if summary["bar_met"] else "NOT MET"
    gain = summary["gain_beyond_pct"]
    say(f"done in {timings['total (s)']:.0f} s: beyond the window TTT's loss is {gain:.1f} % "
        f"below attention-only's (bar {verdict}); see {path}")  # fmt: skip
    return json.loads((out / "report.json").read_text())


def _summary(curves: dict[str, PositionLosses], context: int, gates: dict[str, float]) -> dict:
    """Mean text CE inside / beyond the attention window per curve, the gain and the bar."""
    rows = {}
    for name, c in curves.items():
        rows[name] = {"inside": c.totals(0, context)["text_ce"],
                      "beyond": c.totals(context)["text_ce"]}  # fmt: skip
    base, ttt = rows[BASELINE]["beyond"], rows[TTT]["beyond"]
    reset = next(v["beyond"] for k, v in rows.items() if k.startswith("TTT, state reset"))
    gain = (base - ttt) / base
    given_back = (reset - ttt) / (base - ttt) if base > ttt else float("nan")
    min_gate = min(gates.values()) if gates else float("nan")
    return {
        "loss": rows,
        "gain_beyond_pct": 100 * gain,
        "reset_gives_back_pct": 100 * given_back,
        "gates": gates,
        "checks": {
            "ttt_at_least_10pct_below_baseline_beyond_window": bool(gain >= MIN_GAIN),
            "state_reset_gives_back_most_of_the_gain": bool(given_back > 0.5),
            "gate_not_collapsed": bool(min_gate > 0.05),
        },
        "bar_met": bool(gain >= MIN_GAIN and given_back > 0.5 and min_gate > 0.05),
    }


def _write_intro(report: Report, s: DemoSettings, summary: dict, timings: dict) -> None:
    t, C = s.task, s.context
    report.add_text(
        "## The task\n\n"
        f"Every sequence is {t.seq_len} frames of symbols from an alphabet of {t.num_symbols} "
        f"(text tokens; the user audio stream echoes them as input, Moshi's audio is empty). "
        f"Each sequence draws its **own** random transition table: symbol *a* is followed by "
        f"its {t.num_successors} successor(s) with probability {1 - t.noise:g}, else by a "
        f"uniformly random symbol. Nothing about a table can be learned in the weights: the "
        f"next symbol is predictable only from what followed the same symbol **earlier in "
        f"this sequence**. The attention sees the last {C} frames, where a given symbol has "
        f"appeared about {C / t.num_symbols:.0f} time(s); a memory of the whole sequence sees "
        f"about t / {t.num_symbols} of them at frame t. The Bayes-optimal predictors with a "
        f"full memory and with only the last {C} frames are plotted beside the models.\n\n"
        f"Both models are the tiny Moshi architecture ({s.model['num_layers']} layers, "
        f"attention context {C} frames) trained from scratch for {s.steps} steps of "
        f"{s.batch_size} sequences by `moshi-ttt train` (configs in `configs/`); the TTT "
        f"model adds a TTT-{s.ttt['kind'].capitalize()} layer (layer {s.ttt['layers']}, "
        f"{s.ttt['placement']}, mini-batch {s.ttt['mini_batch_size']}). Evaluation: "
        f"`eval long-context` / `eval inner-loss` (chunked streaming with the TTT state and "
        f"KV cache carried) on {s.eval_sequences} held-out sequences."
    )
    rows = [[k, v["inside"], v["beyond"]] for k, v in summary["loss"].items()]
    report.add_text("## Result\n\nText CE (nats per symbol), inside and beyond the window:")
    report.add_table(["model / control", f"frames < {C}", f"frames >= {C}"], rows)
    checks = summary["checks"]
    report.add_text(
        f"- Beyond the attention window the TTT model's loss is "
        f"**{summary['gain_beyond_pct']:.1f} %** below the attention-only model's "
        f"(bar: at least {100 * MIN_GAIN:.0f} %): "
        f"{'yes' if checks['ttt_at_least_10pct_below_baseline_beyond_window'] else 'NO'}.\n"
        f"- Resetting the TTT state every {C} frames gives back "
        f"**{summary['reset_gives_back_pct']:.0f} %** of that gain (the gain comes from the "
        f"memory if most of it is given back): "
        f"{'yes' if checks['state_reset_gives_back_most_of_the_gain'] else 'NO'}"
        + (
            " (over 100 %: with its memory cut, the TTT model is worse than the baseline, "
            "having learned to rely on the memory instead of the attention)"
            if summary["reset_gives_back_pct"] > 100
            else ""
        )
        + ".\n"
        "- Learned gates (mean |tanh(alpha)|): "
        + ", ".join(f"layer {k.split('.')[-1]} {v:.3f}" for k, v in summary["gates"].items())
        + f" (not collapsed: {'yes' if checks['gate_not_collapsed'] else 'NO'}).\n"
        f"- **Bar {'met' if summary['bar_met'] else 'NOT met'}.** Times: "
        + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
        + "."
    )


def _plot_training(report: Report, runs: dict[str, Path]) -> None:
    fig, ax = report.figure()
    for name, run in runs.items():
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        records = [r for r in records if r.get("split", "train") == "train"]
        ax.plot([r["step"] for r in records], [r["loss"] for r in records], label=name)
    ax.set(xlabel="optimizer step", ylabel="training loss (text CE, nats)",
           title="Training (moshi-ttt train)")  # fmt: skip
    ax.legend()
    report.add_figure(fig, "training_loss.png", "Training loss of both models")
