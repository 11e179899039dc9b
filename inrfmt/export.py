"""Decode an .inr file back to ordinary images: an ImageFolder tree (PNG or JPEG) or one HDF5 file.

Image tree (format "png" / "jpeg"), written into the folder OUT:

    OUT/<class name>/<name>.png     labelled images, one folder per class
    OUT/<name>.png                  unlabelled images (label -1): a flat source exports flat

<name> comes from the image's source key (format 1.1 files): an ImageFolder key "cat/sub/x.jpg" of class
"cat" gives OUT/cat/sub/x.png, an archive or array key such as "train.tar/000042.jpg" or "data.h5#7" gives
OUT/<class>/train.tar/000042.png or OUT/<class>/data.h5#7.png. Files without keys (format 1.0), and images
whose key is empty, are named by their index in the file, zero-padded so names sort in file order. Every
path component is made safe (path separators, control characters and leading dots become "_"; "." and ".."
are never produced); two images that would get the same name get "_<index>" appended.

Class folders take the class names stored in the file, made safe the same way (two names that end up equal
get "_<label>" appended). Labels with no stored name use the decimal label. `inrfmt convert OUT` reads the
tree back with the same class names (its label numbers follow the sorted folder names).

HDF5 (format "h5"): OUT is the file to write. It holds ``images`` uint8 [N, h, w, 3] (NHWC), ``labels``
int64 [N] (-1 = unlabelled), ``keys`` (the source keys, when the file has them) and, when the file has class
names, a ``classes`` string-array attribute on the file, which is what `inrfmt.sources` reads back. All
images of one HDF5 file have one size, so a file whose images differ in size needs `size`.

Size: None keeps each image's original size; an int is torchvision's `Resize(int)` (the shorter side
becomes `size`, the aspect ratio is kept); (h, w) sets both. A SIREN is decoded at the output size
directly (no resampling of pixels).

Pixels: decoded in [0, 1] and stored as round(255 * v). Images are decoded in batches of `batch_size`
images of equal output size.

Safety: every output file is written under a temporary name in its folder and renamed into place when
complete, so a file with the final name is never partial. An OUT folder that exists and is not empty (for
HDF5: an OUT file that exists) is refused unless `overwrite=True`; then files of the same name are replaced
and other files are left as they are. A folder or file that cannot be written is an InrUsageError naming it.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np

from .checks import check_int, is_int
from .decode_args import parse_size, resized_size
from .errors import InrUsageError
from .sources import IMAGE_EXTENSIONS

FORMATS = ("png", "jpeg", "h5")
JPEG_QUALITY = 95


def export(path, out, *, format="png", size=None, limit=None, device=None, batch_size=64,
           overwrite=False) -> dict:
    """Decode the images of the .inr file `path` into `out` (see the module doc for the layout).

    size: None (each image's original size), an int (shorter side, aspect kept) or (height, width).
    limit: export only the first `limit` images. device: where to decode (None: cuda if available).
    Returns a summary: {"images", "format", "output", "classes", "sizes"}.
    """
    fmt = _check_format(format)
    batch_size = check_int("batch_size", batch_size, 1)
    if limit is not None:
        limit = check_int("limit", limit, 0)
    if size is not None and not is_int(size):
        size = parse_size(size)
    elif size is not None:
        size = check_int("size", size, 1)
    target = _output_target(Path(os.fspath(out)), fmt, overwrite)

    from .data import open as open_dataset

    with open_dataset(path, device=device) as ds:
        index = ds.file.index
        n = len(index) if limit is None else min(limit, len(index))
        labels = np.asarray(index["label"][:n], dtype=np.int64)
        native = np.stack([index["height"][:n], index["width"][:n]], axis=1).astype(np.int64)
        sizes = np.array([output_size(int(h), int(w), size) for h, w in native], dtype=np.int64).reshape(n, 2)
        classes = list(ds.classes)
        keys = (ds.file.keys or [""] * len(index))[:n]
        distinct_sizes = sorted({(int(h), int(w)) for h, w in sizes})
        try:
            if fmt == "h5":
                if len(distinct_sizes) > 1:
                    raise InrUsageError(
                        f"{path}: images have {len(distinct_sizes)} different sizes (e.g. {_hw(distinct_sizes[0])} "
                        f"and {_hw(distinct_sizes[-1])}); an HDF5 export needs one: pass size (--size HxW)")
                _export_h5(ds, target, labels, sizes, classes, keys, batch_size, source_name=Path(os.fspath(path)).name)
            else:
                _export_tree(ds, target, fmt, labels, sizes, classes, keys, batch_size, total=len(index))
        except OSError as e:
            where = e.filename or target
            raise InrUsageError(f"cannot write {where}: {e.strerror or e}") from None
    return {"images": int(n), "format": fmt, "output": str(target), "classes": len(classes),
            "sizes": [list(s) for s in distinct_sizes]}


def output_size(h: int, w: int, size) -> tuple[int, int]:
    """The exported size of an h x w image: original (None), shorter side `size` (int) or (h, w)."""
    if size is None:
        return h, w
    if is_int(size):
        return resized_size(h, w, int(size))
    return tuple(size)


# --------------------------------------------------------------------------------------------------
# arguments and output location


def _hw(size) -> str:
    return f"{size[0]}x{size[1]}"


def _check_format(fmt) -> str:
    value = str(fmt).lower()
    value = "jpeg" if value == "jpg" else value
    if value not in FORMATS:
        raise InrUsageError(f"export format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return value


def _output_target(out: Path, fmt: str, overwrite: bool) -> Path:
    """The folder (image tree) or the file (HDF5) to write; refuses to clobber unless overwrite, and an
    output whose folder cannot be written."""
    if fmt == "h5":
        if out.is_dir():
            raise InrUsageError(f"HDF5 output {out} is a folder; give the file to write, e.g. {out / 'images.h5'}")
        if out.exists() and not overwrite:
            raise InrUsageError(f"HDF5 output {out} exists (pass overwrite=True / --overwrite to replace it)")
        _check_writable(out.parent if str(out.parent) else Path("."), out)
        return out
    if out.exists() and not out.is_dir():
        raise InrUsageError(f"OUT {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InrUsageError(f"OUT {out} exists and is not empty (pass overwrite=True / --overwrite)")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    _check_writable(existing, out)
    return out


def _check_writable(folder: Path, out: Path) -> None:
    if not folder.is_dir():
        raise InrUsageError(f"cannot write {out}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InrUsageError(f"cannot write {out}: folder {folder} is not writable")


_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\:*?\"<>|]")


def safe_name(raw: str) -> str:
    """One path component made safe: no separators, control characters or leading dots; never empty."""
    safe = _UNSAFE.sub("_", raw).strip()
    safe = re.sub(r"^\.+", lambda m: "_" * len(m.group()), safe)  # no ".", "..", or hidden names
    return safe[:200] or "_"


def folder_names(classes: list[str], labels: np.ndarray) -> dict[int, str]:
    """label -> folder name for every label >= 0 present: the class name made safe, unique, non-empty."""
    names: dict[int, str] = {}
    taken: set[str] = set()
    for label in sorted({int(v) for v in labels if v >= 0}):
        safe = safe_name(classes[label] if label < len(classes) else str(label))
        if safe.lower() in taken:
            safe = f"{safe}_{label}"
        taken.add(safe.lower())
        names[label] = safe
    return names


def file_names(keys: list[str], labels: np.ndarray, classes: list[str], ext: str, digits: int) -> list[str]:
    """The path of each exported image below its class folder (see the module doc), unique per folder."""
    out, taken = [], set()
    for i, (key, label) in enumerate(zip(keys, labels)):
        parts = [p for p in key.split("/") if p] if key else []
        if len(parts) > 1 and 0 <= label < len(classes) and parts[0] == classes[label]:
            parts = parts[1:]  # an ImageFolder key starts with its class folder
        if parts:
            stem, suffix = os.path.splitext(parts[-1])
            parts[-1] = stem if suffix.lower() in IMAGE_EXTENSIONS and stem else parts[-1]
            rel = "/".join(safe_name(p) for p in parts)
        else:
            rel = f"{i:0{digits}d}"
        if (int(label), rel.lower()) in taken:
            rel = f"{rel}_{i}"
        taken.add((int(label), rel.lower()))
        out.append(f"{rel}.{ext}")
    return out


# --------------------------------------------------------------------------------------------------
# decoding


def _batches(sizes: np.ndarray, batch_size: int):
    """(indices, (h, w)) batches: images grouped by output size, each group in index order."""
    keys = sizes[:, 0] * (1 << 32) + sizes[:, 1]
    for key in np.unique(keys):
        idx = np.flatnonzero(keys == key)
        hw = (int(sizes[idx[0], 0]), int(sizes[idx[0], 1]))
        for start in range(0, len(idx), batch_size):
            yield idx[start:start + batch_size], hw


def _decode_uint8(ds, idx: np.ndarray, hw) -> np.ndarray:
    """Images idx at size hw -> uint8 [B, h, w, 3] on the host."""
    import torch

    with torch.no_grad():
        pixels = ds.decode(torch.as_tensor(idx, dtype=torch.int64), size=hw)
        u8 = pixels.float().mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
        return u8.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def _write_atomic(final: Path, data: bytes) -> None:
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _encode_image(array: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    img = Image.fromarray(array, "RGB")
    if fmt == "png":
        img.save(buf, format="PNG")
    else:
        img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _export_tree(ds, outdir: Path, fmt: str, labels, sizes, classes, keys, batch_size: int, total: int) -> None:
    folders = folder_names(classes, labels)
    digits = max(5, len(str(max(total - 1, 0))))
    names = file_names(keys, labels, classes, "png" if fmt == "png" else "jpg", digits)
    outdir.mkdir(parents=True, exist_ok=True)
    for idx, hw in _batches(sizes, batch_size):
        images = _decode_uint8(ds, idx, hw)
        for i, image in zip(idx, images):
            label = int(labels[i])
            final = (outdir / folders[label] if label >= 0 else outdir) / names[i]
            final.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(final, _encode_image(image, fmt))


def _export_h5(ds, target: Path, labels, sizes, classes, keys, batch_size: int, source_name: str) -> None:
    try:
        import h5py
    except ImportError:
        raise InrUsageError("HDF5 export needs h5py: pip install 'inrfmt[hdf5]'") from None
    n = len(labels)
    h, w = (int(sizes[0, 0]), int(sizes[0, 1])) if n else (0, 0)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            images = f.create_dataset("images", shape=(n, h, w, 3), dtype=np.uint8,
                                      chunks=(1, h, w, 3) if n else None)
            f.create_dataset("labels", data=labels.astype(np.int64))
            if any(keys):
                f.create_dataset("keys", data=np.array(keys, dtype=h5py.string_dtype()))
            if classes:
                f.attrs["classes"] = np.array(classes, dtype=h5py.string_dtype())
            f.attrs["source"] = source_name
            for idx, hw in _batches(sizes, batch_size):
                block = _decode_uint8(ds, idx, hw)
                # idx is one increasing run within a single size group: write it as one slice
                images[int(idx[0]):int(idx[-1]) + 1] = block
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
