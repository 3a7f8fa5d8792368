"""moshi-finetune data: index, text interleaving, windows, bad files, loader lanes, shards."""

from __future__ import annotations

import json
import math
import random
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import torch

from moshi_ttt.data.files import (
    BadFileCounter,
    DataError,
    ToyEncoder,
    ToyTokenizer,
    build_text_stream,
    encode_stereo,
    load_stereo,
    read_index,
)
from moshi_ttt.data.pipeline import (
    FRAME_SIZE,
    AudioSource,
    ShardSource,
    WindowLoader,
    cut_windows,
    frames_for_duration,
    open_source,
    tokenize_index,
)
from moshi_ttt.data.toy import WORDS, write_alignments, write_stereo, write_toy_dataset
from moshi_ttt.format import SAMPLE_RATE

P, E = 3, 0  # text PAD, EPAD
MAIN, OTHER = "SPEAKER_MAIN", "SPEAKER_OTHER"


class DictTokenizer:
    def __init__(self, table: dict[str, list[int]]) -> None:
        self.table = table

    def encode(self, text: str) -> list[int]:
        return list(self.table[text])


# -- helpers ----------------------------------------------------------------------------------
def make_dataset(root: Path, durations: list[float], bad: dict[str, str] | None = None) -> Path:
    """``root/index.jsonl`` with good stereo files of the given durations (+ bad ones by kind);
    every good file has the hand-made ``WORDS`` alignments."""
    index = write_toy_dataset(root, durations, bad)
    for line in index.read_text().splitlines():
        wav = root / json.loads(line)["path"]
        if wav.name.startswith("good_"):
            write_alignments(wav, WORDS)
    return index


def audio_source(index: Path, **kwargs) -> AudioSource:
    kw = {"min_duration_sec": 1.0, **kwargs}
    return AudioSource(read_index(index), ToyEncoder(card=32), ToyTokenizer(64), **kw)


# -- text interleaving ----------------------------------------------------------------------
def test_text_stream_hand_made_example():
    tok = DictTokenizer(
        {"hello": [10, 11, 12], "world": [20, 21], "user": [50], "big": [40, 41, 42, 43],
         "a": [30], "same": [1], "p": [60], "q": [70, 71], "big2": [80, 81, 82], "x": [],
         "late": [99]}
    )  # fmt: skip
    words = [
        ("world", (0.5, 0.7), MAIN),  # not sorted: sorted by start first
        ("hello", (0.0, 0.3), MAIN),  # frame 0: no EPAD before frame 0
        ("user", (0.65, 0.9), OTHER),  # another speaker: dropped
        ("big", (0.8, 1.0), MAIN),  # frame 10
        ("a", (0.9, 1.1), MAIN),  # frame 11: drops big's unfinished 42, 43; no EPAD
        ("same", (1.2, 1.2), MAIN),  # start == end: dropped
        ("p", (1.6, 1.7), MAIN),  # frame 20 ...
        ("q", (1.63, 1.8), MAIN),  # ... also frame 20: replaces p
        ("big2", (2.0, 2.3), MAIN),  # frame 25
        ("x", (2.1, 2.2), MAIN),  # frame 26: no tokens, drops big2's 81, 82
        ("late", (3.0, 3.1), MAIN),  # frame 37 >= 30 frames: never reached
    ]
    expected = [
        10, 11, 12, P, P, E, 20, 21, P, E,  # 0-9
        40, 30, P, P, P, P, P, P, P, E,  # 10-19
        70, 71, P, P, E, 80, P, P, P, P,  # 20-29
    ]  # fmt: skip
    assert build_text_stream(words, 30, tok) == expected


def _moshi_finetune_stream(words, num_frames, tokenizer, rate=12.5):
    """A transcription of moshi-finetune's Interleaver (keep_main_only, no delay, PAD in words)."""
    tokenized = [
        (tokenizer.encode(w.strip()), ts, s) for w, ts, s in sorted(words, key=lambda a: a[1][0])
    ]
    alignments = [a for a in tokenized if a[2] == MAIN]
    alignments = [a for a in alignments if a[1][0] < a[1][1]]
    text_tokens = [P] * num_frames
    i, stack, last_word_end = 0, deque(), -1
    for t in range(num_frames):
        while i < len(alignments) and alignments[i][1][0] * rate < t + 1:
            last_word_end = int(alignments[i][1][1] * rate)
            stack = deque(alignments[i][0])
            i += 1
        if stack:
            if t > 0 and text_tokens[t - 1] in [P, P]:
                text_tokens[t - 1] = E
            text_tokens[t] = stack.popleft()
        elif t <= last_word_end:
            text_tokens[t] = P
    return text_tokens


