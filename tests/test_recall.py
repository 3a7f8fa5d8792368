"""The recall memories and measures against their definitions: the associative memory's chunked
and streamed forms equal the per-position loop (float64), the cache equals its definition, a
memory never sees the future (changing byte p leaves every mixed output before p bit-identical),
the repeated-byte mask, the needles, the share interval, and the demo's recall rows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from moshi.utils.compile import no_compile

from moshi_ttt.data.files import DataError
from moshi_ttt.demo.corpus import CorpusSpec, bytes_to_codes, codes_to_bytes, read_corpus
from moshi_ttt.demo.needle import (
    NeedleSpec,
    needle_cases,
    phrase,
    plant_training_phrases,
    value_offset,
)
from moshi_ttt.eval.recall import (
    MemorySetting,
    base_features,
    choose_memory,
    memory_reads,
    mix_curve,
    repeat_masks,
    restrict,
)
from moshi_ttt.eval.stats import share_interval
from moshi_ttt.integration import build_tiny_lm
from moshi_ttt.ttt.recall import (
    cache_reference,
    cache_target_probs,
    delta_chunked,
    delta_reference,
    delta_step,
    mix_ce,
    mix_log_probs,
    read_distribution,
    sparse_keys,
)

D, DK, V = 8, 48, 13


def _inputs(T: int = 37, seed: int = 0, active: int = 4):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, D, generator=g, dtype=torch.float64)
    proj = torch.randn(DK, D, generator=g, dtype=torch.float64)
    keys = sparse_keys(h, proj, active)
    targets = torch.randint(0, V, (T,), generator=g)
    write = torch.rand(T, generator=g) > 0.25
    return h, keys, targets, write


@pytest.mark.parametrize("beta", [1.0, 0.5])
@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_chunked_delta_rule_equals_the_loop(beta, chunk):
    _, keys, targets, write = _inputs()
    ref_r, ref_w = delta_reference(keys, targets, write, beta, V)
    r, w = delta_chunked(keys, targets, write, beta, V, chunk=chunk)
    assert torch.allclose(r, ref_r, atol=1e-12) and torch.allclose(w, ref_w, atol=1e-12)


def test_chunked_delta_rule_with_carried_state_and_a_batch():
    _, keys, targets, write = _inputs(T=40)
    whole, w_whole = delta_chunked(keys, targets, write, 0.7, V, chunk=8)
    a, state = delta_chunked(keys[:13], targets[:13], write[:13], 0.7, V, chunk=8)
    b, w_end = delta_chunked(keys[13:], targets[13:], write[13:], 0.7, V, state=state, chunk=8)
    assert torch.allclose(torch.cat([a, b]), whole, atol=1e-12)
    assert torch.allclose(w_end, w_whole, atol=1e-12)
    _, k2, t2, w2 = _inputs(T=40, seed=1)
    batch, _ = delta_chunked(torch.stack([keys, k2]), torch.stack([targets, t2]),
                             torch.stack([write, w2]), 0.7, V, chunk=8)  # fmt: skip
    assert torch.allclose(batch[0], whole, atol=1e-12)
    assert torch.allclose(batch[1], delta_chunked(k2, t2, w2, 0.7, V)[0], atol=1e-12)


def test_streaming_one_position_at_a_time_equals_the_loop():
    _, keys, targets, write = _inputs()
    ref, _ = delta_reference(keys, targets, write, 1.0, V)
    W = torch.zeros(1, V, DK, dtype=torch.float64)
    reads = []
    for t in range(len(targets)):
        r, W2 = delta_step(W, keys[t : t + 1], targets[t : t + 1], write[t : t + 1], 1.0)
        assert not torch.equal(W2, W) or not write[t]  # functional: W itself never changes
        reads.append(r)
        W = W2
    assert torch.allclose(torch.cat(reads), ref, atol=1e-12)


def test_a_key_read_after_its_write_returns_its_token_and_others_do_not_interfere():
    keys = torch.eye(6, dtype=torch.float64)  # orthogonal unit keys
    targets = torch.tensor([3, 1, 4, 1, 5, 9]) % V
    reads, W = delta_reference(keys, targets, torch.ones(6, dtype=torch.bool), 1.0, V)
    assert torch.count_nonzero(reads) == 0  # each read precedes its own write
    again = keys @ W.T
    p, conf = read_distribution(again)
    assert torch.equal(p.argmax(-1), targets) and torch.allclose(
        conf, torch.ones(6, dtype=torch.float64)
    )
    # the delta rule overwrites: the same key with a new token returns the new one only
    k2 = torch.cat([keys[:1], keys[:1]])
    _, W2 = delta_reference(k2, torch.tensor([2, 7]), torch.ones(2, dtype=torch.bool), 1.0, V)
    assert torch.allclose(W2 @ keys[0], torch.nn.functional.one_hot(torch.tensor(7), V).double())


def test_sparse_keys_are_unit_with_the_asked_active_units():
    h, keys, _, _ = _inputs()
    assert torch.allclose(keys.norm(dim=-1), torch.ones(len(keys), dtype=torch.float64))
    assert ((keys > 0).sum(-1) == 4).all()
    with pytest.raises(ValueError, match="active units"):
        sparse_keys(h, torch.randn(DK, D, dtype=torch.float64), DK + 1)


def test_cache_equals_its_definition():
    h, _, targets, write = _inputs(T=30)
    full = cache_reference(h, targets, write, 7.0, V)
    fast = cache_target_probs(h, targets, write, [7.0, 0.5], block=7)
    assert torch.allclose(fast[0], full.gather(1, targets[:, None])[:, 0], atol=1e-12)
    assert full[0].sum() == 0 and fast[1][0] == 0  # nothing written before position 0
    assert torch.allclose(cache_reference(h, targets, write, 0.5, V).gather(
        1, targets[:, None])[:, 0], fast[1], atol=1e-12)  # fmt: skip


def test_mixing_with_gate_zero_is_the_model_and_mixtures_are_distributions():
    ce = torch.rand(20, dtype=torch.float64) * 3
    p = torch.rand(20, dtype=torch.float64)
    assert torch.allclose(mix_ce(ce, p, torch.zeros(20)), ce, atol=1e-12)
    assert torch.allclose(mix_ce(ce, p, torch.ones(20)), -torch.log(p), atol=1e-12)
    logp = torch.log_softmax(torch.randn(4, V, dtype=torch.float64), -1)
    pm, _ = read_distribution(torch.randn(4, V, dtype=torch.float64))
    mixed = mix_log_probs(logp, pm, torch.full((4,), 0.3, dtype=torch.float64))
    assert torch.allclose(mixed.exp().sum(-1), torch.ones(4, dtype=torch.float64))


def test_repeat_mask_matches_its_definition():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 3, 200)
    C, n = 20, 3
    recall, other = repeat_masks(tokens, C, n)
    for t in range(len(tokens)):
        occ = [j for j in range(n, t) if tuple(tokens[j - n : j]) == tuple(tokens[t - n : t])]
        expect = t >= C and t >= n and bool(occ) and max(occ) < t - C
        assert recall[t] == expect, t
        assert other[t] == (t >= C and not expect)


def test_share_interval():
    out = share_interval([1.0, 2.0, 3.0, 1.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0])
    assert out["share"] == pytest.approx(1.0) and out["lo"] <= 1.0 <= out["hi"]
    assert math.isnan(share_interval([1.0] * 5, [0.0] * 5)["share"])  # nothing available
    assert math.isnan(share_interval([1.0, 1.0], [1.0, 1.0])["lo"])  # too few files


# -- through the model ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm():
    with no_compile():
        return build_tiny_lm(seed=0, context=8, text_card=260).eval()


def _file(seed: int, T: int = 40) -> torch.Tensor:
    g = np.random.default_rng(seed)
    return bytes_to_codes(bytes(g.choice(list(b"abcd"), T).tolist()))


@pytest.mark.parametrize("kind", ["cache", "assoc"])
def test_changing_byte_p_leaves_every_mixed_output_before_p_bit_identical(lm, kind):
    setting = MemorySetting(kind, theta=5.0, keys=64, active=4)
    codes = _file(0)
    p = 23
    changed = codes.clone()
    changed[0, p] = (changed[0, p] + 1 - 4) % 256 + 4
    with no_compile():
        outs = []
        for c in (codes, changed):
            feats, curve = base_features(lm, [("f", c)], chunk_frames=7, block_frames=1)
            reads = memory_reads(setting, feats, lm.text_card)
            outs.append((mix_curve(curve, reads, 0.5).file_text[0][0], reads["f"]))
    (a, ra), (b, rb) = outs
    assert np.array_equal(a[:p], b[:p]) and not np.array_equal(a, b)
    assert np.array_equal(ra[0][:p], rb[0][:p]) and np.array_equal(ra[1][:p], rb[1][:p])


def test_base_features_are_the_base_curve_and_the_hidden_state_of_each_frame(lm):
    codes = _file(1)
    with no_compile():
        feats, curve = base_features(lm, [("f", codes)], chunk_frames=5, block_frames=1)
        from moshi_ttt.eval.long_context import stream_losses

        whole = stream_losses(lm, codes, chunk_frames=64)
    assert np.allclose(curve.file_text[0][0], whole.text.numpy(), atol=1e-5)
    f = feats["f"]
    assert f.h.shape == (40, lm.dim) and torch.equal(f.targets, codes[0].long())
    # the text head on the recorded state gives the scored CE
    logits = lm.text_linear(f.h[None])[0]
    ce = torch.nn.functional.cross_entropy(logits, f.targets, reduction="none")
    assert torch.allclose(ce[f.scored], whole.text[whole.text_mask], atol=1e-4)


def test_choose_memory_obeys_the_harm_rule_and_mixing_zero_is_the_row(lm):
    files = [(f"f{i}", _file(10 + i, 48)) for i in range(5)]
    with no_compile():
        feats, curve = base_features(lm, files, chunk_frames=16, block_frames=8)
    grid = [MemorySetting("assoc", keys=64, active=4), MemorySetting("cache", theta=3.0)]
    best, scores = choose_memory(curve, feats, grid, [0.0, 0.3, 0.9], context=8,
                                 vocab=lm.text_card)  # fmt: skip
    assert len(scores) == 6
    zero = [s for s in scores if s["lam"] == 0.0]
    assert all(abs(s["harm_within"]) < 1e-9 and abs(s["gain_beyond"]) < 1e-9 for s in zero)
    safe = [s for s in scores if s["harm_within"] <= 0.005]
    assert best["text_ce"] == min(s["text_ce"] for s in safe)
    with pytest.raises(ValueError, match="memory kind"):
        MemorySetting("knn")


def test_restrict_keeps_only_the_asked_positions(lm):
    with no_compile():
        _, curve = base_features(lm, [("f", _file(2))], chunk_frames=8, block_frames=1)
    keep = {"f": np.zeros(40, dtype=bool)}
    keep["f"][[5, 9]] = True
    sub = restrict(curve, keep)
    ce = curve.file_text[0][0]
    assert sub.totals()["text_tokens"] == 2
    assert sub.totals()["text_ce"] == pytest.approx((ce[5] + ce[9]) / 2)


# -- needles -------------------------------------------------------------------------------
def _corpus(root, n=40, size=900):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        words = " ".join(f"w{rng.integers(0, 50)}" for _ in range(size // 3))
        (root / f"f{i}.txt").write_text(words[:size])
    return root


def test_needle_cases_plant_the_phrase_and_score_its_value(tmp_path):
    root = _corpus(tmp_path / "c")
    read_corpus(root, CorpusSpec(frames=128), tmp_path / "data")
    spec = NeedleSpec(distances=(2, 4), lead=8, files=8)
    cases, masks = needle_cases(tmp_path / "data" / "test", 32, spec, seed=0)
    assert set(cases) == {"inside", "true_2x", "floor_2x", "true_4x", "floor_4x"}
    n = spec.phrase_len()
    for (name, true), (_, floor) in zip(cases["true_4x"], cases["floor_4x"]):
        q = 8 + 4 * 32
        text, other = codes_to_bytes(true), codes_to_bytes(floor)
        assert true.shape[-1] == q + n and text[q:] == text[8 : 8 + n]  # asked again
        assert other[q:] == text[q:] and other[8 : 8 + n] != text[8 : 8 + n]
        key_end = value_offset(spec.key_len)
        assert other[8 : 8 + key_end] != text[8 : 8 + key_end]  # another key, not only value
        scored = np.flatnonzero(masks["true_4x"][name])
        assert scored.tolist() == list(range(q + key_end, q + key_end + spec.value_len))
    cases2, _ = needle_cases(tmp_path / "data" / "test", 32, spec, seed=0)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(cases["true_2x"], cases2["true_2x"]))


def test_needle_errors_name_what_is_needed(tmp_path):
    root = _corpus(tmp_path / "c", n=40, size=300)
    read_corpus(root, CorpusSpec(frames=128), tmp_path / "data")
    with pytest.raises(DataError, match="needs 5 or more"):
        needle_cases(tmp_path / "data" / "test", 64, NeedleSpec(distances=(8,)), seed=0)
    with pytest.raises(ValueError, match="does not fit the window"):
        NeedleSpec(key_len=10, value_len=10).inside_distance(16)


def test_training_phrases_are_planted_inside_the_window(tmp_path):
    root = _corpus(tmp_path / "c", n=30, size=600)
    read_corpus(root, CorpusSpec(frames=256), tmp_path / "data")
    spec = NeedleSpec()
    changed = plant_training_phrases(tmp_path / "data" / "train", 64, spec, 1.0, seed=0,
                                     per_sequence=2)  # fmt: skip
    assert changed > 0
    from moshi_ttt.data.pipeline import ShardSource

    src = ShardSource(tmp_path / "data" / "train")
    n = spec.phrase_len()
    for i in range(len(src)):
        text = codes_to_bytes(src.codes(i))
        starts = [k for k in range(len(text) - n) if text[k : k + 1] == b" "
                  and text[k + 1 + spec.key_len : k + 2 + spec.key_len] == b"="
                  and text[k + n - 1 : k + n] == b";"]  # fmt: skip
        pairs = [
            (a, b) for a in starts for b in starts if a < b and text[a : a + n] == text[b : b + n]
        ]
        assert len(pairs) >= 2 and all(b - a <= 64 - n for a, b in pairs)
    assert phrase(b"ab", b"12") == b" ab=12;"


def test_held_out_copies_of_training_files_are_dropped_and_counted(tmp_path):
    root = _corpus(tmp_path / "c", n=80, size=300)
    # copies of every file under new names: those hashed to val/test equal a training file
    for f in sorted(root.glob("f*.txt"))[::2]:
        (root / f"copy_{f.name}").write_bytes(f.read_bytes())
    s = read_corpus(root, CorpusSpec(frames=128), tmp_path / "data")
    assert s.skipped["same_as_train"] > 0


# -- the live memory (integration.recall) ---------------------------------------------------
def _live(lm, setting):
    import copy

    from moshi_ttt.integration.recall import RecallSetting, apply_recall

    live = copy.deepcopy(lm)
    apply_recall(live, RecallSetting(keys=setting.keys, active=setting.active, beta=setting.beta,
                                     sharpen=setting.sharpen, scale=setting.scale,
                                     context=setting.context, lam=0.6))  # fmt: skip
    return live.eval()


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_the_live_memory_streams_what_the_evaluation_scores(lm, chunk):
    from moshi_ttt.eval.long_context import stream_losses

    setting = MemorySetting("assoc", keys=64, active=4, beta=0.7, sharpen=2.0, context=3)
    codes = _file(3, 30)
    with no_compile():
        feats, curve = base_features(lm, [("f", codes)], chunk_frames=8, block_frames=1)
        expect = mix_curve(curve, memory_reads(setting, feats, lm.text_card), 0.6).file_text[0]
        got = stream_losses(_live(lm, setting), codes, chunk_frames=chunk)
    assert np.allclose(got.text.numpy()[expect[1]], expect[0][expect[1]], atol=2e-4)
    assert not np.allclose(got.text.numpy(), curve.file_text[0][0], atol=1e-3)  # it mixes


def test_the_live_memory_is_the_base_outside_streaming_and_resets_per_row(lm):
    from moshi_ttt.integration.streaming import reset_ttt_states, ttt_states

    setting = MemorySetting("assoc", keys=64, active=4, context=2)
    live = _live(lm, setting)
    codes = _file(4, 12)[None].long().clamp_min(0)
    with no_compile(), torch.no_grad():
        a = live(codes.expand(2, -1, -1).clone()).text_logits
        b = lm(codes.expand(2, -1, -1).clone()).text_logits
        assert torch.equal(a.nan_to_num(), b.nan_to_num())  # training's forward: the base
        assert dict(live.state_dict()).keys() == dict(lm.state_dict()).keys()
        with live.streaming(2):
            live.forward_text(codes[:, :, :6].expand(2, -1, -1).clone())
            states = [s for name, s in ttt_states(live) if name == "recall"]
            assert len(states) == 1 and states[0].w.abs().sum() > 0
            reset_ttt_states(live, torch.tensor([True, False]))
            w = states[0].w
            assert w[0].abs().sum() == 0 and w[1].abs().sum() > 0


def test_lmgen_samples_with_the_live_memory(lm):
    from moshi.models.lm import LMGen

    setting = MemorySetting("assoc", keys=64, active=4, context=2)
    live = _live(lm, setting)
    gen = LMGen(live, temp=0.8, temp_text=0.8)
    torch.manual_seed(0)
    with no_compile(), torch.no_grad(), gen.streaming(1):
        for _ in range(6):
            gen.step(torch.randint(0, lm.card, (1, lm.num_audio_codebooks - lm.dep_q, 1)))
        assert live.recall._streaming_state.w.abs().sum() > 0


def test_a_config_with_recall_keys_gives_the_live_memory_and_the_server_saves_its_state(lm):
    import copy

    from moshi_ttt.integration.apply import apply_ttt
    from moshi_ttt.integration.config import TTTConfig
    from moshi_ttt.serve.engine import load_ttt_state, ttt_state

    cfg = {"kind": "e2e", "layers": "top:1", "e2e_chunk": 4, "recall_keys": 64,
           "recall_active": 4, "recall_context": 2}  # fmt: skip
    m = copy.deepcopy(lm)
    apply_ttt(m, cfg)
    assert m.recall.setting.keys == 64 and m.recall.setting.lam == 0.7
    codes = _file(5, 10)[None].long()
    with no_compile(), torch.no_grad(), m.eval().streaming(1):
        m.forward_text(codes[:, :, :5])
        saved = ttt_state(m, 0)
        assert any(k.startswith("recall.") for k in saved)
        m.reset_streaming()
        load_ttt_state(m, 0, saved)
        assert torch.equal(m.recall._streaming_state.w[0], saved["recall.0"])
    with pytest.raises(ValueError, match="recall_active"):
        TTTConfig.from_dict({"recall_keys": 8, "recall_active": 9})
    with pytest.raises(ValueError, match="recall_lam"):
        TTTConfig.from_dict({"recall_keys": 8, "recall_lam": 1.5})


def test_retrieval_with_no_key_retrieved_is_the_base_and_retrieval_reads_the_past(lm):
    from moshi_ttt.eval.long_context import stream_losses
    from moshi_ttt.eval.recall import retrieval_losses

    codes = _file(6, 40)
    with no_compile():
        base = stream_losses(lm, codes, chunk_frames=16)
        zero = retrieval_losses(lm, codes, top_k=0, chunk_frames=16)
        four = retrieval_losses(lm, codes, top_k=4, chunk_frames=16)
    assert torch.allclose(zero.text, base.text, atol=1e-5) and torch.equal(
        zero.text_mask, base.text_mask
    )
    C = 8
    assert torch.equal(four.text[:C], zero.text[:C])  # nothing has left the window yet
    assert not torch.allclose(four.text[C:], zero.text[C:], atol=1e-4)
    with pytest.raises(ValueError, match="top_k"):
        retrieval_losses(lm, codes, top_k=-1)
    p = 27  # changing byte p leaves every output before p bit-identical
    changed = codes.clone()
    changed[0, p] = (changed[0, p] + 1 - 4) % 256 + 4
    with no_compile():
        other = retrieval_losses(lm, changed, top_k=4, chunk_frames=16)
    assert torch.equal(other.text[:p], four.text[:p]) and not torch.equal(other.text, four.text)


def test_a_corpus_too_short_for_the_needles_says_why_in_the_report(tmp_path):
    import json

    from moshi_ttt.cli import main

    root = tmp_path / "short"
    root.mkdir()
    for i in range(60):  # one 64-byte sequence per file: no room for a needle 4 windows on
        (root / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}  # " + "y" * 40 + "\n")
    out = tmp_path / "out"
    assert main(["demo", "--quick", "--data", str(root), "--out", str(out), "--rows",
                 "base,cache,assoc", "--no-progress"]) == 0  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert "needles not computed" in results["recall"]["needle_error"]
    assert "needle_shares" not in results["recall"]
    assert "needles not computed" in (out / "report.md").read_text()
    assert {"cache", "assoc"} <= set(results["rows"])  # the other measures still there


def test_the_end_to_end_scan_mixes_the_recall_memory_as_the_demo_row_does(lm):
    import copy

    from moshi_ttt.eval.e2e import evaluate_e2e
    from moshi_ttt.integration.apply import apply_ttt
    from moshi_ttt.integration.e2e import e2e_layers
    from moshi_ttt.integration.recall import RecallSetting, apply_recall

    cfg = {"kind": "e2e", "layers": "top:1", "e2e_chunk": 4, "e2e_lr": 0.5}
    torch.manual_seed(0)
    plain = copy.deepcopy(lm)
    apply_ttt(plain, cfg)
    with torch.no_grad():  # a memory that has learned something: w_out no longer zero
        for _, layer in e2e_layers(plain):
            layer.e2e.w_out.normal_(std=0.05)
    mixed = copy.deepcopy(plain)
    apply_recall(mixed, RecallSetting(keys=64, active=4, context=2, lam=0.6))
    files = [("f", _file(7, 30))]
    setting = MemorySetting("assoc", keys=64, active=4, context=2, sharpen=2.0)
    with no_compile():
        e2e = evaluate_e2e(plain.eval(), files, block_frames=1)
        feats, _ = base_features(lm, files, chunk_frames=8, block_frames=1)
        expect = mix_curve(e2e, memory_reads(setting, feats, lm.text_card), 0.6).file_text[0]
        got = evaluate_e2e(mixed.eval(), files, block_frames=1).file_text[0]
    assert np.allclose(got[0][expect[1]], expect[0][expect[1]], atol=2e-4)
    assert not np.allclose(got[0], e2e.file_text[0][0], atol=1e-3)


def test_the_sparse_in_place_step_equals_the_loop():
    from moshi_ttt.ttt.recall import delta_step_sparse_, key_units

    h, keys, targets, write = _inputs()
    proj = torch.randn(DK, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    units = key_units(h, proj, 4)
    assert torch.equal(sparse_keys(h, proj, 4) > 0, torch.zeros_like(keys, dtype=torch.bool)
                       .scatter_(-1, units, True))  # fmt: skip
    ref, ref_w = delta_reference(sparse_keys(h, proj, 4), targets, write, 0.6, V)
    W = torch.zeros(1, V, DK, dtype=torch.float64)
    reads = [delta_step_sparse_(W, units[t : t + 1], targets[t : t + 1], write[t : t + 1], 0.6)
             for t in range(len(targets))]  # fmt: skip
    assert torch.allclose(torch.cat(reads), ref, atol=1e-12) and torch.allclose(W[0], ref_w)


def test_with_the_end_to_end_memory_the_live_keys_are_the_base_s(lm):
    import copy

    from moshi_ttt.eval.e2e import evaluate_static
    from moshi_ttt.eval.long_context import stream_losses
    from moshi_ttt.integration.apply import apply_ttt
    from moshi_ttt.integration.e2e import e2e_layers
    from moshi_ttt.integration.recall import RecallSetting, apply_recall

    torch.manual_seed(0)
    plain = copy.deepcopy(lm)
    apply_ttt(plain, {"kind": "e2e", "layers": "top:1", "e2e_chunk": 4})
    with torch.no_grad():  # trained weights: the text head no longer reads the base's state
        e2e_layers(plain)[0][1].e2e.w_out.normal_(std=0.05)
    live = copy.deepcopy(plain)
    apply_recall(live, RecallSetting(keys=64, active=4, context=2, lam=0.6))
    files = [("f", _file(8, 30))]
    setting = MemorySetting("assoc", keys=64, active=4, context=2, sharpen=2.0)
    with no_compile():
        static = evaluate_static(plain.eval(), files, block_frames=1, chunk_frames=7)
        feats, _ = base_features(lm, files, chunk_frames=8, block_frames=1)
        expect = mix_curve(static, memory_reads(setting, feats, lm.text_card), 0.6).file_text[0]
        got = stream_losses(live.eval(), files[0][1], chunk_frames=7)
    assert np.allclose(got.text.numpy()[expect[1]], expect[0][expect[1]], atol=2e-4)
    other = copy.deepcopy(lm)
    apply_ttt(other, {"kind": "e2e", "layers": "top:2", "e2e_chunk": 4})
    with pytest.raises(ValueError, match="after the last layer only"):
        apply_recall(other, RecallSetting(keys=64, active=4))


def test_a_learned_gate_opens_where_the_memory_is_right_and_closes_where_it_is_wrong():
    from moshi_ttt.ttt.recall import fit_gate, learned_gate

    g = torch.Generator().manual_seed(0)
    n = 2000
    conf = torch.rand(n, generator=g, dtype=torch.float64)
    entropy = 3 * torch.rand(n, generator=g, dtype=torch.float64)
    peak = torch.rand(n, generator=g, dtype=torch.float64)
    p_model = torch.full((n,), 0.1, dtype=torch.float64)
    good = fit_gate(conf, peak, entropy, p_model, torch.full((n,), 0.9, dtype=torch.float64))
    bad = fit_gate(conf, peak, entropy, p_model, torch.full((n,), 0.001, dtype=torch.float64))
    assert learned_gate(good, conf, peak, entropy).mean() > 0.8
    assert learned_gate(bad, conf, peak, entropy).mean() < 0.2
    assert (learned_gate(good, torch.zeros(3), torch.ones(3), torch.ones(3)) == 0).all()
    with pytest.raises(ValueError, match="6 numbers"):
        learned_gate((1.0, 2.0), conf, peak, entropy)


def test_the_live_memory_with_a_learned_gate_streams_what_the_evaluation_scores(lm):
    import copy

    from moshi_ttt.eval.long_context import stream_losses
    from moshi_ttt.eval.recall import fit_memory_gate
    from moshi_ttt.integration.recall import RecallSetting, apply_recall

    base = MemorySetting("assoc", keys=64, active=4, sharpen=2.0, context=2)
    fit_files = [(f"t{i}", _file(20 + i, 40)) for i in range(3)]
    with no_compile():
        fit_feats, fit_curve = base_features(lm, fit_files, chunk_frames=8, block_frames=1)
        setting = fit_memory_gate(base, fit_feats, fit_curve, lm.text_card)
        assert len(setting.gate) == 6 and any(v != 0 for v in setting.gate)
        files = [("f", _file(9, 30))]
        feats, curve = base_features(lm, files, chunk_frames=8, block_frames=1)
        expect = mix_curve(curve, memory_reads(setting, feats, lm.text_card), 1.0).file_text[0]
        live = copy.deepcopy(lm)
        apply_recall(live, RecallSetting(keys=64, active=4, sharpen=2.0, context=2,
                                         gate=setting.gate))  # fmt: skip
        got = stream_losses(live.eval(), files[0][1], chunk_frames=5)
    assert np.allclose(got.text.numpy()[expect[1]], expect[0][expect[1]], atol=2e-4)
    assert dict(live.state_dict()).keys() == dict(lm.state_dict()).keys()


def test_a_memory_row_brings_the_row_it_mixes_into():
    from moshi_ttt.demo.realdata import ESSENTIAL, parse_rows

    assert parse_rows("e2e_meta_assoc") == ("base", "e2e_meta", "e2e_meta_assoc")
    assert parse_rows("cache") == ("base", "cache")
    assert {"assoc", "e2e_meta_assoc", "cache", "retrieval"} <= set(ESSENTIAL)


def test_models_with_live_memories_say_so_for_cuda_graphs(lm):
    import copy

    from moshi_ttt.integration.apply import apply_ttt
    from moshi_ttt.integration.recall import RecallSetting, apply_recall
    from moshi_ttt.integration.streaming import has_live_hooks

    assert not has_live_hooks(lm)
    recall = copy.deepcopy(lm)
    apply_recall(recall, RecallSetting(keys=64, active=4))
    e2e = copy.deepcopy(lm)
    apply_ttt(e2e, {"kind": "e2e", "layers": "top:1", "e2e_chunk": 4})
    assert has_live_hooks(recall) and has_live_hooks(e2e)
