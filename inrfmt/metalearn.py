"""Learning a prior: one starting point for every image's network, meta-learned across images (Reptile).

    prior = inrfmt.learn_prior("photos/", preset="fast", images=1024, seed=0)   # any convert source
    prior = inrfmt.learn_prior(arrays, preset="fast", steps=100)                # or uint8 [h, w, 3] arrays
    prior.save("photos.prior")

Reptile (Nichol et al. 2018), first-order: starting from a random SIREN initialisation θ₀, every outer
step draws `meta_batch` images, fits each from θ₀ with the batched fitter for the first round of the
preset's prior schedule (the fit the prior will start: same Adam and betas, learning rate and cosine
decay, the preset's pixel fraction and jitter), and moves θ₀ toward the mean of the fitted networks by a
step size that decays linearly from `outer_lr` to a fifth of it (OUTER_LR_END). Memory is that of one fit
of `meta_batch` images, whatever the number of images or steps. Every draw (θ₀'s initialisation, the
images of each step, their pixel samples) derives from `seed`, so one device and torch build give the same
prior for the same inputs.

With `step_sizes=True` it also learns a learning-rate multiplier for every entry of every parameter
(`Prior.lr_scale`, Meta-SGD, Li et al. 2017), first order: the fit from θ₀ takes Adam steps Δₖ scaled by
s, so θ_K = θ₀ + s ⊙ ΣΔₖ, and with the dependence of the Δₖ on s dropped the loss's gradient in log s is
(θ_K − θ₀) ⊙ ∇L(θ_K), the gradient taken over every pixel of the image after its fit. It is averaged over
the meta-batch and log s follows it with Adam (STEP_SIZE_LR), s kept within [1/MAX_STEP_SCALE,
MAX_STEP_SCALE]. It costs one extra forward and backward pass per outer step.
"""
from __future__ import annotations

import math
import os
import time

import numpy as np
import torch

from . import device as devices
from . import rng, siren
from .checks import check_fraction, check_int
from .errors import InrUsageError
from .fit import (DrawKeys, fit_psnr, full_loss_grad, initial_params, prepare_batch, prior_lr_scale, prior_params,
                  train_round)
from .presets import Preset, Round, get_preset
from .prior import Prior
from .progress import ProgressLine, duration

# Seeds of the three kinds of draws of a meta-learning run, mixed with the run's seed.
_INIT_KEY, _PICK_KEY, _FIT_KEY = 11, 12, 13
# Default meta-batch: images fitted together in one outer step.
META_BATCH = 16
# The outer step size decays linearly from outer_lr to this fraction of it.
OUTER_LR_END = 0.2
# A prior is learned on at least this many distinct images.
MIN_IMAGES = 16
# Learned step sizes (step_sizes=True): Adam's learning rate on log s, and the bound on s and 1/s.
STEP_SIZE_LR = 0.01
MAX_STEP_SCALE = 8.0


