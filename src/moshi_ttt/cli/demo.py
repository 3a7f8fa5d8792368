"""``moshi-ttt demo``: a thin shell over ``moshi_ttt.demo``: the real-data benchmark
(``realdata.run_realdata``, the default, on ``--data`` or this interpreter's standard library)
or the Markov mechanism check (``--task markov``, ``markov.run_demo``).

The demo deletes and rewrites its own subfolders of ``--out``; a ``--out`` holding anything
else (not empty and not a previous demo output) is refused unless ``--force``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..outputs import check_own_dir

DEMO_MARKERS = ("results.json", "report.json", "report.md")  # a previous demo output
DEMO_ENTRIES = {"runs", "data", "configs", "base", "eval", "cache", *DEMO_MARKERS}


def add_demo_parser(subparsers: Any) -> None:
    """Register ``demo`` on an ``add_subparsers()`` object."""
    demo = subparsers.add_parser(
        "demo",
        help="does a memory help? the real-data benchmark (or --task markov) on a tiny model",
    )
    demo.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    demo.add_argument("--task", choices=["realdata", "markov"], default="realdata",
                      help="realdata (default): real text or token shards, every row a user "
                      "would compare; markov: the synthetic mechanism check")  # fmt: skip
    demo.add_argument("--data", default=None,
                      help="realdata: a directory of text files (read recursively, bytes as text "
                      "tokens) or a moshi-ttt shards directory; default: the standard library "
                      "of this Python")  # fmt: skip
    demo.add_argument("--rows", default="essential",
                      help="realdata: 'essential' (base, dyneval, retrofit and its controls), "
                      "'all' (every alternative) or a comma list of rows")  # fmt: skip
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quick", action="store_true", help="a tiny version (tests, a minute)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.add_argument("--stream", choices=["text", "audio"], default="text",
                      help="markov: where the task's symbols live: text tokens (default) or "
                      "Moshi's audio codebook 0 (scored by audio CE)")  # fmt: skip
    demo.add_argument("--force", action="store_true",
                      help="use an --out that holds other things than a previous demo output "
                      "(its runs/data/configs/base/eval folders are replaced)")  # fmt: skip
    demo.set_defaults(func=_demo)


def check_demo_out(out: str | Path, force: bool) -> Path:
    """``--out`` must be writable and new, empty, or a previous demo output (unless ``force``)."""
    return check_own_dir(out, "--out", DEMO_MARKERS, DEMO_ENTRIES, force, "demo output",
                         "the demo replaces its runs/, data/, configs/, base/ and eval/ folders "
                         "there: ")  # fmt: skip


def _demo(args: argparse.Namespace) -> None:
    from ..demo.markov import run_demo
    from ..demo.realdata import parse_rows, run_realdata

    if args.task == "markov":
        if args.data is not None or args.rows != "essential":
            raise ValueError("--data and --rows are for the real-data benchmark, not --task markov")
        check_demo_out(args.out, args.force)
        run_demo(out_dir=args.out, seed=args.seed, quick=args.quick,
                 progress=not args.no_progress, stream=args.stream)  # fmt: skip
        return
    if args.stream != "text":
        raise ValueError("--stream is for --task markov; real data chooses its own streams")
    parse_rows(args.rows)  # a bad --rows is refused before any work
    check_demo_out(args.out, args.force)
    run_realdata(out_dir=args.out, data=args.data, seed=args.seed, rows=args.rows,
                 quick=args.quick, progress=not args.no_progress)  # fmt: skip
