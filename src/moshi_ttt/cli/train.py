"""``moshi-ttt train`` and ``moshi-ttt tokenize``: thin shells over ``moshi_ttt.train``.

moshi-ttt train configs/tiny.yaml --set max_steps=20 --set lr=3e-4
torchrun --nproc-per-node 8 -m moshi_ttt.cli train configs/moshi7b_dailytalk.yaml
moshi-ttt train configs/tiny.yaml --resume
moshi-ttt train configs/tiny.yaml --resume-from runs/tiny/checkpoints/step_000020
moshi-ttt tokenize data/train.jsonl data/shards --base kyutai/moshiko-pytorch-bf16
"""

from __future__ import annotations

import argparse
from typing import Any

from ..data.files import BAD_FILES
from ..outputs import check_no_clobber
from .common import print_bad_files, resolve_device


def add_train_parsers(subparsers: Any) -> None:
    """Register ``train`` and ``tokenize`` on an ``add_subparsers()`` object."""
    p = subparsers.add_parser(
        "train",
        help="fine-tune Moshi with TTT layers (alone or under torchrun)",
        description="Train as CONFIG says (YAML, validated before any work). Writes RUN_DIR/"
        "config.yaml, metrics.jsonl, train.log, tensorboard/ and checkpoints/step_XXXXXX/.",
    )
    p.add_argument("config", metavar="CONFIG.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable), e.g. --set lr=3e-5")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument("--resume-from", metavar="CHECKPOINT",
                   help="continue from this checkpoints/step_* directory (e.g. the one before "
                   "a corrupt newest checkpoint)")  # fmt: skip
    p.add_argument("--allow-inexact-resume", action="store_true",
                   help="resume although settings that change the data order or the results "
                   "differ from the checkpoint's (the resumed run is then not exact)")  # fmt: skip
    p.add_argument("--force", action="store_true",
                   help="start afresh in a run_dir that holds a previous run (its checkpoints, "
                   "metrics, logs and TensorBoard files are deleted)")  # fmt: skip
    p.add_argument("--requeue", action="store_true",
                   help="for a requeued job (scripts/slurm_train.sh): continue from the newest "
                   "checkpoint if run_dir has one, else start afresh (replacing the files of "
                   "an attempt that wrote no checkpoint)")  # fmt: skip
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (parameters, memory per GPU, FSDP units, tokens per "
                   "step; meta device, no weights read) and exit (= moshi-ttt plan)")  # fmt: skip
    p.add_argument("--gpus", default="1,8,16", metavar="N,N,...",
                   help="with --dry-run: GPU counts to plan for (default 1,8,16)")  # fmt: skip
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train)

    pl = subparsers.add_parser(
        "plan",
        help="a training run's size before any load: parameters, GPU memory, FSDP units",
        description="Build CONFIG's model on the meta device (no weights read, no download) "
        "and print parameters per group, bytes per GPU for N GPUs (frozen base, fp32 "
        "trainables, gradients, AdamW states, FSDP working set, activations), the FSDP units "
        "and tokens per optimizer step. Same as `moshi-ttt train CONFIG --dry-run`.",
    )
    pl.add_argument("config", metavar="CONFIG.yaml")
    pl.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key (repeatable)")  # fmt: skip
    pl.add_argument("--gpus", default="1,8,16", metavar="N,N,...",
                    help="GPU counts to plan for (default 1,8,16)")  # fmt: skip
    pl.add_argument("--out", metavar="FILE.md", help="also write the plan to FILE.md")
    pl.set_defaults(func=run_plan)

    t = subparsers.add_parser(
        "tokenize",
        help="encode a JSONL index once into shards of codes [17, T]",
        description="Mimi + the text tokenizer of the model, once per file: OUT_DIR/"
        "NNNNNN.safetensors and OUT_DIR/shards.json. Bad files are skipped and listed.",
    )
    t.add_argument("index", metavar="INDEX.jsonl")
    t.add_argument("out_dir", metavar="OUT_DIR")
    model = t.add_mutually_exclusive_group(required=True)
    model.add_argument(
        "--base", metavar="REPO_OR_DIR", help="the model (or run) whose Mimi/tokenizer to use"
    )
    model.add_argument("--tiny", action="store_true", help="the tiny model's Mimi and tokenizer")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda")
    t.add_argument("--main-speaker", default="SPEAKER_MAIN", help="alignment label of Moshi")
    t.add_argument("--no-alignments-ok", action="store_true",
                   help="use files without .json alignments (text stream -1)")  # fmt: skip
    t.add_argument("--max-bad-fraction", type=float, default=None,
                   help="fail (after writing) if more than this fraction is bad")  # fmt: skip
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--force", action="store_true",
                   help="write into an OUT_DIR holding shards (they are replaced)")  # fmt: skip
    t.set_defaults(func=run_tokenize)

    toy = subparsers.add_parser(
        "toy-data",
        help="write a small toy dataset in the moshi-finetune format (for configs/tiny.yaml)",
        description="OUT_DIR/index.jsonl (train) and OUT_DIR/eval.jsonl: stereo 24 kHz wavs "
        "with word alignments, plus one corrupt file to show bad-file accounting.",
    )
    toy.add_argument("out_dir", metavar="OUT_DIR")
    toy.add_argument("--files", type=int, default=8, help="training files (default 8)")
    toy.add_argument("--seconds", type=float, default=7.68, help="seconds per file")
    toy.add_argument("--force", action="store_true",
                     help="replace a toy dataset already in OUT_DIR (index.jsonl, eval.jsonl, "
                     "its wavs)")  # fmt: skip
    toy.set_defaults(func=run_toy_data)


