"""Real scale, checked on CPU: bf16 training, the plan (meta device), FSDP units, the global
batch, requeue, the SLURM script and the CPU variant of the GPU check."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from moshi_ttt.cli import main
from moshi_ttt.data.toy import write_toy_dataset
from moshi_ttt.train.config import TrainConfig
from moshi_ttt.train.model import LOAD_BATCH_BYTES, build_model, parameter_groups
from moshi_ttt.train.parallel import apply_fsdp, check_unit_dtypes, fsdp_units
from moshi_ttt.train.plan import activation_per_frame, build_meta_model, make_plan
from moshi_ttt.train.steps import build_optimizer, forward_terms
from moshi_ttt.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
TTT = {"layers": "1,3", "kind": "mlp", "mini_batch_size": 8, "gate_init": 0.1}


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("toy")
    train_index = write_toy_dataset(root, [2.56] * 4, seed=20)
    eval_index = write_toy_dataset(root / "ev", [2.56] * 2, index_name="eval.jsonl", seed=10)
    return {"train": str(train_index), "eval": str(eval_index)}


def config(run_dir: Path, toy: dict[str, str], **top) -> TrainConfig:
    base = {
        "run_dir": str(run_dir), "max_steps": 4, "duration_sec": 1.28, "batch_size": 2,
        "lr": 3e-3, "lora_lr": 1e-3, "log_every": 1, "ttt": TTT,
        "lora": {"enable": True, "rank": 4},
        "model": {"gradient_checkpointing": True},
        "data": {"train": [toy["train"]], "eval": [toy["eval"]], "num_workers": 0,
                 "state_carry": "detached"},
        "optim": {"pct_start": 0.25},
    }  # fmt: skip
    for key, value in top.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) else value
    return TrainConfig.from_dict(base)


def records(run_dir: Path, split: str = "train") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("split", "train") == split]


def tiny_codes(batch: int, frames: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 32, (batch, 17, frames), generator=g)
    codes[:, 0] = torch.randint(0, 64, (batch, frames), generator=g)
    return codes


# -- 1. bf16 on CPU -----------------------------------------------------------------------------
BF16_TOLERANCE = 0.05  # nats: |loss(bf16 base + CPU autocast) - loss(float32)| per step


def test_bf16_trains_resumes_and_evaluates_like_float32(toy, tmp_path):
    """The GPU recipe on CPU: frozen bf16 base, fp32 LoRA/TTT and AdamW, bf16 autocast."""
    kw = {"ckpt_every": 2, "keep_last": 5, "eval_every": 4}
    fp32 = config(tmp_path / "fp32", toy, model={"dtype": "float32"}, **kw)
    bf16 = config(tmp_path / "bf16", toy, model={"dtype": "bfloat16"}, **kw)
    train(fp32, progress=False)
    train(bf16, progress=False)
    a, b = records(tmp_path / "fp32"), records(tmp_path / "bf16")
    assert len(a) == len(b) == 4
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) < BF16_TOLERANCE, (ra["loss"], rb["loss"])
        assert rb["grad_norm/ttt"] > 0 and rb["grad_norm/lora"] > 0
    ea, eb = records(tmp_path / "fp32", "eval"), records(tmp_path / "bf16", "eval")
    assert abs(ea[0]["loss"] - eb[0]["loss"]) < BF16_TOLERANCE
    saved = load_file(str(tmp_path / "bf16/checkpoints/step_000004/trainable.safetensors"))
    assert all(t.dtype == torch.float32 for t in saved.values())
    # exact resume under bf16: drop the last checkpoint, continue from step 2
    part = tmp_path / "part"
    import shutil

    shutil.copytree(tmp_path / "bf16", part)
    shutil.rmtree(part / "checkpoints" / "step_000004")
    train(config(part, toy, model={"dtype": "bfloat16"}, **kw), resume=True, progress=False)
    for ra, rb in zip(b[2:], records(part)[2:]):
        assert ra["loss"] == rb["loss"] and ra["grad_norm"] == rb["grad_norm"]
    wb = load_file(str(part / "checkpoints/step_000004/trainable.safetensors"))
    assert all(torch.equal(saved[k], wb[k]) for k in saved)
    assert records(part, "eval")[0]["loss"] == eb[0]["loss"]


# -- 2. the plan ------------------------------------------------------------------------------
def test_plan_of_tiny_config_matches_a_real_build(toy, tmp_path):
    cfg = config(tmp_path, toy, model={"dtype": "bfloat16", "gradient_checkpointing": False})
    plan = make_plan(cfg)
    built, groups = build_model(cfg, torch.device("cpu"))
    lm = built.lm
    owned = parameter_groups(lm)
    assert plan.groups == {
        g: (sum(p.numel() for _, p in ps), g in groups.params) for g, ps in owned.items() if ps
    }
    frozen = sum(p.numel() * p.element_size() for p in lm.parameters() if not p.requires_grad)
    assert plan.frozen_bytes == frozen and plan.trainable == sum(groups.num_params().values())
    # trainables, gradients and AdamW states after a real step, in bytes (one process)
    opt = build_optimizer(groups.params, groups.lrs, cfg)
    forward_terms(lm, tiny_codes(2, 16), cfg).loss().backward()
    opt.step()
    named = groups.named()
    mem = plan.memory(1)
    assert mem["trainable"] == sum(p.numel() * p.element_size() for _, p in named)
    assert mem["grads"] == sum(p.grad.numel() * p.grad.element_size() for _, p in named)
    adam = sum(t.numel() * t.element_size() for st in opt.state.values()
               for k, t in st.items() if k != "step")  # fmt: skip
    assert mem["adamw"] == adam and mem["frozen"] == frozen and mem["fsdp_unsharded"] == 0
    assert plan.memory(2)["adamw"] == adam // 2 and plan.memory(2)["fsdp_unsharded"] > 0
    assert [u.name for u in plan.units] == [n for n, _ in fsdp_units(lm)]
    assert plan.tokens_per_step(8) == cfg.frames_per_window * 2 * 8 * 9
    # activations: the estimate against the bytes autograd keeps (float32, no checkpointing)
    fp32 = config(tmp_path, toy, duration_sec=10.24,
                  model={"dtype": "float32", "gradient_checkpointing": False})  # fmt: skip
    lm32 = build_model(fp32, torch.device("cpu"))[0].lm
    frames = fp32.frames_per_window
    params = {p.untyped_storage().data_ptr() for p in lm32.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward_terms(lm32, tiny_codes(2, frames), fp32)
    measured = sum(kept.values())
    with_ckpt, without = activation_per_frame(build_meta_model(fp32)[0], 4)
    estimate = without * frames * 2
    assert 0.6 < estimate / measured < 1.6, (estimate, measured)
    assert with_ckpt < without


@pytest.mark.parametrize("name", ["moshi7b_dailytalk", "moshi7b_long_audio"])
def test_plan_of_7b_configs_is_offline_and_fast(name, monkeypatch, capsys):
    import huggingface_hub

    def no_download(*args, **kwargs):
        raise AssertionError(f"the plan downloaded {args}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")  # no cached config: moshi's defaults
    cfg = TrainConfig.load(ROOT / "configs" / f"{name}.yaml")
    start = time.perf_counter()
    plan = make_plan(cfg)
    assert time.perf_counter() - start < 60
    assert len(plan.units) == 32 + 6 + 1  # one per temporal / depformer layer, the root
    assert all(u.params >= 2_000_000 for u in plan.units)
    assert 7.6e9 < plan.total_params < 8.7e9 and plan.groups["ttt"][1]
    assert 0.5e9 < plan.groups["ttt"][0] < 0.6e9  # 8 TTT-Linear branches of dim 4096
    assert plan.groups.get("lora", (0, False))[1] == (name == "moshi7b_dailytalk")
    mem8 = plan.memory(8)
    assert mem8["frozen"] * 8 == pytest.approx(plan.frozen_bytes, abs=8)
    assert mem8["total"] < 10 * 2**30 and mem8["total"] < plan.memory(1)["total"] < 40 * 2**30
    assert main(["plan", str(ROOT / "configs" / f"{name}.yaml"), "--gpus", "1,8"]) == 0
    out = capsys.readouterr().out
    assert "FSDP units: 39" in out and "| tokens per optimizer step |" in out
    # rank 0's host memory while loading: a batch and the new parameters, never the whole 7B
    new = sum(plan.groups.get(g, (0, False))[0] for g in ("ttt", "lora")) * 2  # bf16
    assert plan.host_load_bytes(8) - plan.host_load_bytes(1) == LOAD_BATCH_BYTES
    assert new <= plan.host_load_bytes(1) <= new + 2**28 and plan.host_load_bytes(8) < 3 * 2**30
    assert "| rank 0 host memory while loading (GiB, not GPU) |" in out
    assert main(["train", str(ROOT / "configs" / f"{name}.yaml"), "--dry-run"]) == 0
    assert "FSDP units: 39" in capsys.readouterr().out


# -- 3. FSDP: one unit per transformer layer ----------------------------------------------------
@pytest.fixture
def one_process_group():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_fsdp_wraps_each_layer_with_its_lora_and_ttt(toy, tmp_path, one_process_group):
    cfg = config(tmp_path, toy, model={"dtype": "bfloat16"})
    built, groups = build_model(cfg, torch.device("cpu"))
    lm = built.lm
    layers = len(lm.transformer.layers) + len(lm.depformer.layers)
    apply_fsdp(lm)
    groups.rebind(lm)
    wrapped = [m for m in lm.modules() if hasattr(m, "set_gradient_divide_factor")]
    assert len(wrapped) == layers + 1
    opt = build_optimizer(groups.params, groups.lrs, cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = forward_terms(lm, tiny_codes(2, 16), cfg).loss()
        loss.backward()
    views = [str(w.message) for w in caught if "returned a view tensor" in str(w.message)]
    assert not views, views  # the root's view outputs are copied before FSDP's hook sees them
    assert all(p.grad is not None for n, p in groups.named() if "lora_A" not in n)
    opt.step()
    assert {p.dtype for _, p in groups.named()} == {torch.float32}
    assert torch.bfloat16 in {p.dtype for p in lm.parameters()}


def test_fsdp_refuses_mixed_trainable_dtypes(toy, tmp_path):
    built, groups = build_model(config(tmp_path, toy), torch.device("cpu"))
    lm = built.lm
    _, p = groups.params["lora"][0]
    p.data = p.data.bfloat16()
    with pytest.raises(ValueError, match="trainable parameters of several dtypes"):
        check_unit_dtypes(lm)


# -- 5. global batch, requeue, the SLURM script -------------------------------------------------
def test_global_batch_derives_grad_accum(toy, tmp_path):
    cfg = config(tmp_path, toy, batch_size=1, global_batch=16)
    cfg.resolve_grad_accum(8)
    assert cfg.grad_accum == 2
    cfg = config(tmp_path, toy, batch_size=2, global_batch=16)
    with pytest.raises(ValueError, match="global_batch: 16 .* batch_size 2 x 16"):
        cfg.resolve_grad_accum(16)
    with pytest.raises(ValueError, match="grad_accum: 3"):
        config(tmp_path, toy, batch_size=1, global_batch=16, grad_accum=3).resolve_grad_accum(8)


def test_requeue_resumes_only_when_a_checkpoint_exists(toy, tmp_path):
    run = tmp_path / "run"
    cfg = config(run, toy, max_steps=2, ckpt_every=1, eval_every=0)
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9}\n')  # an attempt with no ckpt
    train(cfg, progress=False, requeue=True)
    assert [r["step"] for r in records(run)] == [1, 2]
    assert records(run)[0]["loss"] != 9
    more = config(run, toy, max_steps=2, ckpt_every=1, eval_every=0)
    result = train(more, progress=False, requeue=True)  # a checkpoint: resumes (nothing left)
    assert result.steps == 2 and [r["step"] for r in records(run)] == [1, 2]


SCONTROL = """#!/bin/bash
[ "$1 $2" = "show hostnames" ] || exit 3
for i in $(seq 1 20000); do echo "node$i"; done
"""
SRUN = """#!/bin/bash
printf '%s\\n' "$@" > "$SRUN_ARGS"
"""


def run_slurm(tmp_path: Path, nodes: int, restart: int, global_batch: str | None = None):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("scontrol", SCONTROL), ("srun", SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_JOB_NODELIST="node[1-20000]",
               SLURM_NNODES=str(nodes), SLURM_JOB_ID="42", SLURM_RESTART_COUNT=str(restart),
               SRUN_ARGS=str(tmp_path / "args.txt"))  # fmt: skip
    env.pop("GLOBAL_BATCH", None)
    if global_batch is not None:
        env["GLOBAL_BATCH"] = global_batch
    (tmp_path / "args.txt").unlink(missing_ok=True)
    cmd = ["bash", str(ROOT / "scripts/slurm_train.sh"), "cfg.yaml", "--set", "lr=1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    args = (tmp_path / "args.txt").read_text().split("\n") if proc.returncode == 0 else []
    return proc, args


def test_slurm_script_with_stand_in_scontrol_and_srun(tmp_path):
    proc, args = run_slurm(tmp_path, nodes=1, restart=0)
    assert proc.returncode == 0, proc.stderr  # no SIGPIPE (141) from a long host list
    assert "node1:29500" in args and "--requeue" not in args and "--resume" not in args
    assert args[args.index("train") + 1 :][:3] == ["cfg.yaml", "--set", "lr=1"]
    proc, args = run_slurm(tmp_path, nodes=1, restart=1)
    assert proc.returncode == 0 and "--requeue" in args and "--resume" not in args
    proc, _ = run_slurm(tmp_path, nodes=2, restart=0)
    assert proc.returncode == 2 and "GLOBAL_BATCH" in proc.stderr
    proc, args = run_slurm(tmp_path, nodes=2, restart=0, global_batch="16")
    assert (
        proc.returncode == 0
        and "global_batch=16" in args
        and args[args.index("--nnodes") + 1] == "2"
    )
    proc, args = run_slurm(tmp_path, nodes=2, restart=0, global_batch="scale")
    assert proc.returncode == 0 and not any("global_batch" in a for a in args)
    proc, _ = run_slurm(tmp_path, nodes=2, restart=0, global_batch="lots")
    assert proc.returncode == 2


# -- 6. the GPU check, CPU-sized ---------------------------------------------------------------
def test_gpu_check_runs_its_cpu_variant(tmp_path):
    out = tmp_path / "check.md"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--cpu", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = out.read_text()
    for section in ("| stream | base |", "| stream | TTT-Linear x1 |", "| train |", "| fsdp |",
                    "| eval |", "tokens/s", "peak GiB", "max CE diff", "| e2e |",
                    "update ms"):  # fmt: skip
        assert section in table, section
    assert "| fsdp | sharded load vs one process | max abs diff | 0.0e+00 |" in table


# -- 4. two processes: built from one read, saved from rank 0, exact resume ----------------------
def _torchrun2(cfg_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
           "-m", "moshi_ttt.cli", "train", str(cfg_path), "--no-progress", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_TORCH_COMPILE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_two_processes_resume_exactly(toy, tmp_path):
    cfg = config(tmp_path / "full", toy, max_steps=4, ckpt_every=2, keep_last=5, batch_size=1,
                 eval_every=0, model={"dtype": "bfloat16"}, optim={"eps": 1e-6})  # fmt: skip
    path = tmp_path / "cfg.yaml"
    cfg.to_yaml(path)
    full = _torchrun2(path)
    assert full.returncode == 0, full.stderr[-3000:]
    part = tmp_path / "part"
    import shutil

    shutil.copytree(tmp_path / "full", part)
    shutil.rmtree(part / "checkpoints" / "step_000004")
    resumed = _torchrun2(path, f"--set=run_dir={part}", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = records(tmp_path / "full"), records(part)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a[2:], b[2:]):
        assert ra["loss"] == rb["loss"] and ra["grad_norm"] == rb["grad_norm"], (ra, rb)
    for name in ("trainable.safetensors", "optimizer.safetensors"):
        wa = load_file(str(tmp_path / "full/checkpoints/step_000004" / name))
        wb = load_file(str(part / "checkpoints/step_000004" / name))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name


# -- 5. bounded host memory at load: rank 0 reads the weights a batch at a time ------------------
def _sharded_load(*args: str) -> list[list[dict]]:
    out = Path(args[-1])
    script = str(ROOT / "benchmarks/sharded_load.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
           script, "load", *args[:-1], "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_TORCH_COMPILE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _local_checkpoint(directory: Path, seed: int = 5) -> Path:
    """A checkpoint directory in moshi's format (config.json + model.safetensors)."""
    from safetensors.torch import save_file

    from moshi_ttt.integration.tiny import build_tiny_lm, tiny_lm_kwargs

    directory.mkdir(parents=True)
    lm = build_tiny_lm(seed)
    save_file({k: v.contiguous() for k, v in lm.state_dict().items()},
              str(directory / "model.safetensors"))  # fmt: skip
    (directory / "config.json").write_text(json.dumps({**tiny_lm_kwargs(), "model_type": "moshi"}))
    return directory


