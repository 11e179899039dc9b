"""Sources that large datasets ship in: WebDataset tar shards and Parquet files (Hugging Face datasets).

Both are `sources.Source`s: opening makes a listing (member offsets and labels, or row counts and labels),
pixels are read by `load(i)` one item at a time, and a bad entry is a `SourceItemError` naming it, so
`convert` skips and names it like any other bad image. `sources.open_source` picks them from SRC.

* WebDataset (`.tar`, `.tar.gz`/`.tgz`, `.tar.bz2`, `.tar.xz`; one shard, a list, or a brace pattern such as
  ``shards/train-{000000..000099}.tar``): members with the same key (path up to the first "." of the file
  name) form a sample; its image is the member with an image extension (jpg jpeg png webp bmp tif tiff gif,
  first in that order) and its label an integer in the ``.cls`` member or the "label" / "cls" / "class" value
  of the ``.json`` member; samples without a label get -1. Classes are named by the decimal label. Item key:
  ``<shard file name>/<image member name>``. Members that are neither (captions, other images of the
  sample, samples without an image) are listed as unread. Read with the standard `tarfile`; a compressed
  shard is decompressed forward as items are read in order.
* Parquet (a `.parquet` file, a list, a brace pattern, or a folder of `.parquet` files), as Hugging Face
  `datasets` writes it: an image column (a struct with the encoded file in "bytes", or plain binary) and an
  integer label column. Column names: `images_column` / `labels_column` when given, else the first of
  "image img images picture" and "label labels target targets y cls class" that exists. Class names from
  the `ClassLabel` names in the file's Hugging Face schema metadata when present. Item key:
  ``<file name>#<row>``. Needs `pyarrow` (the `parquet` extra); one row group's images are in memory at a time.
"""
from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import re
import tarfile
import threading
import zlib
from pathlib import Path

import numpy as np

from .errors import InrUsageError
from .sources import (IMAGE_EXTENSIONS, Sample, Source, SourceItemError, _check_background, _check_labels,
                      _classes_for, decode_image_bytes)

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
PARQUET_SUFFIX = ".parquet"
_IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
_LABEL_FIELDS = ("label", "cls", "class")
_MAX_LABEL_MEMBER = 1 << 20  # a .cls / .json member larger than this is not read as a label
DEFAULT_IMAGE_COLUMNS = ("image", "img", "images", "picture")
DEFAULT_LABEL_COLUMNS = ("label", "labels", "target", "targets", "y", "cls", "class")


