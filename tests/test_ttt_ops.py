"""The TTT math against its definition: naive (autograd, per token) == dual == primal."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from moshi_ttt.ttt import (
    FastState,
    apply_rope,
    plain_scan,
    ttt_dual,
    ttt_naive,
    ttt_primal_step,
    ttt_primal_step_,
    weight_shapes,
)
from moshi_ttt.ttt.inner import (
    gelu,
    gelu_backward,
    head_view,
    layer_norm,
    ln_l2_grad,
    normalize_rows,
)
from moshi_ttt.ttt.rope import mini_batch_rotation, rope_into

KINDS = ["linear", "mlp"]
F64 = torch.float64


def make_inputs(kind, B=2, H=3, T=21, d=8, n=4, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        t = torch.randn(*shape, generator=g, dtype=F64) * scale
        return t.requires_grad_(requires_grad)

    q, k, v = rnd(B, H, T, d), rnd(B, H, T, d), rnd(B, H, T, d)
    lr = (torch.rand(B, H, T, generator=g, dtype=F64) * 0.2).requires_grad_(requires_grad)
    tok_bias = rnd(n, scale=0.1)
    init = tuple(rnd(*s, scale=0.3) for s in weight_shapes(kind, H, d))
    ln_w = (1 + 0.1 * torch.randn(H, d, generator=g, dtype=F64)).requires_grad_(requires_grad)
    ln_b = rnd(H, d, scale=0.1)
    return dict(q=q, k=k, v=v, lr=lr, tok_bias=tok_bias, init_weights=init, ln_w=ln_w, ln_b=ln_b)


def call(fn, kind, inp, n, sl=slice(None), **kw):
    return fn(
        kind, inp["q"][:, :, sl], inp["k"][:, :, sl], inp["v"][:, :, sl], inp["lr"][:, :, sl],
        inp["tok_bias"], inp["init_weights"], inp["ln_w"], inp["ln_b"], n, **kw,
    )  # fmt: skip


def assert_states_close(a: FastState, b: FastState, atol=1e-12):
    for x, y in zip(a.tensors(), b.tensors(), strict=True):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [1, 4, 21])
def test_dual_matches_definition(kind, T):
    inp = make_inputs(kind, T=T)
    z_ref, s_ref, p_ref = call(ttt_naive, kind, inp, 4)
    z, s, p = call(ttt_dual, kind, inp, 4, probe=True)
    torch.testing.assert_close(z, z_ref, atol=1e-12, rtol=0)
    assert_states_close(s, s_ref)
    for name in ("l0", "lprev", "lafter"):
        torch.testing.assert_close(getattr(p, name), getattr(p_ref, name), atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_primal_steps_match_definition(kind):
    inp = make_inputs(kind, T=13)
    z_ref, s_ref, p_ref = call(ttt_naive, kind, inp, 4)
    state = FastState.zeros(kind, 2, 3, 8, dtype=F64)
    zs, lafter = [], []
    for t in range(13):
        z, state, p = call(ttt_primal_step, kind, inp, 4, slice(t, t + 1), state=state, probe=True)
        zs.append(z)
        lafter.append(p.lafter)
    torch.testing.assert_close(torch.cat(zs, 2), z_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.cat(lafter, 2), p_ref.lafter, atol=1e-12, rtol=0)
    assert_states_close(state, s_ref)


@pytest.mark.parametrize("kind", KINDS)
def test_inplace_primal_steps_match_definition_without_allocating_weights(kind):
    """The in-place streaming step: same outputs, probe and state as the definition, and the
    state's tensors are the same storage after every step (no new fast-weight tensor)."""
    inp = make_inputs(kind, T=13)
    z_ref, s_ref, p_ref = call(ttt_naive, kind, inp, 4)
    state = FastState.zeros(kind, 2, 3, 8, dtype=F64)
    ptrs = [t.data_ptr() for t in state.tensors()]
    zs, lafter, lprev = [], [], []
    for t in range(13):
        z, p = call(ttt_primal_step_, kind, inp, 4, slice(t, t + 1), state=state, probe=True)
        assert [t.data_ptr() for t in state.tensors()] == ptrs
        zs.append(z)
        lafter.append(p.lafter)
        lprev.append(p.lprev)
    torch.testing.assert_close(torch.cat(zs, 2), z_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.cat(lafter, 2), p_ref.lafter, atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.cat(lprev, 2), p_ref.lprev, atol=1e-12, rtol=0)
    assert_states_close(state, s_ref)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cuts", [[], [2], [3, 37], [1, 66, 69]])
