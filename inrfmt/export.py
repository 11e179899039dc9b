"""Decode an .inr file back to ordinary images: an ImageFolder tree (PNG or JPEG) or one HDF5 file.

Image tree (format "png" / "jpeg"):

    OUTDIR/<class name>/<index>.png     one file per image; <index> is the image's index in the .inr file,
                                        zero-padded so names sort in file order
    OUTDIR/unlabelled/<index>.png       images with label -1 ("unlabelled_" if a class has that name)

Class folders take the class names stored in the file, made safe as folder names (path separators, control
characters and leading dots become "_"; two names that end up equal get "_<label>" appended). Labels with
no stored name (a file written without class names) use the decimal label. `inrfmt convert OUTDIR` reads
the tree back with the same class names (its label numbers follow the sorted folder names).

HDF5 (format "h5"): OUTDIR ending in .h5/.hdf5 is the file to write; otherwise the file is
OUTDIR/<file stem>.h5. It holds ``images`` uint8 [N, h, w, 3] (NHWC), ``labels`` int64 [N] (-1 =
unlabelled) and, when the file has class names, a ``classes`` string-array attribute on the file, which is
what `inrfmt.sources` reads back. All images of one HDF5 file have one size, so a file whose images differ
in size needs `size`.

Pixels: decoded in [0, 1] and stored as round(255 * v). Images are decoded in batches of `batch_size`
images of equal output size (a file's images of different native sizes are grouped by size).

Safety: every output file is written under a temporary name in its folder and renamed into place when
complete, so a file with the final name is never partial. An OUTDIR that exists and is not empty (for HDF5:
an output file that exists) is refused unless `overwrite=True`; then files of the same name are replaced
and other files in OUTDIR are left as they are.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np

from .checks import check_int
from .decode_args import parse_size
from .errors import InrUsageError

FORMATS = ("png", "jpeg", "h5")
JPEG_QUALITY = 95
UNLABELLED_FOLDER = "unlabelled"
_H5_SUFFIXES = (".h5", ".hdf5")


def export(path, outdir, *, format="png", size=None, limit=None, device=None, batch_size=64,
           overwrite=False) -> dict:
    """Decode the images of the .inr file `path` into `outdir` (see the module doc for the layout).

    size: None (each image's original size), an int (size x size) or (height, width).
    limit: export only the first `limit` images. device: where to decode (None: cuda if available).
    Returns a summary: {"images", "format", "output", "classes", "sizes"}.
    """
    fmt = _check_format(format)
    batch_size = check_int("batch_size", batch_size, 1)
    if limit is not None:
        limit = check_int("limit", limit, 0)
    out_size = None if size is None else parse_size(size)
    target = _output_target(Path(os.fspath(path)), Path(os.fspath(outdir)), fmt, overwrite)

    from .data import open as open_dataset

    with open_dataset(path, device=device) as ds:
        index = ds.file.index
        n = len(index) if limit is None else min(limit, len(index))
        labels = np.asarray(index["label"][:n], dtype=np.int64)
        if out_size is None:
            sizes = np.stack([index["height"][:n], index["width"][:n]], axis=1).astype(np.int64)
        else:
            sizes = np.tile(np.asarray(out_size, dtype=np.int64), (n, 1))
        classes = list(ds.classes)
        distinct_sizes = sorted({(int(h), int(w)) for h, w in sizes})
        if fmt == "h5":
            if len(distinct_sizes) > 1:
                raise InrUsageError(
                    f"{path}: images have {len(distinct_sizes)} different sizes (e.g. {_hw(distinct_sizes[0])} and "
                    f"{_hw(distinct_sizes[-1])}); an HDF5 export needs one: pass size (--size)"
                )
            _export_h5(ds, target, labels, sizes, classes, batch_size, source_name=Path(os.fspath(path)).name)
        else:
            _export_tree(ds, target, fmt, labels, sizes, classes, batch_size, total=len(index))
    return {"images": int(n), "format": fmt, "output": str(target), "classes": len(classes),
            "sizes": [list(s) for s in distinct_sizes]}


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


def _output_target(src: Path, outdir: Path, fmt: str, overwrite: bool) -> Path:
    """The folder (image tree) or the file (HDF5) to write; refuses to clobber unless overwrite."""
    if fmt == "h5":
        target = outdir if outdir.suffix.lower() in _H5_SUFFIXES else outdir / (src.stem + ".h5")
        if target.is_dir():
            raise InrUsageError(f"HDF5 output {target} is a folder")
        if target.exists() and not overwrite:
            raise InrUsageError(f"HDF5 output {target} exists (pass overwrite=True / --overwrite to replace it)")
        return target
    if outdir.exists() and not outdir.is_dir():
        raise InrUsageError(f"OUTDIR {outdir} exists and is not a folder")
    if outdir.is_dir() and any(outdir.iterdir()) and not overwrite:
        raise InrUsageError(f"OUTDIR {outdir} exists and is not empty (pass overwrite=True / --overwrite)")
    return outdir


_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\:*?\"<>|]")


def folder_names(classes: list[str], labels: np.ndarray) -> dict[int, str]:
    """label -> folder name for every label present: the class name made safe, unique, non-empty."""
    names: dict[int, str] = {}
    taken: set[str] = set()
    for label in sorted({int(v) for v in labels if v >= 0}):
        raw = classes[label] if label < len(classes) else str(label)
        safe = _UNSAFE.sub("_", raw).strip()
        safe = re.sub(r"^\.+", lambda m: "_" * len(m.group()), safe)  # no ".", "..", or hidden folders
        safe = safe[:200] or "_"
        if safe.lower() in taken:
            safe = f"{safe}_{label}"
        taken.add(safe.lower())
        names[label] = safe
    if (labels < 0).any():
        unl = UNLABELLED_FOLDER
        while unl.lower() in taken:
            unl += "_"
        names[-1] = unl
    return names


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


def _export_tree(ds, outdir: Path, fmt: str, labels, sizes, classes, batch_size: int, total: int) -> None:
    folders = folder_names(classes, labels)
    digits = max(5, len(str(max(total - 1, 0))))
    ext = "png" if fmt == "png" else "jpg"
    outdir.mkdir(parents=True, exist_ok=True)
    for folder in set(folders.values()):
        (outdir / folder).mkdir(parents=True, exist_ok=True)
    for idx, hw in _batches(sizes, batch_size):
        images = _decode_uint8(ds, idx, hw)
        for i, image in zip(idx, images):
            name = f"{int(i):0{digits}d}.{ext}"
            _write_atomic(outdir / folders[int(labels[i])] / name, _encode_image(image, fmt))


def _export_h5(ds, target: Path, labels, sizes, classes, batch_size: int, source_name: str) -> None:
    try:
        import h5py
    except ImportError:
        raise InrUsageError("HDF5 export needs h5py: pip install 'inrfmt[hdf5]'") from None
    n = len(labels)
    h, w = (int(sizes[0, 0]), int(sizes[0, 1])) if n else (0, 0)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            images = f.create_dataset("images", shape=(n, h, w, 3), dtype=np.uint8,
                                      chunks=(1, h, w, 3) if n else None)
            f.create_dataset("labels", data=labels.astype(np.int64))
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
