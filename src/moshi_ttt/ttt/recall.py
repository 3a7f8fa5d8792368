"""The math of the recall memories (plain torch, no Moshi import): what a frozen model's final
hidden states ``h_t`` and the tokens ``y_t`` they predicted let a memory recall later.

Two memories, each read *before* position t's token is known and written after (position t
reads what positions ``< t`` wrote: no future leakage by construction):

- **the continuous cache** (Grave et al. 2017; growing state, exact): every past position is
  kept; ``p_cache(w | t) = sum_{i<t, y_i = w} a_ti`` with ``a_t = softmax_i(theta * cos(h_t,
  h_i))`` over the written positions ``i < t``;
- **the associative memory** (fixed state: ``W [V, Dk]``): a delta-rule fast-weight memory
  (Schlag et al. 2021; TTT-Linear's reconstruction step, ``ttt.md`` §1) from a sparse key
  ``k_t = keys(h_t)`` to the one-hot token ``v_t``::

      r_t = W k_t                               (read, before the write)
      W  <- W + beta_t (v_t - W k_t) k_t^T      (write: one GD step on |W k_t - v_t|^2 / 2)

  ``beta_t = beta`` where ``y_t`` is written (a scored token), 0 elsewhere. With unit keys
  and ``beta = 1`` a key read right after its write returns its token exactly (the delta rule
  overwrites what the key held); keys that share no active unit do not interfere.

The read becomes a distribution and a confidence (``read_distribution``), mixed with the
model's in probability space (``mix_ce``, ``mix_log_probs``)::

    p_mem = relu(r)^s / sum(relu(r)^s),   conf = min(1, scale * max(relu(r)))
    p = (1 - lam * conf) p_model + lam * conf * p_mem

so a memory that holds nothing for this key (``conf = 0``) leaves the model exactly as it is.

Four forms of the associative memory's scan: ``delta_reference`` (the definition, a loop
over positions: tests), ``delta_chunked`` (the chunked WY form: triangular solves over chunks,
carried state; evaluation), ``delta_step`` (one position, functional) and
``delta_step_sparse_`` (one position in place, touching only the key's active units:
streaming); the tests check they agree.
"""

from __future__ import annotations

import math

import torch


def key_units(h: torch.Tensor, proj: torch.Tensor, active: int) -> torch.Tensor:
    """The active units ``[..., active]`` (indices into Dk) of the keys of ``h [..., D]``: the
    ``active`` largest entries of ``proj [Dk, D] @ (h / |h|)``."""
    dk = proj.shape[0]
    if not 1 <= active <= dk:
        raise ValueError(f"active units must be in [1, {dk}], got {active}")
    z = torch.nn.functional.normalize(h.to(proj.dtype), dim=-1) @ proj.T
    return z.topk(active, dim=-1).indices


def sparse_keys(h: torch.Tensor, proj: torch.Tensor, active: int) -> torch.Tensor:
    """Unit keys ``[..., Dk]`` of hidden states ``h [..., D]``: ``key_units`` set to ``1 /
    sqrt(active)``, the others 0 (a random-hyperplane hash: similar states share most active
    units, unrelated ones almost none)."""
    idx = key_units(h, proj, active)
    keys = h.new_zeros(*idx.shape[:-1], proj.shape[0], dtype=proj.dtype)
    return keys.scatter_(-1, idx, 1.0 / math.sqrt(active))


def _betas(write: torch.Tensor, beta: float, dtype: torch.dtype) -> torch.Tensor:
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"beta (the delta rule's write strength) must be in (0, 1], got {beta}")
    return write.to(dtype) * beta


