"""The retrofit design: branch options checked against their definitions, the training-window
curriculum, the useless-chunk check and the gate-collapse guard."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from moshi.utils.compile import no_compile
from test_integration import random_codes, stream  # noqa: E402  (tests/ is on sys.path)

from moshi_ttt.demo.markov_task import MarkovTask, write_shards
from moshi_ttt.integration import TTTConfig, apply_ttt, build_tiny_lm, ttt_modules
from moshi_ttt.train import metrics as metrics_mod
from moshi_ttt.train.checkpoint import load_trained_model
from moshi_ttt.train.config import TrainConfig
from moshi_ttt.train.metrics import CollapseGuard
from moshi_ttt.train.model import build_model
from moshi_ttt.train.steps import branch_gain
from moshi_ttt.train.trainer import train

T = 29
SMALL = {"context": 8, "num_layers": 2, "depformer_num_layers": 1, "depformer_dim": 16,
         "depformer_dim_feedforward": 64, "depformer_num_heads": 1}  # fmt: skip


@pytest.fixture(autouse=True)
def _eager():
    with no_compile():
        yield


def hybrid(seed: int = 0, **cfg) -> torch.nn.Module:
    lm = build_tiny_lm(seed=seed)
    torch.manual_seed(seed)
    apply_ttt(lm, TTTConfig(layers="1,3", kind="linear", mini_batch_size=4, gate_init=0.7, **cfg))
    return lm


# -- branch options against their definitions ------------------------------------------------
def test_zero_output_init_is_the_base_model_and_o_proj_gets_gradient():
    base, lm = build_tiny_lm(seed=1), hybrid(seed=1, output_init="zero", placement="after_ffn")
    codes = random_codes(lm, 2, T)
    with torch.no_grad():
        assert torch.equal(base(codes).text_logits, lm(codes).text_logits)
    lm(codes).text_logits.nan_to_num().square().mean().backward()
    for _, m in ttt_modules(lm):
        assert m.layer.o_proj.weight.grad.abs().sum() > 0  # learns from step 1: no saddle
        assert m.layer.qkv_proj.weight.grad.abs().sum() == 0  # behind the zero o_proj
    m = next(m for _, m in ttt_modules(lm))
    m.reset_parameters()  # re-initialisation (meta-device builds) keeps the zero
    assert m.layer.o_proj.weight.abs().sum() == 0


def test_residual_rms_scale_and_embeddings_input_match_the_definition():
    """GatedTTT(x, source) == tanh(alpha) * rms(x) * TTT(norm(source)), written out by hand."""
    torch.manual_seed(0)
    lm = hybrid(output_scale="residual_rms", input="embeddings")
    _, m = ttt_modules(lm)[0]
    x, emb = torch.randn(2, T, 64, dtype=torch.float64), torch.randn(2, T, 64, dtype=torch.float64)
    m.double()
    with torch.no_grad():
        want = torch.tanh(m.alpha) * x.pow(2).mean(-1, keepdim=True).sqrt() * m.layer(m.norm(emb))
        torch.testing.assert_close(m(x, emb), want)


@pytest.mark.parametrize(
    "options",
    [{"input": "embeddings", "placement": "after_ffn"},
     {"output_scale": "residual_rms", "placement": "before_attention"},
     {"output_scale": "residual_rms", "input": "embeddings", "placement": "after_attention"}],
    ids=["embeddings-input", "residual-rms", "both"],
)  # fmt: skip
def test_branch_options_parallel_equals_streaming(options):
    lm, base = hybrid(**options), build_tiny_lm(seed=0)
    seq = random_codes(lm, 2, T, seed=3)
    with torch.no_grad():
        _, ref = lm.forward_text(seq)
        assert not torch.allclose(ref, base.forward_text(seq)[1], atol=1e-3)
        for step in (1, 5):
            out = stream(lm, seq, step, fn=lambda s: lm.forward_text(s)[1], time_dim=2)
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_config_rejects_unknown_branch_options():
    with pytest.raises(ValueError, match="output_scale"):
        TTTConfig(output_scale="big")
    with pytest.raises(ValueError, match="input"):
        TTTConfig(input="audio")


# -- training-time checks ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("markov")
    return str(write_shards(root / "train", MarkovTask(seq_len=32), 8, seed=0))


def cfg_dict(run_dir: Path, data: str, **over) -> dict:
    d = {
        "run_dir": str(run_dir), "seed": 0, "max_steps": 3, "duration_sec": 32 / 12.5,
        "batch_size": 2, "lr": 1e-2, "first_codebook_weight": 1.0, "log_every": 1,
        "model": {"source": "tiny", "tiny_overrides": SMALL, "dtype": "float32",
                  "gradient_checkpointing": False},
        "ttt": {"layers": "0", "kind": "linear", "mini_batch_size": 8, "gate_init": 1.0,
                "placement": "before_attention"},
        "data": {"train": [data], "num_workers": 0},
    }  # fmt: skip
    for k, v in over.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) else v
    return d


@pytest.mark.parametrize(
    "ttt, key",
    [({"kind": "inplace", "chunk_size": 32}, "ttt.chunk_size"),
     ({"kind": "linear", "mini_batch_size": 40}, "ttt.mini_batch_size")],
)  # fmt: skip
def test_update_never_used_within_a_window_is_refused(tmp_path, shards, ttt, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.") + r".*never used"):
        TrainConfig.from_dict(cfg_dict(tmp_path, shards, ttt=ttt))
    ok = {**ttt, "chunk_size": 16} if ttt["kind"] == "inplace" else {**ttt, "mini_batch_size": 8}
    TrainConfig.from_dict(cfg_dict(tmp_path, shards, ttt=ok))  # several updates per window


def test_train_context_shortens_attention_only_while_training(tmp_path, shards):
    cfg = TrainConfig.from_dict(cfg_dict(tmp_path / "a", shards, model={"train_context": 2}))
    result = train(cfg, progress=False, device="cpu")
    ref = TrainConfig.from_dict(cfg_dict(tmp_path / "b", shards))
    ref_result = train(ref, progress=False, device="cpu")
    assert result.final_metrics["loss"] != ref_result.final_metrics["loss"]
    lm, loaded = load_trained_model(tmp_path / "a")
    assert loaded.model.train_context == 2
    contexts = {m.context for m in lm.transformer.modules() if hasattr(m, "context")}
    assert contexts == {SMALL["context"]}  # evaluation sees the model's own window


# -- the collapse guard -----------------------------------------------------------------------
def test_collapse_guard_needs_a_fall_from_the_peak_and_no_gain():
    guard = CollapseGuard({"gate/0": 0.0})
    assert not guard.fallen(1, {"gate/0": 0.01})  # never opened: not a collapse
    assert not guard.fallen(2, {"gate/0": 0.6})
    assert not guard.fallen(3, {"gate/0": 0.2})  # 1/3 of the peak
    assert guard.fallen(4, {"gate/0": 0.1})
    assert guard.verdict(4, {"gate/0": 0.1}, gain=0.5) is None  # fallen, but the branch helps
    text = guard.verdict(4, {"gate/0": 0.1}, gain=0.001)
    assert "0.600 (step 2) -> 0.100" in text and "0.0010 nats" in text
    assert not guard.fallen(5, {"gate/0": 0.0})  # warned once


def test_branch_gain_is_the_gate_zero_difference(tmp_path, shards):
    cfg = TrainConfig.from_dict(cfg_dict(tmp_path, shards, ttt={"output_init": "zero"}))
    lm = build_model(cfg, torch.device("cpu"))[0].lm
    from moshi_ttt.data.pipeline import ShardSource
    from moshi_ttt.train.parallel import init_distributed

    codes = torch.stack([ShardSource(shards).codes(i) for i in range(2)]).long()
    batch = type("B", (), {"codes": codes})()
    d = init_distributed("cpu")
    assert branch_gain(lm, batch, cfg, d) == 0.0  # zero output projection: no branch at all
    with torch.no_grad():
        for _, m in ttt_modules(lm):
            m.layer.o_proj.weight.normal_(std=0.5)
    gain = branch_gain(lm, batch, cfg, d)
    assert math.isfinite(gain) and gain != 0.0
    assert all(m.gate_override is None for _, m in ttt_modules(lm))  # gates restored


def test_trainer_warns_on_collapse(tmp_path, shards, monkeypatch):
    monkeypatch.setattr(metrics_mod, "GATE_FALL", 2.0)  # every gate counts as fallen
    monkeypatch.setattr(metrics_mod, "NO_GAIN_NATS", 1e9)  # and no gain is ever enough
    cfg = TrainConfig.from_dict(cfg_dict(tmp_path, shards))
    train(cfg, progress=False, device="cpu")
    log = (tmp_path / "train.log").read_text()
    assert "TTT gate collapse" in log and "gates fell below" in log
    assert log.count("TTT gate collapse") == 1
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    guard = [r for r in rows if r.get("split") == "guard"]
    assert len(guard) == 1 and math.isfinite(guard[0]["ttt_branch_gain"])


# -- the shipped configs carry the recipe -------------------------------------------------------
@pytest.mark.parametrize("name", ["moshi7b_dailytalk", "moshi7b_long_audio"])
def test_7b_configs_carry_the_recommended_retrofit(name):
    from moshi.models import loaders

    from moshi_ttt.integration.config import parse_layer_spec
    from moshi_ttt.recipes import RETROFIT_TTT, retrofit_training

    cfg = TrainConfig.load(Path(__file__).parents[1] / "configs" / f"{name}.yaml")
    recipe = retrofit_training(loaders._lm_kwargs["context"])
    assert cfg.model.train_context_min == recipe["model"]["train_context_min"] == 375
    assert cfg.model.train_context is None and cfg.kl_to_base == recipe["kl_to_base"] == 1.0
    for key in ("placement", "kind", "gate_init", "output_init"):
        assert getattr(cfg.ttt, key) == RETROFIT_TTT[key], key
    upper = parse_layer_spec(RETROFIT_TTT["layers"], 32)  # 7B: within the recipe's layers
    assert set(parse_layer_spec(cfg.ttt.layers, 32)) <= set(upper)


def test_trainer_advises_the_recipe_for_a_frozen_retrofit(tmp_path, shards):
    from moshi_ttt.train.steps import retrofit_advice

    cfg = TrainConfig.from_dict(cfg_dict(tmp_path, shards))  # frozen tiny base, full window
    advice = retrofit_advice(cfg, 8)
    assert "full attention window (8 frames)" in advice
    assert "model.train_context_min: 1, kl_to_base: 1.0" in advice  # an eighth of 8 frames
    one = TrainConfig.from_dict(cfg_dict(tmp_path, shards, model={"train_context": 2}))
    assert "one training window of 2 frames" in retrofit_advice(one, 64)
    assert "model.train_context_min: 8," in retrofit_advice(one, 64)  # of the inference window
    rand = TrainConfig.from_dict(cfg_dict(tmp_path, shards, model={"train_context_min": 2}))
    assert retrofit_advice(rand, 8) is None
    scratch = TrainConfig.from_dict(cfg_dict(tmp_path, shards, model={"train_base": True}))
    assert retrofit_advice(scratch, 8) is None
    # the trainer passes the model's inference window, not the training one
    train(TrainConfig.from_dict(cfg_dict(tmp_path / "run", shards, model={"train_context": 4})),
          progress=False, device="cpu")  # fmt: skip
    assert "one training window of 4 frames" in (tmp_path / "run" / "train.log").read_text()
    lm = build_model(cfg, torch.device("cpu"))[0].lm
    context = lm.transformer.layers[0].self_attn.context
    assert (
        f"model.train_context_min: {round(context / 8)},"
        in (tmp_path / "run" / "train.log").read_text()
    )


def test_embeddings_input_with_activation_checkpointing_gives_the_same_gradients():
    from moshi_ttt.train.parallel import apply_activation_checkpointing

    grads = []
    for checkpointing in (False, True):
        lm = hybrid(input="embeddings", placement="after_ffn")
        lm.train()
        if checkpointing:
            apply_activation_checkpointing(lm)
        lm(random_codes(lm, 2, 16)).text_logits.nan_to_num().square().mean().backward()
        named = [(n, p.grad) for n, p in lm.named_parameters() if ".ttt." in n]
        assert all(g is not None for _, g in named)
        grads.append(torch.cat([g.flatten() for _, g in named]))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-6)
