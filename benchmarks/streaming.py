"""Milliseconds per ``LMGen.step`` (one 80 ms frame: temporal transformer + depformer), base
Moshi vs TTT in 1, 4 and 8 layers, at step 100 and step 10,000. Prints a markdown table.

    .venv/bin/python benchmarks/streaming.py                      # tiny on CPU (+ 7B on CUDA)
    .venv/bin/python benchmarks/streaming.py --models 7b --kinds mlp,inplace
    .venv/bin/python benchmarks/streaming.py --positions 400 --context 300 --no-fast-forward

Models: ``tiny`` (``tiny_lm_kwargs()`` with the 7B's 3000-frame context by default, float32) and
``7b`` (``moshi.models.loaders._lm_kwargs``, random weights, bf16, built on the meta device then
``to_empty`` + init; CUDA only). TTT layers are spread evenly over the depth (1 layer: the
middle one); layer counts above the model's depth are clamped.

Reaching step 10,000: the cost of a step depends on its position only through the attention
over the KV cache, which is full (``context`` keys) from step ``context`` on; TTT's cost is
position-free (one update per mini-batch / chunk). So by default 20 real steps are run, then the
temporal transformer's positions and KV caches are advanced ("fast-forwarded") to the target
step without computing the frames in between (a full cache of stale values costs the same
attention), then ``--steps`` steps are timed. ``--no-fast-forward`` runs every step for real.
Each timed window (default 64 steps) covers 4 TTT mini-batches of 16; each cell shows the
median and the max step time of the best (lowest-median) of ``--repeats`` windows (tiny models:
the repeats of all variants are interleaved).
On CPU one thread is the default: the tiny model's ops are too small to gain from more, and on
a 2-core VM two OpenMP threads showed intermittent ~0.5 s stalls per step.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import platform
import statistics
import time
from collections import defaultdict

import torch
from moshi.models import loaders
from moshi.models.lm import LMGen, LMModel
from moshi.modules.streaming import StreamingModule
from moshi.utils.compile import no_compile

from moshi_ttt.integration import TTTConfig, apply_ttt, build_tiny_lm, reset_ttt_parameters

BUDGET_MS = 80.0  # one Mimi frame


def spread(n: int, num_layers: int) -> list[int]:
    """``n`` layer indices evenly spread over ``num_layers`` (n = 1: the middle layer)."""
    n = min(n, num_layers)
    return sorted({int((i + 0.5) * num_layers / n) for i in range(n)})


@torch.no_grad()
def build(model: str, ttt: TTTConfig | None, device: torch.device, context: int) -> LMModel:
    if model == "tiny":
        lm = build_tiny_lm(0, context=context).to(device)
        if ttt is not None:
            torch.manual_seed(0)
            apply_ttt(lm, ttt)
        return lm.eval()
    lm = LMModel(device="meta", dtype=torch.bfloat16, **loaders._lm_kwargs)
    if ttt is not None:
        apply_ttt(lm, ttt)
    lm = lm.to_empty(device=device)
    torch.manual_seed(0)
    for name, p in lm.named_parameters():
        p.fill_(1.0) if name.endswith(".alpha") else p.normal_(0.0, 0.02)
    reset_ttt_parameters(lm)  # TTT init (gates at 0 still compute the whole branch)
    return lm.eval()


def fast_forward(lm: LMModel, n: int) -> None:
    """Advance the temporal transformer's streaming positions (RoPE offsets, KV-cache ends) by
    ``n`` frames without computing them; the caches' slots all count as filled afterwards."""
    for module in lm.transformer.modules():
        state = module._streaming_state if isinstance(module, StreamingModule) else None
        if state is None:
            continue
        for name in ("offset", "offsets"):
            if isinstance(getattr(state, name, None), torch.Tensor):
                getattr(state, name).add_(n)
        if isinstance(getattr(state, "offset_cpu", None), int):
            state.offset_cpu += n
        cache = getattr(state, "kv_cache", None)
        if cache is not None:
            cache.end_offset.add_(n)


