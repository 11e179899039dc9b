"""Streaming image sources for `convert`: an image folder, CIFAR pickle batches, HDF5, .npy / .npz (and,
through `inrfmt.archive_sources`, WebDataset tar shards and Parquet files).

Every source is random-access by index and lazy: opening one makes only a listing (file names, array
shapes, labels); pixels are read by `load(i)`. Each sample comes back as an RGB uint8 [H, W, 3] array at its
original size, whatever the stored mode, so the encoder sees one kind of image.

Kinds (chosen by `open_source` from what SRC is):

* image folder: ``SRC/<class>/**/<file>`` with .jpg .jpeg .png .webp .bmp .tif .tiff .gif (any letter
  case; a GIF or multi-page TIFF gives its first frame), at any depth below the class folder (torchvision's
  ImageFolder rule: the class is the top-level folder). Labels are the index of the class folder in sorted
  order. A folder of images with no class folders gives label -1 and ``classes == []``. Items are sorted
  by relative path, so the order is the same on every machine; the key is that path. Everything else
  (other extensions, hidden files and folders) is recorded in `unread` with the reason.
* CIFAR-10 / CIFAR-100 python pickle batches: a folder that holds ``data_batch_*`` (CIFAR-10) or ``train``
  (CIFAR-100) reads those training batches, in numeric order; the test split is read by pointing SRC at the
  ``test_batch`` / ``test`` file itself (a folder never mixes the two splits). A single batch file, or a list
  of batch files, works too. Labels come from ``fine_labels`` (CIFAR-100) or ``labels``; class names from
  ``batches.meta`` / ``meta`` beside the batches when present. The pickles are read with a restricted
  unpickler that can only rebuild numpy arrays (see `_NumpyOnlyUnpickler`); at most one batch file's
  arrays are held in memory at a time.
* HDF5 (.h5 .hdf5 .hdf .he5, or the HDF5 signature): an images dataset (uint8, NHWC or NCHW, told apart by
  which axis has length 3 (or 1); NHW is grayscale) and an optional labels dataset, read one slice at a
  time. Dataset names: ``h5_images`` / ``h5_labels`` when given, else the first of
  ``images x X data imgs`` and ``labels y Y targets`` that exists. Class names from a ``classes`` attribute
  on the file or on the labels dataset (this is what `inrfmt export --format h5` writes).
* .npy: an array of images (same layouts as HDF5), memory-mapped; labels -1.
* .npz: an images member and an optional labels member with the same default names as HDF5 (``h5_images``
  / ``h5_labels`` choose others, e.g. ``x_train``); class names from a ``classes`` or ``class_names``
  string member. Uncompressed members (``np.savez``) are memory-mapped; compressed ones
  (``np.savez_compressed``) are decompressed as a stream, fast in index order.

Labels present but no class names: classes are named by the decimal label, "0" .. str(max label).

Pixel conversion for image files (`to_rgb8`):
* EXIF orientation is applied (the image is turned the way a viewer shows it), then
* CMYK, YCbCr, L, 1 (bilevel) and palette images are converted to RGB with Pillow;
* images with transparency (RGBA, LA, PA, palette with a transparent index) are composited over
  ``background`` (default white) — the SIREN stores RGB only;
* 16-bit grayscale (I;16 and friends) is scaled to 8 bits by round(v * 255 / 65535), the full range,
  not clipped; mode "I" (32-bit integer, what Pillow gives for some 16-bit files) is read as 16-bit data
  (values clipped to 0..65535 first); mode "F" is clipped to 0..255.
* ICC colour profiles are not applied (pixels are taken as sRGB).

`load` may be called from several threads at once. A source can be pickled (sent to a worker process): file
handles and memory maps are not sent, the copy reopens them itself.

A bad item (corrupt, truncated, empty, unreadable, zero-size, not a regular file, more than
`MAX_IMAGE_PIXELS` pixels) raises `SourceItemError(key, reason)` from `load(i)`; the encoder decides
whether to skip it or stop. A SRC that is missing or holds nothing this module can read raises
`InrUsageError` with a one-line message naming the path.
"""

from __future__ import annotations

import io
import math
import operator
import os
import pickle
import re
import stat
import threading
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from .errors import InrUsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
HDF5_EXTENSIONS = (".h5", ".hdf5", ".hdf", ".he5")
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# A decompression-bomb cap: a file that claims more pixels than this is a bad item, not an allocation.
# 8192 x 8192; a per-image SIREN is no use for larger pictures anyway.
MAX_IMAGE_PIXELS = 8192 * 8192
# Pillow formats an image folder may hold (multi-picture MPO JPEGs from cameras open through "JPEG"; a
# multi-page TIFF or an animated GIF gives its first frame).
_PIL_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
# At most this many unread files are named in the metadata (all of them are counted).
MAX_UNREAD_LISTED = 1000
DEFAULT_IMAGE_NAMES = ("images", "x", "X", "data", "imgs")
DEFAULT_LABEL_NAMES = ("labels", "y", "Y", "targets")
DEFAULT_CLASS_NAMES = ("classes", "class_names")