def learn_prior(src, preset: str | Preset = "fast", *, images: int = 1024, steps: int | None = None,
                meta_batch: int = META_BATCH, outer_lr: float | None = None, seed: int = 0, device="auto",
                max_side: int | None = None, progress: bool = True, name: str | None = None, on_step=None,
                freeze: tuple[str, ...] = (), inner: Round | None = None, step_sizes: bool = False,
                start: Prior | None = None) -> Prior:
    """Meta-learn a prior for `preset`'s network. src: any source `convert` reads (a seeded random sample
    of `images` of its items is used, capped to max_side) or a sequence of uint8 RGB arrays [h, w, 3] (any
    sizes); at least MIN_IMAGES. steps: outer (Reptile) steps, default the preset's `prior_steps`; outer_lr:
    the first outer step size, default the preset's `prior_outer_lr`. Each outer step fits `meta_batch`
    images for the preset's first prior round (`Preset.base_rounds(prior=True)[0]`).
    progress: a line on stderr with the inner-loop PSNR (the mean PSNR of the images after their fit).
    on_step(outer_step, psnr) is called after every outer step. freeze: parameters (SirenParams field
    names) that keep their initial values (random, or start's). inner: the fit of each outer step
    (default: the first round of the preset's prior schedule). step_sizes: also learn a step-size multiplier per parameter
    entry (`Prior.lr_scale`, see the module docstring). start: begin from this prior's values (and its
    step sizes, if it has them) instead of a random initialisation; with `freeze` naming every parameter
    and step_sizes=True only the step sizes are learned. Returns a `Prior` named `name`; for a preset with
    `prior_tied_outputs` its output channels start from their mean (Prior.with_tied_outputs)."""
    preset_obj = get_preset(preset) if isinstance(preset, str) else preset
    if not isinstance(preset_obj, Preset):
        raise InrUsageError(f"learn_prior: preset must be a preset name or a Preset, got {preset!r}")
    steps = check_int("steps", preset_obj.prior_steps if steps is None else steps, 1)
    meta_batch = check_int("meta_batch", meta_batch, 1)
    seed = check_int("seed", seed)
    unknown = set(freeze) - set(siren.SirenParams._fields)
    if unknown:
        raise InrUsageError(f"learn_prior: freeze names unknown parameters {sorted(unknown)} (choose from "
                            f"{', '.join(siren.SirenParams._fields)})")
    outer_lr = check_fraction("outer_lr", preset_obj.prior_outer_lr if outer_lr is None else outer_lr,
                              zero_ok=False)
    if isinstance(src, (str, os.PathLike)) or (isinstance(src, (list, tuple)) and src
                                               and isinstance(src[0], (str, os.PathLike))):
        from .conversion import sample_images
        from .sources import open_source

        images = sample_images(open_source(src), check_int("images", images, 1), seed,
                               None if max_side is None else check_int("max_side", max_side, 1))
    else:
        images = list(src)
    for i, im in enumerate(images):
        if not (isinstance(im, np.ndarray) and im.dtype == np.uint8 and im.ndim == 3 and im.shape[2] == 3
                and 0 not in im.shape):
            got = f"{im.shape} {im.dtype}" if isinstance(im, np.ndarray) else type(im).__name__
            raise InrUsageError(f"learn_prior: image {i} must be a uint8 [h, w, 3] array, got {got}")
    if len(images) < MIN_IMAGES:
        raise InrUsageError(f"learning a prior needs at least {MIN_IMAGES} images, got {len(images)}")
    dev = devices.resolve(device)
    arch = preset_obj.arch
    inner = preset_obj.base_rounds(prior=True)[0] if inner is None else inner
    pixel_fraction = preset_obj.pixel_fraction(dev.type)
    if start is not None:
        if not isinstance(start, Prior):
            raise InrUsageError(f"learn_prior: start must be a Prior, got {type(start).__name__}")
        start.check_arch(arch, "learn_prior: start", f"preset {preset_obj.name}")
    init = initial_params(arch, DrawKeys.of(rng.mix(seed, _INIT_KEY), [0], 1, dev).init()) if start is None \
        else prior_params(start, 1, dev)
    theta = [t[0].clone() for t in init]
    start_scale = prior_lr_scale(start, dev)  # None without a start or without step sizes in it
    log_scale = [torch.zeros_like(t) for t in theta] if start_scale is None else [s[0].log() for s in start_scale]
    scale_opt = torch.optim.Adam(log_scale, lr=STEP_SIZE_LR) if step_sizes else None
    use_scale = step_sizes or start_scale is not None
    picker = np.random.default_rng([seed, _PICK_KEY])
    line = ProgressLine(progress)
    label = f"prior {preset_obj.name}"
    t0 = time.perf_counter()
    psnr = float("nan")
    try:
        for outer in range(steps):
            pick = picker.choice(len(images), size=min(meta_batch, len(images)), replace=False)
            batch = prepare_batch([images[i] for i in pick], dev)
            params = siren.SirenParams(*(t.unsqueeze(0).repeat(batch.n, *([1] * t.dim())).requires_grad_(True)
                                         for t in theta))
            keys = DrawKeys.of(rng.mix(seed, _FIT_KEY, outer), range(batch.n), batch.n, dev)
            lr_scale = siren.SirenParams(*(s.exp().unsqueeze(0) for s in log_scale)) if use_scale else None
            train_round(params, batch, arch, steps=inner.steps, lr=inner.lr, pixel_fraction=pixel_fraction,
                        jitter=preset_obj.jitter, keys=keys, beta2=inner.beta2, lr_scale=lr_scale)
            if scale_opt is not None:
                grads = full_loss_grad(params, batch, arch)
                for s, t, p, g in zip(log_scale, theta, params, grads):
                    s.grad = ((p.detach() - t) * g).mean(0)
                scale_opt.step()
                with torch.no_grad():
                    for s in log_scale:
                        s.clamp_(-math.log(MAX_STEP_SCALE), math.log(MAX_STEP_SCALE))
            step_size = outer_lr * (1.0 - (1.0 - OUTER_LR_END) * outer / max(1, steps - 1))
            with torch.no_grad():
                for field, t, p in zip(siren.SirenParams._fields, theta, params):
                    if field not in freeze:
                        t.add_(p.mean(0) - t, alpha=step_size)
                if progress or on_step is not None:
                    psnr = float(fit_psnr(params, batch, arch).mean())
            if on_step is not None:
                on_step(outer + 1, psnr)
            if line.due() or outer + 1 == steps:
                elapsed = time.perf_counter() - t0
                eta = elapsed / (outer + 1) * (steps - outer - 1)
                line.show(f"{label}: step {outer + 1}/{steps} ({batch.n} images x {inner.steps} inner steps), "
                          f"inner PSNR {psnr:.2f} dB, {duration(elapsed)} elapsed, ETA {duration(eta)}", force=True)
    finally:
        line.close()
    theta0 = {field: t.detach().cpu().numpy() for field, t in zip(siren.SirenParams._fields, theta)}
    lr_scale = ({f: s.detach().exp().cpu().numpy() for f, s in zip(siren.SirenParams._fields, log_scale)}
                if use_scale else None)
    prior = Prior(arch, theta0, lr_scale, preset_obj.name if name is None else name)
    return prior.with_tied_outputs() if preset_obj.prior_tied_outputs else prior


def learn_budget_steps(preset: Preset, num_images: int, schedule_steps: int, inner: int, fraction: float,
                       meta_batch: int) -> int:
    """Outer steps of `inner` fitting steps each that cost `fraction` of fitting `num_images` images for
    `schedule_steps` steps each (counted in image·steps), at most the preset's prior_steps; 0 when not
    even one fits the budget."""
    affordable = math.floor(fraction * num_images * schedule_steps / (meta_batch * inner))
    return max(0, min(preset.prior_steps, affordable))