@torch.no_grad()
def step_ms(lm: LMModel, position: int, steps: int, ff: bool, device: torch.device) -> list[float]:
    """Per-step milliseconds of ``steps`` LMGen steps starting at step ``position``."""
    gen = LMGen(lm, top_k=min(250, lm.card), top_k_text=min(25, lm.text_card))
    g = torch.Generator(device=device).manual_seed(0)
    user = torch.randint(0, lm.card, (64, 1, 8, 1), generator=g, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    with gen.streaming(1):
        warm = min(position, 20) if ff else position
        for i in range(warm):
            gen.step(user[i % 64])
        if position > warm:
            fast_forward(lm, position - warm)
        sync()
        for i in range(steps):
            t0 = time.perf_counter()
            gen.step(user[i % 64])
            sync()
            times.append(1000 * (time.perf_counter() - t0))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--models", default="tiny,7b" if cuda else "tiny")
    parser.add_argument(
        "--kinds", default="linear,mlp,inplace", help="TTT kinds (linear, mlp, inplace)"
    )
    parser.add_argument("--layers", default="1,4,8", help="numbers of TTT layers")
    parser.add_argument("--positions", default="100,10000")
    parser.add_argument("--steps", type=int, default=64, help="timed steps per measurement")
    parser.add_argument("--context", type=int, default=3000, help="tiny model's context")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell (best kept)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument("--no-fast-forward", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    positions = [int(p) for p in args.positions.split(",")]
    eager = no_compile() if device.type == "cpu" else contextlib.nullcontext()
    with eager:
        run(args, device, positions)


def run(args: argparse.Namespace, device: torch.device, positions: list[int]) -> None:
    print(f"device: {device} ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), torch {torch.__version__}")  # fmt: skip
    head = " | ".join(f"step {p:,}: median / max ms" for p in positions)
    print(f"\n| model | TTT | layers | {head} |")
    print("|---|---|---|" + "---|" * len(positions))
    for model in args.models.split(","):
        if model == "7b" and device.type != "cuda":
            print(f"| 7b | skipped: needs CUDA (device {device}) |")
            continue
        num_layers = 4 if model == "tiny" else loaders._lm_kwargs["num_layers"]
        counts = sorted({min(int(n), num_layers) for n in args.layers.split(",")})
        variants = [(None, [])] + [
            (kind, spread(n, num_layers)) for kind in args.kinds.split(",") for n in counts
        ]
        results = measure(model, variants, positions, args, device)
        for i, (kind, layers) in enumerate(variants):
            cells = []
            for p in positions:
                best = min(results[i, p], key=statistics.median)
                cells.append(f"{statistics.median(best):.1f} / {max(best):.1f}")
            print(f"| {model} | {kind or 'base'} | {layers or '-'} | " + " | ".join(cells) + " |")
    print(f"\nreal-time budget: {BUDGET_MS:.0f} ms per frame (12.5 Hz)")


def measure(
    model: str,
    variants: list[tuple[str | None, list[int]]],
    positions: list[int],
    args: argparse.Namespace,
    device: torch.device,
) -> dict[tuple[int, int], list[list[float]]]:
    """``(variant index, position) -> [step times of each repeat]``. Tiny models are all kept
    and the repeats interleaved (machine drift then hits every variant alike); a 7B is built,
    measured and freed one variant at a time."""
    ff = not args.no_fast_forward
    results: dict[tuple[int, int], list[list[float]]] = defaultdict(list)

    def make(i: int) -> LMModel:
        kind, layers = variants[i]
        return build(model, TTTConfig(layers=layers, kind=kind) if kind else None, device,
                     args.context)  # fmt: skip

    if model == "tiny":
        lms = [make(i) for i in range(len(variants))]
        for _ in range(args.repeats):
            for i, lm in enumerate(lms):
                for p in positions:
                    results[i, p].append(step_ms(lm, p, args.steps, ff, device))
        return results
    for i in range(len(variants)):
        lm = make(i)
        for _ in range(args.repeats):
            for p in positions:
                results[i, p].append(step_ms(lm, p, args.steps, ff, device))
        del lm
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


if __name__ == "__main__":
    main()
