"""Batched SIREN fitting: all images of a batch at once, each with its own weights.

Every parameter tensor has a leading image axis, and the forward pass is a handful of batched matmuls
(`siren.train_forward`). Adam is elementwise, so the images stay independent; the loss is the sum over
images of each image's own MSE, so an image's gradient does not depend on the rest of its batch. The step
loop never reads a value back to the host.

A batch may mix sizes and aspect ratios: each image is fitted on its own pixel grid, padded to the batch's
largest pixel count. With `pixel_fraction` < 1 every step fits a random subset of each image's pixels (an
unbiased estimate of its MSE). With `jitter` > 0 that fraction of the samples moves to a random point of
its pixel cell, with the bilinearly interpolated image as target, so the network also fits the continuous
image between pixel centres (where upscaled decodes and crops sample). The PSNR written to the file is
always that of the stored model at the image's original pixel centres.

Determinism: batch b's initial weights, pixel samples and jitter come from generators seeded by
`batch_seed(seed, b)`, so a resumed or sharded run reproduces an uninterrupted one on the same device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from . import siren
from .presets import Round
from .quantize import dequantize_hidden, dynamic_ratio, mask_ratio, prune_masks, quantize_hidden, stored_float
from .spec import Architecture, WeightBatch

# Pixels evaluated per forward pass when measuring PSNR (bounds memory for large originals).
EVAL_PIXELS_PER_PASS = 1 << 22


@dataclass
class FitBatch:
    """Fitting targets of a batch on one device. Images are padded to the largest pixel count."""

    coords: torch.Tensor  # [P, 2] shared when all images have one size, else [N, Pmax, 2]
    targets: torch.Tensor  # [N, Pmax, 3] model space [-1, 1]
    counts: torch.Tensor  # [N] long: real pixels per image
    weights: torch.Tensor | None  # [N, Pmax] 1/count on real pixels, 0 on padding (None when uniform)
    sizes: list[tuple[int, int]]  # fitting (height, width) per image
    # The images as [N, 3, Hmax, Wmax] (model space, top-left aligned, zero padded), for bilinear targets
    # between pixel centres (`continuous_targets`); a view of `targets` when all images have one size.
    canvas: torch.Tensor
    extent: torch.Tensor  # [N, 2] float (width, height) per image: pixels along x and along y
    canvas_extent: torch.Tensor  # [2] float (Wmax, Hmax), on the device (no host copy in the step loop)

    @property
    def uniform(self) -> bool:
        return self.weights is None

    @property
    def n(self) -> int:
        return self.targets.shape[0]


def prepare_batch(images: list[np.ndarray], device) -> FitBatch:
    """uint8 RGB images [h, w, 3] (any sizes) -> FitBatch on `device`."""
    sizes = [(int(im.shape[0]), int(im.shape[1])) for im in images]
    counts = [h * w for h, w in sizes]
    pmax = max(counts)
    extent = torch.tensor([[w, h] for h, w in sizes], dtype=torch.float32, device=device)
    if len(set(sizes)) == 1:
        h, w = sizes[0]
        stack = torch.from_numpy(np.stack(images)).to(device)  # np.stack copies: writable
        targets = stack.reshape(len(images), h * w, 3).float().div_(127.5).sub_(1.0)
        coords = siren.pixel_grid(h, w, device=device)
        canvas = targets.view(len(images), h, w, 3).permute(0, 3, 1, 2)
        return FitBatch(coords, targets, torch.tensor(counts, device=device), None, sizes, canvas, extent,
                        extent[0].clone())
    hmax, wmax = max(h for h, _ in sizes), max(w for _, w in sizes)
    targets = torch.zeros(len(images), pmax, 3, device=device)
    coords = torch.zeros(len(images), pmax, 2, device=device)
    weights = torch.zeros(len(images), pmax, device=device)
    canvas = torch.zeros(len(images), 3, hmax, wmax, device=device)
    for i, (im, (h, w)) in enumerate(zip(images, sizes)):  # once per batch, not per step
        targets[i, : h * w] = torch.from_numpy(np.array(im, copy=True)).to(device).reshape(-1, 3).float() / 127.5 - 1.0
        coords[i, : h * w] = siren.pixel_grid(h, w, device=device)
        weights[i, : h * w] = 1.0 / (h * w)
        canvas[i, :, :h, :w] = targets[i, : h * w].reshape(h, w, 3).permute(2, 0, 1)
    return FitBatch(coords, targets, torch.tensor(counts, device=device), weights, sizes, canvas, extent,
                    torch.tensor([wmax, hmax], dtype=torch.float32, device=device))


def jitter_offsets(n: int, p: int, jitter: float, generator: torch.Generator | None, device,
                   dtype=torch.float32) -> torch.Tensor:
    """[N,P,2] offsets in pixel cells: a random `jitter` fraction uniform in [-0.5, 0.5)^2, the rest 0."""
    u = torch.rand(n, p, 2, generator=generator, device=device, dtype=dtype).sub_(0.5)
    if jitter < 1.0:
        u *= torch.rand(n, p, 1, generator=generator, device=device, dtype=dtype) < jitter
    return u


def offset_coords(coords: torch.Tensor, extent: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """coords [P,2] or [N,P,2] moved by offsets [N,P,2] given in pixel cells of each image (extent [N,2])."""
    cell = 2.0 / extent  # [N, 2]: one pixel cell is 2/w along x, 2/h along y
    return coords + offsets * cell[:, None, :]


def jitter_coords(coords: torch.Tensor, extent: torch.Tensor, jitter: float,
                  generator: torch.Generator | None) -> torch.Tensor:
    """Move a random `jitter` fraction of the coordinates to a uniformly random point of their pixel
    cell; the rest stay at the pixel centre. coords [P,2] (shared) or [N,P,2] of pixel centres, extent
    [N,2] (width, height) -> [N,P,2]. jitter 1 moves every sample, so pixel centres drawn uniformly
    become points drawn uniformly over the continuous image."""
    offsets = jitter_offsets(extent.shape[0], coords.shape[-2], jitter, generator, coords.device, coords.dtype)
    return offset_coords(coords, extent, offsets)


def continuous_targets(batch: FitBatch, coords: torch.Tensor) -> torch.Tensor:
    """[N,P,3] the batch's images at any coords [N,P,2] in [-1, 1], bilinearly interpolated between pixel
    centres (grid_sample, align_corners=False, padding_mode="border": the pixel-centre convention of
    siren.pixel_grid, and the edge pixels extend to the image border). At pixel centres this is exactly
    the pixels. Mixed sizes: each image's coords are clamped to its own pixel-centre range and mapped
    onto the padded canvas, so no zero padding is ever blended in."""
    grid = coords
    if not batch.uniform:
        size = batch.extent[:, None, :]  # [N,1,2] (w, h)
        pix = torch.minimum(((coords + 1.0) * size - 1.0).mul_(0.5).clamp_min_(0.0), size - 1.0)
        grid = (2.0 * pix + 1.0) / batch.canvas_extent - 1.0
    out = torch.nn.functional.grid_sample(batch.canvas, grid.unsqueeze(1), mode="bilinear",
                                          padding_mode="border", align_corners=False)  # [N,3,1,P]
    return out[:, :, 0].transpose(1, 2)


def draw_samples(batch: FitBatch, sample_count: int, jitter: float, generator: torch.Generator | None):
    """The random numbers of one loss evaluation, drawn eagerly so the loss itself stays one graph under
    torch.compile: (pick [N, sample_count] uniform in [0,1) choosing the sampled pixels, or None for every
    pixel; offsets [N,P,2] jitter offsets in pixel cells (see jitter_offsets), or None without jitter)."""
    device = batch.targets.device
    pick = torch.rand(batch.n, sample_count, generator=generator, device=device) if sample_count > 0 else None
    offsets = None
    if jitter > 0:
        p = sample_count if sample_count > 0 else batch.coords.shape[-2]
        offsets = jitter_offsets(batch.n, p, jitter, generator, device, batch.coords.dtype)
    return pick, offsets


def per_image_loss(params: siren.SirenParams, batch: FitBatch, arch: Architecture, pick: torch.Tensor | None,
                    offsets: torch.Tensor | None) -> torch.Tensor:
    """[N] per-image MSE in model space, on all pixels (pick None) or on the pixels `pick` chooses (see
    draw_samples). offsets: move the samples that far within their pixel cells, with the bilinearly
    interpolated image there as target (fits the continuous image, not only the pixel centres; samples
    with a zero offset keep the centres pinned)."""
    if pick is None:
        coords, targets = batch.coords, batch.targets
        if offsets is not None:
            coords = offset_coords(coords, batch.extent, offsets)
            targets = continuous_targets(batch, coords)
        out = siren.train_forward(params, coords, arch)
        err = (out - targets).pow(2)
        if batch.uniform:
            return err.mean(dim=(1, 2))
        return (err.sum(dim=2) * batch.weights).sum(dim=1) / 3.0
    idx = (pick * batch.counts[:, None]).long().clamp_max_(batch.counts[:, None] - 1)
    if batch.uniform:
        coords = batch.coords[idx]  # [N, P, 2]
    else:
        coords = torch.gather(batch.coords, 1, idx[..., None].expand(-1, -1, 2))
    if offsets is not None:
        coords = offset_coords(coords, batch.extent, offsets)
        targets = continuous_targets(batch, coords)
    else:
        targets = torch.gather(batch.targets, 1, idx[..., None].expand(-1, -1, 3))
    out = siren.train_forward(params, coords, arch)
    return (out - targets).pow(2).mean(dim=(1, 2))


def train_round(params: siren.SirenParams, batch: FitBatch, arch: Architecture, *, steps: int, lr: float,
                keep: torch.Tensor | None = None, pixel_fraction: float = 1.0, jitter: float = 0.0,
                generator: torch.Generator | None = None, on_step=None, compiled_loss=None) -> None:
    """Adam with cosine decay (lr -> 0 over `steps`) on the sum of per-image MSEs, in place.
    `keep` [N,H,W,W] holds pruned hidden weights at exactly zero (grads and weights masked).
    `jitter` (0..1): fraction of the samples fitted at a random point of their pixel cell against the
    bilinearly interpolated image (see per_image_loss); `generator` draws the pixel samples and the jitter."""
    if not 0.0 <= jitter <= 1.0:
        raise ValueError(f"jitter must be in [0, 1] (a fraction of the samples), got {jitter!r}")
    device = batch.targets.device
    fused = device.type == "cuda"
    opt = torch.optim.Adam(list(params), lr=lr, fused=fused, foreach=None if fused else True)
    sample_count = 0
    if pixel_fraction < 1.0:
        sample_count = max(1, math.ceil(pixel_fraction * int(batch.targets.shape[1])))
    loss_fn = compiled_loss or per_image_loss
    keep_f = keep.to(params.hidden_w.dtype) if keep is not None else None
    if keep_f is not None:
        with torch.no_grad():
            params.hidden_w.mul_(keep_f)
    for step in range(steps):
        group_lr = 0.5 * lr * (1.0 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = group_lr
        opt.zero_grad(set_to_none=True)
        pick, offsets = draw_samples(batch, sample_count, jitter, generator)
        loss = loss_fn(params, batch, arch, pick, offsets).sum()
        loss.backward()
        if keep_f is not None:
            params.hidden_w.grad.mul_(keep_f)
        opt.step()
        if keep_f is not None:
            with torch.no_grad():
                params.hidden_w.mul_(keep_f)
        if on_step is not None:
            on_step(step + 1)


@torch.no_grad()
def fit_psnr(params: siren.SirenParams, batch: FitBatch, arch: Architecture) -> torch.Tensor:
    """[N] PSNR (dB) over every pixel of the fitting images, outputs clamped to [0, 1] like a decoder."""
    n, pmax = batch.targets.shape[:2]
    sse = torch.zeros(n, device=batch.targets.device, dtype=torch.float64)
    step = max(1, EVAL_PIXELS_PER_PASS // max(1, n))
    for start in range(0, pmax, step):
        stop = min(pmax, start + step)
        coords = batch.coords[start:stop] if batch.uniform else batch.coords[:, start:stop]
        pred = siren.to_pixels(siren.forward(params, coords, arch))
        target = batch.targets[:, start:stop] * 0.5 + 0.5
        err = (pred - target).pow(2).sum(dim=2)
        if not batch.uniform:
            err = err * (batch.weights[:, start:stop] > 0)
        sse += err.sum(dim=1, dtype=torch.float64)
    mse = (sse / (batch.counts.double() * 3)).clamp_min(1e-12)
    return (-10.0 * torch.log10(mse)).float()


@torch.no_grad()
def psnr_against(params: siren.SirenParams, images: list[np.ndarray], arch: Architecture) -> torch.Tensor:
    """[N] PSNR of each model decoded at its image's size against those uint8 pixels: images of one size
    are decoded together, in pixel chunks (this is the PSNR written to the index)."""
    device = params.first_w.device
    n = len(images)
    out = torch.empty(n, dtype=torch.float32)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault((int(im.shape[0]), int(im.shape[1])), []).append(i)
    for (h, w), members in groups.items():
        sel = torch.tensor(members, device=device)
        sub = siren.SirenParams(*(t.index_select(0, sel) for t in params))
        target_all = torch.from_numpy(np.stack([images[i] for i in members])).reshape(len(members), h * w, 3)
        grid = siren.pixel_grid(h, w, device=device)
        sse = torch.zeros(len(members), dtype=torch.float64, device=device)
        step = max(1, EVAL_PIXELS_PER_PASS // len(members))
        for start in range(0, h * w, step):
            stop = min(h * w, start + step)
            pred = siren.to_pixels(siren.forward(sub, grid[start:stop], arch))
            target = target_all[:, start:stop].to(device).float() / 255.0
            sse += (pred - target).pow(2).sum(dim=(1, 2), dtype=torch.float64)
        mse = (sse / (h * w * 3)).clamp_min(1e-12)
        out[torch.tensor(members)] = (-10.0 * torch.log10(mse)).float().cpu()
    return out


def batch_seed(seed: int, batch_index: int) -> int:
    """A 63-bit seed for batch `batch_index` of a run seeded `seed` (well mixed, platform independent)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, int(batch_index)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


