"""Augmentation as coordinate transforms: torchvision's transforms, drawn per image on the device.

A SIREN is a continuous image, so a crop, flip, resize or translation is not a resample of decoded
pixels but a change of where the network is evaluated. Each geometric op draws, for every image of a
batch at once (torch ops on the batch's device, no per-image Python loop, no host sync), an axis-aligned
affine map of the sampling grid; the pipeline composes them into one `theta [B,2,3]` that the decoder
applies (output coords (x, y) in [-1, 1] -> source coords, the `F.affine_grid(align_corners=False)`
convention of docs/internals.md). Pixel ops run on the decoded batch after that: the fill of padded
areas, `ColorJitter`, `RandomErasing`, `Normalize`, and any callable taking and returning a [B,3,H,W]
batch (e.g. a torchvision transform that accepts batched tensors). Pixel ops draw their per-image
parameters when the plan is made, with the geometric ones.

    pipeline = Compose([RandomResizedCrop(224), RandomHorizontalFlip(), ColorJitter(0.4, 0.4, 0.4),
                        Normalize(mean, std)])
    plan = pipeline(heights, widths, generator=g)       # heights/widths: [B] native sizes on the device
    images = plan.finish(decode(bank, idx, plan.size, plan.theta))

Semantics follow torchvision (names, arguments, defaults, and the integer crop geometry of
`RandomResizedCrop.get_params`, `RandomCrop.get_params`, `CenterCrop` and `Resize`), with these
documented differences:

* There is no interpolation: every output pixel is the network evaluated at its source coordinate.
  `interpolation`/`antialias` are accepted for drop-in use and ignored.
* Padding (`RandomCrop(padding=...)`, `pad_if_needed`, `RandomTranslate`, a `CenterCrop` larger than
  the image) is `padding_mode="constant"` only: output pixels whose source point lies outside the
  padded-from image get `fill` (default 0, in [0, 1] pixel units, before `Normalize`). The SIREN is
  never asked to extrapolate beyond [-1, 1]. "edge"/"reflect"/"symmetric" are piecewise maps that one
  affine theta cannot express, so they raise `InrUsageError`.
* Random numbers come from the given device `torch.Generator`, or with `keys` (int64 [B], one per image)
  from the counter-based generator of `inrfmt.rng`: then each image's draws are a pure function of its own
  key, whatever else is in the batch (the loader uses this to decode several batches at once). Either
  way they do not reproduce torchvision's own random stream.
* Geometric ops must come before the pixel ops (a fill after normalising would mean something else).
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, NamedTuple, Sequence

import torch

from . import rng
from .checks import check_fraction
from .decode_args import resized_size
from .errors import InrUsageError

__all__ = ["AugmentPlan", "Transform", "Compose", "RandomResizedCrop", "RandomHorizontalFlip",
           "RandomVerticalFlip", "RandomCrop", "RandomTranslate", "Resize", "CenterCrop", "Normalize",
           "ColorJitter", "RandomErasing", "Lambda", "with_output_size"]

# A padded area is hit when a pixel centre's source point lies outside the padded-from image by more
# than this (in [-1, 1] units); integer-pixel crops put centres at least half a pixel from an edge.
_EDGE_EPS = 1e-6
_MATH = torch.float64  # dtype of the per-image sizes and maps while composing (theta itself is float32)


class AugmentPlan(NamedTuple):
    """What a pipeline decided for one batch: decode with `theta` at `size`, then call `finish`.

    `finish(images, rows=slice(None))` runs the pixel ops on decoded images: all B of them, or the rows
    `rows` of the batch the plan was made for (then `images` holds just those rows). `per_image` is True
    when the pipeline has no plain callable, so the pixel ops treat each image on its own and may be run
    on several planned batches at once."""

    theta: torch.Tensor | None  # [B,2,3] float32 on the batch's device; None: identity
    size: tuple[int, int]  # (h, w) of the decoded output
    finish: Callable[..., torch.Tensor]  # fills and pixel ops, in place where they can be
    per_image: bool = True


def _cached(cache: dict, key, limit: int, make) -> torch.Tensor:
    """cache[key], made by make() on first use; the cache is emptied when it holds more than `limit`."""
    t = cache.get(key)
    if t is None:
        if len(cache) > limit:
            cache.clear()
        t = cache[key] = make()
    return t


def _constant(values, device) -> torch.Tensor:
    """A small float64 constant on `device`, uploaded once and cached (no host->device copy per batch)."""
    return _cached(_CONSTANTS, (str(device), tuple(values)), 1024,
                   lambda: torch.tensor(values, dtype=_MATH, device=device))


_CONSTANTS: dict = {}
_GRIDS: dict = {}


def _pixel_centres(n: int, device) -> torch.Tensor:
    """[n] pixel-centre coordinates -1 + (2k + 1) / n (float64), cached per (n, device)."""
    return _cached(_GRIDS, (str(device), n), 256, lambda: (torch.arange(n, device=device, dtype=_MATH) * 2 + 1) / n - 1)


class _View:
    """The image as the pipeline sees it after some ops: an axis-aligned window of the source.

    Per image, as [B, 2] tensors in (x, y) order: a view point p in [-1, 1]^2 has source coordinates
    `scale * p + offset`; `extent` is the view's (width, height) in pixels (integers held in float64, like
    torchvision's Python ints). `size` is the view's (h, w) as host ints when it is the same for the whole
    batch and known without looking at device data. Every op works on whole [B, 2] tensors, so a pipeline
    is a few dozen small kernel launches per batch, whatever the batch size.
    """

    def __init__(self, heights: torch.Tensor, widths: torch.Tensor, native_size, generator, keys=None):
        device = heights.device
        self.device = device
        self.generator = generator
        self.keys = keys
        self.draws = 0  # rand() calls so far: each takes its own stream of the counter-based generator
        self.batch = heights.shape[0]
        self.extent = torch.stack([widths.to(device), heights], dim=1).to(_MATH)
        self.scale = torch.ones(self.batch, 2, device=device, dtype=_MATH)
        self.offset = torch.zeros(self.batch, 2, device=device, dtype=_MATH)
        self.size: tuple[int, int] | None = tuple(int(v) for v in native_size) if native_size is not None else None
        self.geometric = False
        self.fills: list[tuple[torch.Tensor, torch.Tensor, tuple[float, float, float]]] = []  # (centre, half, fill)

    def const(self, *values) -> torch.Tensor:
        return _constant(values, self.device)

    def rand(self, *shape) -> torch.Tensor:
        """[B, *shape] uniform in [0, 1) (float64): per image from its key, or from the generator."""
        self.draws += 1
        if self.keys is not None:
            return rng.uniform(self.keys, shape, stream=self.draws)
        return torch.rand(self.batch, *shape, device=self.device, generator=self.generator, dtype=_MATH)

    def compose(self, scale=None, offset=None) -> None:
        """Follow the view with a map p -> scale * p + offset (new view coords -> current view coords)."""
        if offset is not None:
            self.offset = torch.addcmul(self.offset, self.scale, offset)
        if scale is not None:
            self.scale = self.scale * scale
        self.geometric = True

    def mark_fill(self, fill) -> None:
        """Points about to be taken from outside the current view get `fill` (constant padding)."""
        self.fills.append((self.offset, self.scale.abs() + _EDGE_EPS, fill))  # compose never mutates in place

    def crop(self, start: torch.Tensor, crop, out_size) -> None:
        """The window [start, start + crop) of the view, in its pixels; start [B,2] (left, top); crop [B,2]
        or host (w, h). The window becomes the view, `out_size` its host (h, w) if known."""
        crop = crop if isinstance(crop, torch.Tensor) else self.const(*crop)
        scale = crop / self.extent
        offset = (start * 2 + crop) / self.extent - 1
        self.compose(scale, offset)
        self.resize(crop, out_size)

    def resize(self, extent, out_size) -> None:
        extent = extent if isinstance(extent, torch.Tensor) else self.const(*extent)
        self.extent = extent.expand(self.batch, 2) if extent.dim() == 1 else extent
        self.size = out_size

    def theta(self) -> torch.Tensor:
        theta = torch.zeros(self.batch, 2, 3, device=self.device, dtype=torch.float32)
        theta[:, :, 2] = self.offset
        theta[:, :, :2].diagonal(dim1=1, dim2=2).copy_(self.scale)
        return theta


def _fill_masks(view: _View, size: tuple[int, int]):
    """Per fill: outside mask [B, h, w] (True = the pixel's source point is in the padded area)."""
    h, w = size
    src_x = torch.addcmul(view.offset[:, 0:1], view.scale[:, 0:1], _pixel_centres(w, view.device))  # [B, w]
    src_y = torch.addcmul(view.offset[:, 1:2], view.scale[:, 1:2], _pixel_centres(h, view.device))  # [B, h]
    masks = []
    for centre, half, fill in view.fills:
        out_x = (src_x - centre[:, 0:1]).abs_() > half[:, 0:1]
        out_y = (src_y - centre[:, 1:2]).abs_() > half[:, 1:2]
        masks.append((out_y[:, :, None] | out_x[:, None, :], fill))
    return masks


def _size_pair(size, name: str) -> tuple[int, int]:
    """torchvision's size convention for crops: int -> square, (s,) -> square, (h, w)."""
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        pair = (int(size), int(size))
    elif isinstance(size, Sequence) and len(size) == 1:
        pair = (int(size[0]), int(size[0]))
    elif isinstance(size, Sequence) and len(size) == 2:
        pair = (int(size[0]), int(size[1]))
    else:
        raise InrUsageError(f"{name}: size must be an int or a (height, width) pair, got {size!r}")
    if min(pair) < 1:
        raise InrUsageError(f"{name}: size must be positive, got {size!r}")
    return pair


def _per_channel(value, name: str, what: str) -> tuple[float, float, float]:
    """A number or 1 or 3 numbers -> one float per channel (R, G, B)."""
    if isinstance(value, numbers.Real):
        return (float(value),) * 3
    if isinstance(value, Sequence) and len(value) in (1, 3):
        values = tuple(float(v) for v in value)
        return values * 3 if len(values) == 1 else values
    raise InrUsageError(f"{name}: {what} must be a number or 3 numbers (one per channel), got {value!r}")


def _check_padding_mode(padding_mode: str, name: str) -> None:
    if padding_mode != "constant":
        raise InrUsageError(
            f"{name}: padding_mode={padding_mode!r} is not supported: coordinate-space padding is "
            f"'constant' only (the padded area gets `fill`; the SIREN is not asked to extrapolate)")


class Transform:
    """Base class. `pipeline(heights, widths, generator=None, native_size=None) -> AugmentPlan`.

    heights/widths: [B] native image sizes on the batch's device (e.g. `bank.heights[idx]`).
    native_size: (h, w) host ints when every image of the batch has that size (lets the output size of
    size-dependent ops such as `Resize(int)` be known without a host sync).
    """

    is_post = False  # runs on decoded pixels (Normalize) rather than on coordinates

    def _apply(self, view: _View) -> None:  # geometric ops
        raise NotImplementedError

    def _pixels(self, view: _View, size: tuple[int, int]):
        """A pixel op's work for the planned batch: draws its per-image parameters now and returns
        fn(images, rows) applying them to the decoded rows `rows` of the batch."""
        raise NotImplementedError

    def _ops(self) -> list["Transform"]:
        return [self]

    def __call__(self, heights: torch.Tensor, widths: torch.Tensor, *, generator: torch.Generator | None = None,
                 native_size: tuple[int, int] | None = None, keys: torch.Tensor | None = None) -> AugmentPlan:
        if not isinstance(heights, torch.Tensor):
            raise InrUsageError("augment: heights/widths must be tensors of the batch's native sizes")
        view = _View(heights, widths, native_size, generator, keys)
        ops = self._ops()
        posts: list[Transform] = []
        for op in ops:
            if op.is_post:
                posts.append(op)
            elif posts:
                raise InrUsageError(f"augment: {type(op).__name__} comes after {type(posts[-1]).__name__}; "
                                    f"put geometric transforms before {type(posts[-1]).__name__} (a pixel op)")
            else:
                op._apply(view)
        if view.size is None:
            raise InrUsageError(
                "augment: the output size depends on each image's own size (mixed native sizes); end the "
                "pipeline with a fixed-size transform (RandomResizedCrop, CenterCrop, RandomCrop, "
                "Resize((h, w))) or pass size=")
        size = view.size
        theta = view.theta() if view.geometric else None
        fill_masks = _fill_masks(view, size) if view.fills else []
        pixel_ops = [op._pixels(view, size) for op in posts]

        def finish(images: torch.Tensor, rows=slice(None)) -> torch.Tensor:
            for outside, fill in fill_masks:
                outside = outside[rows]
                if fill[0] == fill[1] == fill[2]:
                    images.masked_fill_(outside[:, None], fill[0])
                else:
                    for channel in range(3):
                        images[:, channel].masked_fill_(outside, fill[channel])
            for fn in pixel_ops:
                images = fn(images, rows)
            return images

        return AugmentPlan(theta, size, finish, per_image=not any(isinstance(op, Lambda) for op in posts))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class Compose(Transform):
    """Apply transforms in order (geometric ones compose into one theta; the pixel ops follow them).
    A plain callable in the list is a pixel op on the decoded [B,3,H,W] batch (see `Lambda`)."""

    def __init__(self, transforms: Sequence[Transform]):
        transforms = list(transforms)
        for k, t in enumerate(transforms):
            if not isinstance(t, Transform):
                if not callable(t):
                    raise InrUsageError(f"Compose: {t!r} is neither an inrfmt.augment transform nor a callable "
                                        f"on a [B,3,H,W] batch")
                transforms[k] = Lambda(t)
        self.transforms = transforms

    def _ops(self) -> list[Transform]:
        return [op for t in self.transforms for op in t._ops()]

    def __repr__(self) -> str:
        inner = "".join(f"\n    {t!r}," for t in self.transforms)
        return f"Compose([{inner}\n])"


class RandomResizedCrop(Transform):
    """torchvision.transforms.RandomResizedCrop: a random area fraction in `scale` and aspect ratio
    (w/h) in `ratio` of the image, output at `size`. Same integer geometry as torchvision's get_params:
    10 tries, log-uniform ratio, rounded w/h, uniform integer offset; central-crop fallback."""

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0), interpolation=None, antialias=True):
        self.size = _size_pair(size, "RandomResizedCrop")
        if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
            raise InrUsageError(f"RandomResizedCrop: scale must be (min, max) with 0 < min <= max, got {scale!r}")
        if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
            raise InrUsageError(f"RandomResizedCrop: ratio must be (min, max) with 0 < min <= max, got {ratio!r}")
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))

    def _apply(self, view: _View) -> None:
        tries = 10
        extent = view.extent[:, None, :]  # [B, 1, 2] (w, h)
        draws = view.rand(tries, 4)  # per try: area fraction, log aspect ratio, x and y offsets
        area = view.extent.prod(dim=1, keepdim=True)
        target = draws[..., 0].mul(self.scale[1] - self.scale[0]).add_(self.scale[0]).mul_(area)
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = draws[..., 1].mul(log_hi - log_lo).add_(log_lo).exp_()
        # torchvision: w = round(sqrt(target * aspect)), h = round(sqrt(target / aspect))
        crop = torch.stack([target * aspect, target / aspect], dim=-1).sqrt_().round_()  # [B, tries, 2]
        valid = ((crop > 0) & (crop <= extent)).all(dim=-1)
        start = (extent - crop + 1).mul_(draws[..., 2:]).floor_()  # uniform integer offset
        # An 11th try that always fits: torchvision's fallback, the central crop at the clamped ratio.
        w, h = view.extent[:, 0], view.extent[:, 1]
        in_ratio = w / h
        fallback = torch.stack([torch.where(in_ratio > self.ratio[1], (h * self.ratio[1]).round_(), w),
                                torch.where(in_ratio < self.ratio[0], (w / self.ratio[0]).round_(), h)], dim=1)
        crop = torch.cat([crop, fallback[:, None]], dim=1)
        start = torch.cat([start, ((view.extent - fallback) / 2).floor_()[:, None]], dim=1)
        valid = torch.cat([valid, valid.new_ones(view.batch, 1)], dim=1)
        first = valid.to(torch.uint8).argmax(dim=1)  # the first try that fits (argmax returns the first max)
        pick = first[:, None, None].expand(view.batch, 1, 2)
        view.crop(start.gather(1, pick).squeeze(1), crop.gather(1, pick).squeeze(1), None)
        view.resize((self.size[1], self.size[0]), self.size)


