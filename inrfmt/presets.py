"""Encoding presets: architecture, training schedule and pruning rule, as plain data.

A preset's schedule is a list of rounds. Round 1 fits at full precision; every later round first prunes
(a fixed ratio, or a per-image ratio from that image's PSNR by the preset's `PruneRule`) and then
fine-tunes with the mask held. After the last round the hidden weights are quantized. The `rapid-inr-*`
presets follow the Rapid-INR paper: 5000 steps at lr 5e-4, then 10000 steps at lr 2e-4 per pruning round,
Adam with cosine decay; the CIFAR-10 preset skips the fixed 20% round.

`steps` (convert --steps) is the number of round-1 steps; later rounds scale by the same factor.
`prior_rounds` is the schedule used when the fit starts from a learned prior (much shorter: the prior
already fits images coarsely), and `prior` is what `convert --prior auto` uses: "builtin" (the prior
shipped for the preset) or "none" (random initialisation, paper-faithful).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .errors import InrUsageError
from .spec import Architecture


@dataclass(frozen=True)
class PruneRule:
    """Dynamic prune ratio from PSNR: `low_ratio` at or below `low_psnr`, `high_ratio` at or above
    `high_psnr`, linear in between (paper, CIFAR-10: 30 dB -> 0, 35 dB -> 0.25)."""

    low_psnr: float
    high_psnr: float
    low_ratio: float
    high_ratio: float

    def __post_init__(self):
        if not self.high_psnr > self.low_psnr:
            raise ValueError(f"PruneRule: high_psnr {self.high_psnr} must exceed low_psnr {self.low_psnr}")
        for name in ("low_ratio", "high_ratio"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"PruneRule: {name} {value} must be in [0, 1)")


@dataclass(frozen=True)
class Round:
    """One training round. prune: "none" (plain fit), "fixed" (prune `ratio` of each image's hidden
    weights by L1 magnitude first) or "dynamic" (ratio from the image's PSNR by the preset's rule)."""

    steps: int
    lr: float
    prune: str = "none"
    ratio: float = 0.0


@dataclass(frozen=True)
class Preset:
    name: str
    arch: Architecture
    rounds: tuple[Round, ...]
    prune_rule: PruneRule | None
    description: str
    # Images fitted at once, by device type.
    batch_size_cpu: int = 64
    batch_size_cuda: int = 1024
    # Fraction of each image's pixels fitted per step (1.0 = every pixel, the exact MSE); subsampling is
    # several times faster at equal PSNR for large images (BENCHMARKS.md, "Encoder settings").
    pixel_fraction_cpu: float = 1.0
    pixel_fraction_cuda: float = 1.0
    # Fraction of the fitting samples moved each step to a random point of their pixel cell (bilinear
    # target), so the network is clean between pixel centres, where upscaled decodes and crops sample.
    jitter: float = 0.5
    # TF32 matmuls on CUDA (a large speed-up at 224², none at 32²).
    tf32: bool = False
    # Schedule from a learned prior (None: the same rounds as from a random start).
    prior_rounds: tuple[Round, ...] | None = None
    # What `--prior auto` means for this preset: "builtin" (the prior shipped for it) or "none".
    prior: str = "none"
    # Outer (Reptile) steps of learning a prior for this preset (inrfmt prior --steps), and the first
    # outer step size (it decays linearly to a fifth).
    prior_steps: int = 100
    prior_outer_lr: float = 0.5

    def __post_init__(self):
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"Preset {self.name}: jitter {self.jitter} must be in [0, 1]")
        if self.prior not in ("builtin", "none"):
            raise ValueError(f"Preset {self.name}: prior {self.prior!r} must be 'builtin' or 'none'")

    def base_rounds(self, prior: bool = False) -> tuple[Round, ...]:
        """The preset's rounds from a random start, or from a learned prior."""
        return self.prior_rounds if prior and self.prior_rounds is not None else self.rounds

    def schedule(self, steps: int | None = None, prune: bool = True, prior: bool = False) -> tuple[Round, ...]:
        """The rounds to run (from a prior start with prior=True): `steps` replaces round 1's count and
        scales the later rounds by the same factor; prune=False keeps only round 1."""
        rounds = self.base_rounds(prior)
        rounds = rounds if prune else rounds[:1]
        if steps is None:
            return rounds
        factor = steps / rounds[0].steps
        return tuple(replace(r, steps=max(1, int(math.floor(r.steps * factor + 0.5)))) for r in rounds)

    def batch_size(self, device_type: str) -> int:
        return self.batch_size_cuda if device_type == "cuda" else self.batch_size_cpu

    def pixel_fraction(self, device_type: str) -> float:
        return self.pixel_fraction_cuda if device_type == "cuda" else self.pixel_fraction_cpu


