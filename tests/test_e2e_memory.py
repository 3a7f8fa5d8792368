"""The end-to-end memory against its definition (float64): the scan and frame-by-frame streaming
equal the plain reference loop; per-element resets; the meta-gradients (first and second order)
equal finite differences; step 0 is the base; bad settings are refused naming the key; a
non-finite update is rolled back; the trainer meta-trains it on a frozen base."""

from __future__ import annotations

import math

import pytest
import torch
from moshi.modules.transformer import RMSNorm
from moshi.utils.compile import no_compile

from moshi_ttt.eval.e2e import e2e_losses, inner_lr, sweep_e2e
from moshi_ttt.eval.long_context import stream_losses
from moshi_ttt.integration import build_tiny_lm
from moshi_ttt.integration.apply import apply_ttt, named_ttt_parameters, set_gates
from moshi_ttt.integration.config import TTTConfig, parse_layer_spec
from moshi_ttt.integration.e2e import e2e_layers
from moshi_ttt.integration.e2e_scan import (
    GradLog,
    InnerLoop,
    chunk_ce,
    e2e_forward,
    e2e_reference,
    e2e_scan,
)
from moshi_ttt.integration.e2e_stream import E2EStreamer
from moshi_ttt.integration.streaming import delayed_inputs
from moshi_ttt.token_weights import step_ce
from moshi_ttt.ttt.e2e import inner_sgd_step

SETTINGS = {"e2e_chunk": 4, "e2e_lr": 0.5, "e2e_steps": 2, "e2e_clip": 5.0, "e2e_decay": 0.1}


@pytest.fixture(autouse=True)
def _eager():
    with no_compile():
        yield


def memory_lm(layers: str = "quarter", rope: bool = False, seed: int = 0, **settings):
    """A tiny float64 model with the memory; without RoPE the shifted recomputation is exact
    (moshi computes RoPE angles in float32, so with it positions shift by ~1e-6), and its
    RMSNorms compute in float64 too (moshi's ``rms_norm_f32`` would round to float32)."""
    kw = {} if rope else {"positional_embedding": "none"}
    lm = build_tiny_lm(seed, **kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        apply_ttt(lm, {"kind": "e2e", "layers": layers, **(settings or SETTINGS)})
        for _, layer in e2e_layers(lm):  # a memory that already adds something at step 0
            torch.nn.init.normal_(layer.e2e.w_out, std=0.05)
    for m in lm.modules():
        if isinstance(m, RMSNorm):
            m.dtype = None
    return lm.double().eval()


def batch(lm, B: int = 2, T: int = 30, seed: int = 0, audio: bool = True):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, lm.card, (B, 17, T), generator=g)
    codes[:, 0] = torch.randint(0, lm.text_card, (B, T), generator=g)
    codes[B - 1, 5:9, 3] = -1  # a missing stretch of one codebook
    if not audio:
        codes[:, 1:] = -1
    return codes


def text_logits(lm, codes):
    """The plain forward's text logits, NaN (unscored) as 0."""
    return lm(codes).text_logits.nan_to_num()


@pytest.mark.parametrize("layers", ["quarter", "2,3", "1"])
def test_scan_and_streaming_equal_the_reference(layers):
    lm = memory_lm(layers)
    inputs, delayed = delayed_inputs(lm, batch(lm))
    loop = InnerLoop.of(lm)
    ref_ce, ref_w = e2e_reference(lm, inputs, delayed, loop)
    res = e2e_scan(lm, inputs, delayed, loop)
    torch.testing.assert_close(res.ce, ref_ce, rtol=0, atol=1e-12)
    for got, want in zip(res.weights, ref_w):
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-12)
    assert res.updates == loop.steps * 2 * (math.ceil(30 / loop.chunk) - 1)  # steps x B x chunks
    # frame by frame on moshi's KV caches, the update from the recorded inputs
    B, T = inputs.shape[0], inputs.shape[-1]
    ces = []
    with lm.streaming(B):
        streamer = E2EStreamer(lm, loop)
        for t in range(T):
            out, text = lm.forward_text(inputs[:, :, t : t + 1])
            audio = lm.forward_depformer_training(delayed[:, :, t : t + 1], out)
            ces.append(chunk_ce(lm, text, audio, delayed, t, t + 1))
            streamer.observe(delayed[:, :, t : t + 1])
        weights = [st.weights() for st in streamer.states]
    torch.testing.assert_close(torch.cat(ces, 2), ref_ce, rtol=0, atol=1e-12)
    assert streamer.updates == res.updates
    for got, want in zip(weights, ref_w):  # the same chunks updated: the same fast weights
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-12)