class _RandomFlip(Transform):
    axis = "x"

    def __init__(self, p=0.5):
        if not 0.0 <= float(p) <= 1.0:
            raise InrUsageError(f"{type(self).__name__}: p must be in [0, 1], got {p!r}")
        self.p = float(p)

    def _apply(self, view: _View) -> None:
        flip = view.rand(1) < self.p  # [B, 1]
        mirrored = view.const(-1.0, 1.0) if self.axis == "x" else view.const(1.0, -1.0)
        view.compose(scale=torch.where(flip, mirrored, view.const(1.0, 1.0)))


class RandomHorizontalFlip(_RandomFlip):
    """torchvision.transforms.RandomHorizontalFlip(p=0.5): mirror left-right with probability p."""

    axis = "x"


class RandomVerticalFlip(_RandomFlip):
    """torchvision.transforms.RandomVerticalFlip(p=0.5): mirror top-bottom with probability p."""

    axis = "y"


def _padding_ltrb(padding, name: str) -> tuple[int, int, int, int]:
    if padding is None:
        return (0, 0, 0, 0)
    if isinstance(padding, numbers.Integral) and not isinstance(padding, bool):
        values = (int(padding),) * 4
    elif isinstance(padding, Sequence) and len(padding) == 1:
        values = (int(padding[0]),) * 4
    elif isinstance(padding, Sequence) and len(padding) == 2:
        values = (int(padding[0]), int(padding[1]), int(padding[0]), int(padding[1]))
    elif isinstance(padding, Sequence) and len(padding) == 4:
        values = tuple(int(v) for v in padding)
    else:
        raise InrUsageError(f"{name}: padding must be an int or 1, 2 or 4 ints, got {padding!r}")
    if min(values) < 0:
        raise InrUsageError(f"{name}: padding must be >= 0, got {padding!r}")
    return values


