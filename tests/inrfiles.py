"""Small .inr files for dataset/loader/augment tests: random SIREN weights (siren.init_params), hidden layers
quantized to int8 by hand (scale = max|w| / 127 per image per layer), written with format.InrWriter.

Import as `from tests.inrfiles import write_random_inr` (tests/conftest.py puts the repository root on
sys.path). Labels default to the image's own index, so a loader's labels tell which images it yielded.
"""
from __future__ import annotations

import numpy as np
import torch

from inrfmt import siren
from inrfmt.spec import Architecture, WeightBatch
from inrfmt.writer import InrWriter

SMALL_ARCH = Architecture(sine_layers=3, width=12)


def random_weights(arch: Architecture, n: int, seed: int = 0) -> WeightBatch:
    params = siren.init_params(arch, n, generator=torch.Generator().manual_seed(seed))
    hidden = params.hidden_w.numpy()
    scale = np.abs(hidden).max(axis=(2, 3)) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.round(hidden / scale[:, :, None, None]), -127, 127).astype(np.int8)
    return WeightBatch(first_w=params.first_w.numpy(), first_b=params.first_b.numpy(), hidden_w=q,
                       hidden_scale=scale, hidden_b=params.hidden_b.numpy(), last_w=params.last_w.numpy(),
                       last_b=params.last_b.numpy())


def write_random_inr(path, sizes, labels=None, *, arch: Architecture = SMALL_ARCH, seed: int = 0,
                     classes=(), chunk_images: int = 1024, keys=None) -> str:
    """Write len(sizes) images of the given (height, width) sizes; labels default to 0..n-1; `keys` (source
    keys, one per image) make a format 1.1 file."""
    n = len(sizes)
    heights = [h for h, _ in sizes]
    widths = [w for _, w in sizes]
    labels = list(range(n)) if labels is None else list(labels)
    with InrWriter(path, arch, classes=classes, chunk_images=chunk_images) as writer:
        writer.add(random_weights(arch, n, seed), labels, heights, widths, psnr=np.full(n, 30.0),
                   prune_ratio=np.zeros(n), keys=keys)
    return str(path)
