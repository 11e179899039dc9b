"""The vocabulary of the `.inr` format (FORMAT.md): constants, dtypes, binary tables, the architecture.

numpy and the standard library only, so the format can be read and written anywhere. Byte layout of a file:

    preamble (64 B) | sections, each 64-byte aligned, zero padding between | JSON header (at the end)
"""
from __future__ import annotations

import functools
import json
import math
import numbers
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .checks import is_int
from .errors import InrUsageError

MAGIC = b"\x89INR\r\n\x1a\n"  # PNG-style: high bit, CRLF and ^Z catch text-mode / 7-bit mangling
FORMAT_NAME = "inr"
# The newest minor version of each major version this library reads and writes. Major 1: raw weight arrays
# (float, int8 with per-image scales, pruning bitmaps) in zstd chunks; major 2: every parameter quantized on
# a per-file grid and entropy-coded (rANS) with probability tables fitted over the whole file.
FORMAT_VERSIONS = {1: 1, 2: 0}
VERSION_MAJOR = max(FORMAT_VERSIONS)
VERSION_MINOR = FORMAT_VERSIONS[VERSION_MAJOR]
ALIGNMENT = 64
PREAMBLE_SIZE = 64
MAX_HEADER_BYTES = 1 << 20
MAX_CHUNK_RAW_BYTES = 1 << 30  # one decompressed chunk; bounds the memory a reader commits per chunk
MAX_SINE_LAYERS = 1024
MAX_WIDTH = 4096
IN_FEATURES = 2
OUT_FEATURES = 3
COORDINATES = "xy_pixel_centers_minus1_1"  # x along width, y along height, pixel centres, [-1, 1]
OUTPUT_MAPPING = "rgb_clamp01(0.5*o+0.5)"
OUTPUT_LAYER = "linear"
# Sections every file of a major version has, and those of them whose CRC-32 a reader checks at open (all
# small); `blobs` is checked per chunk on read.
REQUIRED_SECTIONS = {1: ("blobs", "index", "scales", "chunks", "classes", "metadata"),
                     2: ("blobs", "index", "psnr", "chunks", "quant", "tables", "classes", "metadata")}
CHECKED_AT_OPEN = {major: tuple(n for n in names if n != "blobs") for major, names in REQUIRED_SECTIONS.items()}
# Optional sections of each major version, with the minor version that defines each. A reader validates
# (CRC-32 included) and uses one only in files of that minor version or newer; in older files the name is
# an unknown section. Writers write the lowest version that defines every section they write.
OPTIONAL_SECTIONS = {1: {"keys": 1, "prior": 1}, 2: {"keys": 0, "prior": 0}}

# Storage dtypes by their names in the header (little-endian in the file).
DTYPES = {"int8": np.dtype("i1"), "float16": np.dtype("<f2"), "float32": np.dtype("<f4")}
HIDDEN_DTYPES = ("int8", "float16", "float32")  # header.hidden_dtype
FLOAT_DTYPES = ("float32", "float16")  # header.float_dtype: first/last layers and biases

PREAMBLE_DTYPE = np.dtype([
    ("magic", "S8"),
    ("major", "<u2"),
    ("minor", "<u2"),
    ("header_crc32", "<u4"),
    ("header_offset", "<u8"),
    ("header_length", "<u8"),
    ("reserved", "V32"),
])
assert PREAMBLE_DTYPE.itemsize == PREAMBLE_SIZE

INDEX_DTYPE = np.dtype([
    ("label", "<i4"),        # class id, -1 = unlabelled
    ("height", "<u4"),       # original image height, pixels
    ("width", "<u4"),        # original image width, pixels
    ("psnr", "<f4"),         # dB, of the stored (quantized, pruned) model against the source pixels
    ("prune_ratio", "<f4"),  # fraction of hidden weights removed by the mask = 1 - nnz / (H*W*W)
    ("chunk", "<u4"),        # chunk holding this image's weights
    ("nnz", "<u4"),          # number of stored hidden weight values of this image
    ("value_start", "<u4"),  # element offset of those values within its chunk's value array
])
assert INDEX_DTYPE.itemsize == 32

CHUNK_DTYPE = np.dtype([
    ("offset", "<u8"),             # byte offset of the zstd frame within the blobs section
    ("compressed_length", "<u8"),  # bytes of the zstd frame
    ("raw_length", "<u8"),         # bytes of the decompressed payload (exact)
    ("first_image", "<u8"),        # index of the chunk's first image
    ("image_count", "<u4"),        # images in the chunk (>= 1)
    ("crc32", "<u4"),              # CRC-32 of the compressed frame
])
assert CHUNK_DTYPE.itemsize == 40