class Sample(NamedTuple):
    key: str  # stable id: relative path, or "<file>#<i>" for array/pickle sources
    image: np.ndarray  # uint8 [H, W, 3] RGB, original size
    label: int  # -1 when unlabelled


class SourceItemError(Exception):
    """One bad item of a source (corrupt, truncated, empty, unreadable, too large). `.key`, `.reason`."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


class Source:
    """Random access by index; opening makes only a listing. Subclasses fill `classes` and implement
    `__len__`, `key` and `_load`. `kind` and `path` say what was opened (for messages and metadata).
    `unread` lists what SRC holds that the source does not read ({"key", "reason"} dicts, at most
    MAX_UNREAD_LISTED of them) and `unread_count` counts it all: nothing is dropped silently."""

    kind = "source"

    def __init__(self, path: Path, classes: list[str]):
        self.path = path
        self.classes = classes
        self.unread: list[dict] = []
        self.unread_count = 0

    def _not_read(self, key: str, reason: str) -> None:
        self.unread_count += 1
        if len(self.unread) < MAX_UNREAD_LISTED:
            self.unread.append({"key": key, "reason": reason})

    def __len__(self) -> int:
        raise NotImplementedError

    def key(self, i) -> str:
        raise NotImplementedError

    def load(self, i) -> Sample:
        """Sample i as RGB uint8 [H, W, 3]; raises SourceItemError for a bad item, IndexError out of range."""
        return self._load(self._index(i))

    def _load(self, i: int) -> Sample:
        raise NotImplementedError

    def _index(self, i) -> int:
        n = len(self)
        try:
            i = operator.index(i)
        except TypeError:
            raise TypeError(f"source index must be an integer, got {i!r}") from None
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for a source of {n} images")
        return i

    def __iter__(self):
        for i in range(len(self)):
            yield self.load(i)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {str(self.path)!r}: {len(self)} images, {len(self.classes)} classes>"


# --------------------------------------------------------------------------------------------------
# pixel conversion


def to_rgb8(img, background=(255, 255, 255)) -> np.ndarray:
    """A loaded PIL image (any mode) -> RGB uint8 [H, W, 3]. Orientation is not touched here."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return _gray_to_rgb(_scale16(np.asarray(img)))
    if mode == "I":
        return _gray_to_rgb(_scale16(np.clip(np.asarray(img), 0, 65535)))
    if mode == "F":
        return _gray_to_rgb(np.clip(np.rint(np.asarray(img, dtype=np.float64)), 0, 255).astype(np.uint8))
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("P", "L", "RGB") and "transparency" in img.info)
    if has_alpha:
        # Palette/L/RGB "transparency" (a transparent index or colour) becomes real alpha via RGBA.
        rgba = np.asarray(img.convert("RGBA"), dtype=np.uint16)
        alpha = rgba[..., 3:4]
        bg = np.asarray(background, dtype=np.uint16).reshape(1, 1, 3)
        out = (rgba[..., :3] * alpha + bg * (255 - alpha) + 127) // 255
        return out.astype(np.uint8)
    if mode != "RGB":
        img = img.convert("RGB")
    out = np.asarray(img, dtype=np.uint8)
    if out.ndim != 3 or out.shape[2] != 3:  # defensive: Pillow gave something unexpected
        raise ValueError(f"mode {mode} converted to shape {out.shape}, not [H, W, 3]")
    return out


def _scale16(a: np.ndarray) -> np.ndarray:
    # round(v * 255 / 65535) in integers: exact, and 65535 -> 255, 0 -> 0.
    return ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _gray_to_rgb(g: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(g[:, :, None], 3, axis=2))


def _check_background(background) -> tuple[int, int, int]:
    try:
        bg = tuple(int(v) for v in background)
    except (TypeError, ValueError):
        raise InrUsageError(f"background must be three integers 0..255 (R, G, B), got {background!r}") from None
    if len(bg) != 3 or not all(0 <= v <= 255 for v in bg):
        raise InrUsageError(f"background must be three integers 0..255 (R, G, B), got {background!r}")
    return bg


# --------------------------------------------------------------------------------------------------
# image folder


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _why_not_an_image(full: Path, name: str) -> str:
    if name.startswith("."):
        return "hidden"
    if full.is_symlink() and not full.exists():
        return "broken link"
    ext = os.path.splitext(name)[1].lower()
    return f"not an image file this reader reads ({ext or 'no extension'}; reads {' '.join(IMAGE_EXTENSIONS)})"


