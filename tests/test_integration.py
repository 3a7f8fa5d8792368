"""TTT inside the real Moshi (tiny random config): exactness at init, parallel = streaming =
chunked, LMGen, streaming state semantics, In-Place TTT math and gradients, config and specs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from moshi.models.lm import LMGen, LMModel
from moshi.utils.compile import no_compile

from moshi_ttt.integration import (
    GatedTTT,
    InPlaceTTT,
    TTTConfig,
    apply_ttt,
    build_tiny_lm,
    chunked_causal_conv,
    named_ttt_parameters,
    parse_layer_spec,
    reset_ttt_parameters,
    set_gates,
    tiny_lm_kwargs,
    ttt_modules,
    ttt_parameters,
)
from moshi_ttt.integration.hybrid import AdoptingLayer
from moshi_ttt.integration.inplace import inplace_correction
from moshi_ttt.integration.streaming import widen_kv_caches

CONTEXT = 12  # the tiny model's attention context, in frames
T_LONG = 31  # > CONTEXT, not a multiple of the TTT mini-batch (4) nor of the chunk (6)
KINDS = ("linear", "mlp", "inplace")


@pytest.fixture(autouse=True)
def _eager():
    """moshi torch.compiles a few functions lazily; on CPU that costs minutes, so stay eager."""
    with no_compile():
        yield


def ttt_lm(kind: str, seed: int = 0, layers="1,3", gate: float = 0.5, **cfg) -> LMModel:
    """A tiny model with TTT in ``layers``, initialised so the TTT branch matters."""
    lm = build_tiny_lm(seed=seed, **cfg.pop("lm", {}))
    config = TTTConfig(layers=layers, kind=kind, mini_batch_size=4, chunk_size=6, gate_init=gate)
    for key, value in cfg.items():
        setattr(config, key, value)
    torch.manual_seed(seed)  # the TTT weights are drawn from the global RNG
    apply_ttt(lm, config)
    if kind == "inplace":
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for _, m in ttt_modules(lm):
                m.conv_weight.copy_(0.3 * torch.randn(m.conv_weight.shape, generator=g))
                m.target.add_(0.1 * torch.randn(m.target.shape, generator=g))
    return lm


def random_codes(lm: LMModel, B: int, T: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, lm.card, (B, lm.num_codebooks, T), generator=g)
    codes[:, 0] = torch.randint(0, lm.text_card, (B, T), generator=g)
    return codes


def stream(module, x: torch.Tensor, step: int, fn=None, time_dim: int = 1) -> torch.Tensor:
    """In streaming mode, run ``fn`` (default: the module) on pieces of ``step`` frames of x
    (time along ``time_dim``) and join the outputs along their time dim (-2 for text logits)."""
    outs = []
    with module.streaming(x.shape[0]):
        if step > 1:
            widen_kv_caches(module, x.shape[0], step)
        for t in range(0, x.shape[time_dim], step):
            outs.append((fn or module)(x.narrow(time_dim, t, min(step, x.shape[time_dim] - t))))
    return torch.cat(outs, dim=1 if fn is None else -2)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fast_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """The streaming TTT state tensors of every TTT module (clones)."""
    out = []
    for _, m in ttt_modules(model):
        mod = m.layer if isinstance(m, GatedTTT) else m
        out += [t.clone() for t in mod._streaming_state.fast.tensors()]
    return out


# -- exactness at initialisation -------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("placement", ["before_attention", "after_attention", "after_ffn"])
def test_gate_zero_is_the_base_model(kind, placement):
    base = build_tiny_lm(seed=2)
    lm = build_tiny_lm(seed=2)
    apply_ttt(
        lm,
        TTTConfig(layers="all", kind=kind, placement=placement, mini_batch_size=4, gate_init=0.0),
    )
    codes = random_codes(lm, 2, 20)
    with torch.no_grad():
        a, b = base(codes), lm(codes)
    assert torch.equal(a.logits.nan_to_num(), b.logits.nan_to_num())
    assert torch.equal(a.text_logits.nan_to_num(), b.text_logits.nan_to_num())


@pytest.mark.parametrize("target", ["ffn_input", "embeddings"])
def test_inplace_zero_conv_is_the_base_model(target):
    base = build_tiny_lm(seed=2)
    lm = build_tiny_lm(seed=2)
    apply_ttt(lm, dict(layers="all", kind="inplace", chunk_size=4, inplace_target=target))
    codes = random_codes(lm, 2, 20)
    with torch.no_grad():
        a, b = base(codes), lm(codes)
    assert torch.equal(a.logits.nan_to_num(), b.logits.nan_to_num())
    assert torch.equal(a.text_logits.nan_to_num(), b.text_logits.nan_to_num())


@pytest.mark.parametrize("kind", KINDS)
def test_base_names_unchanged_and_base_checkpoint_loads(kind):
    base = build_tiny_lm(seed=5)
    lm = build_tiny_lm(seed=6)
    layers = apply_ttt(lm, TTTConfig(layers="top:2", kind=kind))
    assert layers == [2, 3]
    base_sd = base.state_dict()
    result = lm.load_state_dict(base_sd, strict=False)
    assert result.unexpected_keys == []
    assert set(result.missing_keys) == {n for n, _ in named_ttt_parameters(lm)}
    assert all(".ttt." in k for k in result.missing_keys)
    for k, v in base_sd.items():
        assert torch.equal(lm.state_dict()[k], v), k
    for i in layers:  # the layer itself knows its base keys: strict load on those
        layer = lm.transformer.layers[i]
        sub = {k: base_sd[f"transformer.layers.{i}.{k}"] for k in layer.base_state_dict_keys()}
        assert len(sub) == len(base.transformer.layers[i].state_dict())
    assert all(not isinstance(m, AdoptingLayer) for m in lm.depformer.modules())
    assert ttt_parameters(lm) and all(p.requires_grad for p in ttt_parameters(lm))


def test_set_gates_forces_the_base_model_and_back():
    base = build_tiny_lm(seed=0)
    codes = random_codes(base, 1, 16)
    for kind in ("mlp", "inplace"):
        lm = ttt_lm(kind)
        with torch.no_grad():
            ref = base(codes).text_logits
            learned = lm(codes).text_logits
            assert set_gates(lm, 0.0) == 2
            forced = lm(codes).text_logits
            set_gates(lm, None)
            back = lm(codes).text_logits
        assert torch.equal(forced, ref)
        assert torch.equal(back, learned) and not torch.allclose(learned, ref, atol=1e-4)


# -- whole-model equivalence -----------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_parallel_streaming_and_chunked_agree(kind):
    lm = ttt_lm(kind)
    base = build_tiny_lm(seed=0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, T_LONG, 64, generator=g)
    with torch.no_grad():
        ref = lm.transformer(x)
        assert not torch.allclose(ref, base.transformer(x), atol=1e-3)  # TTT does something
        for step in (1, 5):
            out = stream(lm.transformer, x, step)
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4, msg=f"step {step}")

        # LMModel.forward_text (embeddings -> transformer -> text logits): parallel vs steps.
        seq = random_codes(lm, 2, T_LONG)
        _, ref_logits = lm.forward_text(seq)
        logits = stream(lm, seq, 1, fn=lambda s: lm.forward_text(s)[1], time_dim=2)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("recipe", ["RETROFIT_TTT", "FORCED_TTT"])
def test_recipe_branches_parallel_and_streaming_agree(recipe):
    """The shipped retrofit (upper layers, after the attention, zero-init output) and the
    mechanism recipe, with their output projections moved off zero as training does."""
    from moshi_ttt import recipes

    lm = build_tiny_lm(seed=0)
    torch.manual_seed(0)
    layers = apply_ttt(lm, TTTConfig(**{**getattr(recipes, recipe), "mini_batch_size": 4}))
    assert layers == ([2, 3] if recipe == "RETROFIT_TTT" else [0])
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, m in ttt_modules(lm):
            m.layer.o_proj.weight.copy_(
                0.05 * torch.randn(m.layer.o_proj.weight.shape, generator=g)
            )
    seq = random_codes(lm, 2, T_LONG, seed=4)
    base = build_tiny_lm(seed=0)
    with torch.no_grad():
        _, ref = lm.forward_text(seq)
        assert not torch.allclose(ref, base.forward_text(seq)[1], atol=1e-4)  # TTT does something
        out = stream(lm, seq, 1, fn=lambda s: lm.forward_text(s)[1], time_dim=2)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_inplace_embeddings_target_parallel_streaming_agree():
    lm = ttt_lm("inplace", inplace_target="embeddings")
    seq = random_codes(lm, 2, T_LONG, seed=3)
    with torch.no_grad():
        _, ref = lm.forward_text(seq)
        out = stream(lm, seq, 1, fn=lambda s: lm.forward_text(s)[1], time_dim=2)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


# -- streaming state: LMGen, reset, exec mask -----------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_lmgen_runs_state_persists_and_resets(kind):
    lm = ttt_lm(kind, layers="middle")
    before = snapshot(lm)
    gen = LMGen(lm, top_k=10, top_k_text=10)
    g = torch.Generator().manual_seed(0)
    with gen.streaming(2):
        states = []
        for i in range(30):
            out = gen.step(torch.randint(0, lm.card, (2, 8, 1), generator=g))
            assert out is None if i == 0 else out.shape == (2, 9, 1)
            states.append(fast_tensors(lm))
        # the fast weights move during the session and are never reset by the steps themselves
        moved = [
            not all(map(torch.equal, s0, s1))
            for s0, s1 in zip(states[:-1], states[1:], strict=True)
        ]
        assert sum(moved) >= 6
        acc_norms = [float(s[0].norm()) for s in states]
        assert acc_norms[-1] > 0 and acc_norms[12] > 0

        # a per-element reset zeroes that element's state and leaves the other's alone
        now = fast_tensors(lm)
        gen.reset_streaming(torch.tensor([True, False]))
        after = fast_tensors(lm)
        assert all(float(t[0].abs().sum()) == 0 for t in after)
        assert all(torch.equal(a[1], b[1]) for a, b in zip(now, after, strict=True))
        gen.step(torch.randint(0, lm.card, (2, 8, 1), generator=g))
        gen.reset_streaming()
        assert all(float(t.abs().sum()) == 0 for t in fast_tensors(lm))
    after_params = snapshot(lm)
    assert all(torch.equal(before[k], after_params[k]) for k in before)  # never written


def test_conversion_after_streaming_use():
    """moshi caches a module's streaming children on first use; converted layers must join."""
    lm = build_tiny_lm()
    with lm.streaming(1):
        lm.forward_text(random_codes(lm, 1, 2))
    apply_ttt(lm, TTTConfig(layers="all", kind="inplace", chunk_size=2))
    with lm.streaming(1):
        lm.forward_text(random_codes(lm, 1, 3))
        positions = [m._streaming_state.fast.pos.tolist() for _, m in ttt_modules(lm)]
        assert positions == [[1]] * 4  # 3 frames, chunks of 2: every layer advanced


