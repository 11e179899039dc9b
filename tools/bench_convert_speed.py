"""Convert time of `small` (format 2: QAT + entropy coding) against `fast` (format 1) on the same photo crops.

    OMP_NUM_THREADS=1 python tools/bench_convert_speed.py                 # 200 crops 32x32, 3 rounds, CPU
    python tools/bench_convert_speed.py --n 64 --repeats 1 --out /tmp/x.json
    git worktree add /tmp/before REV && python tools/bench_convert_speed.py --fast-from /tmp/before

Both presets run their default settings with their built-in priors (`small`: 300 float + 200
quantization-aware steps on half of the pixels, code grid, rANS coding at the merge; `fast`: 150 steps + 100
steps of a dynamic pruning round, int8 hidden weights, zstd), interleaved (fast, small, fast, small, ...) so
that the load of a shared machine hits both alike. Each run is a whole `inrfmt.convert` of an .npy of the
crops (reading, fitting, writing the parts, the final merge) in a fresh Python process, after one warm-up run
of each. The target:
`small` is no slower than `fast` (median of the per-round ratios small / fast <= 1, within the noise of the
load). `--fast-from DIR` runs `fast` from another checkout of inrfmt (for `fast` as an earlier commit had
it: `git worktree add DIR REV`); its commit goes into the JSON.

Output (JSON, --out, default bench_results/presets/convert_speed.json): date, device, threads, torch, load
averages, crops, and per preset the seconds, fit seconds, mean PSNR and bytes per image of every run, with
the median ratio.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_encode import photo_crops  # noqa: E402
from inrfmt.device import model_name  # noqa: E402

PRESETS = ("fast", "small")


_RUN = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from inrfmt.conversion import convert
t0 = time.perf_counter()
summary = convert(sys.argv[2], sys.argv[3], preset=sys.argv[4], device=sys.argv[5], progress=False, overwrite=True)
print(json.dumps({"seconds": time.perf_counter() - t0, "fit_seconds": summary["fit_seconds"],
                  "psnr_mean": summary["psnr_mean"], "num_images": summary["num_images"]}))
"""


def one_run(src: Path, preset: str, tmp: Path, device: str, root: Path) -> dict:
    """One whole convert in a fresh process, with the inrfmt package of checkout `root`."""
    out = tmp / f"{preset}.inr"
    done = subprocess.run([sys.executable, "-c", _RUN, str(root), str(src), str(out), preset, device],
                          check=True, capture_output=True, text=True)
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    row = {"seconds": round(summary["seconds"], 2), "fit_seconds": round(summary["fit_seconds"], 2),
           "psnr_mean": round(summary["psnr_mean"], 3),
           "bytes_per_image": round(out.stat().st_size / summary["num_images"], 1),
           "load": [round(v, 2) for v in os.getloadavg()]}
    out.unlink()
    return row


def git_rev(root: Path) -> str | None:
    done = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], check=False,
                          capture_output=True, text=True)
    return done.stdout.strip() or None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200, help="photo crops")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="rounds of (fast, small)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=ROOT / "bench_results" / "presets" / "convert_speed.json")
    ap.add_argument("--fast-from", type=Path, default=ROOT, help="checkout whose inrfmt runs fast (default: this one)")
    args = ap.parse_args(argv)
    roots = {"fast": args.fast_from.resolve(), "small": ROOT}
    if not (roots["fast"] / "inrfmt" / "conversion.py").is_file():
        sys.exit(f"bench_convert_speed: --fast-from {args.fast_from}: not an inrfmt checkout")
    crops = np.stack(photo_crops(args.n, args.size, seed=0))
    runs = {p: [] for p in PRESETS}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "crops.npy"
        np.save(src, crops)
        for preset in PRESETS:  # warm-up (page cache, compiled extensions), not recorded
            one_run(src, preset, Path(tmp), args.device, roots[preset])
        for r in range(args.repeats):
            for preset in PRESETS:
                runs[preset].append(one_run(src, preset, Path(tmp), args.device, roots[preset]))
                print(f"round {r + 1}/{args.repeats} {preset}: {runs[preset][-1]}", file=sys.stderr)
    ratios = [s["seconds"] / f["seconds"] for f, s in zip(runs["fast"], runs["small"])]
    doc = {
        "tool": "tools/bench_convert_speed.py", "date": datetime.date.today().isoformat(),
        "device": model_name(torch.device(args.device)), "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "crops": {"n": args.n, "size": args.size, "source": "bench_encode.photo_crops(seed=0) of data/photos"},
        "fast_from": {"path": str(roots["fast"]), "commit": git_rev(roots["fast"])},
        "small_from": {"path": str(ROOT), "commit": git_rev(ROOT)},
        "runs": runs, "ratio_small_over_fast": [round(r, 3) for r in ratios],
        "median_ratio": round(statistics.median(ratios), 3),
        "median_seconds": {p: statistics.median(x["seconds"] for x in runs[p]) for p in PRESETS},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({k: doc[k] for k in ("median_seconds", "median_ratio", "ratio_small_over_fast")}))


if __name__ == "__main__":
    main()
