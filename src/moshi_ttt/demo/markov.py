"""``moshi-ttt demo --task markov``: the memory's mechanism check, end to end on a 2-core CPU.

A synthetic task whose memory is exactly what a linear associative memory over layer-0
embeddings stores (a per-sequence bigram table): it shows that the memory *can* be written,
kept beyond the attention window and read by a frozen model -- never whether it helps on real
data (``demo.realdata``, the default ``moshi-ttt demo``). The steps:

1. **Data** (``markov_task.MarkovTask``): every sequence follows its own random transition table,
   so the next symbol is predictable only from what this sequence did before; written as shards.
2. **The pretrained base**: an attention-only model (attention context ``C`` frames) trained from
   scratch with ``moshi-ttt train``, then exported with ``moshi-ttt export`` (``OUT/base``).
3. **The retrofit**: ``OUT/base``, frozen, plus TTT with the mechanism recipe
   (``recipes.FORCED_TTT``: layer 0 before attention, trained with a quarter of the window;
   the shipped real-data recipe gets a few % here, docs/retrofit.md), fine-tuned with
   ``moshi-ttt train`` (``model.source: local``).
   Optionally the upper bound: the same TTT model trained from scratch (``scratch``).
4. **Evaluation** with the ``eval long-context`` code (controls: the TTT state reset every ``C``
   frames, the gate forced to 0; the inner-loss probe) beside the task's Bayes-optimal predictors.
5. **Report**: ``OUT/report.md`` + plots, and ``OUT/results.json``: one row per model with the
   text CE inside/beyond the window, its share of the available gain and the shell command that
   recomputes the row from the saved run.

Deterministic given the seed (CPU, float32, one thread).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from moshi.utils.compile import no_compile

from ..data.pipeline import ShardSource
from ..eval.e2e import evaluate_e2e, evaluate_static
from ..eval.inner_loss import evaluate_inner_loss, write_inner_loss_section
from ..eval.long_context import PositionLosses, evaluate_long_context, write_long_context_section
from ..eval.recall import (
    MEMORY_ROWS,
    QUICK_GRID,
    MemoryChoice,
    MemoryGrid,
    add_memory_rows,
    base_features,
)
from ..eval.report import Report, legend_outside, row_line_style, row_styles
from ..format import FRAME_RATE, NUM_CODEBOOKS
from ..integration.apply import ttt_modules
from ..models.export import export_run
from ..recipes import FORCED_TRAIN, FORCED_TTT, retrofit_training
from ..train.checkpoint import load_trained_model
from ..train.config import TrainConfig
from ..train.trainer import train
from .corpus import sequence_counts
from .e2e_rows import chunk_frames_of, e2e_choice, e2e_memory, e2e_ttt
from .frozen import FrozenBase
from .markov_task import MarkovTask, write_shards

TARGET_SHARE = 0.5  # the retrofit must capture at least half of the available gain


@dataclass(frozen=True)
class DemoSettings:
    """Everything the demo does (docs/demo.md and docs/retrofit.md say why)."""

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
    ttt: dict[str, Any] = field(default_factory=lambda: dict(FORCED_TTT))
    retrofit: dict[str, Any] = field(default_factory=lambda: dict(FORCED_TRAIN))
    scratch: bool = True  # also train the from-scratch TTT model (the upper bound)
    e2e: bool = True  # the end-to-end memory's rows: zero-training (e2e) and meta-trained
    val_sequences: int = 16  # validation sequences for the e2e choice (their own seed)
    e2e_layers: str = "top:1"
    e2e_hiddens: tuple[int, ...] = (256, 1024)
    e2e_lrs: tuple[float, ...] = (0.1, 0.3, 1.0)
    e2e_chunks: tuple[float, ...] = (0.25, 0.5)  # K as fractions of C (C/8 = 2 frames: slow)
    e2e_meta_steps: int = 100  # the meta-training's budget (a step scans 256 / K chunks)
    chunk_frames: int = 64
    bin_frames: int = 16
    memory: MemoryGrid = field(default_factory=MemoryGrid)  # recall memory rows (eval.recall)

    @property
    def context(self) -> int:
        return int(self.model["context"])

    @property
    def training(self) -> dict[str, Any]:
        """The retrofit's training keys (``recipes.retrofit_training``)."""
        return retrofit_training(self.context, self.retrofit)

    @property
    def train_context(self) -> str:
        """The retrofit's training window(s), in words."""
        m = self.training["model"]
        if "train_context_min" in m:
            return f"{m['train_context_min']}-{m.get('train_context', self.context)}"
        return str(m.get("train_context", self.context))


