"""The real-data corpus reader: byte tokens, hash splits stable across reruns and caps, non-text
and unreadable files skipped and counted, clear errors for unusable --data, shards corpora."""

from __future__ import annotations

import json
import os

import pytest
import torch

from moshi_ttt.data.files import DataError
from moshi_ttt.data.pipeline import ShardSource
from moshi_ttt.demo.corpus import (
    TOKEN_OFFSET,
    CorpusSpec,
    bytes_to_codes,
    codes_to_bytes,
    is_text,
    read_corpus,
    split_of,
)

SPEC = CorpusSpec(frames=32, val_fraction=0.2, test_fraction=0.2, max_sequences_per_file=2)


def make_tree(root, n: int = 40, size: int = 80) -> None:
    for i in range(n):
        d = root / f"pkg{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"mod{i}.py").write_text(f"# module {i}\n" + "x = 1\n" * (size // 6))


def split_names(out) -> dict[str, set[str]]:
    return {s: {f["path"].split("#")[0] for f in ShardSource(out / s).files}
            for s in ("train", "val", "test")}  # fmt: skip


def test_bytes_round_trip_and_rows():
    data = "héllo\n".encode()
    codes = bytes_to_codes(data)
    assert codes.shape == (17, len(data)) and codes.dtype == torch.int32
    assert int(codes[0, 0]) == data[0] + TOKEN_OFFSET and bool((codes[1:] == -1).all())
    assert codes_to_bytes(codes) == data
    assert is_text(data) and not is_text(b"a\x00b") and not is_text(b"\xff\xfe")


def test_split_is_a_function_of_the_path_and_stable(tmp_path):
    assert split_of("a/b.py", 0.1, 0.1) == split_of("a/b.py", 0.1, 0.1)
    splits = [split_of(f"f{i}", 0.1, 0.1) for i in range(2000)]
    assert 0.07 < splits.count("test") / 2000 < 0.13 and 0.07 < splits.count("val") / 2000 < 0.13
    root = tmp_path / "src"
    make_tree(root)
    s1 = read_corpus(root, SPEC, tmp_path / "o1")
    s2 = read_corpus(root, SPEC, tmp_path / "o2")
    assert s1.to_dict()["sequences"] == s2.to_dict()["sequences"]
    a, b = split_names(tmp_path / "o1"), split_names(tmp_path / "o2")
    assert a == b and all(a.values())
    for split, names in a.items():
        assert all(split_of(n, 0.2, 0.2) == split for n in names)
    # a cap keeps every kept file in its split (a stable subset)
    capped = read_corpus(root, CorpusSpec(**{**SPEC.__dict__, "max_files": 30}), tmp_path / "o3")
    assert "max_files" in capped.capped and "30 of 40" in capped.text()
    c = split_names(tmp_path / "o3")
    assert all(c[s] <= a[s] for s in c)
    # sequences: at most max_sequences_per_file, each `frames` bytes of the file
    src = ShardSource(tmp_path / "o1" / "train")
    name, k = src.files[0]["path"].split("#")
    data = (root / name).read_bytes()
    assert codes_to_bytes(src.codes(0)) == data[int(k) * 32 : (int(k) + 1) * 32]
    assert max(int(f["path"].split("#")[1]) for f in src.files) <= 1


def test_non_text_short_and_unreadable_files_are_skipped_and_counted(tmp_path):
    root = tmp_path / "src"
    make_tree(root)
    (root / "blob.bin").write_bytes(b"\x00\x01" * 100)
    (root / "latin1.txt").write_bytes(b"caf\xe9 " * 40)
    (root / "short.txt").write_text("tiny")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "x.pyc").write_bytes(b"\x00" * 100)
    locked = root / "locked.txt"
    locked.write_text("y" * 100)
    os.chmod(locked, 0)
    s = read_corpus(root, SPEC, tmp_path / "out")
    assert s.skipped["not_text"] == 2 and s.skipped["too_short"] == 1
    assert "__pycache__/x.pyc" not in json.dumps(s.to_dict())  # cache folders not even listed
    if os.geteuid() != 0:  # root reads anything
        assert s.skipped["unreadable"] == 1
    assert "skipped" in s.text() and "not_text" in s.text()


@pytest.mark.parametrize("case", ["missing", "file", "empty", "binary", "short", "jsonl"])
def test_unusable_data_is_a_clear_error(tmp_path, case):
    root = tmp_path / "d"
    if case == "file":
        root.write_text("x" * 100)
    elif case == "empty":
        root.mkdir()
    elif case == "binary":
        root.mkdir()
        for i in range(20):
            (root / f"{i}.bin").write_bytes(b"\x00" * 100)
    elif case == "short":
        root.mkdir()
        for i in range(20):
            (root / f"{i}.txt").write_text("abc")
    elif case == "jsonl":
        root = tmp_path / "index.jsonl"
        root.write_text('{"path": "a.wav", "duration": 1.0}\n')
    with pytest.raises(DataError) as e:
        read_corpus(root, SPEC, tmp_path / "out")
    msg = str(e.value)
    assert str(root) in msg and "expected" in msg.lower() or "tokenize" in msg
    if case in ("binary", "short"):
        assert ("not_text" if case == "binary" else "too_short") in msg


def test_shards_corpus_is_split_and_cut(tmp_path):
    from moshi_ttt.demo.markov_task import MarkovTask, write_shards

    write_shards(tmp_path / "shards", MarkovTask(seq_len=70), 30, seed=0)
    s = read_corpus(tmp_path / "shards", SPEC, tmp_path / "out")
    assert s.kind == "shards" and sum(s.sequences.values()) == 60  # 2 sequences of 32 per file
    src = ShardSource(tmp_path / "out" / "train")
    assert src.codes(0).shape == (17, 32)


def test_spec_refuses_impossible_values():
    for bad in (
        {"frames": 1},
        {"val_fraction": 0.0},
        {"val_fraction": 0.6, "test_fraction": 0.5},
        {"max_files": 0},
    ):
        with pytest.raises(ValueError):
            CorpusSpec(**bad)
