"""Exceptions the command line reports as one line (no traceback)."""


class TrainingStopped(RuntimeError):
    """A run stopped on purpose (non-finite steps, bad data); its last checkpoint is kept."""
