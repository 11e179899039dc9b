"""Helpers shared by the benchmark tools (rd_curve, accuracy, bench_train, bench_all).

Plotting (matplotlib, Agg backend, imported only when a plot is written), JSON output, the machine
description every result carries, PSNR on 0..255 RGB, reading an inrfmt source into memory, writing an
ImageFolder tree, and the one-line error handling of the tools' command lines.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


class ToolError(Exception):
    """A user mistake or an unusable input: printed as one line, exit status 2."""


def run_main(main, prog: str) -> None:
    """Run `main()`; a ToolError, inrfmt usage/format error or missing file becomes one line on stderr."""
    try:
        from inrfmt.errors import InrFormatError, InrUsageError
        expected = (ToolError, InrFormatError, InrUsageError, FileNotFoundError)
    except ImportError:  # the tools' own argument errors must still be one line
        expected = (ToolError, FileNotFoundError)
    try:
        main()
    except expected as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)


# ------------------------------------------------------------------------------------------ environment
def cpu_model() -> str:
    """The CPU model (inrfmt.device.cpu_name)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from inrfmt.device import cpu_name

    return cpu_name()


def environment(device: str | None = None) -> dict:
    """Where and when a figure was measured: date (UTC), CPU, cores, device, library versions."""
    env = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "python": platform.python_version(),
    }
    try:
        import torch
        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
        if device is not None:
            env["device"] = str(device)
            if str(device).startswith("cuda") and torch.cuda.is_available():
                from inrfmt.device import model_name

                env["gpu"] = model_name(device)
    except ImportError:
        pass
    try:
        import PIL
        env["pillow"] = PIL.__version__
    except ImportError:
        pass
    return env


def resolve_device(name: str | None) -> str:
    """'auto'/None -> 'cuda' when available else 'cpu'; an unavailable CUDA request is a ToolError."""
    import torch
    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ToolError(f"--device {name}: CUDA is not available on this machine")
    try:
        torch.device(name)
    except RuntimeError:
        raise ToolError(f"--device {name!r} is not a torch device") from None
    return name


# ------------------------------------------------------------------------------------------------- JSON
def write_json(path: str | os.PathLike, obj) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def read_json(path: str | os.PathLike):
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ToolError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


# ------------------------------------------------------------------------------------------------- PSNR
def psnr_uint8(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 RGB images on the 0..255 scale (MSE over all pixels and channels)."""
    if a.shape != b.shape:
        raise ValueError(f"PSNR of images with different shapes {a.shape} and {b.shape}")
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10.0 * np.log10(255.0 ** 2 / max(mse, 1e-10)))


def summarize(values) -> dict:
    """mean / p10 / min of a list of numbers (the figures the tables quote)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return {"mean": None, "p10": None, "min": None}
    return {"mean": float(arr.mean()), "p10": float(np.percentile(arr, 10)), "min": float(arr.min())}


# ------------------------------------------------------------------------------------------------ images
def load_samples(src, *, max_images: int | None = None, square: int | None = None):
    """Read up to `max_images` images of an inrfmt source (any kind convert accepts, or a list of CIFAR
    batch files) into memory.

    Returns (samples, classes, skipped): samples = list of (key, uint8 HWC RGB, label). Items the source
    reports as bad are skipped and counted. `square`: centre-crop to a square and resize to square x square
    (Lanczos), so that every method of a comparison sees exactly the same pixels.
    """
    from inrfmt.sources import SourceItemError, open_source

    source = open_source([str(p) for p in src] if isinstance(src, (list, tuple)) else str(src))
    n = len(source) if max_images is None else min(len(source), max_images)
    samples, skipped = [], 0
    for i in range(n):
        try:
            sample = source.load(i)
        except SourceItemError:
            skipped += 1
            continue
        image = sample.image if square is None else center_square(sample.image, square)
        samples.append((sample.key, np.ascontiguousarray(image, dtype=np.uint8), int(sample.label)))
    if not samples:
        raise ToolError(f"{src}: no readable images")
    return samples, list(source.classes), skipped


def center_square(image: np.ndarray, side: int) -> np.ndarray:
    from PIL import Image

    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    crop = Image.fromarray(image[top:top + s, left:left + s])
    if s != side:
        crop = crop.resize((side, side), Image.LANCZOS)
    return np.asarray(crop.convert("RGB"))


def class_dir_names(classes, labels) -> list[str]:
    """Folder names that sort in label order (ImageFolder labels come from sorted folder names)."""
    n = max(len(classes), (max(labels) + 1) if labels else 0)
    digits = len(str(max(n - 1, 0)))
    names = []
    for k in range(n):
        name = classes[k] if k < len(classes) else f"class{k}"
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._") or "class"
        names.append(f"{k:0{digits}d}-{safe}")
    return names


def write_image_folder(samples, classes, out_dir, *, fmt: str = "png", quality: int = 90) -> Path:
    """Write samples as an ImageFolder tree out_dir/<NN-class>/<index>.<fmt> (PNG lossless by default).

    Unlabelled samples (label -1) go directly into out_dir, which the ImageFolder source reads as label -1
    only when no sample is labelled; mixing labelled and unlabelled samples is refused.
    """
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = [label for _, _, label in samples]
    labelled = [lab >= 0 for lab in labels]
    if any(labelled) and not all(labelled):
        raise ToolError("cannot write a mix of labelled and unlabelled images as one ImageFolder tree")
    names = class_dir_names(classes, labels) if any(labelled) else []
    ext = {"png": "png", "jpeg": "jpg"}[fmt]
    for i, (_, image, label) in enumerate(samples):
        folder = out_dir / names[label] if label >= 0 else out_dir
        folder.mkdir(exist_ok=True)
        path = folder / f"{i:07d}.{ext}"
        if fmt == "png":
            Image.fromarray(image).save(path, format="PNG", compress_level=1)
        else:
            Image.fromarray(image).save(path, format="JPEG", quality=quality)
    return out_dir


# ------------------------------------------------------------------------------------------------- plots
def pyplot():
    """matplotlib.pyplot with the Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return path


# ------------------------------------------------------------------------------------------ augmentation
def random_crop_flip(batch, pad: int, generator):
    """Random pad-and-crop (zero padding of `pad` pixels, the CIFAR recipe) + horizontal flip with p=0.5
    of a batch [B,C,H,W] of any dtype, on its own device, in one gather (no per-image loop)."""
    import torch
    b, _, h, w = batch.shape
    dev = batch.device
    padded = torch.nn.functional.pad(batch, (pad, pad, pad, pad)) if pad else batch
    oy = torch.randint(0, 2 * pad + 1, (b, 1), device=dev, generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (b, 1), device=dev, generator=generator)
    flip = torch.rand((b, 1), device=dev, generator=generator) < 0.5
    cols = torch.arange(w, device=dev).unsqueeze(0)
    cols = torch.where(flip, w - 1 - cols, cols) + ox  # [B, W]
    rows = torch.arange(h, device=dev).unsqueeze(0) + oy  # [B, H]
    bi = torch.arange(b, device=dev)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()
