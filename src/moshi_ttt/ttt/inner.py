"""The inner model of a TTT layer, its self-supervised loss and the fast-weight state.

Shapes, per layer: B batch, H heads, T tokens, d head dim, n tokens of a mini-batch.
Inner model per head: ``f(k; W) = k + LN(f_res(k; W))`` with
- ``"linear"``: ``f_res(k) = k W1 + b1``, W1 ``[d, d]``;
- ``"mlp"``:    ``f_res(k) = gelu(k W1 + b1) W2 + b2``, W1 ``[d, 4d]``, W2 ``[4d, d]``, with the
  exact (erf) GELU: the reference code uses the tanh approximation, which differs by < 1e-3 and
  costs 2-3x more on CPU (see ``docs/benchmarks.md``).
Each inner linear layer is stored *bias-folded*: one matrix ``[d_in + 1, d_out]`` whose last row
is the bias, applied to inputs with a column of ones appended (``augment``). The per-head
LayerNorm (``ln_w``, ``ln_b``: ``[H, d]``) is a slow weight shared by the loss and the output
path. The inner loss of token t is ``l(W; t) = 1/2 ||LN(f_res(k_t)) - (v_t - k_t)||^2`` (summed
over d); the probe reports it as a mean over d instead (an MSE, like the paper's plots).

Fast weights are stored as a *delta* from the layer's initial weights (its parameters), so that
resetting a sequence is zeroing its rows, and parameters are never written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

KINDS = ("linear", "mlp")
LN_EPS = 1e-6


def weight_shapes(kind: str, num_heads: int, head_dim: int) -> list[tuple[int, ...]]:
    """Shapes of the bias-folded inner weights ``(W1[, W2])`` of one layer, without batch."""
    H, d = num_heads, head_dim
    if kind == "linear":
        return [(H, d + 1, d)]
    if kind == "mlp":
        return [(H, d + 1, 4 * d), (H, 4 * d + 1, d)]
    raise ValueError(f"unknown TTT kind {kind!r}: expected one of {KINDS}")


def augment(x: torch.Tensor) -> torch.Tensor:
    """Append a column of ones: ``[..., m] -> [..., m + 1]`` (so ``augment(x) @ W = x W + b``)."""
    return torch.cat((x, x.new_ones(x.shape[:-1] + (1,))), dim=-1)


def gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x)


def gelu_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``grad * gelu'(x)`` in one fused (and twice-differentiable) kernel."""
    return torch.ops.aten.gelu_backward(grad, x)


def head_view(p: torch.Tensor, ndim: int) -> torch.Tensor:
    """Per-head ``[H, d]`` -> broadcastable against ``[B, H, ..., d]`` with ``ndim`` dims."""
    return p.view((1, p.shape[0]) + (1,) * (ndim - 3) + (p.shape[1],))


def layer_norm(x: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor) -> torch.Tensor:
    """Per-head LayerNorm over the last dim. x ``[B, H, ..., d]``, ln_w/ln_b ``[H, d]``."""
    xhat = F.layer_norm(x, x.shape[-1:], eps=LN_EPS)
    return torch.addcmul(head_view(ln_b, x.dim()), xhat, head_view(ln_w, x.dim()))


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """``F.layer_norm`` without affine over the last dim of a contiguous x, as a group norm with
    one group per row: the same statistics, 2x faster on CPU for rows of 64 (per-row overhead
    of the LayerNorm kernel; see ``docs/benchmarks.md``)."""
    rows = x.numel() // x.shape[-1]
    return F.group_norm(x.view(1, rows, x.shape[-1]), rows, eps=LN_EPS).view(x.shape)