@pytest.mark.slow
def test_sharded_load_reads_on_rank_0_only_and_equals_one_process(toy, tmp_path):
    """Each kind of base, loaded over 2 gloo processes in batches of ~30 KB (dozens of
    batches): every tensor equals the one-process build (LoRA and TTT drawn from the seed as
    there), and rank 1 opens no weights file. A checkpoint directory and an export are read
    tensor by tensor; a training run is built whole on rank 0."""
    from moshi_ttt.models.export import export_run

    ckpt = _local_checkpoint(tmp_path / "ckpt")
    run = tmp_path / "run"
    train(config(run, toy, max_steps=1, eval_every=0), progress=False)
    export = export_run(run, tmp_path / "export")
    e2e = {"kind": "e2e", "layers": "top:1", "e2e_chunk": 4, "e2e_hidden": 32}
    cases = {
        "checkpoint": {"model": {"source": "local", "path": str(ckpt)}},
        "export": {"model": {"source": "local", "path": str(export)}, "ttt": None,
                   "data": {"state_carry": "none"}},
        "checkpoint_e2e": {"model": {"source": "local", "path": str(ckpt)},
                           "lora": {"enable": False}, "ttt": e2e, "data": {"state_carry": "none"}},
        "run": {"model": {"source": "local", "path": str(run)}},
    }  # fmt: skip
    paths = []
    for name, over in cases.items():
        cfg = config(tmp_path / f"x_{name}", toy).to_dict()
        for key, value in over.items():
            cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
        paths.append(tmp_path / f"{name}.yaml")
        TrainConfig.from_dict(cfg).to_yaml(paths[-1])
    results = _sharded_load(*map(str, paths), "--compare", "--batch-mib", "0.03",
                            str(tmp_path / "out.json"))  # fmt: skip
    for name, (rank0, rank1) in zip(cases, results):
        assert rank0["same_keys"] and rank0["max_abs_diff"] == 0.0, (name, rank0)
        assert rank0["weights_opened"] >= 1 and rank1["weights_opened"] == 0, (name, rank1)


