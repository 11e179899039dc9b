"""TensorBank: a whole .inr dataset as one set of contiguous tensors on one device.

The bank keeps hidden-layer weights in the file's storage dtype (int8 with per-image per-layer scales, or
float16/float32), and the first/last layers and biases in the file's float dtype: dequantization and
upcasting happen inside the decoders. Hidden weights are held in one of two layouts:

  dense    [N,H,W,W], pruned weights stored as zeros. The decoders read it directly (fastest).
  compact  the file's own representation: the kept values of all images back to back ([total_nnz]), the
           pruning bitmaps ([N, ceil(H*W*W/8)], numpy packbits order) and each image's first value
           (int64 [N]). A decode expands its batch's weights to dense first (a [B,H,W,W] temporary), so
           the bank costs what the file's payload does however much was pruned.

`layout="auto"` (the default) keeps the bank within 1.1x the file's bytes: dense when that fits, compact
when pruning makes the dense form larger than that (and compact is smaller).

A format 2 (coded) file holds every parameter as a small integer code on the file's `CodeGrid`. Its bank
keeps the codes packed (layout "coded", the default for such files):

  coded    codes int32 [N, words_per_image]: per parameter group g (spec.param_groups order) lanes of
           pw_g = the smallest of 4, 8, 16 bits >= grid.bits[g], each group starting at a word boundary of
           the image's row; lane i of g holds u = q + 2^(b_g-1) at bit (i*pw_g) % 32 of word
           code_offsets[g] + (i*pw_g) // 32 (little-endian within a word). theta0 float32 [P] (the prior's
           values, zeros without one), the grid, and small per-group tensors (code_offsets, code_widths).
           A decode unpacks its batch's codes and dequantizes them (grid.values) into a [B, P] temporary,
           so the bank costs about the codes' raw bits however the file's entropy coding did.

`TensorBank.from_file` fills the preallocated bank chunk by chunk: worker threads read each chunk through
`InrFile.read_payload` (checked and decompressed there); each payload goes to the device through one of two
alternating pinned staging buffers on CUDA, and is unpacked there (bitmaps expanded for dense, stored as they
are for compact), so decompressing the next chunks overlaps the copy of this one and at most a few chunks
are ever in host memory. A coded file's chunks are read with `InrFile.read_codes` (rANS-decoded there,
without the GIL) and packed by the same worker threads (numpy), then copied the same way.
"""
from __future__ import annotations

import functools
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import device as devices
from .errors import InrUsageError
from .grid import CodeGrid
from .quantize import quantize_hidden
from .spec import DTYPES, FLOAT_DTYPES, HIDDEN_DTYPES, PARAM_CLASSES, param_groups, unflatten_params

if TYPE_CHECKING:
    from .reader import ChunkPayload, InrFile
    from .spec import Architecture

# The torch dtype of each storage dtype name of the format.
TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}

# Per-image tensors of a bank, in a fixed order (the order of WeightBatch's fields).
_WEIGHT_FIELDS = ("first_w", "first_b", "hidden_w", "hidden_scale", "hidden_b", "last_w", "last_b")
_COMPACT_FIELDS = ("hidden_values", "hidden_masks", "hidden_offsets")
_META_FIELDS = ("labels", "heights", "widths")
_FLOAT_TENSOR_DTYPES = tuple(TORCH_DTYPES[n] for n in FLOAT_DTYPES)
_HIDDEN_TENSOR_DTYPES = tuple(TORCH_DTYPES[n] for n in HIDDEN_DTYPES)
_CODED_FIELDS = ("codes", "theta0")
LAYOUTS = ("auto", "dense", "compact", "coded")
# layout="auto" keeps the bank within this factor of the file's bytes when the compact layout can.
AUTO_MAX_BANK_OVER_FILE = 1.1
LANE_WIDTHS = (4, 8, 16)  # bits of a coded bank's lanes: a power of two, so lanes never straddle words
# Images packed (or dequantized) at a time by from_codes and to_layout: bounds their temporaries.
_BLOCK_ELEMENTS = 1 << 22


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in TORCH_DTYPES.items() if value == dtype)


# -- the coded layout ---------------------------------------------------------------------------------
def lane_width(bits: int) -> int:
    """Bits of the lane a coded bank stores a `bits`-bit code in: the smallest of LANE_WIDTHS >= bits."""
    return next(w for w in LANE_WIDTHS if w >= bits)


@dataclass(frozen=True, eq=False)
class CodedLayout:
    """Where a coded bank keeps every code of an image in its row of int32 words (module docstring).

    Per group (spec.param_groups order): lane_widths (4, 8 or 16) and word_offsets (first word), int32 [G].
    Per parameter, the unpacking recipe u = (row[word] >> shift) & mask, q = u - half: word int64 [P],
    shift, mask and half int32 [P]. `groups` has per group (first parameter, stop, lane width, first word,
    half) for packing, `last_words` each group's last word (the only one that can hold padding lanes).
    `runs` merges the groups of a hidden class into one strided run when their lanes and sizes agree (always
    for a grid from `CodeGrid.from_widths`), for unpacking with a few whole-batch views: per run (first
    parameter, parameter stride, count, size, lane width, first word, word stride)."""

    lane_widths: np.ndarray
    word_offsets: np.ndarray
    words_per_image: int
    word: np.ndarray
    shift: np.ndarray
    mask: np.ndarray
    half: np.ndarray
    groups: tuple
    last_words: np.ndarray
    runs: tuple

    def held_bytes(self, n: int) -> int:
        """Device bytes of a coded bank of n images: the packed rows, labels, heights and widths per image;
        once per bank theta0, code_offsets, code_widths and the unpacking recipe."""
        p, g = len(self.word), len(self.lane_widths)
        return n * (4 * self.words_per_image + 8 + 4 + 4) + 4 * p + 8 * g + (8 + 3 * 4) * p


