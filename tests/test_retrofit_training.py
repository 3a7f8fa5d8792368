"""The real-data retrofit's training options against their definitions: a random attention
window per step (deterministic per seed and step, exact on resume) and the KL-to-gate-0 harm
term (the formula, zero when the branch adds nothing, its gradient, its refusals); the recipe's
keys; Moshi 7B state sizes."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from moshi.utils.compile import no_compile
from test_retrofit import cfg_dict, hybrid, shards  # noqa: F401  (tests/ is on sys.path)

from moshi_ttt.demo.realdata import moshi7b_costs, parse_rows
from moshi_ttt.eval.long_context import harm_line
from moshi_ttt.integration.carry import StateCarry
from moshi_ttt.integration.hybrid import GatedTTT
from moshi_ttt.recipes import FORCED_TRAIN, RETROFIT_TRAIN, retrofit_training
from moshi_ttt.train.config import TrainConfig
from moshi_ttt.train.loss import covered_kl_sum
from moshi_ttt.train.steps import gate0_output, step_context
from moshi_ttt.train.trainer import train


@pytest.fixture(autouse=True)
def _eager():
    with no_compile():
        yield


def test_step_context_is_a_seeded_uniform_draw(tmp_path, shards):  # noqa: F811
    cfg = TrainConfig.from_dict(cfg_dict(tmp_path, shards, model={"train_context_min": 2}))
    draws = [step_context(cfg, s, 8) for s in range(1, 400)]
    assert draws == [step_context(cfg, s, 8) for s in range(1, 400)]  # same seed, same draws
    assert set(draws) == set(range(2, 9))  # uniform over [min, full]
    other = TrainConfig.from_dict(cfg_dict(tmp_path, shards, seed=1,
                                           model={"train_context_min": 2}))  # fmt: skip
    assert draws != [step_context(other, s, 8) for s in range(1, 400)]
    capped = TrainConfig.from_dict(
        cfg_dict(tmp_path, shards, model={"train_context_min": 2, "train_context": 4})
    )
    assert {step_context(capped, s, 8) for s in range(1, 200)} == {2, 3, 4}
    fixed = TrainConfig.from_dict(cfg_dict(tmp_path, shards, model={"train_context": 3}))
    assert step_context(fixed, 5, 8) == 3
    with pytest.raises(ValueError, match="train_context_min"):
        TrainConfig.from_dict(
            cfg_dict(tmp_path, shards, model={"train_context_min": 5, "train_context": 4})
        )


def test_random_window_training_logs_it_and_resumes_exactly(tmp_path, shards):  # noqa: F811
    d = cfg_dict(tmp_path / "a", shards, max_steps=4, ckpt_every=2, keep_last=2,
                 model={"train_context_min": 2})  # fmt: skip
    full = train(TrainConfig.from_dict(d), progress=False, device="cpu")
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    windows = [r["train_context"] for r in rows if "train_context" in r]
    cfg = TrainConfig.from_dict(d)
    assert windows == [step_context(cfg, s, 8) for s in range(1, 5)]
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_000004")
    d2 = {**d, "run_dir": str(tmp_path / "b")}
    resumed = train(TrainConfig.from_dict(d2), progress=False, device="cpu", resume=True)
    assert resumed.final_metrics["loss"] == pytest.approx(full.final_metrics["loss"], abs=1e-5)


def test_covered_kl_sum_matches_its_definition():
    lm = hybrid(seed=0)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, lm.card, (2, 17, 20), generator=g)
    codes[:, 0] = torch.randint(0, lm.text_card, (2, 20), generator=g)
    out = lm(codes)
    teacher = gate0_output(lm, codes, TrainConfig.from_dict(cfg_dict("r", "d")))
    kl = covered_kl_sum(out, teacher, frames=7)
    ref = torch.zeros(())
    for s_l, t_l, mask in ((out.text_logits, teacher.text_logits, out.text_mask),
                           (out.logits, teacher.logits, out.mask)):  # fmt: skip
        for idx in mask.nonzero().tolist():
            if idx[-1] >= 7:
                continue
            p = F.softmax(t_l[tuple(idx)].double(), -1)
            q = F.log_softmax(s_l[tuple(idx)].double(), -1)
            ref = ref + (p * (p.log() - q)).sum()
    assert float(kl.detach()) == pytest.approx(float(ref.detach()), rel=1e-4)
    kl.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lm.parameters())
    zero = hybrid(seed=0, output_init="zero")  # the branch adds nothing: KL 0
    cfg = TrainConfig.from_dict(cfg_dict("r", "d"))
    with torch.no_grad():
        kl0 = covered_kl_sum(zero(codes), gate0_output(zero, codes, cfg), 20)
    assert float(kl0) == pytest.approx(0, abs=1e-6)
    assert float(kl.detach()) > 0
    # rows: only the chosen batch rows count, and the sum splits over rows
    with torch.no_grad():
        both = covered_kl_sum(out, teacher, 7)
        r0 = covered_kl_sum(out, teacher, 7, rows=torch.tensor([True, False]))
        r1 = covered_kl_sum(out, teacher, 7, rows=torch.tensor([False, True]))
        none = covered_kl_sum(out, teacher, 7, rows=torch.tensor([False, False]))
    assert float(r0 + r1) == pytest.approx(float(both), rel=1e-5) and float(none) == 0
    assert float(r0) > 0 and float(r1) > 0


def test_the_gate0_pass_leaves_a_carried_state_alone():
    """With ``state_carry``, the teacher pass reads and writes no carried state: the states
    carried over two windows are those of training without it, and its output is the gate-0
    model's without any carry."""
    lm = hybrid(seed=0, placement="after_attention")
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, lm.card, (2, 17, 16), generator=g)
    codes[:, 0] = torch.randint(0, lm.text_card, (2, 16), generator=g)
    cfg = TrainConfig.from_dict(cfg_dict("r", "d"))
    with torch.no_grad():
        plain = gate0_output(lm, codes, cfg).text_logits
    carried, teachers = [], []
    for with_teacher in (False, True):
        carry = StateCarry(lm)
        with torch.no_grad():
            for reset in (True, False):
                carry.begin(torch.tensor([reset, reset]))
                lm(codes)
                if with_teacher:
                    teachers.append(gate0_output(lm, codes, cfg).text_logits)
                carry.commit()
        carried.append(carry.state_dict())
        carry.detach_from_model()
    assert carried[0] and carried[0].keys() == carried[1].keys()
    assert all(torch.equal(carried[0][k], carried[1][k]) for k in carried[0])
    assert all(torch.equal(t.nan_to_num(), plain.nan_to_num()) for t in teachers)
    assert all(m.carry is None for m in lm.modules() if isinstance(m, GatedTTT))