# -- format 2: every parameter quantized and entropy-coded (FORMAT.md part II) ---------------------------
WEIGHT_CODING = "rans32-p24-x4"  # header.weight_coding: rANS, 32-bit words, 24-bit frequencies, 4 lanes
# Section `index` of format 2: these columns one after another (N values each), in one zstd frame. Each
# image's PSNR is a raw f32 in section `psnr`, which also makes the file hold >= 4 bytes per image, so that
# what a reader allocates for N stays proportional to the file's size.
CODED_INDEX_COLUMNS = (("label", np.dtype("<i4")), ("height", np.dtype("<u4")), ("width", np.dtype("<u4")))
CODED_INDEX_ROW_BYTES = sum(dt.itemsize for _, dt in CODED_INDEX_COLUMNS)
CODE_BYTES = 2  # a decoded code is an int16: chunks' raw_length = image_count * P * CODE_BYTES
# Section `keys` of format 2 is one zstd frame of the format-1.1 bytes; what it may declare is bounded by N.
MAX_KEY_BYTES_PER_IMAGE = 4096
# Parameter classes of format 2: a group is one class's tensor (one per hidden layer for the hidden ones).
PARAM_CLASSES = ("first_w", "first_b", "hidden_w", "hidden_b", "last_w", "last_b")
MAX_CODE_BITS = 16  # widest code of a group: q in [-2^15, 2^15)

QUANT_DTYPE = np.dtype([
    ("step", "<f4"),      # dequantization step: theta = theta0 + step * q (float32 arithmetic)
    ("bits", "u1"),       # code width b: every q of the group is in [-2^(b-1), 2^(b-1))
    ("wrapped", "u1"),    # 1: a sine layer's bias stored modulo its period, step = 2*pi / (w0 * 2^b)
    ("reserved", "V2"),   # zero
])
assert QUANT_DTYPE.itemsize == 8


@dataclass(frozen=True)
class ParamGroup:
    """One parameter group of format 2: its `name` ("hidden_w.0", "last_b", ...), its class (PARAM_CLASSES),
    the hidden `layer` it belongs to (None for the others), its per-image `shape`, its `offset` in an image's
    flat parameter vector (groups in order, each in C order), and for the bias of a sine layer the layer's
    frequency factor `period_w0` (the network is periodic in it with period 2*pi/period_w0; else None)."""

    name: str
    cls: str
    layer: int | None
    shape: tuple[int, ...]
    offset: int
    period_w0: float | None

    @property
    def size(self) -> int:
        return math.prod(self.shape)  # Python ints: no overflow, and per decoded batch np.prod's overhead shows

    @property
    def stop(self) -> int:
        return self.offset + self.size


@functools.lru_cache(maxsize=64)  # called per decoded batch: building the tuple costs more than the lookup
def param_groups(arch: "Architecture") -> tuple[ParamGroup, ...]:
    """The groups of format 2 in their normative order: first_w, first_b, then hidden_w.l, hidden_b.l for
    each hidden layer l, then last_w, last_b."""
    w = arch.width
    spec = [("first_w", "first_w", None, (w, IN_FEATURES), None),
            ("first_b", "first_b", None, (w,), arch.first_w0)]
    for layer in range(arch.hidden_layers):
        spec += [(f"hidden_w.{layer}", "hidden_w", layer, (w, w), None),
                 (f"hidden_b.{layer}", "hidden_b", layer, (w,), arch.w0)]
    spec += [("last_w", "last_w", None, (OUT_FEATURES, w), None),
             ("last_b", "last_b", None, (OUT_FEATURES,), None)]
    groups, offset = [], 0
    for name, cls, layer, shape, period in spec:
        groups.append(ParamGroup(name, cls, layer, shape, offset, period))
        offset += int(np.prod(shape))
    return tuple(groups)


def flatten_params(params, arch: "Architecture"):
    """Per-image parameters as a mapping (or NamedTuple) of the six classes, arrays or tensors [n, *shape]
    -> [n, P] in group order (numpy in, numpy out; torch in, torch out)."""
    get = params.__getitem__ if isinstance(params, dict) else lambda name: getattr(params, name)
    parts = []
    for g in param_groups(arch):
        t = get(g.cls)
        t = t[:, g.layer] if g.layer is not None else t
        parts.append(t.reshape(t.shape[0], g.size))
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts, axis=1)
    import torch

    return torch.cat(parts, dim=1)