def test_with_rope_the_forms_agree_to_float32_angles():
    lm = memory_lm("2,3", rope=True)
    inputs, delayed = delayed_inputs(lm, batch(lm))
    loop = InnerLoop.of(lm)
    ref_ce, _ = e2e_reference(lm, inputs, delayed, loop)
    torch.testing.assert_close(e2e_scan(lm, inputs, delayed, loop).ce, ref_ce, rtol=0,
                               atol=1e-5)  # fmt: skip


def test_untrained_memory_is_exactly_the_base_and_lr_changes_it():
    torch.manual_seed(0)
    base = build_tiny_lm(0)
    lm = build_tiny_lm(0)
    apply_ttt(lm, {"kind": "e2e", "layers": "quarter", "e2e_chunk": 4})
    codes = batch(lm, B=1)[0]
    want = stream_losses(base, codes, chunk_frames=1)
    assert torch.equal(text_logits(base, codes[None]), text_logits(lm, codes[None]))
    got = e2e_losses(lm, codes)  # the first chunk is scored before any update: the base
    torch.testing.assert_close(got.text[:4], want.text[:4], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got.text[8:], want.text[8:], atol=1e-4)  # updates changed it


def test_gate_zero_is_the_base():
    lm = memory_lm()
    codes = batch(lm)
    set_gates(lm, 0.0)
    base = build_tiny_lm(0, positional_embedding="none")
    for m in base.modules():
        if isinstance(m, RMSNorm):
            m.dtype = None
    base = base.double().eval()
    torch.testing.assert_close(text_logits(lm, codes), text_logits(base, codes))
    set_gates(lm, None)
    assert not torch.allclose(text_logits(lm, codes), text_logits(base, codes))


def test_reset_per_element_back_to_the_parameters():
    lm = memory_lm()
    inputs, delayed = delayed_inputs(lm, batch(lm))
    with lm.streaming(2):
        streamer = E2EStreamer(lm, InnerLoop.of(lm))
        for t in range(12):
            lm.forward_text(inputs[:, :, t : t + 1])
            streamer.observe(delayed[:, :, t : t + 1])
        st = streamer.states[0]
        before = st.w_out.clone()
        m = e2e_layers(lm)[0][1].e2e
        assert not torch.allclose(before[1], m.w_out)
        lm.reset_streaming(torch.tensor([False, True]))
        assert torch.equal(st.w_out[0], before[0])  # element 0 untouched
        assert torch.equal(st.w_out[1], m.w_out.detach())  # element 1 back to the start
    assert all(not isinstance(v, torch.Tensor) or not v.requires_grad
               for v in (st.w_in, st.w_out))  # state, never parameters  # fmt: skip


def train_memory_only(lm) -> list[torch.nn.Parameter]:
    """Train mode, the base frozen: only the memory's parameters take gradients (returned)."""
    lm.train()
    for p in lm.parameters():
        p.requires_grad_(False)
    params = [p for _, p in named_ttt_parameters(lm)]
    for p in params:
        p.requires_grad_(True)
    return params