@pytest.mark.parametrize("kind", KINDS)
def test_per_element_reset_restarts_only_that_sequence(kind):
    """After resetting element 0 mid-stream, its outputs equal a fresh stream of its new
    inputs; element 1 goes on. The two sequences are then at different TTT mini-batch / chunk
    positions, and the rest is fed in chunks of 5 frames."""
    lm = ttt_lm(kind, layers="all")
    tr = lm.transformer
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 2 * T_LONG, 64, generator=g)
    cut = T_LONG + 2
    with torch.no_grad():
        ref = stream(tr, x, 1)
        ref0 = stream(tr, x[:1, cut:], 1)
        outs = []
        with tr.streaming(2):
            widen_kv_caches(tr, 2, 5)
            for t in range(cut):
                outs.append(tr(x[:, t : t + 1]))
            tr.reset_streaming(torch.tensor([True, False]))
            for t in range(cut, x.shape[1], 5):
                outs.append(tr(x[:, t : t + 5]))
        out = torch.cat(outs, 1)
    torch.testing.assert_close(out[1], ref[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[0, cut:], ref0[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_exec_mask_freezes_the_state(kind):
    lm = ttt_lm(kind, layers="middle")
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), lm.transformer.streaming(2):
        lm.transformer(x[:, :5])
        before = fast_tensors(lm)
        lm.transformer.set_exec_mask(torch.tensor([True, False]))
        lm.transformer(x[:, 5:6])
        after = fast_tensors(lm)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(before, after, strict=True))
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(before, after, strict=True))


