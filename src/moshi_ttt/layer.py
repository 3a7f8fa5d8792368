"""``TTTLayer``: a causal TTT-Linear / TTT-MLP sequence-mixing layer that streams like Moshi.

Forward, for x ``[B, T, dim]``:
1. ``q, k, v = x Wq, x Wk, x Wv`` split into H heads of d = dim / H; RoPE on q, k with the
   position inside the TTT mini-batch;
2. per-token inner learning rate ``lr_t = base_lr * sigmoid(x_t Wlr + blr) / d`` (one per head);
3. the TTT scan (``moshi_ttt.ttt``) in float32 (float64 if the layer is float64), even under
   autocast: dual form for T > 1, primal form for one token;
4. post LayerNorm over dim, then ``o_proj``.

State: outside streaming every call starts from the layer's initial weights, unless a
``FastState`` is passed (chunked processing: ``y, s = layer(x, state=s, return_state=True)``).
Inside ``with layer.streaming(B):`` the state lives in a ``TTTState`` (a moshi ``State``), one
per batch element, advanced by every call, reset by ``reset_streaming(mask)``, honouring exec
masks. Parameters are never written by a forward pass.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from moshi.modules.streaming import State, StreamingModule
from torch import nn

from .ttt import (
    KINDS,
    FastState,
    InnerLoss,
    ttt_dual,
    ttt_primal_step,
    ttt_primal_step_,
    weight_shapes,
)
from .ttt.rope import rope_rotation, rope_time_major

DEFAULT_BASE_LR = {"linear": 1.0, "mlp": 0.1}
INNER_WEIGHT_NAMES = {"linear": ("W1", "b1"), "mlp": ("W1", "b1", "W2", "b2")}


class FastWeights(Protocol):
    """What a memory's fast state offers its streaming state (``FastState`` of a ``TTTLayer``,
    ``integration.inplace.InPlaceFast`` of In-Place TTT): a row per batch element."""

    def select(self, mask: torch.Tensor, other: Any) -> Any: ...

    def zeros_like(self) -> Any: ...

    def copy_(self, other: Any) -> None: ...

    def tensors(self) -> tuple[torch.Tensor, ...]: ...


@dataclass
class TTTState(State):
    """Streaming state of every fast-weight memory (``TTTLayer``, In-Place TTT): the fast
    state of each batch element; a reset zeroes the rows of the reset sequences (the fast
    weights are deltas from the layer's parameters)."""

    fast: FastWeights

    def reset(self, reset_mask: torch.Tensor) -> None:
        super().reset(reset_mask)
        self.fast.copy_(self.fast.select(~reset_mask, self.fast.zeros_like()))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The per-row state tensors (saved and restored with a conversation)."""
        return tuple(self.fast.tensors())


class TTTLayer(StreamingModule[TTTState]):
    """Causal TTT layer. ``forward(x [B, T, dim]) -> [B, T, dim]``.

    Args:
        dim: model width; must be divisible by ``num_heads`` with an even head dim.
        num_heads: number of TTT heads (independent inner models).
        kind: ``"linear"`` (d x d inner model) or ``"mlp"`` (d -> 4d -> d, GELU).
        mini_batch_size: tokens per inner update (16 in the paper; 1.28 s of Moshi frames).
        base_lr: inner learning rate scale; default 1.0 (linear) or 0.1 (mlp).
        checkpoint_group_size: mini-batches per activation-checkpointing group when training
            (0 disables).
        rope_theta: RoPE base for q/k positions inside the mini-batch.

    ``inplace_streaming`` (default True): token-by-token streaming without autograd advances the
    streaming state in place (``ttt_primal_step_``: no full-size tensor per token); False selects
    the functional step followed by a copy (the previous path, kept for comparisons).
    """

    inplace_streaming: bool = True

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kind: str = "mlp",
        mini_batch_size: int = 16,
        base_lr: float | None = None,
        checkpoint_group_size: int = 4,
        rope_theta: float = 10000.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"TTTLayer kind must be one of {KINDS}, got {kind!r}")
        if num_heads < 1 or dim < 1 or dim % num_heads != 0:
            raise ValueError(
                f"TTTLayer dim ({dim}) must be a positive multiple of num_heads ({num_heads})"
            )
        if (dim // num_heads) % 2 != 0:
            raise ValueError(
                f"TTTLayer head dim dim/num_heads = {dim // num_heads} must be even (RoPE pairs)"
            )
        if mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be >= 1, got {mini_batch_size}")
        if checkpoint_group_size < 0:
            raise ValueError(f"checkpoint_group_size must be >= 0, got {checkpoint_group_size}")
        base_lr = DEFAULT_BASE_LR[kind] if base_lr is None else float(base_lr)
        if not base_lr > 0 or not math.isfinite(base_lr):
            raise ValueError(f"base_lr must be a positive number, got {base_lr}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.kind, self.mini_batch_size, self.base_lr = kind, mini_batch_size, base_lr
        self.checkpoint_group_size, self.rope_theta = checkpoint_group_size, rope_theta
        self.probe: InnerLossProbe | None = None

        fk = {"device": device, "dtype": dtype}
        self.qkv_proj = nn.Linear(dim, 3 * dim, bias=False, **fk)  # q, k, v stacked
        self.o_proj = nn.Linear(dim, dim, bias=False, **fk)
        self.lr_gate = nn.Linear(dim, num_heads, **fk)  # data-dependent inner lr, one per head
        self.tok_bias = nn.Parameter(torch.zeros(mini_batch_size, **fk))  # eps_i of tok_i
        self.ttt_norm_weight = nn.Parameter(torch.ones(num_heads, self.head_dim, **fk))
        self.ttt_norm_bias = nn.Parameter(torch.zeros(num_heads, self.head_dim, **fk))
        for name, shape in zip(INNER_WEIGHT_NAMES[kind], self._inner_shapes(), strict=True):
            self.register_parameter(name, nn.Parameter(torch.zeros(shape, **fk)))
        self.post_norm = nn.LayerNorm(dim, eps=1e-6, **fk)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialisation of the reference code: weights N(0, 0.02), biases 0, norms identity."""
        for lin in (self.qkv_proj, self.o_proj, self.lr_gate):
            nn.init.normal_(lin.weight, std=0.02)
        nn.init.zeros_(self.lr_gate.bias)
        nn.init.zeros_(self.tok_bias)
        nn.init.ones_(self.ttt_norm_weight)
        nn.init.zeros_(self.ttt_norm_bias)
        for name in INNER_WEIGHT_NAMES[self.kind]:
            p = getattr(self, name)
            nn.init.normal_(p, std=0.02) if name.startswith("W") else nn.init.zeros_(p)
        self.post_norm.reset_parameters()

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind}, dim={self.dim}, heads={self.num_heads}, "
            f"mini_batch={self.mini_batch_size}, base_lr={self.base_lr}"
        )

    def _inner_shapes(self) -> list[tuple[int, ...]]:
        """Shapes of W1, b1[, W2, b2]: the bias-folded shapes of ``weight_shapes`` split."""
        shapes = []
        for H, rows, cols in weight_shapes(self.kind, self.num_heads, self.head_dim):
            shapes += [(H, rows - 1, cols), (H, 1, cols)]
        return shapes

    def inner_init_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """The initial inner weights, bias-folded ``[H, d_in + 1, d_out]``, in ``dtype``."""
        names = INNER_WEIGHT_NAMES[self.kind]
        return tuple(
            torch.cat((getattr(self, w), getattr(self, b)), dim=1).to(dtype)
            for w, b in zip(names[0::2], names[1::2], strict=True)
        )

    # -- state ------------------------------------------------------------------------------
    def _state_dtype(self) -> torch.dtype:
        return torch.float64 if self.W1.dtype == torch.float64 else torch.float32

    def initial_state(self, batch_size: int) -> FastState:
        """A fresh fast-weight state (the layer's initial weights) for ``batch_size`` sequences."""
        return FastState.zeros(
            self.kind,
            batch_size,
            self.num_heads,
            self.head_dim,
            self.W1.device,
            self._state_dtype(),
        )

    def _init_streaming_state(self, batch_size: int) -> TTTState:
        return TTTState(batch_size, self.W1.device, fast=self.initial_state(batch_size))

    # -- forward ----------------------------------------------------------------------------
    def forward(
        self, x: torch.Tensor, state: FastState | None = None, return_state: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, FastState]:
        """x ``[B, T, dim]`` -> ``[B, T, dim]`` (and the final ``FastState`` if ``return_state``).

        ``state``: the fast weights to start from (not modified); default: the streaming state
        when streaming, else the layer's initial weights.
        """
        if x.dim() != 3 or x.shape[-1] != self.dim or x.shape[1] == 0:
            raise ValueError(
                f"TTTLayer expected input [batch, time >= 1, {self.dim}], got {tuple(x.shape)}"
            )
        B, T, _ = x.shape
        stream = self._streaming_state if state is None else None
        if state is None:
            state = stream.fast if stream is not None else self.initial_state(B)
        if state.batch_size != B:
            raise ValueError(f"TTT state is for batch size {state.batch_size}, input has {B}")

        # Streaming, no autograd, no state handed out: the state is advanced in place.
        inplace = (
            stream is not None
            and self.inplace_streaming
            and not return_state
            and not torch.is_grad_enabled()
        )
        z, new_state, inner_loss = self._scan(x, state, stream.exec_mask if inplace else None)
        out = self.o_proj(z.to(x.dtype))
        if stream is not None and new_state is not stream.fast:
            stream.fast.copy_(new_state.select(stream.exec_mask, stream.fast))
        if self.probe is not None and inner_loss is not None:
            self.probe.record(self, inner_loss)
        return (out, new_state) if return_state else out

    def _scan(self, x: torch.Tensor, state: FastState, exec_mask: torch.Tensor | None = None):
        """Projections, inner lr, RoPE, the scan and the post-norm; returns z ``[B, T, dim]``.

        ``exec_mask`` given: ``state`` is the streaming state, to be advanced in place where the
        token-by-token path runs (the returned state is then ``state`` itself)."""
        B, T, _ = x.shape
        H, d, n = self.num_heads, self.head_dim, self.mini_batch_size
        cdt = torch.float64 if torch.float64 in (x.dtype, self.W1.dtype) else torch.float32

        qkv = self.qkv_proj(x)
        with torch.autocast(x.device.type, enabled=False):
            qkv, xc = qkv.to(cdt), x.to(cdt)
            gate = torch.sigmoid(
                F.linear(xc, self.lr_gate.weight.to(cdt), self.lr_gate.bias.to(cdt))
            )
            lr = (self.base_lr / d) * gate.transpose(1, 2)  # [B, H, T]
            q, k, v = qkv.unflatten(-1, (3, H, d)).permute(2, 0, 3, 1, 4)  # [B, H, T, d] each
            args = (
                self.inner_init_weights(cdt),
                self.ttt_norm_weight.to(cdt),
                self.ttt_norm_bias.to(cdt),
                n,
            )
            probe = self.probe is not None
            tok_bias = self.tok_bias.to(cdt)
            live = state
            state = state.to(cdt)
            inplace = exec_mask is not None and state is live
            # Same position in every sequence? Known on the host for a fresh state and for the
            # output of the parallel scan (no sync); read back only for a streaming state.
            if T > 1 and (state.offset is not None or bool((state.pos == state.pos[0]).all())):
                z, state, inner_loss = ttt_dual(
                    self.kind, q, k, v, lr, tok_bias, *args, state=state,
                    checkpoint_group_size=self.checkpoint_group_size, probe=probe,
                    rope_theta=self.rope_theta,  # RoPE written straight into the scan's buffer
                )  # fmt: skip
            else:  # one token, or sequences at different mini-batch positions: token by token
                # RoPE on q and k at once, time-major (one complex multiply), then head views.
                positions = (state.pos.view(B, 1) + torch.arange(T, device=x.device)) % n
                rot = rope_rotation(positions, d, cdt, self.rope_theta)
                qk = rope_time_major(qkv[..., : 2 * self.dim].unflatten(-1, (2 * H, d)), rot)
                q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)
                zs, losses = [], []
                for t in range(T):
                    sl = slice(t, t + 1)
                    qkvl = (q[:, :, sl], k[:, :, sl], v[:, :, sl], lr[:, :, sl], tok_bias)
                    if inplace:
                        z_t, loss_t = ttt_primal_step_(
                            self.kind, *qkvl, *args, state=state, exec_mask=exec_mask, probe=probe
                        )
                    else:
                        z_t, state, loss_t = ttt_primal_step(
                            self.kind, *qkvl, *args, state=state, probe=probe
                        )
                    zs.append(z_t)
                    losses.append(loss_t)
                z = torch.cat(zs, dim=2)
                inner_loss = InnerLoss.cat(losses) if probe else None
            z = z.transpose(1, 2).reshape(B, T, self.dim)
            z = F.layer_norm(
                z, (self.dim,), self.post_norm.weight.to(cdt), self.post_norm.bias.to(cdt), 1e-6
            )
        return z, state, inner_loss


class InnerLossProbe:
    """Collects the inner losses (``InnerLoss``, each ``[B, H, T]``) of TTT layers.

    Use ``with record_inner_loss(model) as probe: model(x)``; then ``probe.losses(name)`` joins
    the calls of layer ``name`` (its qualified module name) along time.
    """

    def __init__(self, names: dict[TTTLayer, str]):
        self._names = names
        self.records: dict[str, list[InnerLoss]] = defaultdict(list)

    def record(self, layer: TTTLayer, loss: InnerLoss) -> None:
        self.records[self._names[layer]].append(loss)

    def losses(self, name: str) -> InnerLoss:
        return InnerLoss.cat(self.records[name])

    @property
    def layer_names(self) -> list[str]:
        return list(self._names.values())


@contextmanager
def record_inner_loss(model: nn.Module) -> Iterator[InnerLossProbe]:
    """Enable the inner-loss probe on every ``TTTLayer`` of ``model`` for the ``with`` block."""
    layers = {m: name for name, m in model.named_modules() if isinstance(m, TTTLayer)}
    probe = InnerLossProbe(layers)
    for layer in layers:
        layer.probe = probe
    try:
        yield probe
    finally:
        for layer in layers:
            layer.probe = None