CIFAR10_RULE = PruneRule(low_psnr=30.0, high_psnr=35.0, low_ratio=0.0, high_ratio=0.25)
LARGE_RULE = PruneRule(low_psnr=35.0, high_psnr=40.0, low_ratio=0.2, high_ratio=0.4)

_PAPER_FIT = Round(steps=5000, lr=5e-4)
_PAPER_FIXED = Round(steps=10000, lr=2e-4, prune="fixed", ratio=0.2)
_PAPER_DYNAMIC = Round(steps=10000, lr=2e-4, prune="dynamic")
# What the two 10-layer paper presets share: two pruning rounds, 25% of the pixels per step, TF32 on CUDA.
# From a prior: 1/20 of the paper's steps, at a doubled learning rate (measured: BENCHMARKS.md, "Learned priors").
_PRIOR_LARGE = (Round(steps=750, lr=1e-3), Round(steps=250, lr=4e-4, prune="fixed", ratio=0.2),
                Round(steps=250, lr=4e-4, prune="dynamic"))
_PAPER_LARGE = dict(rounds=(_PAPER_FIT, _PAPER_FIXED, _PAPER_DYNAMIC), prune_rule=LARGE_RULE, batch_size_cpu=4,
                    pixel_fraction_cpu=0.25, pixel_fraction_cuda=0.25, tf32=True, prior_rounds=_PRIOR_LARGE,
                    prior="none", prior_steps=40)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="rapid-inr-cifar10",
            arch=Architecture(sine_layers=3, width=15),
            rounds=(_PAPER_FIT, _PAPER_DYNAMIC),
            prune_rule=CIFAR10_RULE,
            description="paper CIFAR-10 net 3x15; 5000 + 10000 steps; dynamic pruning 0..25%",
            batch_size_cpu=256, batch_size_cuda=8192,
            prior_rounds=(Round(steps=600, lr=3e-3), Round(steps=150, lr=1.2e-3, prune="dynamic")), prior="none",
            prior_steps=120, prior_outer_lr=0.25,
        ),
        Preset(
            name="rapid-inr-flowers102",
            arch=Architecture(sine_layers=10, width=32),
            description="paper 102flowers net 10x32; 5000 + 2x10000 steps; 20% then dynamic 20..40% pruning",
            batch_size_cuda=64, **_PAPER_LARGE,
        ),
        Preset(
            name="rapid-inr-mini-imagenet",
            arch=Architecture(sine_layers=10, width=40),
            description="paper Mini-ImageNet net 10x40; 5000 + 2x10000 steps; 20% then dynamic 20..40% pruning",
            batch_size_cuda=128, **_PAPER_LARGE,
        ),
        Preset(
            # Small and quick for the demo and tests: same round structure as the CIFAR-10 preset.
            name="fast",
            arch=Architecture(sine_layers=3, width=16),
            rounds=(Round(steps=150, lr=5e-3), Round(steps=100, lr=1e-3, prune="dynamic")),
            prior_steps=30, prior="builtin",  # from the prior: its own (already short) schedule
            prune_rule=CIFAR10_RULE,
            description="demo/test net 3x16; 150 + 100 steps at a high lr (~30 dB on 28x28 Fashion-MNIST); "
                        "CIFAR-10 pruning rule",
            batch_size_cpu=64, batch_size_cuda=4096,
        ),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise InrUsageError(f"unknown preset {name!r} (choose from: {', '.join(PRESETS)})") from None