class ImageFolderSource(Source):
    """torchvision's ImageFolder layout: ``SRC/<class>/**/<image>`` (class = the top-level folder, images
    at any depth below it) or a flat folder of images (label -1)."""

    kind = "imagefolder"

    def __init__(self, root: Path, background=(255, 255, 255)):
        self.background = _check_background(background)
        super().__init__(root, [])
        try:
            entries = sorted(os.listdir(root))
        except OSError as e:
            raise InrUsageError(f"cannot list SRC {root}: {e.strerror or e}") from None
        class_dirs, loose, other = [], [], []
        for name in entries:
            full = root / name
            if not name.startswith(".") and _is_image_name(name):
                loose.append(name)  # a directory named x.jpg is an item too: load() reports it
            elif not name.startswith(".") and full.is_dir():
                class_dirs.append(name)
            else:
                other.append(name)
        files: list[str] = []
        labels: list[int] = []
        if class_dirs:
            if loose:
                raise InrUsageError(
                    f"SRC {root} has class folders and also {len(loose)} images at its top level "
                    f"(e.g. {loose[0]!r}): move them into a class folder"
                )
            for label, cls in enumerate(class_dirs):
                names = self._walk(root, cls)
                files.extend(names)
                labels.extend([label] * len(names))
            classes = class_dirs
        else:
            files = loose
            labels = [-1] * len(loose)
            classes = []
        for name in other:
            self._not_read(name + ("/" if (root / name).is_dir() else ""), _why_not_an_image(root / name, name))
        if not files:
            raise InrUsageError(
                f"no images found in SRC {root} (looked for {' '.join(IMAGE_EXTENSIONS)} files in "
                f"SRC/<class>/ (any depth) or SRC/)"
            )
        self.classes = classes
        self.files = files
        self.labels = np.asarray(labels, dtype=np.int64)

    def _walk(self, root: Path, cls: str) -> list[str]:
        """Image files below class folder `cls` at any depth, sorted by relative path; records the rest."""
        found: list[str] = []
        seen: set[str] = set()

        def fail(e: OSError):
            raise InrUsageError(f"cannot list class folder {e.filename}: {e.strerror or e}")

        for top, dirs, names in os.walk(root / cls, onerror=fail, followlinks=True):
            real = os.path.realpath(top)
            rel = Path(top).relative_to(root).as_posix()
            if real in seen:  # a link back up the tree
                dirs[:] = []
                self._not_read(rel + "/", "a link to a folder already read")
                continue
            seen.add(real)
            for d in sorted(dirs):
                if d.startswith("."):
                    self._not_read(f"{rel}/{d}/", "hidden")
                elif _is_image_name(d):  # a folder named like an image is an item: load() reports it
                    found.append(f"{rel}/{d}")
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not _is_image_name(d))
            for name in sorted(names):
                if not name.startswith(".") and _is_image_name(name):
                    found.append(f"{rel}/{name}")
                else:
                    self._not_read(f"{rel}/{name}", _why_not_an_image(Path(top) / name, name))
        return sorted(found)

    def __len__(self) -> int:
        return len(self.files)

    def key(self, i) -> str:
        return self.files[self._index(i)]

    def _load(self, i: int) -> Sample:
        key = self.files[i]
        return Sample(key, load_image_file(self.path / key, key, self.background), int(self.labels[i]))


def load_image_file(path: Path, key: str, background=(255, 255, 255)) -> np.ndarray:
    """Read one image file -> RGB uint8 [H, W, 3], EXIF orientation applied. SourceItemError if bad."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise SourceItemError(key, f"cannot stat: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise SourceItemError(key, "not a regular file" + (" (a directory)" if stat.S_ISDIR(st.st_mode) else ""))
    if st.st_size == 0:
        raise SourceItemError(key, "empty file (0 bytes)")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise SourceItemError(key, f"cannot read: {e.strerror or e}") from None
    return decode_image_bytes(data, key, background)


def decode_image_bytes(data: bytes, key: str, background=(255, 255, 255)) -> np.ndarray:
    """An encoded image (JPEG, PNG, WebP, BMP, TIFF, GIF) -> RGB uint8 [H, W, 3], EXIF orientation applied.
    SourceItemError naming `key` if it is empty, corrupt, truncated or over the pixel cap."""
    from PIL import Image, ImageOps

    if not data:
        raise SourceItemError(key, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Our own pixel cap below replaces Pillow's bomb warning; other warnings stay quiet too.
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data), formats=_PIL_FORMATS) as img:
                w, h = img.size
                if w <= 0 or h <= 0:
                    raise SourceItemError(key, f"zero-size image ({w}x{h})")
                if w * h > MAX_IMAGE_PIXELS:
                    raise SourceItemError(
                        key, f"{w}x{h} = {w * h} pixels is over the {MAX_IMAGE_PIXELS}-pixel cap (decompression bomb?)"
                    )
                img.load()  # decodes everything: truncated or corrupt data fails here
                try:
                    oriented = ImageOps.exif_transpose(img)
                except Exception:  # a broken EXIF block is not a broken image: keep the stored orientation
                    oriented = img
                return to_rgb8(oriented, background)
    except SourceItemError:
        raise
    except MemoryError:
        raise SourceItemError(key, "out of memory decoding the image") from None
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, ValueError, DecompressionBombError...)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, Image.UnidentifiedImageError):
            reason = _why_unidentified(data)
        elif isinstance(e, Image.DecompressionBombError):
            claimed = re.search(r"\((\d+) pixels\)", reason)
            reason = (f"{claimed.group(1) if claimed else 'too many'} pixels is over the {MAX_IMAGE_PIXELS}-pixel "
                      f"cap (decompression bomb?)")
        raise SourceItemError(key, f"cannot decode: {reason}") from None


def _why_unidentified(data: bytes) -> str:
    """Pillow's "cannot identify image file" hides the reason; for a file that starts like one of our
    formats, ask that format's reader what is wrong (e.g. a PNG header checksum)."""
    from PIL import (BmpImagePlugin, GifImagePlugin, JpegImagePlugin, PngImagePlugin, TiffImagePlugin,
                     WebPImagePlugin)

    readers = [
        (b"\x89PNG\r\n\x1a\n", PngImagePlugin.PngImageFile, "PNG"),
        (b"\xff\xd8", JpegImagePlugin.JpegImageFile, "JPEG"),
        (b"BM", BmpImagePlugin.BmpImageFile, "BMP"),
        (b"RIFF", WebPImagePlugin.WebPImageFile, "WebP"),
        (b"II*\x00", TiffImagePlugin.TiffImageFile, "TIFF"),
        (b"MM\x00*", TiffImagePlugin.TiffImageFile, "TIFF"),
        (b"GIF8", GifImagePlugin.GifImageFile, "GIF"),
    ]
    for magic, reader, name in readers:
        if data.startswith(magic):
            try:
                reader(io.BytesIO(data)).close()
            except Exception as e:  # the reader's own complaint
                detail = str(e).splitlines()[0] if str(e) else type(e).__name__
                if "not identified" in detail:
                    detail = "invalid header"
                return f"corrupt {name} file: {detail}"
            return f"corrupt {name} file"
    return "not a JPEG, PNG, WebP, BMP, TIFF or GIF image (unknown or unsupported format)"


