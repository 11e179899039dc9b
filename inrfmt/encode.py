"""The encoder: batched SIREN fitting, pruning rounds, quantization, and the `convert` pipeline.

Fitting. All images of a batch are fitted at once: every parameter tensor has a leading image axis and
the forward pass is a handful of batched matmuls (`siren.forward`). Adam (foreach on CPU, fused on CUDA)
is elementwise, so the images stay independent; the loss is the sum over images of each image's own MSE,
so an image's gradient does not depend on what else is in its batch. The step loop never reads a value
back to the host (no `.item()`); PSNR is read once per batch, at its end.

Mixed sizes. A batch may mix sizes and aspect ratios: each image is fitted on coordinates of its own
pixel grid (x over its width, y over its height, pixel centres in [-1, 1]), so non-square images are
right. Images are padded to the batch's largest pixel count:
  * pixel_fraction == 1 (default for the small presets): every pixel every step; padded pixels
    have zero weight, so each image's loss is exactly its MSE. Equal-size batches skip the padding.
  * pixel_fraction < 1 (default 0.25 for the two 10-layer presets): each step fits P =
    ceil(fraction * largest pixel count) coordinates per image, drawn uniformly with replacement from
    that image's own pixels — an unbiased estimate of its MSE at a fraction of the cost.
  Cost: mixing sizes costs no PSNR (each image's loss and gradient are its own; padding only costs
  compute). Subsampling, measured on the bundled photos (CPU, 2026-11-26): 10x28 @ 64^2, lr 5e-4, 300
  steps: 28.6 dB all pixels vs 27.5 dB at 25% (-1.0 dB at equal steps, 4.6x faster per step); 25% with
  4x the steps (about equal time): 38.3 dB. 3x16 @ 28^2, lr 2e-3: 30.1 vs 28.4 dB at equal steps, 32.4 dB
  at 4x steps. At lr 2e-3 a 10-layer net does not converge with 25% (19.6 dB): keep the paper's lr.
  `max_side` caps the fitting resolution (Lanczos/antialiased downscale of the source pixels); the index
  keeps the original size, and the PSNR written to the file is measured by decoding the final model at
  the original size against the original pixels.

Continuous fitting (jitter). Fitted only at its pixel centres, a SIREN matches them and oscillates in
between, and decoding at another size or through a crop/resize augmentation samples exactly there. So
each step a random `jitter` fraction of the samples (preset default 0.5; convert(jitter=...)) moves to a
uniformly random point of its pixel cell, with the image bilinearly interpolated there as the target
(grid_sample, align_corners=False, padding_mode="border": the pixel-centre convention of siren.pixel_grid,
the edge pixels extended to the border); the other samples stay at the centres. With all pixels per step
the coordinates are jittered in place; with pixel_fraction < 1 the sampled pixels are. This costs PSNR at
the pixel centres (the PSNR written to the file is still measured there) and buys a clean continuous
image; the measurements behind the default are in presets.py and tools/bench_upsample.py.

Determinism. Batch b covers source items [b*B, (b+1)*B); its initial weights, pixel samples and jitter
come from generators seeded by (seed, b), so a resumed or sharded run reproduces an uninterrupted one
exactly on the same device and settings.

Pipeline (`convert`). Finished batches are written as small part files (format.InrWriter, atomic) into
a work directory beside OUT (OUT.work/, with settings.json); OUT is made by format.merge_files (temp +
fsync + rename) and the work directory is then removed. `resume=True` reuses valid parts written with the
same settings (a part that fails validation is redone); without `resume`, a leftover work directory
is an error that suggests --resume or --overwrite. A bad item (SourceItemError) is skipped with a warning
on stderr naming it and listed in the metadata key "skipped" (JSON list of {"key", "reason"}), or with
on_error="fail" stops the run with an InrUsageError naming it; OUT is not written.

Sharding. `shard="K/N"` (0-based) encodes shard K of N, a contiguous run of whole batches
[K*nb//N, (K+1)*nb//N) of the nb batches, into OUT as a part file (metadata "shard", "settings_hash");
`merge(out, parts)` checks that parts form one complete run and joins them in shard order. Because a
shard is made of whole batches with the same per-batch seeds, merged shards equal a single-process run.
Under torchrun (RANK / WORLD_SIZE in the environment, or an initialised process group) each rank does
this for shard RANK/WORLD_SIZE into OUT.part-RANK-of-WORLD (on cuda:LOCAL_RANK), rank 0 waits for all
parts (polling the files: ranks may finish hours apart) and merges them into OUT, then deletes them.

Metadata (all strings): encoder, preset, steps (round 1), schedule, seed, source, source_kind, device,
batch_size, max_side, pixel_fraction, jitter, tf32, prune, prune_rule, quant, torch_version, skipped;
and unless `reproducible`: created, device_name, img_steps, img_steps_per_s, encode_seconds. Files are
byte-identical across runs with reproducible=True (same settings and device); otherwise only the timing
keys (created, img_steps_per_s, encode_seconds) differ.
"""
from __future__ import annotations

