"""Rate and quality of the coded presets (format 2): whole-file bytes per image and mean PSNR of real convert
runs on crops of the bundled photographs, for variants of a preset's code ranges, widths and prior.

    OMP_NUM_THREADS=1 python tools/bench_coded_rd.py --preset small --n 200 --size 32 --kappa 4 5 6
    python tools/bench_coded_rd.py --preset small --prior none --prior builtin --prior /tmp/x.prior
    python tools/bench_coded_rd.py --preset large --n 8 --size 128 --seed 3 --bits hidden_w=4 --ptq

Each variant converts the same crops (an .npy source) with `inrfmt.convert` and reads the file back:
bytes_per_image = file size / images (header, prior, tables, index and the source keys included),
payload_per_image = the entropy-coded chunks only; PSNR = the index's (the stored model's, which
tests/test_qat.py checks against an independent decode). --kappa k scales the preset's ranges (first_w,
hidden_w, last_w, last_b) by k / PRESET_KAPPA (the kappa they were set for), so the steps follow the presets'
rule step = kappa * 1e-3 / sqrt(s). --ptq adds variants without the quantization-aware round (a float round
on the same curve, then rounding). Output: JSON lines, one per variant (date, device, threads, load
average, settings, bytes_per_image, payload_per_image, psnr_mean, psnr_p10, seconds); --out appends them.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_encode import photo_crops  # noqa: E402
from inrfmt.conversion import convert  # noqa: E402
from inrfmt.device import model_name  # noqa: E402
from inrfmt.presets import PRESETS  # noqa: E402
from inrfmt.reader import InrFile  # noqa: E402

# The kappa each coded preset's ranges were set for (presets.py).
PRESET_KAPPA = {"small": 5.0, "large": 2.0}


def variant(preset: str, kappa: float | None, ptq: bool):
    """The preset with its ranges scaled to `kappa` and, for ptq, its QAT round made a float round (same grid
    and learning-rate curve: the float fit is rounded after the fact)."""
    p = PRESETS[preset]
    if kappa is not None:
        scale = kappa / PRESET_KAPPA[preset]
        p = replace(p, name=f"{preset}-k{kappa:g}", code_ranges={
            c: tuple(v * scale for v in r) if isinstance(r, tuple) else r * scale for c, r in p.code_ranges.items()})
    if ptq:
        p = replace(p, name=p.name + "-ptq", rounds=tuple(replace(r, qat=False) for r in p.rounds),
                    prior_rounds=None if p.prior_rounds is None else
                    tuple(replace(r, qat=False) for r in p.prior_rounds))
    return p


def run(args, src: Path, preset, prior: str, bits) -> dict:
    # a variant has no built-in prior of its own: "builtin" is the base preset's file
    given = str(ROOT / "inrfmt" / "priors" / f"{args.preset}.prior") if prior == "builtin" else prior
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        out = Path(tmp) / "o.inr"
        t0 = time.perf_counter()
        convert(str(src), out, preset=preset, prior=given, bits=bits, device=args.device, seed=args.seed,
                progress=not args.quiet, reproducible=True, steps=args.steps)
        seconds = time.perf_counter() - t0
        with InrFile(out) as f:
            psnr = np.asarray(f.index["psnr"], np.float64)
            size = out.stat().st_size
            n = f.num_images
            payload = int(f.sections["blobs"]["length"])
    return {"preset": preset.name, "prior": prior, "bits": bits, "steps": args.steps, "images": n,
            "size": args.size, "bytes_per_image": size / n, "payload_per_image": payload / n,
            "psnr_mean": float(psnr.mean()), "psnr_p10": float(np.percentile(psnr, 10)), "seconds": round(seconds, 1)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small", choices=sorted(PRESET_KAPPA))
    ap.add_argument("--n", type=int, default=200, help="photo crops")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0, help="crop seed (and convert seed)")
    ap.add_argument("--kappa", type=float, nargs="*", default=[None], help="range variants (default: the preset's)")
    ap.add_argument("--prior", action="append", help="builtin, none or a prior file (repeatable; default builtin)")
    ap.add_argument("--bits", action="append", help="convert --bits values (repeatable; default the preset's)")
    ap.add_argument("--steps", type=int, default=None, help="round-1 steps (default: the preset's)")
    ap.add_argument("--ptq", action="store_true", help="also: no quantization-aware round (round the float fit)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tmp", default=None, help="folder for the temporary files")
    ap.add_argument("--out", type=Path, help="append the JSON lines to this file")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    crops = np.stack(photo_crops(args.n, args.size, seed=args.seed))
    base = {"date": datetime.date.today().isoformat(), "device": model_name(torch.device(args.device)),
            "threads": torch.get_num_threads(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        src = Path(tmp) / "crops.npy"
        np.save(src, crops)
        for kappa in args.kappa:
            for ptq in ([False, True] if args.ptq else [False]):
                preset = variant(args.preset, kappa, ptq)
                for prior in args.prior or ["builtin"]:
                    for bits in args.bits or [None]:
                        row = {**base, **run(args, src, preset, prior, bits), "kappa": kappa, "ptq": ptq,
                               "load": [round(v, 2) for v in os.getloadavg()]}
                        line = json.dumps(row)
                        print(line, flush=True)
                        if args.out:
                            with open(args.out, "a") as f:
                                f.write(line + "\n")


if __name__ == "__main__":
    main()
