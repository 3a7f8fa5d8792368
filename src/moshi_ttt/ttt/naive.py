"""Reference TTT scan, written from the definition and nothing else (slow; for tests only).

For every token t, at position i (1-based) of its mini-batch, with W the committed weights at the
mini-batch start:

    W_t = W - tok_i * sum_{j <= i in the mini-batch} lr_j * grad_W l(W; j)
    z_t = q_t + LN(f_res(q_t; W_t))

and at the end of a full mini-batch ``W <- W_t``. Each inner gradient comes from autograd on
the loss itself (no hand-derived formula), one token and one sequence at a time.
"""

from __future__ import annotations

import torch

from .inner import FastState, InnerLoss, f_res, inner_residual, layer_norm, mse, token_lr_scale


def _inner_loss_sum(kind, k, target, weights, ln_w, ln_b) -> torch.Tensor:
    """``sum over heads of 1/2 ||LN(f_res(k)) - target||^2`` for one token; k ``[1, H, 1, d]``."""
    return 0.5 * inner_residual(kind, k, target, weights, ln_w, ln_b).pow(2).sum()


def ttt_naive(
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
    state: FastState | None = None,
) -> tuple[torch.Tensor, FastState, InnerLoss]:
    """Reference scan. q, k, v ``[B, H, T, d]``; lr ``[B, H, T]`` (already ``base_lr * gate / d``);
    tok_bias ``[n]``; init_weights per head ``[H, ...]``. Returns ``z [B, H, T, d]``, the final
    state and the inner-loss probe. Differentiable (inner gradients use ``create_graph``)."""
    B, H, T, d = q.shape
    n = mini_batch_size
    if state is None:
        state = FastState.zeros(kind, B, H, d, q.device, q.dtype)
    tok = token_lr_scale(tok_bias)
    target = v - k
    outs, deltas, sums, poss, probes = [], [], [], [], []
    differentiable = torch.is_grad_enabled()
    with torch.enable_grad():
        for b in range(B):
            W = [w0 + dw[b : b + 1] for w0, dw in zip(init_weights, state.delta)]
            acc = [g[b : b + 1] for g in state.grad_sum]
            pos = int(state.pos[b])
            z_b, l0, lprev, lafter = [], [], [], []
            for t in range(T):
                kt, qt, yt = (
                    k[b : b + 1, :, t : t + 1],
                    q[b : b + 1, :, t : t + 1],
                    target[b : b + 1, :, t : t + 1],
                )
                leaves = [w if w.requires_grad else w.detach().requires_grad_() for w in W]
                loss = _inner_loss_sum(kind, kt, yt, leaves, ln_w, ln_b)
                grads = torch.autograd.grad(
                    loss, leaves, create_graph=differentiable and any(w.requires_grad for w in W)
                )
                step = lr[b : b + 1, :, t].view(1, H, 1, 1)
                acc = [a + step * g for a, g in zip(acc, grads)]
                W_t = [w - tok[pos] * a for w, a in zip(W, acc)]
                z_b.append(qt + layer_norm(f_res(kind, qt, W_t), ln_w, ln_b))
                l0.append(mse(inner_residual(kind, kt, yt, init_weights, ln_w, ln_b)))
                lprev.append(mse(inner_residual(kind, kt, yt, W, ln_w, ln_b)))
                lafter.append(mse(inner_residual(kind, kt, yt, W_t, ln_w, ln_b)))
                pos += 1
                if pos == n:
                    W, acc, pos = W_t, [torch.zeros_like(a) for a in acc], 0
            outs.append(torch.cat(z_b, dim=2))
            deltas.append([w - w0 for w, w0 in zip(W, init_weights)])
            sums.append(acc)
            poss.append(pos)
            probes.append([torch.cat(x, dim=2) for x in (l0, lprev, lafter)])
    new_state = FastState(
        delta=tuple(torch.cat(ts, 0) for ts in zip(*deltas)),
        grad_sum=tuple(torch.cat(ts, 0) for ts in zip(*sums)),
        pos=torch.tensor(poss, device=q.device, dtype=torch.long),
    )
    probe = InnerLoss(*(torch.cat(ts, 0) for ts in zip(*probes)))
    return torch.cat(outs, 0), new_state, probe
