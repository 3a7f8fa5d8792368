"""Parallel TTT scan: the mini-batch dual form, scanned over mini-batches.

Inside a mini-batch of n tokens all inner gradients are taken at the committed weights W, so the
weights of token i, ``W_i = W - tok_i * sum_{j<=i} lr_j * grad l(W; j)``, never need to be
materialised: with ``eta_ij = tok_i * lr_j`` (j <= i), ``G = dl/dZ`` at W and bias-folded
weights (``x~ = [x, 1]``), each inner linear layer gives for the rows x of the mini-batch

    Z_i = x~_i W - sum_{j<=i} eta_ij (x~_i . k~_j) G_j        (x = q for outputs)

A state that arrives in the middle of a mini-batch (``pos`` tokens already seen, their
``grad_sum`` A carried) is handled by left-padding the first mini-batch with ``pos`` inert tokens
(lr = 0) and subtracting ``tok_i * x~_i A``; a sequence that ends inside a mini-batch is
right-padded the same way and returns an uncommitted state. This is exactly the streaming
recurrence (``primal.py``) and the definition (``naive.py``); tests compare all three.

Layout: the keys and queries of each mini-batch share one buffer ``[nmb, BH, 2n, d+2]`` (column
d holds the ones of ``x~``, column d+1 zeros, matched by a zero row appended to W1~), so that
RoPE writes its complex pairs straight into it; the output LayerNorm runs time-major.

Checkpointing: with ``checkpoint_group_size = g > 0`` (and autograd on), each group of g
mini-batches is recomputed in the backward pass, so only the states at group boundaries are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .inner import (
    FastState,
    InnerLoss,
    gelu,
    gelu_backward,
    inner_residual,
    ln_l2_grad,
    mse,
    normalize_rows,
    token_lr_scale,
)
from .plain_scan import plain_loop
from .rope import mini_batch_rotation, rope_into, rope_time_major

Weights = tuple[torch.Tensor, ...]


def _split(w: Weights) -> Weights:
    """Bias-folded weights -> the loop's layout: ``(W1~,)`` or ``(W1~, W2, b2)``. Without
    autograd W2 and b2 are contiguous copies (the scan updates them in place, and an in-place
    ``baddbmm_`` into a strided view falls back to one product per head on CPU: 3-4 % of a
    TTT-MLP forward); with autograd, views."""
    if len(w) == 1:
        return w
    W2, b2 = w[1][:, :-1], w[1][:, -1:]
    return (w[0], W2, b2) if torch.is_grad_enabled() else (w[0], W2.contiguous(), b2.contiguous())


def _join(w: Weights) -> Weights:
    """Inverse of ``_split``."""
    return w if len(w) == 1 else (w[0], torch.cat((w[1], w[2]), dim=1))


def _rows_at_token_weights(kind, x_aug, m1, W, acc, eta, tok, x2, Gs, z_base=None, out=None):
    """``f_res(x_i; W_i)`` for the rows of one mini-batch, in dual form. x_aug ``[BH, n, d+2]``;
    m1 ``= eta * (x_aug @ k~^T)``; x2: the keys' hidden activations (MLP); acc: carried gradient
    sums or None. Weights in the loop layout (``_split``). Each product's base is a fresh tensor
    (or ``out``, where the result goes without autograd), so corrections are added in place."""
    lin_out = out if kind == "linear" else None
    if z_base is None:
        z = torch.bmm(x_aug, W[0], out=lin_out).baddbmm_(m1, Gs[0], alpha=-1)
    else:
        z = torch.baddbmm(z_base, m1, Gs[0], alpha=-1, out=lin_out)
    if acc is not None:
        z.sub_(tok * (x_aug @ acc[0]))
    if kind == "linear":
        return z
    h = gelu(z)
    m2 = eta * torch.baddbmm(eta.new_ones(()), h, x2.transpose(-1, -2))
    z2 = torch.baddbmm(W[2], h, W[1], out=out).baddbmm_(m2, Gs[1], alpha=-1)
    if acc is not None:
        z2.sub_(tok * torch.baddbmm(acc[2], h, acc[1]))
    return z2


@dataclass(frozen=True, eq=False)
class _Scan:
    """What every mini-batch of one scan shares (made once per ``ttt_dual`` call): the kind,
    the mini-batch size ``n``, the token scales ``tok [n, 1]`` and ``tok_last`` (tok_n), the
    LayerNorm weight ``lnw`` (premultiplied without ``probe``) and whether to probe losses."""

    kind: str
    n: int
    tok: torch.Tensor
    tok_last: torch.Tensor
    lnw: torch.Tensor
    probe: bool


def _mini_batch(s: _Scan, W, acc, commit, shift, kq, lr, lrt, klr, eta, m1, out=None):
    """One mini-batch on ``[BH, ...]`` tensors: kq ``[BH, 2n, d+2]`` (augmented keys then
    queries), lr ``[BH, n, 1]``, lrt ``= lr * tok_n``, klr ``= (k~ * lrt)^T [BH, d+2, n]`` (MLP;
    None: the commit scales G1 instead), eta/m1 ``[BH, n, n]``. Without ``s.probe``, lnw and
    shift come premultiplied (``ln_l2_grad`` with ``scaled``).
    Returns (zbar, W, acc, lprev, lafter).
    Without autograd the weights are updated in place (they are this scan's own tensors)."""
    kind, n, tok, tok_last, lnw, probe = s.kind, s.n, s.tok, s.tok_last, s.lnw, s.probe
    k_aug, q_aug = kq[:, :n], kq[:, n:]
    zq = None
    if kind == "mlp" and not torch.is_grad_enabled():  # one product; GELU reads strided halves
        zkq = torch.bmm(kq, W[0])
        z1, zq = zkq[:, :n], zkq[:, n:]
    else:  # keys and queries apart: LayerNorm would copy a slice of one product, and the
        z1 = torch.bmm(k_aug, W[0])  # backward would zero-fill a gradient per slice
    x2 = None
    if kind == "linear":
        g1, residual = ln_l2_grad(z1, lnw, shift, scaled=not probe)
        Gs = (g1,)
    else:  # forward at W, then the hand-derived backward
        x2 = gelu(z1)
        g2, residual = ln_l2_grad(torch.baddbmm(W[2], x2, W[1]), lnw, shift, scaled=not probe)
        Gs = (gelu_backward(g2 @ W[1].transpose(-1, -2), z1), g2)
    zbar = _rows_at_token_weights(kind, q_aug, m1, W, acc, eta, tok, x2, Gs, zq, out)
    lprev = lafter = None
    if probe:
        lprev = mse(residual)
        m1k = eta * (k_aug @ k_aug.transpose(-1, -2))
        z_after = _rows_at_token_weights(kind, k_aug, m1k, W, acc, eta, tok, x2, Gs)
        lafter = mse(torch.addcmul(shift, F.layer_norm(z_after, z_after.shape[-1:], eps=1e-6), lnw))

    # This mini-batch's scaled gradient sums, per tensor of W, as (x^T, G) pairs whose product
    # is sum_j s_j x_j^T G_j (the scale s folded into the narrower side; for the bias row of W2,
    # x^T = s^T). ``w1``: the pair for W1~ (the commit passes its precomputed scaled keys).
    def sums(scale: torch.Tensor, w1: tuple | None = None) -> list[tuple]:
        out = [w1 or (k_aug.transpose(-1, -2), Gs[0] * scale)]
        if kind == "mlp":
            out += [(x2.transpose(-1, -2), Gs[1] * scale), (scale.transpose(-1, -2), Gs[1])]
        return out

    if not commit:
        new = [x @ g for x, g in sums(lr)]
        acc = tuple(new if acc is None else (a + s for a, s in zip(acc, new, strict=True)))
        return zbar, W, acc, lprev, lafter
    # Commit: W <- W - tok_n * (A + sum_j lr_j x_j^T G_j); the keys' scale is precomputed.
    inplace = not torch.is_grad_enabled()
    new_W = []
    for i, (x, g) in enumerate(sums(lrt, None if klr is None else (klr, Gs[0]))):
        w = W[i]
        if acc is not None:
            w = w.sub_(tok_last * acc[i]) if inplace else w - tok_last * acc[i]  # (alpha: no sync)
        w = w.baddbmm_(x, g, alpha=-1) if inplace else torch.baddbmm(w, x, g, alpha=-1)
        new_W.append(w)
    return zbar, tuple(new_W), None, lprev, lafter


class _KeyQueryBuffer(torch.autograd.Function):
    """Keys then queries ``[nmb, B, H, n, d]`` (rotated by ``rot = (cos, sin)`` if given) ->
    the scan's buffer ``[nmb, B, H, 2n, d+2]``: column d holds ones (the bias of ``x~``), column
    d+1 zeros (matched by a zero row of W1~: rows an even number of floats, so that RoPE writes
    its complex pairs straight in). Strided writes, no cat chain. Its backward slices the
    buffer's gradient and rotates it back (as recorded writes into views of a buffer, autograd
    cloned the whole gradient once per write)."""

    @staticmethod
    def forward(k: torch.Tensor, q: torch.Tensor, rot) -> torch.Tensor:
        n, d = k.shape[-2:]
        kq = k.new_empty(k.shape[:-2] + (2 * n, d + 2))
        kq[..., d].fill_(1.0)
        kq[..., d + 1].fill_(0.0)
        for rows, x in ((slice(0, n), k), (slice(n, 2 * n), q)):
            if rot is None:
                kq[..., rows, :d].copy_(x)
            else:
                rope_into(kq[..., rows, :d], x, rot)
        return kq

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.rot = inputs[2]
        ctx.n, ctx.d = inputs[0].shape[-2:]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        n, d, rot = ctx.n, ctx.d, ctx.rot
        gk, gq = grad[..., :n, :d], grad[..., n:, :d]
        if rot is not None:  # the transposed rotation: by -angle
            gk, gq = (rope_time_major(g, (rot[0], -rot[1])) for g in (gk, gq))
        return gk, gq, None


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
    rope_theta: float | None = None,
) -> tuple[torch.Tensor, FastState, InnerLoss | None]:
    """Parallel scan. q, k, v ``[B, H, T, d]``; lr ``[B, H, T]``; tok_bias ``[n]``; init_weights
    ``[H, ...]`` (bias-folded). ``state.pos`` must be the same for every sequence. Returns
    ``z [B, H, T, d]`` (``q + LN(f_res(q; W_t))``), the final state and, if ``probe``, the inner
    losses ``[B, H, T]``. ``rope_theta``: q and k come unrotated and the scan applies RoPE by
    position inside the mini-batch itself (written straight into its buffer; the same as passing
    ``apply_rope(x, (pos + t) % n, rope_theta)``; q in z is then the rotated q)."""
    B, H, T, d = q.shape
    BH, n = B * H, mini_batch_size
    if state is None:
        state = FastState.zeros(kind, B, H, d, q.device, q.dtype)
    pos = state.offset
    if pos is None:  # not known on the host: read it back (a sync) and check it
        pos = int(state.pos[0])
        if bool((state.pos != pos).any()):
            raise ValueError(
                "ttt_dual needs every sequence at the same mini-batch position, "
                f"got {state.pos.tolist()}"
            )
    total = pos + T
    pad_right = (-total) % n
    nmb = (total + pad_right) // n
    commit_last = pad_right == 0

    def mb_major(t: torch.Tensor) -> torch.Tensor:  # [B, H, T, c] -> view [nmb, B, H, n, c]
        if pos or pad_right:  # padded tokens: zeros, and lr = 0 (they learn nothing)
            t = F.pad(t, (0, 0, pos, pad_right))
        return t.unflatten(2, (nmb, n)).permute(2, 0, 1, 3, 4)

    # One buffer of augmented keys then queries per mini-batch, [nmb, BH, 2n, d+2] (row r of a
    # mini-batch sits at position r inside it: its RoPE rotation).
    rot = None if rope_theta is None else mini_batch_rotation(n, d, q.dtype, q.device, rope_theta)
    kq = _KeyQueryBuffer.apply(mb_major(k), mb_major(q), rot)
    A = d + 2
    q_rot = kq[..., n:, :d].permute(1, 0, 3, 2, 4)  # [B, nmb, n, H, d]: the output's residual
    k_rot = kq[..., :n, :d]
    kq = kq.view(nmb, BH, 2 * n, A)
    k_, q_ = kq[:, :, :n], kq[:, :, n:]
    # contiguous: products derived from it (eta, m1) must be too, or the in-place baddbmm_ in
    # the loop falls back to one addmm_ per head
    lr_ = mb_major(lr.unsqueeze(-1)).reshape(nmb, BH, n, 1).contiguous()
    lnw = ln_w.repeat(B, 1).view(BH, 1, d)
    # LN(z) - target = lnw * zhat + shift, with shift = ln_b - (v - k); without the probe the
    # loop takes both premultiplied by lnw (``ln_l2_grad(scaled=True)``: one op fewer per step)
    shift = k_rot - mb_major(v)  # the layout of the first operand: mini-batch major
    if probe:
        shift = shift.add_(ln_b.view(1, 1, H, 1, d))
    else:
        w5 = ln_w.view(1, 1, H, 1, d)
        shift, lnw = torch.addcmul(ln_b.view(1, 1, H, 1, d) * w5, shift, w5), lnw * lnw
    shift = shift.view(nmb, BH, n, d)

    tok_vec = token_lr_scale(tok_bias).to(q.dtype)
    tok, tok_last = tok_vec.view(n, 1), tok_vec[n - 1]
    tok_tril = torch.ones(n, n, dtype=q.dtype, device=q.device).tril_().mul_(tok)
    eta = tok_tril * lr_.transpose(-1, -2)  # [nmb, BH, n, n], zero above the diagonal
    m1 = eta * (q_ @ k_.transpose(-1, -2))  # state-free: batched over all mini-batches
    lrt = lr_ * tok_last
    # the keys as the MLP's commit uses them (TTT-Linear scales its narrower gradient instead)
    klr = (k_ * lrt).transpose(-1, -2) if kind == "mlp" else None

    def flat(w: torch.Tensor) -> torch.Tensor:  # [B, H, ...] -> [BH, ...]
        return w.reshape((BH,) + w.shape[2:])

    def to_loop(ws: Weights) -> Weights:  # [B, H, ...] -> [BH, ...], W1~ with its zero row
        return _split((F.pad(flat(ws[0]), (0, 0, 0, 1)),) + tuple(flat(w) for w in ws[1:]))

    W = to_loop(tuple(w0 + dw for w0, dw in zip(init_weights, state.delta, strict=True)))
    acc = to_loop(state.grad_sum) if pos > 0 else None

    # Per-mini-batch views. With autograd, made by one unbind each: indexing t[i] in the loop
    # would make every backward step allocate and zero a gradient of the whole sequence
    # (quadratic cost). Compiled, or without autograd, taken one by one when needed (compiled:
    # the inductor partitioner cannot save the multi-output unbind node for a checkpointed
    # group's recomputation).
    per_mb_src = (shift, kq, lr_, lrt, klr, eta, m1)
    compiling = torch.compiler.is_compiling()
    if torch.is_grad_enabled() and not compiling:
        views = list(zip(*(t.unbind(0) if t is not None else [None] * nmb for t in per_mb_src)))
        mb_args = views.__getitem__
    else:

        def mb_args(i: int) -> tuple:
            return tuple(t if t is None else t[i] for t in per_mb_src)

    # Without autograd each mini-batch's output is written straight into one buffer (no stack;
    # eager only: compiled, out= arguments do not fix the layout of what they trace).
    zbuf = None if torch.is_grad_enabled() or compiling else q.new_empty(nmb, BH, n, d)

    scan = _Scan(kind, n, tok, tok_last, lnw, probe)

    def run(start: int, stop: int, W: Weights, acc: Weights | None):
        zs, lps, las = [], [], []
        for i in range(start, stop):
            commit = i < nmb - 1 or commit_last
            out = None if zbuf is None else zbuf[i]
            zbar, W, acc, lp, la = _mini_batch(scan, W, acc, commit, *mb_args(i), out)
            zs.append(zbar)
            lps.append(lp)
            las.append(la)
        return zs, lps, las, W, acc

    use_ckpt = checkpoint_group_size > 0 and torch.is_grad_enabled()
    group = checkpoint_group_size if use_ckpt else nmb
    zs, lps, las = [], [], []
    # Forward only: the committed mini-batches that carry no gradient sums (all but perhaps the
    # first and the last) run in the scripted loop of ``plain_scan``; the rest one by one here.
    first, last = int(acc is not None), nmb if commit_last else nmb - 1
    if zbuf is not None and not probe and first < last:
        _, _, _, W, acc = run(0, first, W, acc)  # (outputs: in zbuf; no probe here)
        plain = (kq, shift, lrt) + ((klr, eta) if kind == "mlp" else ()) + (m1, lnw, zbuf)
        plain_loop(kind, q.device)(*W, *plain, n, first, last)
        group, first = nmb, last  # what is left (the last, uncommitted mini-batch) below
    else:
        first = 0
    for start in range(first, nmb, group):
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

    def seq_major(ts: list[torch.Tensor]) -> torch.Tensor:  # nmb x [BH, n, ...] -> [B, H, T, ...]
        t = torch.stack(ts, 1).view((B, H, nmb * n) + ts[0].shape[2:])
        return t[:, :, pos : pos + T]

    # z = q + LN(zbar), formed time-major ([B, T, H, d]: what the layer reads next, and the
    # layout where the per-head LayerNorm is one fast row normalisation), returned as a view.
    if zbuf is None:  # [B, nmb, n, H, d]; the output takes zhat's layout: time major
        zbar = torch.stack([t.view(B, H, n, d).transpose(1, 2) for t in zs], 1)
        z = torch.addcmul(ln_b, normalize_rows(zbar), ln_w)
    else:  # zhat mini-batch major, the output written time major
        zhat = normalize_rows(zbuf).view(nmb, B, H, n, d).permute(1, 0, 3, 2, 4)
        z = torch.addcmul(ln_b, zhat, ln_w, out=q.new_empty(zhat.shape))
    z = z.add_(q_rot)
    z = z.view(B, nmb * n, H, d)[:, pos : pos + T].transpose(1, 2)

    def unflat(w: torch.Tensor) -> torch.Tensor:
        return w.view((B, H) + w.shape[1:])

    def from_loop(ws: Weights) -> Weights:  # inverse of to_loop (drops W1~'s zero row)
        ws = _join(ws)
        return (ws[0][:, : d + 1],) + ws[1:]

    W, acc = from_loop(W), from_loop(acc) if acc is not None else None
    new_state = FastState(
        delta=tuple(unflat(w) - w0 for w, w0 in zip(W, init_weights, strict=True)),
        grad_sum=tuple(unflat(a) for a in acc) if acc is not None else state.zeros_like().grad_sum,
        pos=torch.full_like(state.pos, total % n),
        offset=total % n,
    )
    inner_loss = None
    if probe:
        k = k_rot.permute(1, 2, 0, 3, 4).reshape(B, H, nmb * n, d)[:, :, pos : pos + T]
        l0 = mse(inner_residual(kind, k, v - k, init_weights, ln_w, ln_b))
        inner_loss = InnerLoss(l0=l0, lprev=seq_major(lps), lafter=seq_major(las))
    return z, new_state, inner_loss
