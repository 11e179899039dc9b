"""Encode-speed benchmark: img·steps/s and PSNR of the batched SIREN fit, one JSON object per config.

    python tools/bench_encode.py                       # CPU, small scale (a minute or so on 2 cores)
    python tools/bench_encode.py --device cuda --gpu   # the issue's GPU configs (CIFAR-10 net @ 32^2,
                                                       # 10x28 @ 224^2 fp32 / TF32 / TF32 + 25% pixels)
    python tools/bench_encode.py --device cuda --config 10x28@224:32:800 --tf32 --pixel-fraction 0.25 --compile

Images are crops of the bundled real photographs (data/photos), Lanczos-resized. Each config times one
plain fitting round (Adam, cosine decay, MSE) with `inrfmt.encode.train_round`, after a few warm-up steps,
with the device synchronised around the timed region; PSNR is measured over every pixel at the end.
Output: JSON lines with device, date, torch version, arch, size, batch, steps, pixel_fraction, jitter,
tf32, compile, img_steps_per_s, psnr_mean, psnr_p10 (PSNR at pixel centres; for quality between them see
tools/bench_upsample.py).
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from inrfmt import siren  # noqa: E402
from inrfmt.fit import DrawKeys, fit_psnr, per_image_loss, prepare_batch, train_round  # noqa: E402
from inrfmt.device import model_name  # noqa: E402
from inrfmt.spec import Architecture  # noqa: E402

# SxW@SIZE:BATCH:STEPS[:LR]. Deep nets get the paper's lr: at 2e-3 a 10-layer SIREN fitted on 25% of the
# pixels per step does not converge (measured on CPU, 10x28 @ 64^2).
CPU_CONFIGS = ["3x15@32:64:300", "3x16@28:64:300", "10x28@64:4:100:5e-4"]
GPU_CONFIGS = ["3x15@32:8192:1000:2e-3", "10x28@224:32:800:5e-4"]


def photo_crops(n: int, size: int, seed: int = 0, pattern: str | None = None) -> list[np.ndarray]:
    """n random square crops (side 1/4 to 1 of the short side) of the bundled photographs (or of the files
    matching the glob `pattern`), resized to size x size."""
    import glob

    paths = sorted(glob.glob(pattern)) if pattern else sorted((ROOT / "data" / "photos").glob("*/*.jpg"))
    photos = [Image.open(p).convert("RGB") for p in paths]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        im = photos[i % len(photos)]
        w, h = im.size
        side = int(rng.integers(min(w, h) // 4, min(w, h) + 1))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        out.append(np.asarray(im.crop((x, y, x + side, y + side)).resize((size, size), Image.Resampling.LANCZOS)))
    return out


def parse_config(text: str, default_lr: float):
    """"SxW@SIZE:BATCH:STEPS[:LR]" -> (Architecture, size, batch, steps, lr)."""
    arch_s, rest = text.split("@")
    s, w = (int(v) for v in arch_s.lower().split("x"))
    fields = rest.split(":")
    size, batch, steps = (int(v) for v in fields[:3])
    lr = float(fields[3]) if len(fields) > 3 else default_lr
    return Architecture(sine_layers=s, width=w), size, batch, steps, lr


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(config: str, device: torch.device, lr: float, pixel_fraction: float, tf32: bool, compile_: bool,
        warmup: int = 5, jitter: float = 0.0) -> dict:
    arch, size, batch, steps, lr = parse_config(config, lr)
    images = photo_crops(batch, size)
    fit = prepare_batch(images, device)
    params = siren.init_params(arch, batch, generator=torch.Generator().manual_seed(0), device=device)
    params = siren.SirenParams(*(t.requires_grad_(True) for t in params))
    keys = DrawKeys.of(1, None, batch, device)  # the pixel samples and jitter of every step
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    result = {"config": config, "arch": f"{arch.sine_layers}x{arch.width}", "size": size, "batch": batch,
              "steps": steps, "lr": lr, "pixel_fraction": pixel_fraction, "jitter": jitter, "tf32": tf32,
              "compile": compile_}
    try:
        loss = torch.compile(per_image_loss, dynamic=False) if compile_ else None
        # Warm-up on a throwaway copy (allocator, kernels, compilation), then the timed fit from init.
        scratch = siren.SirenParams(*(t.detach().clone().requires_grad_(True) for t in params))
        train_round(scratch, fit, arch, steps=warmup, lr=lr, pixel_fraction=pixel_fraction, jitter=jitter,
                    keys=keys, compiled_loss=loss)
        sync(device)
        t0 = time.perf_counter()
        train_round(params, fit, arch, steps=steps, lr=lr, pixel_fraction=pixel_fraction, jitter=jitter,
                    keys=keys, compiled_loss=loss)
        sync(device)
        seconds = time.perf_counter() - t0
        psnr = fit_psnr(params, fit, arch).cpu().numpy()
        result.update(seconds=round(seconds, 3), img_steps_per_s=round(batch * steps / seconds, 1),
                      psnr_mean=round(float(psnr.mean()), 2), psnr_p10=round(float(np.percentile(psnr, 10)), 2))
    except Exception as e:  # e.g. torch.compile unavailable: report it, keep benchmarking
        result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    finally:
        torch.set_float32_matmul_precision(prev)
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--config", action="append", help="SxW@SIZE:BATCH:STEPS[:LR] (repeatable)")
    ap.add_argument("--gpu", action="store_true",
                    help="the issue's GPU configs, each in fp32 / TF32 / TF32+25%% pixels")
    ap.add_argument("--lr", type=float, default=2e-3, help="lr of configs that do not give one")
    ap.add_argument("--pixel-fraction", type=float, default=1.0)
    ap.add_argument("--jitter", type=float, default=0.0,
                    help="fraction of samples fitted at a random point of their pixel cell (bilinear targets)")
    ap.add_argument("--tf32", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the loss (forward) function")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("CUDA is not available")
    name = model_name(device)
    header = {"device": name, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "threads": torch.get_num_threads()}
    runs = []
    if args.gpu:
        # Fastest setting of every config first, so a run stopped from outside has kept the headline figures.
        for frac, tf32 in ((0.25, True), (1.0, True), (1.0, False)):
            runs += [(cfg, frac, tf32, False) for cfg in GPU_CONFIGS]
        if args.compile:
            runs += [(cfg, 0.25, True, True) for cfg in GPU_CONFIGS]
    else:
        for cfg in args.config or CPU_CONFIGS:
            runs.append((cfg, args.pixel_fraction, args.tf32, args.compile))
    for cfg, frac, tf32, comp in runs:
        res = run(cfg, device, args.lr, frac, tf32 and device.type == "cuda", comp, jitter=args.jitter)
        print(json.dumps({**header, **res}), flush=True)


if __name__ == "__main__":
    main()
