"""An exploratory probe (docs/retrofit.md, "Recall", next step): the associative memory mixed in
with a *learned* gate instead of ``lam * conf``. The gate is a logistic function of the
memory's confidence, its read's peak, the base's entropy and two products (6 numbers), fitted
on 48 training sequences of the frozen base to the mixture's log-likelihood; then scored on
the validation and held-out files and on the needles, as the demo scores its rows.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/recall_gate_probe.py RUN_DIR [--beta 1.0]

``RUN_DIR``: a ``moshi-ttt demo`` output (its ``runs/base`` and ``data``), e.g. a seed of
``benchmarks/recall_study.py``. One seed, no intervals: a direction, not a result.
"""

import argparse
from pathlib import Path

import torch
from moshi.utils.compile import no_compile

from moshi_ttt.demo.corpus import TEXT_CARD
from moshi_ttt.demo.needle import NeedleSpec, needle_cases
from moshi_ttt.demo.realdata import DEFAULT, _files
from moshi_ttt.eval.recall import (
    MemorySetting,
    base_features,
    fit_memory_gate,
    memory_reads,
    mix_curve,
    needle_shares,
    restrict,
)
from moshi_ttt.train.checkpoint import load_trained_model


def ce(curve, start: int, end: int | None = None) -> float:
    return curve.totals(start, end)["text_ce"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--beta", type=float, default=1.0, help="the delta rule's strength")
    args = p.parse_args()
    torch.set_num_threads(1)
    out, s, spec = Path(args.run_dir), DEFAULT, NeedleSpec()
    C = s.context
    plain = MemorySetting("assoc", keys=8192, active=64, beta=args.beta, sharpen=2.0, context=4)
    with no_compile():
        lm = load_trained_model(out / "runs/base")[0].eval()

        def features(files: list) -> tuple:
            return base_features(lm, files, s.chunk_frames, 32)

        gated = fit_memory_gate(plain, *features(_files(out / "data/train", 48)), TEXT_CARD)
        print("gate", [round(v, 3) for v in gated.gate])
        for split, n in (("val", s.val_files), ("test", s.eval_files)):
            feats, curve = features(_files(out / "data" / split, n))
            mixed = mix_curve(curve, memory_reads(gated, feats, TEXT_CARD), 1.0)
            print(f"{split}: beyond {ce(mixed, C):.4f} within {ce(mixed, 0, C):.4f} "
                  f"(base {ce(curve, C):.4f} {ce(curve, 0, C):.4f})")  # fmt: skip
        cases, masks = needle_cases(out / "data/test", C, spec, 0)
        row, base = {}, {}
        for v, files in cases.items():
            feats, curve = features(files)
            row[v] = restrict(
                mix_curve(curve, memory_reads(gated, feats, TEXT_CARD), 1.0), masks[v]
            )
            base[v] = restrict(curve, masks[v])
        shares = needle_shares(row, base, spec.distances)
        print("needle share of perfect recall:",
              {k: round(x["share"], 3) for k, x in shares.items()})  # fmt: skip


if __name__ == "__main__":
    main()
