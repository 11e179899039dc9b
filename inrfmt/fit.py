"""Batched SIREN fitting: all images of a batch at once, each with its own weights.

Every parameter tensor has a leading image axis, and the forward pass is a handful of batched matmuls
(`siren.train_forward`). Adam is elementwise and the loss is the sum over images of each image's own MSE,
so an image's gradient does not depend on the rest of its batch. The step loop never reads a value back
to the host.

A batch may mix sizes and aspect ratios: its images are fitted in groups of one size (`SizeGroup`), all
stepped together, so every image is fitted on its own pixel grid with tensors whose shapes depend only on
its own size. With `pixel_fraction` < 1 every step fits ceil(pixel_fraction x pixels) random pixels of
each image (an unbiased estimate of its MSE). With `jitter` > 0 that fraction of the samples moves to a
random point of its pixel cell, with the bilinearly interpolated image as target, so the network also fits
the continuous image between pixel centres (where upscaled decodes and crops sample). The PSNR written to
the file is always that of the stored model at the image's original pixel centres.

Determinism: every random number of an image's fit (initial weights, pixel samples, jitter) is a
counter-based hash (`inrfmt.rng`) of (seed, the image's index in the source, step), so an image's
weights depend neither on the other images of its batch nor on how the run was split into batches,
shards or resumed pieces: on one device and torch build, the same image gives the same bytes.
Grey images (R = G = B everywhere) are fitted with the three output channels tied, so they decode grey.

With a learned `prior.Prior`, every image starts from the prior's values instead of a random draw, and
each parameter's step is multiplied by the prior's `lr_scale` where it has one.

Format 2 (`fit_images(grid=...)`): every parameter is stored as an integer code on the file's
`grid.CodeGrid`, around theta0 (the prior's values, or 0). A quantization-aware round (`Round.qat`) fits
what will be stored: its forward pass uses grid.fake_quantize (straight-through rounding) and after every
Adam step grid.project_ keeps the latent values of the clamped groups within their code range. The
result then holds the codes and the PSNR of the model they decode to.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from . import device as devices, rng, siren
from .grid import CodeGrid
from .presets import ADAM_BETA2, Round, cosine_spans
from .prior import Prior
from .quantize import dequantize_hidden, dynamic_ratio, mask_ratio, prune_masks, quantize_hidden, stored_float
from .spec import IN_FEATURES, Architecture, WeightBatch, flatten_params, unflatten_params

# Pixels evaluated per forward pass when measuring PSNR (bounds memory for large originals).
EVAL_PIXELS_PER_PASS = 1 << 22
# Pixels per image per PSNR pass: fixed, so an image's PSNR is summed the same way whatever its batch.
EVAL_PIXEL_CHUNK = 1 << 16

# Streams of the counter-based generator (rng): one per kind of draw.
_INIT_STREAM, _SAMPLE_STREAM = 1, 2
_PICK, _OFFSET, _MOVE = 0, 1, 2


@dataclass
class SizeGroup:
    """The images of a batch that share one fitting size (h, w), as fitting targets on one device."""

    members: torch.Tensor  # long [n]: positions of these images in the batch
    height: int
    width: int
    coords: torch.Tensor  # [P, 2] pixel centres (siren.pixel_grid), P = h * w
    targets: torch.Tensor  # [n, P, 3] model space [-1, 1]
    canvas: torch.Tensor  # [n, 3, h, w] view of targets, for bilinear targets between pixel centres

    @property
    def pixels(self) -> int:
        return self.height * self.width

    @property
    def n(self) -> int:
        return self.targets.shape[0]


@dataclass
class FitBatch:
    """Fitting targets of a batch: one SizeGroup per distinct size, in order of first appearance."""

    groups: list[SizeGroup]
    sizes: list[tuple[int, int]]  # fitting (height, width) per image

    @property
    def n(self) -> int:
        return len(self.sizes)


def prepare_batch(images: list[np.ndarray], device) -> FitBatch:
    """uint8 RGB images [h, w, 3] (any sizes) -> FitBatch on `device`."""
    sizes = [(int(im.shape[0]), int(im.shape[1])) for im in images]
    positions: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(sizes):
        positions.setdefault(size, []).append(i)
    groups = []
    for (h, w), members in positions.items():
        stack = torch.from_numpy(np.stack([images[i] for i in members])).to(device)  # np.stack copies
        targets = stack.reshape(len(members), h * w, 3).float().div_(127.5).sub_(1.0)
        groups.append(SizeGroup(torch.tensor(members, device=device), h, w, siren.pixel_grid(h, w, device=device),
                                targets, targets.view(len(members), h, w, 3).permute(0, 3, 1, 2)))
    return FitBatch(groups, sizes)


@dataclass(frozen=True)
class DrawKeys:
    """Where the random numbers of a batch's fit come from: the run's `seed` and each image's `ids` (its
    index in the source, int64 [N] on the fitting device). Draws are pure functions of (seed, id, step)."""

    seed: int
    ids: torch.Tensor

    @staticmethod
    def of(seed: int, ids: Sequence[int] | None, n: int, device) -> "DrawKeys":
        ids = range(n) if ids is None else ids
        return DrawKeys(int(seed), torch.as_tensor(list(ids), dtype=torch.int64, device=device))

    def init(self) -> torch.Tensor:
        """int64 [N] keys of the initial weights."""
        return rng.row_keys(rng.mix(self.seed, _INIT_STREAM), self.ids)

    def step(self, step: int) -> torch.Tensor:
        """int64 [N] keys of the pixel samples and jitter of optimisation step `step` (counted over rounds)."""
        return rng.row_keys(rng.mix(self.seed, _SAMPLE_STREAM, step), self.ids)


def initial_params(arch: Architecture, keys: torch.Tensor) -> siren.SirenParams:
    """SIREN initialisation (Sitzmann et al. 2020, the bounds of siren.init_params) of one network per key:
    every weight is a uniform draw of the counter-based generator under the image's own key."""
    w = arch.width
    hidden_bound = math.sqrt(6.0 / w) / arch.w0
    bounds = {"first_w": 1.0 / IN_FEATURES, "first_b": 1.0 / math.sqrt(IN_FEATURES), "hidden_w": hidden_bound,
              "hidden_b": 1.0 / math.sqrt(w), "last_w": hidden_bound, "last_b": 1.0 / math.sqrt(w)}
    shapes = arch.shapes()
    tensors = {}
    for stream, (name, bound) in enumerate(bounds.items()):
        u = rng.uniform(keys, shapes[name], stream=stream, dtype=torch.float32)
        tensors[name] = u.mul_(2.0 * bound).sub_(bound)
    return siren.SirenParams(**tensors)