def test_text_stream_matches_moshi_finetune_on_random_alignments():
    tok = ToyTokenizer(64)
    rng = random.Random(0)
    for _ in range(200):
        words = []
        for _ in range(rng.randrange(0, 25)):
            start = rng.uniform(0, 6) if rng.random() > 0.1 else round(rng.uniform(0, 6), 2)
            end = start + rng.choice([0.0, -0.1, rng.uniform(0.01, 1.0)])
            word = "".join(rng.choice("abcdefgh") for _ in range(rng.randrange(0, 12)))
            words.append((word, (start, end), rng.choice([MAIN, MAIN, OTHER])))
        n = rng.randrange(1, 90)
        assert build_text_stream(words, n, tok) == _moshi_finetune_stream(words, n, tok)


# -- index, audio ---------------------------------------------------------------------------
def test_read_index_paths_and_errors(tmp_path):
    (tmp_path / "sub").mkdir()
    index = tmp_path / "sub" / "i.jsonl"
    index.write_text(
        '{"path": "a.wav", "duration": 1.5}\n\n{"path": "/abs/b.wav", "duration": 2}\n'
    )
    entries = read_index(index)
    assert [e.path for e in entries] == [tmp_path / "sub" / "a.wav", Path("/abs/b.wav")]
    assert [e.duration for e in entries] == [1.5, 2.0] and entries[1].where.endswith("i.jsonl:3")
    for line, what in [
        ("{not json", "not valid JSON"),
        ('{"duration": 1}', 'expected {"path"'),
        ('["a.wav", 1]', 'expected {"path"'),
        ('{"path": "a.wav"}', '"duration" must be a number'),
        ('{"path": "a.wav", "duration": -1}', '"duration" must be a number'),
    ]:
        index.write_text('{"path": "a.wav", "duration": 1}\n' + line + "\n")
        with pytest.raises(DataError, match=f"i.jsonl:2: {what}"):
            read_index(index)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_index(tmp_path / "nope.jsonl")


def test_load_stereo_resamples_to_24k(tmp_path):
    path = tmp_path / "a.wav"
    write_stereo(path, 1.5, seed=1, sr=16_000)
    wav = load_stereo(path)
    assert wav.shape == (2, 36_000) and wav.dtype == np.float32
    assert abs(wav[1].std() - 0.2) < 0.03 and abs(wav[0]).max() < 0.45  # channels kept apart


def test_file_codes_layout_and_windows_cover_the_file(tmp_path):
    index = make_dataset(tmp_path, [2.5])
    src = audio_source(index)
    codes = src.codes(0)
    wav = load_stereo(tmp_path / "good_0.wav")
    T = math.ceil(wav.shape[1] / FRAME_SIZE)
    assert codes.shape == (17, T) == (17, 32) and codes.dtype == torch.long
    enc = ToyEncoder(card=32).encode(torch.from_numpy(wav)[:, None])  # [2, 8, T]
    assert torch.equal(codes[1:9], enc[0]) and torch.equal(codes[9:], enc[1])
    words = [(w, tuple(ts), s) for w, ts, s in WORDS]
    assert codes[0].tolist() == build_text_stream(words, T, ToyTokenizer(64))

    frames = frames_for_duration(1.0)
    assert frames == 13
    windows = cut_windows(codes, frames, file_id=7)
    assert [w.index for w in windows] == [0, 1, 2] and {w.num_windows for w in windows} == {3}
    assert [w.num_frames for w in windows] == [13, 13, 6] and {w.file_id for w in windows} == {7}
    assert all(w.codes.shape == (17, frames) for w in windows)
    assert torch.equal(torch.cat([w.codes for w in windows], dim=1)[:, :T], codes)
    assert (windows[-1].codes[:, 6:] == -1).all()  # padding: zero token in every row


def test_missing_alignments_optional(tmp_path):
    index = make_dataset(tmp_path, [], bad={"n": "no_json"})
    with pytest.raises(Exception, match="alignments"):
        audio_source(index).codes(0)
    codes = audio_source(index, require_alignments=False).codes(0)
    assert (codes[0] == -1).all() and (codes[1:] >= 0).all()


# -- bad files ------------------------------------------------------------------------------
BAD = {
    "gone": "missing",
    "corrupt": "corrupt",
    "empty": "empty",
    "mono": "mono",
    "short": "short",
    "bad_json": "bad_json",
}