QUICK = DemoSettings(
    task=MarkovTask(seq_len=64),
    train_sequences=32,
    eval_sequences=3,
    steps=4,
    batch_size=4,
    bin_frames=8,
    val_sequences=2,
    e2e_meta_steps=3,
    e2e_hiddens=(64,),
    e2e_lrs=(0.3,),
    e2e_chunks=(0.25,),
    memory=QUICK_GRID,
)

RUNS = ("base", "retrofit", "scratch", "e2e_meta")


def train_config(s: DemoSettings, name: str, data: Path, out: Path, seed: int,
                 e2e: dict[str, Any] | None = None) -> TrainConfig:  # fmt: skip
    """The ``moshi-ttt train`` config of run ``name``: ``base`` (attention only, from scratch),
    ``retrofit`` (``OUT/base`` frozen + TTT, shorter training window), ``scratch`` (TTT and
    base trained together from scratch) or ``e2e_meta`` (``OUT/base`` frozen + the end-to-end
    memory of the zero-training choice ``e2e``, meta-trained at the full window)."""
    if name not in RUNS:
        raise ValueError(f"unknown demo run {name!r}: expected one of {RUNS}")
    if name == "e2e_meta" and e2e is None:
        raise ValueError("e2e_meta starts from the zero-training choice: pass e2e=")
    tiny = {
        "source": "tiny",
        "tiny_overrides": {**s.model, "text_card": max(64, s.task.text_card)},
        "train_base": True,
    }
    frozen = {"source": "local", "path": str(out / "base"), "train_base": False,
              **(s.training["model"] if name == "retrofit" else {})}  # fmt: skip
    return TrainConfig.from_dict(
        {
            "run_dir": str(out / "runs" / name),
            "seed": seed,
            "max_steps": s.e2e_meta_steps if name == "e2e_meta" else s.steps,
            "duration_sec": s.task.seq_len / FRAME_RATE,
            "batch_size": s.batch_size,
            "lr": s.lr,
            "ttt_lr": s.ttt_lr,
            "max_norm": 1.0,
            "first_codebook_weight": 1.0,
            "log_every": 1,
            "ckpt_every": 0,
            "keep_last": 1,
            "kl_to_base": s.training["kl_to_base"] if name == "retrofit" else 0.0,
            "model": {
                **(frozen if name in ("retrofit", "e2e_meta") else tiny),
                "dtype": "float32",
                "gradient_checkpointing": False,
            },
            "ttt": (
                None
                if name == "base"
                else e2e_ttt(s.e2e_layers, e2e or {})
                if name == "e2e_meta"
                else s.ttt
            ),
            "data": {"train": [str(data)], "num_workers": 0, "state_carry": "none"},
            "optim": {"schedule": "cosine", "pct_start": 0.1, "weight_decay": 0.0},
        }
    )


def oracle_curves(task: MarkovTask, files: list[tuple[str, torch.Tensor]], context: int) -> dict:
    """The task's Bayes-optimal CE per position (text, or audio codebook 0), with a full memory
    and with only the last ``context`` frames visible, as ``PositionLosses`` (comparable with
    the models' curves)."""
    out = {}
    for name, window in (("oracle_full", None), ("oracle_window", context)):
        nll = np.stack([task.oracle_nll(task.symbols_of(codes), window) for _, codes in files])
        T, n = nll.shape[1], np.full(nll.shape[1], float(len(files)))
        text_sum, text_count = np.zeros(T), np.zeros(T)
        audio_sum, audio_count = np.zeros((NUM_CODEBOOKS, T)), np.zeros((NUM_CODEBOOKS, T))
        if task.stream == "text":
            text_sum, text_count = nll.sum(0), n
        else:  # audio codebook 0
            audio_sum[0], audio_count[0] = nll.sum(0), n
        out[name] = PositionLosses.of_positions(text_sum, text_count, audio_sum, audio_count, n)
    return out


