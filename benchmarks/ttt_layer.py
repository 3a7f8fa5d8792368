"""Speed and memory of one TTTLayer on CPU (float32). Prints a markdown table.

    .venv/bin/python benchmarks/ttt_layer.py                  # dim 512, 8 heads, b 16, T 2048
    .venv/bin/python benchmarks/ttt_layer.py --kinds mlp --repeats 3
    .venv/bin/python benchmarks/ttt_layer.py --stream-only     # in-place vs functional step
    .venv/bin/python benchmarks/ttt_layer.py --compile inductor --seq 512   # compiled vs eager

Columns: forward tokens/s (no autograd), forward+backward tokens/s with the default
checkpointing (group of 4 mini-batches) and without, streaming ms/token at two positions (the
prefix is fed in chunked mode first), and the peak resident memory added by one forward+backward
at several lengths, each measured in a fresh process. Medians over ``--repeats``.
``--stream-only``: only the streaming ms/token (median of a ``--stream-steps`` window), for the
in-place step (``TTTLayer.inplace_streaming``, the default) and the functional step it replaced,
the two interleaved, median over ``--repeats``.
``--compile BACKEND``: only forward and forward+backward tokens/s of the chunked call
``layer(x, state=s, return_state=True)``, eager vs ``torch.compile(fullgraph=True)`` (compile
time reported; ``inductor`` needs a C++ compiler, ``aot_eager`` does not); interleaved repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from moshi_ttt import TTTLayer


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make(args, kind: str, group: int = 4) -> TTTLayer:
    torch.manual_seed(0)
    return TTTLayer(args.dim, args.heads, kind=kind, mini_batch_size=args.mini_batch,
                    checkpoint_group_size=group)  # fmt: skip


def throughput(args, kind: str) -> dict[str, float]:
    x = torch.randn(1, args.seq, args.dim)
    layer = make(args, kind)
    with torch.no_grad():
        fwd = timed(lambda: layer(x), args.repeats)
    out = {"fwd_tok_s": args.seq / fwd}
    for group in (4, 0):
        layer = make(args, kind, group)
        t = timed(lambda layer=layer: layer(x).sum().backward(), max(1, args.repeats // 2))
        out[f"fwdbwd_g{group}_tok_s"] = args.seq / t
    return out


def streaming_ms(args, kind: str, position: int, steps: int = 50, inplace: bool = True) -> float:
    layer = make(args, kind)
    layer.inplace_streaming = inplace
    x = torch.randn(1, position + steps + 1, args.dim)
    with torch.no_grad(), layer.streaming(1):
        for start in range(0, position, 4096):  # chunked prefill with carried state
            layer(x[:, start : min(position, start + 4096)])
        times = []
        for t in range(position, position + steps):
            t0 = time.perf_counter()
            layer(x[:, t : t + 1])
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[5:])


def proc_status_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def memory_child(args, kind: str, seq: int) -> None:
    """Run in a fresh process: print the peak RSS added by one forward+backward, in MiB."""
    layer = make(args, kind)
    x = torch.randn(1, seq, args.dim)
    layer(x[:, :64]).sum().backward()  # allocator and thread-pool warm-up
    layer.zero_grad(set_to_none=True)
    reset_peak_rss()
    base = proc_status_mb("VmRSS")
    layer(x).sum().backward()
    print(json.dumps({"peak_mb": proc_status_mb("VmHWM") - base}))


def peak_memory(args, kind: str, seq: int) -> float:
    cmd = [sys.executable, __file__, "--memory-child", kind, str(seq)] + [
        f"--dim={args.dim}", f"--heads={args.heads}", f"--mini-batch={args.mini_batch}"
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_mb"]


def stream_table(args) -> None:
    times = {}  # (kind, position, inplace) -> [ms]
    for _ in range(args.repeats):
        for kind in args.kinds:
            for pos in args.positions:
                for inplace in (False, True):
                    ms = streaming_ms(args, kind, pos, args.stream_steps, inplace)
                    times.setdefault((kind, pos, inplace), []).append(ms)
    head = ["kind"] + [f"{v} ms/token @{p}" for p in args.positions for v in ("before", "after")]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for kind in args.kinds:
        row = [kind] + [
            f"{statistics.median(times[(kind, p, inplace)]):.3f}"
            for p in args.positions
            for inplace in (False, True)
        ]
        print("| " + " | ".join(row) + " |")


def compile_table(args) -> None:
    """Eager vs compiled, per kind and pass; a pass whose compilation fails is reported so."""
    rows = []
    for kind in args.kinds:
        x = torch.randn(1, args.seq, args.dim)
        for name, group in (("fwd", 4), ("fwd+bwd, no ckpt", 0), ("fwd+bwd, ckpt 4", 4)):
            if args.compile_passes and name not in args.compile_passes:
                continue
            torch._dynamo.reset()
            layer = make(args, kind, group)

            def eager(x, s, layer=layer):
                return layer(x, state=s, return_state=True)

            def run(fn, layer=layer, x=x, grad=name != "fwd"):
                with torch.set_grad_enabled(grad):
                    y = fn(x, layer.initial_state(1))[0]
                if grad:
                    y.sum().backward()
                    layer.zero_grad(set_to_none=True)

            comp = torch.compile(eager, fullgraph=True, backend=args.compile)
            t0 = time.perf_counter()
            try:
                run(comp)  # compiles
            except Exception as e:  # noqa: BLE001 - reported in the table
                print(f"{kind} {name}: compile failed: {str(e).splitlines()[0][:200]}",
                      file=sys.stderr)  # fmt: skip
                rows.append([kind, name, "", "fails", "", ""])
                continue
            first = time.perf_counter() - t0
            run(eager)
            times = {"eager": [], "compiled": []}
            for _ in range(args.repeats):
                for v, fn in (("eager", eager), ("compiled", comp)):
                    t0 = time.perf_counter()
                    run(fn)
                    times[v].append(time.perf_counter() - t0)
            e, c = (statistics.median(times[v]) for v in ("eager", "compiled"))
            rows.append([kind, name, f"{args.seq / e:,.0f}", f"{args.seq / c:,.0f}",
                         f"x{e / c:.2f}", f"{first:.0f}"])  # fmt: skip
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    head = ["kind", "pass", "eager tok/s", f"compiled ({args.compile}) tok/s", "speed-up",
            "first call s"]  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--kinds", nargs="+", default=["mlp", "linear"])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--mini-batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--positions", type=int, nargs="+", default=[100, 10_000])
    p.add_argument("--memory-lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--stream-only", action="store_true")
    p.add_argument("--compile", metavar="BACKEND")
    p.add_argument("--compile-passes", nargs="+", help="subset of: fwd, 'fwd+bwd, no ckpt', ...")
    p.add_argument("--stream-steps", type=int, default=200)
    p.add_argument("--memory-child", nargs=2, metavar=("KIND", "SEQ"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        memory_child(args, args.memory_child[0], int(args.memory_child[1]))
        return

    print(
        f"# TTTLayer, dim {args.dim}, {args.heads} heads, mini-batch {args.mini_batch}, batch 1,"
        f" float32, torch {torch.__version__}, {torch.get_num_threads()} threads",
        flush=True,
    )
    if args.compile:
        compile_table(args)
        return
    if args.stream_only:
        stream_table(args)
        return
    head = ["kind", f"fwd tok/s (T={args.seq})", "fwd+bwd tok/s, ckpt 4", "fwd+bwd tok/s, no ckpt"]
    head += [f"stream ms/token @{p}" for p in args.positions]
    head += [f"peak MiB fwd+bwd T={t}" for t in args.memory_lengths]
    rows = []
    for kind in args.kinds:
        print(f"... {kind}", file=sys.stderr, flush=True)
        tp = throughput(args, kind)
        row = [kind, f"{tp['fwd_tok_s']:,.0f}", f"{tp['fwdbwd_g4_tok_s']:,.0f}",
               f"{tp['fwdbwd_g0_tok_s']:,.0f}"]  # fmt: skip
        row += [f"{streaming_ms(args, kind, pos):.2f}" for pos in args.positions]
        row += [f"{peak_memory(args, kind, t):,.0f}" for t in args.memory_lengths]
        rows.append(row)
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
