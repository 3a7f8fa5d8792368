"""The GPU check: Moshi 7B with random weights, one table, in about ten minutes on one GPU.

    benchmarks/gpu_check.sh                 # 7B on CUDA (bf16), writes gpu_check_<date>.md
    benchmarks/gpu_check.sh --cpu OUT.md    # the same sections, tiny model on CPU (the tests)
    .venv/bin/python benchmarks/gpu_check.py --size 7b --out check.md

Sections (each row: section, variant, measure, value):

1. ``stream``: ``LMGen.step`` latency (CUDA graphs on GPU, moshi's default), base vs TTT-Linear
   in 1 and 8 layers, at step 100 and 10,000 (``benchmarks/streaming.py``: real steps, then the
   caches fast-forwarded); median / max ms against the 80 ms real-time budget.
2. ``train``: one optimizer step of LoRA + TTT with layer checkpointing, through the trainer's
   pieces (``benchmarks/train_step.py``): tokens/s and peak memory.
3. ``fsdp``: the same step through ``parallel.apply_fsdp`` (FSDP2, one unit per layer) on a
   1-rank process group (NCCL on GPU, gloo on CPU): tokens/s and peak memory; at tiny size the
   model comes from the sharded load (``build_sharded_model``, 64 KiB batches) and its largest
   difference from one process's build (``build_model``, new parameters drawn on the CPU in
   both) is a row: it must be 0.
4. ``eval``: long-context evaluation (``benchmarks/eval_long_context.py``): 45,000 frames
   chunked vs token by token on a prefix, frames/s and the largest CE difference.
5. ``e2e``: the end-to-end memory (``integration.e2e``; a prime MLP of 4x the width after the
   last layer, K = C/8 = 375 frames): one inner update (forward and backward over the chunk)
   against its real-time budget K x 80 ms, and ``LMGen`` steps with the live memory (eager:
   the memory's hooks do not run inside CUDA graphs), the step that updates included.
6. ``study``: ``moshi-ttt study``'s plan for the 7B on this device (``--quick`` and full): the
   meta-training memory ``moshi-ttt plan`` gives and the base's weights. The study itself needs
   the checkpoint (no download here); it runs on the tiny model in the tests.

Random weights (no download); the 7B is built on the meta device and materialised on the GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import eval_long_context  # noqa: E402
import streaming  # noqa: E402
import train_step  # noqa: E402
from moshi.models.lm import LMGen  # noqa: E402
from moshi.utils.compile import no_compile, no_cuda_graph  # noqa: E402

from moshi_ttt.format import TOKENS_PER_FRAME  # noqa: E402
from moshi_ttt.integration import TTTConfig  # noqa: E402
from moshi_ttt.integration.e2e_scan import InnerLoop, initial_weights, update  # noqa: E402
from moshi_ttt.integration.e2e_stream import LiveE2E  # noqa: E402
from moshi_ttt.recipes import RECALL_MEMORY  # noqa: E402
from moshi_ttt.train.parallel import (  # noqa: E402
    apply_activation_checkpointing,
    apply_fsdp,
    full_tensor,
)
from moshi_ttt.train.steps import build_optimizer, forward_terms  # noqa: E402

SIZES = {  # what each section runs at
    "7b": {
        "positions": [100, 10_000], "stream_steps": 48, "ttt_layers": [1, 8],
        "train_sec": 100.0, "train_steps": 3, "warmup": 1,
        "eval_frames": 45_000, "eval_chunk": 1000, "token_frames": 300, "eval_layers": "16",
    },
    "tiny": {
        "positions": [20, 200], "stream_steps": 4, "ttt_layers": [1, 4],
        "train_sec": 2.56, "train_steps": 1, "warmup": 1,
        "eval_frames": 160, "eval_chunk": 40, "token_frames": 16, "eval_layers": "1",
    },
}  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return train_step.peak_rss_gib()


# -- sections ---------------------------------------------------------------------------------
def stream_rows(size: str, s: dict, device: torch.device) -> list[tuple[str, str, str, str]]:
    model = "7b" if size == "7b" else "tiny"
    num_layers = 32 if size == "7b" else 4
    rows = []
    variants: list[tuple[str, TTTConfig | None]] = [("base", None)]
    for n in s["ttt_layers"]:
        layers = streaming.spread(n, num_layers)
        variants.append((f"TTT-Linear x{len(layers)}", TTTConfig(layers=layers, kind="linear")))
    for name, ttt in variants:
        lm = streaming.build(model, ttt, device, 3000)
        for pos in s["positions"]:
            times = streaming.step_ms(lm, pos, s["stream_steps"], True, device)
            rows.append(("stream", name, f"LMGen step @{pos:,}: median / max ms",
                         f"{statistics.median(times):.1f} / {max(times):.1f}"))  # fmt: skip
        del lm
        reset_peak(device)
    return rows


def train_args(size: str, s: dict) -> argparse.Namespace:
    return argparse.Namespace(
        gpu_7b=size == "7b", duration=s["train_sec"], batch=1, kind="linear",
        ttt_layers="0", checkpointing=True, steps=s["train_steps"], warmup=s["warmup"],
    )  # fmt: skip


def train_rows(size: str, s: dict, device: torch.device) -> list[tuple[str, str, str, str]]:
    reset_peak(device)
    r = train_step.measure(train_args(size, s), "lora+ttt", device)
    name = "LoRA r128 + TTT-Linear, ckpt" if size == "7b" else "LoRA r8 + TTT-Linear, ckpt"
    return [
        ("train", name, "tokens/s", f"{r['tokens_per_s']:,.0f}"),
        ("train", name, "step s", f"{r['step_s']:.3f}"),
        ("train", name, "peak GiB", f"{r['peak_gib']:.2f}"),
    ]


def fsdp_rows(size: str, s: dict, device: torch.device) -> list[tuple[str, str, str, str]]:
    import torch.distributed as dist

    args = train_args(size, s)
    cfg = train_step.config(args, "lora+ttt")
    if not dist.is_initialized():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(port)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=0, world_size=1)
    reset_peak(device)
    rows = []
    if size == "7b":
        lm, groups = train_step.build_7b(cfg, device)
        apply_activation_checkpointing(lm)
        apply_fsdp(lm)
        groups.rebind(lm)
    else:  # the sharded load (rank 0 reads, scatters), checked against one process's build
        from moshi_ttt.train.model import build_model, build_sharded_model

        built, groups = build_sharded_model(cfg, device, batch_bytes=2**16)
        lm = built.lm
        one = build_model(cfg, device)[0].lm.state_dict()
        diff = max(float((full_tensor(t).float() - one[n].float()).abs().max())
                   for n, t in lm.state_dict().items())  # fmt: skip
        rows.append(("fsdp", "sharded load vs one process", "max abs diff", f"{diff:.1e}"))
        del one
        apply_activation_checkpointing(lm)
    units = sum(1 for m in lm.modules() if hasattr(m, "set_gradient_divide_factor"))
    opt = build_optimizer(groups.params, groups.lrs, cfg)
    frames = cfg.frames_per_window
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, lm.card, (1, 17, frames), generator=g)
    codes[:, 0] = torch.randint(0, lm.text_card, (1, frames), generator=g)
    codes = codes.to(device)
    times = []
    for i in range(s["warmup"] + s["train_steps"]):
        sync(device)
        t0 = time.perf_counter()
        forward_terms(lm, codes, cfg).loss().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= s["warmup"]:
            times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    peak = peak_gib(device)
    del lm, opt, groups
    dist.destroy_process_group()
    reset_peak(device)
    name = f"FSDP2 1 rank ({'nccl' if device.type == 'cuda' else 'gloo'}), {units} units"
    return rows + [
        ("fsdp", name, "tokens/s", f"{frames * TOKENS_PER_FRAME / sec:,.0f}"),
        ("fsdp", name, "peak GiB", f"{peak:.2f}"),
    ]


def eval_rows(size: str, s: dict, device: torch.device) -> list[tuple[str, str, str, str]]:
    reset_peak(device)
    if size == "7b":
        lm = eval_long_context.build_7b(s["eval_layers"], device)
    else:
        from moshi_ttt.integration import apply_ttt, build_tiny_lm

        lm = build_tiny_lm(0, context=3000).to(device)
        apply_ttt(lm, TTTConfig(layers=s["eval_layers"], kind="mlp", gate_init=0.1))
        lm = lm.eval()
    codes = eval_long_context.random_codes(lm, s["eval_frames"])
    r = eval_long_context.compare(lm, codes, [s["eval_chunk"]], s["token_frames"])[0]
    name = f"{s['eval_frames']:,} frames, TTT-MLP layer {s['eval_layers']}"
    rows = [
        ("eval", name, f"chunked ({s['eval_chunk']}) frames/s", f"{r['fps']:,.1f}"),
        ("eval", name, f"token-by-token ({s['token_frames']}) frames/s",
         f"{r['token_fps']:,.1f}"),
        ("eval", name, "max CE diff (nats)", f"{r['diff']:.1e}"),
        ("eval", name, "peak GiB", f"{peak_gib(device):.2f}"),
    ]  # fmt: skip
    del lm
    reset_peak(device)
    return rows


def e2e_rows(size: str, s: dict, device: torch.device) -> list[tuple[str, str, str, str]]:
    reset_peak(device)
    dim, K = (4096, 375) if size == "7b" else (64, 16)
    ttt = TTTConfig(
        kind="e2e", layers="top:1", e2e_hidden=4 * dim, e2e_chunk=K, **RECALL_MEMORY
    )  # the shipped memory: with the recall memory beside it
    lm = streaming.build("7b" if size == "7b" else "tiny", ttt, device, 3000)
    loop = InnerLoop.of(lm)
    g = torch.Generator(device=device).manual_seed(0)
    dtype = next(lm.parameters()).dtype
    h = torch.randn(1, K, dim, generator=g, device=device).to(dtype)
    delayed = torch.randint(0, lm.card, (1, lm.num_codebooks, K), generator=g, device=device)
    delayed[:, 0] = torch.randint(0, lm.text_card, (1, K), generator=g, device=device)
    init = initial_weights(lm, 1, train=False)
    times = []
    for i in range(1 + s["train_steps"] + 2):
        sync(device)
        t0 = time.perf_counter()
        update(lm, h, 0, 0, K, [], init, delayed, loop, False, init)
        sync(device)
        if i > 0:
            times.append(1000 * (time.perf_counter() - t0))
    name = f"prime MLP x1 (width {4 * dim}), K {K}, + recall memory"
    rows = [("e2e", name, "update ms: median / max",
             f"{statistics.median(times):.1f} / {max(times):.1f}"),
            ("e2e", name, "budget K x 80 ms", f"{K * 80:,.0f}"),
            ("e2e", name, "peak GiB (update)", f"{peak_gib(device):.2f}")]  # fmt: skip
    gen = LMGen(lm, top_k=min(250, lm.card), top_k_text=min(25, lm.text_card))
    user = torch.randint(0, lm.card, (1, 8, 1), generator=g, device=device)
    steps = []
    with no_cuda_graph(), torch.no_grad(), gen.streaming(1):
        live = LiveE2E(lm)
        for _ in range(K + 2):
            sync(device)
            t0 = time.perf_counter()
            gen.step(user)
            sync(device)
            steps.append(1000 * (time.perf_counter() - t0))
        live.close()
    rows.append(("e2e", name, f"LMGen step, eager, {K + 2} steps: median / max ms",
                 f"{statistics.median(steps):.1f} / {max(steps):.1f}"))  # fmt: skip
    rows.append(("e2e", name, "updates in those steps", str(live.streamer.updates)))
    rows.append(("e2e", name, "recall memory: state GiB per conversation",
                 f"{4 * lm.text_card * lm.recall.setting.keys / 2**30:.2f}"))  # fmt: skip
    del lm, gen
    reset_peak(device)
    return rows


def study_rows(size: str, s: dict, device: torch.device) -> list[tuple[str, str, str, str]]:
    """``moshi-ttt study``'s plan for Moshi 7B on this device (no weights: the device machine
    cannot download them; the study itself runs on the tiny model in the tests)."""
    import tempfile

    from moshi_ttt.demo.frozen import FrozenBase
    from moshi_ttt.demo.study import run_study

    if size == "7b":
        model = {"source": "hf", "hf_repo": "kyutai/moshiko-pytorch-bf16"}
    else:
        model = {"source": "tiny"}
    base = FrozenBase(model, device=device.type)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(open(os.devnull, "w")):
        for quick in (True, False):
            plan = run_study(base, tmp, Path(tmp) / "out", quick=quick, dry_run=True,
                             progress=False)  # fmt: skip
            name = f"{'--quick' if quick else 'full'}: {plan.settings.frames} frames/sequence"
            rows.append(("study", name, "meta-training GiB (plan, 1 device)",
                         f"{(plan.meta_bytes or 0) / 2**30:.1f}"))  # fmt: skip
            rows.append(("study", name, "base weights GiB", f"{plan.base_bytes() / 2**30:.1f}"))
    return rows


SECTIONS = {"stream": stream_rows, "train": train_rows, "fsdp": fsdp_rows, "eval": eval_rows,
            "e2e": e2e_rows, "study": study_rows}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=["7b", "tiny"], default="7b",
                   help="7b: Moshi 7B, random bf16, CUDA; tiny: the CPU variant")  # fmt: skip
    p.add_argument("--out", default=None, help="markdown file for the table")
    p.add_argument("--sections", default=",".join(SECTIONS))
    args = p.parse_args(argv)
    size = args.size
    if size == "7b" and not torch.cuda.is_available():
        print("gpu_check: the 7B check needs a CUDA GPU; `benchmarks/gpu_check.sh --cpu` runs "
              "the CPU-sized variant", file=sys.stderr)  # fmt: skip
        return 2
    device = torch.device("cuda" if size == "7b" else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    out = Path(args.out or f"gpu_check_{datetime.datetime.now():%Y%m%d_%H%M%S}.md")
    card = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor()
    header = (
        f"# gpu_check ({size}) on {card or platform.machine()}, "
        f"{datetime.datetime.now():%Y-%m-%d %H:%M}, torch {torch.__version__}\n\n"
        f"Command: `{' '.join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])}`; "
        "real-time budget of a step: 80 ms.\n\n"
        "| section | variant | measure | value |\n|---|---|---|---|\n"
    )
    rows = []
    eager = no_compile() if device.type == "cpu" else contextlib.nullcontext()
    start = time.perf_counter()
    with eager:
        for name in args.sections.split(","):
            t0 = time.perf_counter()
            rows += SECTIONS[name](size, SIZES[size], device)
            print(f"gpu_check: {name} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    table = header + "".join(f"| {' | '.join(r)} |\n" for r in rows)
    table += f"\nTotal {time.perf_counter() - start:.0f} s.\n"
    out.write_text(table)
    print(table, end="")
    print(f"gpu_check: wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
