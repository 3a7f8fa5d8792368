"""Talk to Moshi with its TTT memory live, through moshi's own websocket protocol
(``moshi-ttt serve``; see docs/serving.md)."""

from pathlib import Path

from .engine import Engine, load_ttt_state, ttt_state
from .memory_stats import MemoryStats
from .server import ChatServer, ServeConfig, ServerThread
from .sessions import SessionStore

WEB_DIR = Path(__file__).parent / "web"  # the web page served by default (``--static``)

__all__ = [
    "WEB_DIR",
    "ChatServer",
    "Engine",
    "MemoryStats",
    "ServeConfig",
    "ServerThread",
    "SessionStore",
    "load_ttt_state",
    "ttt_state",
]