class RandomCrop(Transform):
    """torchvision.transforms.RandomCrop(size, padding=None, pad_if_needed=False, fill=0,
    padding_mode="constant"): pad (constant `fill`), then cut a `size` window at a uniform integer
    offset. `RandomCrop(32, padding=4)` is the CIFAR recipe. When the padded view is smaller than the
    crop and `pad_if_needed` is off, torchvision raises; that is checked here when the batch's size is
    known on the host, otherwise the window is clamped to offset 0 and the uncovered part filled."""

    def __init__(self, size, padding=None, pad_if_needed=False, fill=0, padding_mode="constant"):
        self.size = _size_pair(size, "RandomCrop")
        self.padding = _padding_ltrb(padding, "RandomCrop")
        self.pad_if_needed = bool(pad_if_needed)
        self.fill = _per_channel(fill, "RandomCrop", "fill")
        _check_padding_mode(padding_mode, "RandomCrop")
        self.padding_mode = padding_mode

    def _apply(self, view: _View) -> None:
        crop_h, crop_w = self.size
        pad_l, pad_t, pad_r, pad_b = self.padding
        known = view.size
        if known is not None and not self.pad_if_needed:
            padded = (known[0] + pad_t + pad_b, known[1] + pad_l + pad_r)
            if padded[0] < crop_h or padded[1] < crop_w:
                raise InrUsageError(f"RandomCrop: crop size {self.size} is larger than the padded image "
                                    f"{padded}; pass pad_if_needed=True or a smaller size")
        crop = view.const(crop_w, crop_h)
        padded = view.extent + view.const(pad_l + pad_r, pad_t + pad_b)
        before = view.const(pad_l, pad_t)
        if self.pad_if_needed:  # torchvision pads both sides by the shortfall
            short = (crop - padded).clamp_(min=0)
            before = before + short
            padded = torch.add(padded, short, alpha=2)
        room = (padded - crop + 1).clamp_(min=1)  # torchvision: randint(0, padded - crop + 1)
        start = view.rand(2).mul_(room).floor_().sub_(before)
        if any(self.padding) or self.pad_if_needed or known is None or known[0] < crop_h or known[1] < crop_w:
            view.mark_fill(self.fill)
        view.crop(start, (crop_w, crop_h), self.size)


