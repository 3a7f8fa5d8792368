"""Our TTTLayer against the public reference implementation, side by side in one run.

    .venv/bin/python benchmarks/ttt_vs_reference.py /tmp/ttt-lm-pytorch      # dir with ttt.py
    .venv/bin/python benchmarks/ttt_vs_reference.py REF_DIR --kinds mlp --repeats 7

REF_DIR is a local checkout of github.com/test-time-training/ttt-lm-pytorch (its ``ttt.py``
imports ``transformers``, which this project does not depend on: install it by hand to run this
script). Both layers get the same weights (ours are copied into the reference's ``TTTLinear`` /
``TTTMLP``), their outputs are compared (the reference's inner MLP uses the tanh GELU, ours the
exact one, so TTT-MLP agrees only to about 1e-3), then forward (no autograd) and
forward+backward of ``out.sum()`` are timed, the runs of both implementations interleaved, and
one table of tokens/s and ratios (ours / reference, median over the repeats) is printed.

Checkpointing: "no ckpt" runs both without; "ckpt 4" recomputes groups of 4 mini-batches in
both (ours: ``checkpoint_group_size=4``; the reference: ``scan_checkpoint_group_size`` = number
of mini-batches / 4, since its argument counts groups).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from moshi_ttt import TTTLayer
from moshi_ttt.layer import DEFAULT_BASE_LR


def load_reference(ref_dir: str):
    path = Path(ref_dir).resolve()
    if not (path / "ttt.py").exists():
        sys.exit(f"{path}/ttt.py not found: REF_DIR must be a checkout of ttt-lm-pytorch")
    sys.path.insert(0, str(path))
    try:
        import ttt as ref  # noqa: PLC0415
    except ImportError as e:
        sys.exit(f"cannot import the reference ({e}); it needs `pip install transformers`")
    return ref


def make_pair(ref, args, kind: str, ckpt_groups: int):
    """Our layer (randomised away from the init) and a reference layer with the same weights."""
    torch.manual_seed(0)
    ours = TTTLayer(args.dim, args.heads, kind=kind, mini_batch_size=args.mini_batch,
                    checkpoint_group_size=ckpt_groups)  # fmt: skip
    with torch.no_grad():
        ours.tok_bias.normal_(0, 0.05)
        ours.ttt_norm_weight.add_(0.1 * torch.randn_like(ours.ttt_norm_weight))
        ours.ttt_norm_bias.normal_(0, 0.1)
        ours.lr_gate.bias.normal_(0, 0.5)
        for name in ("b1", "b2"):
            if hasattr(ours, name):
                getattr(ours, name).normal_(0, 0.02)
    nmb = args.seq // args.mini_batch
    config = ref.TTTConfig(
        hidden_size=args.dim, num_attention_heads=args.heads, mini_batch_size=args.mini_batch,
        ttt_layer_type=kind, ttt_base_lr=DEFAULT_BASE_LR[kind], use_gate=False, share_qk=False,
        pre_conv=False, scan_checkpoint_group_size=nmb // ckpt_groups if ckpt_groups else 0,
    )  # fmt: skip
    theirs = (ref.TTTMLP if kind == "mlp" else ref.TTTLinear)(config, layer_idx=0)
    d = args.dim
    with torch.no_grad():
        w = ours.qkv_proj.weight
        theirs.q_proj.weight.copy_(w[:d])
        theirs.k_proj.weight.copy_(w[d : 2 * d])
        theirs.v_proj.weight.copy_(w[2 * d :])
        theirs.o_proj.weight.copy_(ours.o_proj.weight)
        theirs.learnable_ttt_lr_weight.copy_(ours.lr_gate.weight.unsqueeze(1))
        theirs.learnable_ttt_lr_bias.copy_(ours.lr_gate.bias.unsqueeze(1))
        theirs.learnable_token_idx.copy_(ours.tok_bias)
        theirs.ttt_norm_weight.copy_(ours.ttt_norm_weight)
        theirs.ttt_norm_bias.copy_(ours.ttt_norm_bias)
        theirs.post_norm.load_state_dict(ours.post_norm.state_dict())
        for name in ("W1", "b1", "W2", "b2"):
            if hasattr(ours, name):
                getattr(theirs, name).copy_(getattr(ours, name))
    return ours, theirs


def check_agreement(ref, args, kind: str) -> float:
    """Max |ours - reference| / max |reference| of the outputs, same weights and input."""
    ours, theirs = make_pair(ref, args, kind, 0)
    ours.eval(), theirs.eval()
    x = torch.randn(1, args.seq, args.dim, generator=torch.Generator().manual_seed(1))
    pos = torch.arange(args.seq).unsqueeze(0)
    with torch.no_grad():
        a, b = ours(x), theirs(x, position_ids=pos)
    rel = ((a - b).abs().max() / b.abs().max()).item()
    tol = 1e-2 if kind == "mlp" else 1e-4  # the MLP's GELU forms differ by up to ~1e-3
    if not rel < tol:
        sys.exit(f"{kind}: outputs disagree, relative max diff {rel:.2e} >= {tol:.0e}")
    return rel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("ref_dir", help="local checkout of ttt-lm-pytorch (the dir holding ttt.py)")
    p.add_argument("--kinds", nargs="+", default=["mlp", "linear"])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--mini-batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd", "fwdbwd_ckpt4"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.seq % args.mini_batch:
        sys.exit("--seq must be a multiple of --mini-batch (the reference's dual form needs it)")
    ref = load_reference(args.ref_dir)
    print(
        f"# TTT layer vs ttt-lm-pytorch: dim {args.dim}, {args.heads} heads, mini-batch"
        f" {args.mini_batch}, batch 1, T {args.seq}, float32, CPU, torch {torch.__version__},"
        f" {torch.get_num_threads()} threads, median of {args.repeats} interleaved repeats",
        flush=True,
    )
    agree = {kind: check_agreement(ref, args, kind) for kind in args.kinds}

    x = torch.randn(1, args.seq, args.dim)
    pos = torch.arange(args.seq).unsqueeze(0)
    runs = {}  # (kind, mode, impl) -> callable
    for kind in args.kinds:
        for mode in args.modes:
            ours, theirs = make_pair(ref, args, kind, 4 if mode == "fwdbwd_ckpt4" else 0)
            if mode == "fwd":
                ours.eval(), theirs.eval()

                def f_ours(m=ours):
                    with torch.no_grad():
                        m(x)

                def f_ref(m=theirs):
                    with torch.no_grad():
                        m(x, position_ids=pos)
            else:
                ours.train(), theirs.train()

                def f_ours(m=ours):
                    m(x).sum().backward()

                def f_ref(m=theirs):
                    m(x, position_ids=pos).sum().backward()

            runs[kind, mode, "ours"], runs[kind, mode, "ref"] = f_ours, f_ref
            if mode == "fwd":  # the dense projections alone (the same GEMMs in both)

                def p_ours(m=ours):
                    with torch.no_grad():
                        m.o_proj(m.qkv_proj(x)[..., : args.dim])

                def p_ref(m=theirs):
                    with torch.no_grad():
                        m.q_proj(x), m.k_proj(x), m.o_proj(m.v_proj(x))

                runs[kind, "proj", "ours"], runs[kind, "proj", "ref"] = p_ours, p_ref
    for fn in runs.values():  # warm-up
        fn()
    times = {key: [] for key in runs}
    for r in range(args.repeats):
        print(f"... repeat {r + 1}/{args.repeats}", file=sys.stderr, flush=True)
        for key, fn in runs.items():  # ours and the reference alternate, every config each round
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)

    label = {"fwd": "fwd", "fwdbwd": "fwd+bwd, no ckpt", "fwdbwd_ckpt4": "fwd+bwd, ckpt 4"}
    med = {key: statistics.median(t) for key, t in times.items()}
    print("| kind | pass | reference tok/s | ours tok/s | ours / reference | max rel. diff |")
    print("|---|---|---|---|---|---|")
    for kind in args.kinds:
        for mode in args.modes:
            t_ref = statistics.median(times[kind, mode, "ref"])
            t_ours = statistics.median(times[kind, mode, "ours"])
            print(
                f"| {kind} | {label[mode]} | {args.seq / t_ref:,.0f} | {args.seq / t_ours:,.0f} |"
                f" x{t_ref / t_ours:.2f} | {agree[kind]:.1e} |"
            )
    if "fwd" in args.modes:
        print(
            "\nForward split (medians): the q/k/v/o projections, timed alone in the same rounds,"
            " and the rest of the layer (forward minus projections)."
        )
        print("| kind | projections ref / ours ms | rest ref / ours ms | rest: ours / reference |")
        print("|---|---|---|---|")
        for kind in args.kinds:
            p_ref, p_ours = med[kind, "proj", "ref"], med[kind, "proj", "ours"]
            r_ref, r_ours = med[kind, "fwd", "ref"] - p_ref, med[kind, "fwd", "ours"] - p_ours
            print(
                f"| {kind} | {p_ref * 1e3:.1f} / {p_ours * 1e3:.1f} |"
                f" {r_ref * 1e3:.1f} / {r_ours * 1e3:.1f} | x{r_ref / r_ours:.2f} |"
            )


if __name__ == "__main__":
    main()
