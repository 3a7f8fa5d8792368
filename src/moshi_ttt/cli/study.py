"""``moshi-ttt study``: the demo's memory comparison on your base and your data
(``moshi_ttt.demo.study``)::

    moshi-ttt study --base kyutai/moshiko-pytorch-bf16 --data my_shards/ --meta-steps 200
    moshi-ttt study --base demo_out/base --data my_texts/ --quick
    torchrun --standalone --nproc-per-node 8 -m moshi_ttt.cli study --base ... --data ...

The study writes its own files in ``--out`` and keeps its finished stages there (a rerun of the
same command resumes); a ``--out`` holding anything else is refused unless ``--force``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..models.spec import DTYPES, resolve_device
from ..outputs import check_own_dir
from ..train.parallel import launch_rank

STUDY_ENTRIES = {"study.json", "data", "runs", "configs", "results.json", "report.md", "figures",
                 "eval", "ranks.json"}  # fmt: skip


def add_study_parser(subparsers: Any) -> None:
    """Register ``study`` on an ``add_subparsers()`` object."""
    p = subparsers.add_parser(
        "study",
        help="does the memory help YOUR model on YOUR data? the demo's comparison on a base "
        "and a data folder you give",
        description="Every row of the demo (base, dynamic evaluation, the shipped end-to-end "
        "memory zero-training / meta-trained / static control, the recall memories) on a "
        "frozen base you give, its settings chosen on a validation split, scored on held-out "
        "files with 95 %% intervals; writes OUT/results.json and OUT/report.md. Finished "
        "stages are kept in OUT: the same command resumes.",
    )
    p.add_argument("--base", required=True, metavar="SOURCE",
                   help="the frozen base: a Hugging Face repo id, a checkpoint directory with "
                   "config.json, a `moshi-ttt export` directory, a training run (or one of its "
                   "checkpoints), or tiny")  # fmt: skip
    p.add_argument("--data", metavar="DIR",
                   help="a folder of text files (read recursively), moshi-ttt shards "
                   "(audio and text) or a moshi-finetune JSONL index (tokenized once with the "
                   "base's Mimi and tokenizer); split into train/val/test by a hash "
                   "of each file's path unless --val and --test are given (default: this "
                   "Python's standard library, as the demo)")  # fmt: skip
    p.add_argument(
        "--val", metavar="DIR", help="validation folder or index (every choice is made on it)"
    )
    p.add_argument("--test", metavar="DIR", help="held-out folder or index (only scored)")
    p.add_argument("--out", default="study_out", help="output directory (default: study_out)")
    p.add_argument(
        "--rows",
        default="essential",
        help="'essential' (default), 'all' (also window extension) or a comma list",
    )
    p.add_argument("--meta-steps", type=int, default=None, metavar="N",
                   help="meta-train the memory N steps on the frozen base (default: the demo's "
                   "150, --quick 3; 0: no meta-trained rows)")  # fmt: skip
    p.add_argument(
        "--frames",
        type=int,
        default=None,
        help="frames per sequence (default 8x the base's window, --quick 4x)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="meta-training batch (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="the base's dtype; auto: bfloat16 on GPU, float32 on CPU")  # fmt: skip
    p.add_argument("--quick", action="store_true",
                   help="a small version (a few minutes on a tiny base): marked quick in every "
                   "output")  # fmt: skip
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (what the study will do, memory) and stop",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars (stage lines and the result are still printed)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="use an --out that holds other things than a previous study",
    )
    p.set_defaults(func=_study)


def check_study_out(out: str | Path, force: bool) -> Path:
    """``--out``: new, empty, or a previous study's (unless ``force``)."""
    return check_own_dir(out, "--out", ("study.json",), STUDY_ENTRIES, force, "study")


def _study(args: argparse.Namespace) -> None:
    from ..demo.corpus import default_corpus
    from ..demo.frozen import base_from_arg
    from ..demo.study import run_study, study_rows

    for name in ("meta_steps", "frames", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "meta_steps" else 1):
            raise ValueError(f"--{name.replace('_', '-')} {value}: expected a number >= "
                             f"{0 if name == 'meta_steps' else 1}")  # fmt: skip
    study_rows(args.rows, 1 if args.meta_steps is None else args.meta_steps)  # bad --rows: now
    data = Path(args.data) if args.data is not None else default_corpus()
    if not data.exists():
        raise ValueError(f"--data {data}: no such file or directory; expected a folder of text "
                         "files or moshi-ttt shards")  # fmt: skip
    if launch_rank()[0] == 0:  # under torchrun, rank 0 alone owns --out
        check_study_out(args.out, args.force)
    device = str(resolve_device(args.device))
    base = base_from_arg(args.base, device, args.dtype)
    argv = [a for a in args.argv if a != "--debug"]
    run_study(base, data, args.out, val=args.val, test=args.test, rows=args.rows,
              meta_steps=args.meta_steps, frames=args.frames, batch_size=args.batch_size,
              seed=args.seed, quick=args.quick, progress=not args.no_progress,
              dry_run=args.dry_run, argv=argv)  # fmt: skip