def test_bad_files_skipped_and_counted_by_reason(tmp_path):
    index = make_dataset(tmp_path, [2.0, 1.0, 3.1], bad=BAD)
    loader = WindowLoader(audio_source(index), frames=13, batch_size=2, loop=False, shuffle=False)
    batches = list(loader)
    seen = {(f, w) for b in batches for f, w in zip(b.file_ids, b.window_indices, strict=True)}
    assert {f for f, _ in seen} == {0, 1, 2}
    assert len(seen) == sum(b.codes.shape[0] for b in batches) == 2 + 1 + 3  # every window once
    stats = loader.stats
    assert stats.ok == 3 and stats.num_bad == 6
    assert stats.bad == {
        "missing": 1,
        "unreadable": 1,
        "empty": 1,
        "too_short": 1,
        "channels": 1,
        "alignments": 1,
    }
    assert stats.to_dict()["bad_channels"] == 1 and "mono.wav" in stats.examples["channels"][0]
    with pytest.raises(DataError, match=r"6 of 9 files are unusable"):
        stats.check(0.5)
    stats.check(0.7)
    # the loader itself stops once too many of the files seen are bad
    strict = WindowLoader(
        audio_source(index), frames=13, batch_size=1, loop=True, shuffle=False, max_bad_fraction=0.5
    )
    with pytest.raises(DataError, match="max_bad_fraction 50%"):
        for _ in strict:
            pass


def test_counter_counts_each_file_once_and_round_trips():
    c = BadFileCounter()
    c.record_ok("a")
    c.record_ok("a")
    c.record_bad("b", "missing", "no such file")
    c.record_bad("b", "missing", "no such file")
    assert (c.ok, c.num_bad, c.num_seen) == (1, 1, 2)
    c.check(0.5)
    c.check(0.1, total=10)  # 1 bad of a 10-file dataset: 10 %, not more
    with pytest.raises(DataError, match="1 of 9 files"):
        c.check(0.1, total=9)
    with pytest.raises(DataError):
        c.check(0.49)
    assert c.files == [{"name": "b", "reason": "missing", "detail": "no such file"}]
    d = BadFileCounter()
    d.load_state_dict(json.loads(json.dumps(c.state_dict())))
    assert d.to_dict() == c.to_dict()


def test_all_bad_training_set_stops_instead_of_spinning(tmp_path):
    index = make_dataset(tmp_path, [], bad={"a": "empty", "b": "mono"})
    loader = WindowLoader(audio_source(index), frames=13, batch_size=1, loop=True)
    with pytest.raises(DataError, match="no usable file"):
        next(iter(loader))


# -- loader: lanes, ranks, resume -----------------------------------------------------------
def _trace(batches) -> list[list[tuple[int, int, int, bool]]]:
    return [
        list(zip(b.lanes, b.file_ids, b.window_indices, b.reset.tolist(), strict=True))
        for b in batches
    ]


def test_lanes_feed_each_file_in_order(tmp_path):
    index = make_dataset(tmp_path, [2.0, 1.0, 3.5, 1.2, 2.6])
    src = audio_source(index)
    loader = WindowLoader(src, frames=13, batch_size=2, loop=False, shuffle=True, seed=1)
    batches = list(loader)
    per_lane: dict[int, list[tuple[int, int]]] = {}
    for row in (r for b in _trace(batches) for r in b):
        lane, fid, k, reset = row
        assert reset == (k == 0)
        per_lane.setdefault(lane, []).append((fid, k))
    per_file: dict[int, list[int]] = {}
    for lane_rows in per_lane.values():
        for (f0, k0), (f1, k1) in zip(lane_rows, lane_rows[1:], strict=False):
            assert (f1 == f0 and k1 == k0 + 1) or (f1 != f0 and k1 == 0)  # in order, no gap
        for fid, k in lane_rows:
            per_file.setdefault(fid, []).append(k)
    n_windows = {
        i: math.ceil(math.ceil(d * SAMPLE_RATE / FRAME_SIZE) / 13)
        for i, d in enumerate([2.0, 1.0, 3.5, 1.2, 2.6])
    }
    assert per_file == {i: list(range(n)) for i, n in n_windows.items()}
    # codes of each row are the file's window
    b = batches[0]
    for row, (fid, k) in enumerate(zip(b.file_ids, b.window_indices, strict=True)):
        assert torch.equal(b.codes[row], cut_windows(src.codes(fid), 13)[k].codes)


def test_ranks_split_files_and_prefetch_is_transparent(tmp_path):
    index = make_dataset(tmp_path, [1.1, 1.2, 1.3, 1.4, 1.5], bad={"m": "mono"})
    src = audio_source(index)
    files = []
    for rank in (0, 1):
        kw = dict(
            frames=13, batch_size=2, loop=False, shuffle=True, seed=4, rank=rank, world_size=2
        )
        plain = _trace(WindowLoader(src, **kw))
        assert _trace(WindowLoader(src, num_workers=2, **kw)) == plain
        files.append({f for b in plain for _, f, _, _ in b})
    assert files[0].isdisjoint(files[1]) and files[0] | files[1] == {0, 1, 2, 3, 4}
    with pytest.raises(DataError, match="rank 3 gets no file"):
        WindowLoader(
            audio_source(make_dataset(tmp_path, [1.1])),
            frames=13,
            batch_size=1,
            rank=3,
            world_size=4,
        )