@pytest.mark.parametrize("kind", KINDS)
def test_forward_never_writes_parameters(kind):
    lm = ttt_lm(kind).train()
    before = snapshot(lm)
    out = lm(random_codes(lm, 2, 14))
    out.text_logits.nan_to_num().sum().backward()
    after = snapshot(lm)
    assert all(torch.equal(before[k], after[k]) for k in before)


# -- gradients -------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["ffn_input", "embeddings"])
def test_inplace_gradients_with_gradient_checkpointing(target):
    """The seeds' bug: conv and W_target got grad_norm = 0. Here they get the same non-zero
    gradients with and without moshi's gradient checkpointing."""
    grads = []
    for ckpt in (False, True):
        lm = ttt_lm("inplace", inplace_target=target, lm={"gradient_checkpointing": ckpt})
        assert lm.transformer.checkpointing is ckpt
        lm.train()
        out = lm(random_codes(lm, 2, 20))
        loss = (
            out.logits[out.mask].logsumexp(-1).mean() + out.text_logits.nan_to_num().square().mean()
        )
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in named_ttt_parameters(lm)})
    for name, g in grads[1].items():
        assert g.norm() > 0, name
        torch.testing.assert_close(g, grads[0][name], rtol=1e-4, atol=1e-7)


def test_inplace_conv_gets_gradient_from_zero_init():
    lm = build_tiny_lm(gradient_checkpointing=True).train()
    apply_ttt(lm, TTTConfig(layers="middle", kind="inplace", chunk_size=4))
    lm(random_codes(lm, 1, 12)).text_logits.nan_to_num().square().mean().backward()
    ((_, m),) = ttt_modules(lm)
    assert m.conv_weight.grad.norm() > 0  # the way out of the zero init


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_gated_ttt_gradients_with_gradient_checkpointing(kind):
    """Moshi's layer checkpointing around the TTT scan's own group checkpointing: same grads."""
    grads = []
    for ckpt in (False, True):
        lm = ttt_lm(kind, gate=0.3, lm={"gradient_checkpointing": ckpt}).train()
        out = lm(random_codes(lm, 2, 20))
        out.text_logits.nan_to_num().square().mean().backward()
        grads.append({n: p.grad for n, p in named_ttt_parameters(lm)})
    for name, g in grads[1].items():
        if not name.endswith("tok_bias"):  # tok_bias only matters through lr of late tokens
            assert g is not None and g.norm() > 0, name
        torch.testing.assert_close(g, grads[0][name], rtol=1e-4, atol=1e-7)