# --------------------------------------------------------------------------------------------------
# arrays (HDF5, npy, npz): layout detection shared by all three


class _Layout(NamedTuple):
    kind: str  # "NHWC" | "NCHW" | "NHW"
    height: int
    width: int
    channels: int


def _array_layout(shape, dtype, what: str) -> _Layout:
    if np.dtype(dtype) != np.uint8:
        raise InrUsageError(f"{what}: images must be uint8, got dtype {np.dtype(dtype)}")
    shape = tuple(int(s) for s in shape)
    if len(shape) == 3:
        n, h, w = shape
        layout = _Layout("NHW", h, w, 1)
    elif len(shape) == 4:
        if shape[3] in (3, 1):  # channels-last wins a tie (N, 3, H, 3 is read as NHWC)
            layout = _Layout("NHWC", shape[1], shape[2], shape[3])
        elif shape[1] in (3, 1):
            layout = _Layout("NCHW", shape[2], shape[3], shape[1])
        else:
            raise InrUsageError(
                f"{what}: shape {shape} has no channel axis of length 3 (or 1); expected NHWC, NCHW or NHW"
            )
    else:
        raise InrUsageError(f"{what}: images must be NHWC, NCHW or NHW (3 or 4 dims), got shape {shape}")
    if layout.height <= 0 or layout.width <= 0:
        raise InrUsageError(f"{what}: zero-size images in shape {shape}")
    if shape[0] == 0:
        raise InrUsageError(f"{what}: holds no images (shape {shape})")
    return layout


def _to_hwc_rgb(item: np.ndarray, layout: _Layout) -> np.ndarray:
    """One item of an array source (in its stored layout) -> contiguous RGB uint8 [H, W, 3] copy."""
    a = np.asarray(item)
    if layout.kind == "NCHW":
        a = a.transpose(1, 2, 0)
    elif layout.kind == "NHW":
        a = a[:, :, None]
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.array(a, dtype=np.uint8, order="C", copy=True)


