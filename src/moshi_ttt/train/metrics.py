"""What a run records: ``metrics.jsonl`` (one JSON object per logged step), TensorBoard scalars,
``train.log`` (the human messages) and the TTT gate values."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from ..integration.apply import ttt_modules
from ..integration.hybrid import GatedTTT
from .parallel import full_tensor

GATE_FALL = 0.25  # a gate below this fraction of its peak has "fallen"
GATE_MIN_PEAK = 0.05  # ... once it had reached at least this much
NO_GAIN_NATS = 0.01  # a branch improving the batch's loss by less than this brings no gain


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
    """Squared gradient norms per group, summed over this rank's shards (all-reduce them). A
    gradient that is not sharded under several processes is whole on every rank (FSDP2's
    replicated parameters): its square counts once in the all-reduced sum."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    out = {}
    for group, named in groups.items():
        squares = []
        for _, p in named:
            if p.grad is None:
                continue
            if hasattr(p.grad, "to_local"):
                squares.append(p.grad.to_local().detach().float().pow(2).sum())
            else:
                squares.append(p.grad.detach().float().pow(2).sum() / world)
        out[group] = torch.stack(squares).sum().cpu() if squares else torch.zeros(())
    return out


class CollapseGuard:
    """Detects the earlier attempt's failure: TTT gates falling toward 0 while the TTT branches
    bring no gain (the zero-gate saddle: with ``y = x + tanh(alpha) f(x)`` a noisy ``f`` pushes
    alpha to 0, which then starves ``f`` of gradient).

    ``fallen(gates)`` is cheap (gate values only); when it is true the trainer measures the
    branches' gain on the current batch (loss with the gates forced to 0 minus the loss) and
    calls ``verdict``, which returns the warning once (None otherwise).
    """

    def __init__(self, gates: dict[str, float]):
        self.peak = dict(gates)
        self.peak_step = dict.fromkeys(gates, 0)
        self.warned = False

    def fallen(self, step: int, gates: dict[str, float]) -> bool:
        """Update the peaks; True when every gate is below ``GATE_FALL`` x its peak (and the
        peak reached ``GATE_MIN_PEAK``)."""
        for k, g in gates.items():
            if g > self.peak.get(k, -1.0):
                self.peak[k], self.peak_step[k] = g, step
        return (
            bool(gates)
            and not self.warned
            and all(self.peak[k] >= GATE_MIN_PEAK and g < GATE_FALL * self.peak[k]
                    for k, g in gates.items())
        )  # fmt: skip

    def verdict(self, step: int, gates: dict[str, float], gain: float | None) -> str | None:
        """The warning text if the fallen gates come with no gain (``gain`` in nats; None =
        not measurable, e.g. with carried state: the gates decide alone)."""
        if gain is not None and gain >= NO_GAIN_NATS:
            return None
        self.warned = True
        falls = ", ".join(
            f"layer {k.removeprefix('gate/')} {self.peak[k]:.3f} (step {self.peak_step[k]}) "
            f"-> {g:.3f}"
            for k, g in gates.items()
        )
        measured = (
            f"the TTT branches improve this batch's loss by only {gain:.4f} nats"
            if gain is not None
            else "their gain could not be measured (carried state)"
        )
        return (
            f"step {step}: warning: TTT gate collapse: the gates fell below "
            f"{GATE_FALL:.0%} of their peak ({falls}) and {measured}. The memory is being "
            "switched off (the earlier attempt's failure). Try a lower ttt_lr, "
            "ttt.output_init: zero (no gate saddle), or see docs/retrofit.md."
        )