# -- In-Place TTT math -----------------------------------------------------------------------
def naive_inplace(z, x, conv_w, target, lr, C):
    """The issue's definition, chunk by chunk: W_down(i) = W0 + sum_{j<i} dW_j (only the
    correction, W0 = 0), conv by F.conv1d on each chunk separately."""
    B, T, h = z.shape
    D, k = conv_w.shape
    out = torch.zeros(B, T, D, dtype=z.dtype)
    dW = torch.zeros(B, D, h, dtype=z.dtype)
    for s in range(0, T, C):
        zc, xc = z[:, s : s + C], x[:, s : s + C]
        out[:, s : s + C] = zc @ dW.transpose(1, 2)  # apply ...
        v = F.conv1d(F.pad(xc.transpose(1, 2), (k - 1, 0)), conv_w.unsqueeze(1), groups=D)
        dW = dW + lr * (v.transpose(1, 2) @ target).transpose(1, 2) @ zc  # ... then update
    return out


def test_inplace_parallel_and_state_match_the_definition():
    g = torch.Generator().manual_seed(0)
    B, T, D, h, C, k = 2, 23, 8, 12, 5, 3
    z, x = torch.randn(B, T, h, generator=g), torch.randn(B, T, D, generator=g)
    conv_w, target = torch.randn(D, k, generator=g), torch.randn(D, D, generator=g)
    ref = naive_inplace(z.double(), x.double(), conv_w.double(), target.double(), 0.3, C)
    par, _ = inplace_correction(z.double(), x.double(), conv_w, target.double(), 0.3, C)
    torch.testing.assert_close(par, ref)
    for step in (1, 3, 7):  # carried state, chunks straddling the C boundaries
        m = InPlaceTTT(D, h, chunk_size=C, lr=0.3, conv_kernel=k, dtype=torch.float64)
        with torch.no_grad():
            m.conv_weight.copy_(conv_w)
            m.target.copy_(target)
            state, outs = None, []
            for s in range(0, T, step):
                y, state = m(z[:, s : s + step].double(), x[:, s : s + step].double(),
                             state=state or m.initial_state(B), return_state=True)  # fmt: skip
                outs.append(y)
        torch.testing.assert_close(torch.cat(outs, 1), ref)
        assert state.pos.tolist() == [T % C] * B


