"""Model files on disk: safetensors and JSON only, checked before they are opened.

Every weights file a model names (LM, Mimi, LoRA, adapters, trained parameters) goes through
``check_safetensors`` (suffix, then header and size) before it is read, and moshi's
``torch.load`` fallback is disabled while moshi loads (``no_pickle_loads``): a pickle is refused
unexecuted. ``read_local`` copies a stored tensor into a parameter or into this rank's rows of
an FSDP2 shard (``local_rows``), so no rank reads a whole sharded tensor.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

SAFETENSORS_SUFFIXES = (".safetensors", ".sft", ".sfts")  # what moshi reads as safetensors
MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header


@contextlib.contextmanager
def no_pickle_loads() -> Iterator[None]:
    """While inside, ``torch.load`` refuses to run (moshi's loaders fall back to it for
    non-safetensors files): a pickle is never executed, whatever the environment says."""
    original = torch.load

    def refuse(f: Any, *args: Any, **kwargs: Any) -> Any:
        raise ValueError(f"{f}: refusing to unpickle it; moshi-ttt loads safetensors files only")

    torch.load = refuse  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.load = original  # type: ignore[assignment]


def require_file(path: Path, what: str) -> Path:
    """``path`` if it is a file, else ``FileNotFoundError`` naming it and what it should be."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return Path(path)


def read_json(path: Path) -> Any:
    """Parse a JSON file; a missing file or bad JSON is an error naming the file."""
    require_file(path, "JSON file")
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def check_tensors(
    expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], file: str
) -> None:
    """Same keys and shapes, else a ``ValueError`` naming the first bad key and both shapes."""
    for name in _natural_sorted(set(expected) | set(found)):
        if name not in found:
            raise ValueError(f"{file} lacks {name!r} (shape {list(expected[name].shape)})")
        if name not in expected:
            raise ValueError(
                f"{file} has {name!r} (shape {list(found[name].shape)}), "
                "which the model does not have"
            )
        if tuple(found[name].shape) != tuple(expected[name].shape):
            raise ValueError(
                f"shape mismatch for {name!r}: {list(found[name].shape)} in {file}, "
                f"{list(expected[name].shape)} in the model"
            )


def safetensors_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a complete safetensors file (None if it is): its 8-byte header
    length, JSON header and size are checked; tensor data is not read, nothing is unpickled."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > min(size - 8, MAX_HEADER):
                return f"{size} bytes, no safetensors header (truncated, or another format)"
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "the header is not JSON (not a safetensors file)"
    except OSError as e:
        return f"cannot read it ({e.strerror or e})"
    if not isinstance(header, dict):
        return "the header is not a JSON object (not a safetensors file)"
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                  default=0)  # fmt: skip
    except (TypeError, KeyError, IndexError, ValueError):
        return "malformed safetensors header (no data_offsets)"
    if 8 + n + end != size:
        return f"{size} bytes but its header describes {8 + n + end} (truncated or corrupt)"
    return None


def check_safetensors_suffix(path: str | Path, what: str) -> Path:
    """``path`` if its suffix is a safetensors one, else a ``ValueError`` naming it (the file
    is not opened: a pickle is never read)."""
    p = Path(path)
    if p.suffix not in SAFETENSORS_SUFFIXES:
        raise ValueError(
            f"{what} {p}: not a safetensors file (expected {'/'.join(SAFETENSORS_SUFFIXES)}); "
            "moshi-ttt never loads pickled weights (.pt, .pth, .bin, .ckpt): convert it to "
            "safetensors first"
        )
    return p


def check_safetensors(path: str | Path, what: str) -> Path:
    """``path`` if it names a complete safetensors file, else a ``ValueError`` naming it:
    another suffix (``.pt``, ``.bin``, ...) is refused before the file is opened; then the
    header and size are checked (``safetensors_problem``). A missing file is a
    ``FileNotFoundError``."""
    p = check_safetensors_suffix(path, what)
    require_file(p, what)
    problem = safetensors_problem(p)
    if problem is not None:
        raise ValueError(f"{p}: not a readable safetensors file ({what}): {problem}")
    return p


