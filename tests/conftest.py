"""Test-suite settings: moshi's lazy torch.compile costs minutes on CPU, so tests stay eager."""

import os

os.environ.setdefault("NO_TORCH_COMPILE", "1")
