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
    gelu,
    gelu_backward,
    head_view,
    inner_grads,
    inner_residual,
    layer_norm,
    ln_l2_grad,
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


def _at(x: torch.Tensor, w0: torch.Tensor, dw: torch.Tensor) -> torch.Tensor:
    """``x @ (w0 + dw)`` without forming the full-size sum. x ``[B, H, m, r]``, w0 ``[H, r, c]``,
    dw ``[B, H, r, c]``."""
    return torch.matmul(x, dw).add_(torch.matmul(x, w0))


def _bmm3(t: torch.Tensor) -> torch.Tensor:
    """``[B, H, r, c]`` -> the ``[B * H, r, c]`` view (``baddbmm_`` wants 3-d)."""
    return t.view((-1,) + t.shape[2:])


@torch.no_grad()
def ttt_primal_step_(
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
    exec_mask: torch.Tensor | None = None,
    probe: bool = False,
) -> tuple[torch.Tensor, InnerLoss | None]:
    """``ttt_primal_step`` that advances ``state`` in place (no autograd): no full-size fast-weight
    tensor is allocated, the weights are written by a rank-1 ``baddbmm_`` into ``grad_sum`` and,
    on commit, one ``addcmul_`` into ``delta`` (branch-free: CUDA-graph safe). The fast weights
    of token i, ``W0 + delta - tok_i * grad_sum``, are applied as three products with the small
    activations instead of being formed. Sequences with ``exec_mask[b]`` False keep their state
    exactly (their lr is zeroed, their commit and position step skipped); their outputs are
    meaningless. Same arithmetic as ``ttt_primal_step`` up to rounding order."""
    B = q.shape[0]
    delta, acc = state.delta, state.grad_sum
    step = lr.unsqueeze(-1)  # [B, H, 1, 1]
    commit = state.pos + 1 == mini_batch_size
    if exec_mask is not None:
        step = step * exec_mask.view(B, 1, 1, 1)
        commit = commit & exec_mask
    tok = token_lr_scale(tok_bias).to(q.dtype)[state.pos].view(B, 1, 1, 1)
    tgt = v - k
    shift = head_view(ln_b, 4) - tgt
    lnw = head_view(ln_w, 4)
    kq = augment(torch.cat((k, q), dim=2))  # [B, H, 2, d + 1]: the key, then the query
    z1 = _at(kq, init_weights[0], delta[0])
    k_aug, q_aug, z1k, z1q = kq[:, :, :1], kq[:, :, 1:], z1[:, :, :1], z1[:, :, 1:]
    if kind == "linear":
        g1, residual = ln_l2_grad(z1k, lnw, shift)
        _bmm3(acc[0]).baddbmm_(_bmm3(k_aug.transpose(-1, -2)), _bmm3(g1 * step))
        zq = z1q.sub_(tok * (q_aug @ acc[0]))
    else:
        W2_0, dW2 = init_weights[1], delta[1]
        x2 = augment(gelu(z1k))
        g2, residual = ln_l2_grad(_at(x2, W2_0, dW2), lnw, shift)
        back = _at(g2, W2_0[..., :-1, :].transpose(-1, -2), dW2[..., :-1, :].transpose(-1, -2))
        g1 = gelu_backward(back, z1k)
        _bmm3(acc[0]).baddbmm_(_bmm3(k_aug.transpose(-1, -2)), _bmm3(g1 * step))
        _bmm3(acc[1]).baddbmm_(_bmm3(x2.transpose(-1, -2)), _bmm3(g2 * step))
        hq = augment(gelu(z1q.sub_(tok * (q_aug @ acc[0]))))
        zq = _at(hq, W2_0, dW2).sub_(tok * (hq @ acc[1]))
    z = q + layer_norm(zq, ln_w, ln_b)

    inner_loss = None
    if probe:  # before the commit: lafter needs W_t = W0 + delta - tok * grad_sum
        za = _at(k_aug, init_weights[0], delta[0]).sub_(tok * (k_aug @ acc[0]))
        if kind == "mlp":
            ha = augment(gelu(za))
            za = _at(ha, init_weights[1], delta[1]).sub_(tok * (ha @ acc[1]))
        inner_loss = InnerLoss(
            l0=mse(inner_residual(kind, k, tgt, init_weights, ln_w, ln_b)),
            lprev=mse(residual),
            lafter=mse(layer_norm(za, ln_w, ln_b) - tgt),
        )

    # Commit where the mini-batch ends: delta <- delta - tok_n * grad_sum, grad_sum <- 0.
    keep = commit.view(B, 1, 1, 1)
    scale = torch.where(keep, -tok, 0.0)
    for dw, a in zip(delta, acc, strict=True):
        dw.addcmul_(a, scale)
        a.mul_(~keep)
    advance = torch.ones_like(state.pos) if exec_mask is None else exec_mask.long()
    state.pos.add_(advance).remainder_(mini_batch_size)
    state.offset = None  # pos written in place: not known on the host any more
    return z, inner_loss
