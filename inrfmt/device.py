"""Devices: the one rule for turning a user's device argument into a torch.device, and their names."""
from __future__ import annotations

import os
import platform

import torch

from .errors import InrUsageError

DEVICE_HELP = "auto, cpu, cuda or cuda:N"


def resolve(device=None, *, local_rank: int | None = None) -> torch.device:
    """None or "auto": cuda if available, else cpu. "cuda" gets an explicit index (`local_rank` under
    torchrun, else the current device), so it compares equal to the device of the tensors made on it."""
    name = "auto" if device is None else str(device)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise InrUsageError(f"unknown device {device!r} (use {DEVICE_HELP})") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise InrUsageError(f"unsupported device {device!r} (use {DEVICE_HELP})")
    if not torch.cuda.is_available():
        raise InrUsageError(f"device {device!r} requested but CUDA is not available (use --device cpu)")
    if dev.index is None:
        dev = torch.device("cuda", local_rank if local_rank is not None else torch.cuda.current_device())
    if dev.index >= torch.cuda.device_count():
        raise InrUsageError(f"device {dev} does not exist ({torch.cuda.device_count()} CUDA device(s)); under "
                            f"torchrun use at most one process per GPU, or --device cpu")
    return dev


def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo on Linux), else what the platform module says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def model_name(device) -> str:
    """The GPU model of a CUDA device, else the CPU model."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def describe(device) -> str:
    """A human-readable name: the GPU model, or the CPU model with torch's thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return model_name(device)
    return f"cpu ({cpu_name()}, {torch.get_num_threads()} threads)"


def triton_interpreted() -> bool:
    """True when TRITON_INTERPRET asks triton to run kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


_HEAP_KEPT = False


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory in the process (no trimming of the heap, no mmap for blocks
    under 32 MiB); True when it took effect, False where the C library is not glibc. Once per process.

    Why: a CPU fit frees and reallocates the same few-MiB activations every step; by default glibc hands
    them back to the kernel and page-faults them in again, which cost about a quarter of a 3x16 fit's time
    on a 2-core VM (BENCHMARKS.md, "Speed"). The price is that the process keeps its peak heap."""
    global _HEAP_KEPT
    if _HEAP_KEPT:
        return True
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
        gnu = getattr(libc, "gnu_get_libc_version", None)
    except OSError:
        return False
    if mallopt is None or gnu is None:  # musl, macOS, Windows: leave their allocators alone
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    _HEAP_KEPT = bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 2 ** 31 - 1))
    return _HEAP_KEPT
