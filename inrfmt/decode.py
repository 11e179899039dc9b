"""Decoding images from a TensorBank: the torch reference path and the backend dispatch.

`decode(bank, indices, size, theta)` returns [B,3,h,w] pixels in [0,1] on the bank's device. The "torch"
backend is the reference (batched bmm over all images of the batch, float32) and the CPU fallback; the
"triton" backend (inrfmt.kernels) is one fused kernel launch and is chosen automatically on CUDA.
"""
from __future__ import annotations

import functools
import os
import time
import warnings

import torch

from . import siren
from .bank import TensorBank
from .errors import InrUsageError

BACKENDS = ("torch", "triton")
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

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


def _interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def default_backend(bank: TensorBank) -> str:
    if bank.device.type == "cuda" and triton_available() and _auto_triton_failed is None:
        return "triton"
    return "torch"


# -- argument checking shared by both backends --------------------------------------------------------
def parse_size(size) -> tuple[int, int]:
    """An int (square) or (height, width) -> (h, w), both positive ints."""
    if isinstance(size, bool):
        raise InrUsageError(f"size must be an int or (height, width), got {size!r}")
    if isinstance(size, int):
        size = (size, size)
    try:
        h, w = (int(v) for v in size)
        ok = all(float(v) == int(v) for v in size)
    except (TypeError, ValueError):
        raise InrUsageError(f"size must be an int or (height, width), got {size!r}") from None
    if not ok or h <= 0 or w <= 0:
        raise InrUsageError(f"size must be positive integers, got {size!r}")
    return h, w


def prepare_indices(bank: TensorBank, indices) -> torch.Tensor:
    """Indices -> contiguous int64 tensor on the bank's device.

    Host-side indices (lists, ranges, numpy, CPU tensors) are range-checked here. A tensor already on the
    bank's device is trusted so that the loader's hot path does not synchronize: the torch backend then
    fails inside indexing and the triton kernel writes NaN for an out-of-range index.
    """
    n = bank.num_images
    if isinstance(indices, torch.Tensor):
        if indices.dtype.is_floating_point or indices.dtype == torch.bool or indices.dtype.is_complex:
            raise InrUsageError(f"indices must be integers, got a {indices.dtype} tensor")
        if indices.dim() != 1:
            indices = indices.reshape(-1)
        on_device = indices.device == bank.device
    else:
        try:
            indices = torch.as_tensor(indices, dtype=torch.int64)
        except (TypeError, ValueError, RuntimeError):
            raise InrUsageError("indices must be a sequence of integers or an integer tensor") from None
        indices = indices.reshape(-1)
        on_device = False
    if not on_device or bank.device.type == "cpu":
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n):
            bad = indices[(indices < 0) | (indices >= n)][0].item()
            raise InrUsageError(f"image index {bad} is out of range for a dataset of {n} images")
    return indices.to(device=bank.device, dtype=torch.int64).contiguous()


def prepare_theta(theta, batch: int, device: torch.device) -> torch.Tensor | None:
    if theta is None:
        return None
    if not isinstance(theta, torch.Tensor):
        theta = torch.as_tensor(theta, dtype=torch.float32)
    if tuple(theta.shape) != (batch, 2, 3):
        raise InrUsageError(f"theta must have shape [{batch}, 2, 3] (one affine map per image), "
                            f"got {list(theta.shape)}")
    return theta.to(device=device, dtype=torch.float32).contiguous()


