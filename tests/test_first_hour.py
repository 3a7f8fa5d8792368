"""A new user's first hour, on the tiny model (install assumed): the README's path, command by
command, failing on any traceback and on any printed advice that names an option the command
it advises does not have.

demo --quick -> study --quick on a text folder and on shards -> eval with the shipped memory ->
generate -> an interrupted train and the command it says continues it; and the README's
"Add the memory to your Moshi" Python snippet, run as written.
"""

from __future__ import annotations

import argparse
import re
import shlex
import wave
from pathlib import Path

import numpy as np
import yaml
from test_study import _shards_folder, _text_folder

from moshi_ttt.cli.app import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
NAMED_COMMAND = re.compile(r"moshi-ttt (?:train|eval \S+|\S+)")


def command_options() -> dict[str, set[str]]:
    """Every command's options (``eval long-context`` style names for nested ones)."""
    out: dict[str, set[str]] = {}

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        out[name] = set(parser._option_string_actions)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child_name, child in action.choices.items():
                    walk(child, f"{name} {child_name}".strip())

    walk(build_parser(), "")
    return out


def check_output(command: str, text: str, options: dict[str, set[str]]) -> None:
    """No traceback; every ``--option`` printed belongs to the command it is advice for (the
    one named on the same line as ``moshi-ttt CMD``, else the command that printed it)."""
    assert "Traceback" not in text, f"{command}: printed a traceback:\n{text[-3000:]}"
    for line in text.splitlines():
        target = command  # unless the line names a command: advice for that one
        for named in NAMED_COMMAND.findall(line):
            words = named.split()[1:]
            if " ".join(words) in options:
                target = " ".join(words)
            elif words[0] in options:
                target = words[0]
        known = options.get(target, set()) | options[""]
        for opt in OPTION.findall(line):
            if "=" in opt or opt in known:
                continue
            raise AssertionError(f"{command}: advice names {opt}, which `moshi-ttt {target}` "
                                 f"does not have:\n  {line}")  # fmt: skip


def run(argv: list[str], capsys, options, expect: int = 0) -> str:
    code = main(argv)
    got = capsys.readouterr()
    text = got.out + got.err
    name = argv[0] if argv[0] not in ("eval",) else " ".join(argv[:2])
    check_output(name, text, options)
    assert code == expect, f"moshi-ttt {shlex.join(argv)}: exit {code}\n{text[-3000:]}"
    return text


def _wav(path: Path, seconds: float = 2.0) -> Path:
    sr = 24000
    t = np.arange(int(sr * seconds)) / sr
    x = (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(sr), w.writeframes(x.tobytes())
    return path


def test_the_first_hour_walks_without_a_traceback(tmp_path, capsys, monkeypatch):
    options = command_options()
    demo = tmp_path / "demo"
    out = run(["demo", "--quick", "--out", str(demo)], capsys, options)
    assert "[--quick" in out and "report.md" in out

    texts, shards = _text_folder(tmp_path / "texts"), _shards_folder(tmp_path / "shards")
    base = str(demo / "base")
    out = run(["study", "--base", base, "--data", str(texts), "--quick", "--out",
               str(tmp_path / "s1")], capsys, options)  # fmt: skip
    assert "study plan" in out and "[--quick" in out
    run(["study", "--base", base, "--data", str(shards), "--quick", "--meta-steps", "0",
         "--out", str(tmp_path / "s2")], capsys, options)  # fmt: skip

    held_out = tmp_path / "s1" / "data" / "test"
    out = run(["eval", "long-context", str(held_out), "--base", base, "--memory", "e2e",
               "--out", str(tmp_path / "ev"), "--no-progress"], capsys, options)  # fmt: skip
    assert "negative: the memory helps" in out
    out = run(["generate", "--base", base, "--memory", "e2e", "--input",
               str(_wav(tmp_path / "u.wav")), "--output", str(tmp_path / "o.wav")], capsys,
              options)  # fmt: skip
    assert "end-to-end memory:" in out and "updates" in out

    # a text file named .wav gets one clear line naming it
    fake = tmp_path / "notes.wav"
    fake.write_text("not audio")
    out = run(["generate", "--base", base, "--input", str(fake), "--output",
               str(tmp_path / "o2.wav")], capsys, options, expect=2)  # fmt: skip
    assert str(fake) in out and "not an audio file we can read" in out

    # a training run interrupted before its first checkpoint, and the command that continues
    cfg = yaml.safe_load((ROOT / "configs" / "tiny_e2e.yaml").read_text())
    toy = tmp_path / "toy"
    run(["toy-data", str(toy)], capsys, options)
    cfg.update(run_dir=str(tmp_path / "run"), max_steps=4, ckpt_every=2, log_every=1,
               eval_every=0)  # fmt: skip
    cfg["data"]["train"] = [str(toy / "index.jsonl")]
    cfg["data"].pop("eval", None)
    config = tmp_path / "e2e.yaml"
    config.write_text(yaml.safe_dump(cfg))
    from moshi_ttt.train import trainer

    real_step = trainer.__dict__.get("_train_step")
    calls = {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # before the first checkpoint (step 2)
            raise KeyboardInterrupt
        return real_step(*a, **k)

    if real_step is None:
        raise AssertionError("trainer._train_step no longer runs a step: update this test")
    monkeypatch.setattr(trainer, "_train_step", interrupted)
    out = run(["train", str(config), "--no-progress"], capsys, options, expect=130)
    monkeypatch.undo()
    again = re.search(r"moshi-ttt (train [^\n`']+)", out)
    assert again, f"the interrupt did not say how to continue:\n{out}"
    run(shlex.split(again.group(1)), capsys, options)
    assert (tmp_path / "run" / "checkpoints").is_dir()


def test_the_readme_python_snippet_runs_as_written(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Add the memory to your Moshi") :]
    start = section.index("```python") + len("```python")
    snippet = section[start : section.index("```\n", start)]
    shards = _shards_folder(tmp_path / "shards", files=3, frames=40, text_card=64)  # tiny
    monkeypatch.chdir(tmp_path)
    snippet = snippet.replace('"data/shards"', repr(str(shards)))
    exec(compile(snippet, "README.md", "exec"), {})


def test_the_advice_check_catches_an_option_the_command_lacks():
    options = command_options()
    check_output("demo", "pass --force", options)
    check_output("demo", "see `moshi-ttt study --meta-steps`", options)  # advice for study
    with np.testing.assert_raises(AssertionError):
        check_output("demo", "use a shorter --seq-len", options)
    with np.testing.assert_raises(AssertionError):
        check_output("demo", "run moshi-ttt train CFG --quick", options)