@pytest.mark.slow
def test_sharded_load_keeps_rank_0_host_memory_to_its_shard_and_a_batch(tmp_path):
    """A 2 GiB checkpoint of random weights over 2 processes, 128 MiB batches: rank 0's
    peak resident memory during the load exceeds its own shard by less than half the file
    (building the whole model first, as before, costs at least the whole file more)."""
    big = tmp_path / "big"
    subprocess.run([sys.executable, str(ROOT / "benchmarks/sharded_load.py"), "make", str(big),
                    "--gib", "2"], check=True, capture_output=True, timeout=300)  # fmt: skip
    size = (big / "model.safetensors").stat().st_size
    assert size > 1.9 * 2**30
    cfg = {"run_dir": str(tmp_path / "r"), "data": {"train": [str(tmp_path)]},
           "model": {"source": "local", "path": str(big)}, "lora": {"enable": True, "rank": 8},
           "ttt": {"layers": "top:2", "kind": "mlp"}}  # fmt: skip
    TrainConfig.from_dict(cfg).to_yaml(tmp_path / "big.yaml")
    (rank0, rank1), = _sharded_load(str(tmp_path / "big.yaml"), "--batch-mib", "128",
                                    str(tmp_path / "out.json"))  # fmt: skip
    above_shard = rank0["peak_rss"] - rank0["rss_before"] - rank0["shard_bytes"]
    assert above_shard < 0.5 * size, (above_shard / 2**20, rank0)
    assert rank0["shard_bytes"] < 0.6 * size and rank1["weights_opened"] == 0


@pytest.mark.slow
def test_a_bad_base_file_stops_every_rank_with_its_name(toy, tmp_path):
    """Rank 0 checks the file's names and shapes before any batch is sent; both ranks stop
    with its message (file and key) and exit 2."""
    from safetensors.torch import save_file

    ckpt = _local_checkpoint(tmp_path / "ckpt")
    state = load_file(str(ckpt / "model.safetensors"))
    state.pop("transformer.layers.2.self_attn.out_projs.0.weight")
    save_file(state, str(ckpt / "model.safetensors"))
    cfg = config(tmp_path / "x", toy, model={"source": "local", "path": str(ckpt)})
    cfg.to_yaml(tmp_path / "cfg.yaml")
    proc = _torchrun2(tmp_path / "cfg.yaml")
    assert proc.returncode != 0
    message = f"{ckpt / 'model.safetensors'} lacks 'transformer.layers.2.self_attn.out_projs.0"
    assert proc.stderr.count(message) == 2, proc.stderr[-3000:]
    assert "exitcode  : 2" in proc.stderr and "[rank0]: Traceback" not in proc.stderr
