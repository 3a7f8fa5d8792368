"""Training-step throughput and peak memory, through the trainer's own pieces.

One optimizer step = ``forward_terms`` (the trainer's forward + loss) -> backward -> AdamW step,
on random codes, for: the base alone with LoRA, TTT alone, LoRA + TTT. Prints a table of
tokens/s (9 tokens per frame: text + 8 Moshi codebooks, moshi-finetune's convention) and the
peak memory of a step.

    python benchmarks/train_step.py                    # tiny model, CPU
    python benchmarks/train_step.py --gpu-7b           # Moshi 7B config, random bf16 weights,
                                                       # duration_sec 100 (moshi-finetune: ~12k
                                                       # tokens/s, 39.6 GB for LoRA on one H100)
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from moshi.models import loaders
from moshi.models.lm import LMModel

from moshi_ttt.format import TOKENS_PER_FRAME
from moshi_ttt.integration import apply_ttt
from moshi_ttt.models.lora import apply_lora
from moshi_ttt.train.config import TrainConfig
from moshi_ttt.train.model import build_model, select_trainable
from moshi_ttt.train.parallel import apply_activation_checkpointing
from moshi_ttt.train.steps import build_optimizer, forward_terms

VARIANTS = {
    "lora": {"lora": {"enable": True, "rank": 128}, "ttt": None},
    "ttt": {"lora": {"enable": False}},
    "lora+ttt": {"lora": {"enable": True, "rank": 128}},
}


def config(args: argparse.Namespace, variant: str) -> TrainConfig:
    data = {
        "duration_sec": args.duration, "batch_size": args.batch,
        "data": {"train": ["unused.jsonl"]},
        "ttt": {"layers": args.ttt_layers, "kind": args.kind, "gate_init": 0.1},
        "model": {"gradient_checkpointing": args.checkpointing},
    }  # fmt: skip
    data.update(VARIANTS[variant])
    data["lora"] = {**data["lora"], "rank": 128 if args.gpu_7b else 8}
    return TrainConfig.from_dict(data)


def build_7b(cfg: TrainConfig, device: torch.device) -> tuple[LMModel, object]:
    """Moshi 7B architecture with random bfloat16 weights (no download), LoRA/TTT as ``cfg``."""
    with torch.device(device):
        lm = LMModel(**loaders._lm_kwargs, device=device, dtype=torch.bfloat16)
    if cfg.lora.enable:
        apply_lora(lm, rank=cfg.lora.rank, scaling=cfg.lora.scaling)
    if cfg.ttt is not None:
        apply_ttt(lm, cfg.ttt)
    groups = select_trainable(lm, cfg)
    return lm.train(), groups


def measure(args: argparse.Namespace, variant: str, device: torch.device) -> dict[str, float]:
    cfg = config(args, variant)
    if args.gpu_7b:
        lm, groups = build_7b(cfg, device)
    else:
        built, groups = build_model(cfg, device)
        lm = built.lm
    if cfg.model.gradient_checkpointing:
        apply_activation_checkpointing(lm)
    opt = build_optimizer(groups.params, groups.lrs, cfg)
    frames = cfg.frames_per_window
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, lm.card, (cfg.batch_size, 17, frames), generator=g)
    codes[:, 0] = torch.randint(0, lm.text_card, (cfg.batch_size, frames), generator=g)
    codes = codes.to(device)

    def step() -> None:
        forward_terms(lm, codes, cfg).loss().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset the peak RSS (VmHWM) to the current RSS
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else peak_rss_gib()
    trainable = sum(groups.num_params().values())
    opt.state.clear()  # free the optimizer state before the next variant
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "tokens_per_s": cfg.batch_size * frames * TOKENS_PER_FRAME / sec,
        "step_s": sec,
        "peak_gib": peak,
        "trainable_m": trainable / 1e6,
    }


def peak_rss_gib() -> float:
    """Peak resident memory of this process since the last reset (Linux ``VmHWM``), GiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu-7b", action="store_true", help="Moshi 7B config on cuda (bf16)")
    p.add_argument("--duration", type=float, help="seconds per window (tiny 10, 7B 100)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--kind", default="mlp", choices=["linear", "mlp", "inplace"])
    p.add_argument("--ttt-layers", default="middle")
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (tiny)")
    p.add_argument("--variants", default="lora,ttt,lora+ttt")
    args = p.parse_args()
    if args.duration is None:
        args.duration = 100.0 if args.gpu_7b else 10.0
    device = torch.device("cuda" if args.gpu_7b else "cpu")
    if not args.gpu_7b:
        torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name() if args.gpu_7b else platform.processor() or "cpu"
    model = "Moshi 7B (random bf16)" if args.gpu_7b else "tiny"
    print(f"# {model} on {name}, torch {torch.__version__}, duration {args.duration} s, "
          f"batch {args.batch}, TTT {args.kind} layers {args.ttt_layers}, "
          f"checkpointing {args.checkpointing}")  # fmt: skip
    mem = "peak GPU memory" if args.gpu_7b else "peak RSS (process)"
    print(f"| variant | trainable (M) | step (s) | tokens/s | {mem} (GiB) |")
    print("|---|---|---|---|---|")
    for variant in args.variants.split(","):
        r = measure(args, variant, device)
        print(f"| {variant} | {r['trainable_m']:.2f} | {r['step_s']:.3f} | "
              f"{r['tokens_per_s']:,.0f} | {r['peak_gib']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
