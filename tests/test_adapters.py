"""Adapters, merged checkpoints and base loading on the tiny random Moshi (CPU, float32)."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from moshi.modules.lora import LoRALinear
from moshi.utils.compile import no_compile
from safetensors.torch import save_file
from torch import nn

from moshi_ttt.integration import (
    TTTConfig,
    apply_ttt,
    build_tiny_lm,
    named_ttt_parameters,
    tiny_lm_kwargs,
    ttt_modules,
    ttt_parameters,
)
from moshi_ttt.models.adapter import save_adapter
from moshi_ttt.models.export import export_merged
from moshi_ttt.models.load import load_adapter, load_base_lm, load_codec, load_merged
from moshi_ttt.models.lora import apply_lora, lora_modules

F32 = torch.float32


@pytest.fixture(autouse=True)
def _eager_and_no_pickle(monkeypatch):
    """Stay eager (moshi compiles lazily), one thread, and fail on any unpickling."""

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load / pickle.load must never be called")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops; 2 OpenMP threads stall on a busy 2-core machine
    try:
        with no_compile():
            yield
    finally:
        torch.set_num_threads(threads)


def trained(kind: str = "mlp", lora: bool = False, lora_first: bool = True, seed: int = 0):
    """A tiny ``tiny:0`` model with TTT in layers 1 and 3 (and LoRA), weights moved off init
    (a ``LoadedModel``: the module and where it was loaded from)."""
    model = load_base_lm("tiny:0", dtype=F32)
    lm = model.lm
    config = TTTConfig(layers="1,3", kind=kind, mini_batch_size=4, chunk_size=6, gate_init=0.5)
    if lora and lora_first:
        apply_lora(lm, rank=4, scaling=2.0)
    torch.manual_seed(seed)
    apply_ttt(lm, config)
    if lora and not lora_first:
        apply_lora(lm, rank=4, scaling=2.0)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in ttt_parameters(lm):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        for _, m in lora_modules(lm):
            m.lora_B.weight.copy_(0.05 * torch.randn(m.lora_B.weight.shape, generator=g))
    return model


def codes(lm, T: int = 9, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(0, lm.card, (2, lm.num_codebooks, T), generator=g)
    c[:, 0] = torch.randint(0, lm.text_card, (2, T), generator=g)
    return c


@torch.no_grad()
def outputs(lm, c: torch.Tensor) -> torch.Tensor:
    out = lm(c)
    return torch.cat([out.logits.nan_to_num().flatten(), out.text_logits.flatten()])


# -- round trips ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "mlp", "inplace"])
def test_adapter_round_trip(tmp_path, kind):
    model = trained(kind)
    lm = model.lm
    c = codes(lm)
    ref = outputs(lm, c)
    save_adapter(model, tmp_path / "ad")
    meta = json.loads((tmp_path / "ad" / "adapter.json").read_text())
    assert meta["base"] == "tiny:0" and meta["ttt_layers"] == [1, 3] and meta["lora"] is None
    assert meta["ttt_config"]["kind"] == kind and meta["base_arch"]["num_layers"] == 4
    names = dict(named_ttt_parameters(lm))
    assert set(meta["tensors"]) == set(names)
    assert all(meta["tensors"][k]["shape"] == list(p.shape) for k, p in names.items())

    loaded = load_adapter(tmp_path / "ad", dtype=F32)  # base rebuilt from adapter.json
    fresh = loaded.lm
    assert loaded.info is None and fresh.ttt_layers == [1, 3]
    assert torch.equal(outputs(fresh, c), ref)
    untrained = build_tiny_lm(0)
    apply_ttt(untrained, TTTConfig(layers="1,3", kind=kind, mini_batch_size=4, chunk_size=6))
    assert not torch.equal(outputs(untrained, c), ref)  # the adapter carries the difference

    into = load_adapter(tmp_path / "ad", lm=build_tiny_lm(0)).lm  # into a given base
    assert torch.equal(outputs(into, c), ref)


def test_lora_wraps_base_linears_only_and_round_trips(tmp_path):
    model = trained("mlp", lora=True)
    lm = model.lm
    n_base_linears = sum(type(m) is nn.Linear for m in build_tiny_lm(0).modules())
    assert len(lora_modules(lm)) == n_base_linears
    for _, module in ttt_modules(lm):  # the TTT branches keep plain linears
        assert not any(isinstance(m, LoRALinear) for m in module.modules())
        assert type(module.layer.lr_gate) is nn.Linear
    # the order of LoRA and TTT does not change the parameter names
    other = trained("mlp", lora=True, lora_first=False).lm
    assert set(dict(other.named_parameters())) == set(dict(lm.named_parameters()))

    c = codes(lm)
    ref = outputs(lm, c)
    save_adapter(model, tmp_path / "ad")
    meta = json.loads((tmp_path / "ad" / "adapter.json").read_text())
    assert meta["lora"] == {"rank": 4, "scaling": 2.0}
    assert "transformer.layers.0.gating.linear_in.lora_B.weight" in meta["tensors"]
    assert not any("frozen_W" in k for k in meta["tensors"])  # base weights are not stored
    fresh = load_adapter(tmp_path / "ad", dtype=F32).lm
    assert torch.equal(outputs(fresh, c), ref)


def test_merged_export_loads_with_same_outputs(tmp_path):
    model = trained("inplace", lora=True)
    lm = model.lm
    c = codes(lm)
    ref = outputs(lm, c)
    save_adapter(model, tmp_path / "ad")
    export_merged(tmp_path / "ad", tmp_path / "merged", dtype=F32)
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["dim"] == 64 and config["moshi_ttt"]["ttt_layers"] == [1, 3]
    assert config["moshi_ttt"]["lora_merged"] == {"rank": 4, "scaling": 2.0}

    merged = load_merged(tmp_path / "merged", dtype=F32).lm
    assert not lora_modules(merged) and merged.ttt_layers == [1, 3]
    torch.testing.assert_close(outputs(merged, c), ref, rtol=1e-4, atol=1e-4)  # W + s B A
    again = load_base_lm(tmp_path / "merged", dtype=F32).lm  # the generic loader too
    assert torch.equal(outputs(again, c), outputs(merged, c))


# -- errors -----------------------------------------------------------------------------------
def test_load_into_a_base_of_another_shape_names_the_mismatch(tmp_path):
    save_adapter(trained("mlp"), tmp_path / "ad")
    wide = build_tiny_lm(0, dim=96)
    with pytest.raises(ValueError, match=r"shape mismatch for 'transformer\.layers\.1\.ttt\.") as e:
        load_adapter(tmp_path / "ad", lm=wide)
    assert "[64]" in str(e.value) and "[96]" in str(e.value)
    with pytest.raises(ValueError, match=r"TTT layers \[3\] out of range: .* 2 layers"):
        load_adapter(tmp_path / "ad", lm=build_tiny_lm(0, num_layers=2))
    with pytest.raises(ValueError, match="text_card=64, this one has 128"):
        load_adapter(tmp_path / "ad", lm=build_tiny_lm(0, text_card=128))


def test_corrupt_or_missing_adapter_files_are_clear_errors(tmp_path):
    ad = save_adapter(trained("linear"), tmp_path / "ad")
    weights, meta_path = ad / "adapter.safetensors", ad / "adapter.json"
    good = weights.read_bytes()

    weights.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(ValueError, match=r"adapter\.safetensors: checksum differs"):
        load_adapter(ad, lm=build_tiny_lm(0))
    meta = json.loads(meta_path.read_text())
    import hashlib

    meta["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()  # checksum "fixed"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"adapter\.safetensors: not a readable safetensors"):
        load_adapter(ad, lm=build_tiny_lm(0))

    meta_path.write_text("{not json")
    with pytest.raises(ValueError, match=r"adapter\.json: not valid JSON"):
        load_adapter(ad, lm=build_tiny_lm(0))
    meta_path.unlink()
    with pytest.raises(FileNotFoundError, match=r"adapter\.json"):
        load_adapter(ad, lm=build_tiny_lm(0))
    with pytest.raises(FileNotFoundError, match="adapter directory not found"):
        load_adapter(tmp_path / "nope")
    with pytest.raises(ValueError, match="nothing to save"):
        save_adapter(build_tiny_lm(0), tmp_path / "empty", base="tiny:0")


# -- base checkpoints ---------------------------------------------------------------------------
def test_local_checkpoint_directory(tmp_path):
    """A directory in moshi's format (model.safetensors + config.json) made here."""
    src = build_tiny_lm(5)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, ckpt / "model.safetensors")
    (ckpt / "config.json").write_text(json.dumps({**tiny_lm_kwargs(), "model_type": "moshi"}))

    model = load_base_lm(ckpt, dtype=F32)
    lm, info = model.lm, model.info
    assert info.lm_config["dim"] == 64 and info.moshi_weights == ckpt / "model.safetensors"
    c = codes(lm)
    assert torch.equal(outputs(lm, c), outputs(src, c))
    with pytest.raises(FileNotFoundError, match="Mimi weights not found"):
        load_codec(model)  # this directory has no Mimi

    # an adapter on a local base records the directory and reloads from it
    torch.manual_seed(0)
    apply_ttt(lm, TTTConfig(layers="bottom:1", gate_init=0.3))
    ad = save_adapter(model, tmp_path / "ad")
    assert json.loads((ad / "adapter.json").read_text())["base"] == str(ckpt.resolve())
    again = load_adapter(ad, dtype=F32)
    assert again.info is not None and torch.equal(outputs(again.lm, c), outputs(lm, c))

    (ckpt / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model weights not found: .*model\.safetensors"):
        load_base_lm(ckpt)
    with pytest.raises(FileNotFoundError, match="no such directory, and not a Hugging Face"):
        load_base_lm(str(tmp_path / "missing" / "dir"))
