"""Format 1's quantization and pruning of the per-image weights (batched): the only place either is written.

Hidden-layer weights are pruned (L1, by a fixed or a PSNR-dependent ratio) and stored as int8 with a
per-image, per-layer scale (or as float16/float32). Masks are "keep" masks: True = kept, False = pruned.
Format 2 quantizes every parameter on a per-file grid instead: `grid.CodeGrid` (torch-free, for the reader).
"""
from __future__ import annotations

import torch

from .presets import PruneRule

# convert's `quant` (bits of a hidden weight) -> the hidden dtype stored in the file.
HIDDEN_DTYPE_OF_BITS = {8: "int8", 16: "float16", 32: "float32"}
INT8_MAX = 127


def dynamic_ratio(psnr: torch.Tensor, rule: PruneRule) -> torch.Tensor:
    """Per-image prune ratio from PSNR [N] (dB): low_ratio at/below low_psnr, high_ratio at/above
    high_psnr, linear in between (CIFAR-10 rule: 0.05 * PSNR - 1.5 on 30..35 dB)."""
    psnr = psnr.to(torch.float64)
    t = ((psnr - rule.low_psnr) / (rule.high_psnr - rule.low_psnr)).clamp(0.0, 1.0)
    # A NaN PSNR (diverged fit) gets the low ratio rather than poisoning the mask.
    t = torch.nan_to_num(t, nan=0.0)
    return rule.low_ratio + t * (rule.high_ratio - rule.low_ratio)


def prune_masks(hidden_w: torch.Tensor, ratios: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """L1-unstructured keep masks [N,H,W,W]: for image n, the round(ratios[n] * H*W*W) smallest-|w|
    hidden weights (over all its hidden layers together) are pruned. Weights already pruned by `keep`
    stay pruned (they are zero, so they sort first); ties break by position, so masks are deterministic."""
    n = hidden_w.shape[0]
    flat = hidden_w.detach().reshape(n, -1).abs()
    total = flat.shape[1]
    if keep is not None:
        flat = flat.masked_fill(~keep.reshape(n, -1), -1.0)
        already = (~keep.reshape(n, -1)).sum(dim=1)
    else:
        already = torch.zeros(n, dtype=torch.long, device=flat.device)
    # round half to even, like torch.nn.utils.prune's round(amount * n)
    counts = torch.round(ratios.to(torch.float64).to(flat.device) * total).long().clamp(0, total)
    counts = torch.maximum(counts, already)
    order = torch.argsort(flat, dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(total, device=flat.device).expand(n, -1))
    return (rank >= counts[:, None]).reshape(hidden_w.shape)


def mask_ratio(keep: torch.Tensor | None, n: int | None = None) -> torch.Tensor:
    """Fraction of each image's hidden weights pruned by `keep` [N,H,W,W] -> float32 [N]."""
    if keep is None:
        return torch.zeros(n or 0, dtype=torch.float32)
    return (~keep).reshape(keep.shape[0], -1).float().mean(dim=1)


def quantize_hidden(hidden_w: torch.Tensor, hidden_dtype: str = "int8") -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden weights float [N,H,W,W] -> (stored weights, scale f32 [N,H]).

    "int8": symmetric per image per layer, scale = max|w| / 127 (1.0 for an all-zero layer); "float16",
    "float32": the weights in that dtype, scale 1. Zero weights (pruned) stay exactly zero."""
    if hidden_dtype not in HIDDEN_DTYPE_OF_BITS.values():
        raise ValueError(f"hidden dtype must be one of {', '.join(HIDDEN_DTYPE_OF_BITS.values())}, "
                         f"got {hidden_dtype!r}")
    w = hidden_w.detach().float()
    n, h = w.shape[:2]
    if hidden_dtype == "int8":
        peak = w.abs().amax(dim=(2, 3))
        scale = torch.where(peak > 0, peak / INT8_MAX, torch.ones_like(peak))
        q = torch.round(w / scale[:, :, None, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
        return q, scale
    ones = torch.ones(n, h, dtype=torch.float32, device=w.device)
    return (w.to(torch.float16) if hidden_dtype == "float16" else w.clone()), ones


def dequantize_hidden(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Stored hidden weights + scale -> float32 [N,H,W,W]; the same formula every decoder uses."""
    return q.float() * scale[:, :, None, None]


def stored_float(t: torch.Tensor, float_dtype: str) -> torch.Tensor:
    """A first/last-layer or bias tensor as the file will hold it ("float32" or "float16"), as float32."""
    return t.half().float() if float_dtype == "float16" else t