@pytest.mark.parametrize("loop", ["scripted", "python"])
def test_forward_only_dual_matches_definition(kind, cuts, loop, monkeypatch):
    """Without autograd the dual form commits the weights in place: 70 tokens = 18 mini-batches
    of 4, in chunks that start and end inside mini-batches (carried ``grad_sum``). The committed
    mini-batches run in ``plain_scan``'s loop, scripted or as plain Python."""
    fn = plain_scan.plain_loop(kind, torch.device("cpu"))
    assert isinstance(fn, torch.jit.ScriptFunction)  # the fast path is in use
    if loop == "python":
        python_fn = {"linear": plain_scan.linear_plain, "mlp": plain_scan.mlp_plain}[kind]
        monkeypatch.setitem(plain_scan._SCRIPTED, kind, python_fn)
    T = 70
    inp = make_inputs(kind, T=T)
    z_ref, s_ref, _ = call(ttt_naive, kind, inp, 4)
    state, zs = None, []
    with torch.no_grad():
        for a, b in zip([0, *cuts], [*cuts, T], strict=True):
            z, state, _ = call(ttt_dual, kind, inp, 4, slice(a, b), state=state)
            zs.append(z)
    torch.testing.assert_close(torch.cat(zs, 2), z_ref, atol=1e-12, rtol=0)
    assert_states_close(state, s_ref)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cuts", [[5], [1, 2, 3, 11, 12], [4, 8, 16], [7, 20]])
def test_chunks_with_carried_state_match_one_pass(kind, cuts):
    T = 21
    inp = make_inputs(kind, T=T)
    z_ref, s_ref, _ = call(ttt_dual, kind, inp, 4)
    state, zs = None, []
    for a, b in zip([0, *cuts], [*cuts, T], strict=True):
        z, state, _ = call(
            ttt_dual, kind, inp, 4, slice(a, b), state=state, checkpoint_group_size=2
        )
        zs.append(z)
    torch.testing.assert_close(torch.cat(zs, 2), z_ref, atol=1e-12, rtol=0)
    assert_states_close(state, s_ref)


def test_dual_rejects_sequences_at_different_positions():
    inp = make_inputs("linear", T=5)
    zeros = FastState.zeros("linear", 2, 3, 8, dtype=F64)
    state = FastState(zeros.delta, zeros.grad_sum, torch.tensor([0, 2]))  # offset unknown
    with pytest.raises(ValueError, match="same mini-batch position"):
        call(ttt_dual, "linear", inp, 4, state=state)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_match_definition(kind):
    """Gradients through the dual form (any checkpoint grouping) equal those of the definition."""
    inp = make_inputs(kind, T=11, requires_grad=True)
    leaves = [inp[k] for k in ("q", "k", "v", "lr", "tok_bias", "ln_w", "ln_b")]
    leaves += list(inp["init_weights"])
    w = torch.randn(2, 3, 11, 8, dtype=F64)

    def grads(fn, **kw):
        z, _, _ = call(fn, kind, inp, 4, **kw)
        return torch.autograd.grad((z * w).sum(), leaves)

    ref = grads(ttt_naive)
    for group in (0, 1, 2, 100):  # 100: fewer mini-batches than one group
        for g, r in zip(grads(ttt_dual, checkpoint_group_size=group), ref, strict=True):
            torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-9)


def test_ln_l2_grad_matches_autograd():
    z = torch.randn(2, 3, 5, 8, dtype=F64, requires_grad=True)
    tgt = torch.randn(2, 3, 5, 8, dtype=F64)
    ln_w, ln_b = torch.randn(3, 8, dtype=F64), torch.randn(3, 8, dtype=F64)
    loss = 0.5 * (layer_norm(z, ln_w, ln_b) - tgt).pow(2).sum()
    (ref,) = torch.autograd.grad(loss, z)
    got, residual = ln_l2_grad(z.detach(), head_view(ln_w, 4), head_view(ln_b, 4) - tgt)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(residual, layer_norm(z, ln_w, ln_b) - tgt)


def test_ln_l2_grad_scaled_form_matches():
    """``scaled``: ln_w and shift premultiplied (ln_w**2, ln_w * shift) give the same gradient."""
    z = torch.randn(2, 3, 5, 8, dtype=F64)
    ln_w, shift = head_view(torch.randn(3, 8, dtype=F64), 4), torch.randn(2, 3, 5, 8, dtype=F64)
    ref, _ = ln_l2_grad(z, ln_w, shift)
    got, residual = ln_l2_grad(z, ln_w * ln_w, ln_w * shift, scaled=True)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
    assert residual is None


