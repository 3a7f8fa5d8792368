"""``moshi-ttt demo [--data DIR]``: does a memory help on real data? Every row a user would
compare, on the same held-out files, scored the same way.

1. **Corpus** (``corpus``): text files read recursively as bytes in Moshi's text stream (the
   default: this interpreter's standard library, present on every machine), or a moshi-ttt
   shards directory; files split by a hash of their path into train / val / test.
2. **The pretrained base**: a tiny Moshi (attention context ``C`` frames) trained on the train
   split with ``moshi-ttt train``, exported, then frozen. Cached under ``OUT/cache`` by its
   settings, so a rerun is cheap.
3. **Rows** (``ROWS``), each a model or a way of running one:
   - ``base``: the frozen base, window ``C``;
   - ``window_plain`` / ``window_ntk`` / ``window_yarn``: the frozen base with its window
     extended to the whole file at inference (RoPE unchanged, NTK-aware, YaRN);
   - ``dyneval``: the frozen base under dynamic evaluation (``eval.dyneval``), its lr, layers
     and chunk chosen on the **validation** split;
   - ``e2e``: the frozen base + the end-to-end memory (``integration.e2e``: prime MLPs in the
     last quarter whose fast weights take SGD steps on the next-token loss), no training: its
     hidden width, inner lr and chunk K chosen on the **validation** split;
     ``e2e_meta``: the same memory meta-trained from that choice (initial fast weights and
     inner lr learned through the inner loop, base frozen, the retrofit's step budget);
   - ``retrofit``: the frozen base + TTT with the shipped defaults (``moshi_ttt.recipes``), and
     its controls ``retrofit_reset`` (state reset every ``C`` frames) and ``retrofit_gate0``;
     ``retrofit_forced``: the mechanism recipe of the Markov demo (``recipes.FORCED_TTT``);
   - ``lora_long``: the frozen base + LoRA trained with the window of the whole file (the
     retrofit's step budget), evaluated with that window;
   - ``full_attention`` / ``full_attention_4x``: a base trained with attention over the whole
     file (the base's budget, and 4x), ``scratch``: TTT trained with the base from scratch
     (window ``C``).
4. **Results**: ``OUT/results.json`` (per row ``ce_within`` / ``ce_beyond`` with 95 % intervals
   over files, the paired difference to ``base``, ``train_seconds``, the inference costs and the
   command that recomputes the row) and ``OUT/report.md`` with plots.

Deterministic given the seed (CPU, float32, one thread).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from moshi.models import loaders
from moshi.models.lm import LMModel
from moshi.utils.compile import no_compile

from ..data.files import DataError
from ..data.pipeline import ShardSource
from ..eval.dyneval import DynEvalConfig, evaluate_dyneval, sweep_dyneval
from ..eval.e2e import E2EStats, evaluate_e2e, evaluate_static
from ..eval.long_context import (
    MOSHI_LOSS,
    PositionLosses,
    evaluate_long_context,
    file_intervals,
)
from ..eval.recall import (
    MEMORY_ROWS,
    QUICK_GRID,
    MemoryGrid,
    add_memory_rows,
    base_features,
    evaluate_retrieval,
    memory_reads,
    mix_curve,
    needle_shares,
    repeat_split,
    restrict,
)
from ..eval.window import extended_window
from ..format import FRAME_RATE, NUM_CODEBOOKS
from ..integration.apply import ttt_modules
from ..integration.config import parse_layer_spec
from ..integration.e2e import e2e_layers
from ..integration.tiny import tiny_lm_kwargs
from ..models.export import export_run
from ..recipes import (
    FORCED_TRAIN,
    FORCED_TTT,
    RETROFIT_TRAIN,
    RETROFIT_TTT,
    retrofit_training,
)
from ..train.checkpoint import load_trained_model
from ..train.config import TrainConfig
from ..train.trainer import train
from .corpus import (
    TEXT_CARD,
    CorpusSpec,
    CorpusSummary,
    count_text,
    default_corpus,
    read_corpus,
    sequence_counts,
    source_file,
)
from .e2e_rows import chunk_frames_of, e2e_choice, e2e_memory, e2e_ttt
from .frozen import FrozenBase
from .markov import cli_prefix
from .needle import NeedleSpec, needle_cases, plant_training_phrases
from .realdata_report import SECONDARY_METRICS, verdict, write_report

ESSENTIAL = ("base", "dyneval", "e2e", "e2e_meta", "e2e_meta_static", "cache", "retrieval",
             "assoc", "e2e_assoc", "e2e_meta_assoc")  # fmt: skip
ROWS = (
    "base", "window_plain", "window_ntk", "window_yarn", "dyneval", "e2e", "e2e_meta",
    "e2e_meta_static", "cache", "retrieval", "assoc", "e2e_assoc", "e2e_meta_assoc", "retrofit",
    "retrofit_reset", "retrofit_gate0", "retrofit_forced", "lora_long", "full_attention",
    "full_attention_4x", "scratch",
)  # fmt: skip
TRAINED = ("base", "e2e_meta", "retrofit", "retrofit_forced", "lora_long", "full_attention",
           "full_attention_4x", "scratch")  # fmt: skip


@dataclass(frozen=True)
class RealDataSettings:
    """Everything the benchmark does; ``DEFAULT`` is ``make demo`` (about 14 min on 2 cores,
    the end-to-end memory's meta-training the longest part)."""

    frames: int = 512  # frames (bytes) per sequence
    context: int = 64  # the base's attention window C
    model: dict[str, Any] = field(default_factory=lambda: {
        "num_layers": 4, "depformer_num_layers": 1, "depformer_dim": 16,
        "depformer_dim_feedforward": 64, "depformer_num_heads": 1,
    })  # fmt: skip
    base_steps: int = 300
    retrofit_steps: int = 150
    batch_size: int = 8
    lr: float = 3e-3
    ttt_lr: float = 1e-2
    lora_lr: float = 1e-3
    eval_files: int = 48  # held-out sequences scored, round robin over the held-out files
    val_files: int = 16  # validation sequences for the dyneval sweep
    dyneval_lrs: tuple[float, ...] = (0.03, 0.1, 0.3)
    # dyneval's grid: every choice of the recall study's 6 runs (and 5 of the end-to-end
    # study's 6) from the larger grid (all layers, K = C too) lies in these 6 settings, which
    # keep the demo short (docs/retrofit.md)
    dyneval_layers: tuple[str, ...] = ("top:1", "top:2")
    dyneval_chunks: tuple[float, ...] = (0.125,)  # K as fractions of C (C/8: as e2e)
    e2e_layers: str = "top:1"  # the last layer (the last quarter of 4; the 7B's live choice)
    e2e_hiddens: tuple[int, ...] = (256, 1024)  # prime MLP widths (the model's is 64)
    e2e_lrs: tuple[float, ...] = (0.1, 0.3, 1.0)
    e2e_chunks: tuple[float, ...] = (0.125, 0.25)  # K as fractions of C (TTT-E2E: 1/8)
    chunk_frames: int = 64  # streaming chunk of the evaluation
    bin_frames: int = 32
    max_files: int = 5000
    max_bytes: int = 64 * 2**20
    ttt: dict[str, Any] = field(default_factory=lambda: dict(RETROFIT_TTT))
    retrofit: dict[str, Any] = field(default_factory=lambda: dict(RETROFIT_TRAIN))
    # recall (``eval.recall``): needles in held-out files, phrases in the base's training files
    needle: NeedleSpec = field(default_factory=NeedleSpec)
    # share of training sequences given key=value phrases repeated inside the window (0: none;
    # 300 steps with 0.5 taught the tiny base the format, not to copy: docs/retrofit.md)
    train_needles: float = 0.0
    repeat_n: int = 8  # repeated bytes: the n tokens before a position
    memory: MemoryGrid = field(default_factory=MemoryGrid)  # recall memories, on validation
    retrieval_top_k: tuple[int, ...] = (4, 16, 64)  # evicted keys read per head and position
    gate_fit_files: int = 48  # training sequences a learned gate is fitted on
    # needles are planted as bytes: off for text read through a model's tokenizer or shards
    needles_why_not: str = ""
    # the headline and what every validation choice minimises: text CE, or on data with audio
    # moshi-finetune's loss (``headline_metric``)
    metric: str = "text_ce"

    def corpus_spec(self) -> CorpusSpec:
        return CorpusSpec(frames=self.frames, max_files=self.max_files, max_bytes=self.max_bytes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


DEFAULT = RealDataSettings()
QUICK = RealDataSettings(
    frames=64, context=16, model={"num_layers": 2, "depformer_num_layers": 1,
                                  "depformer_dim": 16, "depformer_dim_feedforward": 32,
                                  "depformer_num_heads": 1},
    base_steps=4, retrofit_steps=3, batch_size=4, eval_files=8, val_files=3,
    dyneval_lrs=(0.1,), dyneval_layers=("top:1",), chunk_frames=16, bin_frames=16,
    max_files=400, e2e_hiddens=(64,), e2e_lrs=(0.3,), e2e_chunks=(0.25,), dyneval_chunks=(1.0,),
    needle=NeedleSpec(distances=(2, 4), key_len=2, value_len=2, lead=4, files=6),
    memory=QUICK_GRID, retrieval_top_k=(4,), gate_fit_files=8,
)  # fmt: skip


def parse_rows(rows: str) -> tuple[str, ...]:
    """``--rows``: ``essential`` (default), ``all`` or a comma list of ``ROWS``."""
    if rows == "essential":
        return ESSENTIAL
    if rows == "all":
        return ROWS
    chosen = [r.strip() for r in rows.split(",") if r.strip()]
    unknown = [r for r in chosen if r not in ROWS]
    if unknown or not chosen:
        raise ValueError(f"--rows: unknown row(s) {unknown or rows!r}; expected 'essential', "
                         f"'all' or a comma list of {', '.join(ROWS)}")  # fmt: skip
    if "base" not in chosen:
        chosen.insert(0, "base")  # every row is compared with the base
    chosen += [MEMORY_ROWS[r][0] for r in chosen if r in MEMORY_ROWS]  # what a memory mixes into
    return tuple(r for r in ROWS if r in chosen)


# -- training -----------------------------------------------------------------------------
def _tiny(s: RealDataSettings, context: int, text_card: int, card: int) -> dict[str, Any]:
    return {"source": "tiny", "train_base": True,
            "tiny_overrides": {**s.model, "context": context, "text_card": text_card,
                               "card": card}}  # fmt: skip


def chunk_of(s: RealDataSettings, fraction: float) -> int:
    """A chunk K given as a fraction of the window C, in frames (>= 1)."""
    return chunk_frames_of(s.context, fraction)


def train_config(s: RealDataSettings, name: str, data: Path, out: Path, seed: int,
                 vocab: tuple[int, int], e2e: dict[str, Any] | None = None,
                 base: FrozenBase | None = None) -> TrainConfig:  # fmt: skip
    """The ``moshi-ttt train`` config of run ``name`` (``base``, ``e2e_meta``, ``retrofit``,
    ``lora_long``, ``full_attention``, ``full_attention_4x``, ``scratch``); ``e2e``: the
    zero-training memory's validation choice, where ``e2e_meta`` starts; ``base``: the frozen
    base of the runs that keep one (default: the demo's, ``OUT/base``)."""
    text_card, card = vocab
    frozen = (base or FrozenBase.local(out / "base")).train_model()
    model, ttt, lora, steps, kl = None, None, {"enable": False}, s.base_steps, 0.0
    if name == "base":
        model = _tiny(s, s.context, text_card, card)
    elif name in ("full_attention", "full_attention_4x"):
        model = _tiny(s, s.frames, text_card, card)
        steps = s.base_steps * (4 if name.endswith("4x") else 1)
    elif name == "scratch":
        model, ttt = _tiny(s, s.context, text_card, card), dict(s.ttt)
    elif name == "retrofit":
        extra = retrofit_training(s.context, s.retrofit)
        model, ttt, steps = {**frozen, **extra["model"]}, dict(s.ttt), s.retrofit_steps
        kl = extra["kl_to_base"]
    elif name == "e2e_meta":
        if e2e is None:
            raise ValueError("e2e_meta starts from the zero-training choice: pass e2e=")
        model, ttt, steps = dict(frozen), e2e_ttt(s.e2e_layers, e2e), s.retrofit_steps
    elif name == "retrofit_forced":
        extra = retrofit_training(s.context, FORCED_TRAIN)
        model, ttt, steps = {**frozen, **extra["model"]}, dict(FORCED_TTT), s.retrofit_steps
    elif name == "lora_long":
        model, steps = {**frozen, "train_context": s.frames}, s.retrofit_steps
        lora = {"enable": True, "rank": 8}
    else:
        raise ValueError(f"unknown benchmark run {name!r}")
    return TrainConfig.from_dict({
        "run_dir": str(out / "runs" / name), "seed": seed, "max_steps": steps,
        "duration_sec": s.frames / FRAME_RATE, "batch_size": s.batch_size, "lr": s.lr,
        "ttt_lr": s.ttt_lr, "lora_lr": s.lora_lr, "max_norm": 1.0,
        "first_codebook_weight": 1.0, "log_every": 10, "ckpt_every": 0, "keep_last": 1,
        "kl_to_base": kl,
        "model": {"dtype": "float32", "gradient_checkpointing": False, **model},
        "ttt": ttt, "lora": lora,
        "data": {"train": [str(data)], "num_workers": 0, "state_carry": "none"},
        "optim": {"schedule": "cosine", "pct_start": 0.1, "weight_decay": 0.0},
    })  # fmt: skip


def _base_key(s: RealDataSettings, seed: int, corpus: CorpusSummary, vocab: tuple) -> str:
    what = {"model": s.model, "context": s.context, "frames": s.frames, "steps": s.base_steps,
            "batch": s.batch_size, "lr": s.lr, "seed": seed, "vocab": list(vocab),
            "corpus": {k: corpus.to_dict()[k] for k in ("root", "files", "sequences")}}  # fmt: skip
    if s.train_needles > 0:  # a base trained on planted phrases is another base
        what["needles"] = [s.train_needles, s.needle.key_len, s.needle.value_len]
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


# -- inference costs ----------------------------------------------------------------------
def moshi7b_costs(
    dyneval_layers: str | int,
    ttt_layers: str | int,
    forced_layers: str | int = FORCED_TTT["layers"],
    e2e_width_ratio: float = 4.0,
    e2e_layers: str = "top:1",
    assoc_keys: int = 4096,
) -> dict[str, dict[str, float]]:
    """Bytes of per-conversation state for Moshi 7B (moshi's own config, built on the meta
    device), at 3,000 and 45,000 frames: KV cache of the temporal transformer (bf16; the window
    caps it at 3,000 frames), a TTT-Linear state per converted layer (float32 W and b per
    head), dynamic evaluation's copy of the updated layers' weights (bf16), and the end-to-end
    memory's fast weights (float32, prime MLPs of ``e2e_width_ratio`` x the model width) with its
    recorded inputs (the receptive field of the layers after the first memory plus one chunk
    of C/8, bf16); the recall memories over the final hidden states (``eval.recall``): the
    cache (bf16 states and int32 tokens of every frame) and the associative memory (float32,
    text vocabulary x ``assoc_keys``). Layers are counts or layer specs, read against Moshi
    7B's 32 layers."""
    kw = dict(loaders._lm_kwargs)
    dim, layers, heads, ctx = kw["dim"], kw["num_layers"], kw["num_heads"], kw["context"]

    def count(spec: str | int) -> int:
        return spec if isinstance(spec, int) else len(parse_layer_spec(spec, layers))

    with torch.device("meta"):
        lm = LMModel(**kw)
    layer_params = sum(p.numel() for p in lm.transformer.layers[0].parameters())
    hd = dim // heads
    per_layer = heads * (hd * hd + hd) * 4
    ttt_state, forced_state = count(ttt_layers) * per_layer, count(forced_layers) * per_layer
    e2e_idx = parse_layer_spec(e2e_layers, layers)
    hidden = round(e2e_width_ratio * dim)
    recorded = ((layers - 1 - e2e_idx[0]) * (ctx - 1) + ctx // 8) * dim * 2
    e2e_state = len(e2e_idx) * 3 * dim * hidden * 4 + recorded
    out = {}
    for frames in (3000, 45000):
        kv = layers * 2 * dim * 2 * min(frames, ctx)
        kv_full = layers * 2 * dim * 2 * frames
        out[str(frames)] = {
            "kv_window": float(kv),
            "kv_full_attention": float(kv_full),
            "kv_window_plus_ttt": float(kv + ttt_state),
            "kv_window_plus_forced_ttt": float(kv + forced_state),
            "kv_window_plus_dyneval": float(kv + count(dyneval_layers) * layer_params * 2),
            "kv_window_plus_e2e": float(kv + e2e_state),
            "kv_window_plus_cache": float(kv + frames * (2 * dim + 4)),
            "kv_window_plus_retrieval": float(kv + 2 * dim * 2 * max(0, frames - ctx)),
            "kv_window_plus_assoc": float(kv + 4 * kw["text_card"] * assoc_keys),
            "kv_window_plus_e2e_assoc": float(kv + e2e_state + 4 * kw["text_card"] * assoc_keys),
        }
    return out


ROW_COST = {"base": "kv_window", "window_plain": "kv_full_attention",
            "window_ntk": "kv_full_attention", "window_yarn": "kv_full_attention",
            "dyneval": "kv_window_plus_dyneval", "retrofit": "kv_window_plus_ttt",
            "e2e": "kv_window_plus_e2e", "e2e_meta": "kv_window_plus_e2e",
            "e2e_meta_static": "kv_window", "cache": "kv_window_plus_cache",
            "retrieval": "kv_window_plus_retrieval",
            "assoc": "kv_window_plus_assoc", "e2e_assoc": "kv_window_plus_e2e_assoc",
            "e2e_meta_assoc": "kv_window_plus_e2e_assoc",
            "retrofit_reset": "kv_window_plus_ttt", "retrofit_gate0": "kv_window",
            "retrofit_forced": "kv_window_plus_forced_ttt",
            "lora_long": "kv_full_attention", "full_attention": "kv_full_attention",
            "full_attention_4x": "kv_full_attention", "scratch": "kv_window_plus_ttt"}  # fmt: skip


# -- the benchmark ------------------------------------------------------------------------
def run_realdata(out_dir: str | Path = "demo_out", data: str | Path | None = None, seed: int = 0,
                 rows: str = "essential", quick: bool = False, progress: bool = True,
                 settings: RealDataSettings | None = None,
                 cache_dir: str | Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Run the real-data benchmark (module docstring); returns ``results.json``.
    ``cache_dir``: where trained bases are kept by their settings (default ``OUT/cache``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with no_compile():
            s = settings or (QUICK if quick else DEFAULT)
            out = Path(out_dir)
            cache = Path(cache_dir) if cache_dir is not None else out / "cache"
            return _run(out, data, seed, parse_rows(rows), s, quick, progress, cache)
    finally:
        torch.set_num_threads(threads)


def _vocab(data: Path) -> tuple[int, int]:
    """(text_card, card) for the tiny model: bytes, or the largest ids in a shards corpus."""
    src = ShardSource(data)
    text, audio = TEXT_CARD, 32
    for i in range(len(src)):
        codes = src.codes(i)
        text = max(text, int(codes[0].max()) + 1)
        audio = max(audio, int(codes[1:].max()) + 1)
    return text, audio


def _run(out: Path, data: str | Path | None, seed: int, rows: tuple[str, ...],
         s: RealDataSettings, quick: bool, progress: bool,
         cache_root: Path) -> dict[str, Any]:  # fmt: skip
    for sub in ("runs", "data", "configs", "eval"):
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    say = print if progress else (lambda *a, **k: None)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    root = Path(data) if data is not None else default_corpus()
    trains = [r for r in TRAINED if r in rows or (r == "retrofit" and any(
        x.startswith("retrofit") for x in rows)) or (r == "e2e_meta" and "e2e_meta_static"
        in rows)]  # fmt: skip
    n_steps = 3 + len(trains)
    k = 1

    # 1. Corpus.
    say(f"[{k}/{n_steps}] corpus: {root}")
    corpus = read_corpus(root, s.corpus_spec(), out / "data", progress=progress)
    say("      " + corpus.text())
    train_dir, val_dir, test_dir = (out / "data" / x for x in ("train", "val", "test"))
    vocab = _vocab(train_dir) if corpus.kind == "shards" else (TEXT_CARD, 32)
    if corpus.kind == "text" and s.train_needles > 0:
        n = plant_training_phrases(train_dir, s.context, s.needle, s.train_needles, seed)
        say(f"      planted a key=value phrase and its repeat inside the window in {n} training "
            "sequences (the base learns to copy what it sees: the needles' ceiling)")  # fmt: skip

    # 2. Training runs; the base is cached by its settings.
    runs: dict[str, Path] = {}
    base = FrozenBase.local(out / "base")  # the base's export, once trained or cached
    train_seconds: dict[str, float] = {}
    val = split_sequences(val_dir, s.val_files)
    s = dataclasses.replace(s, metric=headline_metric(val))
    extra: dict[str, Any] = {}
    (out / "configs").mkdir(parents=True, exist_ok=True)
    for name in trains:
        k += 1
        if name == "e2e_meta":
            say(f"      choosing the e2e memory's width, lr and K on {count_text(val)}")
            extra["e2e"] = choose_e2e(base, s, val, seed, progress)
        cfg = train_config(s, name, train_dir, out, seed, vocab,
                           e2e=extra.get("e2e", {}).get("chosen"))  # fmt: skip
        cfg.to_yaml(out / "configs" / f"{name}.yaml")
        if name == "base":
            key = _base_key(s, seed, corpus, vocab)
            cache = cache_root / f"base-{key}"
            if (cache / "base" / "config.json").is_file() and (cache / "run").is_dir():
                say(f"[{k}/{n_steps}] base: cached ({cache})")
                _copy_tree(cache / "run", Path(cfg.run_dir))
                _copy_tree(cache / "base", out / "base")
                runs[name] = Path(cfg.run_dir)
                train_seconds[name] = json.loads((cache / "seconds.json").read_text())["seconds"]
                continue
        say(f"[{k}/{n_steps}] training {name}: {cfg.max_steps} steps of {s.batch_size} x "
            f"{cfg.frames_per_window} frames")  # fmt: skip
        start = time.perf_counter()
        train(cfg, progress=progress, device="cpu", overwrite=True)
        train_seconds[name] = time.perf_counter() - start
        runs[name] = Path(cfg.run_dir)
        if name == "base":
            shutil.rmtree(out / "base", ignore_errors=True)
            export_run(runs["base"], out / "base")
            cache.mkdir(parents=True, exist_ok=True)
            _copy_tree(runs["base"], cache / "run")
            _copy_tree(out / "base", cache / "base")
            (cache / "seconds.json").write_text(json.dumps({"seconds": train_seconds[name]}))
    timings["training (s)"] = sum(train_seconds.values())
    command = lambda names: row_command(out, root, seed, names, quick)  # noqa: E731
    return evaluate_and_report(out, rows, s, base, runs, train_seconds, val, test_dir, corpus,
                               seed, extra, timings, t0, progress, command, _width(s), quick,
                               (k, n_steps))  # fmt: skip


def evaluate_and_report(out: Path, rows: tuple[str, ...], s: RealDataSettings, base: FrozenBase,
                        runs: dict[str, Path], train_seconds: dict[str, float], val: list,
                        test_dir: Path, corpus: CorpusSummary, seed: int, extra: dict[str, Any],
                        timings: dict[str, float], t0: float, progress: bool,
                        command: Any, width: int, quick: bool, step: tuple[int, int],
                        study: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """The last two stages of a memory study (the demo's and ``moshi-ttt study``'s): every row
    and the recall measures on the held-out sequences of ``test_dir``, then ``results.json``,
    ``report.md`` and the result printed. ``command(rows)``: the command that recomputes rows;
    ``width``: the base's model width; ``step``: (stages done, stages in all); ``study``: what
    ``moshi-ttt study`` records of its base and data (None: the demo)."""
    say = print if progress else (lambda *a, **k: None)
    k, n_steps = step
    k += 1
    test = split_sequences(test_dir, s.eval_files)
    say(f"[{k}/{n_steps}] evaluating {len(rows)} rows on {count_text(test)} held out "
        f"({s.frames} frames each)")  # fmt: skip
    start = time.perf_counter()
    curves, extra, ms_per_frame, scorers = _evaluate_rows(rows, base, runs, s, test, val,
                                                          progress, extra, seed)  # fmt: skip
    say(
        "      recall: repeated bytes, needles at "
        f"{', '.join(f'{m}x' for m in s.needle.distances)} "
        f"the window, memory rows {', '.join(r for r in rows if r in MEMORY_ROWS) or 'none'}"
    )
    extra["recall"] = evaluate_recall(rows, s, curves, scorers, test, val, test_dir, base, seed,
                                      extra, ms_per_frame, progress)  # fmt: skip
    timings["evaluation (s)"] = time.perf_counter() - start

    # Results and report.
    k += 1
    say(f"[{k}/{n_steps}] writing the report")
    timings["total (s)"] = time.perf_counter() - t0
    results = _results(s, rows, curves, extra, train_seconds, ms_per_frame, corpus, seed,
                       command, width, quick)  # fmt: skip
    results["timings"] = timings
    if study is not None:
        results["study"] = study
    (out / "results.json").write_text(json.dumps(results, indent=1, default=_json) + "\n")
    path = write_report(out, s, results, curves, runs)
    r = results["rows"]
    # the result is printed with or without --no-progress (it hides the progress only)
    print(f"done in {timings['total (s)']:.0f} s; beyond the window (frames >= {s.context}): "
          + ", ".join(f"{n} {r[n]['ce_beyond']['mean']:.4f}" for n in r)
          + f"; see {path}")  # fmt: skip
    for line in results["verdict"]["lines"]:
        print("  " + line)
    return results


def _copy_tree(src: Path, dst: Path) -> None:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)


def headline_metric(seqs: list[tuple[str, torch.Tensor]]) -> str:
    """``moshi_loss`` (moshi-finetune's: text with PAD/EPAD x0.5 + audio with codebook 0 x100)
    when some sequence ``(name, codes [17, T])`` has a Moshi audio token, else ``text_ce``."""
    audio = any(bool((codes[1 : 1 + NUM_CODEBOOKS] >= 0).any()) for _, codes in seqs)
    return MOSHI_LOSS if audio else "text_ce"


def split_sequences(split_dir: Path, cap: int) -> list[tuple[str, torch.Tensor]]:
    """At most ``cap`` sequences of a split, round robin over its files: every file's first
    sequence (``#0``), then every file's second, ... (a corpus with many files gives one
    sequence per file; a small one several, kept together as one unit by ``source_file``)."""
    src = ShardSource(split_dir)
    names = [str(f["path"]) for f in src.files]
    order = sorted(range(len(src)), key=lambda i: int(names[i].rsplit("#", 1)[1]))
    if not order:
        raise DataError(f"{split_dir}: no sequences to evaluate")
    return [(names[i], src.codes(i)) for i in order[:cap]]


def choose_e2e(base: FrozenBase, s: RealDataSettings, val: list, seed: int,
                progress: bool) -> dict[str, Any]:  # fmt: skip
    return e2e_choice(base, s.e2e_layers, s.e2e_hiddens, s.e2e_lrs,
                      [chunk_of(s, f) for f in s.e2e_chunks], val, seed, progress,
                      s.metric)  # fmt: skip


def _evaluate_rows(rows: tuple[str, ...], base: FrozenBase, runs: dict[str, Path],
                   s: RealDataSettings, test: list, val: list, progress: bool,
                   extra: dict[str, Any], seed: int) -> tuple[dict, dict, dict, dict]:  # fmt: skip
    """Every row's curve on the held-out sequences ``test`` (and its validation choice in
    ``extra``), ms per frame, and per row a scorer of other sequences (for recall)."""
    kw = {"chunk_frames": s.chunk_frames, "bin_frames": s.bin_frames, "progress": progress,
          "equal_lengths": ()}  # fmt: skip
    curves: dict[str, PositionLosses] = {}
    extra = dict(extra)
    ms: dict[str, float] = {}
    base_lm = base.load()
    scorers: dict[str, Any] = {}  # row -> files -> curve (recall scores every row with them)

    def timed(name: str, fn: Any, passes: int = 1) -> Any:
        """Run ``fn`` (``passes`` streamed passes over the test files) and record ms per frame
        of one pass."""
        start = time.perf_counter()
        result = fn()
        ms[name] = 1000 * (time.perf_counter() - start) / (len(test) * s.frames * passes)
        return result

    blocks = math.gcd(s.bin_frames, s.context)  # per-file block sums split exactly at C
    scorers["base"] = lambda fs: evaluate_long_context(
        base_lm, fs, controls=(), **kw).variants["no_ttt"]  # fmt: skip
    curves["base"] = timed("base", lambda: scorers["base"](test))
    for scaling in ("plain", "ntk", "yarn"):
        name = f"window_{scaling}"
        if name in rows:
            with extended_window(base_lm, s.frames, "none" if scaling == "plain" else scaling):
                curves[name] = timed(name, lambda: evaluate_long_context(
                    base_lm, test, controls=(), **kw).variants["no_ttt"])  # fmt: skip
    if "dyneval" in rows:
        grid = [DynEvalConfig(lr=lr, layers=layers, chunk_frames=chunk_of(s, f))
                for f in s.dyneval_chunks for layers in s.dyneval_layers
                for lr in s.dyneval_lrs]  # fmt: skip
        best, scores = sweep_dyneval(base_lm, val, grid, metric=s.metric, progress=progress)
        extra["dyneval"] = {"chosen": best.__dict__.copy(), "label": best.label(),
                            "validation": scores, **sequence_counts(val, "validation")}  # fmt: skip
        scorers["dyneval"] = lambda fs: evaluate_dyneval(base_lm, fs, best, progress=progress,
                                                         block_frames=blocks)  # fmt: skip
        curves["dyneval"] = timed("dyneval", lambda: scorers["dyneval"](test))
    if "retrieval" in rows:
        found = {k: evaluate_retrieval(base_lm, val, k, blocks, s.chunk_frames).totals(
                 s.context)[s.metric] for k in s.retrieval_top_k}  # fmt: skip
        top_k = min(found, key=lambda k: found[k])  # inside the window it is the base
        extra["retrieval"] = {"chosen": {"top_k": top_k},
                              "label": f"top layer, {top_k} evicted keys per head",
                              "validation": [{"top_k": k, s.metric: v} for k, v in found.items()],
                              **sequence_counts(val, "validation")}  # fmt: skip
        scorers["retrieval"] = lambda fs: evaluate_retrieval(base_lm, fs, top_k, blocks,
                                                             s.chunk_frames)  # fmt: skip
        curves["retrieval"] = timed("retrieval", lambda: scorers["retrieval"](test))
    if "e2e" in rows:
        if "e2e" not in extra:
            extra["e2e"] = choose_e2e(base, s, val, seed, progress)
        stats = E2EStats()
        lm = e2e_memory(base, s.e2e_layers, extra["e2e"]["chosen"], seed)
        scorers["e2e"] = lambda fs, st=None, m=lm: evaluate_e2e(
            m, fs, progress=progress, block_frames=blocks, stats=st)  # fmt: skip
        curves["e2e"] = timed("e2e", lambda: scorers["e2e"](test, stats))
        extra["e2e"].update(_e2e_stats(stats))
    if "e2e_meta" in runs:
        stats = E2EStats()
        meta_lm = load_trained_model(runs["e2e_meta"])[0].eval()
        scorers["e2e_meta"] = lambda fs, st=None: evaluate_e2e(
            meta_lm, fs, progress=progress, block_frames=blocks, stats=st)  # fmt: skip
        curves["e2e_meta"] = timed("e2e_meta", lambda: scorers["e2e_meta"](test, stats))
        learned = [float(m.e2e.lr().detach()) for _, m in e2e_layers(meta_lm)]
        extra["e2e_meta"] = {"inner_lr_learned": learned, **_e2e_stats(stats)}
        if "e2e_meta_static" in rows:
            scorers["e2e_meta_static"] = lambda fs: evaluate_static(
                meta_lm, fs, block_frames=blocks, chunk_frames=s.chunk_frames)  # fmt: skip
            curves["e2e_meta_static"] = scorers["e2e_meta_static"](test)
        if "e2e_meta" not in rows:
            del curves["e2e_meta"]
    if "retrofit" in runs:
        lm, _ = load_trained_model(runs["retrofit"])
        res = timed("retrofit", lambda: evaluate_long_context(
            lm, test, controls=("reset", "no_ttt"), reset_every=s.context, **kw),
            passes=3)  # the memory, reset, gate 0  # fmt: skip
        for name, variant in (("retrofit", "ttt"), ("retrofit_reset", f"reset_every_{s.context}"),
                              ("retrofit_gate0", "no_ttt")):  # fmt: skip
            if name in rows:
                curves[name] = res.variants[variant]
        extra["retrofit"] = {"gate": _gate(lm)}
    if "lora_long" in runs:
        lora_lm, _ = load_trained_model(runs["lora_long"])
        with extended_window(lora_lm, s.frames, "none"):
            curves["lora_long"] = timed("lora_long", lambda: evaluate_long_context(
                lora_lm, test, controls=(), **kw).variants["no_ttt"])  # fmt: skip
    for name in ("retrofit_forced", "full_attention", "full_attention_4x", "scratch"):
        if name in runs:
            res = timed(name, lambda n=name: evaluate_long_context(
                load_trained_model(runs[n])[0], test, controls=(), **kw))  # fmt: skip
            curves[name] = res.variants["no_ttt" if name.startswith("full") else "ttt"]
    return curves, extra, ms, scorers


def evaluate_recall(rows: tuple[str, ...], s: RealDataSettings, curves: dict[str, PositionLosses],
                    scorers: dict[str, Any], test: list, val: list, test_dir: Path,
                    base: FrozenBase, seed: int, extra: dict[str, Any], ms: dict[str, float],
                    progress: bool) -> dict[str, Any]:  # fmt: skip
    """The recall measures (``eval.recall``) of every row that has a scorer, and the memory rows
    (added to ``curves``): repeated bytes on the held-out files, needle shares, and per memory
    row its validation choice. Rows without a scorer (the ``--rows all`` extras) are named in
    ``"not_scored"``."""
    C, blocks = s.context, math.gcd(s.bin_frames, s.context)
    base_lm = base.load()
    out: dict[str, Any] = {"repeat_n": s.repeat_n, "needle": dataclasses.asdict(s.needle)}
    try:
        if s.needles_why_not:
            raise ValueError(s.needles_why_not)
        cases, masks = needle_cases(test_dir, C, s.needle, seed)
    except (DataError, ValueError) as e:  # files too short, a phrase that does not fit
        cases, masks = {}, {}
        out["needle_error"] = f"needles not computed: {e}"
    memory = {r: MEMORY_ROWS[r] for r in rows if r in MEMORY_ROWS and MEMORY_ROWS[r][0] in scorers}
    feats: dict[str, Any] = {}
    if memory:
        feats["test"] = base_features(base_lm, test, s.chunk_frames, blocks, progress)[0]
        feats["val"] = base_features(base_lm, val, s.chunk_frames, blocks, progress)[0]
    needles: dict[str, dict[str, PositionLosses]] = {}
    variants = list(cases)
    for row, scorer in scorers.items():
        if row not in curves:
            continue
        for v in variants if row == "base" else [v for v in variants if v != "inside"]:
            needles.setdefault(row, {})[v] = scorer(cases[v])
    for v in variants if memory else ():
        feats[v] = base_features(base_lm, cases[v], s.chunk_frames, blocks, progress)[0]
    vocab = int(base_lm.text_card)
    val_curves = {under: scorers[under](val) for under, _ in set(memory.values())}
    fit = None
    if memory:  # a learned gate is fitted on training files (the base's own predictions)
        train = split_sequences(Path(test_dir).parent / "train", s.gate_fit_files)
        fit = base_features(base_lm, train, s.chunk_frames, blocks, progress)
    chosen = add_memory_rows(memory, curves, val_curves, feats.get("test", {}),
                             feats.get("val", {}), s.memory, C, vocab, seed, fit,
                             s.metric)  # fmt: skip
    for row, choice in chosen.items():
        for v in needles.get(choice.on, {}):
            reads = memory_reads(choice.setting, feats[v], vocab, seed)
            needles.setdefault(row, {})[v] = mix_curve(needles[choice.on][v], reads, choice.lam)
        extra[row] = {**choice.to_dict(), **sequence_counts(val, "validation")}
        ms[row] = ms.get(choice.on, math.nan) + choice.ms_per_frame
    tokens = {name: codes[0].numpy() for name, codes in test}
    scored = {r: c for r, c in curves.items() if c.file_text}
    out["repeat"] = repeat_split(scored, tokens, C, s.repeat_n)
    if cases:
        base_n = {v: restrict(c, masks[v]) for v, c in needles["base"].items()}
        out["needle_shares"] = {
            row: needle_shares({v: restrict(c, masks[v]) for v, c in per.items()}, base_n,
                               s.needle.distances)
            for row, per in needles.items()
        }  # fmt: skip
        out["needle_files"] = len(cases["inside"])
    out["not_scored"] = [r for r in curves if r not in needles]
    return out


def _width(s: RealDataSettings) -> int:
    """The tiny model's width (``tiny_lm_kwargs`` with the benchmark's overrides)."""
    return int(tiny_lm_kwargs(**s.model)["dim"])


def _e2e_stats(stats: E2EStats) -> dict[str, Any]:
    return {"updates": stats.updates, "ms_per_update": stats.ms_per_update(),
            "rollbacks": stats.rollbacks}  # fmt: skip


def _gate(lm: torch.nn.Module) -> float | None:
    gates = [float(m.gate().abs().mean()) for _, m in ttt_modules(lm) if hasattr(m, "gate")]
    return float(np.mean(gates)) if gates else None


def _json(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def row_command(out: Path, data: Path | str, seed: int, rows: tuple[str, ...],
                quick: bool = False) -> str:  # fmt: skip
    """The ``moshi-ttt demo`` command that recomputes ``rows`` (with the base)."""
    return shlex.join([cli_prefix(), "demo", "--data", str(data), "--out", str(out), "--seed",
                       str(seed), "--rows", ",".join(rows), "--no-progress"]
                      + (["--quick"] if quick else []))  # fmt: skip


def _results(s: RealDataSettings, rows: tuple[str, ...], curves: dict, extra: dict,
             train_seconds: dict, ms: dict, corpus: CorpusSummary, seed: int, command: Any,
             width: int, quick: bool = False) -> dict[str, Any]:  # fmt: skip
    C = s.context
    units = {k: c.grouped(source_file) for k, c in curves.items()}
    stats = file_intervals(units, "base", C, s.metric)
    # data with audio, beside the headline: text CE, the 8 codebooks' CE, codebook 0's (moshi's
    # loss weighs it 100x) and moshi-finetune's training loss
    has_audio = curves["base"].audio_count[:, C:].sum() > 0
    audio = {m: file_intervals(units, "base", C, m) for m in SECONDARY_METRICS
             if has_audio and m != s.metric}  # fmt: skip
    e2e_hidden = extra.get("e2e", {}).get("chosen", {}).get("hidden", 4 * width)
    costs = moshi7b_costs(
        dyneval_layers=extra.get("dyneval", {}).get("chosen", {}).get("layers") or 0,
        ttt_layers=s.ttt.get("layers", "0"),
        e2e_width_ratio=e2e_hidden / width,
        e2e_layers=s.e2e_layers,
        assoc_keys=extra.get("assoc", {}).get("chosen", {}).get("keys", 4096),
    )
    table = {}
    for name in curves:
        tot = stats["totals"].get(name, {})
        diff = stats["difference"].get(name, {})
        run = {"retrofit_reset": "retrofit", "retrofit_gate0": "retrofit",
               "e2e_meta_static": "e2e_meta",
               **{k: v[0] for k, v in MEMORY_ROWS.items()}}.get(name, name)  # fmt: skip
        table[name] = {
            "ce_within": tot.get("within_context"),
            "ce_beyond": tot.get("beyond_context"),
            "vs_base_within": diff.get("within_context"),
            "vs_base_beyond": diff.get("beyond_context"),
            "train_seconds": train_seconds.get(
                run,
                0.0
                if name.startswith(("window", "dyn")) or run == "e2e" or run == "base"
                else None,
            ),
            "ms_per_frame": ms.get(name, ms.get(run)),
            "state_bytes_moshi7b": {f: c[ROW_COST[name]] for f, c in costs.items()},
            "frozen_base": name not in ("base", "full_attention", "full_attention_4x", "scratch"),
            "command": command((name,)),
        }
        for metric, key in SECONDARY_METRICS.items():  # data with audio
            if metric in audio:
                a = audio[metric]
                table[name][f"{metric}_beyond"] = a["totals"].get(name, {}).get("beyond_context")
                table[name][f"vs_base_beyond_{key}"] = a["difference"].get(name, {}).get(
                    "beyond_context")  # fmt: skip
        if name in extra:
            table[name]["details"] = extra[name]
    return {
        "metric": s.metric,
        "context_frames": C,
        "frames_per_file": s.frames,
        "corpus": corpus.to_dict(),
        "held_out_files": len(next(iter(units.values())).file_names),
        "held_out_sequences": len(next(iter(curves.values())).file_names),
        "rows": table,
        "recall": extra.get("recall"),
        "quick": quick,
        "verdict": verdict(table, extra.get("recall"), quick),
        "settings": {**s.to_dict(), "seed": seed, "rows": list(rows)},
    }
