"""In-Place TTT (arXiv 2604.06169) on the output projection of Moshi's FFN.

Moshi's FFN is ``gating.linear_out(Z)`` with the hidden ``Z = silu(x W_a) * (x W_b)`` ``[T, h]``.
Sequences are cut into chunks of C frames (per sequence, from its start); for chunk i

    W_down(i) = W_down(0) + sum_{j<i} dW_j,      dW_j = lr * (conv(X)_j W_target)^T Z_j   [D, h]
    out_i     = Z_i W_down(i)^T                  (apply, then update)

with X the FFN input (``norm2(x)``) or the token embeddings, ``conv`` a causal depthwise Conv1d
computed *inside each chunk* (zero-initialised: the model starts as the base model) and
``W_target`` ``[D, D]`` initialised to the identity. Writing ``V = conv(X)`` and
``A_i = sum_{j<i} V_j^T Z_j`` (``[D, h]``), the output correction is
``Z_i (sum_{j<i} dW_j)^T = lr * Z_i A_i^T W_target``.

Two forms, same numbers (float32 inner math, float64 for float64 inputs):
- parallel (training): ``lr * ((Z Z^T) * [chunk(s) < chunk(t)]) V W_target``, the dual of the
  cumsum over chunks, O(T^2 h) and no ``[D, h]`` matrix per chunk;
- carried state (streaming, any T >= 1): ``A`` (completed chunks), ``P`` (the current chunk's
  partial sum), the last k-1 conv inputs of the current chunk and the position in the chunk, per
  sequence. ``P`` is folded into ``A`` when its chunk ends. No host synchronisation.
Parameters are never written by a forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from moshi.modules.streaming import StreamingModule
from moshi.modules.transformer import StreamingTransformerLayer
from torch import nn

from ..layer import TTTState
from .hybrid import AdoptingLayer


@dataclass
class InPlaceFast:
    """The In-Place fast-weight state of one layer for B sequences (no parameters inside).

    - ``acc``: ``[B, D, h]``, ``sum conv(X)^T Z`` over the completed chunks (A above);
    - ``partial``: ``[B, D, h]``, the same sum over the frames seen in the current chunk (P);
    - ``history``: ``[B, k-1, D]``, the last k-1 conv inputs (only those of the current chunk
      are ever used);
    - ``pos``: ``[B]`` int64, frames already seen in the current chunk (0 .. C-1).
    """

    acc: torch.Tensor
    partial: torch.Tensor
    history: torch.Tensor
    pos: torch.Tensor

    @staticmethod
    def zeros(
        batch_size: int,
        dim: int,
        hidden: int,
        kernel: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> InPlaceFast:
        acc = torch.zeros(batch_size, dim, hidden, device=device, dtype=dtype)
        return InPlaceFast(
            acc=acc,
            partial=torch.zeros_like(acc),
            history=torch.zeros(batch_size, kernel - 1, dim, device=device, dtype=dtype),
            pos=torch.zeros(batch_size, device=device, dtype=torch.long),
        )

    @property
    def batch_size(self) -> int:
        return self.pos.shape[0]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.acc, self.partial, self.history, self.pos)

    def zeros_like(self) -> InPlaceFast:
        return InPlaceFast(*(torch.zeros_like(t) for t in self.tensors()))

    def detach(self) -> InPlaceFast:
        return InPlaceFast(*(t.detach().clone() for t in self.tensors()))

    def copy_(self, other: InPlaceFast) -> None:
        """Write ``other`` into this state's tensors in place (CUDA-graph safe)."""
        for dst, src in zip(self.tensors(), other.tensors(), strict=True):
            dst.copy_(src)

    def select(self, keep: torch.Tensor, other: InPlaceFast) -> InPlaceFast:
        """Per sequence, ``self`` where ``keep[b]`` else ``other``. keep: bool ``[B]``."""

        def pick(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.where(keep.view((-1,) + (1,) * (a.dim() - 1)), a, b)

        return InPlaceFast(
            *(pick(a, b) for a, b in zip(self.tensors(), other.tensors(), strict=True))
        )


def chunked_causal_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    chunk_size: int,
    pos: torch.Tensor | None = None,
    history: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal depthwise conv that restarts at every chunk boundary.

    x ``[B, T, D]``; weight ``[D, k]`` (Conv1d layout: ``y_t = sum_m w[:, m] x_{t-k+1+m}``);
    pos ``[B]``: frames already in the current chunk before ``x[:, 0]``; history
    ``[B, k-1, D]``: the inputs before ``x[:, 0]``. Inputs of earlier chunks are never used.
    """
    B, T, D = x.shape
    k = weight.shape[1]
    if pos is None:
        pos = torch.zeros(B, dtype=torch.long, device=x.device)
    if history is None:
        history = x.new_zeros(B, k - 1, D)
    xp = torch.cat([history.to(x.dtype), x], dim=1)  # [B, k-1+T, D]
    in_chunk = (pos.view(B, 1) + torch.arange(T, device=x.device)) % chunk_size  # [B, T]
    out = x.new_zeros(B, T, D)
    for lag in range(k):
        shifted = xp[:, k - 1 - lag : k - 1 - lag + T]  # x_{t - lag}
        valid = (in_chunk >= lag).unsqueeze(-1)
        out = out + torch.where(valid, shifted, 0.0) * weight[:, k - 1 - lag]
    return out


def inplace_correction(
    z: torch.Tensor,
    x: torch.Tensor,
    conv_weight: torch.Tensor,
    target: torch.Tensor,
    lr: float,
    chunk_size: int,
    state: InPlaceFast | None = None,
    return_state: bool = False,
) -> tuple[torch.Tensor, InPlaceFast | None]:
    """The fast-weight part of ``gating.linear_out``: ``Z_t (W_down(t) - W_down(0))^T``.

    z ``[B, T, h]`` (FFN hidden), x ``[B, T, D]`` (conv input), conv_weight ``[D, k]``, target
    ``[D, D]``. ``state``: where the sequences are (default: their start). Returns the
    correction ``[B, T, D]`` in the compute dtype and, if ``return_state``, the new state.
    """
    B, T, _ = z.shape
    cdt = torch.float64 if torch.float64 in (z.dtype, x.dtype, target.dtype) else torch.float32
    with torch.autocast(z.device.type, enabled=False):
        z, x = z.to(cdt), x.to(cdt)
        w, wt = conv_weight.to(cdt), target.to(cdt)
        pos = state.pos if state is not None else torch.zeros(B, dtype=torch.long, device=z.device)
        hist = state.history if state is not None else None
        v = chunked_causal_conv(x, w, chunk_size, pos, hist)  # [B, T, D]

        chunk = (pos.view(B, 1) + torch.arange(T, device=z.device)) // chunk_size  # [B, T]
        earlier = chunk.unsqueeze(1) < chunk.unsqueeze(2)  # [B, t, s]: s in an earlier chunk
        pre = ((z @ z.transpose(1, 2)) * earlier.to(cdt)) @ v  # [B, T, D]
        if state is not None:
            pre = pre + z @ state.acc.to(cdt).transpose(1, 2)
            if T > 1:
                later = (chunk >= 1).unsqueeze(-1).to(cdt)
                pre = pre + later * (z @ state.partial.to(cdt).transpose(1, 2))
        corr = lr * (pre @ wt)

        if not return_state:
            return corr, None
        if state is None:
            state = InPlaceFast.zeros(B, x.shape[-1], z.shape[-1], w.shape[1], z.device, cdt)
        n_done = (pos + T) // chunk_size  # chunk boundaries crossed, [B]
        done = (chunk < n_done.view(B, 1)).unsqueeze(-1).to(cdt)  # frames of completed chunks
        crossed = (n_done >= 1).view(B, 1, 1)
        partial = state.partial.to(cdt)
        acc = state.acc.to(cdt) + torch.where(crossed, partial, 0.0)
        acc = acc + (v * done).transpose(1, 2) @ z
        partial = torch.where(crossed, 0.0, partial) + (v * (1.0 - done)).transpose(1, 2) @ z
        k1 = w.shape[1] - 1
        history = torch.cat([state.history.to(cdt), x], dim=1)[:, -k1:] if k1 else state.history
        new_state = InPlaceFast(acc, partial, history, (pos + T) % chunk_size)
    return corr, new_state


class InPlaceTTT(StreamingModule[TTTState]):
    """The In-Place TTT parameters and state of one layer.

    ``forward(z [B, T, hidden], x [B, T, dim]) -> [B, T, dim]`` (float32): the correction to add
    to ``gating.linear_out(z)``. Outside streaming every call starts at the sequences' start
    unless ``state`` is given (``corr, s = m(z, x, state=s, return_state=True)``); inside
    ``with m.streaming(B):`` the state lives in an ``TTTState`` (reset per element, exec
    mask honoured).
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        chunk_size: int = 256,
        lr: float = 0.3,
        conv_kernel: int = 5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if min(dim, hidden, chunk_size, conv_kernel) < 1 or not lr > 0:
            raise ValueError(
                "InPlaceTTT expected positive dim, hidden, chunk_size, conv_kernel and lr, got "
                f"{dim}, {hidden}, {chunk_size}, {conv_kernel}, {lr}"
            )
        self.dim, self.hidden, self.chunk_size = dim, hidden, chunk_size
        self.lr, self.conv_kernel = float(lr), conv_kernel
        self.gate_override: float | None = None
        fk = {"device": device, "dtype": dtype}
        self.conv_weight = nn.Parameter(torch.zeros(dim, conv_kernel, **fk))  # depthwise [D, k]
        self.target = nn.Parameter(torch.eye(dim, **fk))  # W_target [D, D]

    def reset_parameters(self) -> None:
        """Zero conv (the base model) and identity ``W_target``."""
        with torch.no_grad():
            self.conv_weight.zero_()
            self.target.copy_(torch.eye(self.dim, device=self.target.device))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, hidden={self.hidden}, chunk_size={self.chunk_size}, lr={self.lr}, "
            f"conv_kernel={self.conv_kernel}"
        )

    def _state_dtype(self) -> torch.dtype:
        return torch.float64 if self.target.dtype == torch.float64 else torch.float32

    def initial_state(self, batch_size: int) -> InPlaceFast:
        return InPlaceFast.zeros(
            batch_size, self.dim, self.hidden, self.conv_kernel, self.target.device,
            self._state_dtype(),
        )  # fmt: skip

    def _init_streaming_state(self, batch_size: int) -> TTTState:
        return TTTState(batch_size, self.target.device, fast=self.initial_state(batch_size))

    def forward(
        self,
        z: torch.Tensor,
        x: torch.Tensor,
        state: InPlaceFast | None = None,
        return_state: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, InPlaceFast]:
        B, T = z.shape[:2]
        if z.dim() != 3 or z.shape[-1] != self.hidden or x.shape != (B, T, self.dim) or T == 0:
            raise ValueError(
                f"InPlaceTTT expected z [B, T>=1, {self.hidden}] and x [B, T, {self.dim}], "
                f"got {tuple(z.shape)} and {tuple(x.shape)}"
            )
        stream = self._streaming_state if state is None else None
        if stream is not None:
            state = stream.fast
        if state is not None and state.batch_size != B:
            raise ValueError(f"In-Place state is for batch size {state.batch_size}, input has {B}")
        need_state = return_state or stream is not None
        corr, new_state = inplace_correction(
            z, x, self.conv_weight, self.target, self.lr, self.chunk_size, state, need_state
        )
        if stream is not None:
            stream.fast.copy_(new_state.select(stream.exec_mask, stream.fast))
        if self.gate_override is not None:
            corr = corr * self.gate_override
        return (corr, new_state) if return_state else corr