class RandomTranslate(Transform):
    """Shift by a uniform integer number of pixels in [-max_shift, max_shift] along each axis, keeping the
    size; uncovered pixels get `fill` (the CIFAR "pad-and-crop" recipe: equal to
    `RandomCrop(size_of_the_image, padding=max_shift, fill=fill)`). `max_shift` may be (dx, dy)."""

    def __init__(self, max_shift, fill=0):
        if isinstance(max_shift, numbers.Integral) and not isinstance(max_shift, bool):
            shift = (int(max_shift), int(max_shift))
        elif isinstance(max_shift, Sequence) and len(max_shift) == 2:
            shift = (int(max_shift[0]), int(max_shift[1]))
        else:
            raise InrUsageError(f"RandomTranslate: max_shift must be an int or (dx, dy), got {max_shift!r}")
        if min(shift) < 0:
            raise InrUsageError(f"RandomTranslate: max_shift must be >= 0, got {max_shift!r}")
        self.max_shift = shift
        self.fill = _per_channel(fill, "RandomTranslate", "fill")

    def _apply(self, view: _View) -> None:
        dx, dy = self.max_shift
        start = view.rand(2).mul_(view.const(2 * dx + 1, 2 * dy + 1)).floor_().sub_(view.const(dx, dy))
        if dx or dy:
            view.mark_fill(self.fill)
        view.crop(start, view.extent, view.size)


