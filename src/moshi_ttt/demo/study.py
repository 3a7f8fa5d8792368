"""``moshi-ttt study``: the demo's memory comparison on *your* base and *your* data.

The demo (``realdata``) trains its own tiny base; a study takes any base the project loads (a
Hub repo, a checkpoint directory, an export, a training run, ``tiny``) frozen, and:

1. **plan**: the base's architecture from its config files (no weights read), the settings and
   rows, and an estimate of time and memory, printed before any work;
2. **corpus**: ``--data`` read into ``OUT/data/{train,val,test}`` (split by a hash of each
   file's path, or ``--val`` / ``--test`` given as folders): text as one byte per frame for a
   base grown from the tiny model (the demo's), else through the checkpoint's tokenizer (one
   token per frame); moshi-ttt shards (audio and text) as they are;
3. **the memory's zero-training setting** (width, inner lr, chunk) chosen on validation;
4. **meta-training** (``meta_steps > 0``): the end-to-end memory on the frozen base through
   ``moshi-ttt train`` (an interrupted run resumes from its last checkpoint);
5. **evaluation and report**: every row and the recall measures on the held-out sequences
   (``realdata.evaluate_and_report``): ``OUT/results.json``, ``OUT/report.md``.

Stages 2-4 are cached in ``OUT`` (``study.json`` records what made them): a rerun of the same
command resumes at the first unfinished stage; a changed option redoes what it changes.

**Under torchrun** (``torchrun --nproc-per-node N -m moshi_ttt.cli study ...``): rank 0 runs
the study; the other ranks wait (no process group, so no timeout however long stages 1-3
take) until rank 0 hands them the meta-training (``_Handoff``: ``OUT/ranks.json``, tagged
with this launch), train with it (FSDP over all ranks) and exit; rank 0 evaluates alone. When
rank 0 stops before that, every rank stops with its message.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shlex
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from moshi.utils.compile import no_compile

from ..data.files import DataError
from ..data.pipeline import SHARDS_INDEX, ShardSource, tokenize_index
from ..eval.long_context import evaluate_long_context
from ..eval.recall import MEMORY_ROWS
from ..eval.stats import MIN_UNITS
from ..format import NUM_STREAMS, ZERO_TOKEN
from ..models.load import codec_for_source
from ..models.runs import list_checkpoints
from ..train.config import TrainConfig
from ..train.parallel import launch_rank
from ..train.plan import make_plan
from ..train.trainer import train
from .corpus import (
    SPLITS,
    TEXT_CARD,
    TOKEN_OFFSET,
    CorpusSpec,
    CorpusSummary,
    count_text,
    read_corpus,
    sequence_counts,
    tokenizer_codes,
)
from .frozen import FrozenBase
from .markov import cli_prefix
from .realdata import (
    DEFAULT,
    QUICK,
    ROWS,
    RealDataSettings,
    choose_e2e,
    evaluate_and_report,
    headline_metric,
    split_sequences,
    train_config,
)

# rows a study can compute on a given base (the others train a tiny model from scratch)
STUDY_ROWS = ("base", "window_plain", "window_ntk", "window_yarn", "dyneval", "e2e",
              "e2e_meta", "e2e_meta_static", "cache", "retrieval", "assoc", "e2e_assoc",
              "e2e_meta_assoc")  # fmt: skip
STUDY_ESSENTIAL = ("base", "dyneval", "e2e", "e2e_meta", "e2e_meta_static", "cache",
                   "retrieval", "assoc", "e2e_assoc", "e2e_meta_assoc")  # fmt: skip
META_ROWS = ("e2e_meta", "e2e_meta_static", "e2e_meta_assoc")
STATE = "study.json"
HANDOFF = "ranks.json"  # rank 0 -> the other ranks under torchrun
WAIT_NOTE_S = 600.0  # a waiting rank says so this often


class _Handoff:
    """Under torchrun, what rank 0 tells the other ranks in ``OUT/ranks.json``: the
    meta-training to join (``{"config", "resume", "overwrite"}``), none (``{"config": None}``)
    or its error (``{"error"}``); each message carries this launch's tag, so that a file left
    by an earlier launch is never read as this one's."""

    def __init__(self, out: Path) -> None:
        self.path = out / HANDOFF
        env = os.environ
        self.launch = "/".join(env.get(k, "") for k in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR",
                                                        "MASTER_PORT",
                                                        "TORCHELASTIC_RESTART_COUNT"))  # fmt: skip

    told = False  # this launch's message is written

    def tell(self, **message: Any) -> None:
        self.told = True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"launch": self.launch, **message}))
        tmp.replace(self.path)

    def wait(self, rank: int) -> dict[str, Any]:
        start = last = time.monotonic()
        while True:
            try:
                got = json.loads(self.path.read_text())
            except (OSError, ValueError):
                got = None  # not written yet (or mid-replace)
            if isinstance(got, dict) and got.get("launch") == self.launch:
                return got
            time.sleep(0.5)
            if time.monotonic() - last > WAIT_NOTE_S:
                last = time.monotonic()
                print(f"rank {rank}: waiting for rank 0's study to reach the meta-training "
                      f"({(last - start) / 60:.0f} min)", flush=True)  # fmt: skip