def test_kl_training_with_a_carried_state(tmp_path, shards):  # noqa: F811
    d = cfg_dict(tmp_path / "carry", shards, kl_to_base=1.0)
    d["data"]["state_carry"] = "detached"
    result = train(TrainConfig.from_dict(d), progress=False, device="cpu")
    assert math.isfinite(result.final_metrics["kl_to_base"])


def test_kl_training_logs_the_term_and_is_refused_where_it_cannot_work(tmp_path, shards):  # noqa: F811
    d = cfg_dict(tmp_path / "kl", shards, kl_to_base=1.0)
    result = train(TrainConfig.from_dict(d), progress=False, device="cpu")
    assert result.final_metrics["kl_to_base"] >= 0
    ref = train(TrainConfig.from_dict(cfg_dict(tmp_path / "nokl", shards)), progress=False,
                device="cpu")  # fmt: skip
    assert "kl_to_base" not in ref.final_metrics
    with pytest.raises(ValueError, match="kl_to_base"):
        TrainConfig.from_dict(cfg_dict(tmp_path, shards, kl_to_base=1.0,
                                       ttt={"kind": "inplace"}))  # fmt: skip
    with pytest.raises(ValueError, match="kl_to_base"):
        TrainConfig.from_dict(
            {**cfg_dict(tmp_path, shards, kl_to_base=1.0, ttt=None), "lora": {"enable": True}}
        )
    with pytest.raises(ValueError, match="kl_to_base"):
        TrainConfig.from_dict(cfg_dict(tmp_path, shards, kl_to_base=-1.0))


def test_recipe_keys_and_rows():
    assert retrofit_training(64) == {"model": {"train_context_min": 8}, "kl_to_base": 1.0}
    assert retrofit_training(64, FORCED_TRAIN) == {"model": {"train_context": 16},
                                                   "kl_to_base": 0.0}  # fmt: skip
    with pytest.raises(ValueError, match="unknown"):
        retrofit_training(64, {"train_window": 3})
    assert set(RETROFIT_TRAIN) == {"train_context_fraction", "train_context_min_fraction",
                                   "kl_to_base"}  # fmt: skip
    assert parse_rows("dyneval") == ("base", "dyneval")
    with pytest.raises(ValueError, match="--rows"):
        parse_rows("basee")


def test_moshi7b_state_sizes():
    c = moshi7b_costs(dyneval_layers="top:2", ttt_layers=1)
    assert moshi7b_costs(0, "upper")["3000"]["kv_window_plus_ttt"] == (
        32 * 2 * 4096 * 2 * 3000 + 16 * 32 * (128 * 128 + 128) * 4
    )
    kv_3000 = 32 * 2 * 4096 * 2 * 3000  # layers x (k, v) x dim x bf16 bytes x frames
    assert c["3000"]["kv_window"] == kv_3000 and c["45000"]["kv_window"] == kv_3000
    assert c["45000"]["kv_full_attention"] == 15 * kv_3000
    assert c["3000"]["kv_window_plus_ttt"] - kv_3000 == 32 * (128 * 128 + 128) * 4
    assert c["3000"]["kv_window_plus_dyneval"] > kv_3000 + 2 * 200e6 * 2  # ~200M per 7B layer


def test_eval_logs_the_within_window_change_against_gate0(tmp_path, shards):  # noqa: F811
    d = cfg_dict(tmp_path / "e", shards, eval_every=3)
    d["data"]["eval"] = [shards]
    result = train(TrainConfig.from_dict(d), progress=False, device="cpu")
    harm = result.eval_metrics["within_window_vs_gate0"]
    assert math.isfinite(harm) and harm != 0.0  # an open gate changes the predictions
    log = (tmp_path / "e" / "train.log").read_text()
    assert "inside the window the memory changes the CE by" in log
    zero = cfg_dict(tmp_path / "z", shards, eval_every=1,
                    ttt={"output_init": "zero"}, max_steps=1, lr=1e-9)  # fmt: skip
    zero["data"]["eval"] = [shards]
    z = train(TrainConfig.from_dict(zero), progress=False, device="cpu")
    assert abs(z.eval_metrics["within_window_vs_gate0"]) < 1e-4  # ~ no change yet


def test_harm_line_warns_past_the_tolerance():
    ok = harm_line(0.001, {"lo": -0.002, "hi": 0.004, "n": 30}, "text CE")
    assert "WARNING" not in ok and "-0.0010" in ok and "30 files" in ok
    bad = harm_line(-0.02, {"lo": -0.03, "hi": -0.01, "n": 30}, "text CE")
    assert "+0.0200" in bad and "WARNING" in bad and "[95 % CI +0.0100, +0.0300" in bad
