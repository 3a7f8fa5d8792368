"""Host memory and file reads of the sharded load (``train.model.build_sharded_model``), per rank.

Two commands:

    # a checkpoint directory (config.json + model.safetensors) of about GIB GiB of random
    # float32 weights, in moshi's format, written a tensor at a time
    python benchmarks/sharded_load.py make DIR --gib 2

    # load CONFIG's model sharded over the ranks (gloo on CPU, nccl on GPU) and report
    torchrun --nproc-per-node=2 benchmarks/sharded_load.py load CONFIG.yaml [CONFIG2.yaml ...] \
        --out result.json [--batch-mib 512] [--compare]

``load`` writes, per config and rank: the resident memory before the load, its peak during the
load (``VmHWM`` after resetting it through ``/proc/self/clear_refs``), the bytes of the rank's
own shards, seconds, and how many times the rank opened a weights file (safetensors reads by
moshi-ttt and by moshi). ``--compare``: rank 0 then builds the same model in one process
(``build_model`` on the CPU) and reports the largest difference over every tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch


def _status(key: str) -> int:
    """A ``/proc/self/status`` field in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class _Reads:
    """Counts weights-file opens in this process (moshi-ttt's and moshi's safetensors reads)."""

    def __init__(self) -> None:
        from moshi.models import loaders

        from moshi_ttt.models import files

        self.count = 0
        for module, name in ((files, "safe_open"), (files, "load_file"), (loaders, "load_file")):
            setattr(module, name, self._counted(getattr(module, name)))

    def _counted(self, fn):  # noqa: ANN001, ANN202
        def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            self.count += 1
            return fn(*args, **kwargs)

        return wrapper


def make(directory: Path, gib: float) -> None:
    """A tiny-architecture checkpoint widened to about ``gib`` GiB of float32 weights."""
    from safetensors.torch import save_file

    from moshi_ttt.integration.tiny import tiny_lm_kwargs
    from moshi_ttt.models.build import meta_base

    dim = 1024
    kwargs = tiny_lm_kwargs(dim=dim, num_heads=8, depformer_dim=256)

    def numel(layers: int) -> int:
        lm = meta_base({**kwargs, "num_layers": layers}, None, torch.float32)
        return sum(t.numel() for t in lm.state_dict().values())

    fixed, per_layer = numel(0), numel(1) - numel(0)
    kwargs["num_layers"] = max(1, round((gib * 2**30 / 4 - fixed) / per_layer))
    lm = meta_base(kwargs, None, torch.float32)
    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    state = {n: torch.randn(t.shape, generator=gen) * 0.02 for n, t in lm.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({**kwargs, "model_type": "moshi"}))
    size = (directory / "model.safetensors").stat().st_size
    print(f"{directory}: {kwargs['num_layers']} layers of dim {dim}, {size / 2**30:.2f} GiB")


def load(configs: list[Path], out: Path | None, batch_mib: float, compare: bool) -> None:
    from moshi_ttt.train.config import TrainConfig
    from moshi_ttt.train.model import build_model, build_sharded_model
    from moshi_ttt.train.parallel import init_distributed, shutdown_distributed

    reads = _Reads()
    d = init_distributed("auto")
    results = []
    for path in configs:
        cfg = TrainConfig.load(path)
        reads.count = 0
        torch.distributed.barrier()
        before = _status("VmRSS")
        exact_peak = _reset_peak()
        start = time.perf_counter()
        model, _ = build_sharded_model(cfg, d.device, batch_bytes=int(batch_mib * 2**20))
        seconds = time.perf_counter() - start
        peak = _status("VmHWM") if exact_peak else _status("VmRSS")
        local = [getattr(t, "to_local", lambda t=t: t)() for t in model.lm.state_dict().values()]
        row = {
            "config": str(path),
            "rank": d.rank,
            "world": d.world_size,
            "device": str(d.device),
            "rss_before": before,
            "peak_rss": peak,
            "peak_exact": exact_peak,
            "shard_bytes": sum(t.numel() * t.element_size() for t in local),
            "seconds": seconds,
            "weights_opened": reads.count,
            "batch_bytes": int(batch_mib * 2**20),
        }
        full = {}
        if compare:  # every rank gathers (a collective), rank 0 compares
            full = {n: t.full_tensor() if hasattr(t, "full_tensor") else t
                    for n, t in model.lm.state_dict().items()}  # fmt: skip
        if compare and d.is_main:
            one, _ = build_model(cfg, torch.device("cpu"))
            ref = one.lm.state_dict()
            row["same_keys"] = sorted(ref) == sorted(full)
            row["max_abs_diff"] = max(
                float((full[n].float().cpu() - ref[n].float()).abs().max()) for n in ref
            )
        del model, full
        rows: list = [None] * d.world_size
        torch.distributed.all_gather_object(rows, row)
        results.append(rows)
        if d.is_main:
            for r in rows:
                print(json.dumps(r), flush=True)
    if d.is_main and out is not None:
        out.write_text(json.dumps(results, indent=1) + "\n")
    shutdown_distributed()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make", help="write a checkpoint directory of random weights")
    mk.add_argument("directory", type=Path)
    mk.add_argument("--gib", type=float, default=2.0)
    ld = sub.add_parser("load", help="load configs sharded (run under torchrun)")
    ld.add_argument("configs", type=Path, nargs="+")
    ld.add_argument("--out", type=Path)
    ld.add_argument("--batch-mib", type=float, default=512)
    ld.add_argument("--compare", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if a.cmd == "make":
        make(a.directory, a.gib)
    else:
        load(a.configs, a.out, a.batch_mib, a.compare)
    return 0


if __name__ == "__main__":
    sys.exit(main())