def prior_params(prior: Prior, n: int, device) -> siren.SirenParams:
    """n copies of the prior's initial values (float32, on `device`)."""
    return siren.SirenParams(*(torch.from_numpy(np.array(prior.theta0[name])).to(device)
                               .unsqueeze(0).repeat(n, *([1] * prior.theta0[name].ndim))
                               for name in siren.SirenParams._fields))


def prior_lr_scale(prior: Prior | None, device) -> siren.SirenParams | None:
    """The prior's per-parameter learning-rate multipliers, shaped to broadcast over the image axis."""
    if prior is None or prior.lr_scale is None:
        return None
    return siren.SirenParams(*(torch.from_numpy(np.array(prior.lr_scale[name])).to(device).unsqueeze(0)
                               for name in siren.SirenParams._fields))


def grey_images(images: list[np.ndarray]) -> np.ndarray:
    """bool [N]: images whose three channels are equal everywhere."""
    return np.array([bool(np.array_equal(im[..., 0], im[..., 1]) and np.array_equal(im[..., 1], im[..., 2]))
                     for im in images], dtype=bool)


@torch.no_grad()
def tie_grey_outputs(params: siren.SirenParams, grey: np.ndarray) -> None:
    """Make the three output channels of the images flagged in `grey` (bool [N]) the same function (channel
    0's): with equal targets their gradients stay equal, so a grey image is fitted, stored and decoded grey."""
    if not grey.any():
        return
    grey = torch.from_numpy(grey).to(params.last_w.device)
    for t in (params.last_w, params.last_b):
        t.copy_(torch.where(grey.view(-1, *([1] * (t.dim() - 1))), t[:, :1].expand_as(t), t))