def _check_labels(labels, n: int, what: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        # float labels that are whole numbers are common (e.g. from MATLAB); anything else is an error
        if labels.ndim == 1 and np.issubdtype(labels.dtype, np.floating) and np.all(labels == np.round(labels)):
            labels = labels.astype(np.int64)
        else:
            raise InrUsageError(f"{what}: labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
    if len(labels) != n:
        raise InrUsageError(f"{what}: {len(labels)} labels for {n} images")
    labels = labels.astype(np.int64)
    if labels.size and labels.min() < -1:
        raise InrUsageError(f"{what}: label {int(labels.min())} is negative (only -1, 'unlabelled', is allowed)")
    return labels


def _classes_for(labels: np.ndarray, names, what: str) -> list[str]:
    """Class names: the stored ones when present (checked against the labels), else "0".."max"."""
    top = int(labels.max()) if labels.size else -1
    if names is not None:
        names = [_as_str(c) for c in names]
        if top >= len(names):
            raise InrUsageError(f"{what}: label {top} but only {len(names)} class names")
        return names
    return [str(c) for c in range(top + 1)]


def _as_str(v) -> str:
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.ndarray) and v.ndim == 0:
        return _as_str(v.item())
    return str(v)


def _pick_name(names: Sequence[str], wanted: str | None, defaults: Sequence[str], what: str, role: str):
    """wanted given: it must exist. Else the first default present, or None."""
    if wanted is not None:
        if wanted not in names:
            present = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
            raise InrUsageError(f"{what}: no {role} named {wanted!r} (present: {present or 'none'})")
        return wanted
    for d in defaults:
        if d in names:
            return d
    return None


class _ArraySource(Source):
    """Shared parts of HDF5 / npy / npz: items are `_item(i)` of an array in a `_Layout`."""

    layout: _Layout
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def key(self, i) -> str:
        return f"{self.path.name}#{self._index(i)}"

    def _load(self, i: int) -> Sample:
        key = f"{self.path.name}#{i}"
        try:
            item = self._item(i)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:  # a damaged region
            raise SourceItemError(key, f"cannot read: {e}") from None
        return Sample(key, _to_hwc_rgb(item, self.layout), int(self.labels[i]))

    def _item(self, i: int) -> np.ndarray:
        raise NotImplementedError

    # File handles and memory maps are per process: a source sent to a worker process reopens lazily.
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handle"] = None
        state["_pid"] = None
        return state


# --------------------------------------------------------------------------------------------------
# HDF5


def _import_h5py():
    try:
        import h5py
    except ImportError:
        raise InrUsageError("reading HDF5 needs h5py: pip install 'inrfmt[hdf5]'") from None
    return h5py


class Hdf5Source(_ArraySource):
    kind = "hdf5"

    def __init__(self, path: Path, h5_images=None, h5_labels=None):
        h5py = _import_h5py()
        what = str(path)
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise InrUsageError(f"cannot open HDF5 file {path}: {e}") from None
        with f:
            names: list[str] = []
            f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
            img_name = _pick_name(names, h5_images, DEFAULT_IMAGE_NAMES, what, "images dataset")
            if img_name is None:
                raise InrUsageError(
                    f"{what}: no images dataset (looked for {', '.join(DEFAULT_IMAGE_NAMES)}; present: "
                    f"{', '.join(names) or 'none'}): name it with h5_images / --h5-images"
                )
            dset = f[img_name]
            layout = _array_layout(dset.shape, dset.dtype, f"{what}:{img_name}")
            n = int(dset.shape[0])
            lab_name = _pick_name(names, h5_labels, DEFAULT_LABEL_NAMES, what, "labels dataset")
            class_names = None
            if lab_name is not None:
                labels = _check_labels(f[lab_name][()], n, f"{what}:{lab_name}")
                for holder in (f[lab_name], f):
                    if "classes" in holder.attrs:
                        class_names = list(np.atleast_1d(holder.attrs["classes"]))
                        break
                classes = _classes_for(labels, class_names, what)
            else:
                labels = np.full(n, -1, dtype=np.int64)
                classes = []
        super().__init__(path, classes)
        self.images_name, self.labels_name = img_name, lab_name
        self.layout, self.labels = layout, labels
        self._handle, self._pid = None, None

    def _item(self, i: int) -> np.ndarray:
        if self._handle is None or self._pid != os.getpid():
            self._handle = _import_h5py().File(self.path, "r")[self.images_name]
            self._pid = os.getpid()
        return self._handle[i]  # h5py reads just this slice


# --------------------------------------------------------------------------------------------------
# .npy / .npz


class NpySource(_ArraySource):
    kind = "npy"

    def __init__(self, path: Path):
        arr = self._open(path)
        self.layout = _array_layout(arr.shape, arr.dtype, str(path))
        super().__init__(path, [])
        self.labels = np.full(arr.shape[0], -1, dtype=np.int64)
        self._handle, self._pid = arr, os.getpid()

    @staticmethod
    def _open(path: Path) -> np.ndarray:
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as e:  # object arrays (pickled) and malformed headers
            raise InrUsageError(f"cannot read {path} as a numpy array: {str(e).splitlines()[0]}") from None
        except OSError as e:
            raise InrUsageError(f"cannot read {path}: {e}") from None

    def _item(self, i: int) -> np.ndarray:
        if self._handle is None or self._pid != os.getpid():
            self._handle, self._pid = self._open(self.path), os.getpid()
        return self._handle[i]


class _NpzMember:
    """One array member of a .npz, read item by item without loading the member: memory-mapped when
    stored uncompressed, else decompressed as a stream (forward reads are cheap, a backward one restarts)."""

    def __init__(self, path: Path, name: str):
        self.path, self.name = path, name
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo(name + ".npy")
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=100000)
                else:
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f, max_header_size=100000)
                header_len = f.tell()
            self.compressed = info.compress_type != zipfile.ZIP_STORED
            self.data_offset = None
            if not self.compressed:
                # local header: 30 fixed bytes + name + extra, then the member's bytes
                with open(path, "rb") as raw:
                    raw.seek(info.header_offset)
                    local = raw.read(30)
                    name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
                self.data_offset = info.header_offset + 30 + name_len + extra_len + header_len
        if dtype.hasobject:
            raise InrUsageError(f"{path}: member {name!r} holds Python objects (pickled); only plain arrays are read")
        if fortran and self.compressed and len(shape) > 1:
            raise InrUsageError(f"{path}: member {name!r} is compressed and in Fortran order; save it in C order")
        self.shape, self.dtype, self.fortran, self.header_len = tuple(shape), dtype, fortran, header_len
        self.item_shape = self.shape[1:]
        self.item_bytes = int(np.prod(self.item_shape, dtype=np.int64)) * dtype.itemsize
        self._mm = None
        self._lock = threading.Lock()  # the compressed stream has one read position
        self._stream = None
        self._zip = None
        self._pos = 0

    def read_all(self) -> np.ndarray:
        with zipfile.ZipFile(self.path) as zf:
            with zf.open(self.name + ".npy") as f:
                return np.lib.format.read_array(f, allow_pickle=False)

    def item(self, i: int) -> np.ndarray:
        if not self.compressed:
            if self._mm is None:
                self._mm = np.memmap(
                    self.path, dtype=self.dtype, mode="r", offset=self.data_offset, shape=self.shape,
                    order="F" if self.fortran else "C",
                )
            return self._mm[i]
        with self._lock:
            try:
                return self._stream_item(i)
            except BaseException:
                self.close()  # a damaged stream is not reused: the next read starts afresh
                raise

    def _stream_item(self, i: int) -> np.ndarray:
        start = self.header_len + i * self.item_bytes
        if self._stream is None or self._pos > start:
            self.close()
            self._zip = zipfile.ZipFile(self.path)
            self._stream = self._zip.open(self.name + ".npy")
            self._pos = 0
        if self._pos < start:
            self._stream.seek(start)  # zipfile decompresses forward to reach it
        buf = self._stream.read(self.item_bytes)
        if len(buf) != self.item_bytes:
            self.close()
            raise EOFError(f"member {self.name!r} ends inside item {i}")
        self._pos = start + self.item_bytes
        return np.frombuffer(buf, dtype=self.dtype).reshape(self.item_shape)

    def close(self):
        if self._stream is not None:
            self._stream.close()
            self._zip.close()
        self._stream = self._zip = None
        self._pos = 0


