"""Streaming TTT: one token at a time, in primal form.

Each sequence of the batch keeps its own position in its mini-batch (so one sequence can be
reset while the others go on). For the token at position i (1-based):

    acc  <- acc + lr_t * grad l(W; t)          (gradient at the committed weights W)
    W_t   = W - tok_i * acc                    (weights used by this token's output)
    z_t   = q_t + LN(f_res(q_t; W_t))
    if i == n:  W <- W_t, acc <- 0             (commit at the mini-batch boundary)

which is the recurrence of ``naive.py`` and, batched, of the dual form in ``dual.py``.
No host synchronisation: safe inside CUDA graphs.
"""

from __future__ import annotations

import torch

from .inner import (
    FastState,
    InnerLoss,
    augment,
    f_res,
    head_view,
    inner_grads,
    inner_residual,
    layer_norm,
    mse,
    token_lr_scale,
)


def ttt_primal_step(
    kind: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    tok_bias: torch.Tensor,
    init_weights: tuple[torch.Tensor, ...],
    ln_w: torch.Tensor,
    ln_b: torch.Tensor,
    mini_batch_size: int,
    state: FastState,
    probe: bool = False,
) -> tuple[torch.Tensor, FastState, InnerLoss | None]:
    """One token. q, k, v ``[B, H, 1, d]``; lr ``[B, H, 1]``. Returns ``z [B, H, 1, d]``, the new
    state (the input state is not modified) and, if ``probe``, the inner losses ``[B, H, 1]``."""
    B = q.shape[0]
    tgt = v - k
    W = tuple(w0 + dw for w0, dw in zip(init_weights, state.delta, strict=True))
    shift = head_view(ln_b, 4) - tgt
    xs, Gs, residual = inner_grads(kind, augment(k), W, head_view(ln_w, 4), shift)
    step = lr.unsqueeze(-1)  # [B, H, 1, 1]
    acc = tuple(
        a + x.transpose(-1, -2) @ (g * step) for a, x, g in zip(state.grad_sum, xs, Gs, strict=True)
    )

    tok = token_lr_scale(tok_bias).to(q.dtype)[state.pos].view(B, 1, 1, 1)
    W_t = tuple(w - tok * a for w, a in zip(W, acc, strict=True))
    z = q + layer_norm(f_res(kind, q, W_t), ln_w, ln_b)

    commit = state.pos + 1 == mini_batch_size
    keep = commit.view(B, 1, 1, 1)
    new_state = FastState(
        delta=tuple(
            torch.where(keep, wt - w0, dw)
            for wt, w0, dw in zip(W_t, init_weights, state.delta, strict=True)
        ),
        grad_sum=tuple(torch.where(keep, torch.zeros_like(a), a) for a in acc),
        pos=torch.where(commit, torch.zeros_like(state.pos), state.pos + 1),
        offset=None if state.offset is None else (state.offset + 1) % mini_batch_size,
    )
    inner_loss = None
    if probe:
        inner_loss = InnerLoss(
            l0=mse(inner_residual(kind, k, tgt, init_weights, ln_w, ln_b)),
            lprev=mse(residual),
            lafter=mse(inner_residual(kind, k, tgt, W_t, ln_w, ln_b)),
        )
    return z, new_state, inner_loss