@functools.lru_cache(maxsize=32)
def coded_layout(grid: CodeGrid) -> CodedLayout:
    """The coded layout of `grid` (cached per grid)."""
    arch = grid.arch
    p = arch.params_per_image
    word = np.empty(p, np.int64)
    shift, mask, half = (np.empty(p, np.int32) for _ in range(3))
    widths, offsets, groups = [], [], []
    start = 0
    for g, b in zip(param_groups(arch), grid.bits):
        pw, b = lane_width(int(b)), int(b)
        per_word = 32 // pw
        i = np.arange(g.size)
        word[g.offset:g.stop] = start + i // per_word
        shift[g.offset:g.stop] = (i % per_word) * pw
        mask[g.offset:g.stop] = (1 << pw) - 1
        half[g.offset:g.stop] = 1 << (b - 1)
        widths.append(pw)
        offsets.append(start)
        groups.append((g.offset, g.stop, pw, start, np.int32(1 << (b - 1))))
        start += -(-g.size // per_word)
    last = np.array([w - 1 for w in offsets[1:] + [start]], np.int64)
    runs, by_class = [], {}
    for g, group in zip(param_groups(arch), groups):
        by_class.setdefault(g.cls, []).append(group)
    for members in by_class.values():
        (first, stop, pw, first_word, _), count = members[0], len(members)
        param_step = members[1][0] - first if count > 1 else 0
        word_step = members[1][3] - first_word if count > 1 else 0
        regular = all(m[1] - m[0] == stop - first and m[2] == pw and m[0] == first + i * param_step
                      and m[3] == first_word + i * word_step for i, m in enumerate(members))
        if regular:
            runs.append((first, param_step, count, stop - first, pw, first_word, word_step))
        else:  # e.g. hidden layers with different code widths: one run per group
            runs += [(m[0], 0, 1, m[1] - m[0], m[2], m[3], 0) for m in members]
    return CodedLayout(np.array(widths, np.int32), np.array(offsets, np.int32), start, word, shift, mask, half,
                       tuple(groups), last, tuple(runs))


_LE_INT32 = np.dtype("<i4")


def pack_codes(codes: np.ndarray, layout: CodedLayout, out: np.ndarray | None = None) -> np.ndarray:
    """Codes int [n, P] -> the coded bank's rows int32 [n, words_per_image] (into `out` when given). Every
    code must lie in its group's range (CodeGrid.check_codes; the reader's decoder guarantees it): one
    outside would spill into its neighbours' lanes."""
    n = codes.shape[0]
    # Lanes are written through byte and 16-bit views of little-endian words: one pass per group, and
    # the words' values are the layout's on any host.
    rows = out if out is not None and out.dtype == _LE_INT32 else np.empty((n, layout.words_per_image), _LE_INT32)
    rows[:, layout.last_words] = 0  # padding lanes
    as_bytes, as_u16 = rows.view(np.uint8), rows.view("<u2")
    for first, stop, pw, word, half in layout.groups:
        src, size = codes[:, first:stop], stop - first
        if pw == 8:
            np.add(src, half, out=as_bytes[:, 4 * word:4 * word + size], casting="unsafe")
        elif pw == 16:
            np.add(src, half, out=as_u16[:, 2 * word:2 * word + size], casting="unsafe")
        else:  # two 4-bit lanes per byte, the first in the low nibble
            u = np.zeros((n, size + size % 2), np.uint8)
            np.add(src, half, out=u[:, :size], casting="unsafe")
            dst = as_bytes[:, 4 * word:4 * word + (size + 1) // 2]
            np.left_shift(u[:, 1::2], 4, out=dst)
            dst |= u[:, 0::2]
    if out is not None and rows is not out:
        out[...] = rows
        return out
    return rows.astype(np.int32, copy=False)


class TensorBank:
    """Per-image SIREN weights of N images, as contiguous tensors on one device.

    Fields (docs/internals.md): first_w [N,W,2], first_b [N,W], hidden_b [N,H,W], last_w [N,3,W], last_b [N,3]
    (all float32, or all float16), hidden_scale f32 [N,H], labels int64 [N], heights int32 [N],
    widths int32 [N]; hidden weights either dense (hidden_w int8|f16|f32 [N,H,W,W]) or compact
    (hidden_values [total_nnz], hidden_masks uint8 [N, ceil(H*W*W/8)], hidden_offsets int64 [N]; hidden_w is
    None); arch, layout, float_dtype, w0, first_w0, nbytes (bank bytes), load_seconds.

    A coded bank (layout "coded", format 2) holds instead codes int32 [N, words_per_image] (the packed codes,
    module docstring), theta0 float32 [P], grid (the CodeGrid), code_offsets and code_widths int32 [G] (each
    group's first word and lane width) and its unpacking recipe (code_word int64 [P], code_unpack int32
    [3, P]: shift, mask, half); the weight fields above are None. Build one with `from_codes` or `from_file`.
    """

    def __init__(self, arch: "Architecture", *, first_w: torch.Tensor | None = None,
                 first_b: torch.Tensor | None = None, hidden_scale: torch.Tensor | None = None,
                 hidden_b: torch.Tensor | None = None, last_w: torch.Tensor | None = None,
                 last_b: torch.Tensor | None = None, hidden_w: torch.Tensor | None = None,
                 hidden_values: torch.Tensor | None = None, hidden_masks: torch.Tensor | None = None,
                 hidden_offsets: torch.Tensor | None = None, codes: torch.Tensor | None = None,
                 grid: CodeGrid | None = None, theta0: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None, heights: torch.Tensor | None = None,
                 widths: torch.Tensor | None = None, load_seconds: float = 0.0, check_compact: bool = True):
        weights = dict(first_w=first_w, first_b=first_b, hidden_scale=hidden_scale, hidden_b=hidden_b,
                       last_w=last_w, last_b=last_b, hidden_w=hidden_w, hidden_values=hidden_values,
                       hidden_masks=hidden_masks, hidden_offsets=hidden_offsets)
        self.codes = self.grid = self.theta0 = None
        if codes is not None or grid is not None:
            given = [name for name, t in weights.items() if t is not None]
            if given:
                raise InrUsageError(f"TensorBank: a coded bank (codes, grid) takes no {given[0]}")
            self._init_coded(arch, codes, grid, theta0)
            n, device = codes.shape[0], codes.device
        else:
            if theta0 is not None:
                raise InrUsageError("TensorBank: theta0 belongs to a coded bank (give codes and grid)")
            missing = [name for name in ("first_w", "first_b", "hidden_scale", "hidden_b", "last_w", "last_b")
                       if weights[name] is None]
            if missing:
                raise InrUsageError(f"TensorBank: {missing[0]} is missing (or give codes and grid: a coded bank)")
            self._init_weights(arch, **weights)
            n, device = first_w.shape[0], first_w.device
        if labels is None:
            labels = torch.full((n,), -1, dtype=torch.int64, device=device)
        if heights is None:
            heights = torch.zeros((n,), dtype=torch.int32, device=device)
        if widths is None:
            widths = torch.zeros((n,), dtype=torch.int32, device=device)
        for name, t, dtype in (("labels", labels, torch.int64), ("heights", heights, torch.int32),
                               ("widths", widths, torch.int32)):
            if tuple(t.shape) != (n,) or t.dtype != dtype or t.device != device:
                raise InrUsageError(f"TensorBank: {name} must be {dtype} [{n}] on {device}, "
                                    f"got {t.dtype} {tuple(t.shape)} on {t.device}")
        self.arch = arch
        self.labels, self.heights, self.widths = labels.contiguous(), heights.contiguous(), widths.contiguous()
        self.load_seconds = float(load_seconds)
        if self.hidden_w is None and self.codes is None and check_compact:
            self._check_compact()

    def _init_weights(self, arch, *, first_w, first_b, hidden_scale, hidden_b, last_w, last_b, hidden_w,
                      hidden_values, hidden_masks, hidden_offsets) -> None:
        """Check and keep the tensors of a dense or compact bank."""
        n, w, h = first_w.shape[0], arch.width, arch.hidden_layers
        device = first_w.device
        compact = hidden_w is None
        if compact and any(t is None for t in (hidden_values, hidden_masks, hidden_offsets)):
            raise InrUsageError("TensorBank: give hidden_w (dense) or hidden_values, hidden_masks and "
                                "hidden_offsets (compact)")
        if not compact and any(t is not None for t in (hidden_values, hidden_masks, hidden_offsets)):
            raise InrUsageError("TensorBank: give hidden_w or the compact hidden_* tensors, not both")
        floats = (first_w.dtype,) if first_w.dtype in _FLOAT_TENSOR_DTYPES else _FLOAT_TENSOR_DTYPES
        expected = {
            "first_w": ((n, w, 2), floats),
            "first_b": ((n, w), floats),
            "hidden_scale": ((n, h), (torch.float32,)),
            "hidden_b": ((n, h, w), floats),
            "last_w": ((n, 3, w), floats),
            "last_b": ((n, 3), floats),
        }
        given = dict(first_w=first_w, first_b=first_b, hidden_scale=hidden_scale, hidden_b=hidden_b,
                     last_w=last_w, last_b=last_b)
        if compact:
            expected["hidden_values"] = ((hidden_values.numel(),), _HIDDEN_TENSOR_DTYPES)
            expected["hidden_masks"] = ((n, (h * w * w + 7) // 8), (torch.uint8,))
            expected["hidden_offsets"] = ((n,), (torch.int64,))
            given.update(hidden_values=hidden_values, hidden_masks=hidden_masks, hidden_offsets=hidden_offsets)
        else:
            expected["hidden_w"] = ((n, h, w, w), _HIDDEN_TENSOR_DTYPES)
            given["hidden_w"] = hidden_w
        for name, (shape, dtypes) in expected.items():
            t = given[name]
            if tuple(t.shape) != shape:
                raise InrUsageError(f"TensorBank: {name} has shape {tuple(t.shape)}, expected {shape} "
                                    f"for {n} images of width {w} with {h} hidden layers")
            if t.dtype not in dtypes:
                raise InrUsageError(f"TensorBank: {name} has dtype {t.dtype}, expected one of {dtypes}")
            if t.device != device:
                raise InrUsageError(f"TensorBank: {name} is on {t.device}, first_w on {device}")
            if not t.is_contiguous():
                raise InrUsageError(f"TensorBank: {name} is not contiguous")
        self.first_w, self.first_b = first_w, first_b
        self.hidden_w, self.hidden_scale, self.hidden_b = hidden_w, hidden_scale, hidden_b
        self.hidden_values, self.hidden_masks, self.hidden_offsets = hidden_values, hidden_masks, hidden_offsets
        self.last_w, self.last_b = last_w, last_b

    def _init_coded(self, arch, codes, grid, theta0) -> None:
        """Check and keep the tensors of a coded bank; derive its small per-group and per-parameter ones."""
        if not isinstance(grid, CodeGrid) or grid.arch != arch:
            raise InrUsageError(f"TensorBank: grid must be a CodeGrid for the bank's architecture {arch}")
        if not isinstance(codes, torch.Tensor):
            raise InrUsageError(f"TensorBank: codes must be a tensor, got {type(codes).__name__}")
        layout = coded_layout(grid)
        p, device = arch.params_per_image, codes.device
        if theta0 is None:
            theta0 = torch.zeros((p,), dtype=torch.float32, device=device)
        n = codes.shape[0] if codes.dim() else 0
        for name, t, dtype, shape in (("codes", codes, torch.int32, (n, layout.words_per_image)),
                                      ("theta0", theta0, torch.float32, (p,))):
            if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != shape:
                got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise InrUsageError(f"TensorBank: {name} must be {dtype} {list(shape)} for this grid, got {got}")
            if t.device != device:
                raise InrUsageError(f"TensorBank: {name} is on {t.device}, codes on {device}")
            if not t.is_contiguous():
                raise InrUsageError(f"TensorBank: {name} is not contiguous")
        self.codes, self.grid, self.theta0 = codes, grid, theta0
        self._layout = layout  # per-batch unpacking reads it (coded_layout's cache key hashes the grid)
        # Without a prior, adding theta0 = 0 changes no value (step * q is never -0.0): values() skips it.
        self._has_prior = bool(theta0.any())
        self.code_offsets = torch.from_numpy(layout.word_offsets).to(device)
        self.code_widths = torch.from_numpy(layout.lane_widths).to(device)
        self.code_word = torch.from_numpy(layout.word).to(device)
        self.code_unpack = torch.from_numpy(np.stack([layout.shift, layout.mask, layout.half])).to(device)
        for name in ("first_w", "first_b", "hidden_w", "hidden_scale", "hidden_b", "last_w", "last_b",
                     "hidden_values", "hidden_masks", "hidden_offsets"):
            setattr(self, name, None)

    def _check_compact(self) -> None:
        """The decoders index hidden_values through the masks and offsets without bounds checks: make sure
        every image's offset is the running count of set mask bits and no padding bit is set."""
        n, total = self.num_images, self.hidden_total
        counts = torch.empty((n,), dtype=torch.int64, device=self.device)
        step = max(1, (1 << 24) // max(total, 1))  # bound the unpacked bits to ~16M at a time
        bad = torch.zeros((), dtype=torch.bool, device=self.device)
        for i in range(0, n, step):
            bits = _unpack_bits(self.hidden_masks[i:i + step])
            counts[i:i + step] = bits[:, :total].sum(dim=1)
            bad |= (bits[:, total:] != 0).any()
        ends = torch.cumsum(counts, 0)
        starts = ends - counts
        if bool(bad) or not torch.equal(starts, self.hidden_offsets) or \
                (n and int(ends[-1]) != self.hidden_values.numel()) or (not n and self.hidden_values.numel()):
            raise InrUsageError("TensorBank: hidden_offsets/hidden_values disagree with the mask bit counts "
                                "(or a padding bit is set)")

    # -- properties -------------------------------------------------------------------------------
    @property
    def w0(self) -> float:
        return float(self.arch.w0)

    @property
    def first_w0(self) -> float:
        return float(self.arch.first_w0)

    @property
    def device(self) -> torch.device:
        return (self.first_w if self.codes is None else self.codes).device

    @property
    def num_images(self) -> int:
        return (self.first_w if self.codes is None else self.codes).shape[0]

    def __len__(self) -> int:
        return self.num_images

    @property
    def layout(self) -> str:
        """"dense", "compact" or "coded" (see the module docstring)."""
        if self.codes is not None:
            return "coded"
        return "compact" if self.hidden_w is None else "dense"

    @property
    def float_dtype(self) -> str:
        """"float32" or "float16": the dtype of the first/last layers and biases (float32 for a coded bank,
        whose parameters decode to float32)."""
        return "float16" if self.first_w is not None and self.first_w.dtype == torch.float16 else "float32"

    @property
    def hidden_total(self) -> int:
        """Hidden weights per image, H*W*W."""
        return self.arch.hidden_total

    @property
    def hidden_dtype(self) -> str:
        """The storage dtype of the hidden weights ("int8", "float16", "float32"), or "coded"."""
        if self.codes is not None:
            return "coded"
        return _dtype_name((self.hidden_w if self.hidden_w is not None else self.hidden_values).dtype)

    def _fields(self) -> tuple[str, ...]:
        """The per-bank tensors the constructor takes (with arch, and grid for a coded bank)."""
        if self.codes is not None:
            return _CODED_FIELDS + _META_FIELDS
        weights = _WEIGHT_FIELDS if self.hidden_w is not None else \
            tuple(f for f in _WEIGHT_FIELDS if f != "hidden_w") + _COMPACT_FIELDS
        return weights + _META_FIELDS

    @property
    def nbytes(self) -> int:
        """Device bytes held by the bank (all per-image tensors, labels and sizes; a coded bank's theta0,
        per-group and unpacking tensors too)."""
        held = self._fields()
        if self.codes is not None:
            held += ("code_offsets", "code_widths", "code_word", "code_unpack")
        return sum(getattr(self, f).numel() * getattr(self, f).element_size() for f in held)

    def __repr__(self) -> str:
        if self.codes is not None:
            bits = self.grid.bits
            weights = f"coded {int(bits.min())}-{int(bits.max())} bit codes"
        else:
            weights = f"hidden {self.hidden_dtype} {self.layout}"
        return (f"TensorBank({self.num_images} images, {self.arch.sine_layers}x{self.arch.width}, "
                f"{weights}, {self.nbytes} bytes on {self.device})")

    def to(self, device) -> "TensorBank":
        device = torch.device(device)
        moved = {f: getattr(self, f).to(device) for f in self._fields()}
        if self.codes is not None:
            moved["grid"] = self.grid
        return TensorBank(self.arch, load_seconds=self.load_seconds, check_compact=False, **moved)

    def to_layout(self, layout: str) -> "TensorBank":
        """This bank with its hidden weights in `layout` ("dense", "compact" or "coded"; other tensors
        shared). Dense -> compact treats every zero weight as pruned (it decodes the same). A coded bank
        converts to dense (every parameter decoded to float32, hidden_scale 1: the same values as its
        `params`) or compact through dense; only a coded bank is "coded" (the others have no grid)."""
        if layout not in ("dense", "compact", "coded"):
            raise InrUsageError(f"bank layout must be 'dense', 'compact' or 'coded', got {layout!r}")
        if layout == self.layout:
            return self
        if layout == "coded":
            raise InrUsageError("a dense or compact bank cannot become 'coded' (it has no code grid): build one "
                                "with TensorBank.from_codes or from a format 2 file")
        if self.codes is not None:
            dense = self._decoded_dense()
            return dense if layout == "dense" else dense.to_layout("compact")
        common = {f: getattr(self, f) for f in self._fields()
                  if f not in _COMPACT_FIELDS and f != "hidden_w"}
        n = self.num_images
        if layout == "dense":
            dense = torch.empty((n, *self.hidden_shape), dtype=self.hidden_values.dtype, device=self.device)
            step = max(1, (1 << 24) // max(self.hidden_total, 1))
            for i in range(0, n, step):
                dense[i:i + step] = self.hidden_dense(torch.arange(i, min(n, i + step), device=self.device))
            return TensorBank(self.arch, load_seconds=self.load_seconds, hidden_w=dense, **common)
        flat = self.hidden_w.reshape(n, -1)
        keep = flat != 0
        counts = keep.sum(dim=1)
        offsets = torch.cumsum(counts, 0) - counts
        return TensorBank(self.arch, load_seconds=self.load_seconds, hidden_values=flat[keep].contiguous(),
                          hidden_masks=_pack_bits(keep), hidden_offsets=offsets.contiguous(), **common)

    def _decoded_dense(self) -> "TensorBank":
        """A coded bank's parameters as a dense float32 bank (hidden_scale 1), decoded in blocks of images."""
        n, arch = self.num_images, self.arch
        shapes = arch.shapes()
        fields = {cls: torch.empty((n, *shapes[cls]), dtype=torch.float32, device=self.device)
                  for cls in PARAM_CLASSES}
        step = max(1, _BLOCK_ELEMENTS // arch.params_per_image)
        for i in range(0, n, step):
            part = unflatten_params(self.values(torch.arange(i, min(n, i + step), device=self.device)), arch)
            for cls in PARAM_CLASSES:
                fields[cls][i:i + step] = part[cls]
        scale = torch.ones((n, arch.hidden_layers), dtype=torch.float32, device=self.device)
        return TensorBank(arch, hidden_scale=scale, labels=self.labels, heights=self.heights, widths=self.widths,
                          load_seconds=self.load_seconds, **fields)

    @property
    def hidden_shape(self) -> tuple[int, int, int]:
        h, w = self.arch.hidden_layers, self.arch.width
        return h, w, w

    def hidden_dense(self, indices: torch.Tensor) -> torch.Tensor:
        """[B,H,W,W] hidden weights (storage dtype, not dequantized) of the images at `indices` (a long tensor
        on the bank's device); expanded from the bitmaps for a compact bank (torch ops; the triton backend
        has its own kernel for this). A coded bank stores no hidden weights as such: use `params`."""
        if self.codes is not None:
            raise InrUsageError("a coded bank has no stored hidden weights: use bank.params(indices)")
        if self.hidden_w is not None:
            return self.hidden_w[indices]
        b, total = indices.numel(), self.hidden_total
        bits = _unpack_bits(self.hidden_masks[indices])[:, :total]
        values = self.hidden_values
        if values.numel() == 0:
            return torch.zeros((b, *self.hidden_shape), dtype=values.dtype, device=self.device)
        rank = torch.cumsum(bits, dim=1, dtype=torch.int64)
        rank += self.hidden_offsets[indices][:, None] - 1
        taken = values[rank.clamp_(0, values.numel() - 1)]
        dense = torch.where(bits.bool(), taken, torch.zeros((), dtype=values.dtype, device=self.device))
        return dense.view(b, *self.hidden_shape)

    def unpacked_codes(self, indices: torch.Tensor, dtype: torch.dtype = torch.int32) -> torch.Tensor:
        """A coded bank's codes q of the images at `indices` (a long tensor on the bank's device), [B, P] in
        parameter-group order, as int32 (or float32, which holds every code exactly) (torch ops; the triton
        backend has its own kernel)."""
        if self.codes is None:
            raise InrUsageError(f"unpacked_codes needs a coded bank; this one is {self.layout}")
        rows = self.codes[indices]  # a new tensor: the views below start at its storage's start
        shift, mask, half = self.code_unpack
        if rows.device.type != "cpu" or sys.byteorder != "little":
            # A few whole-batch ops (on a GPU the per-group loop below would be ~4 launches per group).
            u = torch.gather(rows, 1, self.code_word.expand(rows.shape[0], -1))
            return u.bitwise_right_shift_(shift).bitwise_and_(mask).sub_(half).to(dtype)
        # CPU: each run's lanes (a group, or one class's groups over all hidden layers) are a strided byte (or
        # 16-bit) view of the little-endian rows, so a few converting copies fill the output, without a
        # per-parameter gather (about 2x faster than it, and few ops for small batches).
        b, p = rows.shape[0], self.arch.params_per_image
        out = torch.empty((b, p), dtype=dtype, device=rows.device)
        row_bytes = 4 * rows.shape[1]
        as_bytes, as_int16 = rows.view(torch.uint8), rows.view(torch.int16)
        for first, param_step, count, size, pw, word, word_step in self._layout.runs:
            dst = out.as_strided((b, count, size), (p, param_step, 1), first)
            if pw == 8:
                dst.copy_(as_bytes.as_strided((b, count, size), (row_bytes, 4 * word_step, 1), 4 * word))
            elif pw == 16:
                src = as_int16.as_strided((b, count, size), (row_bytes // 2, 2 * word_step, 1), 2 * word)
                dst.copy_(src.to(torch.int32).bitwise_and_(0xFFFF))
            else:  # two lanes per byte, the first in the low nibble
                even = size // 2
                pairs = as_bytes.as_strided((b, count, (size + 1) // 2), (row_bytes, 4 * word_step, 1), 4 * word)
                lanes = dst[:, :, :2 * even].unflatten(2, (even, 2))
                lanes[..., 0].copy_(pairs[:, :, :even] & 15)
                lanes[..., 1].copy_(pairs[:, :, :even] >> 4)
                if size % 2:
                    dst[:, :, -1].copy_(pairs[:, :, -1] & 15)
        return out.sub_(half)

    def values(self, indices: torch.Tensor) -> torch.Tensor:
        """A coded bank's decoded parameters of the images at `indices`: float32 [B, P] =
        grid.values(q, theta0), the one dequantization every decoder matches."""
        # q as float32 is exact (|q| <= 2^15), so grid.values' conversion is the identity and its float32
        # product and sum are the same operations on the same numbers.
        return self.grid.values(self.unpacked_codes(indices, torch.float32), self.theta0 if self._has_prior else None,
                                in_place=True)

    def params(self, indices: torch.Tensor):
        """Dequantized float32 `siren.SirenParams` of the images at `indices` (a long tensor on the bank's device)."""
        from .siren import SirenParams

        if self.codes is not None:
            return SirenParams(**unflatten_params(self.values(indices), self.arch))
        hidden = self.hidden_dense(indices).to(torch.float32)
        hidden.mul_(self.hidden_scale[indices][:, :, None, None])
        f32 = torch.float32
        return SirenParams(first_w=self.first_w[indices].to(f32), first_b=self.first_b[indices].to(f32),
                           hidden_w=hidden, hidden_b=self.hidden_b[indices].to(f32),
                           last_w=self.last_w[indices].to(f32), last_b=self.last_b[indices].to(f32))

    # -- constructors -----------------------------------------------------------------------------
    @classmethod
    def from_params(cls, params, arch: "Architecture", *, hidden_dtype: str = "int8", labels=None,
                    heights=None, widths=None, device=None) -> "TensorBank":
        """A bank from float `siren.SirenParams` (tests, benchmarks, freshly fitted weights), the hidden
        weights quantized to `hidden_dtype` as the encoder does (`quantize.quantize_hidden`)."""
        if hidden_dtype not in HIDDEN_DTYPES:
            raise InrUsageError(f"hidden_dtype {hidden_dtype!r} is not one of {', '.join(HIDDEN_DTYPES)}")
        device = torch.device(device) if device is not None else params.first_w.device
        f32 = dict(device=device, dtype=torch.float32)
        hidden_w, scale = quantize_hidden(params.hidden_w.to(**f32), hidden_dtype)

        def opt(t, dtype):
            return None if t is None else torch.as_tensor(t, dtype=dtype).to(device).contiguous()

        return cls(arch, first_w=params.first_w.to(**f32).contiguous(), first_b=params.first_b.to(**f32).contiguous(),
                   hidden_w=hidden_w.contiguous(), hidden_scale=scale.contiguous(),
                   hidden_b=params.hidden_b.to(**f32).contiguous(), last_w=params.last_w.to(**f32).contiguous(),
                   last_b=params.last_b.to(**f32).contiguous(), labels=opt(labels, torch.int64),
                   heights=opt(heights, torch.int32), widths=opt(widths, torch.int32))

    @classmethod
    def from_weight_batch(cls, weights, arch: "Architecture", *, labels=None, heights=None, widths=None,
                          device="cpu") -> "TensorBank":
        """A bank from a numpy `spec.WeightBatch` (e.g. `InrFile.read_images(...)`)."""
        device = torch.device(device)
        tensors = {}
        for name in _WEIGHT_FIELDS:
            t = torch.from_numpy(np.ascontiguousarray(getattr(weights, name)))
            if name != "hidden_w":
                t = t.to(torch.float32)
            tensors[name] = t.to(device).contiguous()

        def opt(a, dtype):
            return None if a is None else torch.as_tensor(np.asarray(a)).to(dtype).to(device)

        return cls(arch, labels=opt(labels, torch.int64), heights=opt(heights, torch.int32),
                   widths=opt(widths, torch.int32), **tensors)

    @classmethod
    def from_codes(cls, arch: "Architecture", grid: CodeGrid, codes, theta0=None, *, labels=None, heights=None,
                   widths=None, device=None) -> "TensorBank":
        """A coded bank from codes int [N, P] (numpy or torch; parameter-group order, each group's codes within
        its bits, as `grid.codes` gives them) and the prior's flat values theta0 [P] (None: zeros). Packed on
        the CPU in blocks of images. device: None = the codes' device (CPU for numpy)."""
        if not isinstance(grid, CodeGrid) or grid.arch != arch:
            raise InrUsageError(f"TensorBank.from_codes: grid must be a CodeGrid for the architecture {arch}")
        if device is None:
            device = codes.device if isinstance(codes, torch.Tensor) else torch.device("cpu")
        device = torch.device(device)
        host = grid.check_codes(codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else codes,
                                "TensorBank.from_codes")
        p = arch.params_per_image
        layout = coded_layout(grid)
        n = host.shape[0]
        packed = np.empty((n, layout.words_per_image), np.int32)
        step = max(1, _BLOCK_ELEMENTS // p)
        for i in range(0, n, step):
            pack_codes(host[i:i + step], layout, out=packed[i:i + step])
        if theta0 is not None:
            t0 = theta0.detach() if isinstance(theta0, torch.Tensor) else torch.from_numpy(np.asarray(theta0))
            if not t0.dtype.is_floating_point or tuple(t0.shape) != (p,):
                raise InrUsageError(f"TensorBank.from_codes: theta0 must be float [{p}], got {t0.dtype} "
                                    f"{list(t0.shape)}")
            theta0 = t0.to(device=device, dtype=torch.float32).contiguous()

        def opt(t, dtype):
            return None if t is None else torch.as_tensor(np.asarray(t) if not isinstance(t, torch.Tensor) else t,
                                                          dtype=dtype).to(device).contiguous()

        return cls(arch, codes=torch.from_numpy(packed).to(device), grid=grid, theta0=theta0,
                   labels=opt(labels, torch.int64), heights=opt(heights, torch.int32), widths=opt(widths, torch.int32))

    @classmethod
    def from_file(cls, inr_file, device=None, *, layout="auto", progress=None, workers=None) -> "TensorBank":
        """Upload a whole .inr file (an `InrFile` or a path) to `device`, chunk by chunk.

        layout: "auto" (see `auto_layout`), "dense", "compact" or "coded". Worker threads (`workers`, default
        up to 8) read and check chunks with `InrFile.read_payload`; on CUDA each payload is copied through one
        of two alternating pinned staging buffers (non_blocking) and unpacked on the device, so the host does
        no per-weight work. A format 2 (coded) file loads as "coded" ("auto"), or "dense" (every parameter
        decoded to float32 on the device, from the coded bank); its workers read chunks with
        `InrFile.read_codes` and pack them (numpy), and the packed rows take the same staged path.
        `progress`, if given, is called with (images_done, total) after each chunk.
        """
        from .reader import InrFile

        if layout not in LAYOUTS:
            raise InrUsageError(f"bank layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        device = devices.resolve(device)
        owned = not isinstance(inr_file, InrFile)
        f = InrFile(inr_file) if owned else inr_file
        try:
            if layout == "auto":
                layout = auto_layout(f)
            if f.coded:
                if layout == "compact":
                    raise InrUsageError(f"{f.path}: a format 2 file has no pruning masks to keep compact: load it "
                                        "as bank layout 'coded' (or 'dense')")
                bank = cls._from_codes_file(f, device, progress, workers)
                return bank if layout == "coded" else bank.to_layout(layout)
            if layout == "coded":
                raise InrUsageError(f"{f.path}: bank layout 'coded' needs a format 2 file; this one is format "
                                    f"{f.version[0]}.{f.version[1]} (use 'auto', 'dense' or 'compact')")
            return cls._from_payloads(f, device, progress, workers, compact=layout == "compact")
        finally:
            if owned:
                f.close()

    @classmethod
    def _from_codes_file(cls, f: "InrFile", device: torch.device, progress, workers) -> "TensorBank":
        start_time = time.perf_counter()
        n, grid = f.num_images, f.grid
        layout = coded_layout(grid)
        codes = torch.empty((n, layout.words_per_image), dtype=torch.int32, device=device)
        cuda = device.type == "cuda"
        host_rows = None if cuda else codes.numpy()

        def read(k: int):
            start, stop = f.chunk_range(k)
            # On the CPU the worker packs straight into the bank's rows (disjoint per chunk).
            return pack_codes(f.read_codes(k), layout, out=None if cuda else host_rows[start:stop])

        if cuda:
            rows = max((stop - start for start, stop in map(f.chunk_range, range(f.num_chunks))), default=0)
            staging = _PinnedStaging(rows * layout.words_per_image, torch.int32, device)
        for k, packed in _read_in_order(read, f.num_chunks, workers):
            start, stop = f.chunk_range(k)
            if cuda:
                staging.copy(k, packed, codes[start:stop])
            del packed
            if progress is not None:
                progress(stop, n)
        if cuda:
            staging.close()
        index = f.index
        theta0 = torch.from_numpy(np.ascontiguousarray(f.theta0(), np.float32)).to(device)
        labels = torch.from_numpy(np.asarray(index["label"], dtype=np.int64)).to(device)
        heights = torch.from_numpy(np.asarray(index["height"], dtype=np.int32)).to(device)
        widths = torch.from_numpy(np.asarray(index["width"], dtype=np.int32)).to(device)
        if cuda:
            torch.cuda.synchronize(device)
        return cls(f.arch, codes=codes, grid=grid, theta0=theta0, labels=labels, heights=heights, widths=widths,
                   load_seconds=time.perf_counter() - start_time)

    @classmethod
    def _from_payloads(cls, f: "InrFile", device: torch.device, progress, workers, compact: bool) -> "TensorBank":
        start_time = time.perf_counter()
        arch = f.arch
        n, w, h = f.num_images, arch.width, arch.hidden_layers
        total = arch.hidden_total
        fdt = TORCH_DTYPES[f.float_dtype]
        nnz = np.asarray(f.index["nnz"], dtype=np.int64)
        bank = {
            "first_w": torch.empty((n, w, 2), dtype=fdt, device=device),
            "first_b": torch.empty((n, w), dtype=fdt, device=device),
            "hidden_b": torch.empty((n, h, w), dtype=fdt, device=device),
            "last_w": torch.empty((n, 3, w), dtype=fdt, device=device),
            "last_b": torch.empty((n, 3), dtype=fdt, device=device),
        }
        hidden_dtype = TORCH_DTYPES[f.hidden_dtype]
        value_starts = np.concatenate([[0], np.cumsum(nnz)])  # a maskless file has nnz == H*W*W (checked)
        if compact:
            bank["hidden_values"] = torch.empty((int(value_starts[-1]),), dtype=hidden_dtype, device=device)
            bank["hidden_masks"] = torch.empty((n, (total + 7) // 8), dtype=torch.uint8, device=device)
            bank["hidden_offsets"] = torch.from_numpy(value_starts[:-1].astype(np.int64)).to(device)
            if not f.has_masks:  # nothing pruned: every bit set, padding bits clear
                full = np.packbits(np.ones(total, dtype=bool))
                bank["hidden_masks"].copy_(torch.from_numpy(full).to(device).expand(n, -1))
        else:
            bank["hidden_w"] = torch.empty((n, h, w, w), dtype=hidden_dtype, device=device)
        max_raw = max((int(v) for v in f.chunks["raw_length"]), default=0)
        cuda = device.type == "cuda"
        raw_device = torch.empty((max_raw,), dtype=torch.uint8, device=device)
        if cuda:
            staging = _PinnedStaging(max_raw, torch.uint8, device)

        for k, payload in _read_in_order(f.read_payload, f.num_chunks, workers):
            raw = raw_device[:len(payload.raw)]
            unpack = functools.partial(_unpack_payload, payload, raw, bank, int(value_starts[payload.start]), total,
                                       compact)
            if cuda:  # the unpack runs on the copy stream, after the copy
                staging.copy(k, np.frombuffer(payload.raw, dtype=np.uint8), raw, then=unpack)
            else:
                raw.copy_(torch.frombuffer(bytearray(payload.raw), dtype=torch.uint8))
                unpack()
            del payload, unpack
            if progress is not None:
                progress(f.chunk_range(k)[1], n)
        if cuda:
            staging.close()
        del raw_device
        index = f.index
        scales = torch.from_numpy(np.array(f.scales, dtype=np.float32).reshape(n, h)).to(device)
        labels = torch.from_numpy(np.asarray(index["label"], dtype=np.int64)).to(device)
        heights = torch.from_numpy(np.asarray(index["height"], dtype=np.int32)).to(device)
        widths = torch.from_numpy(np.asarray(index["width"], dtype=np.int32)).to(device)
        if cuda:
            torch.cuda.synchronize(device)
        # The reader checked every payload (bitmap counts == nnz, clean padding bits): no second check here.
        return cls(arch, hidden_scale=scales, labels=labels, heights=heights, widths=widths,
                   load_seconds=time.perf_counter() - start_time, check_compact=False, **bank)


class _PinnedStaging:
    """Host-to-device copies of chunks through two alternating pinned buffers on a side stream: the host
    fills one buffer while the other one's copy runs, and refills a buffer only once its last copy is done."""

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device):
        self.buffers = [torch.empty((numel,), dtype=dtype, pin_memory=True) for _ in range(2)]
        self.copied = [None, None]
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self.stream.wait_stream(torch.cuda.current_stream(device))  # the destinations were made there

    def copy(self, k: int, host: np.ndarray, dst: torch.Tensor, then=None) -> None:
        """Copy `host` (dst's shape) into the device tensor dst through buffer k % 2; then(), if given, runs
        on the copy stream after the copy (work that reads dst)."""
        s = k % 2
        if self.copied[s] is not None:
            self.copied[s].synchronize()
        staged = self.buffers[s][:host.size].view(host.shape)
        staged.numpy()[...] = host
        with torch.cuda.stream(self.stream):
            dst.copy_(staged, non_blocking=True)
            self.copied[s] = torch.cuda.Event()
            self.copied[s].record(self.stream)
            if then is not None:
                then()

    def close(self) -> None:
        """Wait for every copy; later work on the current stream sees the destinations."""
        self.stream.synchronize()
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        self.buffers = None


def _read_in_order(read, count: int, workers: int | None):
    """Yield (k, read(k)) for k = 0..count-1 in order, read by worker threads a few chunks ahead (at most
    workers + 1 in flight: host memory stays bounded to a few chunks)."""
    workers = workers or min(8, os.cpu_count() or 1)
    lookahead = workers + 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = {k: pool.submit(read, k) for k in range(min(lookahead, count))}
        for k in range(count):
            result = pending.pop(k).result()
            if k + lookahead < count:
                pending[k + lookahead] = pool.submit(read, k + lookahead)
            yield k, result


def _typed(segment: torch.Tensor, np_dtype: np.dtype, shape) -> torch.Tensor:
    """A uint8 slice reinterpreted as `np_dtype` (little-endian in the file, as on every torch device)."""
    dtype = TORCH_DTYPES[np_dtype.name] if np_dtype.name in TORCH_DTYPES else torch.uint8
    if np_dtype.itemsize > 1 and segment.storage_offset() % np_dtype.itemsize:
        segment = segment.clone()  # misaligned after an odd-length bitmap: realign once
    return segment.view(dtype).view(shape)


def _unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [B, nbytes] (numpy packbits order: most significant bit first) -> uint8 0/1 [B, nbytes*8]."""
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 1).view(packed.shape[0], -1)


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """bool [B, T] -> uint8 [B, ceil(T/8)] in numpy packbits order, padding bits clear."""
    b, t = bits.shape
    padded = torch.zeros((b, (t + 7) // 8 * 8), dtype=torch.uint8, device=bits.device)
    padded[:, :t] = bits
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=bits.device)
    return (padded.view(b, -1, 8) * weights).sum(dim=-1, dtype=torch.uint8).contiguous()


def layout_bytes(f) -> dict[str, int]:
    """Bank bytes of the open InrFile `f` in each layout, computed from its header and index alone (a
    format 2 file: "coded" and "dense", its parameters decoded to float32)."""
    arch = f.arch
    n, w, h = f.num_images, arch.width, arch.hidden_layers
    if f.coded:
        return {"coded": coded_layout(f.grid).held_bytes(n),
                "dense": n * (4 * arch.params_per_image + 4 * h + 8 + 4 + 4)}
    total = arch.hidden_total
    item = DTYPES[f.hidden_dtype].itemsize
    fitem = DTYPES[f.float_dtype].itemsize
    common = n * (fitem * (2 * w + w + h * w + 3 * w + 3) + 4 * h + 8 + 4 + 4)  # floats, scales, labels, sizes
    nnz = int(np.asarray(f.index["nnz"], dtype=np.int64).sum()) if f.has_masks else n * total
    return {"dense": common + n * total * item,
            "compact": common + nnz * item + n * ((total + 7) // 8) + n * 8}


def auto_layout(f) -> str:
    """The layout `layout="auto"` picks for the open InrFile `f`: dense while the dense bank stays within
    AUTO_MAX_BANK_OVER_FILE x the file's bytes (the decoders read it directly), else compact if smaller;
    always coded for a format 2 file (its dense float32 bank is about 8x the codes)."""
    if f.coded:
        return "coded"
    sizes = layout_bytes(f)
    if sizes["dense"] <= AUTO_MAX_BANK_OVER_FILE * f.file_bytes or sizes["compact"] >= sizes["dense"]:
        return "dense"
    return "compact"


def _unpack_payload(payload: "ChunkPayload", raw: torch.Tensor, bank: dict, value_start: int, total: int,
                    compact: bool) -> None:
    """Scatter one chunk's payload (its bytes already on the bank's device as `raw`) into the bank.
    Dense: the bitmaps are expanded into hidden_w. Compact: values go to hidden_values[value_start:] and
    the bitmaps to hidden_masks as they are."""
    arrays = {name: _typed(raw[payload.offsets[name]:payload.offsets[name] + arr.nbytes], arr.dtype, arr.shape)
              for name, arr in payload.arrays.items()}
    start, stop, count = payload.start, payload.stop, payload.count
    for name in ("first_w", "first_b", "hidden_b", "last_w", "last_b"):
        bank[name][start:stop].copy_(arrays[name], non_blocking=True)
    values = arrays["values"]
    if compact:
        bank["hidden_values"][value_start:value_start + values.numel()].copy_(values.reshape(-1))
    if "masks" not in arrays:
        if not compact:
            bank["hidden_w"][start:stop].view(-1).copy_(values)
        return
    packed = arrays["masks"]  # [count, ceil(total/8)], most significant bit first (numpy packbits)
    if compact:
        bank["hidden_masks"][start:stop].copy_(packed)
        return
    dense = bank["hidden_w"][start:stop].view(count, total)
    if values.numel() == 0:
        dense.zero_()
        return
    flat = _unpack_bits(packed)[:, :total].bool().view(-1)
    position = torch.cumsum(flat, 0, dtype=torch.int64 if flat.numel() >= 2 ** 31 else torch.int32)
    position = (position - 1).clamp_(0, values.numel() - 1)
    dense.view(-1).copy_(torch.where(flat, values[position], torch.zeros((), dtype=values.dtype, device=raw.device)))
