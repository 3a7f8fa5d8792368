"""Test-suite settings.

- moshi's lazy torch.compile costs minutes on CPU, so tests stay eager;
- one intra-op thread: the tests use tiny tensors, and two OpenMP threads on a loaded 2-core
  machine stall for ~0.5 s per op (measured), which made some files 7x slower.
"""

import os

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