class Resize(Transform):
    """torchvision.transforms.Resize(size, interpolation=..., max_size=None, antialias=True).
    `size` int: the shorter side becomes `size`, the longer `int(size * long / short)` (aspect kept);
    (h, w): exactly that. A resize of a continuous image changes only the sampling density."""

    def __init__(self, size, interpolation=None, max_size=None, antialias=True):
        if isinstance(size, numbers.Integral) and not isinstance(size, bool):
            self.size, self._short = int(size), True
        elif isinstance(size, Sequence) and len(size) == 1:
            self.size, self._short = int(size[0]), True
        else:
            self.size, self._short = _size_pair(size, "Resize"), False
        if self._short and self.size < 1:
            raise InrUsageError(f"Resize: size must be positive, got {size!r}")
        if max_size is not None and (not self._short or max_size <= self.size):
            raise InrUsageError(f"Resize: max_size={max_size!r} needs an int size smaller than it")
        self.max_size = max_size

    def _apply(self, view: _View) -> None:
        if not self._short:
            view.resize((self.size[1], self.size[0]), self.size)
            return
        short = view.extent.amin(dim=1, keepdim=True)
        new = (view.extent * self.size).div_(short).floor_()  # int(size * long / short), as torchvision
        if self.max_size is not None:
            longest = new.amax(dim=1, keepdim=True)
            capped = (new * self.max_size).div_(longest).floor_()  # int(max_size * new_short / new_long)
            new = torch.where(longest > self.max_size, capped, new)
        view.resize(new, resized_size(*view.size, self.size, self.max_size) if view.size is not None else None)