def sample_count(pixels: int, pixel_fraction: float) -> int:
    """Samples fitted per step for an image of `pixels` pixels: all of them, or ceil(fraction x pixels)."""
    return pixels if pixel_fraction >= 1.0 else max(1, math.ceil(pixel_fraction * pixels))


def jitter_offsets(keys: torch.Tensor, count: int, jitter: float) -> torch.Tensor:
    """[n, count, 2] offsets in pixel cells: a random `jitter` fraction of the samples uniform in
    [-0.5, 0.5)^2, the rest 0 (float32, from the counter-based generator under each row's key)."""
    u = rng.uniform(keys, (count, 2), stream=_OFFSET, dtype=torch.float32).sub_(0.5)
    if jitter < 1.0:
        u *= rng.uniform(keys, (count, 1), stream=_MOVE, dtype=torch.float32) < jitter
    return u


def continuous_targets(group: SizeGroup, coords: torch.Tensor) -> torch.Tensor:
    """[n,P,3] the group's images at any coords [n,P,2] in [-1, 1], bilinearly interpolated between pixel
    centres (grid_sample, align_corners=False, padding_mode="border": the pixel-centre convention of
    siren.pixel_grid, and the edge pixels extend to the image border). At pixel centres this is exactly
    the pixels."""
    out = torch.nn.functional.grid_sample(group.canvas, coords.unsqueeze(1), mode="bilinear",
                                          padding_mode="border", align_corners=False)  # [n,3,1,P]
    return out[:, :, 0].transpose(1, 2)


def draw_samples(group: SizeGroup, keys: torch.Tensor, count: int, jitter: float):
    """(coords, targets) of one step for a group: `count` pixels per image (every pixel when count equals the
    group's pixels, else uniform picks with replacement), a `jitter` fraction moved within their pixel cells
    with the bilinear image there as target. keys: int64 [n], the step's key of each image. Drawn eagerly,
    so the loss itself stays one graph under torch.compile."""
    coords, targets = group.coords, group.targets
    if count < group.pixels:
        pick = rng.uniform(keys, (count,), stream=_PICK).mul_(group.pixels).long().clamp_max_(group.pixels - 1)
        coords = coords[pick]  # [n, count, 2]
        targets = torch.gather(targets, 1, pick[..., None].expand(-1, -1, 3))
    if jitter > 0:
        cell = coords.new_tensor([2.0 / group.width, 2.0 / group.height])  # one pixel cell along x and y
        coords = coords + jitter_offsets(keys, count, jitter) * cell
        targets = continuous_targets(group, coords)
    return coords, targets


def per_image_loss(params: siren.SirenParams, coords: torch.Tensor, targets: torch.Tensor,
                   arch: Architecture) -> torch.Tensor:
    """[n] per-image MSE in model space of the networks `params` at coords ([P,2] shared or [n,P,2]) against
    targets [n,P,3] (see draw_samples)."""
    out = siren.train_forward(params, coords, arch)
    return (out - targets).pow(2).mean(dim=(1, 2))


def _group_params(params: siren.SirenParams, batch: FitBatch, group: SizeGroup) -> siren.SirenParams:
    if len(batch.groups) == 1:
        return params
    return siren.SirenParams(*(t.index_select(0, group.members) for t in params))


def full_loss_grad(params: siren.SirenParams, batch: FitBatch, arch: Architecture) -> siren.SirenParams:
    """The gradient, at `params` (not modified), of the summed per-image MSE over every pixel of the
    batch's fitting images: each image's networks get its own image's gradient."""
    leaves = siren.SirenParams(*(t.detach().requires_grad_(True) for t in params))
    loss = sum(per_image_loss(_group_params(leaves, batch, g), g.coords, g.targets, arch).sum() for g in batch.groups)
    return siren.SirenParams(*torch.autograd.grad(loss, list(leaves)))


