"""Triton kernels (optional: need the `triton` package, the `gpu` extra). Import lazily through inrfmt.decode."""


def decode_triton(bank, indices, size, theta=None, **kwargs):
    """The fused Triton SIREN decoder; see inrfmt.kernels.siren_decode.decode_triton."""
    from .siren_decode import decode_triton as _decode_triton

    return _decode_triton(bank, indices, size, theta, **kwargs)


__all__ = ["decode_triton"]
