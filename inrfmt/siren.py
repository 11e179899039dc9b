"""SIREN maths shared by the encoder and the reference decoder: one small network per image, batched.

Every function works on a batch of N images at once, each with its own weights, so the encoder and the
torch decoder are a handful of batched matmuls rather than a Python loop over images. Coordinates are
(x, y) at pixel centres in [-1, 1]; the model outputs RGB in [-1, 1], mapped to pixels by 0.5 * o + 0.5.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .spec import IN_FEATURES, OUT_FEATURES, Architecture


class SirenParams(NamedTuple):
    """Per-image weights of N SIRENs, float tensors (hidden weights already dequantized)."""

    first_w: torch.Tensor  # [N, W, 2]
    first_b: torch.Tensor  # [N, W]
    hidden_w: torch.Tensor  # [N, H, W, W]  (out, in)
    hidden_b: torch.Tensor  # [N, H, W]
    last_w: torch.Tensor  # [N, 3, W]
    last_b: torch.Tensor  # [N, 3]


def pixel_grid(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """[height*width, 2] coordinates (x, y) of pixel centres in [-1, 1], row-major (y outer)."""
    ys = (torch.arange(height, device=device, dtype=dtype) * 2 + 1) / height - 1
    xs = (torch.arange(width, device=device, dtype=dtype) * 2 + 1) / width - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=-1)


def transform_coords(coords: torch.Tensor, theta: torch.Tensor | None) -> torch.Tensor:
    """Apply per-image affine maps theta [N,2,3] to coords [P,2] or [N,P,2] -> [N,P,2] (identity when None)."""
    if theta is None:
        return coords
    if coords.dim() == 2:
        coords = coords.unsqueeze(0)
    return coords @ theta[:, :, :2].transpose(1, 2) + theta[:, None, :, 2]


def init_params(arch: Architecture, n: int, *, generator: torch.Generator | None = None,
                device=None) -> SirenParams:
    """SIREN initialisation (Sitzmann et al. 2020) for n independent networks."""
    w, h = arch.width, arch.hidden_layers

    def uniform(shape, bound):
        t = torch.empty(shape, dtype=torch.float32)
        t.uniform_(-bound, bound, generator=generator)
        return t.to(device)

    hidden_bound = math.sqrt(6.0 / w) / arch.w0
    return SirenParams(
        first_w=uniform((n, w, IN_FEATURES), 1.0 / IN_FEATURES),
        first_b=uniform((n, w), 1.0 / math.sqrt(IN_FEATURES)),
        hidden_w=uniform((n, h, w, w), hidden_bound),
        hidden_b=uniform((n, h, w), 1.0 / math.sqrt(w)),
        last_w=uniform((n, OUT_FEATURES, w), hidden_bound),
        last_b=uniform((n, OUT_FEATURES), 1.0 / math.sqrt(w)),
    )


def forward(params: SirenParams, coords: torch.Tensor, arch: Architecture, sine=None) -> torch.Tensor:
    """Raw outputs [N, P, 3] (model space, about [-1, 1]) at coords [P, 2] (shared) or [N, P, 2].

    sine(z, layer) replaces torch.sin(z) when given (layer 0 is the first): tools/sine_error.py emulates the
    GPU's approximate sine with it."""
    n = params.first_w.shape[0]
    if coords.dim() == 2:
        coords = coords.unsqueeze(0).expand(n, -1, -1)
    if sine is None:
        def sine(z, layer):
            return torch.sin(z)
    x = torch.baddbmm(params.first_b.unsqueeze(1), coords, params.first_w.transpose(1, 2))
    x = sine(arch.first_w0 * x, 0)
    for layer in range(arch.hidden_layers):
        x = torch.baddbmm(params.hidden_b[:, layer].unsqueeze(1), x, params.hidden_w[:, layer].transpose(1, 2))
        x = sine(arch.w0 * x, layer + 1)
    return torch.baddbmm(params.last_b.unsqueeze(1), x, params.last_w.transpose(1, 2))


class _SineLayer(torch.autograd.Function):
    """sin(w0 * (x @ w^T + b)) for a batch of per-image layers, with a hand-written backward: w0 is folded
    into baddbmm's alpha/beta and into the small weight-sized tensors, which saves two passes over the
    big activation tensor per layer against autograd of the same formula."""

    @staticmethod
    def forward(ctx, x, w, b, w0):
        z = torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2), beta=w0, alpha=w0)
        ctx.save_for_backward(x, w, z)
        ctx.w0 = w0
        return torch.sin(z)

    @staticmethod
    def backward(ctx, grad):
        x, w, z = ctx.saved_tensors
        w0 = ctx.w0
        gz = grad * torch.cos(z)
        gx = torch.bmm(gz, w * w0) if ctx.needs_input_grad[0] else None
        gw = torch.bmm(gz.transpose(1, 2), x).mul_(w0) if ctx.needs_input_grad[1] else None
        gb = gz.sum(1).mul_(w0) if ctx.needs_input_grad[2] else None
        return gx, gw, gb, None


def train_forward(params: SirenParams, coords: torch.Tensor, arch: Architecture) -> torch.Tensor:
    """`forward` for training (same maths, same result to float rounding), with the faster backward."""
    n = params.first_w.shape[0]
    if coords.dim() == 2:
        coords = coords.unsqueeze(0).expand(n, -1, -1)
    x = _SineLayer.apply(coords, params.first_w, params.first_b, arch.first_w0)
    for layer in range(arch.hidden_layers):
        x = _SineLayer.apply(x, params.hidden_w[:, layer], params.hidden_b[:, layer], arch.w0)
    return torch.baddbmm(params.last_b.unsqueeze(1), x, params.last_w.transpose(1, 2))


def to_pixels(raw: torch.Tensor) -> torch.Tensor:
    """Model space [-1, 1] -> pixel values clamped to [0, 1]."""
    return (raw * 0.5 + 0.5).clamp_(0.0, 1.0)


def psnr(pred: torch.Tensor, target: torch.Tensor, dim=(-2, -1)) -> torch.Tensor:
    """Per-image PSNR in dB for values in [0, 1] (mean squared error over `dim`)."""
    mse = (pred - target).pow(2).mean(dim=dim).clamp_min(1e-12)
    return -10.0 * torch.log10(mse)