def unflatten_params(flat, arch: "Architecture") -> dict:
    """[n, P] in group order -> {class: [n, *Architecture.shapes()[class]]} (views where possible; numpy or
    torch, as given). The inverse of flatten_params."""
    n = flat.shape[0]
    out, hidden = {}, {"hidden_w": [], "hidden_b": []}
    for g in param_groups(arch):
        part = flat[:, g.offset:g.stop].reshape(n, *g.shape)
        if g.layer is None:
            out[g.cls] = part
        else:
            hidden[g.cls].append(part)
    shapes = arch.shapes()
    for cls, parts in hidden.items():
        if isinstance(flat, np.ndarray):
            out[cls] = np.stack(parts, axis=1) if parts else np.zeros((n, *shapes[cls]), flat.dtype)
        elif not parts:
            out[cls] = flat.new_zeros((n, *shapes[cls]))
        else:  # the layers of a class lie at a fixed distance from each other: one strided view, no copy
            first = next(g for g in param_groups(arch) if g.cls == cls)
            layer_step = first.size + next(g.size for g in param_groups(arch) if g.layer == 0 and g.cls != cls)
            inner = [flat.stride(1) * math.prod(first.shape[i + 1:]) for i in range(len(first.shape))]
            out[cls] = flat.as_strided((n, len(parts), *first.shape), (flat.stride(0), layer_step * flat.stride(1),
                                       *inner), flat.storage_offset() + first.offset * flat.stride(1))
    return {name: out[name] for name in PARAM_CLASSES}


# Section `keys`: N + 1 offsets into the UTF-8 text that follows them (FORMAT.md section 9.1).
KEY_OFFSET_DTYPE = np.dtype("<u8")


def keys_section(keys: Sequence[str]) -> bytes:
    """The bytes of a `keys` section holding `keys` (one string per image, in image order)."""
    encoded = [k.encode("utf-8") for k in keys]
    offsets = np.zeros(len(encoded) + 1, KEY_OFFSET_DTYPE)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    return offsets.tobytes() + b"".join(encoded)


def minor_version(major: int, section_names) -> int:
    """The minor version a writer puts on a file with these sections (the lowest that defines them all)."""
    optional = OPTIONAL_SECTIONS[major]
    return max([0] + [optional[name] for name in section_names if name in optional])


def align(n: int) -> int:
    """The smallest multiple of ALIGNMENT that is >= n."""
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def parse_json(raw: bytes):
    """Strict JSON (FORMAT.md rule 3): UTF-8, no NaN/Infinity, no repeated key in any object. ValueError
    (or UnicodeDecodeError, RecursionError) otherwise."""
    return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=_unique_keys)


def _reject_constant(name):
    raise ValueError(f"{name} is not allowed in JSON")


def _unique_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"duplicate key {dup!r:.80}")
    return dict(pairs)


def canonical_json(obj) -> bytes:
    """Sorted keys and fixed separators: the same object always gives the same bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


_ARCH_INT_LIMITS = {"sine_layers": (1, MAX_SINE_LAYERS), "width": (1, MAX_WIDTH)}


def architecture_problem(name: str, value) -> str | None:
    """Why `value` is not allowed as Architecture field `name`, or None (shared by the class and the reader)."""
    if name in _ARCH_INT_LIMITS:
        lo, hi = _ARCH_INT_LIMITS[name]
        if not is_int(value) or not lo <= value <= hi:
            return f"must be an integer in [{lo}, {hi}], got {value!r}"
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        return f"must be a finite number > 0, got {value!r}"
    return None


@dataclass(frozen=True)
class Architecture:
    """One SIREN per image: `sine_layers` sine layers of `width` (the first from 2 inputs), then a linear
    output layer to 3 channels. `w0` scales the hidden layers' pre-activations, `first_w0` the first's."""

    sine_layers: int
    width: int
    w0: float = 30.0
    first_w0: float = 30.0

    def __post_init__(self):
        for name in ("sine_layers", "width", "w0", "first_w0"):
            problem = architecture_problem(name, getattr(self, name))
            if problem:
                raise InrUsageError(f"Architecture.{name} {problem}")
            value = getattr(self, name)
            object.__setattr__(self, name, int(value) if name in _ARCH_INT_LIMITS else float(value))

    @property
    def hidden_layers(self) -> int:
        return self.sine_layers - 1

    @property
    def hidden_total(self) -> int:
        """Hidden weights per image, H*W*W."""
        return self.hidden_layers * self.width * self.width

    @property
    def params_per_image(self) -> int:
        w, h = self.width, self.hidden_layers
        return (IN_FEATURES * w + w) + h * (w * w + w) + (OUT_FEATURES * w + OUT_FEATURES)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-image shape of every parameter, in WeightBatch order (hidden weights are (out, in))."""
        w, h = self.width, self.hidden_layers
        return {"first_w": (w, IN_FEATURES), "first_b": (w,), "hidden_w": (h, w, w), "hidden_b": (h, w),
                "last_w": (OUT_FEATURES, w), "last_b": (OUT_FEATURES,)}

    def to_json(self) -> dict:
        return {
            "sine_layers": self.sine_layers, "width": self.width, "w0": self.w0, "first_w0": self.first_w0,
            "in_features": IN_FEATURES, "out_features": OUT_FEATURES, "output_layer": OUTPUT_LAYER,
            "coordinates": COORDINATES, "output_mapping": OUTPUT_MAPPING,
        }