@dataclass
class FitResult:
    weights: WeightBatch
    psnr: np.ndarray  # float32 [N], quantized model at original size vs original pixels
    prune_ratio: np.ndarray  # float32 [N]
    fit_psnr: np.ndarray  # float32 [N], full-precision model at fitting size, before quantization
    img_steps: int


def fit_images(images: list[np.ndarray], arch: Architecture, rounds: tuple[Round, ...], *,
               prune_rule=None, hidden_dtype: str = "int8", seed: int = 0, batch_index: int = 0, device="cpu",
               pixel_fraction: float = 1.0, jitter: float = 0.0, originals: list[np.ndarray] | None = None,
               on_step=None, compiled_loss=None, float_dtype: str = "float32") -> FitResult:
    """Fit one batch through every round, prune, quantize; return what the writer needs.

    images: uint8 [h, w, 3] at fitting resolution; originals: the source pixels the index PSNR is
    measured against (default: images). on_step(steps_done_in_batch) is called after every step.
    hidden_dtype / float_dtype: storage of the hidden weights / of the first and last layers and biases;
    the recorded PSNR is that of the stored model."""
    device = torch.device(device)
    n = len(images)
    rng_seed = batch_seed(seed, batch_index)
    init_gen = torch.Generator().manual_seed(rng_seed)
    params = siren.init_params(arch, n, generator=init_gen, device=device)
    params = siren.SirenParams(*(t.requires_grad_(True) for t in params))
    sample_gen = None
    if pixel_fraction < 1.0 or jitter > 0.0:  # pixel samples and jitter, one stream per batch
        sample_gen = torch.Generator(device=device).manual_seed(rng_seed ^ 0x5EED)
    batch = prepare_batch(images, device)
    keep = None
    done = 0
    for r in rounds:
        if r.prune != "none":
            if r.prune == "fixed":
                ratios = torch.full((n,), float(r.ratio), dtype=torch.float64)
            elif r.prune == "dynamic":
                if prune_rule is None:
                    raise ValueError("a dynamic pruning round needs a prune rule")
                ratios = dynamic_ratio(fit_psnr(params, batch, arch), prune_rule)
            else:
                raise ValueError(f"unknown prune kind {r.prune!r}")
            keep = prune_masks(params.hidden_w, ratios, keep)

        def stepped(k, base=done):
            if on_step is not None:
                on_step(base + k)

        train_round(params, batch, arch, steps=r.steps, lr=r.lr, keep=keep, pixel_fraction=pixel_fraction,
                    jitter=jitter, generator=sample_gen, on_step=stepped, compiled_loss=compiled_loss)
        done += r.steps
    with torch.no_grad():
        fitted_psnr = fit_psnr(params, batch, arch)
        q, scale = quantize_hidden(params.hidden_w.detach(), hidden_dtype)

        def stored(t):
            return stored_float(t.detach(), float_dtype)

        final = siren.SirenParams(stored(params.first_w), stored(params.first_b),
                                  dequantize_hidden(q, scale), stored(params.hidden_b),
                                  stored(params.last_w), stored(params.last_b))
        # The recorded PSNR is the stored model's at full fp32 precision, whatever TF32 setting fitted it.
        precision = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            psnr = psnr_against(final, originals if originals is not None else images, arch)
        finally:
            torch.set_float32_matmul_precision(precision)
    del batch
    ratio = mask_ratio(keep, n) if keep is not None else torch.zeros(n)

    def host(t, dtype=np.float32):
        return np.ascontiguousarray(t.detach().cpu().numpy().astype(dtype, copy=False))

    weights = WeightBatch(
        first_w=host(final.first_w), first_b=host(final.first_b),
        hidden_w=np.ascontiguousarray(q.cpu().numpy()), hidden_scale=host(scale),
        hidden_b=host(final.hidden_b), last_w=host(final.last_w), last_b=host(final.last_b),
        mask=None if keep is None else np.ascontiguousarray(keep.cpu().numpy()),
    )
    return FitResult(weights, psnr.numpy().astype(np.float32), ratio.cpu().numpy().astype(np.float32),
                     fitted_psnr.cpu().numpy().astype(np.float32), n * done)


def cap_size(image: np.ndarray, max_side: int | None) -> np.ndarray:
    """Downscale (Lanczos, antialiased) so the long side is at most max_side; aspect ratio kept."""
    h, w = image.shape[:2]
    if max_side is None or max(h, w) <= max_side:
        return image
    from PIL import Image

    s = max_side / max(h, w)
    nh, nw = max(1, int(round(h * s))), max(1, int(round(w * s)))
    return np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.LANCZOS))