def test_resume_continues_exactly(tmp_path):
    index = make_dataset(tmp_path, [2.0, 1.0, 3.5, 1.2], bad={"e": "empty"})
    src = audio_source(index)
    kw = dict(frames=13, batch_size=2, loop=True, shuffle=True, seed=2)
    reference = WindowLoader(src, **kw)
    it = iter(reference)
    full = [next(it) for _ in range(12)]  # several epochs
    first = WindowLoader(src, **kw)
    it = iter(first)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))  # JSON-safe
    resumed = WindowLoader(src, **kw)
    resumed.load_state_dict(state)
    it = iter(resumed)
    rest = [next(it) for _ in range(7)]
    assert _trace(rest) == _trace(full[5:])
    assert all(torch.equal(a.codes, b.codes) for a, b in zip(rest, full[5:], strict=True))
    assert resumed.stats.to_dict() == reference.stats.to_dict()
    assert resumed.stats.bad["empty"] == 1


# -- shards ---------------------------------------------------------------------------------
def test_shards_round_trip_equals_raw_path(tmp_path):
    index = make_dataset(tmp_path, [2.0, 1.4, 3.0], bad={"c": "corrupt", "s": "short"})
    out = tmp_path / "shards"
    stats = tokenize_index(
        index, out, ToyEncoder(card=32), ToyTokenizer(64), min_duration_sec=1.0, progress=False
    )
    assert stats.ok == 3 and stats.bad["unreadable"] == 1 and stats.bad["too_short"] == 1
    meta = json.loads((out / "shards.json").read_text())
    assert [f["frames"] for f in meta["files"]] == [25, 18, 38]
    assert sorted(s["reason"] for s in meta["skipped"]) == ["too_short", "unreadable"]

    shards = ShardSource(out)
    raw = audio_source(index)
    good = [i for i in range(len(raw)) if raw.entries[i].path.name.startswith("good")]
    for j, i in enumerate(good):
        assert torch.equal(shards.codes(j), raw.codes(i))
    kw = dict(frames=13, batch_size=2, loop=False, shuffle=False)
    raw_batches = list(
        WindowLoader(
            open_source([index], ToyEncoder(card=32), ToyTokenizer(64), min_duration_sec=1.0), **kw
        )
    )
    shard_batches = list(WindowLoader(open_source(out / "shards.json"), **kw))
    assert len(shard_batches) == len(raw_batches) == 5  # 2 + 2 + 3 windows on 2 lanes
    for a, b in zip(shard_batches, raw_batches, strict=True):
        assert torch.equal(a.codes, b.codes) and torch.equal(a.reset, b.reset)

    # a shard deleted afterwards is skipped and counted, not a crash
    (out / meta["files"][1]["shard"]).unlink()
    loader = WindowLoader(ShardSource(out), **kw)
    assert sum(b.codes.shape[0] for b in loader) == 2 + 3 and loader.stats.bad["missing"] == 1
    with pytest.raises(DataError, match="2 of 5 files"):
        tokenize_index(
            index,
            tmp_path / "again",
            ToyEncoder(),
            ToyTokenizer(),
            min_duration_sec=1.0,
            max_bad_fraction=0.2,
            progress=False,
        )


def test_concat_source_mixes_index_and_shards(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ia = make_dataset(tmp_path / "a", [1.1, 1.2])
    ib = make_dataset(tmp_path / "b", [1.3])
    tokenize_index(ib, tmp_path / "b_shards", ToyEncoder(), ToyTokenizer(), progress=False)
    src = open_source([ia, tmp_path / "b_shards"], ToyEncoder(), ToyTokenizer())
    assert len(src) == 3 and src.name(2).endswith("000000.safetensors")
    assert torch.equal(src.codes(2), audio_source(ib).codes(0))
    with pytest.raises(ValueError, match="needs an audio encoder"):
        open_source(ia)


def test_mimi_streaming_chunks_equal_one_call():
    """With a (random) Mimi, chunked streaming encoding gives the codes of one call."""
    from moshi.models import loaders
    from moshi.utils.compile import no_compile

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        mimi = loaders.get_mimi(None, device="cpu").eval()
    wav = torch.randn(2, FRAME_SIZE * 11 + 700).numpy() * 0.1
    with no_compile():
        whole = encode_stereo(mimi, wav)
        chunked = encode_stereo(mimi, wav, chunk_frames=5)
    assert whole.shape == (16, 12) and torch.equal(whole, chunked)