@pytest.mark.parametrize("second_order", [False, True])
def test_meta_gradient_equals_finite_differences(second_order):
    lm = memory_lm("quarter", **{**SETTINGS, "e2e_steps": 1, "e2e_clip": 0.0,
                                 "e2e_second_order": second_order})  # fmt: skip
    params = train_memory_only(lm)
    codes = batch(lm, B=2, T=17)
    loop = InnerLoop.of(lm)
    inputs, delayed = delayed_inputs(lm, codes)
    log = GradLog()

    def outer(replay: GradLog | None) -> torch.Tensor:
        """The outer loss: the summed CE of every scored token, from the scan's logits."""
        res = e2e_scan(lm, inputs, delayed, loop, train=True, grads_log=replay)
        a0 = lm.audio_offset
        text = step_ce(res.text_logits[:, 0], delayed[:, 0]).sum()
        audio = step_ce(res.audio_logits, delayed[:, a0 : a0 + lm.dep_q]).sum()
        return (text + audio) / 100

    loss = outer(log)
    grads = torch.autograd.grad(loss, params)
    g = torch.Generator().manual_seed(3)
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    analytic = sum((gi * d).sum() for gi, d in zip(grads, direction))
    eps = 1e-6
    values = []
    for sign in (1, -1):
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(sign * eps * d)
        replay = None if second_order else GradLog(log.grads, replay=True)
        with torch.no_grad():
            values.append(float(outer(replay)))
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.sub_(sign * eps * d)
    numeric = (values[0] - values[1]) / (2 * eps)
    assert abs(float(analytic) - numeric) <= 1e-6 * max(1.0, abs(numeric)), (analytic, numeric)


def test_first_and_second_order_differ():
    grads = {}
    for order in (False, True):
        lm = memory_lm("quarter", **{**SETTINGS, "e2e_second_order": order})
        params = train_memory_only(lm)
        out, _ = e2e_forward(lm, batch(lm, T=17), train=True)
        loss = out.text_logits.nan_to_num().logsumexp(-1).mean()
        grads[order] = torch.autograd.grad(loss, params)
    assert any(not torch.allclose(a, b) for a, b in zip(grads[False], grads[True]))


def test_nonfinite_update_is_rolled_back_per_sequence():
    w = [torch.ones(3, 2, 2)]
    g = [torch.ones(3, 2, 2)]
    g[0][1, 0, 0] = float("nan")
    new, ok = inner_sgd_step(w, g, [torch.zeros(1, 2, 2)], [0.5], clip=1.0)
    assert ok.tolist() == [True, False, True]
    assert torch.equal(new[0][1], w[0][1])
    assert torch.isfinite(new[0]).all()
    norm = (new[0][0] - w[0][0]).norm()
    assert float(norm) == pytest.approx(0.5, rel=1e-5)  # clipped to 1, times lr
    lm = memory_lm()
    inputs, delayed = delayed_inputs(lm, batch(lm))
    with inner_lr(lm, 1e300):  # updates overflow: each is rolled back, counted
        res = e2e_scan(lm, inputs, delayed, InnerLoop.of(lm, clip=0.0, decay=0.0))
    assert res.rollbacks > 0 and torch.isfinite(res.ce).all()


def test_bad_settings_are_refused_naming_the_key():
    with pytest.raises(ValueError, match="e2e_lr"):
        TTTConfig(kind="e2e", e2e_lr=0.0)
    with pytest.raises(ValueError, match="e2e_lr"):
        TTTConfig(kind="e2e", e2e_lr=-1.0)
    with pytest.raises(ValueError, match="e2e_decay"):
        TTTConfig(kind="e2e", e2e_decay=1.0)
    with pytest.raises(ValueError, match="e2e_chunk"):
        apply_ttt(build_tiny_lm(0), {"kind": "e2e", "layers": "quarter", "e2e_chunk": 13})
    with pytest.raises(ValueError, match="out of range"):
        apply_ttt(build_tiny_lm(0), {"kind": "e2e", "layers": "7"})
    with pytest.raises(ValueError, match="e2e_lr"), inner_lr(memory_lm(), 0.0):
        pass
    assert parse_layer_spec("quarter", 32) == list(range(24, 32))
    assert parse_layer_spec("quarter", 4) == [3]


def test_meta_training_refuses_a_trained_base():
    lm = memory_lm()
    lm.train()
    with pytest.raises(ValueError, match="train_base"):
        e2e_forward(lm, batch(lm), train=True)


