"""Hidden-layer quantization, L1 pruning masks and the dynamic prune-ratio rule (batched, per image).

Only hidden-layer weights are pruned and quantized; the first and last layers and all biases are tiny
and stay at full precision by default, as in the paper (convert's float_dtype="float16" halves them). Masks are "keep" masks: True = weight kept, False = pruned.
"""
from __future__ import annotations

import torch

from .presets import PruneRule

QUANT_BITS = (8, 16, 32)
HIDDEN_DTYPE_NAMES = {8: "int8", 16: "float16", 32: "float32"}
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


def quantize_hidden(hidden_w: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden weights float [N,H,W,W] -> (stored weights, scale f32 [N,H]).

    8: int8 symmetric per image per layer, scale = max|w| / 127 (1.0 for an all-zero layer);
    16: float16, scale 1; 32: float32, scale 1. Zero weights (pruned) stay exactly zero."""
    if bits not in QUANT_BITS:
        raise ValueError(f"quantization bits must be one of {QUANT_BITS}, got {bits!r}")
    w = hidden_w.detach().float()
    n, h = w.shape[:2]
    if bits == 8:
        peak = w.abs().amax(dim=(2, 3))
        scale = torch.where(peak > 0, peak / INT8_MAX, torch.ones_like(peak))
        q = torch.round(w / scale[:, :, None, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
        return q, scale
    ones = torch.ones(n, h, dtype=torch.float32, device=w.device)
    return (w.to(torch.float16) if bits == 16 else w.clone()), ones


def dequantize_hidden(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Stored hidden weights + scale -> float32 [N,H,W,W]; the same formula every decoder uses."""
    return q.float() * scale[:, :, None, None]