def test_inplace_conv_does_not_leak_across_chunks():
    g = torch.Generator().manual_seed(1)
    C, k = 6, 5
    x = torch.randn(1, 4 * C, 3, generator=g)
    w = torch.randn(3, k, generator=g)
    y = chunked_causal_conv(x, w, C)
    x2 = x.clone()
    x2[:, C : 2 * C] += 10.0  # change chunk 1
    y2 = chunked_causal_conv(x2, w, C)
    assert torch.equal(y[:, 2 * C :], y2[:, 2 * C :])  # chunks 2, 3 unchanged
    assert torch.equal(y[:, :C], y2[:, :C])
    assert not torch.allclose(y[:, C : 2 * C], y2[:, C : 2 * C])
    # inside a chunk it is the ordinary causal conv
    ref = F.conv1d(F.pad(x[:, C : 2 * C].transpose(1, 2), (k - 1, 0)), w.unsqueeze(1), groups=3)
    torch.testing.assert_close(y[:, C : 2 * C], ref.transpose(1, 2))
    # and the whole-model path: changing X in chunk i-1 leaves conv(X) of chunk i alone
    _, s1 = inplace_correction(torch.ones(1, 2 * C, 2), x[:, : 2 * C], w, torch.eye(3), 1.0, C,
                               state=None, return_state=True)  # fmt: skip
    _, s2 = inplace_correction(torch.ones(1, 2 * C, 2), x2[:, : 2 * C], w, torch.eye(3), 1.0, C,
                               state=None, return_state=True)  # fmt: skip
    assert not torch.equal(s1.acc, s2.acc) and torch.equal(s1.partial, s2.partial)


