"""TTTLayer: parallel == streaming == chunked, resets, gradients, no parameter writes, bad input."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from moshi_ttt import TTTLayer, record_inner_loss

KINDS = ["linear", "mlp"]


def make_layer(kind, dim=32, heads=4, n=4, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    layer = TTTLayer(dim, heads, kind=kind, mini_batch_size=n, **kw).to(dtype)
    with torch.no_grad():  # move away from the init so that every term matters
        layer.tok_bias.normal_(0, 0.05)
        layer.ttt_norm_weight.add_(0.1 * torch.randn_like(layer.ttt_norm_weight))
        layer.ttt_norm_bias.normal_(0, 0.1)
        layer.lr_gate.bias.normal_(0, 0.5)
        for name in ("b1", "b2"):
            if hasattr(layer, name):
                getattr(layer, name).normal_(0, 0.1)
    return layer


def stream(layer, x, pieces):
    """Feed x through the layer in streaming mode, in pieces of the given lengths."""
    outs, t = [], 0
    with torch.no_grad(), layer.streaming(x.shape[0]):
        for p in pieces:
            outs.append(layer(x[:, t : t + p]))
            t += p
    return torch.cat(outs, 1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_parallel_streaming_chunked_agree(kind, dtype, tol):
    layer = make_layer(kind, dtype=dtype)
    x = torch.randn(3, 23, 32, dtype=dtype)  # 23: not a multiple of the mini-batch size
    with torch.no_grad():
        y = layer(x)
        state, chunks = None, []
        for a, b in [(0, 5), (5, 6), (6, 17), (17, 23)]:
            out, state = layer(x[:, a:b], state=state, return_state=True)
            chunks.append(out)
    torch.testing.assert_close(stream(layer, x, [1] * 23), y, atol=tol, rtol=0)
    torch.testing.assert_close(stream(layer, x, [3, 1, 9, 10]), y, atol=tol, rtol=0)
    torch.testing.assert_close(torch.cat(chunks, 1), y, atol=tol, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_reset_one_batch_element(kind):
    layer = make_layer(kind)
    x = torch.randn(3, 19, 32, dtype=torch.float64)
    with torch.no_grad():
        full = layer(x)
        fresh = layer(x[:, 7:])
        with layer.streaming(3):
            for t in range(7):
                layer(x[:, t : t + 1])
            layer.reset_streaming(torch.tensor([False, True, False]))
            after = torch.cat([layer(x[:, t : t + 1]) for t in range(7, 19)], 1)
            layer.reset_streaming()  # all elements
            again = layer(x[:, 7:])
    torch.testing.assert_close(after[1], fresh[1], atol=1e-12, rtol=0)  # restarted
    torch.testing.assert_close(after[[0, 2]], full[[0, 2], 7:], atol=1e-12, rtol=0)  # untouched
    torch.testing.assert_close(again, fresh, atol=1e-12, rtol=0)


def test_exec_mask_freezes_an_element():
    layer = make_layer("mlp")
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    with torch.no_grad():
        ref = layer(x[:1])
        with layer.streaming(2):
            outs = []
            for t in range(10):
                outs.append(layer(x[:, t : t + 1]))
                if t == 4:  # element 0 skips a garbage frame
                    layer.set_exec_mask(torch.tensor([False, True]))
                    layer(torch.randn(2, 1, 32, dtype=torch.float64))
                    layer.set_exec_mask(torch.tensor([True, True]))
    torch.testing.assert_close(torch.cat(outs, 1)[:1], ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_streaming_step_writes_the_state_in_place(kind):
    """One-token streaming steps allocate no new fast-weight tensor (same storage each step) and
    give the same outputs as the functional step (``inplace_streaming = False``)."""
    layer = make_layer(kind)
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    ref = []
    with torch.no_grad(), layer.streaming(2):
        state = layer._streaming_state.fast
        ptrs = [t.data_ptr() for t in state.tensors()]
        outs = []
        for t in range(11):
            outs.append(layer(x[:, t : t + 1]))
            assert layer._streaming_state.fast is state
            assert [t.data_ptr() for t in state.tensors()] == ptrs
    layer.inplace_streaming = False
    ref = stream(layer, x, [1] * 11)
    torch.testing.assert_close(torch.cat(outs, 1), ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck(kind):
    layer = make_layer(kind, dim=8, heads=2, n=3)
    names = [n for n, _ in layer.named_parameters()]
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)

    def fn(x, *params):
        return functional_call(layer, dict(zip(names, params, strict=True)), (x,))

    params = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())
    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("group", [0, 1, 4])
def test_every_parameter_gets_a_gradient(kind, group):
    layer = make_layer(kind, dtype=torch.float32, checkpoint_group_size=group)
    x = torch.randn(2, 21, 32)
    layer(x).pow(2).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"


@pytest.mark.parametrize("kind", KINDS)
def test_checkpointing_changes_nothing(kind):
    x = torch.randn(2, 37, 32, dtype=torch.float64)
    grads = []
    for group in (0, 1, 3, 100):
        layer = make_layer(kind, checkpoint_group_size=group)
        layer(x).sin().sum().backward()
        grads.append([p.grad for p in layer.parameters()])
    for other in grads[1:]:
        for a, b in zip(grads[0], other, strict=True):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_parameters_never_written(kind):
    layer = make_layer(kind, dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    x = torch.randn(2, 40, 32)
    layer.train()
    layer(x).sum().backward()
    layer.eval()
    with torch.no_grad():
        layer(x)
        stream(layer, x, [1] * 20 + [20])
    for n, p in layer.named_parameters():
        assert torch.equal(p, before[n]), f"{n} was written by a forward pass"


def test_inner_loop_is_float32_under_bf16_autocast():
    layer = make_layer("mlp", dtype=torch.float32)
    x = torch.randn(2, 20, 32)
    with torch.no_grad():
        ref = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16), record_inner_loss(layer) as probe:
            y = layer(x)
    losses = probe.losses("")
    assert losses.lafter.dtype == torch.float32  # computed by the fp32 inner loop
    assert y.dtype == torch.bfloat16  # o_proj runs in the autocast dtype
    assert (y.float() - ref).abs().max() < 0.05


@pytest.mark.parametrize("kind", KINDS)
def test_inner_loss_probe(kind):
    layer = make_layer(kind, dtype=torch.float32)
    x = torch.randn(2, 30, 32)
    with torch.no_grad():
        layer(x)  # probe disabled: nothing recorded anywhere
        with record_inner_loss(layer) as probe:
            layer(x)
        par = probe.losses("")
        with record_inner_loss(layer) as probe:
            stream(layer, x, [1] * 13 + [17])
        streamed = probe.losses("")
    assert layer.probe is None
    assert par.l0.shape == (2, 4, 30)
    for name in ("l0", "lprev", "lafter"):
        torch.testing.assert_close(
            getattr(streamed, name), getattr(par, name), atol=1e-5, rtol=1e-5
        )
    # The token's own update lowers its loss (one gradient step on a convex-ish inner loss).
    assert (par.lafter <= par.lprev + 1e-6).float().mean() > 0.9
    # Within the first mini-batch, nothing is committed yet: lprev == l0.
    torch.testing.assert_close(par.lprev[..., :4], par.l0[..., :4])


def test_bad_input_messages():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        TTTLayer(30, 4)
    with pytest.raises(ValueError, match="must be even"):
        TTTLayer(12, 4)
    with pytest.raises(ValueError, match="kind must be one of"):
        TTTLayer(32, 4, kind="conv")
    with pytest.raises(ValueError, match="mini_batch_size"):
        TTTLayer(32, 4, mini_batch_size=0)
    layer = TTTLayer(32, 4)
    with pytest.raises(ValueError, match=r"expected input \[batch, time >= 1, 32\]"):
        layer(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="expected input"):
        layer(torch.randn(5, 32))
    with pytest.raises(ValueError, match="batch size 3"):
        layer(torch.randn(2, 5, 32), state=layer.initial_state(3))


@pytest.mark.slow  # about 15 s per kind on a 2-core CPU
@pytest.mark.parametrize("kind", KINDS)
def test_chunked_layer_compiles_fullgraph(kind):
    """The chunked/training path has no host sync: one graph per chunk (``fullgraph=True``),
    equal to eager, gradients included. ``aot_eager`` traces through dynamo and AOTAutograd
    without a C++ toolchain; small sizes keep it to a few seconds."""
    torch._dynamo.reset()
    layer = make_layer(kind, dim=16, heads=2, n=4, dtype=torch.float32, checkpoint_group_size=2)
    x = torch.randn(2, 11, 16)

    def chunks(fn):
        y1, s1 = fn(x[:, :5], layer.initial_state(2))  # ends inside a mini-batch
        y2, s2 = fn(x[:, 5:], s1)  # starts there, with the state carried
        (y1.square().sum() + y2.sum()).backward()
        grads = [p.grad.clone() for p in layer.parameters()]
        layer.zero_grad(set_to_none=True)
        return torch.cat((y1, y2), 1).detach(), s2.detach(), grads

    def eager(x, s):
        return layer(x, state=s, return_state=True)

    y, s, g = chunks(torch.compile(eager, fullgraph=True, backend="aot_eager"))
    y_ref, s_ref, g_ref = chunks(eager)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    assert s.offset == s_ref.offset == 11 % 4
    for a, b in zip(s.tensors(), s_ref.tensors(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # Without autograd (in-place weight commits), carried state included.
    with torch.no_grad():
        comp = torch.compile(eager, fullgraph=True, backend="aot_eager")
        y1, s1 = comp(x[:, :5], layer.initial_state(2))
        y2, _ = comp(x[:, 5:], s1)
        torch.testing.assert_close(torch.cat((y1, y2), 1), y_ref, atol=1e-5, rtol=1e-5)


def test_scan_ab_script_runs_against_a_revision():
    """``benchmarks/ttt_ab.py`` (the A/B timing of ``ttt_dual`` against a git revision) loads
    HEAD's scan, checks it agrees with the working tree's and prints one row per kind and pass;
    an unknown revision is one clear line, exit 1."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("needs a git checkout")
    script = [sys.executable, str(root / "benchmarks/ttt_ab.py")]
    small = ["--seq", "40", "--dim", "16", "--heads", "2", "--rounds", "1"]
    proc = subprocess.run([*script, "--rev", "HEAD", *small], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| linear", "| mlp"))]
    assert len(rows) == 4 and all(row.split("|")[-2].strip().startswith("x") for row in rows)
    bad = subprocess.run([*script, "--rev", "no-such-rev", *small], capture_output=True, text=True)
    assert bad.returncode == 1 and "no-such-rev" in bad.stderr and "Traceback" not in bad.stderr
