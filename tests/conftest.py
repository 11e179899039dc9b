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

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_silent_triton_fallback(request):
    """On CUDA, decode() falls back to the torch path for good when the triton kernel fails (with a warning).
    A GPU test must not pass that way: it would compare torch with torch. Fail the test that triggered it."""
    yield
    if request.node.get_closest_marker("gpu") is not None:
        import inrfmt.decode as decode_mod

        failed = decode_mod._auto_triton_failed
        assert failed is None, f"the triton decoder fell back to torch: {failed}"
