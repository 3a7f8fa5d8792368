"""``python -m moshi_ttt.cli ...`` (also under ``torchrun -m moshi_ttt.cli``)."""

import sys

from .app import main

sys.exit(main())
