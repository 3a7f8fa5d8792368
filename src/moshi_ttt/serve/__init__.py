"""Talk to Moshi with its TTT memory live, through moshi's own websocket protocol
(``moshi-ttt serve``; see docs/serving.md)."""

from .engine import Engine, load_ttt_state, ttt_state
from .server import ChatServer, ServeConfig, ServerThread
from .sessions import SessionStore

__all__ = [
    "ChatServer",
    "Engine",
    "ServeConfig",
    "ServerThread",
    "SessionStore",
    "load_ttt_state",
    "ttt_state",
]
