"""The `.inr` file format, version 1: writer, validating reader, merge. Normative spec: FORMAT.md.

Only numpy, zstandard and the standard library are used here (no torch), so the format can be read and
written anywhere. Byte layout of a file:

    preamble (64 B) | sections, each 64-byte aligned, zero padding between | JSON header (at the end)

The writer streams compressed chunks into the `blobs` section as images arrive, writes the small tables
(`index`, `scales`, `chunks`, `classes`, `metadata`) at close, then the JSON header, then patches the
preamble with the header's offset, length and CRC-32. The reader validates every offset, length, count
and small-table checksum before it hands out any data (as safetensors does), and raises InrFormatError
naming the file, the field and the value for anything it does not accept.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import zstandard

from .errors import InrFormatError, InrUsageError

# --------------------------------------------------------------------------------------------------
# Constants of version 1
# --------------------------------------------------------------------------------------------------
MAGIC = b"\x89INR\r\n\x1a\n"  # PNG-style: high bit, CRLF and ^Z catch text-mode / 7-bit mangling
FORMAT_NAME = "inr"
VERSION_MAJOR = 1
VERSION_MINOR = 0
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
HIDDEN_DTYPES = ("int8", "float16", "float32")
FLOAT_DTYPES = ("float32", "float16")
REQUIRED_SECTIONS = ("blobs", "index", "scales", "chunks", "classes", "metadata")
# Sections whose CRC-32 the reader checks at open (all small); `blobs` is checked per chunk on read
# and as a whole by verify().
CHECKED_AT_OPEN = ("index", "scales", "chunks", "classes", "metadata")
DEFAULT_ZSTD_LEVEL = 9

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

_FLOAT_NP = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
_HIDDEN_NP = {"int8": np.dtype("i1"), "float16": np.dtype("<f2"), "float32": np.dtype("<f4")}


def _align(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


# --------------------------------------------------------------------------------------------------
# Data classes
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Architecture:
    """One SIREN per image: `sine_layers` sine layers of `width` (the first from 2 inputs), then a linear
    output layer to 3 channels. `w0` scales the hidden layers' pre-activations, `first_w0` the first's."""

    sine_layers: int
    width: int
    w0: float = 30.0
    first_w0: float = 30.0

    def __post_init__(self):
        for name, value, hi in (("sine_layers", self.sine_layers, MAX_SINE_LAYERS), ("width", self.width, MAX_WIDTH)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= hi:
                raise InrUsageError(f"Architecture.{name} must be an integer in [1, {hi}], got {value!r}")
        for name in ("w0", "first_w0"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
                    or not math.isfinite(value) or value <= 0:
                raise InrUsageError(f"Architecture.{name} must be a finite number > 0, got {value!r}")
        object.__setattr__(self, "sine_layers", int(self.sine_layers))
        object.__setattr__(self, "width", int(self.width))
        object.__setattr__(self, "w0", float(self.w0))
        object.__setattr__(self, "first_w0", float(self.first_w0))

    @property
    def hidden_layers(self) -> int:
        return self.sine_layers - 1

    @property
    def params_per_image(self) -> int:
        w, h = self.width, self.hidden_layers
        return (IN_FEATURES * w + w) + h * (w * w + w) + (OUT_FEATURES * w + OUT_FEATURES)

    def to_json(self) -> dict:
        return {
            "sine_layers": self.sine_layers, "width": self.width, "w0": self.w0, "first_w0": self.first_w0,
            "in_features": IN_FEATURES, "out_features": OUT_FEATURES, "output_layer": OUTPUT_LAYER,
            "coordinates": COORDINATES, "output_mapping": OUTPUT_MAPPING,
        }


@dataclass
class WeightBatch:
    """Weights of n images (numpy). Writer input and reader output; shapes as in docs/internals.md."""

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

    def take(self, idx) -> "WeightBatch":
        """Rows `idx` (array of positions or slice) as a new batch."""
        return WeightBatch(*(None if a is None else a[idx] for a in self._arrays()))

    def _arrays(self):
        return (self.first_w, self.first_b, self.hidden_w, self.hidden_scale, self.hidden_b,
                self.last_w, self.last_b, self.mask)

    def dequantized_hidden(self) -> np.ndarray:
        """float32 [n, H, W, W] = hidden_w * hidden_scale (the weights the network uses)."""
        return self.hidden_w.astype(np.float32) * self.hidden_scale[:, :, None, None].astype(np.float32)

    @staticmethod
    def concat(batches: Sequence["WeightBatch"]) -> "WeightBatch":
        cols = list(zip(*(b._arrays() for b in batches)))
        has_mask = [c is not None for c in cols[7]]
        if any(has_mask) and not all(has_mask):
            raise InrUsageError("WeightBatch.concat: some batches have a mask and some do not")
        return WeightBatch(*(np.concatenate(c) for c in cols[:7]),
                           mask=np.concatenate(cols[7]) if all(has_mask) and cols[7] else None)


def _chunk_payload_layout(arch: Architecture, n: int, float_dtype: str, hidden_dtype: str, has_masks: bool,
                          total_nnz: int) -> list[tuple[str, np.dtype, tuple]]:
    """(name, dtype, shape) of the arrays of one chunk's decompressed payload, in storage order."""
    w, h = arch.width, arch.hidden_layers
    f = _FLOAT_NP[float_dtype]
    parts = [
        ("first_w", f, (n, w, IN_FEATURES)),
        ("first_b", f, (n, w)),
        ("hidden_b", f, (n, h, w)),
        ("last_w", f, (n, OUT_FEATURES, w)),
        ("last_b", f, (n, OUT_FEATURES)),
    ]
    if has_masks:
        parts.append(("masks", np.dtype("u1"), (n, _mask_bytes(arch))))
    parts.append(("values", _HIDDEN_NP[hidden_dtype], (total_nnz,)))
    return parts


def _mask_bytes(arch: Architecture) -> int:
    return (arch.hidden_layers * arch.width * arch.width + 7) // 8


def _payload_bytes(layout) -> int:
    return sum(int(np.prod(shape, dtype=np.int64)) * dt.itemsize for _, dt, shape in layout)