def expand_braces(pattern: str) -> list[str]:
    """Brace expansion as WebDataset and shells do it: ``a{000..002}b`` (numeric range, zero-padded to
    the width of its bounds) and ``a{x,y}b`` (list), any number of groups."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[:match.start()], match.group(1), pattern[match.end():]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        lo, hi = numeric.group(1), numeric.group(2)
        width = max(len(lo), len(hi)) if (lo.startswith("0") or hi.startswith("0")) else 0
        step = 1 if int(hi) >= int(lo) else -1
        choices = [str(v).zfill(width) for v in range(int(lo), int(hi) + step, step)]
    elif "," in body:
        choices = body.split(",")
    else:
        choices = ["{" + body + "}"]  # not a pattern: a literal brace pair
        return [head + choices[0] + rest for rest in expand_braces(tail)]
    return [head + c + rest for c in choices for rest in expand_braces(tail)]


def is_tar_name(name: str) -> bool:
    return name.lower().endswith(TAR_SUFFIXES)


# --------------------------------------------------------------------------------------------------
# WebDataset


def _open_stream(path: Path):
    """A file object over the uncompressed bytes of a (possibly compressed) tar; seekable."""
    with open(path, "rb") as f:
        head = f.read(6)
    if head.startswith(b"\x1f\x8b"):
        return gzip.open(path, "rb")
    if head.startswith(b"BZh"):
        return bz2.open(path, "rb")
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.open(path, "rb")
    return open(path, "rb")


def _label_of(ext: str, data: bytes) -> int:
    """The integer label in a .cls or .json member; ValueError with the reason otherwise."""
    text = data.decode("utf-8").strip()
    if ext == "cls":
        return int(text)
    obj = json.loads(text)
    if isinstance(obj, int) and not isinstance(obj, bool):
        return obj
    if isinstance(obj, dict):
        for field in _LABEL_FIELDS:
            value = obj.get(field)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        raise ValueError(f"no integer {'/'.join(_LABEL_FIELDS)} field")
    raise ValueError("not a JSON object or integer")


class WebDatasetSource(Source):
    kind = "webdataset"

    def __init__(self, shards: list[Path], background=(255, 255, 255)):
        self.background = _check_background(background)
        super().__init__(shards[0] if len(shards) == 1 else shards[0].parent, [])
        self.shards = shards
        shard_of, offsets, sizes, keys, labels = [], [], [], [], []
        self._bad: dict[int, str] = {}
        for si, path in enumerate(shards):
            for key, offset, size, label in self._list_shard(path):
                if isinstance(label, str):  # a bad label: the item is reported when it is read
                    self._bad[len(keys)] = label
                    label = -1
                shard_of.append(si)
                offsets.append(offset)
                sizes.append(size)
                keys.append(key)
                labels.append(label)
        if not keys:
            raise InrUsageError(f"no images found in the WebDataset shard(s) {shards[0]}"
                                f"{' ...' if len(shards) > 1 else ''} (samples need a member with an image "
                                f"extension: {' '.join(_IMAGE_EXTS)})")
        self.labels = _check_labels(np.asarray(labels, np.int64), len(keys), str(self.path))
        self.classes = _classes_for(self.labels, None, str(self.path)) if (self.labels >= 0).any() else []
        self.keys = keys
        self._shard_of = np.asarray(shard_of, np.int64)
        self._offsets = np.asarray(offsets, np.int64)
        self._sizes = np.asarray(sizes, np.int64)
        self._streams: dict[int, object] = {}
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def _list_shard(self, path: Path):
        """(key, data offset, size, label or a bad-label reason) of each sample with an image, in tar order."""
        samples: dict[str, dict] = {}
        try:
            tf = tarfile.open(path, "r:*")
        except (OSError, tarfile.TarError, EOFError) as e:
            raise InrUsageError(f"cannot read WebDataset shard {path}: {' '.join(str(e).split())}") from None
        with tf:
            try:
                for member in tf:
                    if member.isdir():
                        continue
                    directory, _, base = member.name.rpartition("/")
                    stem, dot, ext = base.partition(".")
                    if not member.isfile() or not dot or not stem:
                        self._not_read(f"{path.name}/{member.name}", "not a sample member (no key.extension name)"
                                       if member.isfile() else "not a regular file")
                        continue
                    sample = samples.setdefault(f"{directory}/{stem}" if directory else stem, {})
                    ext = ext.lower()
                    if ext in ("cls", "json") and member.size <= _MAX_LABEL_MEMBER:
                        sample[ext] = (member, tf.extractfile(member).read())
                    else:
                        sample[ext] = (member, None)
            except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
                self._not_read(f"{path.name}", f"damaged archive, members after {len(samples)} samples not read "
                                               f"({e})")
        for key, members in samples.items():
            image_ext = next((e for e in _IMAGE_EXTS if e in members), None)
            if image_ext is None:
                for ext, (member, _) in members.items():
                    self._not_read(f"{path.name}/{member.name}", "member of a sample without an image")
                continue
            label: int | str = -1
            label_ext = "cls" if "cls" in members else "json" if "json" in members else None
            if label_ext is not None:
                member, data = members[label_ext]
                if data is None:
                    label = f"label member {member.name} is larger than {_MAX_LABEL_MEMBER} bytes"
                else:
                    try:
                        label = _label_of(label_ext, data)
                    except (ValueError, UnicodeDecodeError) as e:
                        label = f"bad label in {member.name}: {str(e).splitlines()[0][:120]}"
                    else:
                        if label < -1:
                            label = f"bad label in {member.name}: {label} is negative (only -1 is allowed)"
            for ext, (member, _) in members.items():
                if ext not in (image_ext, label_ext):
                    self._not_read(f"{path.name}/{member.name}", f"a .{ext} member (not an image or a label)")
            image = members[image_ext][0]
            yield f"{path.name}/{image.name}", image.offset_data, image.size, label

    def __len__(self) -> int:
        return len(self.keys)

    def key(self, i) -> str:
        return self.keys[self._index(i)]

    def _read(self, i: int) -> bytes:
        si, offset, size = int(self._shard_of[i]), int(self._offsets[i]), int(self._sizes[i])
        with self._lock:
            if self._pid != os.getpid():
                self._streams, self._pid = {}, os.getpid()
            stream = self._streams.get(si)
            if stream is None:
                for old in self._streams.values():  # one shard open at a time
                    old.close()
                self._streams = {si: _open_stream(self.shards[si])}
                stream = self._streams[si]
            stream.seek(offset)
            data = stream.read(size)
        if len(data) != size:
            raise SourceItemError(self.keys[i], f"truncated: {len(data)} of {size} bytes in the archive")
        return data

    def _load(self, i: int) -> Sample:
        key = self.keys[i]
        if i in self._bad:
            raise SourceItemError(key, self._bad[i])
        try:
            data = self._read(i)
        except (OSError, EOFError, zlib.error) as e:
            raise SourceItemError(key, f"cannot read: {e}") from None
        return Sample(key, decode_image_bytes(data, key, self.background), int(self.labels[i]))

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_streams"], state["_lock"], state["_pid"] = {}, None, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


# --------------------------------------------------------------------------------------------------
# Parquet


def _import_pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InrUsageError("reading Parquet needs pyarrow: pip install 'inrfmt[parquet]'") from None
    return pq


def _hf_class_names(schema, column: str):
    """ClassLabel names of `column` from the Hugging Face `datasets` schema metadata, or None."""
    meta = schema.metadata or {}
    raw = meta.get(b"huggingface")
    if not raw:
        return None
    try:
        features = json.loads(raw)["info"]["features"]
        names = features[column].get("names")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return list(names) if isinstance(names, list) and all(isinstance(n, str) for n in names) else None


class ParquetSource(Source):
    kind = "parquet"

    def __init__(self, files: list[Path], images_column=None, labels_column=None, background=(255, 255, 255)):
        pq = _import_pyarrow()
        import pyarrow as pa

        self.background = _check_background(background)
        super().__init__(files[0] if len(files) == 1 else files[0].parent, [])
        self.files = files
        counts, labels_all, groups = [], [], []
        image_col = label_col = None
        class_names = None
        for path in files:
            try:
                pf = pq.ParquetFile(path)
            except (OSError, pa.ArrowException) as e:
                raise InrUsageError(f"cannot read {path} as Parquet: {str(e).splitlines()[0]}") from None
            names = pf.schema_arrow.names
            col = images_column or next((c for c in DEFAULT_IMAGE_COLUMNS if c in names), None)
            if col is None or col not in names:
                raise InrUsageError(f"{path}: no image column {images_column or ''} (looked for "
                                    f"{', '.join(DEFAULT_IMAGE_COLUMNS)}; present: {', '.join(names)}): name it "
                                    f"with --h5-images")
            lab = labels_column or next((c for c in DEFAULT_LABEL_COLUMNS if c in names), None)
            if labels_column is not None and labels_column not in names:
                raise InrUsageError(f"{path}: no label column {labels_column!r} (present: {', '.join(names)})")
            if image_col is not None and (col, lab) != (image_col, label_col):
                raise InrUsageError(f"{path}: columns {col!r}/{lab!r} differ from the first file's "
                                    f"{image_col!r}/{label_col!r}")
            image_col, label_col = col, lab
            field_type = pf.schema_arrow.field(col).type
            if not (pa.types.is_binary(field_type) or pa.types.is_large_binary(field_type)
                    or (pa.types.is_struct(field_type) and field_type.get_field_index("bytes") >= 0)):
                raise InrUsageError(f"{path}: column {col!r} is {field_type}, not encoded images (binary, or a "
                                    f"struct with a 'bytes' field as Hugging Face datasets writes)")
            n = pf.metadata.num_rows
            if lab is not None:
                import pyarrow.compute as pc

                label_type = pf.schema_arrow.field(lab).type
                if not pa.types.is_integer(label_type):
                    raise InrUsageError(f"{path}: label column {lab!r} is {label_type}, not integers; name another "
                                        f"with --h5-labels")
                try:
                    column = pc.fill_null(pf.read(columns=[lab]).column(0), -1).to_numpy(zero_copy_only=False)
                except (pa.ArrowException, OSError) as e:
                    raise InrUsageError(f"{path}: cannot read label column {lab!r}: {e}") from None
                labels_all.append(_check_labels(column, n, f"{path}:{lab}"))
                class_names = class_names or _hf_class_names(pf.schema_arrow, lab)
            else:
                labels_all.append(np.full(n, -1, np.int64))
            rows = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
            groups.append(np.concatenate([[0], np.cumsum(rows)]).astype(np.int64))
            counts.append(n)
        self.labels = np.concatenate(labels_all) if labels_all else np.zeros(0, np.int64)
        if not len(self.labels):
            raise InrUsageError(f"no rows in the Parquet file(s) {files[0]}{' ...' if len(files) > 1 else ''}")
        self.classes = _classes_for(self.labels, class_names, str(self.path)) if (self.labels >= 0).any() else []
        self.images_column, self.labels_column = image_col, label_col
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._group_bounds = groups
        self._cache = None  # (file, row group, list of encoded images): one row group in memory
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _locate(self, i: int) -> tuple[int, int]:
        f = int(np.searchsorted(self.starts, i, side="right")) - 1
        return f, i - int(self.starts[f])

    def key(self, i) -> str:
        f, row = self._locate(self._index(i))
        return f"{self.files[f].name}#{row}"

    def _encoded(self, f: int, row: int, key: str) -> bytes:
        bounds = self._group_bounds[f]
        g = int(np.searchsorted(bounds, row, side="right")) - 1
        with self._lock:
            cache = self._cache
            if cache is None or cache[:2] != (f, g):
                self._cache = None  # drop the old row group first
                import pyarrow as pa

                pq = _import_pyarrow()
                try:
                    table = pq.ParquetFile(self.files[f]).read_row_group(g, columns=[self.images_column])
                except (OSError, pa.ArrowException) as e:
                    raise SourceItemError(key, f"cannot read row group {g}: {str(e).splitlines()[0]}") from None
                self._cache = cache = (f, g, table.column(0).to_pylist())
            value = cache[2][row - int(bounds[g])]
        if isinstance(value, dict):
            value = value.get("bytes")
        if value is None:
            raise SourceItemError(key, f"no image bytes in column {self.images_column!r} (null)")
        return bytes(value)

    def _load(self, i: int) -> Sample:
        f, row = self._locate(i)
        key = f"{self.files[f].name}#{row}"
        return Sample(key, decode_image_bytes(self._encoded(f, row, key), key, self.background), int(self.labels[i]))

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"], state["_lock"] = None, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()
