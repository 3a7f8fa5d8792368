"""The Hub out of reach: a repo id fails fast with one error naming the repo, the file and the
local-path alternative; ``serve --static moshi`` without the Hub starts with the API only."""

from __future__ import annotations

import time

import pytest

from moshi_ttt.cli import main
from moshi_ttt.cli import serve as serve_cli
from moshi_ttt.models import hub


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache and a fresh reachability probe."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(hub, "_probed", {})
    return tmp_path


def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _unreachable(monkeypatch):  # a port nothing listens on: the connection is refused
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")


@pytest.mark.parametrize("cut_off", [_offline, _unreachable], ids=["HF_HUB_OFFLINE", "refused"])
def test_base_repo_without_hub_fails_fast_with_the_local_alternative(
    empty_hub, monkeypatch, capsys, cut_off
):
    cut_off(monkeypatch)
    start = time.monotonic()
    code = main(["serve", "--base", "some/repo", "--static", "none", "--device", "cpu"])
    took = time.monotonic() - start
    err = capsys.readouterr().err
    assert code == 2
    assert took < 5, took
    assert "'config.json' of 'some/repo'" in err
    assert "huggingface-cli download some/repo" in err and "--base DIR" in err
    assert "Traceback" not in err and "Moshi 7B" not in err


def test_cached_config_names_the_missing_weights(empty_hub, monkeypatch):
    """Offline with config.json cached, the first missing file the repo's config names is the
    one reported (no network attempt, no 7B guess)."""
    _offline(monkeypatch)
    monkeypatch.setattr(hub, "cached", lambda repo, name: (
        empty_hub / "config.json" if name == "config.json" else None))  # fmt: skip
    (empty_hub / "config.json").write_text('{"moshi_name": "lm.safetensors"}')
    from moshi_ttt.models.sources import checkpoint_info

    with pytest.raises(hub.HubFileMissing, match="'lm.safetensors' of 'org/name'"):
        checkpoint_info("org/name")


def test_hub_file_reads_the_cache_first(empty_hub, monkeypatch):
    _offline(monkeypatch)
    cache = empty_hub / "hf" / "hub" / "models--org--ui"
    (cache / "refs").mkdir(parents=True)
    (cache / "refs" / "main").write_text("abc")
    (cache / "snapshots" / "abc").mkdir(parents=True)
    (cache / "snapshots" / "abc" / "dist.tgz").write_bytes(b"x")
    assert hub.hub_file("org/ui", "dist.tgz") == cache / "snapshots" / "abc" / "dist.tgz"
    with pytest.raises(hub.HubFileMissing, match="'other.tgz' of 'org/ui': HF_HUB_OFFLINE"):
        hub.hub_file("org/ui", "other.tgz")


@pytest.mark.parametrize("cut_off", [_offline, _unreachable], ids=["HF_HUB_OFFLINE", "refused"])
def test_serve_without_the_ui_serves_the_api_only(empty_hub, monkeypatch, capsys, cut_off):
    cut_off(monkeypatch)
    start = time.monotonic()
    assert serve_cli._static_dir("moshi") is None
    assert time.monotonic() - start < 5
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "'dist.tgz' of 'kyutai/moshi-artifacts'" in err and "/api/chat only" in err
    assert "--static DIR" in err and "--static none" in err
    assert serve_cli._static_dir("none") is None
    assert capsys.readouterr().err == ""
