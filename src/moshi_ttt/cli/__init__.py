"""``moshi-ttt``: the command line. One module per command, each a thin shell over the library;
``app.main`` holds the one error boundary (``python -m moshi_ttt.cli`` runs it)."""

from .app import build_parser, main

__all__ = ["build_parser", "main"]
