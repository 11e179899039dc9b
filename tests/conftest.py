"""Shared pytest setup. The repository root goes on sys.path so tests can import helpers as
`tests.<module>` (e.g. `from tests.badfiles import make_bad_input_folder`) however pytest is started."""

import os
import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

# Triton 3.9 warns once that its FP-fusion default will change; pin today's default (what the GPU script uses).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