def theta0_of(prior: Prior | None, device) -> torch.Tensor | None:
    """The prior's values as a float32 [P] tensor in flat parameter order (spec.param_groups), the origin
    of every code; None without a prior (codes around 0)."""
    return None if prior is None else torch.from_numpy(prior.flat_theta0()).to(device)


def _as_params(flat: torch.Tensor, arch: Architecture) -> siren.SirenParams:
    return siren.SirenParams(**unflatten_params(flat, arch))


def fake_quantized(params: siren.SirenParams, arch: Architecture, grid: CodeGrid,
                   theta0: torch.Tensor | None) -> siren.SirenParams:
    """The networks the file would store for `params`: grid.fake_quantize's values (theta + (values - theta))
    in the forward pass, the identity for the gradient (straight-through). The offsets are formed without
    autograd and added per tensor, so the backward pass has no flatten/unflatten in it (the same bits as
    grid.fake_quantize on the flat parameters; 2x less overhead per QAT step at 3x16)."""
    with torch.no_grad():
        flat = flatten_params(params, arch)
        offsets = unflatten_params(grid.values(grid.codes(flat, theta0), theta0) - flat, arch)
    return siren.SirenParams(*(p + offsets[name] for name, p in zip(siren.SirenParams._fields, params)))


@torch.no_grad()
def project_params_(params: siren.SirenParams, arch: Architecture, grid: CodeGrid,
                    theta0: torch.Tensor | None) -> None:
    """grid.project_ on every image's parameters, in place: latent values of the clamped (plain) groups stay
    within half a step of their code range."""
    flat = flatten_params(params, arch)
    grid.project_(flat, theta0)
    for name, value in unflatten_params(flat, arch).items():
        getattr(params, name).copy_(value)


