"""The associative recall memory's cost per streamed step (``integration.recall``): the tiny demo
model and Moshi 7B's shapes (dim 4096, 32,000 text tokens), the shipped setting (Dk 8192, 64
active units, keys from the hidden state and the last 4 inputs), one row.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/recall_memory.py [--device cuda] [--steps 20]

Prints ms per step of ``RecallMemory.mix`` (the write of the previous step's token, the key, the
read, the mixture) beside the memory's state in bytes. On CPU the 7B shape reads and writes the
whole float32 ``W [32000, 8192]`` (1.05 GB) every step (the scan is dense); ``--device cuda``
measures it on a GPU.
"""

from __future__ import annotations

import argparse
import time

import torch

from moshi_ttt.integration.recall import RecallMemory, RecallSetting

SHAPES = {"tiny (demo)": (64, 260), "Moshi 7B": (4096, 32000)}


def time_step(dim: int, vocab: int, setting: RecallSetting, steps: int, device: str) -> float:
    memory = RecallMemory(setting, dim, vocab)
    object.__setattr__(memory, "_head", torch.nn.Linear(dim, vocab, device=device))
    with torch.no_grad(), memory.streaming(1):
        times = []
        for i in range(steps + 2):
            h = torch.randn(1, 1, dim, device=device)
            x = torch.randn(1, 1, dim, device=device)
            logits = torch.randn(1, 1, vocab, device=device)
            memory.tokens(torch.randint(0, vocab, (1, 1), device=device))
            memory.inputs(x)
            memory.arm()
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            memory.mix(h, logits)
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= 2:  # after a warm-up
                times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    setting = RecallSetting()
    print(f"setting: {setting}; device {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)")  # fmt: skip
    print("| shape | dim | text vocab | state (GiB) | ms per step (median) |")
    print("|---|---|---|---|---|")
    for name, (dim, vocab) in SHAPES.items():
        ms = time_step(dim, vocab, setting, args.steps, args.device)
        state = 4 * vocab * setting.keys / 2**30
        print(f"| {name} | {dim} | {vocab} | {state:.3f} | {ms:.2f} |")


if __name__ == "__main__":
    main()
