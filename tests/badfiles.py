"""Helpers that write broken image files, for tests of sources (load -> SourceItemError) and of convert
(on_error="skip" / "fail"). Import as `from tests.badfiles import make_bad_input_folder` (tests/conftest.py
puts the repository root on sys.path).

`make_bad_input_folder(root)` writes an image-folder tree:

    root/good/good_<i>.png     GOOD_IMAGES valid 8x8 RGB images (label 1: "good" sorts after "bad")
    root/bad/<one per kind>    the broken files, returned as {kind: path}

The "unreadable" kind (a file with mode 000) is made only when not running as root: root reads any file
whatever its mode, so there it would not be broken.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

GOOD_IMAGES = 3
GOOD_SIZE = (8, 8)


def running_as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def good_image_array(seed: int, size=GOOD_SIZE) -> np.ndarray:
    """A deterministic RGB uint8 [h, w, 3] image."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(size[0], size[1], 3), dtype=np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(array: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_with_header(width: int, height: int) -> bytes:
    """A structurally valid 8-bit RGB PNG whose header claims width x height, with one tiny IDAT: a
    decompression bomb when the claim is huge, a zero-size image when a side is 0."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" + b"\x00" * 3)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def write_truncated_jpeg(path: Path) -> Path:
    data = jpeg_bytes(good_image_array(100, (32, 32)))
    path.write_bytes(data[: len(data) // 2])
    return path


def write_truncated_png(path: Path) -> Path:
    data = png_bytes(good_image_array(101, (32, 32)))
    path.write_bytes(data[: len(data) - 30])  # cuts into IDAT / IEND
    return path


def write_zero_byte(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def write_random_bytes(path: Path) -> Path:
    path.write_bytes(np.random.default_rng(102).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path


def write_bad_crc_png(path: Path) -> Path:
    """A PNG whose IHDR checksum is wrong (Pillow checks the CRCs of the chunks before IDAT)."""
    data = bytearray(png_bytes(good_image_array(103)))
    crc_at = 8 + 4 + 4 + 13  # signature, length, b"IHDR", 13 bytes of header data
    data[crc_at] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def write_directory(path: Path) -> Path:
    """A directory with an image name (x.jpg)."""
    path.mkdir()
    return path


def write_unreadable(path: Path) -> Path:
    path.write_bytes(png_bytes(good_image_array(104)))
    path.chmod(0)
    return path


def write_bomb_png(path: Path) -> Path:
    path.write_bytes(png_with_header(100_000, 100_000))
    return path


def write_zero_size_png(path: Path) -> Path:
    path.write_bytes(png_with_header(0, 8))
    return path


def write_unsupported_format(path: Path) -> Path:
    """A valid PPM named .jpg: PPM is not one of the formats an image folder may hold."""
    buf = io.BytesIO()
    Image.fromarray(good_image_array(105)).save(buf, format="PPM")
    path.write_bytes(buf.getvalue())
    return path


BAD_KINDS = {
    "truncated_jpeg": ("truncated.jpg", write_truncated_jpeg),
    "truncated_png": ("truncated.png", write_truncated_png),
    "zero_byte": ("empty.png", write_zero_byte),
    "random_bytes": ("random.jpg", write_random_bytes),
    "bad_crc_png": ("bad_crc.png", write_bad_crc_png),
    "directory": ("x.jpg", write_directory),
    "unreadable": ("unreadable.png", write_unreadable),
    "bomb_png": ("bomb.png", write_bomb_png),
    "zero_size_png": ("zero_size.png", write_zero_size_png),
    "unsupported_format": ("gif_inside.jpg", write_unsupported_format),
}


def make_bad_input_folder(root) -> dict[str, Path]:
    """Write root/good/ (GOOD_IMAGES valid PNGs) and root/bad/ (one broken file per kind); return
    {kind: path} of the broken ones. "unreadable" is left out when running as root (see module doc)."""
    root = Path(root)
    (root / "good").mkdir(parents=True, exist_ok=True)
    (root / "bad").mkdir(parents=True, exist_ok=True)
    for i in range(GOOD_IMAGES):
        (root / "good" / f"good_{i}.png").write_bytes(png_bytes(good_image_array(i)))
    made = {}
    for kind, (name, writer) in BAD_KINDS.items():
        if kind == "unreadable" and running_as_root():
            continue
        made[kind] = writer(root / "bad" / name)
    return made
