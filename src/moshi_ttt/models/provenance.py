"""What a report records about the model it measured: ``provenance(loaded)`` and its label.

The loaders in ``models.load`` note where each model's weights come from (``spec.Origin``:
the source, the run and the checkpoint actually chosen, the step, the weights files). Here
that becomes a JSON object with the sha256 of every weights file, and a one-line label
(``provenance_label``) such as ``run x @ step 40 (sha256 1a2b3c4d)``.

A file is hashed by streaming it in chunks, once per file version (path, size, mtime): a
second report on the same load does not read the weights again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .files import sha256_file
from .spec import LoadedModel, Origin

__all__ = ["sha256_file"]  # re-exported: provenance records it for every weights file


def origin_provenance(origin: Origin) -> dict[str, Any]:
    """``origin`` as a JSON object, each weights file with its sha256 and size (bytes)."""
    out: dict[str, Any] = {"kind": origin.kind, "name": origin.name}
    if origin.run_dir is not None:
        out["run_dir"] = origin.run_dir
    out["checkpoint_dir"] = origin.checkpoint_dir
    out["step"] = origin.step
    out["weights"] = [
        {"file": str(f), "sha256": sha256_file(f), "bytes": Path(f).stat().st_size}
        for f in origin.files
    ]
    if origin.note:
        out["note"] = origin.note
    if origin.base is not None:
        out["base"] = origin_provenance(origin.base)
    return out


def provenance(loaded: LoadedModel) -> dict[str, Any]:
    """The provenance of a loaded model (``origin_provenance`` of its ``origin``), with a
    ``label`` (``provenance_label``); a model without a recorded origin says so."""
    if loaded.origin is None:
        out: dict[str, Any] = {"kind": "unknown", "name": loaded.base, "weights": [],
                               "note": "loaded without a recorded origin"}  # fmt: skip
    else:
        out = origin_provenance(loaded.origin)
    out["label"] = provenance_label(out)
    return out


def provenance_label(p: dict[str, Any]) -> str:
    """One line naming a model by its provenance: ``run x @ step 40 (sha256 1a2b3c4d)``,
    ``tiny:0 (no weights file)``, ``adapter a on tiny:0 (sha256 ...)``."""
    kind, name = p.get("kind", "?"), str(p.get("name", "?"))
    if kind == "run":
        head = f"run {Path(p.get('run_dir') or name).name}"
        if p.get("step") is not None:
            head += f" @ step {p['step']}"
    elif kind in ("adapter", "export", "local"):
        head = f"{kind} {Path(p.get('checkpoint_dir') or name).name}"
    else:
        head = name
    weights = p.get("weights") or []
    if weights:
        head += " (sha256 " + ", ".join(w["sha256"][:8] for w in weights) + ")"
    elif kind == "tiny":
        head += " (no weights file)"
    base = p.get("base")
    if isinstance(base, dict) and kind == "adapter":
        head += f" on {provenance_label(base)}"
    return head
