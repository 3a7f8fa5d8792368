"""The batched streaming engine: up to B conversations advance together, one ``LMGen`` step.

Each conversation owns one row of the batch. Moshi's streaming state (Mimi's convolutions and
transformers, LMGen's delay cache, the KV caches) and the TTT fast weights all live per row:
- a row joins with ``reset_streaming(mask)`` on that row only (moshi's per-element reset), then,
  when a conversation resumes, its saved TTT state is written into the row;
- on every tick, the rows that have a frame of input run and the others are frozen with moshi's
  exec masks (their state is unchanged, as if the step had not happened).

Not thread-safe: one thread at a time calls ``join`` / ``leave`` / ``step`` (the server's engine
thread). ``ttt_state`` / ``load_ttt_state`` read and write one row's TTT fast weights.
"""

from __future__ import annotations

import contextlib
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import torch
from moshi.models.compression import MimiModel
from moshi.models.lm import LMGen, LMModel
from moshi.utils.compile import no_compile, no_cuda_graph
from torch import nn

from ..generate import TEXT_EPAD, TEXT_PAD
from ..integration.e2e import e2e_layers
from ..integration.e2e_stream import LiveE2E
from ..integration.streaming import has_live_hooks, reset_ttt_states, ttt_states
from .memory_stats import MemoryStats


def ttt_state_modules(model: nn.Module) -> list[tuple[str, object]]:
    """``(module name, streaming state)`` of every TTT layer of ``model`` that is streaming."""
    return ttt_states(model)


def ttt_state(model: nn.Module, row: int) -> dict[str, torch.Tensor]:
    """Row ``row`` of every TTT fast-weight tensor (cloned, on the CPU), by ``layer.i`` name."""
    return {
        f"{name}.{i}": t[row].detach().to("cpu", copy=True).contiguous()
        for name, state in ttt_state_modules(model)
        for i, t in enumerate(state.tensors())
    }


