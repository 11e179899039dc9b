#!/usr/bin/env python
"""Where the fused decoder needs range reduction: the error of the GPU's sin.approx, emulated on the CPU.

`sin.approx.f32` compiles to FMUL.RZ by 1/2pi followed by MUFU.SIN: the argument is rounded toward zero to
fp32 in revolutions, so the absolute error grows with |z| (about |z| * 2^-24 rad), while MUFU.SIN's own
error (at most 2^-20.9 on its reduced input) does not. This tool emulates the first part exactly (the
product in float64, then fp32 rounding toward zero, then the sine in float64) and, with range reduction, the
kernel's Cody-Waite steps (`siren_decode._sine`) as fp32 FMAs. It decodes with siren.forward in float32
with that sine in place of torch.sin and reports the max abs pixel error against the plain float32 decode:
with no reduction (decode_triton's default), with the first layer reduced and with every layer reduced
(range_reduce=True), plus the largest |z| of the first and of the hidden layers. MUFU.SIN's own error is
not emulated.

Nets: random SIREN-initialised weights of every preset's architecture (and 10x28), and the trained nets of
any .inr files given. Coordinates: the pixel grid scaled by each --zoom (3 = a zoom-out to 3x the image).

    python tools/sine_error.py [FILE.inr ...] [--size 64] [--zoom 1 3] [--images 16] [--json out.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inrfmt import siren  # noqa: E402
from inrfmt.bank import TensorBank  # noqa: E402
from inrfmt.presets import PRESETS  # noqa: E402
from inrfmt.spec import Architecture  # noqa: E402

INV_2PI = torch.tensor(0.15915494309189535, dtype=torch.float32).double()  # the fp32 constant ptxas uses
VARIANTS = {"none": (False, False), "first": (True, False), "all": (True, True)}  # (first, hidden) reduced


def _fma32(a, b, c):
    """fp32 fused multiply-add of fp32 values (exact in float64 for these magnitudes, then one rounding)."""
    return (a.double() * b + c).float()


def range_reduce(z: torch.Tensor) -> torch.Tensor:
    """siren_decode._sine's Cody-Waite reduction in fp32 FMAs."""
    n = _fma32(z, 0.15915494309189535, 12582912.0) - 12582912.0
    z = _fma32(n, -6.28125, z)
    return _fma32(n, -0.0019353071795864769, z)


def sin_approx(z: torch.Tensor) -> torch.Tensor:
    """sin.approx.f32 without MUFU.SIN's own error: sin(2pi * RZ_fp32(z * fp32(1/2pi)))."""
    product = z.double() * INV_2PI  # exact: 24 x 24 bits
    revolutions = product.float()
    toward_zero = revolutions.abs() > product.abs()  # rounded away from zero: step back one ulp
    revolutions = torch.where(toward_zero, torch.nextafter(revolutions, torch.zeros_like(revolutions)), revolutions)
    return torch.sin(2 * torch.pi * revolutions.double()).float()


def decode_errors(bank: TensorBank, size: int, zoom: float) -> dict:
    """Max |z| per layer kind and the max abs pixel error of each reduction variant."""
    idx = torch.arange(bank.num_images)
    params = bank.params(idx)
    coords = siren.pixel_grid(size, size) * zoom
    reference = siren.to_pixels(siren.forward(params, coords, bank.arch))
    largest = {"first": 0.0, "hidden": 0.0}

    def record(z, layer):
        kind = "first" if layer == 0 else "hidden"
        largest[kind] = max(largest[kind], z.abs().max().item())
        return torch.sin(z)

    siren.forward(params, coords, bank.arch, sine=record)
    row = {"max_abs_z_first": largest["first"], "max_abs_z_hidden": largest["hidden"]}
    for name, (first, hidden) in VARIANTS.items():
        def sine(z, layer, first=first, hidden=hidden):
            reduce = first if layer == 0 else hidden
            return sin_approx(range_reduce(z) if reduce else z)

        pixels = siren.to_pixels(siren.forward(params, coords, bank.arch, sine=sine))
        row[f"max_abs_err_{name}"] = (pixels - reference).abs().max().item()
    return row


def random_banks(images: int):
    nets = sorted({(p.arch.sine_layers, p.arch.width) for p in PRESETS.values()} | {(10, 28)})
    for sine_layers, width in nets:
        arch = Architecture(sine_layers=sine_layers, width=width)
        params = siren.init_params(arch, images, generator=torch.Generator().manual_seed(0))
        yield f"{sine_layers}x{width} random init", TensorBank.from_params(params, arch)


def file_banks(paths, images: int):
    import inrfmt

    for path in paths:
        with inrfmt.open(path, device="cpu") as ds:
            bank = ds.bank
            arch = bank.arch
            keep = torch.arange(min(images, bank.num_images))
            fields = {name: getattr(bank, name)[keep] for name in ("first_w", "first_b", "hidden_scale", "hidden_b",
                                                                   "last_w", "last_b")}
            sub = TensorBank(arch, hidden_w=bank.hidden_dense(keep).contiguous(), **fields)
            yield f"{arch.sine_layers}x{arch.width} {Path(path).name}", sub


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", help=".inr files whose trained nets to include")
    ap.add_argument("--size", type=int, default=64, help="output side (default 64)")
    ap.add_argument("--zoom", type=float, nargs="+", default=[1.0, 3.0], help="coordinate scales (default 1 3)")
    ap.add_argument("--images", type=int, default=16, help="images per net (default 16)")
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    rows = []
    print("| net | zoom | max abs z, first layer | max abs z, hidden | error: no reduction | first layer reduced "
          "| all reduced |\n|---|---|---|---|---|---|---|")
    for label, bank in [*random_banks(args.images), *file_banks(args.files, args.images)]:
        for zoom in args.zoom:
            row = {"net": label, "zoom": zoom, "size": args.size, **decode_errors(bank, args.size, zoom)}
            rows.append(row)
            print(f"| {label} | {zoom:g} | {row['max_abs_z_first']:.1f} | {row['max_abs_z_hidden']:.1f} | "
                  f"{row['max_abs_err_none']:.1e} | {row['max_abs_err_first']:.1e} | {row['max_abs_err_all']:.1e} |",
                  flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"tool": "tools/sine_error.py", "date": datetime.date.today().isoformat(), "rows": rows}, fh,
                      indent=2)
    return rows


if __name__ == "__main__":
    main()
