"""PSNR against fitting steps from a random start (`none`), the built-in prior (`builtin`) and a prior
learned on the images themselves (`learn`), on real photo crops the built-in priors were not trained on.
`none-prior-schedule` starts at random but runs the prior schedule: it separates what the prior itself
brings from what its (faster) schedule brings.

    python tools/bench_prior.py --preset rapid-inr-cifar10 --budgets 250,750,1500,3000 --reference
    python tools/bench_prior.py --preset rapid-inr-flowers102 --size 128 --n 8 --budgets 625,1250 --device cuda

Each point fits the crops with the preset's schedule (from a prior: its prior schedule) scaled to `budget`
steps per image in all, through pruning and int8 quantization, and records the mean PSNR of the stored
models and the seconds. `--reference` also runs the preset's full schedule from a random start (or
`--reference-from` takes it from an earlier run's JSON on the same crops); the
headline is the fewest steps at which `builtin` reaches that PSNR (linear in log-steps between budgets).
Crops: tools/bench_encode.py's photo_crops of data/photos (or --photos GLOB). Writes JSON (--json) and a
plot (--plot).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_encode import photo_crops  # noqa: E402
from inrfmt.fit import fit_images  # noqa: E402
from inrfmt.metalearn import learn_prior  # noqa: E402
from inrfmt.presets import get_preset  # noqa: E402
from inrfmt.prior import Prior  # noqa: E402


def scaled(preset, budget: int, prior: bool):
    """The preset's schedule (prior or not) scaled to `budget` steps per image in all."""
    rounds = preset.base_rounds(prior)
    total = sum(r.steps for r in rounds)
    return preset.schedule(max(1, round(rounds[0].steps * budget / total)), prior=prior)


def fit_point(crops, preset, schedule, prior, device) -> dict:
    t0 = time.perf_counter()
    result = fit_images(crops, preset.arch, schedule, prune_rule=preset.prune_rule, seed=0, device=device,
                        pixel_fraction=preset.pixel_fraction(device.type), jitter=preset.jitter, prior=prior)
    return dict(steps=sum(r.steps for r in schedule), psnr=float(np.mean(result.psnr.astype(np.float64))),
                p10=float(np.percentile(result.psnr, 10)), seconds=round(time.perf_counter() - t0, 2))


def steps_to_reach(points: list[dict], target: float) -> float | None:
    """Fewest steps at which the curve reaches `target` dB (linear in log-steps between points)."""
    points = sorted(points, key=lambda p: p["steps"])
    for a, b in zip([None] + points, points):
        if b["psnr"] >= target:
            if a is None:
                return float(b["steps"])
            f = (target - a["psnr"]) / (b["psnr"] - a["psnr"])
            return float(math.exp(math.log(a["steps"]) + f * (math.log(b["steps"]) - math.log(a["steps"]))))
    return None