import concurrent.futures
import glob
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import siren
from .errors import InrFormatError, InrUsageError
from .format import Architecture, InrFile, InrWriter, WeightBatch, merge_files
from .presets import PRESETS, Preset, Round, get_preset
from .quantize import (HIDDEN_DTYPE_NAMES, QUANT_BITS, dequantize_hidden, dynamic_ratio, mask_ratio,
                       prune_masks, quantize_hidden)

PART_PREFIX = "part-"
SETTINGS_NAME = "settings.json"
# Pixels evaluated per forward pass when measuring PSNR (bounds memory for large originals).
EVAL_PIXELS_PER_PASS = 1 << 22
# Fitting images above this many pixels (without --max-side) gets a one-time hint.
LARGE_FIT_PIXELS = 1024 * 1024


# ============================================================================================ fitting


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


class _SineLayer(torch.autograd.Function):
    """sin(w0 * (x @ w^T + b)) for a batch of per-image layers, with a hand-written backward: w0 is folded
    into baddbmm's alpha/beta and into the small weight-sized tensors, which saves two passes over the
    big activation tensor per layer (~25% of a layer's time on CPU) against autograd of the same formula."""

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


def train_forward(params: siren.SirenParams, coords: torch.Tensor, arch: Architecture) -> torch.Tensor:
    """siren.forward for training (same maths, same result to float rounding), with the faster backward."""
    n = params.first_w.shape[0]
    if coords.dim() == 2:
        coords = coords.unsqueeze(0).expand(n, -1, -1)
    x = _SineLayer.apply(coords, params.first_w, params.first_b, arch.first_w0)
    for layer in range(arch.hidden_layers):
        x = _SineLayer.apply(x, params.hidden_w[:, layer], params.hidden_b[:, layer], arch.w0)
    return torch.baddbmm(params.last_b.unsqueeze(1), x, params.last_w.transpose(1, 2))


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


def _per_image_loss(params: siren.SirenParams, batch: FitBatch, arch: Architecture, pick: torch.Tensor | None,
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
        out = train_forward(params, coords, arch)
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
    out = train_forward(params, coords, arch)
    return (out - targets).pow(2).mean(dim=(1, 2))


def train_round(params: siren.SirenParams, batch: FitBatch, arch: Architecture, *, steps: int, lr: float,
                keep: torch.Tensor | None = None, pixel_fraction: float = 1.0, jitter: float = 0.0,
                generator: torch.Generator | None = None, on_step=None, compiled_loss=None) -> None:
    """Adam with cosine decay (lr -> 0 over `steps`) on the sum of per-image MSEs, in place.
    `keep` [N,H,W,W] holds pruned hidden weights at exactly zero (grads and weights masked).
    `jitter` (0..1): fraction of the samples fitted at a random point of their pixel cell against the
    bilinearly interpolated image (see _per_image_loss); `generator` draws the pixel samples and the jitter."""
    if not 0.0 <= jitter <= 1.0:
        raise ValueError(f"jitter must be in [0, 1] (a fraction of the samples), got {jitter!r}")
    device = batch.targets.device
    fused = device.type == "cuda"
    opt = torch.optim.Adam(list(params), lr=lr, fused=fused, foreach=None if fused else True)
    sample_count = 0
    if pixel_fraction < 1.0:
        sample_count = max(1, math.ceil(pixel_fraction * int(batch.targets.shape[1])))
    loss_fn = compiled_loss or _per_image_loss
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
               prune_rule=None, quant: int = 8, seed: int = 0, batch_index: int = 0, device="cpu",
               pixel_fraction: float = 1.0, jitter: float = 0.0, originals: list[np.ndarray] | None = None,
               on_step=None, compiled_loss=None, float_dtype: str = "float32") -> FitResult:
    """Fit one batch through every round, prune, quantize; return what the writer needs.

    images: uint8 [h, w, 3] at fitting resolution; originals: the source pixels the index PSNR is
    measured against (default: fit_images). on_step(steps_done_in_batch) is called after every step.
    float_dtype: storage type of the first/last layers and biases; "float16" rounds them before the PSNR
    is measured, so the recorded PSNR is that of the stored model."""
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
        q, scale = quantize_hidden(params.hidden_w.detach(), quant)

        def stored(t):  # what the file will hold for a float (non-hidden-weight) parameter
            t = t.detach()
            return t.half().float() if float_dtype == "float16" else t

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


# ============================================================================================ convert


