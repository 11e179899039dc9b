"""Encoding presets: architecture, training schedule, pruning rule and code grid, as plain data.

A preset's schedule is a list of rounds. Round 1 fits at full precision; in the format-1 presets every later
round first prunes (a fixed ratio, or a per-image ratio from that image's PSNR by the preset's `PruneRule`)
and then fine-tunes with the mask held. After the last round the hidden weights are quantized. The
`rapid-inr-*` presets follow the Rapid-INR paper: 5000 steps at lr 5e-4, then 10000 steps at lr 2e-4 per
pruning round, Adam with cosine decay; the CIFAR-10 preset skips the fixed 20% round.

The coded presets (`small`, `large`: `code_bits` and `code_ranges` set) write format 2: every parameter is
stored as an integer code on a per-file grid (`Preset.grid()`) and entropy-coded. Their schedule is a float
round and a quantization-aware round (`Round.qat`: the forward pass sees the stored values) on one cosine
learning-rate curve (`Round.continues`), without pruning. Why: rounding the float fit instead loses 2.0 dB
(`small`) and 6.5 dB (`large`) at the same bytes (bench_results/presets/); in the format-2 coding study a
restarted curve for the QAT round lost about 0.6 dB, and pruning bought nothing once codes are entropy-coded.

`steps` (convert --steps) is the number of round-1 steps; later rounds scale by the same factor.
`prior_rounds` is the schedule used when the fit starts from a learned prior (much shorter: the prior
already fits images coarsely), and `prior` is what `convert --prior auto` uses: "builtin" (the prior
shipped for the preset) or "none" (random initialisation, paper-faithful).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Mapping

from .checks import is_int
from .errors import InrUsageError
from .spec import MAX_CODE_BITS, PARAM_CLASSES, Architecture

# The classes of format 2 that have a code range around the prior; the others (first_b, hidden_b: biases of
# sine layers) are stored modulo their period, which their code width alone divides (spec.ParamGroup.period_w0).
PLAIN_CLASSES = ("first_w", "hidden_w", "last_w", "last_b")


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


ADAM_BETA2 = 0.999  # torch's default, which every paper schedule uses


@dataclass(frozen=True)
class Round:
    """One training round of Adam with a cosine learning-rate decay (to 0 at the end of its curve).

    prune: "none" (plain fit), "fixed" (prune `ratio` of each image's hidden weights by L1 magnitude first)
    or "dynamic" (ratio from the image's PSNR by the preset's rule). qat: quantization-aware training on the
    file's code grid (format 2): the forward pass uses the values the file will store (straight-through
    rounding), so the fit optimises the stored model. continues: this round goes on along the previous
    round's cosine curve (one decay from the first round's lr over both; its `lr` must equal that round's)
    instead of starting a new one; Adam's moments still start afresh. beta2: Adam's second-moment decay
    (0.9 in the prior schedules of the paper presets: a short fit from a prior gains 1-3 dB over torch's
    0.999 there, BENCHMARKS.md)."""

    steps: int
    lr: float
    prune: str = "none"
    ratio: float = 0.0
    qat: bool = False
    continues: bool = False
    beta2: float = ADAM_BETA2


def cosine_spans(rounds) -> tuple[tuple[float, float], ...]:
    """For each round, the part [start, stop) of its cosine curve it runs (fractions of the curve): (0, 1)
    for a round that starts a curve; rounds chained by `continues` split one curve by their step counts.
    ValueError if the first round continues or a continuing round's lr differs from its curve's."""
    spans, chain = [], []

    def close():
        total = sum(rounds[i].steps for i in chain)
        done = 0
        for i in chain:
            spans.append((done / total, (done + rounds[i].steps) / total))
            done += rounds[i].steps

    for i, r in enumerate(rounds):
        if r.continues:
            if not chain:
                raise ValueError("the first round cannot continue a previous round's learning-rate curve")
            if r.lr != rounds[chain[0]].lr:
                raise ValueError(f"round {i + 1} continues the learning-rate curve of round {chain[0] + 1} but "
                                 f"has lr {r.lr:g}, not {rounds[chain[0]].lr:g}")
            chain.append(i)
            continue
        if chain:
            close()
        chain = [i]
    if chain:
        close()
    return tuple(spans)


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
    # Priors for this preset (learned or built in) start the three output channels from their mean
    # (Prior.with_tied_outputs): in a coded file a grey image then decodes exactly grey.
    prior_tied_outputs: bool = False
    # Format 2 (coded): the code width of each parameter class (spec.PARAM_CLASSES) and, for the classes that
    # are not wrapped sine-layer biases (PLAIN_CLASSES), the half-width R of the code range around the prior:
    # step = R / 2^(bits-1). hidden_w may give one R per hidden layer (a tuple): deeper layers are less
    # sensitive and take coarser steps. None: format 1 (raw weights).
    code_bits: Mapping[str, int] | None = None
    code_ranges: Mapping[str, float | tuple[float, ...]] | None = None

    def __post_init__(self):
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"Preset {self.name}: jitter {self.jitter} must be in [0, 1]")
        if self.prior not in ("builtin", "none"):
            raise ValueError(f"Preset {self.name}: prior {self.prior!r} must be 'builtin' or 'none'")
        for rounds in (self.rounds, self.prior_rounds):
            if rounds is None:
                continue
            try:
                cosine_spans(rounds)
            except ValueError as e:
                raise ValueError(f"Preset {self.name}: {e}") from None
            if any(not 0.0 <= r.beta2 < 1.0 for r in rounds):
                raise ValueError(f"Preset {self.name}: every round's beta2 must be in [0, 1)")
            if self.coded and any(r.prune != "none" for r in rounds):
                raise ValueError(f"Preset {self.name}: a coded preset does not prune (its files have no masks)")
            if not self.coded and any(r.qat for r in rounds):
                raise ValueError(f"Preset {self.name}: quantization-aware rounds need code_bits and code_ranges")
        if (self.code_bits is None) != (self.code_ranges is None):
            raise ValueError(f"Preset {self.name}: give both code_bits and code_ranges, or neither")
        if self.code_bits is not None:
            bits = check_code_bits(self.code_bits, f"Preset {self.name}: code_bits", ValueError)
            if set(bits) != set(PARAM_CLASSES):
                raise ValueError(f"Preset {self.name}: code_bits must name every class ({', '.join(PARAM_CLASSES)})")
            ranges = {}
            for c in PLAIN_CLASSES:
                value = self.code_ranges.get(c)
                many = isinstance(value, (tuple, list)) and c == "hidden_w"
                values = list(value) if many else [value]
                if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                         and v > 0 for v in values) or many and len(values) != self.arch.hidden_layers:
                    raise ValueError(f"Preset {self.name}: code_ranges must give a finite range > 0 for each of "
                                     f"{', '.join(PLAIN_CLASSES)} (hidden_w: one, or one per hidden layer), got "
                                     f"{c}: {value!r}")
                ranges[c] = tuple(float(v) for v in values) if many else float(value)
            if set(self.code_ranges) - set(PLAIN_CLASSES):
                raise ValueError(f"Preset {self.name}: code_ranges has no range for "
                                 f"{', '.join(sorted(set(self.code_ranges) - set(PLAIN_CLASSES)))} (wrapped biases "
                                 f"span their period; only {', '.join(PLAIN_CLASSES)} have ranges)")
            object.__setattr__(self, "code_bits", MappingProxyType({c: bits[c] for c in PARAM_CLASSES}))
            object.__setattr__(self, "code_ranges", MappingProxyType(ranges))

    @property
    def coded(self) -> bool:
        """Whether this preset writes format 2 (every parameter coded on a grid)."""
        return self.code_bits is not None

    def code_widths(self, bits=None, why: str = "") -> dict[str, int]:
        """The code width of every class: the preset's, overridden by `bits`: None, an int (hidden_w's
        width), "N" or "CLASS=N,..." (as `convert --bits` takes it) or a mapping {class: N}. InrUsageError
        for a bad value or a format-1 preset (`why`, e.g. how the preset was chosen, follows its name)."""
        if not self.coded:
            raise InrUsageError(f"bits {bits} applies to the coded presets "
                                f"({', '.join(n for n, p in PRESETS.items() if p.coded)}): preset {self.name}{why} "
                                f"writes format 1 (use --quant)")
        widths = dict(self.code_bits)
        widths.update(parse_code_bits(bits))
        return widths

    def grid(self, bits=None):
        """The `grid.CodeGrid` of this coded preset with the code widths `code_widths(bits)`: a plain
        group's range stays the preset's (its class's, or its hidden layer's), so each extra bit halves its
        step; a sine layer's bias is wrapped."""
        from .grid import CodeGrid

        return CodeGrid.from_widths(self.arch, self.code_widths(bits), self.code_ranges)

    def base_rounds(self, prior: bool = False) -> tuple[Round, ...]:
        """The preset's rounds from a random start, or from a learned prior."""
        return self.prior_rounds if prior and self.prior_rounds is not None else self.rounds

    def schedule(self, steps: int | None = None, prune: bool = True, prior: bool = False) -> tuple[Round, ...]:
        """The rounds to run (from a prior start with prior=True): `steps` replaces round 1's count and
        scales the later rounds by the same factor; prune=False leaves out the rounds that prune."""
        rounds = self.base_rounds(prior)
        rounds = rounds if prune else tuple(r for r in rounds if r.prune == "none")
        if steps is None:
            return rounds
        factor = steps / rounds[0].steps
        return tuple(replace(r, steps=max(1, int(math.floor(r.steps * factor + 0.5)))) for r in rounds)

    def batch_size(self, device_type: str) -> int:
        return self.batch_size_cuda if device_type == "cuda" else self.batch_size_cpu

    def pixel_fraction(self, device_type: str) -> float:
        return self.pixel_fraction_cuda if device_type == "cuda" else self.pixel_fraction_cpu