def test_sweep_picks_on_the_given_files_without_harm_inside_the_window():
    from moshi_ttt.eval.e2e import choose_setting

    lm = build_tiny_lm(0)
    apply_ttt(lm, {"kind": "e2e", "layers": "quarter"})
    files = [(f"f{i}", batch(lm, B=1, T=30, seed=i)[0]) for i in range(2)]
    best, scores = sweep_e2e(lm, files, [0.01, 1.0], [4, 12])
    assert len(scores) == 4
    chosen = next(s for s in scores if (s["lr"], s["chunk"]) == (best["lr"], best["chunk"]))
    safe = [s for s in scores if s["harm_within"] <= 0.005]
    if safe:  # the best beyond the window among those that do no harm inside it
        assert chosen["harm_within"] <= 0.005
        assert chosen["text_ce"] == min(s["text_ce"] for s in safe)
    else:
        assert chosen["harm_within"] == min(s["harm_within"] for s in scores)
    free = choose_setting(scores, harm_tolerance=None)  # without the rule: the lowest beyond
    assert free["text_ce"] == min(s["text_ce"] for s in scores)
    # a setting that harms inside the window is passed over for a safe one
    fake = [
        {"lr": 1, "chunk": 1, "text_ce": 1.0, "within": 2.0, "harm_within": 0.1},
        {"lr": 2, "chunk": 1, "text_ce": 1.5, "within": 1.9, "harm_within": 0.0},
    ]
    assert choose_setting(fake)["lr"] == 2 and choose_setting(fake, harm_tolerance=None)["lr"] == 1
    assert float(e2e_layers(lm)[0][1].e2e.lr().detach()) == pytest.approx(0.1)  # restored


def run_lmgen(lm, steps: int, user, active=None):
    """Greedy ``LMGen`` with the live memory; ``user [B, 8, steps]`` the user's tokens, ``active
    [steps, B]`` which rows run at each step. Returns the text logits per step and row, the
    model inputs seen (the tokens each step read) and the live object's counters."""
    from moshi.models.lm import LMGen

    from moshi_ttt.integration.e2e_stream import LiveE2E

    B = user.shape[0]
    gen = LMGen(lm, use_sampling=False, support_out_of_sync=True)
    logits, inputs = [], []
    gen.on_text_logits_hook = lambda t: logits.append(t[:, 0, 0].clone())
    hook = lm.transformer.register_forward_pre_hook(lambda m, a: inputs.append(None))
    with torch.no_grad(), gen.streaming(B):
        live = LiveE2E(lm)
        try:
            for t in range(steps):
                if active is not None:
                    gen.set_exec_mask(active[t])
                gen.step(user[:, :, t : t + 1])
        finally:
            live.close()
            hook.remove()
    return torch.stack(logits, 1), live.streamer


def test_live_memory_in_lmgen_updates_and_rows_are_independent():
    lm = memory_lm()
    lm.float()
    g = torch.Generator().manual_seed(0)
    user = torch.randint(0, lm.card, (2, 8, 20), generator=g)
    both, streamer = run_lmgen(lm, 20, user)
    assert streamer.updates == 2 * InnerLoop.of(lm).steps * (19 // 4)  # a chunk per 4 steps
    # the memory changed the model: without updates (lr ~ 0) the logits differ
    with inner_lr(lm, 1e-12):
        frozen, _ = run_lmgen(lm, 20, user)
    assert torch.allclose(both[:, :4], frozen[:, :4], atol=1e-5)  # before the first update
    assert not torch.allclose(both[:, 4:], frozen[:, 4:], atol=1e-3)  # updated at step 4
    # row 1 idles for steps 3..8: row 0 is as if alone; row 1 goes on where it stopped
    active = torch.ones(20, 2, dtype=torch.bool)
    active[3:9, 1] = False
    kept = torch.cat([torch.arange(3), torch.arange(9, 20)])
    paused = user.clone()  # row 1's k-th active step hears its k-th frame
    paused[1, :, kept] = user[1, :, :14]
    mixed, _ = run_lmgen(lm, 20, paused, active)
    alone, _ = run_lmgen(lm, 20, user[:1])
    torch.testing.assert_close(mixed[0], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1, kept], both[1, :14], rtol=1e-5, atol=1e-5)