def _follow(base: FrozenBase, out: Path, rank: int, argv: Sequence[str]) -> None:
    """A rank other than 0 under torchrun: join rank 0's meta-training, if any, and return."""
    told = _Handoff(out).wait(rank)
    if "error" in told:
        raise ValueError(f"rank 0 stopped the study: {told['error']}")
    if told.get("config") is None:
        return
    cfg = TrainConfig.load(told["config"])
    train(cfg, progress=False, device=base.device, resume=told["resume"],
          overwrite=told["overwrite"], command=shlex.join([cli_prefix(), *argv]))  # fmt: skip
    print(f"rank {rank}: meta-training done; rank 0 evaluates", flush=True)


def study_rows(rows: str, meta_steps: int) -> tuple[str, ...]:
    """``--rows`` of a study: ``essential`` (default), ``all`` or a comma list of
    ``STUDY_ROWS``; the meta-trained rows only with ``meta_steps > 0``."""
    if rows in ("essential", "all"):
        chosen = list(STUDY_ESSENTIAL if rows == "essential" else STUDY_ROWS)
        if meta_steps == 0:
            chosen = [r for r in chosen if r not in META_ROWS]
    else:
        chosen = [r.strip() for r in rows.split(",") if r.strip()]
        bad = [r for r in chosen if r not in STUDY_ROWS]
        if bad or not chosen:
            raise ValueError(f"--rows: unknown row(s) {bad or rows!r} for a study; expected "
                             f"'essential', 'all' or a comma list of {', '.join(STUDY_ROWS)} "
                             "(the demo's other rows train a tiny model from scratch)")  # fmt: skip
        meta = [r for r in chosen if r in META_ROWS]
        if meta and meta_steps == 0:
            raise ValueError(f"--rows {','.join(meta)}: meta-trained rows need --meta-steps > 0")
        chosen = ["base", *chosen]
        chosen += [MEMORY_ROWS[r][0] for r in chosen if r in MEMORY_ROWS]
    return tuple(r for r in ROWS if r in chosen)


