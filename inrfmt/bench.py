"""Decode throughput of each backend on a bank (`inrfmt bench`, tools/bench_decode.py)."""
from __future__ import annotations

import time

import torch

from . import device as devices
from .bank import TensorBank
from .decode import BACKENDS, available_backends, check_triton_usable, decode, decode_torch
from .decode_args import parse_size
from .errors import InrUsageError


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
    result = {"device": devices.describe(device), "size": [h, w], "batch_size": batch_size,
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


def common_sizes(sizes, limit: int = 4) -> list[tuple[int, int, int]]:
    """(height, width, images) of the `limit` most common sizes in `sizes` (int [N, 2]), most common first."""
    import numpy as np

    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    if not len(sizes):
        raise InrUsageError("the dataset has no images to decode")
    values, counts = np.unique(sizes, axis=0, return_counts=True)
    order = np.lexsort((values[:, 1], values[:, 0], -counts))[:limit]
    return [(int(values[k, 0]), int(values[k, 1]), int(counts[k])) for k in order]


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
