"""The `.inr` writer (FORMAT.md) and `merge_files`, which joins files by copying their compressed chunks.

Writes are atomic: a temporary file beside the target, fsynced and renamed on close. The same inputs give
a byte-identical file. Format 1 needs numpy, zstandard and the standard library only; format 2 (coded)
also constriction.
"""
from __future__ import annotations

import os
import tempfile
import zlib
from typing import Iterable

import numpy as np
import zstandard

from . import coding
from .checks import check_int
from .errors import InrUsageError
from .prior import Prior
from .grid import CodeGrid
from .reader import InrFile
from .spec import (CHUNK_DTYPE, CODE_BYTES, CODED_INDEX_COLUMNS, FLOAT_DTYPES, FORMAT_NAME, HIDDEN_DTYPES,
                   INDEX_DTYPE, MAGIC, MAX_CHUNK_RAW_BYTES, MAX_HEADER_BYTES, PREAMBLE_DTYPE, PREAMBLE_SIZE,
                   WEIGHT_CODING, DTYPES, Architecture, WeightBatch, align, canonical_json, chunk_payload_layout,
                   keys_section, minor_version, payload_bytes, prune_ratio_of)

DEFAULT_ZSTD_LEVEL = 9


class InrWriter:
    """Streams images into a new .inr file. Atomic: writes `.<name>.*.tmp` next to `path`, fsyncs and
    renames on close(); on an exception inside `with` (or abort()) the temp file is removed and `path`
    is left untouched. The same inputs give a byte-identical file, whatever the sizes of the add() batches:
    chunks hold `chunk_images` images each, counted from the first image, the last one the rest.

    Source keys: pass `keys` (one string per image) to every add()/append_chunk() or to none; with keys the
    file gets a `keys` section; with keys or a prior the file is version 1.1, with neither 1.0.

    Format 2 (coded): give `grid` (a grid.CodeGrid for `arch`) and add images with add_codes(); the
    writer keeps their codes in a temporary file beside `path` and on close fits one probability table per
    parameter group over all of them and entropy-codes the chunks (version 2.0). `prior` is then the
    theta0 the codes are residuals of."""

    def __init__(self, path, arch: Architecture, *, hidden_dtype: str = "int8", float_dtype: str = "float32",
                 has_masks: bool = False, classes: Iterable[str] = (), metadata: dict | None = None,
                 chunk_images: int = 1024, zstd_level: int = DEFAULT_ZSTD_LEVEL, prior: Prior | None = None,
                 grid: CodeGrid | None = None):
        if not isinstance(arch, Architecture):
            raise InrUsageError(f"InrWriter: arch must be an Architecture, got {type(arch).__name__}")
        if grid is not None and (not isinstance(grid, CodeGrid) or grid.arch != arch):
            raise InrUsageError(f"InrWriter: grid must be a CodeGrid for the writer's architecture {arch}")
        if grid is not None and has_masks:
            raise InrUsageError("InrWriter: a coded file (grid) has no pruning masks")
        if hidden_dtype not in HIDDEN_DTYPES:
            raise InrUsageError(f"InrWriter: hidden_dtype must be one of {HIDDEN_DTYPES}, got {hidden_dtype!r}")
        if float_dtype not in FLOAT_DTYPES:
            raise InrUsageError(f"InrWriter: float_dtype must be one of {FLOAT_DTYPES}, got {float_dtype!r}")
        chunk_images = check_int("InrWriter: chunk_images", chunk_images, 1)
        self.classes = [c for c in classes]
        if not all(isinstance(c, str) for c in self.classes):
            raise InrUsageError("InrWriter: classes must be strings")
        self.metadata = _check_metadata(metadata, "InrWriter: metadata")
        if prior is not None and (not isinstance(prior, Prior) or prior.arch != arch):
            raise InrUsageError(f"InrWriter: prior must be a Prior for the writer's architecture {arch}")
        self.prior = prior
        self.path = os.fspath(path)
        self.arch = arch
        self.hidden_dtype = hidden_dtype
        self.float_dtype = float_dtype
        self.has_masks = bool(has_masks)
        self.grid = grid
        per_image = arch.params_per_image * CODE_BYTES if grid is not None else \
            payload_bytes(chunk_payload_layout(arch, 1, float_dtype, hidden_dtype, self.has_masks, arch.hidden_total))
        self.chunk_images = int(min(chunk_images, max(1, MAX_CHUNK_RAW_BYTES // per_image)))
        self._cctx = zstandard.ZstdCompressor(level=zstd_level, write_content_size=True, write_checksum=False)
        self._pending: list[tuple[WeightBatch, np.ndarray]] = []  # (weights, index rows), file dtypes
        self._pending_n = 0
        self._keys: list[str] | None = None  # None until the first add decides whether the file has keys
        self._index: list[np.ndarray] = []
        self._scales: list[np.ndarray] = []
        self._chunks: list[tuple] = []
        self._num_images = 0
        self._blob_bytes = 0
        self._blob_crc = 0
        self._closed = False
        self._spill = None  # coded files: every image's int16 codes until close
        self._hists = [np.zeros(1 << int(b), np.int64) for b in grid.bits] if grid is not None else None
        directory = os.path.dirname(os.path.abspath(self.path))
        fd, self._tmp_path = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(self.path) + ".",
                                              suffix=".tmp")
        self._fh = os.fdopen(fd, "w+b")
        if grid is not None:
            try:
                self._spill = tempfile.TemporaryFile(dir=directory, prefix="." + os.path.basename(self.path) + ".")
            except BaseException:
                self.abort()
                raise
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
    def add(self, weights: WeightBatch, labels, heights, widths, psnr, prune_ratio, keys=None) -> None:
        """Append n images. Arrays are per image (length n). prune_ratio must agree with the mask
        (the file stores the exact 1 - nnz/(H*W*W)); it must be 0 when the file has no masks. keys: each
        image's source key (see the class doc)."""
        if self._closed:
            raise InrUsageError("InrWriter.add: writer is closed")
        if self.grid is not None:
            raise InrUsageError("InrWriter.add: a coded writer (grid) takes codes: use add_codes")
        try:
            batch, rows = self._convert(weights, labels, heights, widths, psnr, prune_ratio)
            self._add_keys(keys, len(batch), "InrWriter.add")
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

    def add_codes(self, codes, labels, heights, widths, psnr, keys=None) -> None:
        """Append n images of a coded file: `codes` int [n, P] (parameter-group order, each group's codes
        within its bits), and per image label, height, width, PSNR (dB) and optionally source keys."""
        if self._closed:
            raise InrUsageError("InrWriter.add_codes: writer is closed")
        if self.grid is None:
            raise InrUsageError("InrWriter.add_codes: this writer has no grid (format 1): use add")
        try:
            codes = self.grid.check_codes(codes, "InrWriter.add_codes")
            n = len(codes)
            rows = self._index_rows(n, labels, heights, widths, psnr)
            self._add_keys(keys, n, "InrWriter.add_codes")
            codes = np.ascontiguousarray(codes, coding.CODE_DTYPE)
            for h, add in zip(self._hists, coding.histograms(codes, self.grid)):
                h += add
            self._spill.write(codes.astype("<i2").tobytes())
            self._index.append(rows)
            self._pending_n += n
        except BaseException:
            self.abort()
            raise

    def _add_keys(self, keys, n: int, where: str) -> None:
        if self.num_images == 0 and self._keys is None:
            self._keys = [] if keys is not None else None
        elif (keys is None) != (self._keys is None):
            raise InrUsageError(f"{where}: give keys for every batch of images or for none")
        if keys is None:
            return
        keys = list(keys)
        if len(keys) != n or not all(isinstance(k, str) for k in keys):
            raise InrUsageError(f"{where}: keys must be {n} strings, one per image")
        self._keys.extend(keys)

    def _convert(self, wb: WeightBatch, labels, heights, widths, psnr, prune_ratio):
        a, n = self.arch, len(wb)
        w, h = a.width, a.hidden_layers
        expected = {name: (n, *shape) for name, shape in a.shapes().items()}
        expected["hidden_scale"] = (n, h)
        for name, shape in expected.items():
            arr = getattr(wb, name)
            if not isinstance(arr, np.ndarray) or arr.shape != shape:
                got = arr.shape if isinstance(arr, np.ndarray) else type(arr).__name__
                raise InrUsageError(f"InrWriter.add: {name} must be a numpy array of shape {shape}, got {got}")
        fdt = DTYPES[self.float_dtype]
        hidden = wb.hidden_w
        if self.hidden_dtype == "int8":
            if hidden.dtype != np.int8:
                raise InrUsageError(f"InrWriter.add: hidden_w must be int8 for hidden_dtype int8, got {hidden.dtype}")
        elif hidden.dtype.kind != "f":
            raise InrUsageError(f"InrWriter.add: hidden_w must be floating point for hidden_dtype "
                                f"{self.hidden_dtype}, got {hidden.dtype}")
        hidden = np.ascontiguousarray(hidden, dtype=DTYPES[self.hidden_dtype])
        scale = np.ascontiguousarray(wb.hidden_scale, dtype="<f4")
        if self.hidden_dtype == "int8":
            if not np.all(np.isfinite(scale) & (scale >= 0)):
                raise InrUsageError("InrWriter.add: hidden_scale must be finite and >= 0")
        elif not np.all(scale == 1.0):
            raise InrUsageError(f"InrWriter.add: hidden_scale must be 1.0 for hidden_dtype {self.hidden_dtype}")
        total = a.hidden_total
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
        ratio = prune_ratio_of(nnz, total)
        given = _vector(prune_ratio, n, "prune_ratio", np.float64)
        disagrees = np.isnan(given) | (np.abs(given - ratio) > 1e-3 + 1.0 / max(total, 1))
        if disagrees.any():
            bad = int(np.argmax(disagrees))
            raise InrUsageError(f"InrWriter.add: prune_ratio[{bad}] = {given[bad]} disagrees with the mask "
                                f"({ratio[bad]:.6f} of hidden weights pruned)")
        rows = self._index_rows(n, labels, heights, widths, psnr)
        rows["prune_ratio"] = ratio
        rows["nnz"] = nnz
        batch = WeightBatch(
            first_w=np.asarray(wb.first_w, fdt), first_b=np.asarray(wb.first_b, fdt), hidden_w=hidden,
            hidden_scale=scale, hidden_b=np.asarray(wb.hidden_b, fdt), last_w=np.asarray(wb.last_w, fdt),
            last_b=np.asarray(wb.last_b, fdt), mask=mask)
        return batch, rows

    def _index_rows(self, n: int, labels, heights, widths, psnr) -> np.ndarray:
        """Checked INDEX_DTYPE rows of n new images (label, height, width, psnr; nothing pruned)."""
        rows = np.zeros(n, INDEX_DTYPE)
        rows["label"] = _vector(labels, n, "labels", np.int64, lo=-1,
                                hi=len(self.classes) - 1 if self.classes else 2 ** 31 - 1)
        rows["height"] = _vector(heights, n, "heights", np.int64, lo=1, hi=2 ** 32 - 1)
        rows["width"] = _vector(widths, n, "widths", np.int64, lo=1, hi=2 ** 32 - 1)
        p = _vector(psnr, n, "psnr", np.float64)
        if not np.all(np.isfinite(p.astype(np.float32))):
            raise InrUsageError("InrWriter.add: psnr must be finite")
        rows["psnr"] = p
        rows["nnz"] = self.arch.hidden_total
        return rows

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
        layout = chunk_payload_layout(self.arch, n, self.float_dtype, self.hidden_dtype, self.has_masks,
                                       int(nnz.sum()))
        raw = b"".join(np.ascontiguousarray(arrays[name], dtype=dt).tobytes() for name, dt, _ in layout)
        assert len(raw) == payload_bytes(layout)
        if len(raw) > MAX_CHUNK_RAW_BYTES:
            raise InrUsageError(f"InrWriter: chunk of {len(raw)} bytes exceeds {MAX_CHUNK_RAW_BYTES}")
        frame = self._cctx.compress(raw)
        self._write_chunk(frame, len(raw), zlib.crc32(frame), head_rows, head.hidden_scale)

    def append_chunk(self, frame: bytes, raw_length: int, crc: int, rows: np.ndarray, scales: np.ndarray,
                     keys=None) -> None:
        """Append one already compressed chunk: its zstd `frame`, the payload's `raw_length`, the frame's
        CRC-32, its images' INDEX_DTYPE `rows` (the `chunk` field is renumbered), float32 `scales` [n, H]
        and their source keys. merge_files copies chunks this way; the caller vouches for the frame (InrFile
        checks it on read) and for the chunking (add() images may be pending only when this chunk follows
        a whole number of chunk_images)."""
        if self._closed:
            raise InrUsageError("InrWriter.append_chunk: writer is closed")
        if self.grid is not None:
            raise InrUsageError("InrWriter.append_chunk: a coded writer re-codes every chunk: use add_codes")
        if self._pending_n:
            raise InrUsageError("InrWriter.append_chunk: images added with add() are still pending; "
                                "do not mix add() and append_chunk() in one file")
        self._add_keys(keys, len(rows), "InrWriter.append_chunk")
        self._write_chunk(frame, raw_length, crc, rows, scales)

    def _write_chunk(self, frame: bytes, raw_length: int, crc: int, rows: np.ndarray, scales: np.ndarray) -> None:
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
            if self.grid is not None:
                self._code_chunks()
            elif self._pending_n:
                self._emit_chunk(self._pending_n)
            self._finish()
        except BaseException:
            self.abort()
            raise
        self._closed = True

    def _code_chunks(self) -> None:
        """Coded files: fit the tables over every image's codes, then entropy-code the spilled codes chunk by
        chunk into the blobs section."""
        self._code_tables = coding.fit_tables(self._hists, self.grid)
        p, n = self.arch.params_per_image, self._pending_n
        self._spill.seek(0)
        for start in range(0, n, self.chunk_images):
            count = min(self.chunk_images, n - start)
            codes = np.frombuffer(self._spill.read(count * p * CODE_BYTES), "<i2").reshape(count, p)
            words = coding.encode_chunk(codes, self.grid, self._code_tables)
            self._fh.write(words)
            self._chunks.append((self._blob_bytes, len(words), count * p * CODE_BYTES, start, count,
                                 zlib.crc32(words)))
            self._blob_crc = zlib.crc32(words, self._blob_crc)
            self._blob_bytes += len(words)
        self._num_images, self._pending_n = n, 0

    def _finish(self) -> None:
        fh = self._fh
        sections = [{"name": "blobs", "offset": PREAMBLE_SIZE, "length": self._blob_bytes,
                     "crc32": self._blob_crc}]
        h = self.arch.hidden_layers
        index = np.concatenate(self._index) if self._index else np.zeros(0, INDEX_DTYPE)
        chunks = np.array(self._chunks, CHUNK_DTYPE) if self._chunks else np.zeros(0, CHUNK_DTYPE)
        if self.grid is None:
            scales = np.concatenate(self._scales) if self._scales else np.zeros((0, h), "<f4")
            tables = [("index", index.tobytes()), ("scales", np.ascontiguousarray(scales, "<f4").tobytes()),
                      ("chunks", chunks.tobytes())]
            weights = {"hidden_dtype": self.hidden_dtype, "float_dtype": self.float_dtype,
                       "has_masks": self.has_masks}
            major = 1
        else:
            columns = b"".join(np.ascontiguousarray(index[name], dt).tobytes() for name, dt in CODED_INDEX_COLUMNS)
            tables = [("index", self._cctx.compress(columns)),
                      ("psnr", np.ascontiguousarray(index["psnr"], "<f4").tobytes()), ("chunks", chunks.tobytes()),
                      ("quant", self.grid.table().tobytes()),
                      ("tables", coding.tables_section(self._code_tables))]
            weights = {"weight_coding": WEIGHT_CODING}
            major = 2
        tables += [("classes", canonical_json(self.classes)), ("metadata", canonical_json(self.metadata))]
        if self._keys is not None:
            keys = keys_section(self._keys)
            tables.append(("keys", keys if self.grid is None else self._cctx.compress(keys)))
        if self.prior is not None:
            tables.append(("prior", self.prior.to_bytes()))
        pos = PREAMBLE_SIZE + self._blob_bytes
        for name, data in tables:
            start = align(pos)
            fh.write(bytes(start - pos))
            fh.write(data)
            sections.append({"name": name, "offset": start, "length": len(data), "crc32": zlib.crc32(data)})
            pos = start + len(data)
        header = {
            "format": FORMAT_NAME,
            "architecture": self.arch.to_json(),
            **weights,
            "num_images": self._num_images,
            "num_chunks": len(self._chunks),
            "sections": sections,
        }
        header_bytes = canonical_json(header)
        if len(header_bytes) > MAX_HEADER_BYTES:
            raise InrUsageError(f"InrWriter: header of {len(header_bytes)} bytes exceeds {MAX_HEADER_BYTES}")
        header_offset = align(pos)
        fh.write(bytes(header_offset - pos))
        fh.write(header_bytes)
        pre = np.zeros((), PREAMBLE_DTYPE)
        pre["magic"], pre["major"] = MAGIC, major
        pre["minor"] = minor_version(major, (name for name, _ in tables))
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
        if self._spill is not None:
            self._spill.close()

    def abort(self) -> None:
        """Discard everything written; `path` is left as it was."""
        self._closed = True
        for fh in (getattr(self, "_fh", None), getattr(self, "_spill", None)):
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



def merge_files(parts, out, *, metadata=None, inherit_metadata: bool = True, chunk_images: int = 1024) -> None:
    """Concatenate .inr files (same format, architecture, dtypes or grid, masks, classes and prior) into
    `out`, in order, chunked as one InrWriter would chunk the same images (chunk_images per chunk from the
    first image): a format-1 part's chunk that already lies on that grid is copied verbatim (CRC-checked on
    the way), any other is read and re-chunked, so the result does not depend on how the images were split
    into parts. Format 2 parts are decoded and coded again with tables fitted over all their images. Source keys are
    carried (a part without keys gives its images empty keys). Metadata: the parts' metadata merged in
    order (a later part's value wins), then `metadata` on top; with inherit_metadata=False only `metadata`.
    Atomic like InrWriter."""
    paths = [os.fspath(p) for p in parts]
    if not paths:
        raise InrUsageError("merge: no input files")
    files = []
    try:
        for p in paths:
            files.append(InrFile(p))
        first = files[0]
        for f in files[1:]:
            for attr in ("major", "arch", "grid", "hidden_dtype", "float_dtype", "has_masks", "classes"):
                if getattr(f, attr) != getattr(first, attr):
                    raise InrUsageError(f"merge: {f.path} is incompatible with {first.path}: {attr} "
                                        f"{getattr(f, attr)!r:.200} != {getattr(first, attr)!r:.200}")
            if f.prior != first.prior:
                if f.prior is None or first.prior is None:
                    with_prior = f if first.prior is None else first
                    raise InrUsageError(f"merge: {with_prior.path} was fitted from a prior and "
                                        f"{(first if with_prior is f else f).path} without one: parts must share one "
                                        f"prior")
                raise InrUsageError(f"merge: {f.path} and {first.path} were fitted from different priors "
                                    f"({f.prior.name!r} and {first.prior.name!r}): parts must share one prior")
        merged_meta: dict[str, str] = {}
        for f in files if inherit_metadata else ():
            merged_meta.update(f.metadata)
        merged_meta.update(_check_metadata(metadata, "merge: metadata"))
        with_keys = any(f.keys is not None for f in files)
        total = sum(f.num_images for f in files)
        dtypes = {} if first.coded else dict(hidden_dtype=first.hidden_dtype, float_dtype=first.float_dtype,
                                             has_masks=first.has_masks)
        with InrWriter(out, first.arch, classes=first.classes, metadata=merged_meta, chunk_images=chunk_images,
                       prior=first.prior, grid=first.grid, **dtypes) as writer:
            size = writer.chunk_images
            for f in files:
                keys = (f.keys if f.keys is not None else [""] * f.num_images) if with_keys else None
                for k in range(f.num_chunks):
                    start, stop = f.chunk_range(k)
                    chunk_keys = keys[start:stop] if with_keys else None
                    done = writer.num_images
                    if f.coded:  # one set of tables for the whole file: every chunk is coded again
                        rows = f.index[start:stop]
                        writer.add_codes(f.read_codes(k), rows["label"], rows["height"], rows["width"],
                                         rows["psnr"], keys=chunk_keys)
                    elif done % size == 0 and (stop - start == size or done + stop - start == total):
                        frame, raw_length = f.read_chunk_frame(k)
                        writer.append_chunk(frame, raw_length, int(f.chunks["crc32"][k]), f.index[start:stop],
                                            f.scales[start:stop], keys=chunk_keys)
                    else:
                        rows = f.index[start:stop]
                        writer.add(f.read_chunk(k), rows["label"], rows["height"], rows["width"], rows["psnr"],
                                   rows["prune_ratio"], keys=chunk_keys)
    finally:
        for f in files:
            f.close()
