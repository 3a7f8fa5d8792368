"""``make lint`` inside ``make test``: ruff's checks and formatting hold for every file CI sees
(a session once left ten files unformatted because only ``make test`` ran)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUFF = Path(sys.executable).parent / "ruff"  # installed with the dev extra, next to python


@pytest.mark.parametrize("args", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_ruff(args):
    assert RUFF.is_file(), f"{RUFF} missing: make install brings ruff with the dev extra"
    proc = subprocess.run([str(RUFF), *args, "src", "tests", "benchmarks"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]
