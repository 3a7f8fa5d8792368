"""``moshi-ttt eval compare A B`` and ``moshi-ttt eval summary PATH...``.

    moshi-ttt eval compare eval/x/sblimp eval/base/sblimp --out eval/x_vs_base/sblimp
    moshi-ttt eval compare eval/x/lc eval/base/lc --variant-b no_ttt
    moshi-ttt eval summary eval/x eval/base --out eval/summary

``add_compare_parsers(eval_subparsers)`` registers both on ``moshi-ttt eval``.
"""

from __future__ import annotations

import argparse
from typing import Any

from .common import add_force_arg, check_report_dir


def add_compare_parsers(subparsers: Any) -> None:
    """Register ``compare`` and ``summary`` on an ``add_subparsers()`` object."""
    p = subparsers.add_parser(
        "compare",
        help="paired comparison of two reports (difference, 95 %% CI, p-value)",
        description="Paired comparison of two reports of one benchmark (accuracy A - B over "
        "the same pairs: bootstrap over groups, exact McNemar) or two long-context reports "
        "(CE A - B over the same files: bootstrap over files).",
    )
    p.add_argument("a", metavar="REPORT_A", help="report.json or its directory")
    p.add_argument("b", metavar="REPORT_B", help="report.json or its directory")
    p.add_argument("--out", metavar="DIR", help="also write DIR/report.md and report.json")
    add_force_arg(p, "replace a report already in --out")
    p.add_argument("--reduction", choices=["mean", "sum"], help="pairs: default A's headline")
    p.add_argument("--variant-a", help="long context: variant of A (default: its primary)")
    p.add_argument("--variant-b", help="long context: variant of B (default: its primary)")
    p.add_argument("--metric", choices=["audio_ce", "cb0", "cb1_7", "text_ce", "moshi_loss"],
                   help="default: A's")  # fmt: skip
    p.set_defaults(func=run_compare)

    s = subparsers.add_parser(
        "summary",
        help="one results page over the reports of runs",
        description="Collect every report.json under the given runs / directories / files "
        "into one table with intervals, protocol lines and published rows (Markdown, JSON, "
        "plots).",
    )
    s.add_argument("paths", nargs="+", metavar="RUN_OR_REPORT", help="directories or files")
    s.add_argument("--out", required=True, metavar="DIR", help="report directory")
    add_force_arg(s, "replace a report already in --out")
    s.set_defaults(func=run_summary)


def run_compare(args: argparse.Namespace) -> dict[str, Any]:
    from ..eval.compare import compare_lines, compare_reports, load_report, write_compare_report

    a, b = load_report(args.a), load_report(args.b)
    if args.out:
        check_report_dir(args.out, args.force)
    result = compare_reports(
        a,
        b,
        reduction=args.reduction,
        variant_a=args.variant_a,
        variant_b=args.variant_b,
        metric=args.metric,
    )
    for line in compare_lines(result):
        print(line)
    if args.out:
        write_compare_report(result, args.out)
        print(f"wrote {args.out}/report.md")
    return result


def run_summary(args: argparse.Namespace) -> Any:
    from ..eval.compare import summarize

    check_report_dir(args.out, args.force)
    report = summarize(args.paths, args.out)
    print(f"{len(report.data['reports'])} reports; wrote {args.out}/report.md")
    return report