def run_demo(
    out_dir: str | Path = "demo_out",
    seed: int = 0,
    quick: bool = False,
    progress: bool = True,
    stream: str = "text",
    settings: DemoSettings | None = None,
) -> dict[str, Any]:
    """Run the whole demo (``quick``: a tiny version for tests); returns ``results.json``.
    ``stream``: where the task's symbols live, ``"text"`` or ``"audio"`` (Moshi's codebook 0).

    moshi's lazy ``torch.compile`` is off (on CPU it costs more than it saves here), and torch
    uses one thread: this model is too small to gain from more, and on a busy 2-core machine
    two threads wait on each other (several times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with no_compile():
            s = settings or (QUICK if quick else DemoSettings())
            s = dataclasses.replace(s, task=dataclasses.replace(s.task, stream=stream))
            return _run(out_dir, seed, s, quick, progress)
    finally:
        torch.set_num_threads(threads)


def _run(out_dir: str | Path, seed: int, s: DemoSettings, quick: bool, progress: bool) -> dict:
    out = Path(out_dir)
    for sub in ("runs", "data", "configs", "base", "eval"):  # a rerun starts clean
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    say = print if progress else (lambda *a, **k: None)
    names = [n for n in RUNS if (n != "scratch" or s.scratch) and (n != "e2e_meta" or s.e2e)]
    steps = 4 + len(names)

    # 1. Data.
    say(f"[1/{steps}] data: {s.train_sequences} + {s.eval_sequences} sequences of "
        f"{s.task.seq_len} frames, {s.task.num_symbols} symbols, a fresh table each")  # fmt: skip
    train_dir = write_shards(out / "data" / "train", s.task, s.train_sequences, seed=2 * seed)
    eval_dir = write_shards(out / "data" / "eval", s.task, s.eval_sequences, seed=2 * seed + 1)
    val_dir = write_shards(out / "data" / "val", s.task, s.val_sequences, seed=10_000 + seed)
    val_source = ShardSource(val_dir)
    val = [(val_source.name(i), val_source.codes(i)) for i in range(len(val_source))]
    e2e: dict[str, Any] = {}

    # 2-4. Training through the real trainer; the base is exported, then retrofitted frozen.
    runs, timings = {}, {}
    (out / "configs").mkdir(parents=True, exist_ok=True)
    what = {"base": "the attention-only base, from scratch",
            "retrofit": f"the retrofit: frozen base + TTT (training window {s.train_context} "
                        f"frames, inference {s.context})",
            "scratch": "the upper bound: TTT + base trained together from scratch",
            "e2e_meta": "the end-to-end memory, meta-trained on the frozen base"}  # fmt: skip
    for k, name in enumerate(names):
        if name == "e2e_meta":
            say(f"      choosing the e2e memory's width, lr and K on {len(val)} validation "
                "sequences")  # fmt: skip
            e2e = e2e_choice(FrozenBase.local(out / "base"), s.e2e_layers, s.e2e_hiddens, s.e2e_lrs,
                             [chunk_frames_of(s.context, f) for f in s.e2e_chunks], val, seed,
                             progress, metric=s.task.metric)  # fmt: skip
        cfg = train_config(s, name, train_dir, out, seed, e2e.get("chosen"))
        cfg.to_yaml(out / "configs" / f"{name}.yaml")
        say(f"[{k + 2}/{steps}] training {what[name]}: {cfg.max_steps} steps of {s.batch_size} x "
            f"{cfg.frames_per_window} frames")  # fmt: skip
        start = time.perf_counter()
        train(cfg, progress=progress, device="cpu")
        timings[f"train {name} (s)"] = time.perf_counter() - start
        runs[name] = Path(cfg.run_dir)
        if name == "base":
            export_run(runs["base"], out / "base")
            say(f"      exported the base to {out / 'base'} (moshi-ttt export)")

    # 5. Evaluation, through the real eval code (chunked streaming, carried state).
    source = ShardSource(eval_dir)
    files = [(source.name(i), source.codes(i)) for i in range(len(source))]
    say(f"[{steps - 1}/{steps}] evaluating on {len(files)} held-out sequences")
    start = time.perf_counter()
    kw = {"chunk_frames": s.chunk_frames, "bin_frames": s.bin_frames, "progress": progress}
    base_lm, _ = load_trained_model(runs["base"])
    base = evaluate_long_context(base_lm, files, controls=(), **kw)
    retro_lm, _ = load_trained_model(runs["retrofit"])
    retro = evaluate_inner_loss(retro_lm, files, controls=("reset", "no_ttt"),
                                reset_every=s.context, **kw)  # fmt: skip
    curves = {
        "base": base.variants["no_ttt"],
        "retrofit": retro.variants["ttt"],
        "retrofit_reset": retro.variants[f"reset_every_{s.context}"],
        "retrofit_gate0": retro.variants["no_ttt"],
    }
    gates = {"retrofit": _gate(retro_lm)}
    if "scratch" in runs:
        scratch_lm, _ = load_trained_model(runs["scratch"])
        curves["scratch"] = evaluate_long_context(scratch_lm, files, controls=(), **kw).variants[
            "ttt"
        ]
        gates["scratch"] = _gate(scratch_lm)
    if e2e:
        blocks = math.gcd(s.bin_frames, s.context)
        zero = e2e_memory(FrozenBase.local(out / "base"), s.e2e_layers, e2e["chosen"], seed)
        curves["e2e"] = evaluate_e2e(zero, files, block_frames=blocks)
        meta_lm, _ = load_trained_model(runs["e2e_meta"])
        curves["e2e_meta"] = evaluate_e2e(meta_lm.eval(), files, block_frames=blocks)
        curves["e2e_meta_static"] = evaluate_static(meta_lm, files, block_frames=blocks,
                                                    chunk_frames=s.chunk_frames)  # fmt: skip
    memory = _memory_rows(s, base_lm, curves, files, val, seed,
                          (zero, meta_lm) if e2e else None, train_dir)  # fmt: skip
    curves.update(oracle_curves(s.task, files, s.context))
    timings["evaluation (s)"] = time.perf_counter() - start

    # 6. Results and report.
    say(f"[{steps}/{steps}] writing the report")
    timings["total (s)"] = time.perf_counter() - t0
    results = _results(s, curves, gates, runs, eval_dir, out)
    if e2e:
        results["e2e_choice"] = e2e
    results["memory_choice"] = {r: {**c.to_dict(), **sequence_counts(val, "validation")}
                               for r, c in memory.items()}  # fmt: skip
    results["timings"] = timings
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    report = Report("moshi-ttt demo: TTT retrofitted into a frozen, pretrained model", out)
    _write_intro(report, s, results)
    write_long_context_section(report, curves, context=s.context, bin_frames=s.bin_frames,
                               reference="base", metric=s.task.metric,
                               title="Loss against position (held-out sequences)")  # fmt: skip
    write_inner_loss_section(report, retro.inner, bin_frames=s.bin_frames,
                             model_curves={"ttt": curves["retrofit"], "no_ttt": curves["base"]},
                             context=s.context)  # fmt: skip
    _plot_training(report, runs)
    report.data.update(results=results, runs={k: str(v) for k, v in runs.items()},
                       settings=_settings(s, seed, quick))  # fmt: skip
    path = report.write()
    row = results["rows"]["retrofit"]
    verdict = "MET" if results["target_met"] else "NOT MET"
    say(f"done in {timings['total (s)']:.0f} s: the frozen-base retrofit captures "
        f"{100 * row['gain_share']:.1f} % of the available gain beyond the window (target "
        f"{100 * TARGET_SHARE:.0f} %: {verdict}); see {path}, {out / 'results.json'}")  # fmt: skip
    return results


def _gate(lm: torch.nn.Module) -> float | None:
    gates = [float(m.gate().abs().mean()) for _, m in ttt_modules(lm) if hasattr(m, "gate")]
    return float(np.mean(gates)) if gates else None


def cli_prefix() -> str:
    """How to call ``moshi-ttt`` from the working directory (the venv's script when it is
    there, as after ``make demo``)."""
    script = Path(sys.executable).parent / "moshi-ttt"
    try:
        return str(script.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(script) if script.exists() else "moshi-ttt"


def eval_command(run: Path, eval_dir: Path, out: Path, s: DemoSettings, controls: str) -> str:
    """The ``moshi-ttt eval long-context`` command that recomputes a run's curves; it prints
    the text CE beyond the context of every variant."""
    args = [cli_prefix(), "eval", "long-context", str(eval_dir), "--run", str(run),
            "--out", str(out), "--chunk-frames", str(s.chunk_frames),
            "--bin-frames", str(s.bin_frames), "--speedup-frames", "0",
            "--controls", controls, "--metric", s.task.metric, "--no-progress",
            "--force"]  # fmt: skip
    if "reset" in controls:
        args += ["--reset-every", str(s.context)]
    return shlex.join(args)


def _memory_rows(s: DemoSettings, base_lm: Any, curves: dict[str, PositionLosses], files: list,
                 val: list, seed: int, e2e: tuple | None,
                 train_dir: Path) -> dict[str, MemoryChoice]:  # fmt: skip
    """The recall memory rows (``eval.recall.MEMORY_ROWS``; text stream only: the memories
    predict text tokens), each chosen on the validation sequences (a learned gate fitted on
    training sequences); added to ``curves``."""
    if s.task.metric != "text_ce":
        return {}
    blocks = math.gcd(s.bin_frames, s.context)
    feats, _ = base_features(base_lm, files, s.chunk_frames, blocks)
    val_feats, val_base = base_features(base_lm, val, s.chunk_frames, blocks)
    val_curves = {"base": val_base}
    if e2e is not None:
        zero, meta = e2e
        val_curves["e2e"] = evaluate_e2e(zero, val, block_frames=blocks)
        val_curves["e2e_meta"] = evaluate_e2e(meta.eval(), val, block_frames=blocks)
    src = ShardSource(train_dir)
    train = [(src.name(i), src.codes(i)) for i in range(min(len(src), 48))]
    fit = base_features(base_lm, train, s.chunk_frames, blocks)
    return add_memory_rows(MEMORY_ROWS, curves, val_curves, feats, val_feats, s.memory,
                           s.context, int(base_lm.text_card), seed, fit)  # fmt: skip


def _results(s: DemoSettings, curves: dict[str, PositionLosses], gates: dict, runs: dict,
             eval_dir: Path, out: Path) -> dict[str, Any]:  # fmt: skip
    """``results.json``: every row's CE inside/beyond the window and its share of the gain."""
    C = s.context
    m = s.task.metric
    ce = {k: (v.totals(0, C)[m], v.totals(C)[m]) for k, v in curves.items()}
    base, oracle = ce["base"][1], ce["oracle_full"][1]
    available = base - oracle
    cmd = {
        "base": eval_command(runs["base"], eval_dir, out / "eval" / "base", s, "none"),
        "retrofit": eval_command(
            runs["retrofit"], eval_dir, out / "eval" / "retrofit", s, "reset,no_ttt"
        ),  # fmt: skip
    }
    if "scratch" in runs:
        cmd["scratch"] = eval_command(
            runs["scratch"], eval_dir, out / "eval" / "scratch", s, "none"
        )
    variant = {"base": "no_ttt", "retrofit": "ttt", "retrofit_reset": f"reset_every_{C}",
               "retrofit_gate0": "no_ttt", "scratch": "ttt"}  # fmt: skip
    frozen = {"base": False, "retrofit": True, "retrofit_reset": True, "retrofit_gate0": True,
              "scratch": False, "oracle_full": False, "oracle_window": False, "e2e": True,
              "e2e_meta": True, "e2e_meta_static": True}  # fmt: skip
    rows = {}
    for name, (within, beyond) in ce.items():
        run = name.split("_")[0] if name.startswith("retrofit") else name
        rows[name] = {
            "ce_within": within,
            "ce_beyond": beyond,
            "gain_share": (base - beyond) / available if available > 0 else float("nan"),
            "gate": gates.get(name),
            "frozen_base": frozen.get(name, name in MEMORY_ROWS),
            "command": cmd.get(run),
            "variant": variant.get(name),  # the curve of that command's output
        }
    share = rows["retrofit"]["gain_share"]
    return {
        "metric": m,
        "context_frames": C,
        "train_context_frames": s.train_context,
        "available_gain": available,
        "target_share": TARGET_SHARE,
        "target_met": bool(share >= TARGET_SHARE),
        "rows": rows,
    }


