"""What a run records: ``metrics.jsonl`` (one JSON object per logged step), TensorBoard scalars,
``train.log`` (the human messages) and the TTT gate values."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..integration.apply import ttt_modules
from ..integration.hybrid import GatedTTT
from .parallel import full_tensor

GATE_COLLAPSE = 1e-3  # mean |tanh(alpha)| below this counts as switched off


class MetricsWriter:
    """Rank 0's record of a run (the other ranks get ``None`` writers and log nothing)."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.log_path = self.run_dir / "train.log"
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))

    def log_metrics(self, record: dict[str, Any]) -> None:
        """Append ``record`` (needs ``step``) to metrics.jsonl (non-finite -> null) and TB."""
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None)
                 for k, v in record.items()}  # fmt: skip
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        if self._tb is not None:
            split = record.get("split", "train")
            for key, value in record.items():
                if key not in ("step", "split") and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{split}/{key}", value, record["step"])

    def message(self, text: str) -> None:
        """Print (above the progress bar) and append to train.log."""
        tqdm.write(text)
        with self.log_path.open("a") as f:
            f.write(text + "\n")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def truncate_metrics(path: str | Path, step: int) -> None:
    """Drop the records after ``step`` (a resumed run rewrites them)."""
    path = Path(path)
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]  # fmt: skip
    path.write_text("".join(line + "\n" for line in keep))


@torch.no_grad()
def gate_values(lm: nn.Module) -> dict[str, float]:
    """``gate/<layer>``: mean |tanh(alpha)| of every gated TTT branch (a collective under FSDP:
    every rank calls it)."""
    out = {}
    for name, module in ttt_modules(lm):
        if isinstance(module, GatedTTT):
            alpha = full_tensor(module.alpha.detach()).float()
            layer = name.removesuffix(".ttt").removeprefix("transformer.layers.")
            out[f"gate/{layer}"] = float(torch.tanh(alpha).abs().mean())
    return out


def grad_norms(groups: dict[str, list[tuple[str, nn.Parameter]]]) -> dict[str, torch.Tensor]:
    """Squared gradient norms per group, summed over this rank's shards (all-reduce them)."""
    out = {}
    for group, named in groups.items():
        local = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                 for _, p in named if p.grad is not None]  # fmt: skip
        squares = [g.detach().float().pow(2).sum() for g in local]
        out[group] = torch.stack(squares).sum().cpu() if squares else torch.zeros(())
    return out
