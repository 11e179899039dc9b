#!/usr/bin/env python3
"""Regenerate the bundled sample data (data/sample/ and data/photos/). See data/LICENSE.md.

data/sample/<class>/t10k_<index>.png
    The first PER_CLASS images of each class of the Fashion-MNIST test set (t10k), 28x28 8-bit
    grayscale PNG exactly as stored (no resampling), in ten class folders. Source: Debian's
    `dataset-fashion-mnist` package (MIT), i.e. `apt-get install dataset-fashion-mnist`, which puts
    the idx files in /usr/share/datasets/fashion-mnist.
data/photos/<class>/<name>.jpg
    A few public-domain / CC0 / CC-BY colour photographs shipped inside scikit-image and scikit-learn,
    downscaled (Lanczos) to at most LONG_SIDE pixels on the long side, aspect kept, JPEG quality 90.
    Those packages are needed only to run this script (their data folders are found without importing
    them); they are not dependencies of inrfmt.

Needs only numpy and Pillow. Re-running gives the same files (same pixels; byte-identical with the
same Pillow/zlib/libjpeg builds).

    python tools/make_sample_data.py [--out data] [--fashion-dir DIR] [--skimage-data DIR] [--sklearn-images DIR]
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
from PIL import Image

PER_CLASS = 20
LONG_SIDE = 256
JPEG_QUALITY = 90
# Fashion-MNIST label order (its README); folder names are these, so sorted folder order differs from
# the label numbers of the original set: ImageFolder labels follow sorted class-folder names.
FASHION_CLASSES = [
    "tshirt_top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle_boot",
]
# (package, file inside its data folder, class folder, output name)
PHOTOS = [
    ("skimage", "astronaut.png", "person", "astronaut"),
    ("skimage", "chelsea.png", "animal", "chelsea"),
    ("skimage", "coffee.png", "drink", "coffee"),
    ("skimage", "rocket.jpg", "space", "rocket"),
    ("skimage", "hubble_deep_field.jpg", "space", "hubble_deep_field"),
    ("sklearn", "china.jpg", "place", "china"),
    ("sklearn", "flower.jpg", "plant", "flower"),
]


def package_dir(name: str, sub: str) -> Path | None:
    spec = importlib.util.find_spec(name)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / sub


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzip'd), the MNIST container: magic (0, 0, dtype 0x08, ndim), big-endian dims, data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        sys.exit(f"{path}: not a uint8 idx file")
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def make_fashion(src: Path, out: Path) -> int:
    images = read_idx(src / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(src / "t10k-labels-idx1-ubyte.gz")
    count = 0
    for label, name in enumerate(FASHION_CLASSES):
        folder = out / name
        folder.mkdir(parents=True)
        for idx in np.flatnonzero(labels == label)[:PER_CLASS]:
            Image.fromarray(images[idx], mode="L").save(folder / f"t10k_{idx:05d}.png", optimize=True)
            count += 1
    return count


def make_photos(dirs: dict[str, Path], out: Path) -> int:
    for package, file, cls, name in PHOTOS:
        with Image.open(dirs[package] / file) as img:
            img = img.convert("RGB")
            w, h = img.size
            scale = min(1.0, LONG_SIDE / max(w, h))
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            if size != (w, h):
                img = img.resize(size, Image.Resampling.LANCZOS)
            (out / cls).mkdir(parents=True, exist_ok=True)
            img.save(out / cls / f"{name}.jpg", quality=JPEG_QUALITY, optimize=True)
    return len(PHOTOS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "data")
    ap.add_argument("--fashion-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    ap.add_argument("--skimage-data", type=Path, default=None, help="skimage/data folder (default: found)")
    ap.add_argument("--sklearn-images", type=Path, default=None, help="sklearn/datasets/images (default: found)")
    args = ap.parse_args()
    dirs = {
        "skimage": args.skimage_data or package_dir("skimage", "data"),
        "sklearn": args.sklearn_images or package_dir("sklearn", "datasets/images"),
    }
    for package, d in dirs.items():
        if d is None or not d.is_dir():
            sys.exit(f"{package} data folder not found: pip install scikit-image scikit-learn (scratch venv) or pass it")
    if not (args.fashion_dir / "t10k-images-idx3-ubyte.gz").is_file():
        sys.exit(f"Fashion-MNIST not in {args.fashion_dir}: apt-get install dataset-fashion-mnist")
    for sub in ("sample", "photos"):
        shutil.rmtree(args.out / sub, ignore_errors=True)
    n = make_fashion(args.fashion_dir, args.out / "sample")
    m = make_photos(dirs, args.out / "photos")
    total = sum(p.stat().st_size for sub in ("sample", "photos") for p in (args.out / sub).rglob("*") if p.is_file())
    print(f"wrote {n} Fashion-MNIST PNGs to {args.out / 'sample'}, {m} photos to {args.out / 'photos'} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