def train_round(params: siren.SirenParams, batch: FitBatch, arch: Architecture, *, steps: int, lr: float,
                keep: torch.Tensor | None = None, pixel_fraction: float = 1.0, jitter: float = 0.0,
                keys: DrawKeys | None = None, first_step: int = 0, on_step=None, compiled_loss=None,
                lr_scale: siren.SirenParams | None = None,
                quant: tuple[CodeGrid, torch.Tensor | None] | None = None,
                cosine: tuple[float, float] = (0.0, 1.0), beta2: float = ADAM_BETA2) -> None:
    """Adam with cosine decay on the sum of per-image MSEs, in place. The learning rate of step k is
    lr * (1 + cos(pi * t)) / 2 with t running from cosine[0] to cosine[1] over the round's steps: the
    default (0, 1) decays lr -> 0 over `steps`; presets.cosine_spans splits one curve over rounds.
    `keep` [N,H,W,W] holds pruned hidden weights at exactly zero (grads and weights masked).
    `jitter` (0..1): fraction of the samples fitted at a random point of their pixel cell against the
    bilinearly interpolated image (see draw_samples). `keys` (default: seed 0, ids 0..N-1) and
    `first_step` (the steps of earlier rounds) decide the pixel samples and jitter of every step.
    `lr_scale` (see prior_lr_scale) multiplies each parameter's Adam step; `beta2` is Adam's second-moment
    decay (its first-moment decay stays 0.9).
    `quant` = (grid, theta0): quantization-aware training: the loss sees fake_quantized(params) and every
    step ends with project_params_ (theta0: float32 [P] on the params' device, or None)."""
    if not 0.0 <= jitter <= 1.0:
        raise ValueError(f"jitter must be in [0, 1] (a fraction of the samples), got {jitter!r}")
    if quant is not None and keep is not None:
        raise ValueError("quantization-aware training does not prune: a coded file has no masks")
    start, stop = (float(c) for c in cosine)
    if not 0.0 <= start <= stop <= 1.0:
        raise ValueError(f"cosine must be (start, stop) with 0 <= start <= stop <= 1, got {cosine!r}")
    device = params.first_w.device
    if device.type == "cpu":
        devices.keep_freed_memory()
    if keys is None:
        keys = DrawKeys.of(0, None, batch.n, device)
    fused = device.type == "cuda"
    opt = torch.optim.Adam(list(params), lr=lr, betas=(0.9, beta2), fused=fused, foreach=None if fused else True)
    counts = [sample_count(g.pixels, pixel_fraction) for g in batch.groups]
    random = jitter > 0 or any(c < g.pixels for c, g in zip(counts, batch.groups))
    loss_fn = compiled_loss or per_image_loss
    keep_f = keep.to(params.hidden_w.dtype) if keep is not None else None
    if keep_f is not None:
        with torch.no_grad():
            params.hidden_w.mul_(keep_f)
    for step in range(steps):
        t = step / steps if (start, stop) == (0.0, 1.0) else start + (stop - start) * step / steps
        group_lr = 0.5 * lr * (1.0 + math.cos(math.pi * t))
        for group in opt.param_groups:
            group["lr"] = group_lr
        opt.zero_grad(set_to_none=True)
        step_keys = keys.step(first_step + step) if random else None
        seen = params if quant is None else fake_quantized(params, arch, *quant)
        loss = None
        for g, count in zip(batch.groups, counts):
            group_keys = None if step_keys is None else \
                (step_keys if len(batch.groups) == 1 else step_keys.index_select(0, g.members))
            coords, targets = draw_samples(g, group_keys, count, jitter) if random else (g.coords, g.targets)
            group_loss = loss_fn(_group_params(seen, batch, g), coords, targets, arch).sum()
            loss = group_loss if loss is None else loss + group_loss
        loss.backward()
        if keep_f is not None:
            params.hidden_w.grad.mul_(keep_f)
        before = None if lr_scale is None else [p.detach().clone() for p in params]
        opt.step()
        if before is not None:  # scale the step Adam just took: p = p_old + scale * (p_new - p_old)
            with torch.no_grad():
                for p, old, scale in zip(params, before, lr_scale):
                    p.sub_(old).mul_(scale).add_(old)
        if keep_f is not None:
            with torch.no_grad():
                params.hidden_w.mul_(keep_f)
        if quant is not None:
            project_params_(params, arch, *quant)
        if on_step is not None:
            on_step(step + 1)