def run_train(args: argparse.Namespace) -> None:
    from ..train.config import TrainConfig
    from ..train.trainer import train

    if args.resume and args.resume_from:
        raise ValueError("--resume and --resume-from: give one (--resume = the newest checkpoint)")
    if args.force and (args.resume or args.resume_from):
        raise ValueError("--force starts afresh: it cannot be combined with --resume")
    if args.requeue and (args.resume or args.resume_from or args.force):
        raise ValueError("--requeue chooses between resuming and starting afresh by itself: "
                         "give it alone")  # fmt: skip
    if args.dry_run:
        run_plan(argparse.Namespace(config=args.config, overrides=args.overrides,
                                    gpus=args.gpus, out=None))  # fmt: skip
        return
    cfg = TrainConfig.load(args.config, args.overrides)
    resume = args.resume_from or args.resume
    result = train(cfg, resume=resume, progress=not args.no_progress, device=args.device,
                   allow_inexact_resume=args.allow_inexact_resume,
                   overwrite=args.force, requeue=args.requeue,
                   command=continue_command(getattr(args, "argv", None)))  # fmt: skip
    if result.is_main:
        print_bad_files(result.bad_files, result.files_total, result.run_dir / BAD_FILES)
    if result.final_metrics and result.is_main:
        m = result.final_metrics
        print(f"done: {result.steps} steps, loss {m['loss']:.4f} (text {m['text_loss']:.4f}, "
              f"audio {m['audio_loss']:.4f}); checkpoint {result.last_checkpoint}")  # fmt: skip


def continue_command(argv: list[str] | None) -> str | None:
    """The command line that continues a run started with ``argv`` (``train CONFIG ...``):
    the same, without ``--resume``, ``--resume-from``, ``--force`` and ``--requeue`` (the
    trainer adds ``--resume`` when there is a checkpoint). Under torchrun, its launcher
    options are not known: "torchrun ... -m moshi_ttt.cli train ...". None without argv."""
    import os
    import shlex

    if not argv:
        return None
    drop, kept, skip = ("--resume", "--force", "--requeue"), [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--resume-from":
            skip = True
        elif arg not in drop and not arg.startswith("--resume-from="):
            kept.append(arg)
    many = int(os.environ.get("WORLD_SIZE", "1")) > 1
    prog = "torchrun <the same launcher options> -m moshi_ttt.cli" if many else "moshi-ttt"
    return f"{prog} {shlex.join(kept)}"


def run_plan(args: argparse.Namespace) -> None:
    from pathlib import Path

    from ..train.config import TrainConfig
    from ..train.plan import make_plan

    try:
        gpus = [int(n) for n in str(args.gpus).split(",")]
    except ValueError:
        gpus = []
    if not gpus or min(gpus) < 1:
        raise ValueError(f"--gpus: expected GPU counts such as 1,8,16, got {args.gpus!r}")
    cfg = TrainConfig.load(args.config, args.overrides)
    text = make_plan(cfg).report(gpus)
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)


def run_tokenize(args: argparse.Namespace) -> None:
    from ..data.files import read_index
    from ..data.pipeline import SHARDS_INDEX, tokenize_index
    from ..models.load import codec_for_source

    if args.max_bad_fraction is not None and not 0 <= args.max_bad_fraction <= 1:
        raise ValueError(f"--max-bad-fraction must be in [0, 1], got {args.max_bad_fraction}")
    read_index(args.index)  # a missing or malformed index: before loading Mimi
    check_no_clobber(args.out_dir, "OUT_DIR", (SHARDS_INDEX, BAD_FILES), args.force,
                     what="tokenized dataset")  # fmt: skip
    device = resolve_device(args.device)
    if args.tiny:  # the tiny model's sizes and seed only
        mimi, tokenizer = codec_for_source("tiny:0", device=device)
    else:  # only Mimi and the tokenizer: the LM weights are not read
        mimi, tokenizer = codec_for_source(args.base, device=device)
        if tokenizer is None:
            raise FileNotFoundError(f"--base {args.base}: has no text tokenizer file")
    stats = tokenize_index(
        args.index, args.out_dir, mimi, tokenizer,
        max_bad_fraction=args.max_bad_fraction, progress=not args.no_progress,
        require_alignments=not args.no_alignments_ok, main_speaker=args.main_speaker,
        device=device,
    )  # fmt: skip
    print(f"wrote {stats.num_seen - stats.num_bad} shards to {args.out_dir}; {stats.summary()}")
    print_bad_files(stats.files, stats.num_seen, f"{args.out_dir}/{SHARDS_INDEX}")


def run_toy_data(args: argparse.Namespace) -> None:
    from ..data.toy import write_toy_dataset

    if args.files < 1 or not args.seconds > 0:
        raise ValueError("--files must be >= 1 and --seconds > 0")
    check_no_clobber(args.out_dir, "OUT_DIR", ("index.jsonl", "eval.jsonl"), args.force,
                     what="dataset")  # fmt: skip
    train = write_toy_dataset(args.out_dir, [args.seconds] * args.files, bad={"broken": "corrupt"})
    evals = write_toy_dataset(args.out_dir, [args.seconds] * 2, index_name="eval.jsonl", seed=100)
    print(f"wrote {train} ({args.files} files + 1 corrupt) and {evals} (2 files)")
