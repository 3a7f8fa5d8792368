"""The command-line shell: user errors are one line on stderr with exit code 2, no traceback."""

from __future__ import annotations

import pytest

from moshi_ttt.cli import main


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "demo" in capsys.readouterr().out


def test_unknown_command_is_rejected(capsys):
    with pytest.raises(SystemExit) as e:
        main(["tranin"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
