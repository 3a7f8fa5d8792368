"""The math of the end-to-end memory (plain torch, no Moshi import): a "prime" SwiGLU MLP whose
weights are per-sequence fast weights, and the inner SGD step that updates them.

Fast weights of one prime MLP, for a batch of B sequences (each sequence its own)::

    w_in  [B, dim, 2 * hidden]   (the gate and up projections, side by side)
    w_out [B, hidden, dim]

``prime_mlp(x, w_in, w_out) = (silu(x w_in[:, :h]) * (x w_in[:, h:])) w_out`` per sequence.

``inner_sgd_step`` is Krause's dynamic-evaluation rule on one list of fast weights, per
sequence: the gradient is clipped to a norm bound (over all the list's tensors of that
sequence), stepped with a per-tensor learning rate, then pulled toward the initial weights::

    g <- g * min(1, clip / |g|)          (clip > 0)
    W <- W - lr * g
    W <- W + decay * (W_0 - W)

A sequence whose gradient or new weights are not finite keeps its previous weights (rolled
back) and is counted; the others move on. Everything is functional (new tensors, no in-place
write), so the outer loop can backpropagate through any number of steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def prime_mlp(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    """SwiGLU MLP with per-sequence weights: ``x [B, T, dim]`` -> ``[B, T, dim]``.

    ``w_in [B or 1, dim, 2h]``, ``w_out [B or 1, h, dim]`` (1: one set shared by the batch)."""
    u = torch.matmul(x, w_in.to(x.dtype))
    gate, up = u.chunk(2, dim=-1)
    return torch.matmul(F.silu(gate) * up, w_out.to(x.dtype))


def inner_sgd_step(
    weights: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None],
    init: Sequence[torch.Tensor],
    lrs: Sequence[torch.Tensor | float],
    *,
    clip: float = 0.0,
    decay: float = 0.0,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One step of the module docstring's rule.

    Args:
        weights: fast weights, each ``[B, ...]`` (B sequences).
        grads: their gradients (None: zero), same shapes.
        init: the initial weights ``W_0``, each ``[B or 1, ...]``.
        lrs: one learning rate per tensor (a float or a scalar tensor; a tensor keeps its graph).
        clip: bound on each sequence's gradient norm over all tensors (0: none).
        decay: pull toward ``W_0`` per step, in [0, 1).

    Returns:
        ``(new weights, ok [B] bool)``; where ``ok`` is False the sequence kept its weights.
    """
    if not weights:
        raise ValueError("inner_sgd_step: no fast weights")
    B = weights[0].shape[0]
    gs = [torch.zeros_like(w) if g is None else g for w, g in zip(weights, grads)]
    acc = torch.promote_types(weights[0].dtype, torch.float32)  # float64 stays float64
    sq = sum((g.to(acc) ** 2).reshape(B, -1).sum(1) for g in gs)
    assert isinstance(sq, torch.Tensor)
    finite = torch.isfinite(sq)
    if clip > 0:
        norm = torch.sqrt(torch.where(finite, sq, 0.0))
        scale = torch.clamp(clip / (norm + 1e-6), max=1.0)
    else:
        scale = torch.ones(B, device=sq.device, dtype=sq.dtype)
    new = []
    for w, g, w0, lr in zip(weights, gs, init, lrs):
        shape = (B,) + (1,) * (w.dim() - 1)
        g = torch.where(finite.view(shape), g, 0.0)  # keeps NaN out of the kept rows' graph
        step = (lr * scale.view(shape).to(w.dtype)) * g
        w_new = w - step
        if decay:
            w_new = w_new + decay * (w0.to(w.dtype) - w_new)
        new.append(w_new)
    ok = finite.clone()
    for w_new in new:
        ok = ok & torch.isfinite(w_new.detach()).reshape(B, -1).all(1)
    out = [torch.where(ok.view((B,) + (1,) * (w.dim() - 1)), w_new, w)
           for w, w_new in zip(weights, new)]  # fmt: skip
    return out, ok
