"""`inrfmt preview`: a contact sheet of decoded images, the hardest ones first, to look at before training.

The sheet has two blocks of tiles: the `worst` images with the lowest PSNR (lowest first), then `random`
other images (in index order, drawn with `seed`). Each tile is the image decoded so that its longer side is
`size` pixels (aspect ratio kept; the network is evaluated at that size, not resampled), labelled with its
index, class, source key (the end of it when long) and recorded PSNR. Drawn with Pillow and its default
font; written atomically as PNG.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .checks import check_int
from .errors import InrUsageError

COLUMNS = 8
LABEL_LINES = 3
_PAD = 4
_BACKGROUND = (32, 32, 32)
_TEXT = (235, 235, 235)
_TITLE = (255, 210, 120)


def pick(psnr: np.ndarray, worst: int, random: int, seed: int) -> tuple[list[int], list[int]]:
    """(the `worst` lowest-PSNR indices, lowest first; `random` other indices, in index order)."""
    n = len(psnr)
    order = np.lexsort((np.arange(n), psnr))  # by PSNR, then by index
    low = [int(i) for i in order[:min(worst, n)]]
    rest = np.setdiff1d(np.arange(n), low)
    chosen = np.random.default_rng(seed).choice(rest, size=min(random, len(rest)), replace=False) if len(rest) else []
    return low, sorted(int(i) for i in chosen)


def tile_size(h: int, w: int, size: int) -> tuple[int, int]:
    """(h, w) of an h x w image shown with its longer side `size`."""
    scale = size / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def preview(path, out, *, worst: int = 8, random: int = 8, size: int = 96, seed: int = 0, device=None) -> dict:
    """Draw the contact sheet of the .inr file `path` into the PNG file `out`. Returns {"output", "worst",
    "random" (the image indices shown), "width", "height"}."""
    from PIL import Image, ImageDraw, ImageFont

    worst = check_int("worst", worst, 0)
    random = check_int("random", random, 0)
    size = check_int("size", size, 8, 4096)
    out = Path(os.fspath(out))
    folder = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise InrUsageError(f"OUT {out} is a folder; give the PNG file to write, e.g. {out / 'preview.png'}")
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise InrUsageError(f"cannot write {out}: folder {folder} does not exist or is not writable")

    from .data import open as open_dataset

    with open_dataset(path, device=device) as ds:
        if len(ds) == 0:
            raise InrUsageError(f"{path}: the file has no images to preview")
        if worst + random == 0:
            raise InrUsageError("preview: nothing to draw (--worst 0 and --random 0)")
        index = ds.file.index
        psnr = np.asarray(index["psnr"], np.float64)
        low, others = pick(psnr, worst, random, seed)
        shown = low + others
        tiles = _decode_tiles(ds, shown, size)
        keys = ds.file.keys or [""] * len(ds)
        classes = ds.classes
        labels = [int(index["label"][i]) for i in shown]

    font = ImageFont.load_default()
    line_h = _line_height(font)
    cell_w, cell_h = size + 2 * _PAD, size + 2 * _PAD + LABEL_LINES * line_h
    blocks = [(f"lowest PSNR ({len(low)})", low), (f"random ({len(others)})", others)]
    blocks = [(title, ids) for title, ids in blocks if ids]
    columns = min(COLUMNS, max(len(ids) for _, ids in blocks))
    rows = [-(-len(ids) // columns) for _, ids in blocks]
    width = columns * cell_w
    height = sum(line_h + _PAD + r * cell_h for r in rows)
    sheet = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    y = 0
    for (title, ids), nrows in zip(blocks, rows):
        draw.text((_PAD, y + _PAD // 2), title, fill=_TITLE, font=font)
        y += line_h + _PAD
        for k, i in enumerate(ids):
            x0, y0 = (k % columns) * cell_w, y + (k // columns) * cell_h
            tile = tiles[i]
            th, tw = tile.shape[:2]
            sheet.paste(Image.fromarray(tile), (x0 + _PAD + (size - tw) // 2, y0 + _PAD + (size - th) // 2))
            label = labels[shown.index(i)]
            name = classes[label] if 0 <= label < len(classes) else ("unlabelled" if label < 0 else str(label))
            lines = [f"#{i} {name}", keys[i], f"{psnr[i]:.2f} dB"]
            for row, text in enumerate(lines):
                text = _fit(draw, text, font, size + _PAD, keep_end=row == 1)
                draw.text((x0 + _PAD, y0 + 2 * _PAD + size + row * line_h), text, fill=_TEXT, font=font)
        y += nrows * cell_h
    _save_png(sheet, out)
    return {"output": str(out), "worst": low, "random": others, "width": width, "height": height}


def _decode_tiles(ds, shown: list[int], size: int) -> dict[int, np.ndarray]:
    """index -> uint8 [h, w, 3] decoded at its tile size (one decode call per distinct tile size)."""
    import torch

    groups: dict[tuple[int, int], list[int]] = {}
    for i in shown:
        h, w = (int(v) for v in ds.sizes[i])
        groups.setdefault(tile_size(h, w, size), []).append(i)
    tiles = {}
    with torch.no_grad():
        for hw, members in groups.items():
            pixels = ds.decode(members, size=hw)
            u8 = pixels.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            tiles.update(zip(members, u8))
    return tiles


def _line_height(font) -> int:
    left, top, right, bottom = font.getbbox("Ag#0")
    return bottom - min(top, 0) + 3


def _fit(draw, text: str, font, width: int, keep_end: bool) -> str:
    """`text` cut (with "...") to at most `width` pixels; keep_end keeps its end (a file name) instead."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength("..." + text if keep_end else text + "...", font=font) > width:
        text = text[1:] if keep_end else text[:-1]
    return "..." + text if keep_end else text + "..."


def _save_png(image, out: Path) -> None:
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise InrUsageError(f"cannot write {out}: {e.strerror or e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