def check_code_bits(bits: Mapping, name: str, error=InrUsageError) -> dict[str, int]:
    """{class: width} with known classes and integer widths in [1, MAX_CODE_BITS], else `error`."""
    out = {}
    for cls, b in bits.items():
        if cls not in PARAM_CLASSES:
            raise error(f"{name}: unknown parameter class {cls!r} (classes: {', '.join(PARAM_CLASSES)})")
        if not is_int(b) or not 1 <= b <= MAX_CODE_BITS:
            raise error(f"{name}: the width of {cls} must be an integer in [1, {MAX_CODE_BITS}], got {b!r}")
        out[cls] = int(b)
    return out


_BITS_ITEM = re.compile(r"^\s*([a-z_]+)\s*=\s*(-?\d+)\s*$")


def parse_code_bits(bits) -> dict[str, int]:
    """Code widths given as `convert --bits` takes them -> {class: width}: None -> {}; an integer or "N" ->
    {"hidden_w": N}; "CLASS=N,CLASS=N" -> those classes; a mapping -> checked. InrUsageError otherwise."""
    if bits is None:
        return {}
    usage = (f"expected N (the code width of hidden_w) or CLASS=N,... with CLASS one of {', '.join(PARAM_CLASSES)} "
             f"and N in 1..{MAX_CODE_BITS}")
    if isinstance(bits, Mapping):
        return check_code_bits(bits, "bits")
    if isinstance(bits, str):
        text = bits.strip()
        if re.fullmatch(r"-?\d+", text):
            bits = int(text)
        else:
            pairs = {}
            for item in text.split(","):
                m = _BITS_ITEM.match(item)
                if m is None or m.group(1) in pairs:
                    raise InrUsageError(f"bad bits {text!r}: {usage}")
                pairs[m.group(1)] = int(m.group(2))
            try:
                return check_code_bits(pairs, "bits")
            except InrUsageError as e:
                raise InrUsageError(f"bad bits {text!r}: {str(e).split(': ', 1)[1]}") from None
    if not is_int(bits):
        raise InrUsageError(f"bad bits {bits!r}: {usage}")
    if not 1 <= int(bits) <= MAX_CODE_BITS:
        raise InrUsageError(f"bad bits {bits!r}: the width of hidden_w must be in 1..{MAX_CODE_BITS}")
    return {"hidden_w": int(bits)}


