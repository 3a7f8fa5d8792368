"""The recall study (docs/retrofit.md, "Recall"): ``moshi-ttt demo``'s essential rows (the base,
dynamic evaluation, the end-to-end memory zero-training / meta-trained / static, the continuous
cache and the associative memory alone and mixed into each end-to-end row) over corpora and
seeds, with the recall measures; then one table per measure over seeds.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/recall_study.py run --corpus stdlib \\
        --seeds 0,1,2 --out recall_out          # and --corpus vimdoc, --corpus markov
    .venv/bin/python benchmarks/recall_study.py table recall_out
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np

from moshi_ttt.demo.corpus import stdlib_dir
from moshi_ttt.demo.markov import DemoSettings, run_demo
from moshi_ttt.demo.realdata import DEFAULT, run_realdata

CORPORA = {"stdlib": str(stdlib_dir()), "vimdoc": "/usr/share/vim/vim90/doc"}


def run(args: argparse.Namespace) -> None:
    for seed in [int(x) for x in args.seeds.split(",")]:
        name = args.corpus if args.corpus in CORPORA or args.corpus == "markov" else Path(
            args.corpus).name  # fmt: skip
        out = Path(args.out) / name / f"seed{seed}"
        if (out / "results.json").is_file():
            print(f"{out}: done already")
            continue
        print(f"== {name} seed {seed}", flush=True)
        if args.corpus == "markov":
            run_demo(out, seed, progress=False,
                     settings=dataclasses.replace(DemoSettings(), scratch=False))  # fmt: skip
        else:
            run_realdata(out, CORPORA.get(args.corpus, args.corpus), seed, args.rows,
                         progress=False, settings=DEFAULT,
                         cache_dir=Path(args.out) / "cache")  # fmt: skip


def _ci(d: dict | None, key: str = "difference", scale: float = 1.0, digits: int = 3) -> str:
    if not d or not math.isfinite(d.get(key, math.nan)):
        return "-"
    v, lo, hi = (scale * d.get(k, math.nan) for k in (key, "lo", "hi"))
    if not math.isfinite(lo):
        return f"{v:+.{digits}f}"
    return f"{v:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def _mean(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return "-"
    return f"{np.mean(xs):.4f}" + (f" ({min(xs):.4f}..{max(xs):.4f})" if len(xs) > 1 else "")


def _brief(x: object) -> object:
    """``x`` without the validation scores of every setting (kept in each run's results.json)."""
    if isinstance(x, dict):
        return {k: _brief(v) for k, v in x.items() if k != "validation"}
    return x


def table(args: argparse.Namespace) -> None:
    root = Path(args.out)
    runs = {}
    for path in sorted(root.glob("*/seed*/results.json")):
        runs.setdefault(path.parts[-3], []).append(json.loads(path.read_text()))
    if args.jsonl:  # every run's rows and recall measures, one line a run (the study's record)
        keep = ("rows", "recall", "verdict", "settings", "corpus", "memory_choice", "timings")
        lines = [json.dumps({"corpus": c, **{k: _brief(r[k]) for k in keep if k in r}})
                 for c, rs in sorted(runs.items()) for r in rs]  # fmt: skip
        Path(args.jsonl).write_text("\n".join(lines) + "\n")
        print(f"{len(lines)} runs -> {args.jsonl}")
    for corpus, results in sorted(runs.items()):
        n = len(results)
        if corpus == "markov":
            print(f"\n### markov ({n} seeds): share of the available gain beyond the window\n")
            print("| row | share (seeds) | CE < C | CE >= C |\n|---|---|---|---|")
            for row in results[0]["rows"]:
                vs = [r["rows"][row] for r in results if row in r["rows"]]
                shares = ", ".join(f"{100 * v['gain_share']:.1f}" for v in vs)
                print(f"| {row} | {100 * np.mean([v['gain_share'] for v in vs]):.1f} % "
                      f"({shares}) | {_mean([v['ce_within'] for v in vs])} | "
                      f"{_mean([v['ce_beyond'] for v in vs])} |")  # fmt: skip
            continue
        print(f"\n### {corpus} ({n} seeds): real text, text CE nats per byte, held-out files\n")
        print("| row | CE < C | CE >= C | vs base < C (per seed) | vs base >= C, per seed "
              "[95 % interval over files] |\n|---|---|---|---|---|")  # fmt: skip
        for row in results[0]["rows"]:
            vs = [r["rows"][row] for r in results if row in r["rows"]]
            within = "; ".join(_ci(v["vs_base_within"], digits=4) for v in vs)
            beyond = "; ".join(_ci(v["vs_base_beyond"], digits=4) for v in vs)
            print(f"| {row} | {_mean([v['ce_within']['mean'] for v in vs])} | "
                  f"{_mean([v['ce_beyond']['mean'] for v in vs])} | {within} | "
                  f"{beyond} |")  # fmt: skip
        print(f"\n### {corpus}: recall (per seed; intervals over files)\n")
        dists = results[0]["recall"]["needle"]["distances"]
        print(
            "| row | repeated bytes: CE | vs base | "
            + " | ".join(f"needle {m}x share" for m in dists)
            + " |"
        )
        print("|---|---|---|" + "---|" * len(dists))
        for row in results[0]["rows"]:
            reps = [r["recall"]["repeat"].get(row, {}).get("recallable") for r in results]
            ce = _mean([x["mean"] for x in reps if x])
            vs = "; ".join(_ci(x.get("vs_reference")) for x in reps if x)
            cells = []
            for m in dists:
                sh = [r["recall"].get("needle_shares", {}).get(row, {}).get(f"{m}x")
                      for r in results]  # fmt: skip
                cells.append("; ".join(_ci(x, "share", 100, 0) for x in sh if x) or "-")
            print(f"| {row} | {ce} | {vs or '-'} | " + " | ".join(cells) + " |")
        base = results[0]["recall"].get("needle_shares", {}).get("base", {})
        if base:
            b = next(iter(base.values()))
            print(f"\nbase on the value, phrase inside its window {b['ce_inside']:.3f}, another "
                  f"phrase early {b['ce_base_floor']:.3f} nats per byte (seed 0)")  # fmt: skip
        print(f"\n### {corpus}: verdict per seed\n")
        for r in results:
            for line in r["verdict"]["lines"]:
                if line.startswith(("assoc", "e2e_assoc", "e2e_meta_assoc")):
                    print(f"- seed {r['settings']['seed']}: {line}")
        print(f"\n### {corpus}: chosen on validation\n")
        for r in results:
            chosen = {row: v["details"]["label"] for row, v in r["rows"].items()
                      if "details" in v and "label" in v["details"]}  # fmt: skip
            print(f"- seed {r['settings']['seed']}: " + "; ".join(
                f"{k}: {v}" for k, v in chosen.items()))  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(required=True)
    r = sub.add_parser("run")
    r.add_argument("--corpus", default="stdlib", help=f"{', '.join(CORPORA)}, markov or a dir")
    r.add_argument("--seeds", default="0,1,2")
    r.add_argument("--rows", default="essential")
    r.add_argument("--out", default="recall_out")
    r.set_defaults(func=run)
    t = sub.add_parser("table")
    t.add_argument("out")
    t.add_argument("--jsonl", help="also write every run's results as JSON lines to this file")
    t.set_defaults(func=table)
    args = p.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