class NpzSource(_ArraySource):
    kind = "npz"

    def __init__(self, path: Path, images_name=None, labels_name=None):
        what = str(path)
        try:
            with zipfile.ZipFile(path) as zf:
                names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
        except (OSError, zipfile.BadZipFile) as e:
            raise InrUsageError(f"cannot read {path} as .npz: {e}") from None
        img_name = _pick_name(names, images_name, DEFAULT_IMAGE_NAMES, what, "images array")
        if img_name is None:
            raise InrUsageError(
                f"{what}: no images array (looked for {', '.join(DEFAULT_IMAGE_NAMES)}; present: "
                f"{', '.join(names) or 'none'}): name it with h5_images / --h5-images"
            )
        lab_name = _pick_name(names, labels_name, DEFAULT_LABEL_NAMES, what, "labels array")
        try:
            member = _NpzMember(path, img_name)
            self.layout = _array_layout(member.shape, member.dtype, f"{what}:{img_name}")
            n = member.shape[0]
            if lab_name is not None:
                labels = _check_labels(_NpzMember(path, lab_name).read_all(), n, f"{what}:{lab_name}")
                class_names = None
                cls_name = next((c for c in DEFAULT_CLASS_NAMES if c in names), None)
                if cls_name is not None:
                    class_names = list(np.atleast_1d(_NpzMember(path, cls_name).read_all()))
                classes = _classes_for(labels, class_names, what)
            else:
                labels, classes = np.full(n, -1, dtype=np.int64), []
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            if isinstance(e, InrUsageError):
                raise
            raise InrUsageError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        super().__init__(path, classes)
        self.images_name, self.labels_name = img_name, lab_name
        self.labels = labels
        self._handle, self._pid = member, os.getpid()

    def _item(self, i: int) -> np.ndarray:
        if self._handle is None or self._pid != os.getpid():
            self._handle, self._pid = _NpzMember(self.path, self.images_name), os.getpid()
        return self._handle.item(i)


# --------------------------------------------------------------------------------------------------
# CIFAR pickle batches

# The only globals a CIFAR batch (a dict of numpy arrays, lists and bytes) needs to be rebuilt. All of
# them only construct arrays from data; nothing else can be called, so a hostile pickle cannot run code.
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    ("builtins", "dict"),
    ("builtins", "list"),
    ("builtins", "tuple"),
    ("builtins", "bytes"),
    ("builtins", "bytearray"),
}
_PICKLE_ALLOWED |= {("__builtin__", name) for module, name in _PICKLE_ALLOWED if module == "builtins"}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _PICKLE_ALLOWED:
            if module.startswith("numpy.core.") and hasattr(np, "_core"):
                module = "numpy._core." + module[len("numpy.core."):]  # numpy 2 names it _core (no warning)
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refers to {module}.{name}, which is not allowed (only numpy arrays are read)")


