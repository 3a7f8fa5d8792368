"""The demo's synthetic long-context task: determinism, shard format, statistics, oracle."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from moshi_ttt.data.pipeline import ShardSource, WindowLoader
from moshi_ttt.demo.markov_task import MarkovTask, write_shards


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    task = MarkovTask(num_symbols=8, seq_len=40)
    a = write_shards(tmp_path / "a", task, 3, seed=5)
    b = write_shards(tmp_path / "b", task, 3, seed=5)
    c = write_shards(tmp_path / "c", task, 3, seed=6)
    for name in ("000000.safetensors", "000001.safetensors", "000002.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "000000.safetensors").read_bytes() != (c / "000000.safetensors").read_bytes()
    # sequence i does not depend on how many sequences are written
    d = write_shards(tmp_path / "d", task, 1, seed=5)
    assert (a / "000000.safetensors").read_bytes() == (d / "000000.safetensors").read_bytes()


def test_shards_readable_by_shard_source_and_loader(tmp_path):
    task = MarkovTask(num_symbols=12, seq_len=50)
    out = write_shards(tmp_path / "shards", task, 4, seed=0)
    index = json.loads((out / "shards.json").read_text())
    assert index["task"]["num_symbols"] == 12 and index["seed"] == 0
    source = ShardSource(out)
    assert len(source) == 4 and source.frames == [50] * 4
    for i in range(4):
        codes = source.codes(i)
        assert codes.shape == (17, 50) and codes.dtype == torch.int64
        symbols, _ = task.sample(0, i)
        assert np.array_equal(task.symbols_of(codes), symbols)
        text = codes[0]
        assert int(text.min()) >= task.token_offset and int(text.max()) < task.text_card
        assert (codes[1:9] == -1).all()  # Moshi audio: no token, no loss
        assert (codes[9:] == codes[0] - task.token_offset).all()  # the user echoes the symbols
    batch = next(iter(WindowLoader(source, frames=50, batch_size=2, loop=False)))
    assert batch.codes.shape == (2, 17, 50) and batch.reset.all()


def test_no_echo_leaves_user_rows_empty():
    task = MarkovTask(num_symbols=8, seq_len=20, user_echo=False)
    codes = task.codes(task.sample(0, 0)[0])
    assert (codes[1:] == -1).all()


@pytest.mark.parametrize("k", [1, 2])
def test_transition_statistics(k):
    task = MarkovTask(num_symbols=10, num_successors=k, noise=0.25, seq_len=4000)
    symbols, table = task.sample(1, 0)
    assert table.shape == (10, k)
    assert all(len(set(row)) == k for row in table)
    follows = np.array([symbols[t] in table[symbols[t - 1]] for t in range(1, len(symbols))])
    # P(next in the successor set) = 1 - noise + noise * k / V
    expected = 1 - task.noise + task.noise * k / task.num_symbols
    assert abs(follows.mean() - expected) < 0.03
    counts = np.bincount(symbols, minlength=10)
    assert counts.min() > 0  # the jumps visit every symbol
    # two sequences have different tables
    assert not np.array_equal(task.sample(1, 1)[1], table)


def test_oracle_matches_a_direct_posterior():
    task = MarkovTask(num_symbols=5, num_successors=2, noise=0.3, seq_len=60)
    symbols, _ = task.sample(2, 0)
    nll = task.oracle_nll(symbols)
    assert nll[0] == pytest.approx(math.log(5))
    probs = task.transition_probs()  # [C(5,2), 5]
    assert probs.shape == (10, 5) and np.allclose(probs.sum(1), 1.0)
    for t in (1, 7, 33, 59):
        a = symbols[t - 1]
        like = np.ones(len(probs))
        for s in range(1, t):
            if symbols[s - 1] == a:
                like = like * probs[:, symbols[s]]
        pred = (like / like.sum()) @ probs
        assert nll[t] == pytest.approx(-math.log(pred[symbols[t]]), rel=1e-9)


def test_oracle_window():
    task = MarkovTask(num_symbols=16, num_successors=1, noise=0.2, seq_len=200)
    full = task.mean_oracle_nll(0, 8)
    win = task.mean_oracle_nll(0, 8, window=16)
    assert np.allclose(full, np.mean([task.oracle_nll(task.sample(0, i)[0]) for i in range(8)], 0))
    one = task.oracle_nll(task.sample(0, 0)[0], window=1)
    assert np.allclose(full[:16], win[:16])  # inside the window: the same predictor
    assert full[16:].mean() < 0.85 * win[16:].mean()  # a memory helps beyond it
    # window 1 sees no transition: the prior predictive (noise/V + (1-noise)/V = 1/V)
    assert np.allclose(one, math.log(16))
    # a noise-free chain is known after one visit: nll 0 once a transition was seen
    det = MarkovTask(num_symbols=4, num_successors=1, noise=0.0, seq_len=30)
    s, table = det.sample(0, 0)
    nll = det.oracle_nll(s)
    seen = {s[t - 1] for t in range(1, 10)}
    assert all(nll[t] < 1e-9 for t in range(10, 30) if s[t - 1] in seen)


def test_bad_parameters():
    with pytest.raises(ValueError, match="num_successors"):
        MarkovTask(num_symbols=4, num_successors=5)
    with pytest.raises(ValueError, match="noise"):
        MarkovTask(noise=1.5)
    with pytest.raises(ValueError, match="window"):
        MarkovTask().oracle_nll(np.zeros(3, dtype=np.int64), window=0)