# -- apply_ttt, meta device ------------------------------------------------------------------
def test_apply_ttt_errors_and_meta_device():
    lm = build_tiny_lm()
    with pytest.raises(ValueError, match="4 layers"):
        apply_ttt(lm, TTTConfig(layers=[1, 7]))
    apply_ttt(lm, TTTConfig(layers="bottom:1"))
    with pytest.raises(ValueError, match="already"):
        apply_ttt(lm, TTTConfig(layers="top:1"))
    with pytest.raises(ValueError, match="kinds|kind"):
        apply_ttt(build_tiny_lm(), {"kind": "lstm"})
    fresh = build_tiny_lm()
    with fresh.streaming(1), pytest.raises(ValueError, match="streaming"):
        apply_ttt(fresh, TTTConfig())

    with torch.device("meta"):
        meta = LMModel(**tiny_lm_kwargs())
    for kind in KINDS:
        m = LMModel(**tiny_lm_kwargs(), device="meta") if kind != "linear" else meta
        apply_ttt(m, TTTConfig(layers="all", kind=kind))
        assert all(p.is_meta for p in ttt_parameters(m))
    m.to_empty(device="cpu")
    reset_ttt_parameters(m)
    assert all(torch.isfinite(p).all() for p in ttt_parameters(m))
    assert all(torch.equal(mod.target, torch.eye(64)) for _, mod in ttt_modules(m))


# -- config and layer specs ------------------------------------------------------------------
def test_parse_layer_spec():
    assert parse_layer_spec("all", 4) == [0, 1, 2, 3]
    assert parse_layer_spec("middle", 32) == [16]
    assert parse_layer_spec("upper", 32) == list(range(16, 32))
    assert parse_layer_spec("upper", 4) == [2, 3] and parse_layer_spec("upper", 1) == [0]
    assert parse_layer_spec("top:3", 32) == [29, 30, 31]
    assert parse_layer_spec("bottom:2", 32) == [0, 1]
    assert parse_layer_spec("every:8", 32) == [0, 8, 16, 24]
    assert parse_layer_spec([5, 3, 5], 32) == [3, 5]
    assert parse_layer_spec("10,20,29-31", 32) == [10, 20, 29, 30, 31]
    assert parse_layer_spec(" 7 ", 32) == [7]
    for bad in ("32", "10,40", [0, 32], [-1], "top:33", "top:0", "every:0", "5-3"):
        with pytest.raises(ValueError, match="32 layers"):
            parse_layer_spec(bad, 32)
    with pytest.raises(ValueError, match="names no layer"):
        parse_layer_spec([], 32)
    for bad in ("some", "top:x", "1,,2", 3.5):
        with pytest.raises(ValueError):
            parse_layer_spec(bad, 32)


def test_config_yaml_roundtrip_and_errors(tmp_path):
    cfg = TTTConfig(layers=[3, 5], kind="inplace", chunk_size=128, inplace_lr=1, base_lr=0.5)
    path = tmp_path / "ttt.yaml"
    cfg.to_yaml(path)
    back = TTTConfig.from_yaml(path)
    assert back == cfg and back.to_dict() == cfg.to_dict()
    assert isinstance(back.inplace_lr, float)
    assert TTTConfig.from_dict(TTTConfig().to_dict()) == TTTConfig()
    (tmp_path / "empty.yaml").write_text("")
    assert TTTConfig.from_yaml(tmp_path / "empty.yaml") == TTTConfig()

    (tmp_path / "typo.yaml").write_text("layers: all\nmini_bach_size: 8\n")
    with pytest.raises(ValueError, match="mini_bach_size.*mini_batch_size"):
        TTTConfig.from_yaml(tmp_path / "typo.yaml")
    cases = {
        "mini_batch_size": [0, "16", 2.0, True],
        "kind": ["lstm", 1],
        "gate_init": ["0.1", math.nan, None],
        "base_lr": [0.0, -1.0, "x"],
        "inplace_lr": [0, math.inf],
        "chunk_size": [0, None],
        "placement": ["before_ffn"],
        "inplace_target": ["tokens"],
        "layers": ["sometimes", [1, "2"], 3, {"a": 1}],
        "num_heads": [0, 2.5],
        "checkpoint_group_size": [-1],
        "inplace_conv_kernel": [0],
    }
    for key, values in cases.items():
        for value in values:
            with pytest.raises(ValueError, match=key):
                TTTConfig.from_dict({key: value})
    with pytest.raises(ValueError, match="mapping"):
        TTTConfig.from_dict(["layers"])
