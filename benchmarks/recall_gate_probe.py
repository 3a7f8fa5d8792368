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
    memory_scan,
    mix_curve,
    needle_shares,
    restrict,
)
from moshi_ttt.train.checkpoint import load_trained_model
from moshi_ttt.ttt.recall import read_distribution

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("run_dir")
p.add_argument("--beta", type=float, default=1.0, help="the delta rule's strength")
args = p.parse_args()
torch.set_num_threads(1)
out = Path(args.run_dir)
s = DEFAULT
C = s.context
spec = NeedleSpec()
st = MemorySetting("assoc", keys=8192, active=64, beta=args.beta, sharpen=2.0, scale=1.0, context=4)
with no_compile():
    lm, _ = load_trained_model(out / "runs/base")
    lm.eval()
    train = _files(out / "data/train", 48)
    val = _files(out / "data/val", s.val_files)
    test = _files(out / "data/test", s.eval_files)

    def feats_of(files):
        f, c = base_features(lm, files, 64, 32)
        ent = {}
        for n, ff in f.items():
            lp = torch.log_softmax(lm.text_linear(ff.h).float(), -1)
            ent[n] = (-(lp.exp() * lp).sum(-1)).double()
        return f, c, ent

    def gate_feats(setting, f, ent):
        scan = memory_scan(setting, f, TEXT_CARD)
        outd = {}
        for n, ff in f.items():
            p, conf = read_distribution(scan[n], setting.sharpen, setting.scale)
            p_y = p.gather(1, ff.targets.clamp(0, TEXT_CARD - 1)[:, None])[:, 0]
            pm = p.max(-1).values
            X = torch.stack([conf, conf * ent[n], ent[n], pm, pm * ent[n]], -1)
            outd[n] = (X, p_y, conf)
        return outd

    ft, ct, et = feats_of(train)
    fv, cv, ev = feats_of(val)
    fs, cs, es = feats_of(test)
    gt = gate_feats(st, ft, et)
    # fit
    Xs, pys, pbs, ms = [], [], [], []
    for n, (ce, mask) in zip(ct.file_names, ct.file_text):
        X, p_y, conf = gt[n]
        m = torch.from_numpy(mask) & (conf > 0)
        Xs.append(X[m])
        pys.append(p_y[m])
        pbs.append(torch.exp(-torch.from_numpy(ce).double())[m])
    X, py, pb = torch.cat(Xs), torch.cat(pys), torch.cat(pbs)
    w = torch.zeros(X.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200)

    def closure():
        opt.zero_grad()
        g = torch.sigmoid(X @ w[:-1] + w[-1])
        loss = -torch.log((1 - g) * pb + g * py + 1e-30).mean()
        loss.backward()
        return loss

    opt.step(closure)
    print("fit", w.detach().numpy().round(3), closure().item())

    def apply(curve, f, ent):
        gf = gate_feats(st, f, ent)
        reads = {}
        for n in f:
            X, p_y, conf = gf[n]
            g = torch.sigmoid(X @ w.detach()[:-1] + w.detach()[-1]) * (conf > 0)
            reads[n] = (p_y.numpy(), g.numpy())
        return mix_curve(curve, reads, 1.0)

    mv = apply(cv, fv, ev)
    print(
        "val beyond {:.4f} within {:.4f} (base {:.4f} {:.4f})".format(
            mv.totals(C)["text_ce"],
            mv.totals(0, C)["text_ce"],
            cv.totals(C)["text_ce"],
            cv.totals(0, C)["text_ce"],
        )
    )
    mt = apply(cs, fs, es)
    print(
        "test beyond {:.4f} within {:.4f} (base {:.4f} {:.4f})".format(
            mt.totals(C)["text_ce"],
            mt.totals(0, C)["text_ce"],
            cs.totals(C)["text_ce"],
            cs.totals(0, C)["text_ce"],
        )
    )
    cases, masks = needle_cases(out / "data/test", C, spec, 0)
    row, bn = {}, {}
    for v, fl in cases.items():
        f, c, e = feats_of(fl)
        row[v] = restrict(apply(c, f, e), masks[v])
        bn[v] = restrict(c, masks[v])
    sh = needle_shares(row, bn, spec.distances)
    print("needle", {k: (round(x["share"], 3), round(x["ce_true"], 3)) for k, x in sh.items()})
