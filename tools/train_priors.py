"""Train the built-in priors (inrfmt/priors/<preset>.prior) on random crops of real photographs.

    python tools/train_priors.py --fetch photos/            # download the photos of tools/prior_photos.json
    python tools/train_priors.py --photos photos/ [--preset fast ...] [--steps S] [--crops N] [--out DIR]

tools/prior_photos.json lists every photo: its file name, where it comes from (a Debian package and
version, or a PyPI package) and the path inside it, its licence and its SHA-256, which is checked before
training. `--fetch DIR` downloads the Debian packages with `apt-get download` and copies the sample images
of the installed scikit-image / matplotlib packages. Never add `mate-backgrounds` or `lomiri-wallpapers*`
photos: they are kept for independent evaluation.

Crops are square, with a side drawn uniformly between CROP_SCALES of the photo's short side (small photos,
and every photo with --photo-side, which first downscales them: SMALL_PHOTO_SCALES), at a random place,
Lanczos-resized to the preset's crop size; near-flat crops (pixel std < MIN_STD) are drawn again. The
10-layer presets are trained on 64² crops on a CPU (their fits are costly), on 128² with --size 128; so is
`large` (5x32: 45 outer steps of 800 inner steps on 25% of the pixels, about 10 minutes of one CPU thread).
`--step-sizes only` keeps the shipped prior's values and learns step sizes for them from 1 (Meta-SGD, see
inrfmt.metalearn): the 10-layer priors' step sizes come from `--step-sizes only --photo-side 256 --size 64
--crops 2048 --seed 3`. Writes a JSON log (--log) with the per-step inner PSNR and the time.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from inrfmt.metalearn import learn_prior  # noqa: E402
from inrfmt.presets import PRESETS  # noqa: E402
from inrfmt.prior import Prior  # noqa: E402
from inrfmt.siren import SirenParams  # noqa: E402

MANIFEST = ROOT / "tools" / "prior_photos.json"
CROP_SCALES = (1 / 16, 1 / 2)
SMALL_PHOTO_SCALES = (1 / 4, 1.0)  # photos with a short side under SMALL_PHOTO_SIDE
SMALL_PHOTO_SIDE = 1024
MIN_STD = 4.0
REDRAWS = 20
FORBIDDEN = ("mate-backgrounds", "lomiri-wallpapers")
CROP_SIZE = {"fast": 32, "rapid-inr-cifar10": 32, "rapid-inr-flowers102": 64, "rapid-inr-mini-imagenet": 64,
             "small": 32, "large": 64}
# Presets whose built-in prior holds another preset's values: `small` (3x16, like `fast`) starts from fast's
# prior. Learned with small's own first round a prior coded worse at every rate on 200 photo crops
# (bench_results/presets/small_rd.jsonl; again with its 300-step half-pixel round, BENCHMARKS.md); --own
# trains it anyway.
SAME_VALUES = {"small": "fast"}
Image.MAX_IMAGE_PIXELS = None


def manifest() -> list[dict]:
    entries = json.loads(MANIFEST.read_text())
    for e in entries:
        if any(f in e["source"] for f in FORBIDDEN):
            raise SystemExit(f"{MANIFEST}: {e['file']} comes from {e['source']}, kept for evaluation only")
    return entries


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch(directory: Path) -> None:
    """Download every photo of the manifest into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    entries = manifest()
    with tempfile.TemporaryDirectory() as tmp:
        for source in sorted({e["source"] for e in entries if e["source"].startswith("debian:")}):
            package = source.split(":", 1)[1].split("=")[0]
            subprocess.run(["apt-get", "download", package], cwd=tmp, check=True)
            deb = next(Path(tmp).glob(f"{package}_*.deb"))
            subprocess.run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / package)], check=True)
        for e in entries:
            kind, spec = e["source"].split(":", 1)
            if kind == "debian":
                origin = Path(tmp) / spec.split("=")[0] / e["path"]
            else:
                module = e["path"].split("/")[0]
                base = Path(__import__(module).__file__).parent
                origin = base / Path(*e["path"].split("/")[1:])
                if module == "matplotlib":  # mpl-data/sample_data/...
                    import matplotlib
                    origin = Path(matplotlib.get_data_path()).parent / Path(*e["path"].split("/")[1:])
            if not origin.exists():
                print(f"missing: {e['file']} ({e['source']} {e['path']})", file=sys.stderr)
                continue
            shutil.copyfile(origin, directory / e["file"])
    print(f"fetched into {directory}; check with --photos {directory}")


def load_photos(directory: Path) -> list[Image.Image]:
    photos = []
    for e in manifest():
        path = directory / e["file"]
        if not path.exists():
            raise SystemExit(f"{path}: missing (run --fetch {directory})")
        if sha256(path) != e["sha256"]:
            raise SystemExit(f"{path}: SHA-256 differs from {MANIFEST.name}")
        im = Image.open(path)
        if im.mode in ("RGBA", "LA", "P"):  # transparent areas on black
            im = Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)), im.convert("RGBA"))
        photos.append(im.convert("RGB"))
    return photos