def _sse_by_image(params: siren.SirenParams, coords: torch.Tensor, target_of, arch: Architecture) -> torch.Tensor:
    """float64 [n] sum of squared pixel errors of n networks over the pixels at coords [P,2]; target_of(start,
    stop, rows) gives the [len(rows), stop-start, 3] pixels in [0,1]. Images go in sub-batches and pixels in
    chunks of fixed sizes, so each image's sum is formed the same way whatever the batch."""
    n, pixels = params.first_w.shape[0], coords.shape[0]
    sse = torch.zeros(n, device=params.first_w.device, dtype=torch.float64)
    chunk = min(pixels, EVAL_PIXEL_CHUNK)
    rows_per_pass = max(1, EVAL_PIXELS_PER_PASS // chunk)
    for r0 in range(0, n, rows_per_pass):
        rows = slice(r0, min(n, r0 + rows_per_pass))
        sub = siren.SirenParams(*(t[rows] for t in params))
        for start in range(0, pixels, chunk):
            stop = min(pixels, start + chunk)
            pred = siren.to_pixels(siren.forward(sub, coords[start:stop], arch))
            sse[rows] += (pred - target_of(start, stop, rows)).pow(2).sum(dim=(1, 2), dtype=torch.float64)
    return sse


def _psnr_of(sse: torch.Tensor, pixels: int) -> torch.Tensor:
    mse = (sse / (pixels * 3)).clamp_min(1e-12)
    return (-10.0 * torch.log10(mse)).float()


@torch.no_grad()
def fit_psnr(params: siren.SirenParams, batch: FitBatch, arch: Architecture) -> torch.Tensor:
    """[N] PSNR (dB) over every pixel of the fitting images, outputs clamped to [0, 1] like a decoder."""
    out = torch.empty(batch.n, device=params.first_w.device, dtype=torch.float32)
    for g in batch.groups:
        sse = _sse_by_image(_group_params(params, batch, g), g.coords,
                            lambda start, stop, rows: g.targets[rows, start:stop] * 0.5 + 0.5, arch)
        out[g.members] = _psnr_of(sse, g.pixels)
    return out


@torch.no_grad()
def psnr_against(params: siren.SirenParams, images: list[np.ndarray], arch: Architecture) -> torch.Tensor:
    """[N] PSNR of each model decoded at its image's size against those uint8 pixels: images of one size
    are decoded together, in pixel chunks (this is the PSNR written to the index). Always at full fp32
    matmul precision, whatever TF32 setting fitted the models."""
    device = params.first_w.device
    n = len(images)
    out = torch.empty(n, dtype=torch.float32)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault((int(im.shape[0]), int(im.shape[1])), []).append(i)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        for (h, w), members in groups.items():
            sel = torch.tensor(members, device=device)
            sub = siren.SirenParams(*(t.index_select(0, sel) for t in params))
            target_all = torch.from_numpy(np.stack([images[i] for i in members])).reshape(len(members), h * w, 3)
            sse = _sse_by_image(sub, siren.pixel_grid(h, w, device=device),
                                lambda start, stop, rows: target_all[rows, start:stop].to(device).float() / 255.0,
                                arch)
            out[torch.tensor(members)] = _psnr_of(sse, h * w).cpu()
    finally:
        torch.set_float32_matmul_precision(precision)
    return out


@dataclass
class FitResult:
    weights: WeightBatch  # the stored model (coded fits: the values the codes decode to, float32, scale 1)
    psnr: np.ndarray  # float32 [N], stored (quantized) model at original size vs original pixels
    prune_ratio: np.ndarray  # float32 [N]
    fit_psnr: np.ndarray  # float32 [N], full-precision (latent) model at fitting size, before quantization
    img_steps: int
    codes: np.ndarray | None = None  # int16 [N, P] on the grid of a coded fit (fit_images(grid=...)), else None


def fit_images(images: list[np.ndarray], arch: Architecture, rounds: tuple[Round, ...], *,
               prune_rule=None, hidden_dtype: str = "int8", seed: int = 0, image_ids: Sequence[int] | None = None,
               device="cpu", pixel_fraction: float = 1.0, jitter: float = 0.0,
               originals: list[np.ndarray] | None = None, on_step=None, compiled_loss=None,
               float_dtype: str = "float32", prior: Prior | None = None, grid: CodeGrid | None = None) -> FitResult:
    """Fit one batch through every round, prune, quantize; return what the writer needs.

    images: uint8 [h, w, 3] at fitting resolution; image_ids: each image's index in the source (default
    0..N-1): with `seed` it decides every random draw of its fit. originals: the source pixels the index
    PSNR is measured against (default: images). on_step(steps_done_in_batch) is called after every step.
    hidden_dtype / float_dtype: storage of the hidden weights / of the first and last layers and biases;
    the recorded PSNR is that of the stored model. prior: start every image from these values (and
    scale its steps by the prior's lr_scale) instead of a random SIREN initialisation.

    grid: format 2: every parameter is stored as a code on this grid around theta0 (the prior's values, or
    0): the result's `codes` (grid.codes of the fitted parameters) and `psnr` is that of the model they
    decode to (grid.values); hidden_dtype and float_dtype do not apply. Rounds with `qat` need a grid and
    fit the stored model (straight-through); rounds chained by `continues` share one cosine curve. With a
    grid no round may prune."""
    device = torch.device(device)
    n = len(images)
    keys = DrawKeys.of(seed, image_ids, n, device)
    grey = grey_images(images)
    if prior is not None and prior.arch != arch:
        raise ValueError(f"the prior is for {prior.arch}, the fit for {arch}")
    if grid is not None and grid.arch != arch:
        raise ValueError(f"the code grid is for {grid.arch}, the fit for {arch}")
    for i, r in enumerate(rounds):
        if r.qat and grid is None:
            raise ValueError(f"round {i + 1} is quantization-aware: fit_images needs the code grid (grid=...)")
        if grid is not None and r.prune != "none":
            raise ValueError(f"round {i + 1} prunes: a coded fit (grid) has no masks")
    spans = cosine_spans(rounds)
    theta0 = theta0_of(prior, device) if grid is not None else None
    params = initial_params(arch, keys.init()) if prior is None else prior_params(prior, n, device)
    lr_scale = prior_lr_scale(prior, device)
    tie_grey_outputs(params, grey)
    params = siren.SirenParams(*(t.requires_grad_(True) for t in params))
    batch = prepare_batch(images, device)
    keep = None
    done = 0
    for r, span in zip(rounds, spans):
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
                    jitter=jitter, keys=keys, first_step=done, on_step=stepped, compiled_loss=compiled_loss,
                    lr_scale=lr_scale, quant=(grid, theta0) if r.qat else None, cosine=span, beta2=r.beta2)
        done += r.steps
    if grid is not None:
        return _coded_result(params, batch, arch, grid, theta0, grey, images if originals is None else originals,
                             n * done, tie=prior is None or prior.outputs_tied)
    with torch.no_grad():
        tie_grey_outputs(params, grey)  # exactly grey, whatever the rounding of the steps
        fitted_psnr = fit_psnr(params, batch, arch)
        q, scale = quantize_hidden(params.hidden_w.detach(), hidden_dtype)

        def stored(t):
            return stored_float(t.detach(), float_dtype)

        final = siren.SirenParams(stored(params.first_w), stored(params.first_b),
                                  dequantize_hidden(q, scale), stored(params.hidden_b),
                                  stored(params.last_w), stored(params.last_b))
        psnr = psnr_against(final, originals if originals is not None else images, arch)
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