def load_safetensors(
    path: Path, device: torch.device | str = "cpu", what: str = "weights"
) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (``check_safetensors`` first); an unreadable file is
    a ``ValueError`` naming it."""
    check_safetensors(path, what)
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({what}): {e}") from e


@contextlib.contextmanager
def open_safetensors(file: Path, what: str) -> Iterator[Any]:
    """``safe_open`` (CPU) with its errors as a ``ValueError`` naming the file."""
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            yield f
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file}: not a readable safetensors file ({what}): {e}") from e


def tensor_shapes(path: Path, what: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a meta tensor of its shape (for ``check_tensors``),
    from the header only (``check_safetensors`` first; no tensor data is read)."""
    check_safetensors(path, what)
    with open_safetensors(path, what) as f:
        return {n: torch.empty(f.get_slice(n).get_shape(), device="meta") for n in f.keys()}  # noqa: SIM118


def row_sharded(t: torch.Tensor) -> bool:
    """A DTensor sharded on dim 0 over a 1-D mesh (FSDP2's layout), torch.chunk rows."""
    return isinstance(t, DTensor) and t.dim() > 0 and tuple(t.placements) == (Shard(0),)


def local_rows(t: torch.Tensor) -> tuple[int, int]:
    """``(start, end)``: the rows of the whole tensor this rank holds (all of a plain tensor)."""
    if not row_sharded(t):
        return 0, t.shape[0] if t.dim() else 0
    n, world = t.shape[0], t.device_mesh.size()
    chunk = -(-n // world)
    start = min(n, t.device_mesh.get_local_rank() * chunk)
    return start, min(n, start + chunk)


def read_local(f: Any, name: str, dst: torch.Tensor) -> None:
    """Copy tensor ``name`` of the open file ``f`` into ``dst``: only the rows this rank holds
    when ``dst`` is an FSDP shard (a rank never reads the whole tensor)."""
    start, end = local_rows(dst)
    if isinstance(dst, DTensor):
        local = dst.to_local()
        if end - start != (local.shape[0] if local.dim() else 0) or local.dim() == 0:
            local.copy_(distribute_tensor(f.get_tensor(name).to(local.device, local.dtype),
                                          dst.device_mesh, dst.placements).to_local())  # fmt: skip
            return
        if end > start:
            local.copy_(f.get_slice(name)[start:end].to(device=local.device, dtype=local.dtype))
        return
    dst.copy_(f.get_tensor(name).to(device=dst.device, dtype=dst.dtype))


def _natural_sorted(names: set[str]) -> list[str]:
    """Sort with numbers by value (layers.2 before layers.10)."""
    return sorted(
        names, key=lambda s: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s)]
    )


# -- every byte checked -------------------------------------------------------------------------
CHUNK = 1 << 20  # bytes per read while hashing
MANIFEST = "manifest.json"  # a directory's files and their sha256, written last
_DIGESTS: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | Path, cache: bool = True) -> str:
    """The sha256 (hex) of a file, read in ``CHUNK``-byte pieces; cached per path, size and
    modification time unless ``cache`` is False (checking bytes against a manifest)."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if not cache or key not in _DIGESTS:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def write_manifest(directory: str | Path, names: list[str]) -> Path:
    """Write ``directory/manifest.json``: the sha256 and size of each of ``names`` (files in
    ``directory``), atomically (a temporary file renamed), after the files themselves."""
    directory = Path(directory)
    files = {n: {"sha256": sha256_file(directory / n, cache=False),
                 "bytes": (directory / n).stat().st_size} for n in sorted(set(names))}  # fmt: skip
    tmp = directory / f".{MANIFEST}.tmp{os.getpid()}"
    tmp.write_text(json.dumps({"files": files}, indent=1) + "\n")
    os.replace(tmp, directory / MANIFEST)
    return directory / MANIFEST


def manifest_problem(directory: str | Path) -> str | None:
    """Why ``directory``'s files do not match its manifest (None: they match, or there is no
    manifest, as in directories written before manifests): names the first file whose bytes
    differ from the recorded sha256. A missing file is left to the loader that needs it (its
    message says what the file is)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{path}: unreadable manifest ({e})"
    for name, entry in files.items():
        f = directory / name
        if f.is_file() and sha256_file(f, cache=False) != entry.get("sha256"):
            return (f"{f}: its bytes differ from the sha256 recorded in {MANIFEST} when it was "
                    "written (changed or damaged since)")  # fmt: skip
    return None
