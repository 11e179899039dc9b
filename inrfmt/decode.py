"""Decoding images from a TensorBank: the torch reference path and the backend dispatch.

`decode(bank, indices, size, theta)` returns [B,3,h,w] pixels in [0,1] on the bank's device. The "torch"
backend is the reference (batched bmm over all images of the batch, float32) and the CPU fallback; the
"triton" backend (inrfmt.kernels) is one fused kernel launch and is chosen automatically on CUDA.
"""
from __future__ import annotations

import functools
import warnings

import torch

from . import siren
from .bank import TensorBank
from .decode_args import parse_size, pixel_stride, prepare_indices, prepare_out, prepare_theta
from .device import triton_interpreted
from .errors import InrUsageError

BACKENDS = ("torch", "triton")

# Elements of one activation tensor [B, pixels, W] the torch path materializes at a time (64 MiB of float32).
_TORCH_CHUNK_ELEMENTS = 1 << 24


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when triton can be imported (it is optional: the `gpu` extra)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# Set when the automatically chosen triton backend failed on this machine (e.g. a GPU triton cannot
# compile for): later automatic choices use the torch path instead of failing every batch.
_auto_triton_failed: str | None = None


def default_backend(bank: TensorBank) -> str:
    """"triton" on CUDA when triton is importable, works here and supports the net, else "torch"."""
    if bank.device.type == "cuda" and triton_available() and _auto_triton_failed is None:
        from . import kernels

        if kernels.supports(bank.arch):
            return "triton"
    return "torch"


# -- the torch reference ------------------------------------------------------------------------------
def decode_torch(bank: TensorBank, indices, size, theta=None, *, out=None, dtype=torch.float32) -> torch.Tensor:
    """Reference decoder: [B,3,h,w] pixels in [0,1], float32 maths, batched over images.

    The batch's weights are gathered and dequantized once ([B,H,W,W] float32, small); pixels are processed
    in chunks so the [B, pixels, W] activations stay bounded whatever the output size.
    """
    h, w = parse_size(size)
    idx = prepare_indices(bank, indices)
    batch = idx.numel()
    theta = prepare_theta(theta, batch, bank.device)
    out = prepare_out(out, batch, h, w, dtype, bank.device)
    if batch == 0:
        return out
    out_pixels = _pixel_view(out)
    params = bank.params(idx)
    coords = siren.pixel_grid(h, w, device=bank.device)
    width = max(bank.arch.width, 3)
    step = max(1, _TORCH_CHUNK_ELEMENTS // (batch * width))
    with torch.no_grad():
        for p0 in range(0, h * w, step):
            c = siren.transform_coords(coords[p0:p0 + step], theta)
            raw = siren.forward(params, c, bank.arch)
            out_pixels[:, p0:p0 + step].copy_(siren.to_pixels(raw))
    return out


def _pixel_view(out: torch.Tensor) -> torch.Tensor:
    """[B, h*w, 3] view sharing out's memory (raises unless its pixels are evenly spaced: pixel_stride)."""
    b, _, h, w = out.shape
    return out.as_strided((b, h * w, 3), (out.stride(0), pixel_stride(out), out.stride(1)))


# -- dispatch -----------------------------------------------------------------------------------------
def decode(bank: TensorBank, indices, size, theta=None, *, backend=None, out=None,
           dtype=torch.float32) -> torch.Tensor:
    """Decode images `indices` of `bank` at `size` ((h, w) or int) -> [B,3,h,w] in [0,1] on the bank's device.

    theta [B,2,3]: per-image affine maps of the sampling grid (affine_grid convention), None = identity.
    backend: None (triton on CUDA when importable, else torch), "torch" or "triton". out: a buffer of shape
    [B,3,h,w], `dtype`, on the bank's device (contiguous or channels_last) to write into and return.
    """
    if backend is None:
        backend = default_backend(bank)
        if backend == "triton":
            return _decode_auto_triton(bank, indices, size, theta, out=out, dtype=dtype)
    if backend == "torch":
        return decode_torch(bank, indices, size, theta, out=out, dtype=dtype)
    if backend == "triton":
        _require_triton()
        from .kernels import decode_triton  # checks the device itself

        return decode_triton(bank, indices, size, theta, out=out, dtype=dtype)
    raise InrUsageError(f"unknown decode backend {backend!r}: expected one of {', '.join(BACKENDS)}")


def _decode_auto_triton(bank, indices, size, theta, *, out, dtype):
    """The automatic choice on CUDA: the kernel, falling back to torch (with one warning) if it cannot run."""
    global _auto_triton_failed
    from .kernels import decode_triton

    try:
        return decode_triton(bank, indices, size, theta, out=out, dtype=dtype)
    except (InrUsageError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as exc:  # compile/launch failure of the optional backend: keep training on the torch path
        _auto_triton_failed = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"inrfmt: the triton decoder failed on this machine ({_auto_triton_failed}); "
                      "using the torch decoder from now on (pass backend='triton' to see the error)",
                      RuntimeWarning, stacklevel=3)
        return decode_torch(bank, indices, size, theta, out=out, dtype=dtype)


def _require_triton() -> None:
    if not triton_available():
        raise InrUsageError("decode backend 'triton' needs the triton package (pip install 'inrfmt[gpu]')")


def check_triton_usable(device: torch.device) -> None:
    """Raise InrUsageError unless the triton backend can decode a bank on `device`."""
    _require_triton()
    from . import kernels

    kernels.check_device(device)


def available_backends(bank: TensorBank) -> list[str]:
    names = ["torch"]
    if triton_available() and (bank.device.type == "cuda" or triton_interpreted()):
        names.append("triton")
    return names