def random_crops(photos: list[Image.Image], count: int, size: int, seed: int) -> list[np.ndarray]:
    """`count` uint8 [size, size, 3] crops at several scales (see the module docstring)."""
    rng = np.random.default_rng(seed)
    crops = []
    while len(crops) < count:
        im = photos[int(rng.integers(len(photos)))]
        w, h = im.size
        short = min(w, h)
        lo, hi = SMALL_PHOTO_SCALES if short < SMALL_PHOTO_SIDE else CROP_SCALES
        for _ in range(REDRAWS):
            side = min(short, int(rng.integers(max(size // 2, int(short * lo)), max(size // 2, int(short * hi)) + 1)))
            x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            crop = np.asarray(im.crop((x, y, x + side, y + side)).resize(
                (size, size), Image.Resampling.LANCZOS, reducing_gap=3.0))
            if crop.std() >= MIN_STD:
                crops.append(crop)
                break
    return crops


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fetch", type=Path, help="download the photos into this folder and stop")
    ap.add_argument("--photos", type=Path, help="folder holding the photos of tools/prior_photos.json")
    ap.add_argument("--preset", action="append", choices=sorted(PRESETS), help="presets to train (default: all)")
    ap.add_argument("--steps", type=int, help="outer steps (default: the preset's prior_steps)")
    ap.add_argument("--crops", type=int, default=4096, help="crops drawn per preset")
    ap.add_argument("--size", type=int, help="crop size (default: 32 for the 3-layer presets, 64 for the others)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=ROOT / "inrfmt" / "priors")
    ap.add_argument("--log", type=Path, help="JSON log of the run")
    ap.add_argument("--photo-side", type=int,
                    help="first downscale every photo to at most this many pixels on its long side, so crops "
                         "are at the scale of a dataset's whole images (then 1/4 to 1 of the short side)")
    ap.add_argument("--step-sizes", choices=("also", "only"),
                    help="also learn step sizes (Meta-SGD), or learn only them, from 1, for the shipped prior's "
                         "values (they paid for the 10-layer presets, not for 3x15: BENCHMARKS.md)")
    ap.add_argument("--own", action="store_true", help=f"train {', '.join(SAME_VALUES)} with their own prior "
                                                         f"schedules instead of copying (measured worse)")
    args = ap.parse_args(argv)
    if args.fetch:
        return fetch(args.fetch)
    if not args.photos:
        ap.error("--photos DIR (or --fetch DIR first)")
    if args.photo_side is not None and not 1 <= args.photo_side < SMALL_PHOTO_SIDE:
        ap.error(f"--photo-side must be 1 to {SMALL_PHOTO_SIDE - 1}, got {args.photo_side}")
    photos = load_photos(args.photos)  # checks every photo's SHA-256: after the arguments
    if args.photo_side:
        for im in photos:
            im.thumbnail((args.photo_side, args.photo_side), Image.Resampling.LANCZOS)
    log = []
    for preset in args.preset or list(PRESETS):
        if preset in SAME_VALUES and not args.own:
            source = args.out / f"{SAME_VALUES[preset]}.prior"
            base = Prior.load(source) if source.exists() else Prior.builtin(SAME_VALUES[preset])
            prior = Prior(base.arch, base.theta0, base.lr_scale, preset)
            tied = PRESETS[preset].prior_tied_outputs  # as learn_prior does for this preset
            if tied:
                prior = prior.with_tied_outputs()
            args.out.mkdir(parents=True, exist_ok=True)
            prior.save(args.out / f"{preset}.prior")
            log.append(dict(preset=preset, same_values_as=SAME_VALUES[preset], tied_outputs=tied))
            print(f"{preset}: {args.out / (preset + '.prior')} (the values of the {SAME_VALUES[preset]} prior"
                  + (", output channels tied)" if tied else ")"))
            continue
        size = args.size or CROP_SIZE[preset]
        crops = random_crops(photos, args.crops, size, args.seed)
        history = []
        t0 = time.perf_counter()
        start = None
        if args.step_sizes == "only":  # the shipped values stay; step sizes are learned afresh for them
            shipped = Prior.builtin(preset)
            start = Prior(shipped.arch, shipped.theta0, None, shipped.name)
        prior = learn_prior(crops, preset, steps=args.steps, seed=args.seed, device=args.device,
                            on_step=lambda k, psnr: history.append(round(psnr, 3)),
                            step_sizes=args.step_sizes is not None, start=start,
                            freeze=SirenParams._fields if start is not None else ())
        seconds = time.perf_counter() - t0
        args.out.mkdir(parents=True, exist_ok=True)
        prior.save(args.out / f"{preset}.prior")
        log.append(dict(preset=preset, crop_size=size, crops=len(crops), steps=len(history), seconds=round(seconds, 1),
                        step_sizes=args.step_sizes, photo_side=args.photo_side,
                        inner_psnr=history, photos=len(photos), seed=args.seed, device=args.device,
                        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        load=os.getloadavg()))
        print(f"{preset}: {args.out / (preset + '.prior')} ({len(history)} steps, {seconds:.0f} s, inner PSNR "
              f"{history[0]:.2f} -> {history[-1]:.2f} dB)")
    if args.log:
        args.log.write_text(json.dumps(log, indent=1) + "\n")


if __name__ == "__main__":
    main()