@dataclass
class WeightBatch:
    """Weights of n images (numpy). Writer input and reader output."""

    first_w: np.ndarray       # float32 [n, W, 2]
    first_b: np.ndarray       # float32 [n, W]
    hidden_w: np.ndarray      # hidden_dtype [n, H, W, W] (out, in), zeros where pruned
    hidden_scale: np.ndarray  # float32 [n, H] (dequant: q * scale; 1.0 for float hidden dtypes)
    hidden_b: np.ndarray      # float32 [n, H, W]
    last_w: np.ndarray        # float32 [n, 3, W]
    last_b: np.ndarray        # float32 [n, 3]
    mask: np.ndarray | None = None  # bool [n, H, W, W], True = kept; None = nothing pruned

    def __len__(self) -> int:
        return int(self.first_w.shape[0])

    def arrays(self) -> tuple:
        """The eight fields in declaration order (mask may be None)."""
        return (self.first_w, self.first_b, self.hidden_w, self.hidden_scale, self.hidden_b,
                self.last_w, self.last_b, self.mask)

    def take(self, idx) -> "WeightBatch":
        """Rows `idx` (array of positions or slice) as a new batch."""
        return WeightBatch(*(None if a is None else a[idx] for a in self.arrays()))

    def dequantized_hidden(self) -> np.ndarray:
        """float32 [n, H, W, W] = hidden_w * hidden_scale (the weights the network uses)."""
        return self.hidden_w.astype(np.float32) * self.hidden_scale[:, :, None, None].astype(np.float32)

    @staticmethod
    def concat(batches: Sequence["WeightBatch"]) -> "WeightBatch":
        cols = list(zip(*(b.arrays() for b in batches)))
        has_mask = [c is not None for c in cols[7]]
        if any(has_mask) and not all(has_mask):
            raise InrUsageError("WeightBatch.concat: some batches have a mask and some do not")
        return WeightBatch(*(np.concatenate(c) for c in cols[:7]),
                           mask=np.concatenate(cols[7]) if all(has_mask) and cols[7] else None)


def mask_bytes(arch: Architecture) -> int:
    """Bytes of one image's packed pruning bitmap."""
    return (arch.hidden_total + 7) // 8


def chunk_payload_layout(arch: Architecture, n: int, float_dtype: str, hidden_dtype: str, has_masks: bool,
                         total_nnz: int) -> list[tuple[str, np.dtype, tuple]]:
    """(name, dtype, shape) of the arrays of one chunk's decompressed payload, in storage order."""
    w, h = arch.width, arch.hidden_layers
    f = DTYPES[float_dtype]
    parts = [
        ("first_w", f, (n, w, IN_FEATURES)),
        ("first_b", f, (n, w)),
        ("hidden_b", f, (n, h, w)),
        ("last_w", f, (n, OUT_FEATURES, w)),
        ("last_b", f, (n, OUT_FEATURES)),
    ]
    if has_masks:
        parts.append(("masks", np.dtype("u1"), (n, mask_bytes(arch))))
    parts.append(("values", DTYPES[hidden_dtype], (total_nnz,)))
    return parts


def payload_bytes(layout) -> int:
    return sum(int(np.prod(shape, dtype=np.int64)) * dt.itemsize for _, dt, shape in layout)


def prune_ratio_of(nnz, total: int) -> np.ndarray:
    """The exact float32 prune ratio a file stores for `nnz` kept of `total` hidden weights."""
    if total == 0:
        return np.zeros(np.shape(nnz), np.float32)
    return (1.0 - np.asarray(nnz, np.float64) / total).astype(np.float32)