class CenterCrop(Transform):
    """torchvision.transforms.CenterCrop(size): the central window (offset round((H - h) / 2)); a crop
    larger than the image is padded with 0 around it, as torchvision does.
    `Compose([Resize(s), CenterCrop(c)])` is the usual aspect-preserving evaluation view."""

    def __init__(self, size):
        self.size = _size_pair(size, "CenterCrop")

    def _apply(self, view: _View) -> None:
        crop_h, crop_w = self.size
        # torchvision: offset round((s - c) / 2); a crop larger than the image is first padded by
        # (c - s) // 2 before it, which puts the window at -((c - s) // 2) = ceil((s - c) / 2).
        half = (view.extent - view.const(crop_w, crop_h)).mul_(0.5)
        start = torch.where(half < 0, torch.ceil(half), torch.round(half))
        known = view.size
        if known is None or known[0] < crop_h or known[1] < crop_w:
            view.mark_fill((0.0, 0.0, 0.0))
        view.crop(start, (crop_w, crop_h), self.size)


class Normalize(Transform):
    """torchvision.transforms.Normalize(mean, std, inplace=False): (x - mean) / std per channel, run on
    the decoded batch. It always works in place on the decoder's fresh output (never on user data)."""

    is_post = True

    def __init__(self, mean, std, inplace=False):
        self.mean = _per_channel(mean, "Normalize", "mean")
        self.std = _per_channel(std, "Normalize", "std")
        if min(abs(s) for s in self.std) == 0:
            raise InrUsageError(f"Normalize: std must be non-zero, got {std!r}")
        self._cache: dict = {}

    def _pixels(self, view: _View, size):
        return lambda images, rows: self._post(images)

    def _post(self, images: torch.Tensor) -> torch.Tensor:
        key = (images.device, images.dtype)
        if key not in self._cache:  # upload once per device/dtype
            mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
            inv_std = torch.tensor([1.0 / s for s in self.std], dtype=images.dtype,
                                   device=images.device).view(1, 3, 1, 1)
            self._cache[key] = (mean, inv_std)
        mean, inv_std = self._cache[key]
        return images.sub_(mean).mul_(inv_std)


class Lambda(Transform):
    """A pixel op from any callable taking the decoded [B,3,H,W] batch (on the device, in the loader's
    dtype) and returning a batch of the same shape, as torchvision.transforms.Lambda. It is called once per
    batch, after the geometric ops; its own randomness is its own affair (the loader cannot replay it on
    resume). A plain callable given as `augment` or inside `Compose` is wrapped in one."""

    is_post = True

    def __init__(self, lambd):
        if not callable(lambd):
            raise InrUsageError(f"Lambda: {lambd!r} is not callable")
        self.lambd = lambd

    def _pixels(self, view: _View, size):
        return lambda images, rows: self.lambd(images)


def _is_pair(value) -> bool:
    """A (min, max) pair of real numbers."""
    return isinstance(value, Sequence) and len(value) == 2 and all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value)