def _read_pickle(path: Path) -> dict:
    """A CIFAR batch file -> its dict with str keys. InrUsageError for anything else."""
    try:
        with open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except OSError as e:
        raise InrUsageError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # UnpicklingError, EOFError, ValueError, ... : all mean "not a batch we can read"
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InrUsageError(f"cannot read {path} as a CIFAR pickle batch: {msg}") from None
    if not isinstance(obj, dict):
        raise InrUsageError(f"{path}: a CIFAR batch is a dict, got {type(obj).__name__}")
    return {_as_str(k): v for k, v in obj.items()}


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


_CIFAR_BATCH_RE = re.compile(r"^data_batch_\d+$")


def _cifar_batches_in(folder: Path) -> list[Path]:
    """Training batches in a CIFAR folder: data_batch_* (CIFAR-10) or train (CIFAR-100); else the test one."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    train = sorted((n for n in names if _CIFAR_BATCH_RE.match(n)), key=_natural_key)
    if not train and "train" in names and (folder / "train").is_file():
        train = ["train"]
    if not train:
        train = [n for n in ("test_batch", "test") if n in names and (folder / n).is_file()][:1]
    return [folder / n for n in train if (folder / n).is_file()]


class CifarSource(Source):
    kind = "cifar"

    def __init__(self, files: Sequence[Path]):
        files = [Path(p) for p in files]
        counts, labels_all = [], []
        side, fine = None, False
        for p in files:
            batch = _read_pickle(p)
            data, labels, batch_fine = self._arrays(batch, p)
            fine = fine or batch_fine
            s = math.isqrt(data.shape[1] // 3)
            if side is None:
                side = s
            elif s != side:
                raise InrUsageError(f"{p}: {s}x{s} images, but the batches before hold {side}x{side}")
            counts.append(data.shape[0])
            labels_all.append(labels)
            del batch, data  # only one batch in memory at a time
        labels = np.concatenate(labels_all) if labels_all else np.zeros(0, np.int64)
        class_names = self._meta_names(files[0].parent, fine=fine)
        classes = _classes_for(labels, class_names, str(files[0].parent))
        super().__init__(files[0].parent if len(files) > 1 else files[0], classes)
        self.files, self.side, self.labels = files, side, labels
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._cache = None  # (batch file number, its data array): the one batch held in memory

    @staticmethod
    def _arrays(batch: dict, path: Path):
        """(data uint8 [N, 3*H*W], labels, whether they are CIFAR-100 fine labels) of one batch."""
        data = batch.get("data")
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim not in (2, 4):
            desc = f"dtype {data.dtype} shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise InrUsageError(f"{path}: 'data' must be a uint8 array [N, 3*H*W], got {desc}")
        if data.ndim == 4:  # some re-saved copies keep N,3,H,W
            if data.shape[1] != 3:
                raise InrUsageError(f"{path}: 'data' shape {data.shape} is not N,3,H,W")
            data = data.reshape(data.shape[0], -1)
        side = math.isqrt(data.shape[1] // 3)
        if data.shape[1] != 3 * side * side or side == 0:
            raise InrUsageError(f"{path}: 'data' rows of {data.shape[1]} values are not 3 square colour planes")
        fine = "fine_labels" in batch
        if not fine and "labels" not in batch:
            raise InrUsageError(f"{path}: no 'labels' or 'fine_labels' in the batch (keys: {', '.join(batch)})")
        raw = batch["fine_labels" if fine else "labels"]
        return data, _check_labels(np.asarray(raw), data.shape[0], str(path)), fine

    @staticmethod
    def _meta_names(folder: Path, fine: bool):
        for meta_name, field in (("batches.meta", "label_names"), ("meta", "fine_label_names" if fine else "label_names")):
            p = folder / meta_name
            if p.is_file():
                meta = _read_pickle(p)
                names = meta.get(field)
                if names is None and not fine:
                    names = meta.get("coarse_label_names")
                if names is not None:
                    return list(names)
        return None

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _locate(self, i: int):
        f = int(np.searchsorted(self.starts, i, side="right")) - 1
        return f, i - int(self.starts[f])

    def key(self, i) -> str:
        f, j = self._locate(self._index(i))
        return f"{self.files[f].name}#{j}"

    def _load(self, i: int) -> Sample:
        f, j = self._locate(i)
        key = f"{self.files[f].name}#{j}"
        cache = self._cache
        if cache is None or cache[0] != f:
            self._cache = cache = None  # drop the old batch before reading the next
            try:
                data, _, _ = self._arrays(_read_pickle(self.files[f]), self.files[f])
            except InrUsageError as e:  # the file changed since the listing
                raise SourceItemError(key, str(e)) from None
            if data.shape[0] != self.starts[f + 1] - self.starts[f]:
                raise SourceItemError(key, f"{self.files[f]} changed since it was listed")
            self._cache = cache = (f, data)
        s = self.side
        img = cache[1][j].reshape(3, s, s).transpose(1, 2, 0)
        return Sample(key, np.ascontiguousarray(img), int(self.labels[i]))

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = None
        return state


# --------------------------------------------------------------------------------------------------
# dispatch


def _looks_like_pickle(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return False
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _looks_like_hdf5(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(8) == HDF5_SIGNATURE
    except OSError:
        return False


_SUPPORTED = ("an image folder, CIFAR pickle batches (file or folder), .h5/.hdf5, .npy, .npz, WebDataset .tar "
              "shards or .parquet files")


def _expand(src) -> list[Path] | None:
    """SRC as a list of files when it names several (a list, or a brace pattern), else None."""
    if isinstance(src, (list, tuple)):
        paths = [Path(os.fspath(p)) for p in src]
        if not paths:
            raise InrUsageError("SRC is an empty list of files")
        return paths
    text = os.fspath(src)
    if "{" in text and not os.path.exists(text):
        from .archive_sources import expand_braces

        return [Path(p) for p in expand_braces(text)]
    return None


def _sole_kind(paths: list[Path], what: str) -> str:
    """"tar", "parquet" or "cifar" for a list of files that are all of one kind."""
    from .archive_sources import PARQUET_SUFFIX, is_tar_name

    kinds = {"tar" if is_tar_name(p.name) else "parquet" if p.name.lower().endswith(PARQUET_SUFFIX) else "cifar"
             for p in paths}
    if len(kinds) > 1:
        raise InrUsageError(f"{what} mixes kinds of files ({', '.join(sorted(kinds))}); give one kind at a time")
    return kinds.pop()


def _open_files(paths: list[Path], h5_images, h5_labels, background) -> Source:
    from .archive_sources import ParquetSource, WebDatasetSource

    for p in paths:
        if not p.is_file():
            raise InrUsageError(f"SRC not found: {p}")
    kind = _sole_kind(paths, "SRC")
    if kind == "tar":
        return WebDatasetSource(paths, background)
    if kind == "parquet":
        return ParquetSource(paths, h5_images, h5_labels, background)
    return CifarSource(paths)


def open_source(src, *, h5_images=None, h5_labels=None, background=(255, 255, 255)) -> Source:
    """Open SRC as a lazy `Source` (see the module doc and inrfmt.archive_sources for the kinds).
    InrUsageError if missing or unsupported.

    `src` may also be a list of files or a brace pattern (``train-{000..009}.tar``) of WebDataset shards,
    Parquet files or CIFAR batch files. `h5_images` / `h5_labels` name the image / label arrays (HDF5, .npz)
    or columns (Parquet). `background` is the RGB colour transparent images are composited on."""
    background = _check_background(background)
    paths = _expand(src)
    if paths is not None:
        return _open_files(paths, h5_images, h5_labels, background)
    path = Path(os.fspath(src))
    if not path.exists():
        raise InrUsageError(f"SRC not found: {path}")
    if path.is_dir():
        batches = _cifar_batches_in(path)
        if batches and all(_looks_like_pickle(p) for p in batches):
            return CifarSource(batches)
        archives = _archives_in(path)
        if archives:
            return _open_files(archives, h5_images, h5_labels, background)
        return ImageFolderSource(path, background)
    if not path.is_file():
        raise InrUsageError(f"SRC {path} is neither a folder nor a regular file")
    suffix = path.suffix.lower()
    if suffix in HDF5_EXTENSIONS or _looks_like_hdf5(path):
        return Hdf5Source(path, h5_images, h5_labels)
    if suffix == ".npz":
        return NpzSource(path, h5_images, h5_labels)
    if suffix == ".npy":
        return NpySource(path)
    from .archive_sources import PARQUET_SUFFIX, is_tar_name

    if is_tar_name(path.name) or path.name.lower().endswith(PARQUET_SUFFIX):
        return _open_files([path], h5_images, h5_labels, background)
    if suffix in (".pkl", ".pickle") or _looks_like_pickle(path):
        return CifarSource([path])
    if _is_image_name(path.name):
        raise InrUsageError(f"SRC {path} is a single image; put images in a folder (SRC/<class>/<file>) and pass the folder")
    raise InrUsageError(f"SRC {path}: unrecognised content (expected {_SUPPORTED})")


def _archives_in(folder: Path) -> list[Path]:
    """The .tar shards or .parquet files of a folder that holds only those (and no sub-folders)."""
    from .archive_sources import PARQUET_SUFFIX, is_tar_name

    try:
        names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    except OSError:
        return []
    archives = [n for n in names if is_tar_name(n) or n.lower().endswith(PARQUET_SUFFIX)]
    if not archives or len(archives) != len(names) or any((folder / n).is_dir() for n in names):
        return []
    return [folder / n for n in archives]