def ln_l2_grad(
    z: torch.Tensor, ln_w: torch.Tensor, shift: torch.Tensor, scaled: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradient of ``1/2 ||ln_w * xhat(z) + shift||^2`` with respect to z, fused by hand.

    With ``shift = ln_b - target`` this is the inner loss ``1/2 ||LN(z) - target||^2``.
    z ``[..., D]``; ln_w and shift broadcastable to z. Returns ``(grad, residual)`` with
    ``residual = LN(z) - target`` (what the probe needs, for free). ``scaled``: ln_w and shift
    are given premultiplied, as ``ln_w**2`` and ``ln_w * shift`` (one op fewer per call); the
    residual is then not formed (None).
    """
    shape = z.shape[-1:]
    z = z.contiguous()  # once: both kernels below would copy a strided z each
    xhat, mean, rstd = torch.native_layer_norm(z, shape, None, None, LN_EPS)
    if scaled:
        residual, g_out = None, torch.addcmul(shift, xhat, ln_w)
    else:
        residual = torch.addcmul(shift, xhat, ln_w)
        g_out = residual * ln_w
    grad = torch.ops.aten.native_layer_norm_backward(
        g_out, z, shape, mean, rstd, None, None, (True, False, False)
    )[0]  # LayerNorm's own fused backward: (g - mean(g) - xhat * mean(g * xhat)) * rstd
    return grad, residual


def f_res(kind: str, x: torch.Tensor, weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The residual branch of the inner model, x ``[B, H, T, d]`` -> ``[B, H, T, d]``, for
    per-sequence weights ``[B, H, ...]`` or per-head weights ``[H, ...]``."""
    h = augment(x) @ weights[0]
    if kind == "linear":
        return h
    return augment(gelu(h)) @ weights[1]


def inner_residual(
    kind: str,
    k: torch.Tensor,
    target: torch.Tensor,
    weights: tuple[torch.Tensor, ...],
    ln_w: torch.Tensor,
    ln_b: torch.Tensor,
) -> torch.Tensor:
    """``LN(f_res(k; W)) - target`` for tokens k ``[B, H, T, d]``."""
    return layer_norm(f_res(kind, k, weights), ln_w, ln_b) - target


def token_lr_scale(tok_bias: torch.Tensor) -> torch.Tensor:
    """``tok_i = max(0, 1/i + eps_i)`` for i = 1..n; tok_bias ``[n]`` is the learnable eps."""
    n = tok_bias.shape[0]
    idx = torch.arange(1, n + 1, device=tok_bias.device, dtype=tok_bias.dtype)
    return torch.relu(1.0 / idx + tok_bias)


@dataclass
class FastState:
    """The fast-weight state of one TTT layer for B sequences (no parameters inside).

    - ``delta``: the committed fast weights minus the layer's initial weights, per tensor of
      ``weight_shapes`` with a leading batch dim ``[B, H, ...]``.
    - ``grad_sum``: the sum over the tokens already seen in the current mini-batch of
      ``lr_j * grad l(W; j)`` (W = committed weights), same shapes. Zero at a mini-batch start.
    - ``pos``: ``[B]`` int64, tokens already seen in the current mini-batch (0 .. n-1).
    - ``offset``: the same position as a Python int when it is known on the host and equal for
      every sequence (a fresh state, the output of ``ttt_dual``), else None. The parallel scan
      needs it as a shape: with it, it never reads ``pos`` back from the device (no host sync,
      ``torch.compile(fullgraph=True)``). Writing ``pos`` in place makes it stale: don't.
    """

    delta: tuple[torch.Tensor, ...]
    grad_sum: tuple[torch.Tensor, ...]
    pos: torch.Tensor
    offset: int | None = None

    @staticmethod
    def zeros(
        kind: str,
        batch_size: int,
        num_heads: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> FastState:
        shapes = weight_shapes(kind, num_heads, head_dim)
        mk = [torch.zeros((batch_size,) + s, device=device, dtype=dtype) for s in shapes]
        return FastState(
            delta=tuple(mk),
            grad_sum=tuple(torch.zeros_like(t) for t in mk),
            pos=torch.zeros(batch_size, device=device, dtype=torch.long),
            offset=0,
        )

    @property
    def batch_size(self) -> int:
        return self.pos.shape[0]

    def detach(self) -> FastState:
        """A copy cut from the autograd graph (for carrying state across training windows)."""
        return FastState(
            tuple(t.detach() for t in self.delta),
            tuple(t.detach() for t in self.grad_sum),
            self.pos.clone(),
            self.offset,
        )

    def zeros_like(self) -> FastState:
        """The state of fresh sequences (initial weights, mini-batch start), same shapes."""
        return FastState(
            tuple(torch.zeros_like(t) for t in self.delta),
            tuple(torch.zeros_like(t) for t in self.grad_sum),
            torch.zeros_like(self.pos),
            0,
        )

    def to(self, dtype: torch.dtype) -> FastState:
        """The same state with float tensors in ``dtype`` (self if already)."""
        if self.delta[0].dtype == dtype:
            return self
        return FastState(
            tuple(t.to(dtype) for t in self.delta),
            tuple(t.to(dtype) for t in self.grad_sum),
            self.pos,
            self.offset,
        )

    def copy_(self, other: FastState) -> None:
        """Write ``other`` into this state's tensors in place (keeps addresses: CUDA-graph safe)."""
        for dst, src in zip(self.tensors(), other.tensors(), strict=True):
            dst.copy_(src)
        self.offset = other.offset

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (*self.delta, *self.grad_sum, self.pos)

    def select(self, keep: torch.Tensor, other: FastState) -> FastState:
        """Per sequence, ``self`` where ``keep[b]`` else ``other``. keep: bool ``[B]``."""

        def pick(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.where(keep.view((-1,) + (1,) * (a.dim() - 1)), a, b)

        return FastState(
            tuple(pick(a, b) for a, b in zip(self.delta, other.delta, strict=True)),
            tuple(pick(a, b) for a, b in zip(self.grad_sum, other.grad_sum, strict=True)),
            torch.where(keep, self.pos, other.pos),
            self.offset if self.offset == other.offset else None,
        )


@dataclass
class InnerLoss:
    """The inner-loss probe of one layer for a forward pass: per token MSE over d, ``[B, H, T]``.

    - ``l0``: with the layer's initial weights W0;
    - ``lprev``: with the committed weights at the start of the token's mini-batch;
    - ``lafter``: with the weights the token's own output uses, W_t (after the token's update:
      for the last token of a mini-batch, the weights after the mini-batch update).
    """

    l0: torch.Tensor
    lprev: torch.Tensor
    lafter: torch.Tensor

    @staticmethod
    def cat(parts: list[InnerLoss]) -> InnerLoss:
        """Join consecutive pieces of one sequence along time."""
        return InnerLoss(
            *(torch.cat(ts, dim=-1) for ts in zip(*((p.l0, p.lprev, p.lafter) for p in parts)))
        )


def mse(residual: torch.Tensor) -> torch.Tensor:
    """Mean over d of the squared residual ``[B, H, T, d]`` -> ``[B, H, T]``, detached."""
    return residual.detach().pow(2).mean(-1)


def inner_grads(
    kind: str,
    k_aug: torch.Tensor,
    W: tuple[torch.Tensor, ...],
    ln_w: torch.Tensor,
    shift: torch.Tensor,
    z1: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Forward of the inner model at W on augmented keys ``[.., n, d+1]`` and its backward.

    Returns ``(xs, Gs, residual)``: for each inner linear layer its augmented input (k, then
    gelu(Z1) for the MLP) and the gradient of ``sum_t l(W; t)`` at its output, so that the
    gradient of token t for that layer is ``xs[l][t]^T Gs[l][t]``. ``z1 = k_aug @ W[0]`` may be
    passed if already computed.
    """
    if z1 is None:
        z1 = k_aug @ W[0]
    if kind == "linear":
        g, residual = ln_l2_grad(z1, ln_w, shift)
        return [k_aug], [g], residual
    x2 = augment(gelu(z1))
    g2, residual = ln_l2_grad(x2 @ W[1], ln_w, shift)
    g1 = gelu_backward(g2 @ W[1][..., :-1, :].transpose(-1, -2), z1)
    return [k_aug, x2], [g1, g2], residual