def _factor_range(value, name: str, center: float, bound: tuple[float, float] | None, clip_first: bool):
    """torchvision ColorJitter._check_input: a number v -> [center - v, center + v] (clipped at 0 for the
    multiplicative factors), or (min, max). None when the range is just `center` (the op is left out)."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        if value < 0:
            raise InrUsageError(f"ColorJitter: {name} must be non-negative, got {value!r}")
        low, high = center - float(value), center + float(value)
        if clip_first:
            low = max(low, 0.0)
    elif _is_pair(value):
        low, high = float(value[0]), float(value[1])
    else:
        raise InrUsageError(f"ColorJitter: {name} must be a number or a (min, max) pair, got {value!r}")
    lo_bound, hi_bound = bound if bound is not None else (0.0, math.inf)
    if not lo_bound <= low <= high <= hi_bound:
        raise InrUsageError(f"ColorJitter: {name} values must be in [{lo_bound}, {hi_bound}] with min <= max, "
                            f"got {value!r}")
    return None if low == high == center else (low, high)


def _grey(images: torch.Tensor) -> torch.Tensor:
    """[B,1,H,W] luma with torchvision's weights (rgb_to_grayscale)."""
    r, g, b = images.unbind(dim=1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _blend(a: torch.Tensor, b: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """torchvision _blend for float images: (ratio * a + (1 - ratio) * b) clamped to [0, 1]; ratio [B,1,1,1]."""
    return (ratio * a + (1.0 - ratio) * b).clamp_(0.0, 1.0)


def _rgb_to_hsv(images: torch.Tensor) -> torch.Tensor:
    """torchvision's _rgb2hsv, batched."""
    r, g, b = images.unbind(dim=1)
    maxc = images.amax(dim=1)
    minc = images.amin(dim=1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_divisor = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / cr_divisor, (maxc - g) / cr_divisor, (maxc - b) / cr_divisor
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), dim=1)


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """torchvision's _hsv2rgb, batched."""
    h, s, v = hsv.unbind(dim=1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int32) % 6
    p = (v * (1.0 - s)).clamp_(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp_(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp_(0.0, 1.0)
    mask = (i.unsqueeze(1) == torch.arange(6, device=i.device).view(1, -1, 1, 1)).to(hsv.dtype)  # [B,6,H,W]
    a1 = torch.stack((v, q, p, p, t, v), dim=1)
    a2 = torch.stack((t, v, v, q, p, p), dim=1)
    a3 = torch.stack((p, p, t, v, v, q), dim=1)
    return torch.einsum("bijk,bxijk->bxjk", mask, torch.stack((a1, a2, a3), dim=1))


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """torchvision adjust_hue with a per-image `shift` [B,1,1] in [-0.5, 0.5] (float images in [0, 1])."""
    hsv = _rgb_to_hsv(images)
    hsv[:, 0] = (hsv[:, 0] + shift) % 1.0
    return _hsv_to_rgb(hsv)


class ColorJitter(Transform):
    """torchvision.transforms.ColorJitter(brightness=0, contrast=0, saturation=0, hue=0), per image on the
    decoded batch: every image draws its own factors (uniform in each range) and its own order of the four
    adjustments, and each adjustment is torchvision's (brightness: x * f; contrast: blend with the mean
    luma; saturation: blend with the luma; hue: a shift in HSV), clamped to [0, 1] like torchvision's float
    path. Put it before Normalize, as in torchvision pipelines."""

    is_post = True
    _OPS = ("brightness", "contrast", "saturation", "hue")

    def __init__(self, brightness=0, contrast=0, saturation=0, hue=0):
        self.brightness = _factor_range(brightness, "brightness", 1.0, None, True)
        self.contrast = _factor_range(contrast, "contrast", 1.0, None, True)
        self.saturation = _factor_range(saturation, "saturation", 1.0, None, True)
        self.hue = _factor_range(hue, "hue", 0.0, (-0.5, 0.5), False)

    def draw(self, view: _View) -> tuple[torch.Tensor, torch.Tensor]:
        """(order [B,4]: each image's permutation of the four ops, factors [B,4] in the op order above; an
        op left out gets its neutral factor)."""
        order = view.rand(4).argsort(dim=1)
        u = view.rand(4)
        factors = []
        for k, name in enumerate(self._OPS):
            bounds = getattr(self, name)
            neutral = 0.0 if name == "hue" else 1.0
            factors.append(u[:, k] * (bounds[1] - bounds[0]) + bounds[0] if bounds else
                           torch.full_like(u[:, k], neutral))
        return order, torch.stack(factors, dim=1)

    def _pixels(self, view: _View, size):
        order, factors = self.draw(view)
        return lambda images, rows: self.apply(images, order[rows], factors[rows])

    def apply(self, images: torch.Tensor, order: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        """Adjust each image b with factors[b] in the order order[b] (in place; computed in float32)."""
        x = images if images.dtype == torch.float32 else images.float()
        enabled = [k for k, name in enumerate(self._OPS) if getattr(self, name) is not None]
        f = factors.to(x.dtype).view(-1, 4, 1, 1, 1)
        for stage in range(4):
            for k in enabled:
                chosen = (order[:, stage] == k).view(-1, 1, 1, 1)
                if k == 0:
                    adjusted = _blend(x, torch.zeros_like(x[:, :1]), f[:, 0])
                elif k == 1:
                    adjusted = _blend(x, _grey(x).mean(dim=(1, 2, 3), keepdim=True), f[:, 1])
                elif k == 2:
                    adjusted = _blend(x, _grey(x), f[:, 2])
                else:
                    adjusted = adjust_hue(x, f[:, 3, 0])
                x = torch.where(chosen, adjusted, x)
        return images.copy_(x)


class RandomErasing(Transform):
    """torchvision.transforms.RandomErasing(p=0.5, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0,
    inplace=False), per image on the decoded batch: with probability p a rectangle of a random area
    fraction in `scale` and aspect ratio (h/w) in `ratio` (log-uniform, 10 tries as torchvision's
    get_params; no erasing when none fits) at a uniform integer position gets `value` (a number, one per
    channel, or "random" for standard normal noise). It usually comes after Normalize, as in torchvision."""

    is_post = True

    def __init__(self, p=0.5, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0, inplace=False):
        self.p = check_fraction("RandomErasing: p", p)
        if not _is_pair(scale) or not 0 <= scale[0] <= scale[1] <= 1:
            raise InrUsageError(f"RandomErasing: scale must be (min, max) within [0, 1], got {scale!r}")
        if not _is_pair(ratio) or not 0 < ratio[0] <= ratio[1]:
            raise InrUsageError(f"RandomErasing: ratio must be (min, max) with 0 < min <= max, got {ratio!r}")
        if isinstance(value, str):
            if value != "random":
                raise InrUsageError(f"RandomErasing: value must be a number, 3 numbers or 'random', got {value!r}")
            self.value = "random"
        else:
            self.value = _per_channel(value, "RandomErasing", "value")
        self.scale, self.ratio = (float(scale[0]), float(scale[1])), (float(ratio[0]), float(ratio[1]))

    def draw(self, view: _View, size: tuple[int, int]) -> torch.Tensor:
        """[B, 4] (top, left, height, width) of each image's rectangle; height 0 = not erased."""
        h_img, w_img = size
        tries = 10
        erase = view.rand(1)[:, 0] < self.p
        u = view.rand(tries, 4)
        area = u[..., 0].mul(self.scale[1] - self.scale[0]).add_(self.scale[0]).mul_(h_img * w_img)
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = u[..., 1].mul(log_hi - log_lo).add_(log_lo).exp_()
        h = (area * aspect).sqrt_().round_()  # torchvision: int(round(sqrt(area * aspect)))
        w = (area / aspect).sqrt_().round_()
        fits = (h < h_img) & (w < w_img)
        top = u[..., 2].mul(h_img - h + 1).floor_()
        left = u[..., 3].mul(w_img - w + 1).floor_()
        rect = torch.stack([top, left, h, w], dim=-1)  # [B, tries, 4]
        first = fits.to(torch.uint8).argmax(dim=1)  # the first try that fits
        pick = rect.gather(1, first.view(-1, 1, 1).expand(-1, 1, 4)).squeeze(1)
        keep = erase & fits.any(dim=1)
        return torch.where(keep[:, None], pick, torch.zeros_like(pick))

    def _pixels(self, view: _View, size):
        rect = self.draw(view, size)
        noise = None
        if self.value == "random":  # standard normal by Box-Muller from two uniforms per value
            u = view.rand(2, 3, *size)
            noise = torch.sqrt(-2.0 * torch.log1p(-u[:, 0])) * torch.cos(2.0 * math.pi * u[:, 1])
        return lambda images, rows: self.apply(images, rect[rows], None if noise is None else noise[rows])

    def apply(self, images: torch.Tensor, rect: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Erase rect [B,4] (top, left, height, width) of each image, in place."""
        h_img, w_img = images.shape[-2:]
        ys = _arange(h_img, images.device).view(1, -1, 1)
        xs = _arange(w_img, images.device).view(1, 1, -1)
        top, left, h, w = (rect[:, k].view(-1, 1, 1) for k in range(4))
        inside = ((ys >= top) & (ys < top + h) & (xs >= left) & (xs < left + w)).unsqueeze(1)  # [B,1,H,W]
        if noise is not None:
            return torch.where(inside, noise.to(images.dtype), images, out=images)
        value = self.value
        if value[0] == value[1] == value[2]:
            return images.masked_fill_(inside, value[0])
        for channel in range(3):
            images[:, channel:channel + 1].masked_fill_(inside, value[channel])
        return images


def _arange(n: int, device) -> torch.Tensor:
    """[n] 0..n-1 as float64 on `device`, cached (no upload per batch)."""
    return _cached(_GRIDS, (str(device), "arange", n), 256, lambda: torch.arange(n, device=device, dtype=_MATH))


def with_output_size(pipeline: Transform | None, size) -> Transform:
    """`pipeline` (or nothing) followed by a Resize to `size` ((h, w) or int), placed before the pipeline's
    pixel ops (Normalize), so the decode itself happens at `size`."""
    ops = pipeline._ops() if pipeline is not None else []
    geometric = [op for op in ops if not op.is_post]
    pixel = [op for op in ops if op.is_post]
    return Compose(geometric + [Resize(size)] + pixel)