def study_settings(lm_kwargs: dict[str, Any], quick: bool, frames: int | None,
                   meta_steps: int | None, batch_size: int | None) -> RealDataSettings:  # fmt: skip
    """The demo's settings (``QUICK`` for ``quick``) fitted to a base of these ``lm_kwargs``:
    its window C, sequences of ``frames`` (default 8 C, quick 4 C), the memory's widths 4x
    (and 16x for widths up to 1024) the model's, ``meta_steps`` meta-training steps."""
    s = QUICK if quick else DEFAULT
    C, dim = int(lm_kwargs["context"]), int(lm_kwargs["dim"])
    frames = frames if frames is not None else (4 if quick else 8) * C
    if frames <= C:
        raise ValueError(f"--frames {frames}: a study scores beyond the base's window of {C} "
                         f"frames; use more than {C} (default {8 * C})")  # fmt: skip
    hiddens = (4 * dim,) if quick or dim > 1024 else (4 * dim, 16 * dim)
    return dataclasses.replace(
        s, frames=frames, context=C, e2e_hiddens=hiddens,
        retrofit_steps=s.retrofit_steps if meta_steps is None else meta_steps,
        batch_size=batch_size or s.batch_size,
        chunk_frames=min(s.chunk_frames, C), bin_frames=min(s.bin_frames, C),
        val_files=max(s.val_files, MIN_UNITS), eval_files=max(s.eval_files, MIN_UNITS),
    )  # fmt: skip


@dataclasses.dataclass
class StudyPlan:
    """What a study will do, printed before it starts (``text``)."""

    base: FrozenBase
    lm_kwargs: dict[str, Any]
    settings: RealDataSettings
    rows: tuple[str, ...]
    text_as: str  # "bytes", "tokens" or "shards"
    data: dict[str, str]  # split -> folder ("all": one folder split by hash)
    ms_per_frame: float | None = None  # the base's forward, measured (None: not yet)
    meta_bytes: int | None = None

    def passes(self) -> float:
        """Sequence passes of the base's forward the study costs (a rough model: dynamic
        evaluation and the end-to-end memory cost about 3x and 2x a pass, each validation
        setting one pass over the validation split; training a step about 3x a pass per row)."""
        s, E, V = self.settings, self.settings.eval_files, self.settings.val_files
        dyn = len(s.dyneval_lrs) * len(s.dyneval_layers) * len(s.dyneval_chunks)
        e2e = len(s.e2e_hiddens) * len(s.e2e_lrs) * len(s.e2e_chunks)
        cost = {"base": 4 * (E + V), "window_plain": 2 * E, "window_ntk": 2 * E,
                "window_yarn": 2 * E, "dyneval": 3 * (E + dyn * V), "e2e": 2 * (E + e2e * V),
                "e2e_meta": 2 * E, "e2e_meta_static": E, "cache": V,
                "retrieval": 1.5 * (E + len(s.retrieval_top_k) * V), "assoc": V + s.gate_fit_files,
                "e2e_assoc": V, "e2e_meta_assoc": V}  # fmt: skip
        total = sum(cost[r] for r in self.rows)
        if any(r in self.rows for r in META_ROWS):
            total += 2 * 3 * s.retrofit_steps * s.batch_size
        return total

    def seconds(self) -> float | None:
        if self.ms_per_frame is None:
            return None
        return self.passes() * self.settings.frames * self.ms_per_frame / 1000

    def text(self) -> str:
        s, kw = self.settings, self.lm_kwargs
        meta = [r for r in self.rows if r in META_ROWS]
        as_ = {"bytes": "text as bytes (one per frame, as the demo's base reads it)",
               "tokens": "text through the checkpoint's tokenizer (one token per frame)",
               "shards": "moshi-ttt shards as they are (text and audio)"}[self.text_as]  # fmt: skip
        data = ", ".join(f"{k} {v}" for k, v in self.data.items())
        lines = [
            "study plan",
            f"  base: {self.base.source} (frozen; {kw['num_layers']} layers, width {kw['dim']}, "
            f"window C = {s.context} frames, text vocabulary {kw['text_card']}) on "
            f"{self.base.device}",
            f"  data: {data}; {as_}; sequences of {s.frames} frames; up to {s.eval_files} "
            f"held-out and {s.val_files} validation sequences",
            f"  rows: {', '.join(self.rows)}",
            "  meta-training: " + (f"{s.retrofit_steps} steps of {s.batch_size} x {s.frames} "
                                   "frames (the end-to-end memory, base frozen)" if meta
                                   else "none (--meta-steps 0)"),
        ]  # fmt: skip
        secs = self.seconds()
        if secs is not None:
            lines.append(f"  estimate: about {_duration(secs)} here (a rough model from the base's "
                         f"forward, {self.ms_per_frame:.3g} ms per frame measured now; "
                         "within 2x)")  # fmt: skip
        mem = [f"base weights {_gib(self.base_bytes())}"]
        if self.meta_bytes is not None:
            mem.append(f"meta-training {_gib(self.meta_bytes)} (moshi-ttt plan, one device)")
        lines.append("  memory: " + ", ".join(mem))
        return "\n".join(lines)

    def base_bytes(self) -> int:
        """The base's parameters in its dtype (an estimate from the architecture)."""
        kw = self.lm_kwargs
        dim, layers = int(kw["dim"]), int(kw["num_layers"])
        ffn = int(kw.get("dim_feedforward", 4 * dim))
        per_layer = 4 * dim * dim + 3 * dim * ffn
        dep = int(kw.get("depformer_num_layers", 0)) * 12 * int(kw.get("depformer_dim", 0)) ** 2
        n = layers * per_layer + dep + 2 * int(kw["text_card"]) * dim
        size = 4 if self.base.device == "cpu" or self.base.model.get("dtype") == "float32" else 2
        return n * size


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def _key(what: Any) -> str:
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _base_identity(base: FrozenBase) -> dict[str, Any]:
    """What names the base for the caches: its source, and for a folder its files' sizes and
    modification times (a retrained base is another base)."""
    out: dict[str, Any] = {"model": base.model, "seed": base.seed}
    path = base.model.get("path")
    if path and Path(path).is_dir():
        out["files"] = sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                              for p in Path(path).rglob("*") if p.is_file())  # fmt: skip
    return out


