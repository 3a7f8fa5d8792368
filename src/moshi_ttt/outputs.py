"""Output paths, checked before any expensive work; nothing a user made is replaced silently.

Every command checks where it will write *first* (before loading a model or reading data):

- ``check_output_dir(path, key)``: ``path`` is a directory or can be created as one (its first
  existing ancestor is a writable directory, not a file);
- ``check_output_file(path, key, force)``: the same for a file's directory; an existing file is
  refused unless ``force`` (an explicit ``--force``);
- ``check_no_clobber(path, key, names, force)``: refuse a directory that already holds one of
  ``names`` (a previous report, dataset, run) unless ``force``.

Errors are ``ValueError`` naming the key (``--out``, ``run_dir``, ...), the path and what was
expected.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def _first_existing(path: Path) -> Path:
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            return p
    return Path(".")


def check_output_dir(path: str | Path, key: str) -> Path:
    """``path`` as a ``Path`` if it is (or can be made) a writable directory, else a
    ``ValueError`` naming ``key``."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ValueError(f"{key} {p}: exists and is not a directory; expected a directory")
    anchor = _first_existing(p.absolute())
    if not anchor.is_dir():
        raise ValueError(
            f"{key} {p}: cannot create it, {anchor} is a file (expected a directory there)"
        )
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise ValueError(f"{key} {p}: {anchor} is not writable")
    return p


def check_output_file(path: str | Path, key: str, force: bool = False) -> Path:
    """``path`` as a ``Path`` if a file can be written there: its directory is (or can be made)
    writable, it is not a directory, and it does not exist unless ``force``."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise ValueError(f"{key} {p}: is a directory; expected a file path")
    check_output_dir(p.parent, key)
    if p.exists() and not force:
        raise ValueError(f"{key} {p}: exists; pass --force to replace it")
    return p


def existing(path: str | Path, names: Iterable[str]) -> list[str]:
    """The entries of ``names`` that exist in directory ``path``."""
    p = Path(path)
    return [n for n in names if (p / n).exists()] if p.is_dir() else []


def check_no_clobber(
    path: str | Path, key: str, names: Iterable[str], force: bool = False, what: str = "output"
) -> Path:
    """``check_output_dir``, then refuse a directory already holding one of ``names`` (a
    previous ``what``) unless ``force``."""
    p = check_output_dir(path, key)
    found = existing(p, names)
    if found and not force:
        raise ValueError(
            f"{key} {p}: already holds a {what} ({', '.join(found)}); pass --force to replace "
            "it, or choose another directory"
        )
    return p


def check_own_dir(path: str | Path, key: str, markers: Iterable[str], entries: Iterable[str],
                  force: bool = False, what: str = "output", note: str = "") -> Path:  # fmt: skip
    """``check_output_dir``, then accept a directory that is new, empty, or a previous ``what``
    (holding one of ``markers``, or only names among ``entries``); anything else is refused
    unless ``force`` (``note``: what the command replaces there)."""
    p = check_output_dir(path, key)
    if force or not p.is_dir():
        return p
    found = {e.name for e in p.iterdir()}
    if found and not found & set(markers) and not found <= set(entries):
        shown = ", ".join(sorted(found)[:5])
        raise ValueError(f"{key} {p}: not empty and not a previous {what} (holds {shown}); "
                         f"{note}choose another directory or pass --force")  # fmt: skip
    return p