def _settings(s: DemoSettings, seed: int, quick: bool) -> dict[str, Any]:
    return {"seed": seed, "quick": quick, "task": s.task.to_dict(),
            "train_sequences": s.train_sequences, "eval_sequences": s.eval_sequences,
            "steps": s.steps, "batch_size": s.batch_size, "lr": s.lr, "ttt_lr": s.ttt_lr,
            "model": s.model, "ttt": s.ttt, "train_context": s.train_context}  # fmt: skip


ROW_TEXT = {
    "base": "pretrained attention-only base (trained from scratch, then exported)",
    "retrofit": "**retrofit**: frozen base + TTT (recommended settings)",
    "retrofit_reset": "retrofit, TTT state reset every context (control)",
    "retrofit_gate0": "retrofit, gate forced to 0 (control: the frozen base)",
    "scratch": "upper bound: TTT + base trained together from scratch",
    "e2e": "frozen base + end-to-end memory, no training (width, lr, K from validation)",
    "e2e_meta": "frozen base + end-to-end memory, meta-trained",
    "e2e_meta_static": "e2e_meta with its updates off (control: its trained weights alone)",
    "oracle_full": "Bayes-optimal, whole sequence",
    "oracle_window": "Bayes-optimal, last context frames only",
}


def _write_intro(report: Report, s: DemoSettings, results: dict) -> None:
    t, C = s.task, s.context
    report.add_text(
        "## The task\n\n"
        f"Every sequence is {t.seq_len} frames of symbols from an alphabet of {t.num_symbols} "
        f"(text tokens; the user audio stream echoes them as input, Moshi's audio is empty). "
        f"Each sequence draws its **own** random transition table: symbol *a* is followed by "
        f"its {t.num_successors} successor(s) with probability {1 - t.noise:g}, else by a "
        f"uniformly random symbol. The next symbol is predictable only from what followed the "
        f"same symbol **earlier in this sequence**. The attention sees the last {C} frames; a "
        f"memory of the whole sequence does better the longer the sequence runs.\n\n"
        "## The workflow\n\n"
        f"1. `moshi-ttt train configs/base.yaml`: the pretrained base, a tiny Moshi "
        f"({s.model['num_layers']} layers, attention context {C} frames), attention only, "
        f"{s.steps} steps.\n"
        "2. `moshi-ttt export runs/base --out base`: the base as a moshi checkpoint directory.\n"
        f"3. `moshi-ttt train configs/retrofit.yaml`: `base` **frozen**, plus a TTT-"
        f"{s.ttt['kind'].capitalize()} branch (layer {s.ttt['layers']}, {s.ttt['placement']}, "
        f"gate_init {s.ttt['gate_init']}), trained with the attention window shortened to "
        f"{s.train_context} frames (`model.train_context`) so that the memory has to carry; "
        f"evaluated with the full {C}-frame window.\n"
        "4. `moshi-ttt eval long-context`: every row of the table below, with the command in "
        "`results.json` that recomputes it."
    )
    rows = [[ROW_TEXT.get(k, k), r["ce_within"], r["ce_beyond"], 100 * r["gain_share"],
             "-" if r["gate"] is None else r["gate"]]
            for k, r in results["rows"].items()]  # fmt: skip
    report.add_text(
        "## Result\n\nText CE (nats per symbol) inside and beyond the attention window; "
        "share = (base - model) / (base - oracle_full) beyond the window:"
    )
    report.add_table(["model", f"frames < {C}", f"frames >= {C}", "share of gain (%)", "gate"],
                     rows)  # fmt: skip
    r = results["rows"]
    share, reset = r["retrofit"]["gain_share"], r["retrofit_reset"]["gain_share"]
    report.add_text(
        f"- The retrofit captures **{100 * share:.1f} %** of the available gain "
        f"({results['available_gain']:.3f} nats) beyond the window with the base frozen "
        f"(target {100 * TARGET_SHARE:.0f} %: "
        f"**{'met' if results['target_met'] else 'NOT met'}**).\n"
        f"- Resetting its TTT state every {C} frames leaves {100 * reset:.1f} % of the gain"
        + (" (worse than the base: the retrofit relies on its memory)" if reset < 0 else "")
        + ": the gain is the memory's.\n"
        + (f"- The from-scratch upper bound captures {100 * r['scratch']['gain_share']:.1f} %.\n"
           if "scratch" in r else "")
        + "- Times: " + ", ".join(f"{k} {v:.0f}" for k, v in results["timings"].items()) + "."
    )  # fmt: skip


def _plot_training(report: Report, runs: dict[str, Path]) -> None:
    fig, (ax, ax2) = report.figure(12.0, 4.5, ncols=2)
    styles = row_styles(runs)  # the rows' colours and markers of the report's other plots
    for i, (name, run) in enumerate(runs.items()):
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        records = [r for r in records if r.get("split", "train") == "train"]
        steps = [r["step"] for r in records]
        style = row_line_style(styles[name], i, len(steps))
        ax.plot(steps, [r["loss"] for r in records], label=name, **style)
        for j, key in enumerate(sorted({k for r in records for k in r if k.startswith("gate/")})):
            ax2.plot(steps, [r.get(key) for r in records], label=f"{name} {key}",
                     **row_line_style(styles[name], j, len(steps)))  # fmt: skip
    ax.set(xlabel="optimizer step", ylabel="training loss (text CE, nats)",
           title="Training (moshi-ttt train)")  # fmt: skip
    ax2.set(xlabel="optimizer step", ylabel="mean |tanh(alpha)|", title="TTT gates", ylim=(0, 1))
    ax.legend(fontsize=8)
    legend_outside(ax2)
    report.add_figure(fig, "training.png", "Training loss of every run, and the TTT gates")