CIFAR10_RULE = PruneRule(low_psnr=30.0, high_psnr=35.0, low_ratio=0.0, high_ratio=0.25)
LARGE_RULE = PruneRule(low_psnr=35.0, high_psnr=40.0, low_ratio=0.2, high_ratio=0.4)

_PAPER_FIT = Round(steps=5000, lr=5e-4)
_PAPER_FIXED = Round(steps=10000, lr=2e-4, prune="fixed", ratio=0.2)
_PAPER_DYNAMIC = Round(steps=10000, lr=2e-4, prune="dynamic")
# What the two 10-layer paper presets share: two pruning rounds, 25% of the pixels per step, TF32 on CUDA.
# From a prior: 1/20 of the paper's steps on one cosine curve, Adam's beta2 at 0.9 (measured: BENCHMARKS.md,
# "Learned priors"; lr 1.4e-3 diverged on some crops).
_PRIOR_LARGE = (Round(steps=750, lr=7e-4, beta2=0.9),
                Round(steps=250, lr=7e-4, prune="fixed", ratio=0.2, continues=True, beta2=0.9),
                Round(steps=250, lr=7e-4, prune="dynamic", continues=True, beta2=0.9))
_PAPER_LARGE = dict(rounds=(_PAPER_FIT, _PAPER_FIXED, _PAPER_DYNAMIC), prune_rule=LARGE_RULE, batch_size_cpu=4,
                    pixel_fraction_cpu=0.25, pixel_fraction_cuda=0.25, tf32=True, prior_rounds=_PRIOR_LARGE,
                    prior="none", prior_steps=40)

