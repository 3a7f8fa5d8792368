"""The real-data retrofit study (docs/retrofit.md): ``moshi-ttt demo --data`` over corpora,
seeds and retrofit variants, then one table with means and ranges over seeds.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/realdata_study.py run --corpus stdlib \\
        --seeds 0,1,2 --out study_out [--all-rows-seed 0]
    .venv/bin/python benchmarks/realdata_study.py table study_out

Each (corpus, seed) first runs the shipped recipe with the essential rows (base, dyneval,
retrofit and its controls; ``--all-rows-seed`` adds every alternative for that seed), then every
other variant's retrofit rows against the same cached base; the variant ``e2e`` runs the
end-to-end memory's rows (``e2e``, ``e2e_meta``, and ``dyneval`` beside them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from moshi_ttt.demo.corpus import stdlib_dir
from moshi_ttt.demo.markov import DemoSettings, run_demo
from moshi_ttt.demo.realdata import DEFAULT, run_realdata
from moshi_ttt.recipes import FORCED_TRAIN, FORCED_TTT, RETROFIT_TRAIN, RETROFIT_TTT

CORPORA = {"stdlib": str(stdlib_dir()), "vimdoc": "/usr/share/vim/vim90/doc"}
SHIPPED = {"ttt": RETROFIT_TTT, "retrofit": RETROFIT_TRAIN}
FORCED = {"ttt": FORCED_TTT, "retrofit": FORCED_TRAIN}


def _shipped(ttt: dict | None = None, retrofit: dict | None = None) -> dict:
    """The shipped recipe with some keys changed (an ablation)."""
    return {
        "ttt": {**RETROFIT_TTT, **(ttt or {})},
        "retrofit": {**RETROFIT_TRAIN, **(retrofit or {})},
    }


VARIANTS = {
    "shipped": SHIPPED,
    "forced": FORCED,  # the mechanism recipe (layer 0, quarter window): the earlier default
    "no_kl": _shipped(retrofit={"kl_to_base": 0.0}),
    "quarter_window": _shipped(retrofit={"train_context_fraction": 0.25,
                                         "train_context_min_fraction": None}),
    "layer0_zero": _shipped(ttt={"layers": "0", "placement": "before_attention"}),
    "all_layers": _shipped(ttt={"layers": "all"}),
    "mlp": _shipped(ttt={"kind": "mlp"}),
    "e2e": {},  # the end-to-end memory's rows (e2e, e2e_meta) against dyneval, same base
}  # fmt: skip
E2E_ROWS = "dyneval,e2e,e2e_meta,e2e_meta_static"


def run_markov(args: argparse.Namespace) -> None:
    """The Markov mechanism check with each variant (its share of the available gain)."""
    for seed in [int(x) for x in args.seeds.split(",")]:
        for variant in args.variants.split(","):
            out = Path(args.out) / "markov" / variant / f"seed{seed}"
            if (out / "results.json").is_file():
                print(f"{out}: done already")
                continue
            print(f"== markov {variant} seed {seed}", flush=True)
            s = dataclasses.replace(DemoSettings(), scratch=False, **VARIANTS[variant])
            run_demo(out, seed, progress=False, settings=s)


def run(args: argparse.Namespace) -> None:
    if args.corpus == "markov":
        return run_markov(args)
    data = CORPORA.get(args.corpus, args.corpus)
    name = args.corpus if args.corpus in CORPORA else Path(args.corpus).name
    for seed in [int(x) for x in args.seeds.split(",")]:
        for variant in args.variants.split(","):
            out = Path(args.out) / name / variant / f"seed{seed}"
            if (out / "results.json").is_file():
                print(f"{out}: done already")
                continue
            s = dataclasses.replace(DEFAULT, **VARIANTS[variant])
            if variant == "shipped":
                rows = "all" if seed == args.all_rows_seed else "essential"
            elif variant == "e2e":
                rows = E2E_ROWS
            else:
                rows = "retrofit,retrofit_reset,retrofit_gate0"
            print(f"== {name} {variant} seed {seed}: rows {rows}", flush=True)
            run_realdata(out, data, seed, rows, progress=False, settings=s,
                         cache_dir=Path(args.out) / "cache")  # fmt: skip


def fmt(xs: list[float]) -> str:
    """Mean over seeds and, with several, their range."""
    return f"{np.mean(xs):.4f}" + (f" ({min(xs):.4f}..{max(xs):.4f})" if len(xs) > 1 else "")


def records(root: Path) -> list[dict]:
    """One flat record per (corpus, variant, seed, row) of every results.json under ``root``."""
    out = []
    for path in sorted(root.glob("*/*/seed*/results.json")):
        corpus, variant, seed = path.parts[-4], path.parts[-3], int(path.parts[-2][4:])
        r = json.loads(path.read_text())
        for row, v in r["rows"].items():
            rec = {"corpus": corpus, "variant": variant, "seed": seed, "row": row}
            for key in ("ce_within", "ce_beyond", "vs_base_within", "vs_base_beyond",
                        "gain_share", "train_seconds", "gate"):  # fmt: skip
                if key in v:
                    rec[key] = v[key]
            out.append(rec)
    return out


def table(args: argparse.Namespace) -> None:
    root = Path(args.out)
    if args.jsonl:
        lines = [json.dumps(rec) for rec in records(root)]
        Path(args.jsonl).write_text("\n".join(lines) + "\n")
        print(f"{len(lines)} records -> {args.jsonl}")
    found: dict = {}
    shares: dict = {}
    for path in sorted(root.glob("*/*/seed*/results.json")):
        corpus, variant = path.parts[-4], path.parts[-3]
        r = json.loads(path.read_text())
        if corpus == "markov":
            row = r["rows"]["retrofit"]
            shares.setdefault(variant, []).append(
                (row["gain_share"], row["ce_within"] - r["rows"]["base"]["ce_within"])
            )
            continue
        for row, v in r["rows"].items():
            # a variant's own rows (the e2e variant's dyneval also sweeps K = C/8)
            own = row.startswith(("retrofit", "e2e")) or (variant == "e2e" and row == "dyneval")
            if not own and variant != "shipped":
                continue  # the base and the alternatives once per (corpus, seed)
            key = (corpus, variant if own else "-", row)
            found.setdefault(key, []).append(v)
    print(
        "| corpus | variant | row | seeds | CE < C | CE >= C | vs base < C | vs base >= C "
        "(seeds' 95 % intervals) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for (corpus, variant, row), vs in sorted(found.items()):
        within = [v["ce_within"]["mean"] for v in vs]
        beyond = [v["ce_beyond"]["mean"] for v in vs]
        dw = [v["vs_base_within"]["difference"] for v in vs if v["vs_base_within"]]
        db = [v["vs_base_beyond"] for v in vs if v["vs_base_beyond"]]
        ivs = "; ".join(f"{d['difference']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]" for d in db)
        print(
            f"| {corpus} | {variant} | {row} | {len(vs)} | {fmt(within)} | {fmt(beyond)} | "
            f"{fmt(dw) if dw else '-'} | {ivs or '-'} |"
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(required=True)
    r = sub.add_parser("run")
    r.add_argument("--corpus", default="stdlib", help=f"{', '.join(CORPORA)} or a directory")
    r.add_argument("--seeds", default="0,1,2")
    r.add_argument("--variants", default="shipped,forced")
    r.add_argument("--out", default="study_out")
    r.add_argument("--all-rows-seed", type=int, default=-1)
    r.set_defaults(func=run)
    t = sub.add_parser("table")
    t.add_argument("out")
    t.add_argument("--jsonl", help="also write every run's rows as JSON lines to this file")
    t.set_defaults(func=table)
    args = p.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