def load_ttt_state(model: nn.Module, row: int, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` (from ``ttt_state``) into row ``row``, bit for bit. The names, shapes
    and dtypes must match this model's TTT layers exactly, else ``ValueError`` (nothing written)."""
    targets = {
        f"{name}.{i}": t
        for name, state in ttt_state_modules(model)
        for i, t in enumerate(state.tensors())
    }
    if set(targets) != set(tensors):
        raise ValueError(
            f"saved TTT state does not fit this model: tensors {sorted(tensors)[:4]}..., "
            f"model has {sorted(targets)[:4]}..."
        )
    for key, dst in targets.items():
        src = tensors[key]
        if tuple(src.shape) != tuple(dst.shape[1:]) or src.dtype != dst.dtype:
            raise ValueError(
                f"saved TTT state {key}: {tuple(src.shape)} {src.dtype}, expected "
                f"{tuple(dst.shape[1:])} {dst.dtype}"
            )
    for key, dst in targets.items():
        dst[row].copy_(tensors[key].to(dst.device))


@dataclass
class RowOutput:
    """What one row produced in a tick: Moshi's text token and one frame of audio."""

    text_token: int
    pcm: np.ndarray  # [frame_size] float32


class Engine:
    """``batch_size`` rows of Moshi (+ TTT) streaming, stepped together.

    ``step(pcm [B, frame], active [B])`` encodes the active rows' frames with Mimi, runs one
    ``LMGen`` step and decodes Moshi's audio; returns per row a ``RowOutput``, or None for rows
    that were idle or are still filling LMGen's delays. As in ``moshi.server``, a row's first
    input frame is encoded and then Mimi's encoder state of the row is reset (its left padding is
    applied again to the next frame).
    """

    def __init__(
        self,
        lm: LMModel,
        mimi: MimiModel,
        batch_size: int,
        *,
        greedy: bool = False,
        temp: float = 0.8,
        temp_text: float = 0.7,
        top_k: int = 250,
        top_k_text: int = 25,
    ):
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        if lm.training:
            raise ValueError("serving needs the model in eval mode (lm.eval())")
        self.lm, self.mimi, self.batch_size = lm, mimi, batch_size
        self.device = lm.device
        self.mimi_device = next(mimi.parameters()).device
        self.frame_size = int(mimi.frame_size)
        self.n_in = lm.n_q - lm.dep_q
        self.gen = LMGen(
            lm,
            use_sampling=not greedy,
            temp=temp,
            temp_text=temp_text,
            top_k=min(top_k, lm.card),
            top_k_text=min(top_k_text, lm.text_card),
            support_out_of_sync=True,  # rows at different offsets: always return the tokens
        )
        self._stack = ExitStack()
        self._eager = (
            no_compile if self.device.type == "cpu" else contextlib.nullcontext
        )  # moshi compiles lazily; eager on CPU as in ``generate``
        with torch.no_grad(), self._eager():
            if has_live_hooks(lm) and self.device.type == "cuda":
                self._stack.enter_context(no_cuda_graph())  # the live memories' hooks must run
            self._stack.enter_context(mimi.streaming(batch_size))
            self._stack.enter_context(self.gen.streaming(batch_size))
        # the end-to-end memory learns while it streams (its updates are timed there)
        self.live = LiveE2E(lm) if e2e_layers(lm) else None
        self.memory = MemoryStats(lm, self.live, batch_size)  # the web page's memory panel
        self.first = np.zeros(batch_size, dtype=bool)  # the row's next frame is its first
        self.closed = False

    def close(self) -> None:
        """Leave streaming mode (the model can then stream elsewhere)."""
        if not self.closed:
            if self.live is not None:
                self.live.close()
            self._stack.close()
            self.closed = True

    def _mask(self, rows: list[int] | np.ndarray) -> torch.Tensor:
        mask = torch.zeros(self.batch_size, dtype=torch.bool)
        mask[torch.as_tensor(rows, dtype=torch.long)] = True
        return mask

    @torch.no_grad()
    def join(
        self,
        row: int,
        ttt: dict[str, torch.Tensor] | None = None,
        memory: dict | None = None,
    ) -> None:
        """Start a conversation in ``row``: reset only that row's streaming state (Mimi, LMGen,
        KV caches, TTT), then restore ``ttt`` (a saved TTT state) if given, and ``memory`` (the
        memory panel's counters, ``MemoryStats.export``)."""
        mask = self._mask([row])
        with self._eager():
            self.mimi.reset_streaming(mask.to(self.mimi_device))
            self.gen.reset_streaming(mask.to(self.device))
            if ttt is not None:
                load_ttt_state(self.lm, row, ttt)
        self.memory.join(row, memory)
        self.first[row] = True

    @torch.no_grad()
    def reset_memory(self, row: int) -> None:
        """Restart the memories of ``row`` only (TTT fast weights, the end-to-end memory and its
        unfinished chunk, the recall memory: ``reset_ttt_states``); the conversation goes on
        (Mimi, LMGen and the attention caches are untouched)."""
        with self._eager():
            reset_ttt_states(self.lm, self._mask([row]).to(self.device))
        self.memory.memory_reset(row)

    def ttt_state(self, row: int) -> dict[str, torch.Tensor]:
        """The TTT fast weights of ``row`` now (CPU copies)."""
        return ttt_state(self.lm, row)

    @torch.no_grad()
    def step(self, pcm: np.ndarray, active: np.ndarray) -> list[RowOutput | None]:
        """One 80 ms frame for the ``active`` rows (``pcm [B, frame_size]`` float32)."""
        if not active.any():
            return [None] * self.batch_size
        act = torch.from_numpy(np.asarray(active, dtype=bool))
        x = torch.from_numpy(np.ascontiguousarray(pcm, dtype=np.float32))
        x = x.to(self.mimi_device).view(self.batch_size, 1, self.frame_size)
        with self._eager():
            self.mimi.set_exec_mask(act.to(self.mimi_device))
            codes = self.mimi.encode(x)  # [B, K, 1]
            first = self.first & active
            if first.any():  # moshi.server: the first frame is in the past; re-pad the next
                self.mimi.reset_streaming(torch.from_numpy(first).to(self.mimi_device))
                self.first[first] = False
            self.gen.set_exec_mask(act.to(self.device))
            out = self.gen.step(codes[:, : self.n_in].to(self.device))  # [B, 1 + dep_q, 1]
            self.memory.after_step(act)
            valid = act.to(out.device) & (out[:, :, 0] >= 0).all(dim=1)
            if not valid.any():
                return [None] * self.batch_size
            audio = torch.where(valid[:, None, None], out[:, 1:], torch.zeros_like(out[:, 1:]))
            self.mimi.set_exec_mask(valid.to(self.mimi_device))
            wav = self.mimi.decode(audio.to(self.mimi_device)).float().cpu().numpy()
        tokens = out[:, 0, 0].cpu().tolist()
        valid_np = valid.cpu().numpy()
        return [
            RowOutput(int(tokens[b]), wav[b, 0]) if valid_np[b] else None
            for b in range(self.batch_size)
        ]


def is_text(token: int) -> bool:
    """Whether a text token is a word piece (not padding)."""
    return token not in (TEXT_PAD, TEXT_EPAD)