def test_normalize_rows_is_layer_norm():
    x = torch.randn(3, 7, 5, 64, dtype=F64) * 3 + 1
    ref = torch.nn.functional.layer_norm(x, (64,), eps=1e-6)
    torch.testing.assert_close(normalize_rows(x), ref, atol=1e-12, rtol=0)
    xr = x.requires_grad_()
    w = torch.randn_like(x)
    (g,) = torch.autograd.grad((normalize_rows(xr) * w).sum(), xr)
    (g_ref,) = torch.autograd.grad(
        (torch.nn.functional.layer_norm(xr, (64,), eps=1e-6) * w).sum(), xr
    )
    torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("grad", [False, True])
def test_rope_into_buffer_matches_apply_rope(grad):
    """RoPE written into a strided buffer (rows d+2 wide) == ``apply_rope`` by position."""
    B, H, T, n, d = 2, 3, 8, 4, 6
    x = torch.randn(B, H, T, d, dtype=F64, requires_grad=grad)
    buf = torch.zeros(B, H, T // n, n, d + 2, dtype=F64)  # [.., mini-batch, row, d+2]
    rot = mini_batch_rotation(n, d, F64)
    with torch.set_grad_enabled(grad):
        rope_into(buf[..., :d], x.unflatten(2, (T // n, n)), rot)
    ref = apply_rope(x, torch.arange(T).remainder(n).expand(B, T))
    torch.testing.assert_close(buf[..., :d].flatten(2, 3), ref, atol=1e-12, rtol=0)
    assert buf[..., d:].abs().max() == 0  # the columns past d untouched
    if grad:
        w = torch.randn_like(ref)
        (g,) = torch.autograd.grad((buf[..., :d].flatten(2, 3) * w).sum(), x)
        (g_ref,) = torch.autograd.grad((ref * w).sum(), x)
        torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("grad", [False, True])
def test_dual_with_rope_theta_equals_rotating_first(kind, grad):
    """``rope_theta``: the scan rotates q and k by (pos + t) % n itself, also for a state that
    arrives inside a mini-batch and with the probe on."""
    inp = make_inputs(kind, T=11, requires_grad=grad)
    n, theta = 4, 500.0
    with torch.set_grad_enabled(grad):
        _, s, _ = call(ttt_dual, kind, inp, n, slice(0, 3))  # 3 tokens: ends inside a mini-batch
        outs = {}
        for rope in (False, True):
            q, k = inp["q"][:, :, 3:], inp["k"][:, :, 3:]
            if not rope:
                pos = (3 + torch.arange(8)).remainder(n).expand(2, 8)
                q, k = apply_rope(q, pos, theta), apply_rope(k, pos, theta)
            outs[rope] = ttt_dual(
                kind, q, k, inp["v"][:, :, 3:], inp["lr"][:, :, 3:], inp["tok_bias"],
                inp["init_weights"], inp["ln_w"], inp["ln_b"], n, state=s, probe=True,
                rope_theta=theta if rope else None,
            )  # fmt: skip
    (z0, s0, p0), (z1, s1, p1) = outs[False], outs[True]
    torch.testing.assert_close(z1, z0, atol=1e-12, rtol=0)
    assert_states_close(s1, s0)
    for name in ("l0", "lprev", "lafter"):
        torch.testing.assert_close(getattr(p1, name), getattr(p0, name), atol=1e-12, rtol=0)
    if grad:
        leaves = [inp["q"], inp["k"], inp["v"], inp["lr"]]
        g0 = torch.autograd.grad(z0.sum(), leaves, retain_graph=True)
        g1 = torch.autograd.grad(z1.sum(), leaves)
        for a, b in zip(g1, g0, strict=True):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


def test_gelu_grad_matches_autograd():
    x = torch.linspace(-6, 6, 101, dtype=F64, requires_grad=True)
    g = torch.randn(101, dtype=F64)
    (ref,) = torch.autograd.grad((gelu(x) * g).sum(), x)
    torch.testing.assert_close(gelu_backward(g, x.detach()), ref)


def test_ttt_math_does_not_import_moshi():
    """The math package stays independent of Moshi (plain torch)."""
    root = Path(__file__).parents[1] / "src" / "moshi_ttt" / "ttt"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            assert not any(n.split(".")[0] == "moshi" for n in names), path