def delta_reference(
    keys: torch.Tensor,
    targets: torch.Tensor,
    write: torch.Tensor,
    beta: float,
    vocab: int,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition, one position at a time: ``keys [T, Dk]``, ``targets [T]`` (ids in
    ``[0, vocab)`` where ``write``), ``write [T]`` bool -> ``(reads [T, V], W [V, Dk])``."""
    W = keys.new_zeros(vocab, keys.shape[-1]) if state is None else state.clone()
    b = _betas(write, beta, keys.dtype)
    reads = []
    for t in range(keys.shape[0]):
        r = W @ keys[t]
        reads.append(r)
        if b[t] != 0:
            v = torch.zeros_like(r)
            v[targets[t]] = 1.0
            W = W + b[t] * torch.outer(v - r, keys[t])
    return torch.stack(reads) if reads else keys.new_zeros(0, vocab), W


def delta_chunked(keys: torch.Tensor, targets: torch.Tensor, write: torch.Tensor, beta: float,
                  vocab: int, state: torch.Tensor | None = None,
                  chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``delta_reference`` in chunks of ``chunk`` positions (batched: leading dims ``[..., T,
    Dk]``). Within a chunk starting from ``W0``, the writes ``u_t = beta_t (v_t - W_t k_t)``
    solve ``(I + diag(beta) L) U = diag(beta) (V - K W0^T)`` with ``L = tril(K K^T, -1)``; then
    the reads are ``R = K W0^T + L U`` and ``W = W0 + U^T K``."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    lead, T, dk = keys.shape[:-2], keys.shape[-2], keys.shape[-1]
    W = keys.new_zeros(*lead, vocab, dk) if state is None else state.clone()
    b = _betas(write, beta, keys.dtype)
    onehot = torch.nn.functional.one_hot(targets.clamp(0, vocab - 1).long(), vocab)
    values = onehot.to(keys.dtype) * write[..., None].to(keys.dtype)
    reads = []
    for s in range(0, T, chunk):
        K, Vv, bb = (
            keys[..., s : s + chunk, :],
            values[..., s : s + chunk, :],
            b[..., s : s + chunk],
        )
        n = K.shape[-2]
        L = torch.tril(K @ K.transpose(-1, -2), diagonal=-1)
        A = torch.eye(n, dtype=K.dtype, device=K.device) + bb[..., :, None] * L
        old = K @ W.transpose(-1, -2)  # [.., n, V]: W0 k_t
        U = torch.linalg.solve_triangular(A, bb[..., :, None] * (Vv - old), upper=False,
                                          unitriangular=True)  # fmt: skip
        reads.append(old + L @ U)
        W = W + U.transpose(-1, -2) @ K
    R = torch.cat(reads, dim=-2) if reads else keys.new_zeros(*lead, 0, vocab)
    return R, W


def delta_step(W: torch.Tensor, key: torch.Tensor, target: torch.Tensor, write: torch.Tensor,
               beta: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """One streamed position for a batch: ``W [B, V, Dk]``, ``key [B, Dk]``, ``target [B]``,
    ``write [B]`` -> ``(read [B, V], new W)`` (functional: ``W`` is not changed)."""
    r = torch.einsum("bvk,bk->bv", W, key)
    b = _betas(write, beta, W.dtype)
    v = torch.nn.functional.one_hot(target.clamp(0, W.shape[1] - 1).long(), W.shape[1]).to(W)
    return r, W + b[:, None, None] * torch.einsum("bv,bk->bvk", v - r, key)


def sparse_read(W: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """``W k`` for the unit sparse keys with active ``units [B, s]``: ``[B, V]`` (O(V s))."""
    idx = units[:, None, :].expand(W.shape[0], W.shape[1], -1)
    return W.gather(2, idx).sum(-1) * units.shape[-1] ** -0.5


def delta_step_sparse_(W: torch.Tensor, units: torch.Tensor, target: torch.Tensor,
                       write: torch.Tensor, beta: float) -> torch.Tensor:  # fmt: skip
    """``delta_step`` for unit sparse keys given by their active ``units [B, s]``, in place on
    ``W [B, V, Dk]`` (only the ``s`` columns of the key are read and written: O(V s) a step,
    the streaming form); returns the read ``[B, V]`` taken before the write."""
    B, V, _ = W.shape
    s = units.shape[-1]
    r = sparse_read(W, units)
    v = torch.nn.functional.one_hot(target.clamp(0, V - 1).long(), V).to(W)
    u = _betas(write, beta, W.dtype)[:, None] * (v - r) * s**-0.5
    W.scatter_add_(
        2, units[:, None, :].expand(B, V, -1), u[:, :, None].expand(-1, -1, s).contiguous()
    )
    return r


def read_distribution(reads: torch.Tensor, sharpen: float = 1.0,
                      scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``reads [..., V]`` -> ``(p_mem [..., V], conf [...])``: the clipped read raised to the
    power ``sharpen`` and normalised, and the clipped read's largest entry times ``scale``,
    capped at 1 (how fully the best-matching token was stored for this key; 0 and a zero
    distribution where the memory holds nothing)."""
    if sharpen <= 0 or scale <= 0:
        raise ValueError(f"sharpen and scale must be > 0, got {sharpen} and {scale}")
    pos = reads.clamp_min(0)
    powered = pos if sharpen == 1.0 else pos**sharpen
    mass = powered.sum(-1)
    p = powered / mass.clamp_min(1e-30)[..., None]
    return p, (scale * pos.amax(-1)).clamp(max=1.0)


GATE_SIZE = 6  # the learned gate's numbers: 5 weights and a bias


def gate_features(conf: torch.Tensor, peak: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
    """What the learned gate reads at each position ``[..., 5]``: the memory's confidence, the
    peak of its distribution, the model's entropy (nats) and their products with it."""
    c, p, h = conf.double(), peak.double(), entropy.double()
    return torch.stack([c, c * h, h, p, p * h], dim=-1)


def learned_gate(params: tuple[float, ...] | torch.Tensor, conf: torch.Tensor, peak: torch.Tensor,
                 entropy: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """The mixing weight ``g = sigmoid(w . features + b)`` where the memory holds something for
    this key (``conf > 0``), else 0 (the model as it is): ``[...]`` float64."""
    w = torch.as_tensor(params, dtype=torch.float64, device=conf.device)
    if w.shape != (GATE_SIZE,):
        raise ValueError(f"a learned gate has {GATE_SIZE} numbers, got {tuple(w.shape)}")
    g = torch.sigmoid(gate_features(conf, peak, entropy) @ w[:-1] + w[-1])
    return torch.where(conf > 0, g, torch.zeros_like(g))


def fit_gate(conf: torch.Tensor, peak: torch.Tensor, entropy: torch.Tensor,
             p_model: torch.Tensor, p_mem: torch.Tensor,
             iters: int = 200) -> tuple[float, ...]:  # fmt: skip
    """The learned gate's numbers maximising the mean log-likelihood of the mixture
    ``(1 - g) p_model + g p_mem`` at the targets of the given positions (1-d tensors, e.g. a
    frozen base's scored training positions): L-BFGS from 0 (``g = 1/2`` everywhere), float64,
    deterministic."""
    x = gate_features(conf, peak, entropy)
    pm, pb = p_mem.double(), p_model.double()
    keep = conf > 0
    x, pm, pb = x[keep], pm[keep], pb[keep]
    w = torch.zeros(GATE_SIZE, dtype=torch.float64, requires_grad=True)
    if len(x) == 0:
        return tuple(float(v) for v in w.detach())
    opt = torch.optim.LBFGS([w], max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        g = torch.sigmoid(x @ w[:-1] + w[-1])
        loss = -torch.log(((1 - g) * pb + g * pm).clamp_min(1e-300)).mean()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return tuple(float(v) for v in w.detach())


def cache_reference(h: torch.Tensor, targets: torch.Tensor, write: torch.Tensor, theta: float,
                    vocab: int) -> torch.Tensor:  # fmt: skip
    """The continuous cache's distribution at each position, from the definition: ``h [T,
    D]``, ``targets [T]``, ``write [T]`` -> ``p_cache [T, V]`` (zero where nothing is written
    yet)."""
    hn = torch.nn.functional.normalize(h, dim=-1)
    out = h.new_zeros(h.shape[0], vocab)
    for t in range(h.shape[0]):
        past = [i for i in range(t) if write[i]]
        if not past:
            continue
        a = torch.softmax(theta * (hn[past] @ hn[t]), dim=0)
        for w, i in zip(a, past):
            out[t, targets[i]] += w
    return out


def cache_target_probs(h: torch.Tensor, targets: torch.Tensor, write: torch.Tensor,
                       thetas: list[float], block: int = 1024) -> torch.Tensor:  # fmt: skip
    """``p_cache(y_t | t)`` for each ``theta``: ``[len(thetas), T]`` (0 where nothing is
    written before t), rows of ``block`` positions at a time (memory ``block x T``)."""
    hn = torch.nn.functional.normalize(h.double(), dim=-1)
    T = h.shape[0]
    same = targets[None, :]
    out = torch.zeros(len(thetas), T, dtype=torch.float64)
    for a in range(0, T, block):
        b = min(T, a + block)
        sim = hn[a:b] @ hn.T  # [n, T]
        pos = torch.arange(a, b)[:, None]
        ok = (torch.arange(T)[None, :] < pos) & write[None, :]
        match = ok & (same == targets[a:b, None])
        for j, theta in enumerate(thetas):
            logits = torch.where(ok, theta * sim, -math.inf)
            m = logits.max(-1, keepdim=True).values.clamp_min(-1e30)
            e = torch.exp(logits - m)
            den = e.sum(-1)
            num = (e * match).sum(-1)
            out[j, a:b] = torch.where(den > 0, num / den.clamp_min(1e-300), 0.0)
    return out


def mix_ce(ce_model: torch.Tensor, p_mem_target: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """CE (nats) of ``(1 - g) p_model + g p_mem`` at the target, from the model's CE there, the
    memory's probability of the target and ``g = lam * conf`` in ``[0, 1]`` (float64)."""
    g = gate.double()
    p = (1 - g) * torch.exp(-ce_model.double()) + g * p_mem_target.double()
    return -torch.log(p.clamp_min(1e-300))


def mix_log_probs(log_p_model: torch.Tensor, p_mem: torch.Tensor,
                  gate: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """``log((1 - g) p_model + g p_mem)`` over the vocabulary: ``[..., V]`` log-probs (usable as
    logits: sampling from them samples the mixture), ``gate [...]``."""
    g = gate[..., None].to(log_p_model.dtype)
    p = (1 - g) * log_p_model.exp() + g * p_mem.to(log_p_model.dtype)
    return torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))