def earlier_reference(path: Path, doc: dict) -> tuple[dict, dict]:
    """The reference point of an earlier run's JSON and where it came from; SystemExit unless that run
    fitted the same crops (preset, size, count, seed, photo folder) on the same device."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"{path}: cannot read it as a bench_prior JSON ({e})") from None
    if not isinstance(earlier, dict) or "reference" not in earlier:
        raise SystemExit(f"{path}: no reference point in it (run that with --reference)")
    for key in ("preset", "size", "n", "crop_seed", "device"):
        if earlier.get(key) != doc[key]:
            raise SystemExit(f"{path}: {key} is {earlier.get(key)!r}, this run's is {doc[key]!r}")
    if Path(earlier.get("photos", "")).parts[-3:] != Path(doc["photos"]).parts[-3:]:
        raise SystemExit(f"{path}: photos {earlier.get('photos')!r}, this run's {doc['photos']!r}")
    return earlier["reference"], dict(file=str(path), date=earlier.get("date"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="rapid-inr-cifar10")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--n", type=int, default=32, help="crops")
    ap.add_argument("--seed", type=int, default=1, help="seed of the crops")
    ap.add_argument("--photos", default=str(ROOT / "data" / "photos" / "*" / "*.jpg"))
    ap.add_argument("--budgets", default="250,750,1500,3000", help="steps per image in all, comma-separated")
    ap.add_argument("--modes", default="none,builtin,learn")
    ap.add_argument("--prior", help="a prior file used as `builtin` (default: the preset's built-in prior)")
    ap.add_argument("--learn-steps", type=int, default=None, help="outer steps of `learn` (default: the preset's)")
    ap.add_argument("--reference", action="store_true", help="also fit the full schedule from a random start")
    ap.add_argument("--reference-from", type=Path, metavar="JSON",
                    help="take the full-schedule reference from an earlier run's JSON (same preset, size, crops and "
                         "device: the random start's paper schedule is fitted the same way) instead of fitting it")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    preset = get_preset(args.preset)
    crops = photo_crops(args.n, args.size, args.seed, pattern=args.photos)
    budgets = [int(b) for b in args.budgets.split(",")]
    doc = dict(preset=preset.name, arch=f"{preset.arch.sine_layers}x{preset.arch.width}", size=args.size,
               n=args.n, crop_seed=args.seed, photos=args.photos, device=args.device,
               device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               threads=torch.get_num_threads(),
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               builtin_prior=str(args.prior) if args.prior else "the preset's built-in prior",
               load_start=os.getloadavg(), curves={})
    if args.reference_from:  # checked before any fitting
        doc["reference"], doc["reference_from"] = earlier_reference(args.reference_from, doc)
    priors = {}
    for mode in args.modes.split(","):
        if mode == "builtin":
            priors[mode] = Prior.load(args.prior) if args.prior else Prior.builtin(preset.name)
        elif mode == "learn":
            t0 = time.perf_counter()
            priors[mode] = learn_prior(crops, preset, steps=args.learn_steps, seed=0, device=device, progress=False)
            if args.json:
                priors[mode].save(args.json.with_suffix(".learned.prior"))
            doc["learn_seconds"] = round(time.perf_counter() - t0, 1)
        elif mode in ("none", "none-prior-schedule"):
            priors[mode] = None
        else:
            ap.error(f"unknown mode {mode!r}")
        curve = []
        for budget in budgets:
            prior_schedule = mode != "none"
            point = fit_point(crops, preset, scaled(preset, budget, prior_schedule), priors[mode], device)
            print(f"{mode:8s} {point}", flush=True)
            curve.append(point)
        doc["curves"][mode] = curve
    if args.reference_from:
        print(f"reference {doc['reference']} (from {args.reference_from})", flush=True)
    elif args.reference:
        doc["reference"] = fit_point(crops, preset, preset.schedule(), None, device)
        print(f"reference {doc['reference']}", flush=True)
    if "reference" in doc:
        for mode, curve in doc["curves"].items():
            reach = steps_to_reach(curve, doc["reference"]["psnr"])
            doc.setdefault("steps_to_reference", {})[mode] = reach
            doc.setdefault("speedup", {})[mode] = None if reach is None else doc["reference"]["steps"] / reach
    doc["load_end"] = os.getloadavg()
    text = json.dumps(doc, indent=1)
    print(text if not args.json else f"wrote {args.json}")
    if args.json:
        args.json.write_text(text + "\n")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for mode, curve in doc["curves"].items():
            ax.plot([p["steps"] for p in curve], [p["psnr"] for p in curve], "o-", label=mode)
        if "reference" in doc:
            ax.axhline(doc["reference"]["psnr"], color="grey", ls="--",
                       label=f"none, full schedule ({doc['reference']['steps']} steps)")
        ax.set_xscale("log")
        ax.set_xlabel("fitting steps per image")
        ax.set_ylabel("mean PSNR (dB), int8 stored model")
        ax.set_title(f"{preset.name} ({doc['arch']}) at {args.size}², {args.n} photo crops, {doc['device_name']}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