class _State:
    """``OUT/study.json``: per cached stage, the key of what made it and its result."""

    def __init__(self, out: Path) -> None:
        self.path = out / STATE
        self.data: dict[str, Any] = {}
        if self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text())
            except ValueError:
                self.data = {}  # unreadable: every stage is redone

    def get(self, stage: str, key: str) -> Any:
        got = self.data.get(stage)
        return got["value"] if got and got.get("key") == key else None

    def put(self, stage: str, key: str, value: Any) -> None:
        self.data[stage] = {"key": key, "value": value}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)

    def drop(self, *stages: str) -> None:
        for stage in stages:
            self.data.pop(stage, None)


def run_study(base: FrozenBase, data: str | Path, out: str | Path, *,
              val: str | Path | None = None, test: str | Path | None = None,
              rows: str = "essential", meta_steps: int | None = None, frames: int | None = None,
              batch_size: int | None = None, seed: int = 0, quick: bool = False,
              progress: bool = True, dry_run: bool = False,
              argv: Sequence[str] = ()) -> dict[str, Any] | StudyPlan:  # fmt: skip
    """Run a study (module docstring); returns ``results.json`` (``dry_run``: the plan only;
    None on a rank other than 0 under torchrun). ``argv``: the command's arguments, recorded
    as the command that recomputes a row."""
    rank, world = launch_rank()
    threads = torch.get_num_threads()
    if base.device == "cpu":
        torch.set_num_threads(1)  # deterministic, as the demo
    handoff = _Handoff(Path(out)) if world > 1 and not dry_run else None
    try:
        with no_compile():
            if rank > 0:
                return None if dry_run else _follow(base, Path(out), rank, argv)
            return _study(base, Path(data), Path(out), val, test, rows, meta_steps, frames,
                          batch_size, seed, quick, progress, dry_run, argv, handoff)  # fmt: skip
    except Exception as e:
        if handoff is not None and rank == 0 and not handoff.told:
            handoff.tell(error=" ".join(str(e).split()) or type(e).__name__)
        raise
    finally:
        torch.set_num_threads(threads)


