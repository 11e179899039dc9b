"""Triton kernels (optional: need the `triton` package, the `gpu` extra). Import lazily through inrfmt.decode.

`decode_triton`, `supports` and `check_device` are inrfmt.kernels.siren_decode's, imported (with triton) on
first access.
"""

_LAZY = ("decode_triton", "supports", "check_device")


def __getattr__(name):
    if name in _LAZY:
        from . import siren_decode

        value = getattr(siren_decode, name)
        globals()[name] = value  # later accesses are plain attribute reads
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_LAZY)