def _resolve_device(device, local_rank: int | None) -> torch.device:
    name = "auto" if device is None else str(device)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise InrUsageError(f"unknown device {device!r} (use auto, cpu or cuda)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InrUsageError(f"device {device!r} requested but CUDA is not available (use --device cpu)")
        if dev.index is None:
            dev = torch.device("cuda", local_rank if local_rank is not None else torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise InrUsageError(f"device {dev} does not exist ({torch.cuda.device_count()} CUDA device(s)); under "
                                f"torchrun use at most one process per GPU, or --device cpu")
    elif dev.type != "cpu":
        raise InrUsageError(f"unsupported device {device!r} (use auto, cpu or cuda)")
    return dev


def parse_shard(shard) -> tuple[int, int] | None:
    """"K/N" (0-based K < N) -> (K, N); None -> None. InrUsageError for anything else."""
    if shard is None:
        return None
    if isinstance(shard, tuple) and len(shard) == 2:
        k, n = shard
    else:
        text = str(shard).strip()
        parts = text.split("/")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise InrUsageError(f"bad shard {shard!r}: expected K/N with 0 <= K < N, e.g. 0/4")
        k, n = int(parts[0]), int(parts[1])
    if not (isinstance(k, int) and isinstance(n, int)) or n < 1 or not 0 <= k < n:
        raise InrUsageError(f"bad shard {shard!r}: expected K/N with 0 <= K < N (K is 0-based), e.g. 0/4")
    return k, n


def _distributed_rank() -> tuple[int, int, int | None] | None:
    """(rank, world_size, local_rank) under torchrun / an initialised process group with > 1 processes."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            local = os.environ.get("LOCAL_RANK")
            return dist.get_rank(), dist.get_world_size(), int(local) if local is not None else None
    except Exception:
        pass
    rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    if rank is None or world is None:
        return None
    try:
        rank_i, world_i = int(rank), int(world)
        local = os.environ.get("LOCAL_RANK")
        local_i = int(local) if local is not None else None
    except ValueError:
        raise InrUsageError(f"bad torchrun environment: RANK={rank!r} WORLD_SIZE={world!r}") from None
    if world_i <= 1:
        return None
    if not 0 <= rank_i < world_i:
        raise InrUsageError(f"bad torchrun environment: RANK={rank_i} not in [0, WORLD_SIZE={world_i})")
    return rank_i, world_i, local_i


def shard_batches(num_batches: int, shard: tuple[int, int] | None) -> range:
    """Batches of shard K of N: a contiguous run of whole batches, [K*nb//N, (K+1)*nb//N)."""
    if shard is None:
        return range(num_batches)
    k, n = shard
    return range(k * num_batches // n, (k + 1) * num_batches // n)


def part_path(out, rank: int, world: int) -> str:
    """Where rank `rank` of a torchrun convert writes its shard."""
    return f"{os.fspath(out)}.part-{rank}-of-{world}"


def work_dir_for(out) -> Path:
    return Path(f"{os.fspath(out)}.work")


def _check_out(out: Path, overwrite: bool, what: str = "OUT") -> None:
    if out.exists() and out.is_dir():
        raise InrUsageError(f"{what} {out} is a directory; give a file name such as {out / 'data.inr'}")
    if out.exists() and not overwrite:
        raise InrUsageError(f"{what} {out} exists (use --overwrite to replace it)")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.exists():
        raise InrUsageError(f"cannot write {what} {out}: directory {parent} does not exist")
    if not parent.is_dir():
        raise InrUsageError(f"cannot write {what} {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InrUsageError(f"cannot write {what} {out}: directory {parent} is not writable")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


@dataclass
class _Loaded:
    """One batch's items, loaded (and downscaled) by the prefetch thread."""

    good: list  # [(index, key, label, original uint8, fit uint8)]
    bad: list  # [(index, key, reason)]


def _load_batch(source, start: int, stop: int, max_side: int | None) -> _Loaded:
    from .sources import SourceItemError

    good, bad = [], []
    for i in range(start, stop):
        try:
            sample = source.load(i)
            image = np.ascontiguousarray(sample.image)
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape:
                raise SourceItemError(sample.key, f"source gave an array of shape {image.shape} {image.dtype}")
            good.append((i, sample.key, int(sample.label), image, cap_size(image, max_side)))
        except SourceItemError as e:
            bad.append((i, e.key, e.reason))
    return _Loaded(good, bad)


def _part_file(work: Path, b: int) -> Path:
    return work / f"{PART_PREFIX}{b:07d}.inr"


def _part_info_file(work: Path, b: int) -> Path:
    return work / f"{PART_PREFIX}{b:07d}.json"


def _valid_part(work: Path, b: int, settings_hash: str, start: int, stop: int):
    """The info dict of a finished, valid part for batch b, or None (then the batch is redone)."""
    info_path, path = _part_info_file(work, b), _part_file(work, b)
    if not (info_path.is_file() and path.is_file()):
        return None
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        if (info.get("settings_hash") != settings_hash or info.get("batch") != b
                or info.get("start") != start or info.get("stop") != stop):
            return None
        with InrFile(path) as f:
            f.verify()
            if f.num_images != info.get("num_images"):
                return None
        return info
    except (OSError, ValueError, InrFormatError):
        return None


def _settings(preset: Preset, schedule, *, src, source, batch_size, seed, device, max_side, pixel_fraction,
              jitter, tf32, quant, prune, shard) -> dict:
    n = len(source)
    return {
        "settings_version": 1,
        "source": os.path.abspath(os.fspath(src)) if not isinstance(src, (list, tuple))
        else [os.path.abspath(os.fspath(p)) for p in src],
        "source_kind": getattr(source, "kind", type(source).__name__),
        "source_items": n,
        "source_first_key": source.key(0) if n else None,
        "source_last_key": source.key(n - 1) if n else None,
        "classes": list(source.classes),
        "preset": preset.name,
        "arch": asdict(preset.arch),
        "schedule": [asdict(r) for r in schedule],
        "prune_rule": asdict(preset.prune_rule) if preset.prune_rule else None,
        "prune": bool(prune),
        "quant": int(quant),
        "seed": int(seed),
        "batch_size": int(batch_size),
        "device": device.type,
        "max_side": max_side,
        "pixel_fraction": float(pixel_fraction),
        "jitter": float(jitter),
        "tf32": bool(tf32),
        "shard": None if shard is None else f"{shard[0]}/{shard[1]}",
    }


def _check_int(name: str, value, minimum: int):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InrUsageError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def convert(src, out, *, preset="fast", steps=None, batch_size=None, device="auto", seed=0,
            overwrite=False, resume=False, max_side=None, on_error="skip", shard=None,
            prune=True, quant=8, reproducible=False, progress=True, h5_images=None, h5_labels=None,
            pixel_fraction=None, jitter=None, tf32=None, torch_compile=False, float_dtype="float32") -> dict:
    """Encode every image of SRC into the .inr file OUT; see the module docstring for the pipeline.

    pixel_fraction: fraction of each image's pixels fitted per step (None: the preset's default for the
    device); jitter: fraction of the fitting samples moved to a random point of their pixel cell, with
    bilinearly interpolated targets (0 = pixel centres only; None: the preset's default); tf32: TF32
    matmuls on CUDA (None: the preset's default); torch_compile: run the loss (forward + its backward)
    through torch.compile; float_dtype: storage of the first/last layers and biases ("float32", the
    paper's full precision, or "float16": about a quarter smaller files for the small presets). Returns a
    summary dict:
    out, num_images, skipped, skipped_items, psnr_mean, prune_ratio_mean, img_steps_per_s, seconds,
    batches, batches_encoded, batches_reused, shard, rank."""
    t_start = time.perf_counter()
    preset_obj = get_preset(preset) if isinstance(preset, str) else preset
    if not isinstance(preset_obj, Preset):
        raise InrUsageError(f"unknown preset {preset!r} (choose from: {', '.join(PRESETS)})")
    steps = _check_int("steps", steps, 1)
    batch_size = _check_int("batch_size", batch_size, 1)
    max_side = _check_int("max_side", max_side, 1)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InrUsageError(f"seed must be an integer, got {seed!r}")
    seed = int(seed)
    if on_error not in ("skip", "fail"):
        raise InrUsageError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
    if quant not in QUANT_BITS:
        raise InrUsageError(f"quant must be one of {', '.join(map(str, QUANT_BITS))}, got {quant!r}")
    if float_dtype not in ("float32", "float16"):
        raise InrUsageError(f"float_dtype must be 'float32' or 'float16', got {float_dtype!r}")
    if pixel_fraction is not None and not (isinstance(pixel_fraction, (int, float)) and 0 < pixel_fraction <= 1):
        raise InrUsageError(f"pixel_fraction must be in (0, 1], got {pixel_fraction!r}")
    if jitter is not None and (isinstance(jitter, bool) or not isinstance(jitter, (int, float))
                               or not 0 <= jitter <= 1):
        raise InrUsageError(f"jitter must be in [0, 1] (the fraction of fitting samples jittered), got {jitter!r}")
    shard_kn = parse_shard(shard)
    dist_info = None if shard_kn is not None else _distributed_rank()
    local_rank = dist_info[2] if dist_info else None
    dev = _resolve_device(device, local_rank)
    if dist_info is not None and dev.type == "cuda":
        torch.cuda.set_device(dev)  # one GPU per rank; also the default for any tensor made without a device

    out_path = Path(os.fspath(out))
    if out_path.exists() and out_path.is_dir():
        raise InrUsageError(f"OUT {out_path} is a directory; give a file name such as {out_path / 'data.inr'}")
    _check_out(out_path, overwrite)
    if src is None or (not isinstance(src, (list, tuple)) and not os.path.exists(os.fspath(src))):
        raise InrUsageError(f"SRC not found: {src}")
    from .sources import open_source

    source = open_source(src, h5_images=h5_images, h5_labels=h5_labels)

    if batch_size is None:
        batch_size = preset_obj.batch_size(dev.type)
    if pixel_fraction is None:
        pixel_fraction = preset_obj.pixel_fraction(dev.type)
    jitter = float(preset_obj.jitter if jitter is None else jitter)
    use_tf32 = (preset_obj.tf32 if tf32 is None else bool(tf32)) and dev.type == "cuda"
    schedule = preset_obj.schedule(steps, prune=prune)

    rank = None
    target = out_path  # the file this process writes
    if dist_info is not None:
        rank, world, _ = dist_info
        shard_kn = (rank, world)
        target = Path(part_path(out_path, rank, world))
        _check_out(target, overwrite or resume, "part file")
    settings = _settings(preset_obj, schedule, src=src, source=source, batch_size=batch_size, seed=seed,
                         device=dev, max_side=max_side, pixel_fraction=pixel_fraction, jitter=jitter,
                         tf32=use_tf32, quant=quant, prune=prune, shard=shard_kn)
    settings["torch_compile"] = bool(torch_compile)
    settings["float_dtype"] = float_dtype
    settings_hash = hashlib.sha256(_json(settings).encode()).hexdigest()[:16]
    # The same for every shard of one run (merge checks that parts belong together): leaves out what may
    # differ between the machines of one job without changing which images go where.
    run_keys = {k: v for k, v in settings.items() if k not in ("shard", "source", "device", "tf32", "torch_compile")}
    run_hash = hashlib.sha256(_json(run_keys).encode()).hexdigest()[:16]

    base_meta = _base_metadata(preset_obj, settings, src, source, dev, reproducible)
    shard_meta = {}
    if shard_kn is not None:
        shard_meta = {"shard": f"{shard_kn[0]}/{shard_kn[1]}", "settings_hash": run_hash}

    # A finished part of a torchrun rank (resume after rank 0 died in the merge) is not redone.
    summary = None
    if dist_info is not None and resume and target.exists():
        summary = _reuse_shard_file(target, run_hash, shard_kn)
    if summary is None:
        summary = _encode(source, target, preset_obj, schedule, settings, settings_hash, base_meta, shard_meta,
                          shard_kn=shard_kn, batch_size=batch_size, seed=seed, dev=dev, max_side=max_side,
                          pixel_fraction=pixel_fraction, jitter=jitter, use_tf32=use_tf32, quant=quant,
                          on_error=on_error, overwrite=overwrite, resume=resume, reproducible=reproducible,
                          progress=progress, torch_compile=bool(torch_compile))
    summary["rank"] = rank
    if dist_info is not None:
        rank, world, _ = dist_info
        if rank == 0:
            parts = [part_path(out_path, r, world) for r in range(world)]
            _wait_for_parts(parts, run_hash, world, progress)
            merge(out_path, parts, overwrite=overwrite, reproducible=reproducible)
            for p in parts:
                os.unlink(p)
            summary.update(_file_summary(out_path))
            summary["out"] = str(out_path)
    summary["seconds"] = time.perf_counter() - t_start
    return summary


def _base_metadata(preset: Preset, settings: dict, src, source, dev: torch.device, reproducible: bool) -> dict:
    from . import __version__

    meta = {
        "encoder": f"inrfmt {__version__}",
        "preset": preset.name,
        "steps": str(settings["schedule"][0]["steps"]),
        "schedule": _json(settings["schedule"]),
        "seed": str(settings["seed"]),
        "source": os.fspath(src) if not isinstance(src, (list, tuple)) else _json([os.fspath(p) for p in src]),
        "source_kind": settings["source_kind"],
        "device": dev.type,
        "batch_size": str(settings["batch_size"]),
        "max_side": "none" if settings["max_side"] is None else str(settings["max_side"]),
        "pixel_fraction": repr(settings["pixel_fraction"]),
        "jitter": repr(settings["jitter"]),
        "tf32": "yes" if settings["tf32"] else "no",
        "prune": "yes" if settings["prune"] else "no",
        "quant": str(settings["quant"]),
        "torch_version": torch.__version__,
    }
    if settings.get("torch_compile"):
        meta["torch_compile"] = "yes"
    if settings["prune_rule"] and settings["prune"]:
        meta["prune_rule"] = _json(settings["prune_rule"])
    if not reproducible:
        import datetime

        meta["created"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        meta["device_name"] = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
                               else (_cpu_name() or "cpu"))
    return meta


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor()


def _file_summary(path: Path) -> dict:
    with InrFile(path) as f:
        psnr = np.asarray(f.index["psnr"], np.float64)
        ratio = np.asarray(f.index["prune_ratio"], np.float64)
        n = int(f.num_images)
        try:
            skipped = json.loads(f.metadata.get("skipped", "[]"))
        except ValueError:
            skipped = []
    return {"num_images": n, "psnr_mean": float(psnr.mean()) if n else float("nan"),
            "prune_ratio_mean": float(ratio.mean()) if n else 0.0, "skipped": len(skipped),
            "skipped_items": skipped}


def _reuse_shard_file(target: Path, settings_hash: str, shard_kn) -> dict | None:
    try:
        with InrFile(target) as f:
            f.verify()
            ok = (f.metadata.get("settings_hash") == settings_hash
                  and f.metadata.get("shard") == f"{shard_kn[0]}/{shard_kn[1]}")
    except InrFormatError:
        return None
    if not ok:
        return None
    summary = _file_summary(target)
    summary.update(out=str(target), batches=0, batches_encoded=0, batches_reused=0, img_steps_per_s=float("nan"),
                   shard=f"{shard_kn[0]}/{shard_kn[1]}")
    return summary


def _wait_for_parts(parts: list[str], settings_hash: str, world: int, progress: bool) -> None:
    """Rank 0: wait until every rank's part file exists and belongs to this run (polling: ranks can
    finish hours apart, longer than a process-group barrier's timeout; torchrun stops us if a rank dies)."""
    told = False
    while True:
        missing = []
        for r, p in enumerate(parts):
            ok = False
            if os.path.exists(p):
                try:
                    with InrFile(p) as f:
                        ok = (f.metadata.get("settings_hash") == settings_hash
                              and f.metadata.get("shard") == f"{r}/{world}")
                except InrFormatError:
                    ok = False
            if not ok:
                missing.append(p)
        if not missing:
            return
        if not told and progress:
            print(f"inrfmt: rank 0 waiting for {len(missing)} part file(s), e.g. {missing[0]}", file=sys.stderr)
            told = True
        time.sleep(0.5)


def _encode(source, target: Path, preset: Preset, schedule, settings: dict, settings_hash: str,
            base_meta: dict, shard_meta: dict, *, shard_kn, batch_size: int, seed: int, dev: torch.device,
            max_side, pixel_fraction: float, jitter: float, use_tf32: bool, quant: int, on_error: str,
            overwrite: bool, resume: bool, reproducible: bool, progress: bool, torch_compile: bool = False) -> dict:
    """Encode this process's batches into the work dir, then merge them into `target`."""
    from tqdm.auto import tqdm

    work = work_dir_for(target)
    if work.exists():
        if not work.is_dir():
            raise InrUsageError(f"work directory {work} exists and is not a directory: remove it")
        if overwrite and not resume:
            shutil.rmtree(work)
        elif not resume:
            raise InrUsageError(f"work directory {work} exists (an interrupted convert?): use --resume to "
                                f"continue it or --overwrite to start over")
    if work.exists():
        settings_file = work / SETTINGS_NAME
        try:
            old = json.loads(settings_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        if old is None:
            raise InrUsageError(f"cannot resume: {settings_file} is missing or unreadable "
                                f"(use --overwrite to start over)")
        if old != json.loads(_json(settings)):
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff[:4])
            raise InrUsageError(f"cannot resume {work}: settings differ from the interrupted run ({shown}); "
                                f"rerun with the same options or use --overwrite to start over")
        # Temp files of writes cut off by a kill: parts in the work dir, the final merge beside OUT.
        for stale in [*work.glob(".*.tmp"), *target.parent.glob(f".{glob.escape(target.name)}.*.tmp")]:
            stale.unlink(missing_ok=True)
    else:
        try:
            work.mkdir()
            _atomic_write_text(work / SETTINGS_NAME, json.dumps(settings, indent=1, sort_keys=True))
        except OSError as e:
            raise InrUsageError(f"cannot create work directory {work}: {e.strerror or e}") from None

    n_items = len(source)
    num_batches = math.ceil(n_items / batch_size)
    batches = shard_batches(num_batches, shard_kn)
    ranges = {b: (b * batch_size, min(n_items, (b + 1) * batch_size)) for b in batches}
    total_images = sum(stop - start for start, stop in ranges.values())
    arch = preset.arch
    hidden_dtype = HIDDEN_DTYPE_NAMES[quant]
    float_dtype = settings["float_dtype"]
    has_masks = bool(settings["prune"]) and any(r.prune != "none" for r in schedule)
    steps_per_image = sum(r.steps for r in schedule)

    infos: dict[int, dict] = {}
    todo = []
    for b in batches:
        info = _valid_part(work, b, settings_hash, *ranges[b]) if resume else None
        if info is not None:
            infos[b] = info
        else:
            todo.append(b)
    reused = len(infos)

    bar = tqdm(total=total_images, unit="img", file=sys.stderr, disable=not progress, dynamic_ncols=True,
               desc=f"convert {preset.name}" + (f" shard {shard_kn[0]}/{shard_kn[1]}" if shard_kn else ""),
               smoothing=0.1)
    psnr_sum = sum(i["psnr_sum"] for i in infos.values())
    psnr_count = sum(i["num_images"] for i in infos.values())
    bar.update(sum(ranges[b][1] - ranges[b][0] for b in infos))
    fit_seconds = 0.0
    fit_img_steps = 0
    prev_precision = torch.get_float32_matmul_precision()
    if use_tf32:
        torch.set_float32_matmul_precision("high")
    compiled_loss = torch.compile(_per_image_loss) if torch_compile else None
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="inrfmt-load")
    try:
        futures = {}

        def submit(pos):
            if pos < len(todo) and todo[pos] not in futures:
                b = todo[pos]
                futures[b] = pool.submit(_load_batch, source, *ranges[b], max_side)

        submit(0)
        warned_large = False
        for pos, b in enumerate(todo):
            loaded = futures.pop(b).result()
            submit(pos + 1)  # the next batch loads while this one fits
            start, stop = ranges[b]
            for i, key, reason in loaded.bad:
                if on_error == "fail":
                    where = settings["source"] if isinstance(settings["source"], str) else "SRC"
                    if infos:  # keep finished work for --resume; nothing else is left behind
                        kept = f"finished batches are kept in {work}: rerun with --resume after fixing it"
                    else:
                        shutil.rmtree(work, ignore_errors=True)
                        kept = "no output written"
                    raise InrUsageError(f"bad image {key} in {where}: {reason} (stopped by --on-error fail; "
                                        f"{kept}; --on-error skip skips such files)")
                tqdm.write(f"inrfmt: warning: skipping {key}: {reason}", file=sys.stderr)
            big = [g for g in loaded.good if g[4].shape[0] * g[4].shape[1] > LARGE_FIT_PIXELS]
            if big and not warned_large:
                h, w = big[0][4].shape[:2]
                tqdm.write(f"inrfmt: warning: {big[0][1]} is fitted at {w}x{h}; large images fit slowly and "
                           f"need much memory: consider --max-side (e.g. 256)", file=sys.stderr)
                warned_large = True
            t0 = time.perf_counter()
            result = None
            if loaded.good:
                done_steps = [0]
                n_good = len(loaded.good)
                last_post = [t0]

                def on_step(k):
                    done_steps[0] = k
                    now = time.perf_counter()
                    if progress and now - last_post[0] > 1.0:
                        last_post[0] = now
                        rate = (fit_img_steps + n_good * k) / max(1e-9, fit_seconds + now - t0)
                        bar.set_postfix_str(_postfix(rate, psnr_sum, psnr_count, f"batch {k}/{steps_per_image}"))

                result = fit_images([g[4] for g in loaded.good], arch, schedule, prune_rule=preset.prune_rule,
                                    quant=quant, seed=seed, batch_index=b, device=dev,
                                    pixel_fraction=pixel_fraction, jitter=jitter,
                                    originals=[g[3] for g in loaded.good],
                                    on_step=on_step, compiled_loss=compiled_loss, float_dtype=float_dtype)
            seconds = time.perf_counter() - t0
            info = {
                "batch": b, "start": start, "stop": stop, "settings_hash": settings_hash,
                "num_images": len(loaded.good),
                "skipped": [{"key": key, "reason": reason} for _, key, reason in loaded.bad],
                "psnr_sum": float(np.sum(result.psnr.astype(np.float64))) if result else 0.0,
                "img_steps": int(result.img_steps) if result else 0,
                "seconds": seconds,
            }
            # The info file first: a part file without one is redone, one without a part is redone too.
            _atomic_write_text(_part_info_file(work, b), _json(info))
            with InrWriter(_part_file(work, b), arch, hidden_dtype=hidden_dtype, float_dtype=float_dtype,
                           has_masks=has_masks,
                           classes=source.classes, metadata={}) as writer:
                if result is not None:
                    wb = result.weights
                    if not has_masks:
                        wb.mask = None
                    writer.add(wb, labels=[g[2] for g in loaded.good],
                               heights=[g[3].shape[0] for g in loaded.good],
                               widths=[g[3].shape[1] for g in loaded.good],
                               psnr=np.nan_to_num(result.psnr, nan=0.0, posinf=99.0, neginf=0.0),
                               prune_ratio=result.prune_ratio if has_masks else np.zeros(len(loaded.good)))
            infos[b] = info
            fit_seconds += seconds
            fit_img_steps += info["img_steps"]
            psnr_sum += info["psnr_sum"]
            psnr_count += info["num_images"]
            bar.update(stop - start)
            bar.set_postfix_str(_postfix(fit_img_steps / max(1e-9, fit_seconds), psnr_sum, psnr_count))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_float32_matmul_precision(prev_precision)
        bar.close()

    ordered = [infos[b] for b in batches]
    skipped = [s for info in ordered for s in info["skipped"]]
    num_images = sum(info["num_images"] for info in ordered)
    if num_images == 0 and shard_kn is None:
        shutil.rmtree(work, ignore_errors=True)
        raise InrUsageError(f"no readable images in SRC {settings['source']} ({len(skipped)} skipped)")
    total_seconds = sum(info["seconds"] for info in ordered)
    total_img_steps = sum(info["img_steps"] for info in ordered)
    rate = total_img_steps / total_seconds if total_seconds > 0 else float("nan")
    meta = dict(base_meta)
    meta.update(shard_meta)
    meta["skipped"] = _json(skipped)
    if shard_kn is not None:
        first_b = batches.start
        meta["shard_items"] = f"{min(n_items, first_b * batch_size)}:{min(n_items, batches.stop * batch_size)}"
        meta["source_items"] = str(n_items)
    if not reproducible:
        meta["img_steps_per_s"] = f"{rate:.1f}"
        meta["encode_seconds"] = f"{total_seconds:.3f}"
        meta["img_steps"] = str(total_img_steps)
    if len(batches):
        merge_files([_part_file(work, b) for b in batches], target, metadata=meta)
    else:  # an empty shard (more shards than batches) still gets its part file
        with InrWriter(target, arch, hidden_dtype=hidden_dtype, float_dtype=float_dtype, has_masks=has_masks,
                       classes=source.classes, metadata=meta):
            pass
    shutil.rmtree(work, ignore_errors=True)
    summary = _file_summary(target)
    summary.update(out=str(target), batches=len(batches), batches_encoded=len(todo), batches_reused=reused,
                   img_steps_per_s=rate, fit_seconds=total_seconds,
                   shard=None if shard_kn is None else f"{shard_kn[0]}/{shard_kn[1]}")
    return summary


def _rate_unit() -> str:
    try:  # "img·steps/s" where stderr can show it (a C-locale terminal may not)
        "·".encode(getattr(sys.stderr, "encoding", None) or "ascii")
        return "img·steps/s"
    except (UnicodeEncodeError, LookupError):
        return "img-steps/s"


def _postfix(rate: float, psnr_sum: float, psnr_count: int, extra: str = "") -> str:
    text = f"{rate:,.0f} {_rate_unit()}"
    if psnr_count:
        text += f", PSNR {psnr_sum / psnr_count:.2f} dB"
    return text + (f", {extra}" if extra else "")


# ============================================================================================== merge


def merge(out, parts, overwrite: bool = False, reproducible: bool = False) -> None:
    """Join part files into OUT. Parts of one sharded convert (metadata "shard" = "K/N") are put in
    shard order and must be complete (every K of N once, same settings); other .inr files are joined
    in the order given. Skipped-image lists are combined; timing keys are summed (unless reproducible)."""
    out_path = Path(os.fspath(out))
    paths = [Path(os.fspath(p)) for p in parts]
    if not paths:
        raise InrUsageError("merge: no part files given")
    for p in paths:
        if not p.is_file():
            raise InrUsageError(f"merge: part file not found: {p}")
        if p.resolve() == out_path.resolve():
            raise InrUsageError(f"merge: OUT {out_path} is also one of the parts")
    _check_out(out_path, overwrite)
    metas = []
    for p in paths:
        with InrFile(p) as f:
            metas.append(dict(f.metadata))
    sharded = ["shard" in m for m in metas]
    if any(sharded) and not all(sharded):
        plain = paths[sharded.index(False)]
        raise InrUsageError(f"merge: {plain} is not a shard part file but other parts are (from convert --shard)")
    meta: dict[str, str] = {}
    if all(sharded):
        keyed = []
        for p, m in zip(paths, metas):
            try:
                k, n = parse_shard(m["shard"])
            except InrUsageError:
                raise InrUsageError(f"merge: {p}: bad shard metadata {m['shard']!r}") from None
            keyed.append((k, n, p, m))
        ns = {n for _, n, _, _ in keyed}
        if len(ns) != 1:
            raise InrUsageError(f"merge: parts come from splits of different sizes (N = {sorted(ns)})")
        n = ns.pop()
        hashes = {m.get("settings_hash") for _, _, _, m in keyed}
        if len(hashes) != 1:
            a, b = keyed[0], next(x for x in keyed if x[3].get("settings_hash") != keyed[0][3].get("settings_hash"))
            raise InrUsageError(f"merge: {a[2]} and {b[2]} were encoded with different settings")
        keyed.sort(key=lambda x: x[0])
        ks = [k for k, _, _, _ in keyed]
        if ks != list(range(n)):
            missing = sorted(set(range(n)) - set(ks))
            dup = sorted({k for k in ks if ks.count(k) > 1})
            what = (f"missing shard(s) {', '.join(f'{k}/{n}' for k in missing)}" if missing
                    else f"shard(s) given twice: {', '.join(f'{k}/{n}' for k in dup)}")
            raise InrUsageError(f"merge: incomplete set of parts: {what}")
        paths = [p for _, _, p, _ in keyed]
        metas = [m for _, _, _, m in keyed]
        meta["shard"] = f"merged {n}/{n}"
        meta["shard_items"] = f"0:{metas[0].get('source_items', '?')}"
    skipped = []
    for p, m in zip(paths, metas):
        try:
            skipped.extend(json.loads(m.get("skipped", "[]")))
        except ValueError:
            raise InrUsageError(f"merge: {p}: metadata 'skipped' is not a JSON list") from None
    meta["skipped"] = _json(skipped)
    if not reproducible and all("encode_seconds" in m and "img_steps" in m for m in metas):
        try:
            seconds = sum(float(m["encode_seconds"]) for m in metas)
            img_steps = sum(int(m["img_steps"]) for m in metas)
            meta["encode_seconds"] = f"{seconds:.3f}"
            meta["img_steps"] = str(img_steps)
            # Shards run in parallel: the aggregate rate is total work over the slowest shard's time.
            slowest = max(float(m["encode_seconds"]) for m in metas)
            meta["img_steps_per_s"] = f"{img_steps / slowest:.1f}" if slowest > 0 else "nan"
        except ValueError:
            pass
    merge_files(paths, out_path, metadata=meta)
