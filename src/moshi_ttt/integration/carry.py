"""Carrying the TTT fast-weight state across consecutive training windows (``state_carry``).

A long file is trained on as consecutive windows, each a separate forward. With
``data.state_carry: detached`` each TTT branch starts a window from the fast weights it ended the
previous window of the same file with (per batch row = lane), cut from the autograd graph, and
from its initial weights when the row starts a new file (``Batch.reset``).

The carry is an explicit object, never stored in parameters::

    carry = StateCarry(lm)              # attaches itself to every gated TTT branch
    carry.begin(batch.reset)            # before the micro-batch's forward
    loss = objective(lm(codes)); loss.backward()
    carry.commit()                      # after its backward: outputs become the next inputs

Inputs are fixed during a micro-batch and outputs are written to a separate slot, so activation
checkpointing (which runs the forward again during backward) reads the same input state twice.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ttt import FastState
from .hybrid import GatedTTT


class StateCarry:
    """Per-branch fast-weight states carried from window to window, one row per lane."""

    def __init__(self, model: nn.Module) -> None:
        self.branches = [m for m in model.modules() if isinstance(m, GatedTTT)]
        if not self.branches:
            raise ValueError(
                "state_carry needs gated TTT branches (kind linear or mlp); the model has none"
            )
        self._inputs: dict[GatedTTT, FastState | None] = {m: None for m in self.branches}
        self._outputs: dict[GatedTTT, FastState] = {}
        self._reset: torch.Tensor | None = None
        self._lanes: list[int] | None = None  # lane of each row of the carried inputs
        self._next_lanes: list[int] | None = None
        self.attach()

    def attach(self) -> None:
        """Make the model's branches read and write this carry (another one may have had them)."""
        for m in self.branches:
            m.carry = self

    def detach_from_model(self) -> None:
        """Stop carrying: every branch starts from its initial weights again."""
        for m in self.branches:
            m.carry = None

    def begin(self, reset: torch.Tensor, lanes: list[int] | None = None) -> None:
        """Start a micro-batch. ``reset [B]`` bool: rows that start a new file; ``lanes``: the
        lane of each row (default ``0..B-1``); rows of lanes that ran dry are dropped."""
        self._reset = reset.to(torch.bool)
        self._next_lanes = list(range(len(reset))) if lanes is None else list(lanes)
        self._outputs.clear()

    def commit(self) -> None:
        """The states the micro-batch ended with (detached) are the next micro-batch's inputs."""
        for m in self.branches:
            if m in self._outputs:
                self._inputs[m] = self._outputs[m]
        self._lanes = self._next_lanes
        self._outputs.clear()

    def clear(self) -> None:
        """Forget every carried state (e.g. before an evaluation or after a skipped step)."""
        self._inputs = {m: None for m in self.branches}
        self._outputs.clear()
        self._lanes = None

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The carried input states as flat tensors (``branch{i}.{delta|grad_sum}{j}``, ``.pos``)
        plus ``lanes``; empty when nothing is carried."""
        out: dict[str, torch.Tensor] = {}
        for i, m in enumerate(self.branches):
            s = self._inputs[m]
            if s is None:
                continue
            for j, t in enumerate(s.delta):
                out[f"branch{i}.delta{j}"] = t
            for j, t in enumerate(s.grad_sum):
                out[f"branch{i}.grad_sum{j}"] = t
            out[f"branch{i}.pos"] = s.pos
        if out and self._lanes is not None:
            out["lanes"] = torch.tensor(self._lanes, dtype=torch.long)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.clear()
        for i, m in enumerate(self.branches):
            if f"branch{i}.pos" not in state:
                continue
            n = len(m.layer.initial_state(1).delta)
            dev = m.alpha.device
            self._inputs[m] = FastState(
                tuple(state[f"branch{i}.delta{j}"].to(dev) for j in range(n)),
                tuple(state[f"branch{i}.grad_sum{j}"].to(dev) for j in range(n)),
                state[f"branch{i}.pos"].to(dev),
            )
        if "lanes" in state:
            self._lanes = state["lanes"].tolist()

    # -- called by GatedTTT.forward -------------------------------------------------------------
    def state_for(self, branch: GatedTTT, batch_size: int) -> FastState:
        """The input state of ``branch``: carried rows, fresh rows where ``reset``."""
        fresh = branch.layer.initial_state(batch_size)
        prev = self._inputs.get(branch)
        if prev is None or self._reset is None:
            return fresh
        lanes, wanted = self._lanes, self._next_lanes
        if lanes is not None and wanted is not None and wanted != lanes[: prev.batch_size]:
            rows = [lanes.index(lane) for lane in wanted]
            prev = _rows(prev, torch.tensor(rows, device=prev.pos.device))
        if prev.batch_size != batch_size or self._reset.shape[0] != batch_size:
            raise ValueError(
                f"state_carry: the carried state has {prev.batch_size} rows, the batch "
                f"{batch_size} (reset mask {tuple(self._reset.shape)}); lanes must not change"
            )
        keep = ~self._reset.to(prev.pos.device)
        return prev.select(keep, fresh)

    def store(self, branch: GatedTTT, state: FastState) -> None:
        self._outputs[branch] = state.detach()


def _rows(state: FastState, index: torch.Tensor) -> FastState:
    """The rows ``index`` of ``state``."""
    return FastState(
        tuple(t.index_select(0, index) for t in state.delta),
        tuple(t.index_select(0, index) for t in state.grad_sum),
        state.pos.index_select(0, index),
    )
