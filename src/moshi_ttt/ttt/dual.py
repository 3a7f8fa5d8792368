"""Parallel TTT scan: the mini-batch dual form, scanned over mini-batches.

Inside a mini-batch of n tokens all inner gradients are taken at the committed weights W, so the
weights of token i, ``W_i = W - tok_i * sum_{j<=i} lr_j * grad l(W; j)``, never need to be
materialised: with ``eta_ij = tok_i * lr_j`` (j <= i) and ``G = dl/dZ`` at W, for the linear kind

    Z_i = x_i W + b - sum_{j<=i} eta_ij (x_i . k_j + 1) G_j        (x = q for outputs)

and the same per layer for the MLP. A state that arrives in the middle of a mini-batch (``pos``
tokens already seen, their ``grad_sum`` carried) is handled by left-padding the first mini-batch
with ``pos`` inert tokens (lr = 0) and subtracting ``tok_i * (x_i A + a)``; a sequence that ends
in the middle of a mini-batch is right-padded the same way and returns an uncommitted state.
Both give exactly the streaming (primal) recurrence, see ``primal.py`` and ``naive.py``.

Checkpointing: with ``checkpoint_group_size = g > 0`` (and autograd on), each group of g
mini-batches is recomputed in the backward pass, so only the states at group boundaries are kept.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .inner import (
    FastState,
    InnerLoss,
    gelu_tanh,
    inner_grads,
    inner_residual,
    layer_norm,
    mse,
    token_lr_scale,
)

Weights = tuple[torch.Tensor, ...]


def _eval_token_weights(kind, x, W, acc, eta, tok, xk1, G, m1=None):
    """``f_res(x_i; W_i)`` for the rows x ``[B, H, n, d]`` of one mini-batch, in dual form.

    W: committed weights; acc: carried grad sums (or None); eta ``[B, H, n, n]`` (lower
    triangular); tok ``[n, 1]``; xk1: the inputs of each inner linear at W (k, and gelu(Z1) for
    the MLP); G: the gradients at each inner linear's output; m1: precomputed ``x @ k^T``.
    """
    h = x
    for layer in range(len(W) // 2):
        w, b = W[2 * layer], W[2 * layer + 1]
        if layer > 0:
            h = gelu_tanh(h)
        gram = m1 if (layer == 0 and m1 is not None) else h @ xk1[layer].transpose(-1, -2)
        z = h @ w + b - (eta * (gram + 1.0)) @ G[layer]
        if acc is not None:
            z = z - tok * (h @ acc[2 * layer] + acc[2 * layer + 1])
        h = z
    return h


def _mini_batch(kind, W, acc, commit, tok, tok_last, ln_w, ln_b, q, k, tgt, lr, eta, qk, probe):
    """One mini-batch. Returns (zbar ``[B,H,n,d]``, new W, new acc or None, lprev, lafter)."""
    xs, Gs, residual = inner_grads(kind, k, tgt, W, ln_w, ln_b)
    zbar = _eval_token_weights(kind, q, W, acc, eta, tok, xs, Gs, m1=qk)
    lprev = lafter = None
    if probe:
        lprev = mse(residual)
        z_after = _eval_token_weights(kind, k, W, acc, eta, tok, xs, Gs)
        lafter = mse(layer_norm(z_after, ln_w, ln_b) - tgt)
    # lr-weighted gradient sums of this mini-batch: sum_j lr_j x_j^T G_j and sum_j lr_j G_j.
    lr_row = lr.unsqueeze(-2)  # [B, H, 1, n]
    sums = []
    for x, g in zip(xs, Gs, strict=True):
        sums += [(x * lr.unsqueeze(-1)).transpose(-1, -2) @ g, lr_row @ g]
    if acc is not None:
        sums = [s + a for s, a in zip(sums, acc, strict=True)]
    if commit:
        return zbar, tuple(w - tok_last * s for w, s in zip(W, sums, strict=True)), None, lprev, lafter
    return zbar, W, tuple(sums), lprev, lafter


def ttt_dual(
    kind: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    tok_bias: torch.Tensor,
    init_weights: Weights,
    ln_w: torch.Tensor,
    ln_b: torch.Tensor,
    mini_batch_size: int,
    state: FastState | None = None,
    checkpoint_group_size: int = 0,
    probe: bool = False,
) -> tuple[torch.Tensor, FastState, InnerLoss | None]:
    """Parallel scan. q, k, v ``[B, H, T, d]``; lr ``[B, H, T]``; tok_bias ``[n]``; init_weights
    ``[H, ...]``. ``state.pos`` must be the same for every sequence. Returns ``z [B, H, T, d]``
    (``q + LN(f_res(q; W_t))``), the final state and, if ``probe``, the inner losses."""
    B, H, T, d = q.shape
    n = mini_batch_size
    if state is None:
        state = FastState.zeros(kind, B, H, d, q.device, q.dtype)
    pos = int(state.pos[0])
    if bool((state.pos != pos).any()):
        raise ValueError(
            f"ttt_dual needs every sequence at the same mini-batch position, got {state.pos.tolist()}"
        )
    total = pos + T
    pad_right = (-total) % n
    L = total + pad_right
    nmb = L // n
    commit_last = pad_right == 0

    tgt = v - k
    pad = (0, 0, pos, pad_right)
    q_, k_, tgt_ = (torch.nn.functional.pad(t, pad) for t in (q, k, tgt))
    lr_ = torch.nn.functional.pad(lr, (pos, pad_right))  # padded tokens learn nothing

    def mb_major(t: torch.Tensor) -> torch.Tensor:  # [B, H, L, ...] -> [nmb, B, H, n, ...]
        return t.reshape(B, H, nmb, n, *t.shape[3:]).movedim(2, 0).contiguous()

    q_, k_, tgt_, lr_ = mb_major(q_), mb_major(k_), mb_major(tgt_), mb_major(lr_)
    tok_vec = token_lr_scale(tok_bias).to(q.dtype)
    tok, tok_last = tok_vec.view(n, 1), tok_vec[n - 1]
    tril = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    eta = (tok * lr_.unsqueeze(-2)).masked_fill(~tril, 0.0)  # [nmb, B, H, n, n]
    qk = q_ @ k_.transpose(-1, -2)  # state-free, so batched over all mini-batches

    W = tuple(w0.unsqueeze(0) + dw for w0, dw in zip(init_weights, state.delta, strict=True))
    acc = state.grad_sum if pos > 0 else None

    def run(start: int, stop: int, W: Weights, acc: Weights | None):
        zs, lps, las = [], [], []
        for i in range(start, stop):
            commit = i < nmb - 1 or commit_last
            zbar, W, acc, lp, la = _mini_batch(
                kind, W, acc, commit, tok, tok_last, ln_w, ln_b,
                q_[i], k_[i], tgt_[i], lr_[i], eta[i], qk[i], probe,
            )  # fmt: skip
            zs.append(zbar)
            lps.append(lp)
            las.append(la)
        return zs, lps, las, W, acc

    use_ckpt = checkpoint_group_size > 0 and torch.is_grad_enabled()
    group = checkpoint_group_size if use_ckpt else nmb
    zs, lps, las = [], [], []
    for start in range(0, nmb, group):
        stop = min(start + group, nmb)
        if use_ckpt:
            z_g, lp_g, la_g, W, acc = checkpoint(
                run, start, stop, W, acc, use_reentrant=False, determinism_check="none"
            )
        else:
            z_g, lp_g, la_g, W, acc = run(start, stop, W, acc)
        zs += z_g
        lps += lp_g
        las += la_g

    def seq_major(ts: list[torch.Tensor]) -> torch.Tensor:  # nmb x [B, H, n, ...] -> [B, H, T, ...]
        return torch.stack(ts, 2).flatten(2, 3)[:, :, pos : pos + T]

    zbar = seq_major(zs)
    z = q + layer_norm(zbar, ln_w, ln_b)

    new_state = FastState(
        delta=tuple(w - w0.unsqueeze(0) for w, w0 in zip(W, init_weights, strict=True)),
        grad_sum=acc if acc is not None else tuple(torch.zeros_like(w) for w in W),
        pos=torch.full_like(state.pos, total % n),
    )
    inner_loss = None
    if probe:
        l0 = mse(inner_residual(kind, k, tgt, init_weights, ln_w, ln_b))
        inner_loss = InnerLoss(l0=l0, lprev=seq_major(lps), lafter=seq_major(las))
    return z, new_state, inner_loss