def _prune_ratio(nnz: np.ndarray, total: int) -> np.ndarray:
    """The exact float32 prune ratio a file stores for `nnz` kept of `total` hidden weights."""
    if total == 0:
        return np.zeros(np.shape(nnz), np.float32)
    return (1.0 - np.asarray(nnz, np.float64) / total).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------------
class InrWriter:
    """Streams images into a new .inr file. Atomic: writes `.<name>.*.tmp` next to `path`, fsyncs and
    renames on close(); on an exception inside `with` (or abort()) the temp file is removed and `path`
    is left untouched. The same inputs give a byte-identical file, whatever the sizes of the add() batches."""

    def __init__(self, path, arch: Architecture, *, hidden_dtype: str = "int8", float_dtype: str = "float32",
                 has_masks: bool = False, classes: Iterable[str] = (), metadata: dict | None = None,
                 chunk_images: int = 1024, zstd_level: int = DEFAULT_ZSTD_LEVEL):
        if not isinstance(arch, Architecture):
            raise InrUsageError(f"InrWriter: arch must be an Architecture, got {type(arch).__name__}")
        if hidden_dtype not in HIDDEN_DTYPES:
            raise InrUsageError(f"InrWriter: hidden_dtype must be one of {HIDDEN_DTYPES}, got {hidden_dtype!r}")
        if float_dtype not in FLOAT_DTYPES:
            raise InrUsageError(f"InrWriter: float_dtype must be one of {FLOAT_DTYPES}, got {float_dtype!r}")
        if isinstance(chunk_images, bool) or not isinstance(chunk_images, (int, np.integer)) or chunk_images < 1:
            raise InrUsageError(f"InrWriter: chunk_images must be an integer >= 1, got {chunk_images!r}")
        self.classes = [c for c in classes]
        if not all(isinstance(c, str) for c in self.classes):
            raise InrUsageError("InrWriter: classes must be strings")
        self.metadata = _check_metadata(metadata, "InrWriter: metadata")
        self.path = os.fspath(path)
        self.arch = arch
        self.hidden_dtype = hidden_dtype
        self.float_dtype = float_dtype
        self.has_masks = bool(has_masks)
        per_image = _payload_bytes(_chunk_payload_layout(arch, 1, float_dtype, hidden_dtype, self.has_masks,
                                                         arch.hidden_layers * arch.width ** 2))
        self.chunk_images = int(min(chunk_images, max(1, MAX_CHUNK_RAW_BYTES // per_image)))
        self._cctx = zstandard.ZstdCompressor(level=zstd_level, write_content_size=True, write_checksum=False)
        self._pending: list[tuple[WeightBatch, np.ndarray]] = []  # (weights, index rows), file dtypes
        self._pending_n = 0
        self._index: list[np.ndarray] = []
        self._scales: list[np.ndarray] = []
        self._chunks: list[tuple] = []
        self._num_images = 0
        self._blob_bytes = 0
        self._blob_crc = 0
        self._closed = False
        directory = os.path.dirname(os.path.abspath(self.path))
        fd, self._tmp_path = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(self.path) + ".",
                                              suffix=".tmp")
        self._fh = os.fdopen(fd, "w+b")
        try:
            self._fh.write(bytes(PREAMBLE_SIZE))  # patched at close
        except BaseException:
            self.abort()
            raise

    # -- context manager -------------------------------------------------------------------------
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False

    def __del__(self):
        # An unclosed writer never leaves its temp file behind (it was never renamed to `path`).
        try:
            if not self._closed:
                self.abort()
        except Exception:
            pass

    @property
    def num_images(self) -> int:
        return self._num_images + self._pending_n

    # -- input ------------------------------------------------------------------------------------
    def add(self, weights: WeightBatch, labels, heights, widths, psnr, prune_ratio) -> None:
        """Append n images. Arrays are per image (length n). prune_ratio must agree with the mask
        (the file stores the exact 1 - nnz/(H*W*W)); it must be 0 when the file has no masks."""
        if self._closed:
            raise InrUsageError("InrWriter.add: writer is closed")
        try:
            batch, rows = self._convert(weights, labels, heights, widths, psnr, prune_ratio)
        except BaseException:
            self.abort()
            raise
        if len(batch) == 0:
            return
        self._pending.append((batch, rows))
        self._pending_n += len(batch)
        try:
            while self._pending_n >= self.chunk_images:
                self._emit_chunk(self.chunk_images)
        except BaseException:
            self.abort()
            raise

    def _convert(self, wb: WeightBatch, labels, heights, widths, psnr, prune_ratio):
        a, n = self.arch, len(wb)
        w, h = a.width, a.hidden_layers
        expected = {
            "first_w": (n, w, IN_FEATURES), "first_b": (n, w), "hidden_w": (n, h, w, w), "hidden_scale": (n, h),
            "hidden_b": (n, h, w), "last_w": (n, OUT_FEATURES, w), "last_b": (n, OUT_FEATURES),
        }
        for name, shape in expected.items():
            arr = getattr(wb, name)
            if not isinstance(arr, np.ndarray) or arr.shape != shape:
                got = arr.shape if isinstance(arr, np.ndarray) else type(arr).__name__
                raise InrUsageError(f"InrWriter.add: {name} must be a numpy array of shape {shape}, got {got}")
        fdt = _FLOAT_NP[self.float_dtype]
        hidden = wb.hidden_w
        if self.hidden_dtype == "int8":
            if hidden.dtype != np.int8:
                raise InrUsageError(f"InrWriter.add: hidden_w must be int8 for hidden_dtype int8, got {hidden.dtype}")
        elif hidden.dtype.kind != "f":
            raise InrUsageError(f"InrWriter.add: hidden_w must be floating point for hidden_dtype "
                                f"{self.hidden_dtype}, got {hidden.dtype}")
        hidden = np.ascontiguousarray(hidden, dtype=_HIDDEN_NP[self.hidden_dtype])
        scale = np.ascontiguousarray(wb.hidden_scale, dtype="<f4")
        if self.hidden_dtype == "int8":
            if not np.all(np.isfinite(scale) & (scale >= 0)):
                raise InrUsageError("InrWriter.add: hidden_scale must be finite and >= 0")
        elif not np.all(scale == 1.0):
            raise InrUsageError(f"InrWriter.add: hidden_scale must be 1.0 for hidden_dtype {self.hidden_dtype}")
        total = h * w * w
        mask = wb.mask
        if self.has_masks:
            if mask is None:
                mask = np.ones((n, h, w, w), bool)
            elif not isinstance(mask, np.ndarray) or mask.shape != (n, h, w, w) or mask.dtype != np.bool_:
                raise InrUsageError(f"InrWriter.add: mask must be a bool array of shape {(n, h, w, w)}")
            mask = np.ascontiguousarray(mask)
            if np.any(hidden[~mask] != 0):
                raise InrUsageError("InrWriter.add: hidden_w must be zero where mask is False")
            nnz = mask.reshape(n, -1).sum(axis=1)
        else:
            if mask is not None and not np.all(mask):
                raise InrUsageError("InrWriter.add: a mask with pruned weights needs has_masks=True")
            mask = None
            nnz = np.full(n, total, np.int64)
        ratio = _prune_ratio(nnz, total)
        given = _vector(prune_ratio, n, "prune_ratio", np.float64)
        if np.any(np.abs(given - ratio) > 1e-3 + 1.0 / max(total, 1)) or np.any(np.isnan(given)):
            bad = int(np.argmax(np.isnan(given) | (np.abs(given - ratio) > 1e-3 + 1.0 / max(total, 1))))
            raise InrUsageError(f"InrWriter.add: prune_ratio[{bad}] = {given[bad]} disagrees with the mask "
                                f"({ratio[bad]:.6f} of hidden weights pruned)")
        rows = np.zeros(n, INDEX_DTYPE)
        rows["label"] = _vector(labels, n, "labels", np.int64, lo=-1,
                                hi=len(self.classes) - 1 if self.classes else 2 ** 31 - 1)
        rows["height"] = _vector(heights, n, "heights", np.int64, lo=1, hi=2 ** 32 - 1)
        rows["width"] = _vector(widths, n, "widths", np.int64, lo=1, hi=2 ** 32 - 1)
        p = _vector(psnr, n, "psnr", np.float64)
        if not np.all(np.isfinite(p.astype(np.float32))):
            raise InrUsageError("InrWriter.add: psnr must be finite")
        rows["psnr"] = p
        rows["prune_ratio"] = ratio
        rows["nnz"] = nnz
        batch = WeightBatch(
            first_w=np.asarray(wb.first_w, fdt), first_b=np.asarray(wb.first_b, fdt), hidden_w=hidden,
            hidden_scale=scale, hidden_b=np.asarray(wb.hidden_b, fdt), last_w=np.asarray(wb.last_w, fdt),
            last_b=np.asarray(wb.last_b, fdt), mask=mask)
        return batch, rows

    def _emit_chunk(self, count: int) -> None:
        """Compress the first `count` pending images into one chunk and append it to the blobs section."""
        batch = WeightBatch.concat([b for b, _ in self._pending])
        rows = np.concatenate([r for _, r in self._pending])
        head, rest = batch.take(slice(0, count)), batch.take(slice(count, None))
        head_rows, rest_rows = rows[:count].copy(), rows[count:]
        self._pending = [(rest, rest_rows)] if len(rest) else []
        self._pending_n = len(rest)

        n = count
        flat = head.hidden_w.reshape(n, -1)
        if self.has_masks:
            m = head.mask.reshape(n, -1)
            values = flat[m]
            masks = np.packbits(m, axis=1) if m.shape[1] else np.zeros((n, 0), np.uint8)
        else:
            values, masks = flat.reshape(-1), None
        nnz = head_rows["nnz"].astype(np.int64)
        head_rows["value_start"] = np.concatenate([[0], np.cumsum(nnz)[:-1]]) if n else []
        head_rows["chunk"] = len(self._chunks)
        arrays = {"first_w": head.first_w, "first_b": head.first_b, "hidden_b": head.hidden_b,
                  "last_w": head.last_w, "last_b": head.last_b, "masks": masks, "values": values}
        layout = _chunk_payload_layout(self.arch, n, self.float_dtype, self.hidden_dtype, self.has_masks,
                                       int(nnz.sum()))
        raw = b"".join(np.ascontiguousarray(arrays[name], dtype=dt).tobytes() for name, dt, _ in layout)
        assert len(raw) == _payload_bytes(layout)
        if len(raw) > MAX_CHUNK_RAW_BYTES:
            raise InrUsageError(f"InrWriter: chunk of {len(raw)} bytes exceeds {MAX_CHUNK_RAW_BYTES}")
        frame = self._cctx.compress(raw)
        self._append_frame(frame, len(raw), zlib.crc32(frame), head_rows, head.hidden_scale)

    def _append_frame(self, frame, raw_length: int, crc: int, rows: np.ndarray, scales: np.ndarray) -> None:
        """Append one compressed chunk (also used by merge_files to copy chunks verbatim)."""
        rows = rows.copy()
        rows["chunk"] = len(self._chunks)
        self._fh.write(frame)
        self._chunks.append((self._blob_bytes, len(frame), raw_length, self._num_images, len(rows), crc))
        self._blob_crc = zlib.crc32(frame, self._blob_crc)
        self._blob_bytes += len(frame)
        self._num_images += len(rows)
        self._index.append(rows)
        self._scales.append(np.asarray(scales, "<f4").reshape(len(rows), self.arch.hidden_layers))

    # -- finish -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Flush the last chunk, write tables and header, fsync and atomically rename to `path`."""
        if self._closed:
            return
        try:
            if self._pending_n:
                self._emit_chunk(self._pending_n)
            self._finish()
        except BaseException:
            self.abort()
            raise
        self._closed = True

    def _finish(self) -> None:
        fh = self._fh
        sections = [{"name": "blobs", "offset": PREAMBLE_SIZE, "length": self._blob_bytes,
                     "crc32": self._blob_crc}]
        h = self.arch.hidden_layers
        index = np.concatenate(self._index) if self._index else np.zeros(0, INDEX_DTYPE)
        scales = np.concatenate(self._scales) if self._scales else np.zeros((0, h), "<f4")
        chunks = np.array(self._chunks, CHUNK_DTYPE) if self._chunks else np.zeros(0, CHUNK_DTYPE)
        tables = [
            ("index", index.tobytes()),
            ("scales", np.ascontiguousarray(scales, "<f4").tobytes()),
            ("chunks", chunks.tobytes()),
            ("classes", _json_bytes(self.classes)),
            ("metadata", _json_bytes(self.metadata)),
        ]
        pos = PREAMBLE_SIZE + self._blob_bytes
        for name, data in tables:
            start = _align(pos)
            fh.write(bytes(start - pos))
            fh.write(data)
            sections.append({"name": name, "offset": start, "length": len(data), "crc32": zlib.crc32(data)})
            pos = start + len(data)
        header = {
            "format": FORMAT_NAME,
            "architecture": self.arch.to_json(),
            "hidden_dtype": self.hidden_dtype,
            "float_dtype": self.float_dtype,
            "has_masks": self.has_masks,
            "num_images": self._num_images,
            "num_chunks": len(self._chunks),
            "sections": sections,
        }
        header_bytes = _json_bytes(header)
        if len(header_bytes) > MAX_HEADER_BYTES:
            raise InrUsageError(f"InrWriter: header of {len(header_bytes)} bytes exceeds {MAX_HEADER_BYTES}")
        header_offset = _align(pos)
        fh.write(bytes(header_offset - pos))
        fh.write(header_bytes)
        pre = np.zeros((), PREAMBLE_DTYPE)
        pre["magic"], pre["major"], pre["minor"] = MAGIC, VERSION_MAJOR, VERSION_MINOR
        pre["header_crc32"] = zlib.crc32(header_bytes)
        pre["header_offset"], pre["header_length"] = header_offset, len(header_bytes)
        fh.seek(0)
        fh.write(pre.tobytes())
        fh.flush()
        os.fsync(fh.fileno())
        fh.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self._tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; give the file normal permissions
        os.replace(self._tmp_path, self.path)
        _fsync_dir(os.path.dirname(os.path.abspath(self.path)))

    def abort(self) -> None:
        """Discard everything written; `path` is left as it was."""
        self._closed = True
        fh = getattr(self, "_fh", None)
        if fh is not None and not fh.closed:
            fh.close()
        tmp = getattr(self, "_tmp_path", None)
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _json_bytes(obj) -> bytes:
    # Sorted keys and fixed separators: the same object always gives the same bytes.
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def _check_metadata(metadata, where: str) -> dict:
    metadata = dict(metadata or {})
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise InrUsageError(f"{where}: keys and values must be strings, got {k!r}: {v!r}")
    return metadata


def _vector(values, n: int, name: str, dtype, lo=None, hi=None) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim == 0:
        arr = np.full(n, arr)
    if arr.shape != (n,):
        raise InrUsageError(f"InrWriter.add: {name} must have length {n}, got shape {arr.shape}")
    if np.dtype(dtype).kind == "i":
        if arr.dtype.kind not in "iub":
            raise InrUsageError(f"InrWriter.add: {name} must be integers, got {arr.dtype}")
        arr = arr.astype(np.int64)
        if lo is not None and n and (arr.min() < lo or arr.max() > hi):
            bad = arr[(arr < lo) | (arr > hi)][0]
            raise InrUsageError(f"InrWriter.add: {name} value {bad} is outside [{lo}, {hi}]")
        return arr
    return arr.astype(dtype)


# --------------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------------
class InrFile:
    """A validated, memory-mapped .inr file. Opening checks the whole structure (see FORMAT.md, "What a
    reader validates"); chunk payloads are checked (CRC-32, exact size) when read."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self._mm = None
        self._fh = None
        try:
            self._fh = open(self.path, "rb")
        except OSError as e:
            raise InrFormatError(f"{self.path}: cannot open: {e.strerror or e}") from None
        try:
            self._open()
        except InrFormatError:
            self.close()
            raise
        except (struct.error, KeyError, IndexError, TypeError, ValueError, OverflowError, UnicodeDecodeError,
                RecursionError, zstandard.ZstdError, MemoryError, OSError) as e:
            self.close()
            raise InrFormatError(f"{self.path}: malformed file ({type(e).__name__}: {e})") from None

    def _fail(self, field: str, problem: str):
        raise InrFormatError(f"{self.path}: {field}: {problem}")

    # -- validation, all before any data is handed out ----------------------------------------------
    def _open(self) -> None:
        size = os.fstat(self._fh.fileno()).st_size
        self.file_bytes = size
        if size < PREAMBLE_SIZE:
            if size >= len(MAGIC) and self._fh.read(len(MAGIC)) != MAGIC:
                self._fail("magic", "not an .inr file (bad magic bytes)")
            self._fail("file", f"truncated: {size} bytes is shorter than the {PREAMBLE_SIZE}-byte preamble")
        self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)
        mm = self._mm
        pre = np.frombuffer(bytes(mm[:PREAMBLE_SIZE]), PREAMBLE_DTYPE, count=1)[0]
        if bytes(mm[:8]) != MAGIC:
            self._fail("magic", f"not an .inr file (bad magic bytes {bytes(mm[:8])!r})")
        major, minor = int(pre["major"]), int(pre["minor"])
        if major > VERSION_MAJOR:
            self._fail("version", f"file is format version {major}.{minor}, newer than this reader's "
                                  f"{VERSION_MAJOR}.{VERSION_MINOR}; upgrade inrfmt to read it")
        if major < 1:
            self._fail("version", f"unsupported format version {major}.{minor}")
        self.version = (major, minor)
        if minor <= VERSION_MINOR and any(bytes(mm[32:64])):
            self._fail("preamble.reserved", "reserved bytes 32..63 are not zero")
        h_off, h_len = int(pre["header_offset"]), int(pre["header_length"])
        self.header_offset, self.header_length = h_off, h_len
        if h_len > MAX_HEADER_BYTES:
            self._fail("header_length", f"{h_len} bytes exceeds the cap of {MAX_HEADER_BYTES}")
        if h_len < 2:
            self._fail("header_length", f"{h_len} is too small for a JSON object")
        if h_off % ALIGNMENT or h_off < PREAMBLE_SIZE:
            self._fail("header_offset", f"{h_off} is not a multiple of {ALIGNMENT} at or after the preamble")
        if h_off + h_len > size:
            self._fail("file", f"truncated: header at {h_off}+{h_len} ends past the end of the file "
                               f"({size} bytes)")
        if h_off + h_len != size:
            self._fail("file", f"{size - h_off - h_len} unaccounted bytes after the header")
        raw_header = bytes(mm[h_off:h_off + h_len])
        crc = zlib.crc32(raw_header)
        if crc != int(pre["header_crc32"]):
            self._fail("header_crc32", f"checksum mismatch (stored {int(pre['header_crc32']):#010x}, "
                                       f"computed {crc:#010x})")
        header = self._parse_json(raw_header, "header")
        if not isinstance(header, dict):
            self._fail("header", f"must be a JSON object, got {type(header).__name__}")
        self.header = header
        self._parse_header(header)
        self._check_layout(h_off)
        self._load_tables()

    def _parse_json(self, raw: bytes, field: str):
        try:
            return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            self._fail(field, f"not valid UTF-8 JSON ({type(e).__name__}: {str(e)[:200]})")

    def _get(self, obj: dict, key: str, kind, where: str):
        if key not in obj:
            self._fail(f"{where}{key}", "missing")
        value = obj[key]
        ok = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "num": isinstance(value, (int, float)) and not isinstance(value, bool),
            "str": isinstance(value, str),
            "bool": isinstance(value, bool),
            "list": isinstance(value, list),
            "dict": isinstance(value, dict),
        }[kind]
        if not ok:
            self._fail(f"{where}{key}", f"must be {kind}, got {value!r:.80}")
        return value

    def _parse_header(self, header: dict) -> None:
        g = self._get
        fmt = g(header, "format", "str", "header.")
        if fmt != FORMAT_NAME:
            self._fail("header.format", f"must be {FORMAT_NAME!r}, got {fmt!r:.80}")
        a = g(header, "architecture", "dict", "header.")
        where = "header.architecture."
        s, w = g(a, "sine_layers", "int", where), g(a, "width", "int", where)
        w0, fw0 = g(a, "w0", "num", where), g(a, "first_w0", "num", where)
        if not 1 <= s <= MAX_SINE_LAYERS:
            self._fail(where + "sine_layers", f"{s} is outside [1, {MAX_SINE_LAYERS}]")
        if not 1 <= w <= MAX_WIDTH:
            self._fail(where + "width", f"{w} is outside [1, {MAX_WIDTH}]")
        for name, v in (("w0", w0), ("first_w0", fw0)):
            if not (math.isfinite(v) and v > 0):
                self._fail(where + name, f"must be finite and > 0, got {v!r}")
        for key, want in (("in_features", IN_FEATURES), ("out_features", OUT_FEATURES),
                          ("output_layer", OUTPUT_LAYER), ("coordinates", COORDINATES),
                          ("output_mapping", OUTPUT_MAPPING)):
            got = g(a, key, "int" if isinstance(want, int) else "str", where)
            if got != want:
                self._fail(where + key, f"unsupported value {got!r:.80} (version 1 requires {want!r})")
        self.arch = Architecture(s, w, float(w0), float(fw0))
        self.hidden_dtype = g(header, "hidden_dtype", "str", "header.")
        if self.hidden_dtype not in HIDDEN_DTYPES:
            self._fail("header.hidden_dtype", f"unknown dtype {self.hidden_dtype!r:.80} (one of {HIDDEN_DTYPES})")
        self.float_dtype = g(header, "float_dtype", "str", "header.")
        if self.float_dtype not in FLOAT_DTYPES:
            self._fail("header.float_dtype", f"unknown dtype {self.float_dtype!r:.80} (one of {FLOAT_DTYPES})")
        self.has_masks = g(header, "has_masks", "bool", "header.")
        self.num_images = g(header, "num_images", "int", "header.")
        if not 0 <= self.num_images < 2 ** 32:
            self._fail("header.num_images", f"{self.num_images} is outside [0, 2^32)")
        self.num_chunks = g(header, "num_chunks", "int", "header.")
        if not 0 <= self.num_chunks <= self.num_images:
            self._fail("header.num_chunks", f"{self.num_chunks} is outside [0, num_images={self.num_images}]")
        sections = g(header, "sections", "list", "header.")
        self.sections: dict[str, dict] = {}
        for i, sec in enumerate(sections):
            where = f"header.sections[{i}]."
            if not isinstance(sec, dict):
                self._fail(f"header.sections[{i}]", f"must be an object, got {sec!r:.80}")
            name = g(sec, "name", "str", where)
            off, length, crc = g(sec, "offset", "int", where), g(sec, "length", "int", where), \
                g(sec, "crc32", "int", where)
            if name in self.sections:
                self._fail(where + "name", f"duplicate section {name!r:.80}")
            if off < 0 or length < 0 or not 0 <= crc < 2 ** 32:
                self._fail(f"section {name!r:.80}", f"negative offset/length or crc32 out of range "
                                                    f"(offset {off}, length {length}, crc32 {crc})")
            self.sections[name] = {"name": name, "offset": off, "length": length, "crc32": crc}
        for name in REQUIRED_SECTIONS:
            if name not in self.sections:
                self._fail(f"section {name!r}", "missing")

    def _check_layout(self, header_offset: int) -> None:
        """Sections lie inside the file, 64-byte aligned, in ascending order with nothing between them but
        zero padding to the next boundary; the header follows the last one the same way."""
        size, mm = self.file_bytes, self._mm
        regions = sorted(self.sections.values(), key=lambda s: (s["offset"], s["length"]))
        pos = PREAMBLE_SIZE
        for sec in regions + [{"name": "header", "offset": header_offset, "length": 0}]:
            name, off, length = sec["name"], sec["offset"], sec["length"]
            if off % ALIGNMENT:
                self._fail(f"section {name!r:.80}", f"offset {off} is not a multiple of {ALIGNMENT}")
            if off + length > size:
                self._fail(f"section {name!r:.80}", f"truncated or out of bounds: {off}+{length} ends past "
                                                    f"the end of the file ({size} bytes)")
            if off < pos:
                self._fail(f"section {name!r:.80}", f"offset {off} overlaps the previous region (ends at {pos})")
            if off != _align(pos):
                self._fail(f"section {name!r:.80}", f"{off - pos} unaccounted bytes before offset {off}")
            if any(bytes(mm[pos:off])):
                self._fail(f"section {name!r:.80}", f"padding before offset {off} is not zero")
            pos = off + length

    def _section_bytes(self, name: str) -> bytes:
        # A copy: numpy views into the mmap would keep it from closing.
        s = self.sections[name]
        return self._mm[s["offset"]:s["offset"] + s["length"]]

    def _load_tables(self) -> None:
        a, n = self.arch, self.num_images
        for name in CHECKED_AT_OPEN:
            data = self._section_bytes(name)
            crc = zlib.crc32(data)
            if crc != self.sections[name]["crc32"]:
                self._fail(f"section {name!r}", f"checksum mismatch (stored {self.sections[name]['crc32']:#010x}, "
                                                f"computed {crc:#010x})")
        # Sizes against num_images / architecture.
        expect = {"index": n * INDEX_DTYPE.itemsize, "scales": n * a.hidden_layers * 4,
                  "chunks": self.num_chunks * CHUNK_DTYPE.itemsize}
        for name, want in expect.items():
            got = self.sections[name]["length"]
            if got != want:
                self._fail(f"section {name!r}", f"length {got} does not match num_images={n}, num_chunks="
                                                f"{self.num_chunks}, architecture (expected {want})")
        self.index = np.frombuffer(self._section_bytes("index"), INDEX_DTYPE).copy()
        self.index.setflags(write=False)
        self.scales = np.frombuffer(self._section_bytes("scales"), "<f4").copy().reshape(n, a.hidden_layers)
        self.scales.setflags(write=False)
        self.chunks = np.frombuffer(self._section_bytes("chunks"), CHUNK_DTYPE).copy()
        self.chunks.setflags(write=False)
        self.classes = self._json_section("classes", list)
        if not all(isinstance(c, str) for c in self.classes):
            self._fail("section 'classes'", "must be a JSON array of strings")
        self.metadata = self._json_section("metadata", dict)
        if not all(isinstance(v, str) for v in self.metadata.values()):
            self._fail("section 'metadata'", "must be a JSON object of string values")
        self._check_scales()
        self._check_chunks()
        self._check_index()

    def _json_section(self, name: str, kind):
        value = self._parse_json(self._section_bytes(name), f"section {name!r}")
        if not isinstance(value, kind):
            self._fail(f"section {name!r}", f"must be a JSON {kind.__name__}, got {type(value).__name__}")
        return value

    def _check_scales(self) -> None:
        s = self.scales
        if self.hidden_dtype == "int8":
            bad = ~(np.isfinite(s) & (s >= 0))
            what = "must be finite and >= 0"
        else:
            bad = s != 1.0
            what = f"must be 1.0 for hidden_dtype {self.hidden_dtype}"
        if bad.any():
            i, l = map(int, np.argwhere(bad)[0])
            self._fail(f"scales[{i}, {l}]", f"{what}, got {float(s[i, l])!r}")

    def _check_chunks(self) -> None:
        c, n = self.chunks, self.num_images
        blobs_len = self.sections["blobs"]["length"]
        count = c["image_count"].astype(np.int64)
        first = c["first_image"]
        if len(c):
            if (count < 1).any():
                k = int(np.argmax(count < 1))
                self._fail(f"chunks[{k}].image_count", f"{int(count[k])} (must be >= 1)")
            expected_first = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.uint64)
            if (first != expected_first).any():
                k = int(np.argmax(first != expected_first))
                self._fail(f"chunks[{k}].first_image", f"{int(first[k])} (chunks must cover images contiguously "
                                                       f"from 0; expected {int(expected_first[k])})")
            if int(count.sum()) != n:
                self._fail("chunks", f"cover {int(count.sum())} images but num_images is {n}")
            clen = c["compressed_length"]
            if (clen > blobs_len).any():
                k = int(np.argmax(clen > blobs_len))
                self._fail(f"chunks[{k}].compressed_length", f"{int(clen[k])} exceeds the blobs section "
                                                             f"({blobs_len} bytes)")
            expected_off = np.concatenate([[0], np.cumsum(clen.astype(np.int64))[:-1]]).astype(np.uint64)
            if (c["offset"] != expected_off).any():
                k = int(np.argmax(c["offset"] != expected_off))
                self._fail(f"chunks[{k}].offset", f"{int(c['offset'][k])} (chunks must be stored back to back; "
                                                  f"expected {int(expected_off[k])})")
            if int(clen.astype(np.int64).sum()) != blobs_len:
                self._fail("chunks", f"frames total {int(clen.astype(np.int64).sum())} bytes but the blobs "
                                     f"section has {blobs_len}")
            if (c["raw_length"] > MAX_CHUNK_RAW_BYTES).any():
                k = int(np.argmax(c["raw_length"] > MAX_CHUNK_RAW_BYTES))
                self._fail(f"chunks[{k}].raw_length", f"{int(c['raw_length'][k])} exceeds {MAX_CHUNK_RAW_BYTES}")
        elif n:
            self._fail("chunks", f"no chunks but num_images is {n}")
        elif blobs_len:
            self._fail("section 'blobs'", f"{blobs_len} bytes but there are no chunks")
        self._chunk_bounds = np.concatenate([[0], np.cumsum(count)]).astype(np.int64)

    def _check_index(self) -> None:
        idx, a = self.index, self.arch
        total = a.hidden_layers * a.width * a.width
        if not len(idx):
            return
        label = idx["label"]
        hi = len(self.classes) - 1 if self.classes else 2 ** 31 - 1
        bad = (label < -1) | (label > hi)
        if bad.any():
            i = int(np.argmax(bad))
            self._fail(f"index[{i}].label", f"{int(label[i])} is outside [-1, {hi}]"
                                            + (f" ({len(self.classes)} classes)" if self.classes else ""))
        for f in ("height", "width"):
            if (idx[f] < 1).any():
                i = int(np.argmax(idx[f] < 1))
                self._fail(f"index[{i}].{f}", f"{int(idx[f][i])} (must be >= 1)")
        if not np.isfinite(idx["psnr"]).all():
            i = int(np.argmax(~np.isfinite(idx["psnr"])))
            self._fail(f"index[{i}].psnr", f"{float(idx['psnr'][i])} is not finite")
        owner = np.repeat(np.arange(len(self.chunks), dtype=np.int64), np.diff(self._chunk_bounds))
        if (idx["chunk"] != owner).any():
            i = int(np.argmax(idx["chunk"] != owner))
            self._fail(f"index[{i}].chunk", f"{int(idx['chunk'][i])} but the chunk table puts image {i} in "
                                            f"chunk {int(owner[i])}")
        nnz = idx["nnz"].astype(np.int64)
        if self.has_masks:
            if (nnz > total).any():
                i = int(np.argmax(nnz > total))
                self._fail(f"index[{i}].nnz", f"{int(nnz[i])} exceeds the {total} hidden weights per image")
        elif (nnz != total).any():
            i = int(np.argmax(nnz != total))
            self._fail(f"index[{i}].nnz", f"{int(nnz[i])} but a file without masks stores all {total} "
                                          f"hidden weights")
        ratio = _prune_ratio(nnz, total)
        if (idx["prune_ratio"] != ratio).any():
            i = int(np.argmax(idx["prune_ratio"] != ratio))
            self._fail(f"index[{i}].prune_ratio", f"{float(idx['prune_ratio'][i])!r} disagrees with nnz="
                                                  f"{int(nnz[i])} of {total} (expected {float(ratio[i])!r})")
        # value_start is the running sum of nnz within each chunk.
        csum = np.concatenate([[0], np.cumsum(nnz)])
        start = csum[:-1] - csum[self._chunk_bounds[:-1]][owner]
        if (idx["value_start"] != start).any():
            i = int(np.argmax(idx["value_start"] != start))
            self._fail(f"index[{i}].value_start", f"{int(idx['value_start'][i])} (expected {int(start[i])}, "
                                                  f"the sum of nnz of the earlier images of its chunk)")
        for k in range(len(self.chunks)):
            lo, hi_ = self._chunk_bounds[k], self._chunk_bounds[k + 1]
            want = _payload_bytes(self.chunk_layout(k, int(csum[hi_] - csum[lo])))
            if int(self.chunks["raw_length"][k]) != want:
                self._fail(f"chunks[{k}].raw_length", f"{int(self.chunks['raw_length'][k])} but its "
                                                      f"{hi_ - lo} images need {want} bytes")

    def chunk_layout(self, k: int, total_nnz: int):
        """(name, numpy dtype, shape) of each array in chunk k's decompressed payload, in file order."""
        n = int(self.chunks["image_count"][k])
        return _chunk_payload_layout(self.arch, n, self.float_dtype, self.hidden_dtype, self.has_masks, total_nnz)

    # -- public API -------------------------------------------------------------------------------
    @property
    def section_sizes(self) -> dict[str, int]:
        """Bytes per section, plus 'preamble', 'header' and 'padding' (all sum to file_bytes)."""
        sizes = {name: s["length"] for name, s in self.sections.items()}
        sizes["preamble"] = PREAMBLE_SIZE
        sizes["header"] = self.header_length
        sizes["padding"] = self.file_bytes - sum(sizes.values())
        return sizes

    def chunk_range(self, k: int) -> tuple[int, int]:
        if not 0 <= k < self.num_chunks:
            raise IndexError(f"chunk {k} out of range [0, {self.num_chunks})")
        return int(self._chunk_bounds[k]), int(self._chunk_bounds[k + 1])

    def read_chunk_frame(self, k: int) -> tuple[bytes, int]:
        """The compressed frame of chunk k, CRC-checked, and its exact decompressed size."""
        start, _ = self.chunk_range(k)
        row = self.chunks[k]
        off = self.sections["blobs"]["offset"] + int(row["offset"])
        frame = bytes(self._mm[off:off + int(row["compressed_length"])])
        crc = zlib.crc32(frame)
        if crc != int(row["crc32"]):
            self._fail(f"chunks[{k}].crc32", f"checksum mismatch (stored {int(row['crc32']):#010x}, "
                                             f"computed {crc:#010x})")
        return frame, int(row["raw_length"])

    def read_chunk(self, k: int) -> WeightBatch:
        """Decode chunk k into a WeightBatch (float32 floats, hidden_w in hidden_dtype, dense)."""
        try:
            return self._read_chunk(k)
        except (InrFormatError, InrUsageError, IndexError):
            raise
        except (ValueError, zstandard.ZstdError, TypeError, OverflowError, MemoryError) as e:
            raise InrFormatError(f"{self.path}: chunks[{k}]: cannot decode ({type(e).__name__}: {e})") from None

    def _read_chunk(self, k: int) -> WeightBatch:
        if self._mm is None:
            raise InrUsageError(f"{self.path}: file is closed")
        frame, raw_length = self.read_chunk_frame(k)
        raw = _decompress_exact(frame, raw_length, lambda msg: self._fail(f"chunks[{k}]", msg))
        start, stop = self.chunk_range(k)
        n = stop - start
        rows = self.index[start:stop]
        nnz = rows["nnz"].astype(np.int64)
        layout = self.chunk_layout(k, int(nnz.sum()))
        arrays, pos = {}, 0
        for name, dt, shape in layout:
            count = int(np.prod(shape, dtype=np.int64))
            arrays[name] = np.frombuffer(raw, dt, count=count, offset=pos).reshape(shape)
            pos += count * dt.itemsize
        a = self.arch
        h, w = a.hidden_layers, a.width
        total = h * w * w
        hidden_np = np.dtype(self.hidden_dtype)  # native order for the caller
        if self.has_masks:
            packed = arrays["masks"]
            mask = np.unpackbits(packed, axis=1, count=total).astype(bool) if total else np.zeros((n, 0), bool)
            if total % 8 and packed.shape[1] and (packed[:, -1] & ((1 << (8 - total % 8)) - 1)).any():
                self._fail(f"chunks[{k}].masks", "padding bits after the last mask bit are not zero")
            counts = mask.sum(axis=1)
            if (counts != nnz).any():
                i = int(np.argmax(counts != nnz))
                self._fail(f"index[{start + i}].nnz", f"{int(nnz[i])} but its mask keeps {int(counts[i])} weights")
            dense = np.zeros((n, total), hidden_np)
            dense[mask] = arrays["values"]
            mask = mask.reshape(n, h, w, w)
        else:
            dense = arrays["values"].reshape(n, total).astype(hidden_np)
            mask = None
        f32 = np.float32
        return WeightBatch(
            first_w=arrays["first_w"].astype(f32), first_b=arrays["first_b"].astype(f32),
            hidden_w=dense.reshape(n, h, w, w),
            hidden_scale=np.array(self.scales[start:stop], f32), hidden_b=arrays["hidden_b"].astype(f32),
            last_w=arrays["last_w"].astype(f32), last_b=arrays["last_b"].astype(f32), mask=mask)

    def read_images(self, indices) -> WeightBatch:
        """Weights of the given images, in the given order (each needed chunk is decoded once)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.num_images):
            bad = idx[(idx < 0) | (idx >= self.num_images)][0]
            raise IndexError(f"image {int(bad)} out of range [0, {self.num_images})")
        if not len(idx):
            return self._empty_batch()
        chunk_of = np.searchsorted(self._chunk_bounds, idx, side="right") - 1
        parts, positions = [], []
        for k in np.unique(chunk_of):
            sel = np.nonzero(chunk_of == k)[0]
            batch = self.read_chunk(int(k))
            parts.append(batch.take(idx[sel] - self._chunk_bounds[k]))
            positions.append(sel)
        merged = WeightBatch.concat(parts)
        order = np.empty(len(idx), np.int64)
        order[np.concatenate(positions)] = np.arange(len(idx))
        return merged.take(order)

    def _empty_batch(self) -> WeightBatch:
        a = self.arch
        w, h = a.width, a.hidden_layers
        f = np.float32
        return WeightBatch(np.zeros((0, w, 2), f), np.zeros((0, w), f),
                           np.zeros((0, h, w, w), np.dtype(self.hidden_dtype)),
                           np.zeros((0, h), f), np.zeros((0, h, w), f), np.zeros((0, 3, w), f), np.zeros((0, 3), f),
                           np.zeros((0, h, w, w), bool) if self.has_masks else None)

    def verify(self) -> None:
        """Check every checksum (the whole blobs section too) and decode every chunk."""
        blobs = self.sections["blobs"]
        crc, pos, end = 0, blobs["offset"], blobs["offset"] + blobs["length"]
        while pos < end:
            step = min(end - pos, 1 << 24)
            crc = zlib.crc32(self._mm[pos:pos + step], crc)
            pos += step
        if crc != blobs["crc32"]:
            self._fail("section 'blobs'", f"checksum mismatch (stored {blobs['crc32']:#010x}, computed {crc:#010x})")
        for k in range(self.num_chunks):
            self.read_chunk(k)

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return (f"InrFile({self.path!r}, version={self.version[0]}.{self.version[1]}, images={self.num_images}, "
                f"arch={self.arch.sine_layers}x{self.arch.width}, hidden={self.hidden_dtype})")


def _reject_constant(name):
    raise ValueError(f"{name} is not allowed in JSON")


def _unique_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"duplicate key {dup!r:.80}")
    return dict(pairs)


def _decompress_exact(frame: bytes, raw_length: int, fail) -> bytes:
    """One zstd frame -> exactly raw_length bytes. The frame header must declare that size; the output is
    bounded by it (never by a size a frame claims on its own), and no bytes may follow the frame."""
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as e:
        fail(f"not a zstd frame ({e})")
    if declared != raw_length:
        fail(f"zstd frame declares {declared} bytes, the chunk table {raw_length}")
    try:
        raw = zstandard.ZstdDecompressor().decompress(frame, max_output_size=raw_length, allow_extra_data=False)
    except zstandard.ZstdError as e:
        fail(f"zstd decompression failed ({e})")
    if len(raw) != raw_length:
        fail(f"decompressed to {len(raw)} bytes, expected {raw_length}")
    return raw


# --------------------------------------------------------------------------------------------------
# Merge
# --------------------------------------------------------------------------------------------------
def merge_files(parts, out, *, metadata=None) -> None:
    """Concatenate .inr files (same architecture, dtypes, masks and classes) into `out`, in order.
    Compressed chunks are copied verbatim (CRC-checked on the way). Metadata: the parts' metadata merged
    in order (a later part's value wins), then `metadata` on top. Atomic like InrWriter."""
    paths = [os.fspath(p) for p in parts]
    if not paths:
        raise InrUsageError("merge: no input files")
    files = []
    try:
        for p in paths:
            files.append(InrFile(p))
        first = files[0]
        for f in files[1:]:
            for attr in ("arch", "hidden_dtype", "float_dtype", "has_masks", "classes"):
                if getattr(f, attr) != getattr(first, attr):
                    raise InrUsageError(f"merge: {f.path} is incompatible with {first.path}: {attr} "
                                        f"{getattr(f, attr)!r:.200} != {getattr(first, attr)!r:.200}")
        merged_meta: dict[str, str] = {}
        for f in files:
            merged_meta.update(f.metadata)
        merged_meta.update(_check_metadata(metadata, "merge: metadata"))
        with InrWriter(out, first.arch, hidden_dtype=first.hidden_dtype, float_dtype=first.float_dtype,
                       has_masks=first.has_masks, classes=first.classes, metadata=merged_meta) as writer:
            for f in files:
                for k in range(f.num_chunks):
                    frame, raw_length = f.read_chunk_frame(k)
                    start, stop = f.chunk_range(k)
                    writer._append_frame(frame, raw_length, int(f.chunks["crc32"][k]), f.index[start:stop],
                                         f.scales[start:stop])
    finally:
        for f in files:
            f.close()
