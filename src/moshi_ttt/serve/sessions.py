"""Saved conversations: a session's TTT state on disk under an unguessable token.

A token is ``secrets.token_urlsafe(32)`` (256 bits), issued by ``POST /api/sessions``. Its state
is written to ``<dir>/<sha256(token)>.safetensors`` (the token itself is never stored), with the
token's hash in the file's metadata, checked again on load: a state is only ever loaded for the
token that saved it. States expire ``ttl_s`` after they were saved; when the directory holds more
than ``max_bytes``, the oldest states are deleted first (a single state larger than the limit is
not saved). Files are written atomically (temporary file, then rename).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import threading
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

log = logging.getLogger("moshi_ttt.serve")
SUFFIX = ".safetensors"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """One sha256 over every tensor's name, dtype, shape and bytes (sorted by name)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class SessionStore:
    """Issue tokens; save, load, expire and size-limit the TTT states saved under them."""

    def __init__(self, root: str | Path, ttl_s: float = 24 * 3600, max_bytes: int = 1 << 30):
        if not ttl_s > 0:
            raise ValueError(f"session expiry must be > 0 seconds, got {ttl_s}")
        if max_bytes < 1:
            raise ValueError(f"session store size limit must be >= 1 byte, got {max_bytes}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.ttl_s, self.max_bytes = float(ttl_s), int(max_bytes)
        self._issued: dict[str, float] = {}  # token hash -> time issued
        self._lock = threading.Lock()

    def issue(self) -> str:
        """A new token (nothing saved under it yet)."""
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._issued[token_hash(token)] = time.time()
        return token

    def path(self, token: str) -> Path:
        return self.root / f"{token_hash(token)}{SUFFIX}"

    def known(self, token: str) -> bool:
        """Issued by this server and not expired, or has a saved, unexpired state."""
        h = token_hash(token)
        now = time.time()
        with self._lock:
            issued = self._issued.get(h)
        if issued is not None and now - issued < self.ttl_s:
            return True
        p = self.root / f"{h}{SUFFIX}"
        return p.is_file() and now - p.stat().st_mtime < self.ttl_s

    def save(self, token: str, tensors: dict[str, torch.Tensor], meta: dict) -> Path | None:
        """Write the state of ``token``; returns its path, or None when it exceeds the limit."""
        h = token_hash(token)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if size > self.max_bytes:
            log.warning("session state of %d bytes exceeds the store limit; not saved", size)
            return None
        path = self.root / f"{h}{SUFFIX}"
        tmp = path.with_suffix(f".tmp{os.getpid()}.{threading.get_ident()}")
        metadata = {"token_sha256": h, "saved_at": repr(time.time()), "meta": json.dumps(meta),
                    "tensors_sha256": tensors_sha256(tensors)}  # fmt: skip
        save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
        with self._lock:
            self._issued[h] = time.time()  # the token lives as long as its state
        self.prune(keep=path)
        return path

    def load(self, token: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        """``(tensors, meta)`` saved under ``token``, or None (nothing saved, or expired)."""
        path = self.path(token)
        if not path.is_file():
            return None
        if time.time() - path.stat().st_mtime >= self.ttl_s:
            path.unlink(missing_ok=True)
            return None
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        if metadata.get("token_sha256") != token_hash(token):
            raise ValueError(f"{path}: saved for another session token; refusing to load it")
        tensors = load_file(str(path))
        recorded = metadata.get("tensors_sha256")
        if recorded is not None and tensors_sha256(tensors) != recorded:
            raise ValueError(f"{path}: its tensor bytes differ from the sha256 recorded when it "
                             "was saved (damaged since); the session's memory is lost")  # fmt: skip
        return tensors, json.loads(metadata.get("meta", "{}"))

    def prune(self, keep: Path | None = None) -> int:
        """Delete expired states, then the oldest until the total fits; returns files deleted."""
        now, deleted = time.time(), 0
        files = []
        for p in self.root.glob(f"*{SUFFIX}"):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            if now - st.st_mtime >= self.ttl_s and p != keep:
                p.unlink(missing_ok=True)
                deleted += 1
            else:
                files.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files, key=lambda f: (f[2] == keep, f[0])):
            if total <= self.max_bytes:
                break
            if p == keep:
                continue
            p.unlink(missing_ok=True)
            total -= size
            deleted += 1
        with self._lock:
            for h, issued in list(self._issued.items()):
                if now - issued >= self.ttl_s:
                    del self._issued[h]
        return deleted