def prepare_out(out, batch: int, h: int, w: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
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
    params = bank.params(idx)
    coords = siren.pixel_grid(h, w, device=bank.device)
    out_pixels = _pixel_view(out)
    width = max(bank.arch.width, 3)
    step = max(1, _TORCH_CHUNK_ELEMENTS // (batch * width))
    with torch.no_grad():
        for p0 in range(0, h * w, step):
            c = siren.transform_coords(coords[p0:p0 + step], theta)
            raw = siren.forward(params, c, bank.arch)
            out_pixels[:, p0:p0 + step].copy_(siren.to_pixels(raw))
    return out


def _pixel_view(out: torch.Tensor) -> torch.Tensor:
    """[B, h*w, 3] view sharing out's memory (out is [B,3,h,w], contiguous or channels_last)."""
    b, _, h, w = out.shape
    nhwc = out.permute(0, 2, 3, 1)
    try:
        return nhwc.view(b, h * w, 3)
    except RuntimeError:
        raise InrUsageError("out must be contiguous or channels_last") from None


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
        check_triton_usable(bank.device)
        from .kernels import decode_triton

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


def check_triton_usable(device: torch.device) -> None:
    if not triton_available():
        raise InrUsageError("decode backend 'triton' needs the triton package (pip install 'inrfmt[gpu]')")
    if device.type != "cuda" and not _interpret_mode():
        raise InrUsageError(f"decode backend 'triton' needs a CUDA bank (this bank is on {device}); "
                            "set TRITON_INTERPRET=1 to run the kernel in triton's CPU interpreter")


def available_backends(bank: TensorBank) -> list[str]:
    names = ["torch"]
    if triton_available() and (bank.device.type == "cuda" or _interpret_mode()):
        names.append("triton")
    return names


# -- benchmark ----------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark(bank: TensorBank, size, batch_size: int = 256, backends=None, *, warmup: int = 2,
              min_seconds: float = 1.0, max_iters: int = 1000, seed: int = 0, dtype=torch.float32) -> dict:
    """Decode throughput of each backend on `bank` (img/s), with warm-up and device synchronization.

    size None: the most common native size of the bank's images. Returns {"device", "size": [h, w],
    "batch_size", "num_images", "arch", "hidden_dtype", "bank_layout", "load_seconds", "bank_bytes",
    "backends": {name: {"img_per_s", "seconds", "images", "max_abs_err_vs_torch"}},
    "results": [{"backend", "size", "batch_size", ...same stats}]}; a backend that fails reports
    {"error": message} instead of the stats.
    """
    h, w = native_size(bank) if size is None else parse_size(size)
    if batch_size <= 0:
        raise InrUsageError(f"batch size must be positive, got {batch_size}")
    if backends is None:
        backends = available_backends(bank)
    for name in backends:
        if name not in BACKENDS:
            raise InrUsageError(f"unknown decode backend {name!r}: expected one of {', '.join(BACKENDS)}")
        if name == "triton":
            check_triton_usable(bank.device)  # asked for by name: a clear error rather than a result row
    device = bank.device
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, bank.num_images, (batch_size,), generator=gen).to(device)
    out = torch.empty((batch_size, 3, h, w), dtype=dtype, device=device)
    reference = decode_torch(bank, idx, (h, w), dtype=torch.float32)
    result = {"device": device_name(device), "size": [h, w], "batch_size": batch_size,
              "num_images": bank.num_images, "arch": f"{bank.arch.sine_layers}x{bank.arch.width}",
              "hidden_dtype": bank.hidden_dtype, "bank_layout": bank.layout, "load_seconds": bank.load_seconds,
              "bank_bytes": bank.nbytes, "backends": {}}
    for name in backends:
        try:
            for _ in range(warmup):
                decode(bank, idx, (h, w), backend=name, out=out, dtype=dtype)
            _sync(device)
            err = (out.float() - reference).abs().max().item()
            iters, start = 0, time.perf_counter()
            while iters < max_iters:
                decode(bank, idx, (h, w), backend=name, out=out, dtype=dtype)
                iters += 1
                if iters % 4 == 0 or device.type == "cpu":
                    _sync(device)
                    if time.perf_counter() - start >= min_seconds:
                        break
            _sync(device)
            seconds = time.perf_counter() - start
            result["backends"][name] = {"img_per_s": iters * batch_size / seconds, "seconds": seconds,
                                        "images": iters * batch_size, "max_abs_err_vs_torch": err}
        except Exception as exc:  # report the failure of one backend and keep measuring the others
            result["backends"][name] = {"error": f"{type(exc).__name__}: {exc}"}
    result["results"] = [{"backend": name, "size": f"{h}x{w}", "batch_size": batch_size, **stats}
                         for name, stats in result["backends"].items()]
    return result


def native_size(bank: TensorBank) -> tuple[int, int]:
    """The most common original (height, width) of the bank's images."""
    if bank.num_images == 0:
        raise InrUsageError("the dataset has no images to decode")
    sizes = torch.stack([bank.heights, bank.widths], dim=1).cpu()
    values, counts = torch.unique(sizes, dim=0, return_counts=True)
    h, w = (int(v) for v in values[int(counts.argmax())])
    if h <= 0 or w <= 0:
        raise InrUsageError("the bank has no stored image sizes; pass a size")
    return h, w


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
