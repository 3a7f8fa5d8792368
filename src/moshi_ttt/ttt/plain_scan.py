"""The parallel scan's forward-only loop: committed mini-batches, no autograd, no probe.

This is ``dual._mini_batch`` restricted to its most common case (every mini-batch of an
evaluation or prefill but the first and last of a chunk), written as one loop per kind so that
TorchScript can run it without the Python interpreter between the ~8 (TTT-Linear) or ~20
(TTT-MLP) small ops of each mini-batch: 20-25 % of the loop's time on CPU, where those ops are
8 x 16 x 64 tiles (``docs/benchmarks.md``). ``torch.jit.script`` is deprecated in favour of
``torch.compile``, which is slower here (per-step guards, extern products); if scripting ever
fails the same functions run as Python, as they do on GPUs (not measured there yet). Tests
compare both forms with the definition (``naive.py``) through ``ttt_dual``.

Shapes, for mini-batches ``[start, stop)`` of a scan: kq ``[nmb, BH, 2n, d+2]``, shift (lnw
premultiplied) ``[nmb, BH, n, d]``, lrt ``[nmb, BH, n, 1]``, m1/eta ``[nmb, BH, n, n]``, klr
``[nmb, BH, d+2, n]`` (MLP), lnw2 ``= lnw**2 [BH, 1, d]``, out ``[nmb, BH, n, d]`` (written).
The weights (loop layout, contiguous) are updated in place.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from .inner import LN_EPS


def linear_plain(
    W1: torch.Tensor,
    kq: torch.Tensor,
    shift: torch.Tensor,
    lrt: torch.Tensor,
    m1: torch.Tensor,
    lnw2: torch.Tensor,
    out: torch.Tensor,
    n: int,
    start: int,
    stop: int,
    eps: float = LN_EPS,
) -> None:
    D = [out.shape[-1]]
    for i in range(start, stop):
        k, q = kq[i][:, :n], kq[i][:, n:]
        z1 = torch.bmm(k, W1)
        xhat, mean, rstd = torch.native_layer_norm(z1, D, None, None, eps)
        g_out = torch.addcmul(shift[i], xhat, lnw2)
        g1 = torch.ops.aten.native_layer_norm_backward(
            g_out, z1, D, mean, rstd, None, None, [True, False, False]
        )[0]
        torch.bmm(q, W1, out=out[i]).baddbmm_(m1[i], g1, alpha=-1.0)
        W1.baddbmm_(k.transpose(1, 2), g1 * lrt[i], alpha=-1.0)


def mlp_plain(
    W1: torch.Tensor,
    W2: torch.Tensor,
    b2: torch.Tensor,
    kq: torch.Tensor,
    shift: torch.Tensor,
    lrt: torch.Tensor,
    klr: torch.Tensor,
    eta: torch.Tensor,
    m1: torch.Tensor,
    lnw2: torch.Tensor,
    out: torch.Tensor,
    n: int,
    start: int,
    stop: int,
    eps: float = LN_EPS,
) -> None:
    D = [out.shape[-1]]
    for i in range(start, stop):
        zkq = torch.bmm(kq[i], W1)
        z1 = zkq[:, :n]
        x2 = F.gelu(z1)
        z2 = torch.baddbmm(b2, x2, W2)
        xhat, mean, rstd = torch.native_layer_norm(z2, D, None, None, eps)
        g_out = torch.addcmul(shift[i], xhat, lnw2)
        g2 = torch.ops.aten.native_layer_norm_backward(
            g_out, z2, D, mean, rstd, None, None, [True, False, False]
        )[0]
        g1 = torch.ops.aten.gelu_backward(torch.bmm(g2, W2.transpose(1, 2)), z1)
        h = F.gelu(torch.baddbmm(zkq[:, n:], m1[i], g1, alpha=-1.0))
        e = eta[i]
        m2 = e * torch.baddbmm(torch.ones_like(e), h, x2.transpose(1, 2))
        torch.baddbmm(b2, h, W2, out=out[i]).baddbmm_(m2, g2, alpha=-1.0)
        s = lrt[i]
        W1.baddbmm_(klr[i], g1, alpha=-1.0)
        W2.baddbmm_(x2.transpose(1, 2), g2 * s, alpha=-1.0)
        b2.baddbmm_(s.transpose(1, 2), g2, alpha=-1.0)


_SCRIPTED: dict[str, object] = {}


def plain_loop(kind: str, device: torch.device):
    """The loop for ``kind``: on CPU scripted on first use (the Python function if that fails);
    elsewhere the Python function (TorchScript's GPU fusers are not what the tests check)."""
    if device.type != "cpu":
        return linear_plain if kind == "linear" else mlp_plain
    if kind not in _SCRIPTED:
        fn = linear_plain if kind == "linear" else mlp_plain
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated")
                _SCRIPTED[kind] = torch.jit.script(fn)
        except Exception as e:  # noqa: BLE001 - any scripting failure: run it as Python
            msg = f"TTT scan: TorchScript unavailable ({e}); running the Python loop"
            warnings.warn(msg, stacklevel=2)
            _SCRIPTED[kind] = fn
    return _SCRIPTED[kind]
