"""``moshi-ttt``: the parser and the one error boundary.

Every expected failure (a missing or unwritable path, a bad config key, unusable data, a corrupt
safetensors or JSON file) is printed as one paragraph ``moshi-ttt CMD: error: ...`` naming the
path or key and what was expected, exit status 2; a run stopped on purpose (non-finite steps,
too many bad files) exits 1; ``--debug`` (before or after the command) shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from ..errors import TrainingStopped
from .demo import add_demo_parser
from .eval import add_eval_parser
from .export import add_export_parser
from .generate import add_generate_parser
from .serve import add_serve_parser
from .study import add_study_parser
from .train import add_train_parsers


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that are a user's to fix (no traceback)."""
    import yaml
    from safetensors import SafetensorError

    return (OSError, ValueError, KeyError, SafetensorError, yaml.YAMLError)


def package_version() -> str:
    """The installed version of the ``moshi-ttt`` package (``importlib.metadata``), else the
    source tree's ``moshi_ttt.__version__``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("moshi-ttt")
    except PackageNotFoundError:
        from .. import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    """The ``moshi-ttt`` parser with every command; ``--debug`` is accepted everywhere."""
    parser = argparse.ArgumentParser(
        prog="moshi-ttt", description="Test-Time-Training layers for Kyutai's Moshi."
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {package_version()}",
        help="print the version of moshi-ttt and exit",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    add_demo_parser(sub)
    add_study_parser(sub)
    add_generate_parser(sub)
    add_eval_parser(sub)
    add_train_parsers(sub)
    add_export_parser(sub)
    add_serve_parser(sub)
    _add_debug_everywhere(parser)
    return parser


def _add_debug_everywhere(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                if "--debug" not in child._option_string_actions:
                    child.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                       help="show full tracebacks on errors")  # fmt: skip
                _add_debug_everywhere(child)


def describe_error(e: BaseException) -> str:
    """One paragraph for an expected failure: the message, or for an ``OSError`` from the
    system its reason and the path(s)."""
    if isinstance(e, KeyError):
        return f"missing key {e.args[0]!r}" if e.args else "missing key"
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        where = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 is not None else "")
        return f"{where}: {e.strerror}"
    text = str(e).strip() or type(e).__name__
    return " ".join(line.strip() for line in text.splitlines())


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the command inside the error boundary; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    func: Callable[[argparse.Namespace], object] = args.func
    name = args.command + (f" {args.eval_command}" if getattr(args, "eval_command", None) else "")
    try:
        func(args)
    except TrainingStopped as e:
        if args.debug:
            raise
        print(f"moshi-ttt {name}: stopped: {describe_error(e)}", file=sys.stderr)
        return 2  # every rank the same: the stop is decided together at a step boundary
    except _user_errors() as e:
        if args.debug:
            raise
        print(f"moshi-ttt {name}: error: {describe_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
