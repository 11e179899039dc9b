"""Shared pytest setup. The repository root goes on sys.path so tests can import helpers as
`tests.<module>` (e.g. `from tests.badfiles import make_bad_input_folder`) however pytest is started."""

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
