"""The arguments of a decode call, checked and put on the bank's device once, for every backend."""
from __future__ import annotations

import torch

from .checks import is_int
from .errors import InrUsageError

OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def parse_size(size) -> tuple[int, int]:
    """An int (square) or (height, width) -> (h, w), both positive ints."""
    if type(size) is int and size > 0:  # the common cases first, without the generic conversion
        return size, size
    if type(size) is tuple and len(size) == 2 and type(size[0]) is int and type(size[1]) is int \
            and size[0] > 0 and size[1] > 0:
        return size
    if isinstance(size, bool):
        raise InrUsageError(f"size must be an int or (height, width), got {size!r}")
    if is_int(size):
        size = (size, size)
    try:
        h, w = (int(v) for v in size)
        ok = all(float(v) == int(v) for v in size)
    except (TypeError, ValueError):
        raise InrUsageError(f"size must be an int or (height, width), got {size!r}") from None
    if not ok or h <= 0 or w <= 0:
        raise InrUsageError(f"size must be positive integers, got {size!r}")
    return h, w


def resized_size(h: int, w: int, size: int, max_size: int | None = None) -> tuple[int, int]:
    """torchvision `Resize(size)` with an int: the shorter side becomes `size`, the longer
    int(size * long / short) (aspect kept); `max_size` caps the longer side. -> (h, w)."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_long, new_short) if w <= h else (new_short, new_long)


def prepare_indices(bank, indices) -> torch.Tensor:
    """Indices -> contiguous int64 tensor on the bank's device.

    Host-side indices (lists, ranges, numpy, CPU tensors) are range-checked here. A tensor already on the
    bank's device is trusted so that the loader's hot path does not synchronize: the torch backend then
    fails inside indexing and the triton kernel writes NaN for an out-of-range index.
    """
    device = bank.device
    if type(indices) is torch.Tensor and indices.dtype == torch.int64 and indices.device == device \
            and device.type != "cpu" and indices.dim() == 1 and indices.is_contiguous():
        return indices  # the loader's case: nothing to check or convert
    n = bank.num_images
    if isinstance(indices, torch.Tensor):
        if indices.dtype.is_floating_point or indices.dtype == torch.bool or indices.dtype.is_complex:
            raise InrUsageError(f"indices must be integers, got a {indices.dtype} tensor")
        if indices.dim() != 1:
            indices = indices.reshape(-1)
        on_device = indices.device == device
    else:
        try:
            indices = torch.as_tensor(indices, dtype=torch.int64)
        except (TypeError, ValueError, RuntimeError):
            raise InrUsageError("indices must be a sequence of integers or an integer tensor") from None
        indices = indices.reshape(-1)
        on_device = False
    if not on_device or device.type == "cpu":
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n):
            bad = indices[(indices < 0) | (indices >= n)][0].item()
            raise InrUsageError(f"image index {bad} is out of range for a dataset of {n} images")
    return indices.to(device=device, dtype=torch.int64).contiguous()


def prepare_theta(theta, batch: int, device: torch.device) -> torch.Tensor | None:
    """theta -> contiguous float32 [batch, 2, 3] on `device` (None stays None)."""
    if theta is None:
        return None
    if type(theta) is torch.Tensor and theta.dtype == torch.float32 and theta.device == device \
            and theta.shape == (batch, 2, 3) and theta.is_contiguous():
        return theta
    if not isinstance(theta, torch.Tensor):
        theta = torch.as_tensor(theta, dtype=torch.float32)
    if tuple(theta.shape) != (batch, 2, 3):
        raise InrUsageError(f"theta must have shape [{batch}, 2, 3] (one affine map per image), "
                            f"got {list(theta.shape)}")
    return theta.to(device=device, dtype=torch.float32).contiguous()


def pixel_stride(out: torch.Tensor) -> int:
    """Stride between consecutive pixels (raster order) of out [B,3,h,w], whose rows must follow each other
    in memory (contiguous or channels_last): both decoders write pixel p of an image at p * pixel_stride."""
    _, _, h, w = out.shape
    _, _, row, col = out.stride()
    if w == 1:
        return row
    if h > 1 and row != w * col:
        raise InrUsageError("out must be contiguous or channels_last")
    return col


def prepare_out(out, batch: int, h: int, w: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A new [batch,3,h,w] tensor, or `out` checked: shape, dtype and device (each decoder checks its layout
    with pixel_stride)."""
    if dtype not in OUT_DTYPES:
        raise InrUsageError(f"dtype must be one of float32, float16, bfloat16, got {dtype}")
    if out is None:
        return torch.empty((batch, 3, h, w), dtype=dtype, device=device)
    if not isinstance(out, torch.Tensor):
        raise InrUsageError(f"out must be a tensor, got {type(out).__name__}")
    if tuple(out.shape) != (batch, 3, h, w) or out.dtype != dtype or out.device != device:
        raise InrUsageError(f"out is {out.dtype} {list(out.shape)} on {out.device}, expected {dtype} "
                            f"{[batch, 3, h, w]} on {device}")
    return out
