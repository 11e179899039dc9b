"""`make demo`: the whole path on the bundled sample, in about a minute on a laptop CPU.

1. `inrfmt convert data/sample demo_out/sample.inr --preset fast`
2. `inrfmt info demo_out/sample.inr`
3. a preview PNG: originals (top) against decoded images at native and 4x size, and a bicubic 4x upscale of
   the original for comparison (rows below); what to expect is in README.md ("Every preset fits the
   continuous image")
4. a small classifier trained for a few steps on batches from `ds.loader` with GPU-style augmentation
5. the default: `inrfmt convert data/sample demo_out/sample_coded.inr` (`--preset auto` picks `small`: every
   parameter quantized and entropy-coded, format 2.0) and `inrfmt info` of it, next to step 2's size
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "demo_out"
SAMPLE = ROOT / "data" / "sample"


def run_cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "inrfmt", *args]
    print("$ inrfmt " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def write_preview(ds, path: Path, count: int = 8) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from inrfmt.sources import open_source

    source = open_source(str(SAMPLE))
    picks = torch.linspace(0, len(ds) - 1, count).round().long()
    h, w = int(ds.bank.heights[picks[0]]), int(ds.bank.widths[picks[0]])
    native = ds.decode(picks, size=(h, w))
    large = ds.decode(picks, size=(4 * h, 4 * w))
    tiles = []
    for k, i in enumerate(picks.tolist()):
        original = np.asarray(Image.fromarray(source.load(i).image).resize((4 * w, 4 * h), Image.NEAREST))
        dec_native = (native[k].permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
        dec_native = np.asarray(Image.fromarray(dec_native).resize((4 * w, 4 * h), Image.NEAREST))
        dec_large = (large[k].permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
        bicubic = np.asarray(Image.fromarray(source.load(i).image).resize((4 * w, 4 * h), Image.BICUBIC))
        tiles.append(np.concatenate([original, dec_native, dec_large, bicubic], axis=0))
    Image.fromarray(np.concatenate(tiles, axis=1)).save(path)
    print(f"preview: {path.relative_to(ROOT)} (rows: original, decoded at native size, decoded at 4x, bicubic 4x "
          f"upscale of the original)")


def train_briefly(ds, steps: int = 30) -> None:
    import torch
    from torch import nn

    from inrfmt import augment

    torch.manual_seed(0)
    size = 28
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * (size // 4) ** 2, max(len(ds.classes), 1)),
    ).to(ds.bank.labels.device)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    pipeline = augment.Compose([augment.RandomResizedCrop(size, scale=(0.7, 1.0)),
                                augment.RandomHorizontalFlip()])
    loader = ds.loader(batch_size=32, shuffle=True, seed=0, augment=pipeline)
    step, start = 0, time.perf_counter()
    while step < steps:
        for images, labels in loader:
            loss = nn.functional.cross_entropy(model(images), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % 10 == 0:
                print(f"  step {step:3d}  loss {loss.item():.3f}")
            if step >= steps:
                break
        loader.set_epoch(loader.epoch + 1 if hasattr(loader, "epoch") else step)
    seconds = time.perf_counter() - start
    print(f"trained {steps} steps of batch 32 on decoded, augmented images in {seconds:.1f} s")


def main() -> None:
    os.chdir(ROOT)
    OUT_DIR.mkdir(exist_ok=True)
    out = OUT_DIR / "sample.inr"
    run_cli("convert", str(SAMPLE.relative_to(ROOT)), str(out.relative_to(ROOT)), "--preset", "fast",
            "--overwrite")
    run_cli("info", str(out.relative_to(ROOT)))
    run_cli("verify", str(out.relative_to(ROOT)))

    import inrfmt

    ds = inrfmt.open(str(out))
    print(f"opened {out.relative_to(ROOT)} on {ds.bank.labels.device}: {len(ds)} images, stats {ds.stats()}")
    write_preview(ds, OUT_DIR / "preview.png")
    train_briefly(ds)

    coded = OUT_DIR / "sample_coded.inr"
    run_cli("convert", str(SAMPLE.relative_to(ROOT)), str(coded.relative_to(ROOT)), "--overwrite")
    run_cli("info", str(coded.relative_to(ROOT)))


if __name__ == "__main__":
    main()
