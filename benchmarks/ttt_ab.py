"""A/B of the parallel TTT scan: the working tree's ``ttt_dual`` against a git revision's.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ttt_ab.py --rev HEAD
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ttt_ab.py --rev main~2 --kinds mlp --rounds 15

On a shared VM the speed of the same code moves by 10-20 % from minute to minute, far more
than most single changes to the scan gain or lose. This script runs one ``TTTLayer`` with the
revision's ``src/moshi_ttt/ttt/dual.py`` and with the working tree's, alternating which goes
first every round, and prints the median of the per-round ratios (old time / new time: above 1
means the working tree is faster) with both medians and minima. Both sides check that their
outputs agree before timing. Only ``dual.py`` is swapped: a revision whose ``ttt_dual`` has
another signature cannot be compared this way.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import moshi_ttt.layer as layer_module
from moshi_ttt import TTTLayer
from moshi_ttt.ttt import dual as dual_new
from moshi_ttt.ttt.rope import rope_rotation, rope_time_major

ROOT = Path(__file__).resolve().parents[1]


def load_revision(rev: str):
    """The revision's ``dual.py`` as a module (its relative imports pointed at the package)."""
    try:
        src = subprocess.run(
            ["git", "show", f"{rev}:src/moshi_ttt/ttt/dual.py"],
            cwd=ROOT, check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
    except subprocess.CalledProcessError as e:
        sys.exit(f"cannot read dual.py at revision {rev!r}: {e.stderr.strip()}")
    src = src.replace("from .", "from moshi_ttt.ttt.")  # its relative imports (.inner, .rope)
    path = Path(tempfile.mkdtemp()) / "dual_rev.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("dual_rev", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # a dataclass in it looks its module up there
    spec.loader.exec_module(module)
    return module


def with_rope(ttt_dual):
    """A revision's ``ttt_dual`` as the layer calls it now: one from before the scan took
    ``rope_theta`` gets q and k rotated first (q and k at once, as the layer then did)."""
    if "rope_theta" in inspect.signature(ttt_dual).parameters:
        return ttt_dual

    def call(kind, q, k, v, *args, rope_theta=None, state=None, **kwargs):
        if rope_theta is not None:
            B, H, T, d = q.shape
            n = args[-1]  # mini_batch_size
            pos = state.offset if state is not None and state.offset is not None else 0
            positions = ((pos + torch.arange(T)) % n).expand(B, T)
            if k.data_ptr() == q.data_ptr() + H * d * q.element_size():  # the layer's qkv
                qk = q.as_strided((B, T, 2 * H, d), (q.stride(0), q.stride(2), q.stride(1), 1))
            else:
                qk = torch.stack((q, k), 2).transpose(1, 3).flatten(2, 3)  # [B, T, 2H, d]
            qk = rope_time_major(qk, rope_rotation(positions, d, q.dtype, rope_theta))
            q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)
        return ttt_dual(kind, q, k, v, *args, state=state, **kwargs)

    return call


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rev", default="HEAD", help="git revision to compare against")
    p.add_argument("--kinds", nargs="+", default=["linear", "mlp"])
    p.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(1)
    old = load_revision(args.rev)
    impls = {"rev": with_rope(old.ttt_dual), "tree": dual_new.ttt_dual}
    x = torch.randn(1, args.seq, args.dim, generator=torch.Generator().manual_seed(0))
    print(
        f"# ttt_dual at {args.rev} (rev) vs the working tree (tree): dim {args.dim}, "
        f"{args.heads} heads, T {args.seq}, 1 thread, {args.rounds} alternating rounds"
    )
    print("| kind | pass | rev ms (median / min) | tree ms (median / min) | rev / tree |")
    print("|---|---|---|---|---|")
    for kind in args.kinds:
        for mode in args.modes:
            torch.manual_seed(0)
            layer = TTTLayer(args.dim, args.heads, kind=kind, checkpoint_group_size=0)

            def run(layer=layer, mode=mode) -> torch.Tensor:
                if mode == "fwd":
                    with torch.no_grad():
                        return layer(x)
                y = layer(x)
                y.sum().backward()
                return y.detach()

            outs = {}
            for name, fn in impls.items():
                layer_module.ttt_dual = fn
                outs[name] = run()
            torch.testing.assert_close(outs["tree"], outs["rev"], atol=1e-4, rtol=1e-4)
            times: dict[str, list[float]] = {name: [] for name in impls}
            for r in range(args.rounds):
                order = list(impls.items())
                for name, fn in order if r % 2 else order[::-1]:
                    layer_module.ttt_dual = fn
                    t0 = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - t0)
            layer_module.ttt_dual = dual_new.ttt_dual
            ratio = statistics.median(a / b for a, b in zip(times["rev"], times["tree"]))
            cell = {
                n: f"{statistics.median(t) * 1e3:.1f} / {min(t) * 1e3:.1f}"
                for n, t in times.items()
            }
            print(
                f"| {kind} | {mode} | {cell['rev']} | {cell['tree']} | x{ratio:.3f} |", flush=True
            )


if __name__ == "__main__":
    main()