@torch.no_grad()
def _coded_result(params: siren.SirenParams, batch: FitBatch, arch: Architecture, grid: CodeGrid,
                  theta0: torch.Tensor | None, grey: np.ndarray, originals: list[np.ndarray],
                  img_steps: int, tie: bool) -> FitResult:
    """The FitResult of a coded fit: the codes of `params` on `grid` and the model they decode to. tie: the
    output channels share their origin (no prior, or one with outputs_tied), so tied channels get equal
    codes and the grey images are made exactly grey."""
    n = batch.n
    if tie:
        tie_grey_outputs(params, grey)
    # Otherwise the channels' origins differ: a quantization-aware round fitted each decoded channel to the
    # grey target on its own, and tying the latent values now would only add rounding error.
    fitted_psnr = fit_psnr(params, batch, arch)
    codes = grid.codes(flatten_params(params, arch), theta0)
    final = _as_params(grid.values(codes, theta0), arch)
    psnr = psnr_against(final, originals, arch)

    def host(t):
        return np.ascontiguousarray(t.detach().cpu().numpy().astype(np.float32, copy=False))

    weights = WeightBatch(first_w=host(final.first_w), first_b=host(final.first_b), hidden_w=host(final.hidden_w),
                          hidden_scale=np.ones((n, arch.hidden_layers), np.float32), hidden_b=host(final.hidden_b),
                          last_w=host(final.last_w), last_b=host(final.last_b), mask=None)
    return FitResult(weights, psnr.numpy().astype(np.float32), np.zeros(n, np.float32),
                     fitted_psnr.cpu().numpy().astype(np.float32), img_steps,
                     np.ascontiguousarray(codes.cpu().numpy().astype(np.int16, copy=False)))


def cap_size(image: np.ndarray, max_side: int | None) -> np.ndarray:
    """Downscale (Lanczos, antialiased) so the long side is at most max_side; aspect ratio kept."""
    h, w = image.shape[:2]
    if max_side is None or max(h, w) <= max_side:
        return image
    from PIL import Image

    s = max_side / max(h, w)
    nh, nw = max(1, int(round(h * s))), max(1, int(round(w * s)))
    return np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.LANCZOS))