def test_live_memory_equals_the_scan_on_what_lmgen_fed():
    """The tokens each LMGen step read are the previous step's delayed column: the scan over
    them (targets = the next step's input) gives LMGen's text logits."""
    lm = memory_lm()
    lm.float()
    user = torch.randint(0, lm.card, (1, 8, 16), generator=torch.Generator().manual_seed(1))
    seen: dict[int, list] = {}
    hooks = [lm.text_emb.register_forward_pre_hook(
        lambda m, a: seen.setdefault(0, []).append(a[0].clone()))]  # fmt: skip
    for k, emb in enumerate(lm.emb):
        hooks.append(emb.register_forward_pre_hook(
            lambda m, a, k=k: seen.setdefault(1 + k, []).append(a[0].clone())))  # fmt: skip
    try:
        logits, _ = run_lmgen(lm, 16, user)
    finally:
        for h in hooks:
            h.remove()
    inputs = torch.full((1, 17, 16), -1, dtype=torch.long)
    for k, cols in seen.items():
        inputs[:, k] = torch.cat([c.reshape(1, -1)[:, :1] for c in cols], 1)
    delayed = torch.cat([inputs[:, :, 1:], inputs[:, :, -1:]], 2)  # the last target unused
    res = e2e_scan(lm, inputs, delayed, InnerLoop.of(lm))
    torch.testing.assert_close(res.text_logits[0, 0, :15], logits[0, :15], rtol=1e-4, atol=1e-4)


def test_engine_and_generate_run_the_memory_and_save_it_per_row(tmp_path):
    """The server's engine updates the memory while it streams; a row's memory is saved and
    restored bit for bit like a TTT state; ``generate`` reports the updates."""
    import numpy as np
    import sphn

    from moshi_ttt.generate import generate
    from moshi_ttt.models.load import load_base_lm, load_codec
    from moshi_ttt.serve.engine import Engine

    model = load_base_lm("tiny", dtype=torch.float32)
    lm = model.lm
    apply_ttt(lm, {"kind": "e2e", "layers": "quarter", "e2e_chunk": 2})
    lm.eval()
    mimi, _ = load_codec(model)
    frame = int(mimi.frame_size)
    g = np.random.default_rng(0)
    engine = Engine(lm, mimi, 2, greedy=True)
    try:
        for _ in range(12):
            engine.step(0.1 * g.standard_normal((2, frame)).astype(np.float32),
                        np.array([True, True]))  # fmt: skip
        assert engine.live is not None and engine.live.streamer.updates > 0
        saved = engine.ttt_state(0)
        assert any("e2e" in k for k in saved)
        m = e2e_layers(lm)[0][1].e2e
        assert not torch.equal(saved[next(k for k in saved if k.endswith(".1"))], m.w_out)
        engine.join(1, saved)  # row 1 resumes row 0's conversation memory
        again = engine.ttt_state(1)
        assert all(torch.equal(again[k], saved[k]) for k in saved)
    finally:
        engine.close()
    wav = tmp_path / "in.wav"
    sphn.write_wav(str(wav), 0.1 * g.standard_normal(frame * 10).astype(np.float32), 24000)
    stats = generate(lm, mimi, None, wav, tmp_path / "out.wav", progress=False)
    assert stats["e2e_updates"] > 0 and stats["e2e_rollbacks"] == 0


