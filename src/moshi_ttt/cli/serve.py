"""``moshi-ttt serve``: talk to Moshi (with its TTT memory) through moshi's websocket protocol.

    moshi-ttt serve --adapter DIR                   # our web page at http://localhost:8998
    moshi-ttt serve --tiny --static none --port 8998 --max-sessions 4
    moshi-ttt serve --tiny --static moshi           # moshi's web UI (from the Hub) instead
    python -m moshi.client --host localhost --port 8998

See docs/serving.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import schema
from ..models import hub
from ..schema import option
from .common import add_model_args, describe_model, load_model_from_args


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``serve`` subcommand on an ``add_subparsers()`` object."""
    p = subparsers.add_parser(
        "serve",
        help="serve Moshi (with TTT layers) over moshi's websocket protocol (web UI, client)",
        description="Serve /api/chat exactly as `python -m moshi.server` does (the moshi web UI "
        "and moshi.client connect unchanged), with up to --max-sessions conversations in one "
        "batched step, each with its own TTT memory; /api/stats; resumable sessions "
        "(POST /api/sessions, then /api/chat?session=TOKEN); and a web page at / to talk, "
        "resume a conversation and watch its memory learn (docs/serving.md).",
    )
    add_model_args(p)
    p.add_argument("--host", default="localhost", help="address to listen on (default localhost)")
    p.add_argument("--port", type=int, default=8998, help="port (default 8998, as moshi)")
    p.add_argument(
        "--static",
        metavar="DIR|moshi|none",
        help="the web page: default, this package's own (talk, resume a conversation, watch "
        "the memory; no download); DIR: a directory with an index.html; 'moshi': moshi's web "
        "UI from the Hub (kyutai/moshi-artifacts dist.tgz, as moshi.server; the API only when "
        "the Hub cannot be reached); 'none': the API only",
    )
    p.add_argument(
        "--max-sessions",
        type=int,
        default=4,
        help="conversations served at once, in one batch (default 4)",
    )
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        help="where resumable sessions' TTT states are saved (default: a temporary "
        "directory removed on exit)",
    )
    p.add_argument(
        "--snapshot-every",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="save each resumable conversation's memory this often while it is open, besides "
        "when it leaves, so a crash loses at most this much (default 30; 0: only on leave)",
    )
    p.add_argument(
        "--session-ttl",
        type=float,
        default=24 * 3600,
        metavar="SECONDS",
        help="a saved session expires this long after it was saved (default 1 day)",
    )
    p.add_argument(
        "--session-store-mb",
        type=float,
        default=1024,
        metavar="MB",
        help="size limit of --state-dir; oldest sessions deleted first (default 1024)",
    )
    p.add_argument(
        "--max-backlog",
        type=int,
        default=25,
        metavar="FRAMES",
        help="input frames waiting per session before the oldest are dropped",
    )
    p.add_argument(
        "--max-send-backlog",
        type=int,
        default=50,
        metavar="FRAMES",
        help="output frames a client may leave unread before it is disconnected",
    )
    p.add_argument(
        "--max-message-bytes",
        type=int,
        default=1 << 18,
        help="largest websocket message accepted (default 256 KiB)",
    )
    p.add_argument("--greedy", action="store_true", help="greedy decoding (no sampling)")
    p.add_argument("--temp", type=float, default=0.8, help="audio sampling temperature")
    p.add_argument("--temp-text", type=float, default=0.7, help="text sampling temperature")
    p.add_argument("--seed", type=int, default=42424242, help="sampling seed (as moshi.server)")
    p.add_argument("--verbose", action="store_true", help="log every frame's processing time")
    p.set_defaults(func=run_serve)
    return p


UI_REPO, UI_FILE = "kyutai/moshi-artifacts", "dist.tgz"  # moshi's built web UI


def _static_dir(static: str | None) -> str | None:
    """The directory of the web page: this package's page (``serve/web``) by default,
    ``--static DIR``, none for ``--static none``, or for ``--static moshi`` moshi's web UI from
    the Hub (or the local cache); when that cannot be had the server starts with the API only,
    after one line saying how to get a page."""
    if static is None:
        from ..serve import WEB_DIR

        return str(WEB_DIR)
    if static == "none":
        return None
    if static != "moshi":
        if not (Path(static) / "index.html").is_file():
            raise FileNotFoundError(f"--static {static}: no index.html in it")
        return static
    try:
        dist_tgz = hub.hub_file(UI_REPO, UI_FILE)
    except OSError as e:  # unreachable Hub (HubFileMissing) or huggingface_hub's errors
        first = " ".join(str(e).split(";")[0].split())
        print(
            f"moshi-ttt serve: no moshi web UI ({first}); serving /api/chat only. For a page "
            "leave --static out (this package's page) or pass --static DIR (a directory with "
            "an index.html); --static none starts API-only without this line",
            file=sys.stderr,
        )
        return None
    import tarfile

    dist = dist_tgz.parent / "dist"
    if not dist.exists():
        with tarfile.open(dist_tgz, "r:gz") as tar:
            tar.extractall(path=dist_tgz.parent, filter="data")
    return str(dist)


# ServeConfig fields whose flag is not ``--`` + the field name with dashes
_FLAGS = {"max_backlog_frames": "--max-backlog", "send_timeout_s": "--send-timeout"}


@dataclass
class ServerFlags:
    """The flags of the server around the engine (``ServeConfig`` has the engine's)."""

    port: int = option(8998, ge=1, le=65535)
    session_ttl: float = option(24 * 3600.0, gt=0)
    session_store_mb: float = option(1024.0, gt=0)

    def __post_init__(self) -> None:
        schema.validate(self)


def build_config(args: argparse.Namespace) -> Any:
    """The ``ServeConfig`` of the flags; a bad flag is a ``ValueError`` naming it (schema's
    message with the field renamed to its flag)."""
    from ..serve import ServeConfig

    try:
        ServerFlags(args.port, args.session_ttl, args.session_store_mb)
        return ServeConfig(
            max_sessions=args.max_sessions,
            max_message_bytes=args.max_message_bytes,
            max_backlog_frames=args.max_backlog,
            max_send_backlog=args.max_send_backlog,
            greedy=args.greedy,
            temp=args.temp,
            temp_text=args.temp_text,
            seed=args.seed,
            snapshot_every_s=args.snapshot_every,
        )
    except ValueError as e:
        key, sep, rest = str(e).partition(":")
        flag = _FLAGS.get(key, "--" + key.replace("_", "-"))
        raise ValueError(f"{flag}{sep}{rest}" if sep else str(e)) from None


def run_serve(args: argparse.Namespace) -> None:
    """Check the flags, load the model and codec, serve until interrupted."""
    import torch
    from aiohttp import web

    from ..models.load import load_codec
    from ..serve import ChatServer, SessionStore

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    config = build_config(args)
    static = _static_dir(args.static)
    loaded, device, dtype = load_model_from_args(args)
    lm = loaded.lm
    mimi, tokenizer = load_codec(loaded, device=device)
    print(describe_model(loaded, device, dtype))
    with tempfile.TemporaryDirectory(prefix="moshi-ttt-sessions-") as tmp:
        store = SessionStore(
            args.state_dir or tmp,
            ttl_s=args.session_ttl,
            max_bytes=int(args.session_store_mb * 2**20),
        )
        with torch.no_grad():
            server = ChatServer(lm, mimi, tokenizer, config, store, static=static)
            print(
                f"serving /api/chat at http://{args.host}:{args.port} "
                f"({config.max_sessions} sessions at most)",
                flush=True,
            )
            web.run_app(server.app(), host=args.host, port=args.port, print=None)
