"""Continuous-image quality of encoded SIRENs: native PSNR and upscaled (2x, 4x) decodes, by jitter.

    python tools/bench_upsample.py                                  # data/sample (Fashion-MNIST 28^2), fast preset
    python tools/bench_upsample.py --jitter 0,0.5,1 --limit 64
    python tools/bench_upsample.py --photos 32 --limit 32           # crops of data/photos at 32^2
    python tools/bench_upsample.py --inr demo_out/sample.inr --src data/sample   # measure an existing file

For each jitter value the images are encoded with the real pipeline (`inrfmt.convert`, reproducible), the
file is opened with `inrfmt.open` and every image is decoded by `ds.decode` (the torch reference decoder on
CPU) at the native size and at each scale. Measured per image, averaged:
  psnr_native        decode at the native size vs the source pixels (what the index records)
  psnr_bicubic_Sx    Sx decode vs a PIL bicubic upscale of the source (pixel-centre aligned)
  psnr_bilinear_Sx   Sx decode vs a PIL bilinear upscale
  tv_ratio_Sx        total variation of the Sx decode / that of the bicubic upscale: oscillation between
                     pixel centres shows as a ratio well above 1 (1 = as smooth as bicubic)
  colour_native,     mean |R - G| + |G - B| of the decode (0-255 units) over the grey source images
  colour_Sx          (R = G = B): colour a grey image should not have (0 when the fit ties its channels)
  dark_noise_Sx      fraction of the Sx decode's pixels brighter than 8/255 where the bicubic upscale is
                     black (< 2/255): noise on black backgrounds
Output: one JSON object per jitter value (device, date, torch, settings, the measures, encode time).
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from inrfmt.data import open as open_dataset  # noqa: E402
from inrfmt.conversion import convert  # noqa: E402
from inrfmt.device import model_name  # noqa: E402
from inrfmt.reader import InrFile  # noqa: E402
from inrfmt.sources import open_source  # noqa: E402
from bench_encode import photo_crops  # noqa: E402  (tools/bench_encode.py: random crops of data/photos)


def total_variation(img: np.ndarray) -> float:
    """Mean absolute difference between horizontal and vertical neighbours (float image [h, w, 3])."""
    return float(np.abs(np.diff(img, axis=0)).mean() + np.abs(np.diff(img, axis=1)).mean())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float(-10.0 * np.log10(max(mse, 1e-12)))


def colour_spread(img: np.ndarray) -> float:
    """Mean |R - G| + |G - B| of a float image [h, w, 3], in 0-255 units."""
    return float((np.abs(img[..., 0] - img[..., 1]) + np.abs(img[..., 1] - img[..., 2])).mean() * 255.0)


def upscale(image: np.ndarray, scale: int, method) -> np.ndarray:
    h, w = image.shape[:2]
    return np.asarray(Image.fromarray(image).resize((w * scale, h * scale), method), np.float32) / 255.0


@torch.no_grad()
def decode_file(path: Path, scales: list[int]) -> list[dict[int, np.ndarray]]:
    """Every image of the file decoded at native size (scale 1) and each scale: float [h, w, 3] in [0, 1]."""
    out = []
    with open_dataset(str(path), device="cpu") as ds:
        for i, (h, w) in enumerate(ds.sizes.tolist()):
            out.append({s: ds.decode([i], size=(h * s, w * s))[0].permute(1, 2, 0).numpy()
                        for s in [1, *scales]})
    return out


def measure(path: Path, originals: list[np.ndarray], scales: list[int]) -> dict:
    decoded = decode_file(path, scales)
    assert len(decoded) == len(originals)
    rows: dict[str, list[float]] = {"psnr_native": []}
    for orig, dec in zip(originals, decoded):
        rows["psnr_native"].append(psnr(dec[1], orig.astype(np.float32) / 255.0))
        grey = bool((orig[..., 0] == orig[..., 1]).all() and (orig[..., 1] == orig[..., 2]).all())
        if grey:
            rows.setdefault("colour_native", []).append(colour_spread(dec[1]))
        for s in scales:
            bicubic = upscale(orig, s, Image.Resampling.BICUBIC)
            bilinear = upscale(orig, s, Image.Resampling.BILINEAR)
            rows.setdefault(f"psnr_bicubic_{s}x", []).append(psnr(dec[s], bicubic))
            rows.setdefault(f"psnr_bilinear_{s}x", []).append(psnr(dec[s], bilinear))
            rows.setdefault(f"tv_ratio_{s}x", []).append(total_variation(dec[s]) / max(1e-9, total_variation(bicubic)))
            black = bicubic < 2 / 255
            if black.any():
                rows.setdefault(f"dark_noise_{s}x", []).append(float((dec[s][black] > 8 / 255).mean()))
            if grey:
                rows.setdefault(f"colour_{s}x", []).append(colour_spread(dec[s]))
    result = {k: round(float(np.mean(v)), 3) for k, v in rows.items()}
    result["psnr_native_p10"] = round(float(np.percentile(rows["psnr_native"], 10)), 3)
    return result


def source_images(src: Path, limit: int | None) -> list[np.ndarray]:
    source = open_source(src)
    n = len(source) if limit is None else min(limit, len(source))
    return [np.ascontiguousarray(source.load(i).image) for i in range(n)]


def write_folder(images: list[np.ndarray], root: Path) -> Path:
    cls = root / "images"
    cls.mkdir(parents=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(cls / f"{i:05d}.png")
    return root


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", default=str(ROOT / "data" / "sample"), help="image source (default: data/sample)")
    ap.add_argument("--photos", type=int, default=None, metavar="SIZE",
                    help="use random SIZE x SIZE crops of data/photos instead of --src")
    ap.add_argument("--limit", type=int, default=None, help="at most this many images (photos: default 32)")
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--steps", type=int, default=None, help="round-1 steps (default: the preset's)")
    ap.add_argument("--jitter", default="0,0.5,1", help="comma-separated jitter values to compare")
    ap.add_argument("--scales", default="2,4")
    ap.add_argument("--no-prune", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--inr", default=None, help="measure this existing file (encoded from --src) instead")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    scales = [int(s) for s in args.scales.split(",")]
    dev = torch.device(args.device)
    header = {"device": model_name(dev),
              "threads": torch.get_num_threads(), "date": datetime.date.today().isoformat(),
              "torch": torch.__version__}
    if args.photos:
        images = photo_crops(args.limit or 32, args.photos, args.seed)
        what = f"data/photos crops {args.photos}x{args.photos}"
    else:
        images = source_images(Path(args.src), args.limit)
        what = args.src
    if args.inr:
        with InrFile(args.inr) as f:
            meta = dict(f.metadata)
        res = measure(Path(args.inr), images, scales)
        print(json.dumps({**header, "file": args.inr, "source": what, "images": len(images),
                          "preset": meta.get("preset"), "jitter": meta.get("jitter", "0.0 (not recorded)"),
                          **res}), flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="bench_upsample_") as tmp:
        src = write_folder(images, Path(tmp) / "src")
        for jitter in (float(j) for j in args.jitter.split(",")):
            out = Path(tmp) / f"j{jitter}.inr"
            t0 = time.perf_counter()
            summary = convert(src, out, preset=args.preset, steps=args.steps, device=args.device, seed=args.seed,
                              prune=not args.no_prune, jitter=jitter, progress=False, reproducible=True)
            seconds = time.perf_counter() - t0
            res = measure(out, images, scales)
            print(json.dumps({**header, "source": what, "images": len(images), "preset": args.preset,
                              "steps": args.steps, "prune": not args.no_prune, "jitter": jitter, **res,
                              "psnr_index_mean": round(summary["psnr_mean"], 3),
                              "prune_ratio_mean": round(summary["prune_ratio_mean"], 4),
                              "encode_seconds": round(seconds, 2),
                              "img_steps_per_s": round(summary["img_steps_per_s"], 1)}), flush=True)
            out.unlink()


if __name__ == "__main__":
    main()