def test_eval_long_context_runs_the_memory_and_its_gate0_control():
    from moshi_ttt.eval.long_context import evaluate_long_context

    lm = build_tiny_lm(0)
    apply_ttt(lm, {"kind": "e2e", "layers": "quarter", "e2e_chunk": 4, "e2e_lr": 0.5})
    lm.eval()
    files = [(f"f{i}", batch(lm, B=1, T=24, seed=i)[0]) for i in range(2)]
    res = evaluate_long_context(lm, files, chunk_frames=8, bin_frames=8, progress=False)
    assert set(res.variants) == {"ttt", "no_ttt"}  # no reset control for this memory
    want = e2e_losses(lm, files[0][1])
    got = res.variants["ttt"]
    assert got.totals(0)["text_ce"] != res.variants["no_ttt"].totals(0)["text_ce"]
    one = evaluate_long_context(lm, files[:1], chunk_frames=8, bin_frames=8, progress=False)
    assert one.variants["ttt"].totals(0)["text_ce"] == pytest.approx(
        float(want.text[want.text_mask].mean()), rel=1e-6)  # fmt: skip


def test_train_config_refuses_e2e_settings_that_cannot_learn(tmp_path):
    from moshi_ttt.train.config import TrainConfig

    base = {"run_dir": str(tmp_path / "r"), "duration_sec": 2.56, "model": {"source": "tiny"},
            "data": {"train": [str(tmp_path)]}}  # fmt: skip
    with pytest.raises(ValueError, match="ttt.e2e_chunk"):
        TrainConfig.from_dict({**base, "ttt": {"kind": "e2e", "e2e_chunk": 32}})
    with pytest.raises(ValueError, match="state_carry"):
        TrainConfig.from_dict(
            {
                **base,
                "ttt": {"kind": "e2e"},
                "data": {"train": [str(tmp_path)], "state_carry": "detached"},
            }
        )
    with pytest.raises(ValueError, match="e2e_lr"):
        TrainConfig.from_dict({**base, "ttt": {"kind": "e2e", "e2e_lr": -0.1}})
    assert TrainConfig.from_dict({**base, "ttt": {"kind": "e2e", "e2e_chunk": 8}}).ttt.kind == "e2e"


def test_the_recipe_builds_the_7b_config():
    from pathlib import Path

    from moshi_ttt.recipes import RECALL_MEMORY, e2e_memory
    from moshi_ttt.train.config import TrainConfig

    want = e2e_memory(4096, 3000)
    assert want == {"kind": "e2e", "layers": "top:1", "e2e_lr": 0.3, "e2e_hidden": 16384,
                    "e2e_chunk": 375, **RECALL_MEMORY}  # fmt: skip
    assert "recall_keys" not in e2e_memory(4096, 3000, recall=False)
    cfg = TrainConfig.load(Path(__file__).resolve().parents[1] / "configs/moshi7b_e2e.yaml")
    assert {k: getattr(cfg.ttt, k) for k in want} == want
    assert not cfg.model.train_base and not cfg.lora.enable


def test_update_callbacks_see_every_update_and_its_chunk_loss_before_and_after():
    """``E2EStreamer.on_update`` (what the server's memory panel reads): one call per row's
    update, and ``chunk_loss`` with the weights before / after it: a small inner step lowers
    the chunk's loss, a vanishing one leaves it."""
    from moshi.models.lm import LMGen

    from moshi_ttt.integration.e2e_stream import ChunkUpdate, LiveE2E, chunk_loss

    lm = memory_lm()
    lm.float()
    user = torch.randint(0, lm.card, (2, 8, 13), generator=torch.Generator().manual_seed(1))
    for lr in (1e-3, 1e-12):
        events: list[ChunkUpdate] = []
        with inner_lr(lm, lr), torch.no_grad():
            gen = LMGen(lm, use_sampling=False)
            with gen.streaming(2):
                live = LiveE2E(lm)
                live.streamer.on_update.append(events.append)
                for t in range(13):
                    gen.step(user[:, :, t : t + 1])
                live.close()
        loop = live.streamer.loop
        assert len(events) * loop.steps == live.streamer.updates
        assert {u.row for u in events} == {0, 1}
        for u in events:
            before, after = chunk_loss(lm, u, u.before, loop), chunk_loss(lm, u, u.after, loop)
            if lr > 1e-6:
                assert after < before
            else:
                assert after == pytest.approx(before, abs=1e-6)