# Code widths and ranges of the coded presets. A plain group's step is range / 2^(bits-1); the ranges follow
# rule step_g = kappa * 1e-3 / sqrt(s_g), s_g the measured sensitivity d(MSE)/d(noise variance) of group g
# (3x16 at 32^2: first_w 2.16, hidden_w 1.31 / 0.48, last_w 0.044, last_b 0.081; 5x32 at 128^2: first_w 1.17,
# hidden_w 0.89 / 0.41 / 0.23 / 0.10, last_w 0.065, last_b 0.059),
# kappa = 5 for `small` and 2 for `large` (from its prior), each hidden layer with its own step (one step for
# all hidden layers of `large` cost 1.0 dB at equal bytes). Wrapped biases: 2^bits codes per period, steps
# 1.6e-3 (7 bits) and 3.3e-3 (6 bits) at w0 = 30. Measurements: bench_results/presets/.
_SMALL_BITS = {"first_w": 8, "first_b": 7, "hidden_w": 4, "hidden_b": 6, "last_w": 8, "last_b": 8}
_SMALL_RANGES = {"first_w": 0.435, "hidden_w": (0.0349, 0.0577), "last_w": 3.06, "last_b": 2.24}
_LARGE_BITS = {"first_w": 10, "first_b": 7, "hidden_w": 5, "hidden_b": 6, "last_w": 8, "last_b": 8}
_LARGE_RANGES = {"first_w": 0.946, "hidden_w": (0.0339, 0.0500, 0.0667, 0.1012), "last_w": 1.004, "last_b": 1.054}

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
            # From a prior: 1/20 of the paper's steps on one cosine curve with Adam's beta2 at 0.9 (at lr 8e-3 some
            # crops diverge: 3.8 dB less in the mean).
            prior_rounds=(Round(steps=550, lr=5e-3, beta2=0.9),
                          Round(steps=200, lr=5e-3, prune="dynamic", continues=True, beta2=0.9)), prior="none",
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
        Preset(
            # Format 2 for small images (CIFAR-like, <= 64^2): 300 float + 200 quantization-aware steps on
            # one cosine curve, each on half of the pixels: twice the steps of 150 + 100 on every pixel in
            # about the same time (+0.65 dB from the prior, +1.1 dB from a random start, at 32^2). No pruning.
            # Code widths: 4-bit hidden weights (a 4-bit bank), 6-8 bits for the rest. Its prior holds the
            # fast prior's values with the output channels tied, so grey images decode grey (tools/train_priors.py).
            name="small",
            arch=Architecture(sine_layers=3, width=16),
            rounds=(Round(steps=300, lr=5e-3), Round(steps=200, lr=5e-3, qat=True, continues=True)),
            # Adam's beta2 stays 0.999: 0.9 in the float round gave 0.1-0.2 dB on photo crops but cost 0.4 accuracy
            # points on Fashion-MNIST (BENCHMARKS.md).
            prior_rounds=(Round(steps=300, lr=2e-3), Round(steps=200, lr=2e-3, qat=True, continues=True)),
            prior="builtin", prior_steps=100, prior_tied_outputs=True, prune_rule=None,
            description="format 2 for images <= 64x64: net 3x16 from a prior; 300 float + 200 quantization-aware "
                        "steps on one cosine, half of the pixels per step; every parameter coded (4-bit hidden "
                        "weights)",
            batch_size_cpu=64, batch_size_cuda=4096, pixel_fraction_cpu=0.5, pixel_fraction_cuda=0.5,
            # Pixel centres only: small images are trained on at their own size, where jitter cost 0.4 dB on
            # 32^2 photo crops and 1.5 dB (and 0.9 accuracy points) on Fashion-MNIST (BENCHMARKS.md).
            jitter=0.0,
            code_bits=_SMALL_BITS, code_ranges=_SMALL_RANGES,
        ),
        Preset(
            # Format 2 for large images (ImageNet at 224^2, >= 128^2): 5x32 (measured on 128^2 photo crops):
            # from a random start 1200 float steps at lr 1e-3 on 25% of the pixels, then 300 quantization-aware
            # steps on the same cosine; from its built-in prior (5x32, learned on 64^2 photo crops) 800 + 300
            # steps give 1.2 dB more at fewer bytes. first_w needs more than 8 bits without a prior. The prior's
            # output channels are tied (grey images decode grey; 1.4% more bytes on colour crops).
            name="large",
            arch=Architecture(sine_layers=5, width=32),
            rounds=(Round(steps=1200, lr=1e-3), Round(steps=300, lr=1e-3, qat=True, continues=True)),
            prior_rounds=(Round(steps=800, lr=1e-3), Round(steps=300, lr=1e-3, qat=True, continues=True)),
            prior="builtin", prior_steps=45, prior_tied_outputs=True, prune_rule=None,
            description="format 2 for images >= 128x128: net 5x32 from a prior; 800 float + 300 "
                        "quantization-aware steps on one cosine, 25% of the pixels per step; every parameter coded",
            batch_size_cpu=4, batch_size_cuda=128, pixel_fraction_cpu=0.25, pixel_fraction_cuda=0.25, tf32=True,
            code_bits=_LARGE_BITS, code_ranges=_LARGE_RANGES,
        ),
    )
}
# `convert --preset auto`: the coded preset for images whose longer side is at most AUTO_SMALL_SIDE, and the
# one for larger images.
AUTO_SMALL, AUTO_LARGE, AUTO_SMALL_SIDE = "small", "large", 64


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise InrUsageError(f"unknown preset {name!r} (choose from: {', '.join(PRESETS)})") from None