def _study(base: FrozenBase, data: Path, out: Path, val: Any, test: Any, rows_arg: str,
           meta_steps: int | None, frames: int | None, batch_size: int | None, seed: int,
           quick: bool, progress: bool, dry_run: bool, argv: Sequence[str],
           handoff: _Handoff | None) -> dict[str, Any] | StudyPlan:  # fmt: skip
    say = print  # stage lines are the study's log: --no-progress hides only the bars
    t0 = time.perf_counter()
    if (val is None) != (test is None):
        raise ValueError("--val and --test go together (both folders, or neither: --data is "
                         "then split by a hash of each file's path)")  # fmt: skip
    if val is not None:
        for option, folder in (("--val", val), ("--test", test)):
            if Path(folder).resolve() == data.resolve() or (
                option == "--test" and Path(folder).resolve() == Path(val).resolve()
            ):
                raise ValueError(f"{option} {folder}: the same folder as --data"
                                 + (" or --val" if option == "--test" else "")
                                 + "; held-out and validation files must be others than the "
                                 "training files")  # fmt: skip
    kw = base.lm_kwargs()
    large = int(kw["dim"]) > 1024  # Moshi 7B: one sequence a step, layers recomputed
    if large and "gradient_checkpointing" not in base.model:
        base = dataclasses.replace(base, model={**base.model, "gradient_checkpointing": True})
    batch_size = batch_size or (1 if large else None)
    steps = (QUICK if quick else DEFAULT).retrofit_steps if meta_steps is None else meta_steps
    s = study_settings(kw, quick, frames, steps, batch_size)
    rows = study_rows(rows_arg, steps)
    is_index = data.suffix == ".jsonl"
    is_shards = _is_shards(data) or is_index
    text_as = "shards" if is_shards else ("bytes" if base.bytes_are_text else "tokens")
    for option, folder in (("--val", val), ("--test", test)):
        if folder is not None and (Path(folder).suffix == ".jsonl") != is_index:
            raise ValueError(f"{option} {folder}: --data, --val and --test must be of one kind "
                             "(all moshi-finetune JSONL indexes, or all folders)")  # fmt: skip
    if text_as != "bytes":
        what = "moshi-ttt shards" if is_shards else "read through the model's tokenizer"
        why = f"the needles are planted as bytes; this corpus is {what}"
        s = dataclasses.replace(s, needles_why_not=why)
    folders = {"all": str(data)} if val is None else {"train": str(data), "val": str(val),
                                                      "test": str(test)}  # fmt: skip
    plan = StudyPlan(base, kw, s, rows, text_as, folders)
    if any(r in rows for r in META_ROWS):
        plan.meta_bytes = make_plan(train_config(
            s, "e2e_meta", out / "data" / "train", out, seed, (int(kw["text_card"]),
            int(kw["card"])), e2e={"hidden": max(s.e2e_hiddens), "lr": 0.1, "chunk": 1},
            base=base)).memory(1)["total"]  # fmt: skip
    if dry_run:
        print(plan.text())
        return plan
    out.mkdir(parents=True, exist_ok=True)
    state = _State(out)
    n_steps = 6 if any(r in rows for r in META_ROWS) else 5

    # 1. The base, loaded once here: it fails early, and its forward times the estimate.
    say(f"[1/{n_steps}] loading the base {base.source}")
    lm = base.load()
    plan.ms_per_frame = _ms_per_frame(lm, s)
    print(plan.text())
    del lm

    # 2. Corpus (cached); a moshi-finetune index is tokenized first with the base's Mimi and
    #    text tokenizer (moshi-ttt tokenize), once.
    given = dict(folders)  # as the user named them (errors name these)
    if is_index:
        folders = {k: str(_tokenized(Path(v), k, out, base, state, progress))
                   for k, v in folders.items()}  # fmt: skip
    spec = CorpusSpec(frames=s.frames, max_files=s.max_files, max_bytes=s.max_bytes)
    corpus_key = _key({"folders": {k: str(Path(v).resolve()) for k, v in folders.items()},
                       "spec": dataclasses.asdict(spec), "text_as": text_as,
                       "base": _base_identity(base)})  # fmt: skip
    cached = state.get("corpus", corpus_key)
    if cached is not None and all((out / "data" / x / "shards.json").is_file() for x in SPLITS):
        corpus = CorpusSummary(**{**cached, "skipped": Counter(cached["skipped"])})
        say(f"[2/{n_steps}] corpus: cached in {out / 'data'}")
    else:
        state.drop("corpus", "e2e_choice")
        say(f"[2/{n_steps}] corpus: {', '.join(folders.values())}")
        corpus = _read(folders, spec, out / "data", text_as, base, progress)
        state.put("corpus", corpus_key, corpus.to_dict())
    say("      " + corpus.text())
    _check_vocab(out / "data", kw, text_as)
    val_seqs = split_sequences(out / "data" / "val", s.val_files)
    s = dataclasses.replace(s, metric=headline_metric(val_seqs))  # moshi's loss with audio
    for split, least, seqs in (
        ("val", MIN_UNITS, val_seqs),
        ("test", MIN_UNITS, split_sequences(out / "data" / "test", s.eval_files)),
    ):
        n = sequence_counts(seqs, split)[f"{split}_files"]
        if n < least:
            option = "--data" if "all" in folders else f"--{split}"
            raise DataError(
                f"{option} {given.get(split, given.get('all'))}: the "
                f"{'validation' if split == 'val' else 'held-out'} split has {count_text(seqs)}; "
                f"a study needs {least} files or more there (an interval over files needs "
                f"{MIN_UNITS}): give "
                f"{option} more files" + (" (about 10 % of --data's files land in each of "
                "validation and held-out)" if "all" in folders else "")
            )  # fmt: skip

    # 3. The memory's zero-training setting, on validation (cached).
    extra: dict[str, Any] = {}
    runs: dict[str, Path] = {}
    train_seconds: dict[str, float] = {"base": 0.0}
    if any(r in rows for r in ("e2e", "e2e_assoc", *META_ROWS)):
        choice_key = _key({"corpus": corpus_key, "base": _base_identity(base), "seed": seed,
                           "grid": [s.e2e_layers, s.e2e_hiddens, s.e2e_lrs, s.e2e_chunks],
                           "val": s.val_files, "metric": s.metric})  # fmt: skip
        extra["e2e"] = state.get("e2e_choice", choice_key)
        if extra["e2e"] is None:
            say(f"[3/{n_steps}] choosing the memory's width, inner lr and K on validation")
            extra["e2e"] = choose_e2e(base, s, val_seqs, seed, progress)
            state.put("e2e_choice", choice_key, extra["e2e"])
        else:
            say(f"[3/{n_steps}] the memory's setting: cached ({extra['e2e']['label']})")

    # 4. Meta-training (resumed from its last checkpoint when interrupted).
    k = 3
    if any(r in rows for r in META_ROWS):
        k = 4
        cfg = train_config(s, "e2e_meta", out / "data" / "train", out, seed,
                           (int(kw["text_card"]), int(kw["card"])),
                           e2e=extra["e2e"]["chosen"], base=base)  # fmt: skip
        cfg = type(cfg).from_dict({**cfg.to_dict(), "ckpt_every": max(1, cfg.max_steps // 4),
                                   "keep_last": 2})  # fmt: skip
        (out / "configs").mkdir(parents=True, exist_ok=True)
        cfg.to_yaml(out / "configs" / "e2e_meta.yaml")
        run = Path(cfg.run_dir)
        done = [int(p.name.rsplit("_", 1)[1]) for p in list_checkpoints(run / "checkpoints")]
        meta_key = _key({"choice": extra["e2e"], "config": cfg.to_dict(),
                         "base": _base_identity(base)})  # fmt: skip
        finished = state.get("e2e_meta", meta_key)
        # ours: this study trained it, or started it and it was finished elsewhere (torchrun
        # on OUT/configs/e2e_meta.yaml, docs/demo.md)
        ours = finished is not None or state.get("e2e_meta_started", meta_key) is not None
        if ours and done and max(done) >= cfg.max_steps:
            say(f"[{k}/{n_steps}] meta-training: cached ({run})")
            train_seconds["e2e_meta"] = (finished or {}).get("seconds", math.nan)
        else:
            if state.get("e2e_meta_started", meta_key) is None:
                done = []  # a run of other settings: started again
            state.put("e2e_meta_started", meta_key, True)
            say(f"[{k}/{n_steps}] meta-training the memory: {cfg.max_steps} steps of "
                f"{cfg.batch_size} x {cfg.frames_per_window} frames"
                + (f" (resuming at step {max(done)})" if done else ""))  # fmt: skip
            start = time.perf_counter()
            if handoff is not None:  # the other ranks join this run
                handoff.tell(config=str(out / "configs" / "e2e_meta.yaml"), resume=bool(done),
                             overwrite=not done)  # fmt: skip
            train(cfg, progress=progress, device=base.device, resume=bool(done),
                  overwrite=not done, command=shlex.join([cli_prefix(), *argv]))  # fmt: skip
            train_seconds["e2e_meta"] = time.perf_counter() - start
            state.put("e2e_meta", meta_key, {"seconds": train_seconds["e2e_meta"]})
        runs["e2e_meta"] = run

    # 5. Evaluation and report (rank 0 alone under torchrun).
    if handoff is not None and not handoff.told:
        handoff.tell(config=None)  # nothing to train: the other ranks are done
    timings = {"training (s)": sum(train_seconds.values())}
    root = given.get("all") or given["train"]
    corpus.root = root
    labels = {"bytes": "bytes as text tokens", "tokens": "text tokens of the model's tokenizer",
              "shards": "moshi-ttt shards: text and audio tokens"}  # fmt: skip
    study = {"base": base.source, "layers": int(kw["num_layers"]), "width": int(kw["dim"]),
             "text_as": text_as, "text_as_label": labels[text_as],
             "split": "hash" if "all" in folders else "folders", "folders": folders,
             "meta_steps": s.retrofit_steps if runs else 0,
             "estimate_s": plan.seconds(),
             "command": shlex.join([cli_prefix(), *argv])}  # fmt: skip
    return evaluate_and_report(out, rows, s, base, runs, train_seconds, val_seqs,
                               out / "data" / "test", corpus, seed, extra, timings, t0,
                               progress, lambda names: _row_command(argv, names),
                               int(kw["dim"]), quick, (k, n_steps), study)  # fmt: skip


def _row_command(argv: Sequence[str], names: tuple[str, ...]) -> str:
    """The study command that recomputes ``names`` (with the base): ``argv`` with its
    ``--rows`` replaced (``--quick`` and every other option kept)."""
    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--rows":
            skip = True
            continue
        if a.startswith("--rows=") or a in ("--force", "--no-progress"):
            continue
        args.append(a)
    return shlex.join([cli_prefix(), *args, "--rows", ",".join(names), "--no-progress"])


def _tokenized(index: Path, name: str, out: Path, base: FrozenBase, state: _State,
               progress: bool) -> Path:  # fmt: skip
    """The shards of a moshi-finetune JSONL ``index`` (``OUT/tokenized/NAME``), made once per
    index and base (``data.pipeline.tokenize_index``: bad files skipped and listed)."""
    target = out / "tokenized" / name
    st = index.stat()
    key = _key({"index": str(index.resolve()), "size": st.st_size, "mtime": st.st_mtime_ns,
                "base": _base_identity(base)})  # fmt: skip
    if state.get(f"tokenized_{name}", key) is not None and (target / SHARDS_INDEX).is_file():
        print(f"      {index}: tokenized already ({target})")
        return target
    print(f"      tokenizing {index} with the base's Mimi and text tokenizer into {target}")
    mimi, tokenizer = codec_for_source(base.source, device=base.device,
                                       overrides=base.spec().overrides)  # fmt: skip
    if tokenizer is None:
        raise DataError(f"--base {base.source}: no text tokenizer in the checkpoint to tokenize "
                        f"{index} with; tokenize it with moshi-ttt tokenize and pass the "
                        "shards folder")  # fmt: skip
    stats = tokenize_index(index, target, mimi, tokenizer, progress=progress,
                           device=base.device)  # fmt: skip
    print(f"      {stats.summary()}")
    state.put(f"tokenized_{name}", key, True)
    return target


def _is_shards(data: Path) -> bool:
    return (data / SHARDS_INDEX).is_file() or data.name == SHARDS_INDEX


def _read(folders: dict[str, str], spec: CorpusSpec, out: Path, text_as: str, base: FrozenBase,
          progress: bool) -> CorpusSummary:  # fmt: skip
    """Read ``--data`` (split by hash) or the three folders into ``out/{train,val,test}``."""
    encode = {}
    if text_as == "tokens":  # the checkpoint's tokenizer alone (its Mimi is not needed)
        info = base.describe().info
        tokenizer = (info.get_text_tokenizer()
                     if info is not None and Path(info.tokenizer).is_file() else None)  # fmt: skip
        if tokenizer is None:
            raise DataError(f"--base {base.source}: no text tokenizer in the checkpoint to read "
                            "--data's text with; give --data moshi-ttt shards "
                            "(moshi-ttt tokenize) instead")  # fmt: skip
        encode = {"encode": tokenizer_codes(tokenizer)}
    if "all" in folders:
        return read_corpus(folders["all"], spec, out, progress, **encode)
    found = {}
    for split, option in (("train", "--data"), ("val", "--val"), ("test", "--test")):
        if _is_shards(Path(folders[split])) != _is_shards(Path(folders["train"])):
            raise DataError(f"{option} {folders[split]}: --data, --val and --test must be of one "
                            "kind (all text folders or all shards)")  # fmt: skip
        found[split] = read_corpus(folders[split], spec, out, progress, split=split,
                                   option=option, **encode)  # fmt: skip
    summary = found["train"]
    for split in ("val", "test"):
        summary.files[split] = found[split].files[split]
        summary.sequences[split] = found[split].sequences[split]
        summary.skipped.update(found[split].skipped)
    return summary


def _check_vocab(data: Path, lm_kwargs: dict[str, Any], text_as: str) -> None:
    """Every token of the corpus must be one the base knows."""
    text_card, card = int(lm_kwargs["text_card"]), int(lm_kwargs["card"])
    if text_as == "bytes" and text_card < TEXT_CARD:
        raise DataError(f"the base's text vocabulary has {text_card} tokens; text read as bytes "
                        f"needs {TEXT_CARD} (the demo's tiny base); give a base trained on bytes "
                        "or moshi-ttt shards of this model's tokens")  # fmt: skip
    for split in SPLITS:
        src = ShardSource(data / split)
        for i in range(len(src)):
            codes = src.codes(i)
            text_max, audio_max = int(codes[0].max()), int(codes[1:].max())
            if text_max >= text_card or audio_max >= card:
                raise DataError(
                    f"{src.name(i)}: token ids up to {text_max} (text) and {audio_max} (audio); "
                    f"the base knows {text_card} text and {card} audio tokens: these shards "
                    "were made for another model (moshi-ttt tokenize with this --base)"
                )


def _ms_per_frame(lm: torch.nn.Module, s: RealDataSettings) -> float:
    """The base's streamed evaluation of one sequence (as every row runs it), ms per frame."""
    codes = torch.full((NUM_STREAMS, s.frames), ZERO_TOKEN, dtype=torch.int32)
    codes[0] = torch.arange(s.frames) % 64 + TOKEN_OFFSET
    kw = {"controls": (), "chunk_frames": s.chunk_frames, "bin_frames": s.bin_frames,
          "progress": False, "equal_lengths": ()}  # fmt: skip
    evaluate_long_context(lm, [("warm-up", codes[:, : s.chunk_frames])], **kw)
    start = time.perf_counter()
    evaluate_long_context(lm, [("timing", codes)], **kw)
    return 1000 * (time.perf_counter() - start) / s.frames
