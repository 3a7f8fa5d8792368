"""``moshi-ttt``: the command-line shell. Each subcommand parses arguments and calls the library.

Errors users can fix (bad config, missing file, wrong shape) are printed as one line, exit 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from .cli_eval import add_eval_parser
from .cli_export import add_export_parser
from .cli_generate import add_generate_parser
from .cli_train import add_train_parsers
from .errors import TrainingStopped

USER_ERRORS = (ValueError, FileNotFoundError, KeyError)


def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(out_dir=args.out, seed=args.seed, quick=args.quick, progress=not args.no_progress,
             stream=args.stream)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moshi-ttt", description="Test-Time-Training layers for Kyutai's Moshi."
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the built-in end-to-end demo on a tiny model")
    demo.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quick", action="store_true", help="a tiny version (tests, a minute)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.add_argument("--stream", choices=["text", "audio"], default="text",
                      help="where the task's symbols live: text tokens (default) or Moshi's "
                      "audio codebook 0 (scored by audio CE)")  # fmt: skip
    demo.set_defaults(func=_demo)

    add_generate_parser(sub)
    add_eval_parser(sub)
    add_train_parsers(sub)
    add_export_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(f"moshi-ttt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        if args.debug:
            raise
        print(f"moshi-ttt {args.command}: stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