class InPlaceHybridLayer(AdoptingLayer):
    """A moshi layer whose FFN output projection is an In-Place TTT fast weight."""

    ttt: InPlaceTTT

    @classmethod
    def from_layer(
        cls,
        layer: StreamingTransformerLayer,
        chunk_size: int = 256,
        lr: float = 0.3,
        conv_kernel: int = 5,
        target: str = "ffn_input",
        device: torch.device | None = None,
    ) -> InPlaceHybridLayer:
        gating = layer.gating
        if gating is None or isinstance(gating, nn.ModuleList) or not hasattr(gating, "linear_out"):
            raise ValueError(
                "In-Place TTT expects a layer with a single gated FFN (gating.linear_in/linear_out)"
            )
        if target not in ("ffn_input", "embeddings"):
            raise ValueError(f"inplace target must be 'ffn_input' or 'embeddings', got {target!r}")
        out = gating.linear_out
        out = getattr(out, "frozen_W", out)  # a LoRALinear keeps the base nn.Linear there
        hidden, dim = out.in_features, out.out_features
        ref = next(gating.parameters())
        new = cls.adopt(layer)
        new.inplace_target = target
        new.ttt = InPlaceTTT(dim, hidden, chunk_size, lr, conv_kernel, device or ref.device,
                             ref.dtype)  # fmt: skip
        return new

    def _ff_block(self, x: torch.Tensor) -> torch.Tensor:
        x_orig = x
        xn = self.norm2(x)
        gating = self.gating
        h = gating.linear_in(xn)
        B, T, _ = h.shape
        h = h.view(B, T, 2, -1)
        z = gating.activation(h[..., 0, :]) * h[..., 1, :]
        update = gating.linear_out(z)
        if self.inplace_target == "ffn_input":
            src = xn
        else:
            src = self._embeddings
            if src is None:
                raise ValueError(
                    "In-Place TTT with target 'embeddings' needs the transformer's input: "
                    "convert the model with moshi_ttt.apply_ttt"
                )
        update = update + self.ttt(z, src).to(update.dtype)
        return x_orig.to(update) + self.layer_scale_2(update)
