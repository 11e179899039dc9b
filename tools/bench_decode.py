#!/usr/bin/env python
"""Decode and load benchmarks for inrfmt, as JSON.

Cases (targets in brackets, on a GPU): 10x28 and 10x32 at 224^2 [>=150k img/s], 10x40 at 84^2 and
224^2 [>=60k at 224^2], 3x15 at 32^2 [>=10M img/s]; max abs error of each backend against the fp32 torch
path [<=5e-4: the run exits 1 when a case exceeds it]; load GB/s of a synthetic .inr file into a TensorBank
[>=2 GB/s] and bank/file bytes per image [<=1.1]. Banks hold random SIREN-initialised weights (int8 hidden
layers, like a converted file).
Each decode case is also timed on a compact bank (25% of hidden weights pruned; the batch's weights are
expanded before the decode kernel), config "compact", to measure what that layout costs.

On CUDA every case times the torch path and the triton kernel's default config; the 10x28 and 3x15 cases
also a small sweep of tile configs, the range-reduced and the libdevice sine (each variant is one more
kernel compile, which on a cold machine costs seconds). --quick runs tiny sizes; on a CPU it runs the
triton backend in triton's interpreter (TRITON_INTERPRET=1).

    python tools/bench_decode.py [--quick] [--device cuda] [--out results.json]
    python tools/bench_decode.py --render results.json     # Markdown tables against the targets
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from inrfmt import siren  # noqa: E402
from inrfmt.bank import TensorBank  # noqa: E402
from inrfmt.bench import benchmark  # noqa: E402
from inrfmt.decode import available_backends  # noqa: E402
from inrfmt.device import describe  # noqa: E402
from inrfmt.reader import InrFile  # noqa: E402
from inrfmt.spec import Architecture, WeightBatch  # noqa: E402
from inrfmt.writer import InrWriter  # noqa: E402

FULL_CASES = [  # (sine_layers, width, size, batch)
    (10, 28, 224, 256),
    (10, 32, 224, 256),
    (10, 40, 84, 256),
    (10, 40, 224, 256),
    (3, 15, 32, 4096),
]
QUICK_CASES = [
    (10, 28, 16, 4),
    (4, 40, 12, 4),
    (3, 15, 8, 8),
]
# Kernel variants timed besides the default config on CUDA, for the SWEEP_NETS cases only.
SWEEP = [
    dict(block_pixels=64, num_warps=4),
    dict(block_pixels=256, num_warps=8),
    dict(range_reduce=True),              # sin.approx after a range reduction
    dict(fast_sin=False),                 # libdevice sine
]
SWEEP_NETS = ("10x28", "3x15")


COMPACT_PRUNE = 0.25  # pruned fraction of the compact-bank decode cases (the paper's large presets: ~25%)


def random_bank(sine_layers, width, n, device, seed=0, prune=0.0):
    arch = Architecture(sine_layers=sine_layers, width=width)
    params = siren.init_params(arch, n, generator=torch.Generator().manual_seed(seed))
    if prune:
        keep = torch.rand(params.hidden_w.shape, generator=torch.Generator().manual_seed(seed + 1)) >= prune
        params = params._replace(hidden_w=params.hidden_w * keep)
    return TensorBank.from_params(params, arch, hidden_dtype="int8", device=device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_triton_variant(bank, size, batch, variant, min_seconds):
    from inrfmt.decode import decode_torch
    from inrfmt.kernels.siren_decode import decode_triton

    device = bank.device
    idx = torch.randint(0, bank.num_images, (batch,), generator=torch.Generator().manual_seed(1)).to(device)
    out = torch.empty(batch, 3, size, size, device=device)
    decode_triton(bank, idx, size, out=out, **variant)
    sync(device)
    err = (out - decode_torch(bank, idx, size)).abs().max().item()
    iters, start = 0, time.perf_counter()
    while True:
        for _ in range(4):
            decode_triton(bank, idx, size, out=out, **variant)
        iters += 4
        sync(device)
        if time.perf_counter() - start >= min_seconds or iters >= 2000:
            break
    seconds = time.perf_counter() - start
    return {"variant": variant, "img_per_s": iters * batch / seconds, "max_abs_err_vs_torch": err}


def decode_cases(device, cases, min_seconds, sweep):
    rows = []
    for sine_layers, width, size, batch in cases:
        bank = random_bank(sine_layers, width, max(1024, batch), device)
        t0 = time.perf_counter()
        result = benchmark(bank, size, batch, min_seconds=min_seconds)
        for name, stats in result["backends"].items():
            rows.append({"arch": f"{sine_layers}x{width}", "size": f"{size}x{size}", "batch": batch,
                         "backend": name, "config": "default", **stats})
        if sweep and device.type == "cuda" and "triton" in available_backends(bank) \
                and f"{sine_layers}x{width}" in SWEEP_NETS:
            for variant in SWEEP:
                try:
                    stats = time_triton_variant(bank, size, batch, variant, min_seconds=min_seconds / 2)
                except Exception as exc:  # a config that fails to compile or run is reported, not fatal
                    stats = {"variant": variant, "error": f"{type(exc).__name__}: {exc}"}
                rows.append({"arch": f"{sine_layers}x{width}", "size": f"{size}x{size}", "batch": batch,
                             "backend": "triton", "config": "sweep", **stats})
        compact = random_bank(sine_layers, width, max(1024, batch), device, prune=COMPACT_PRUNE).to_layout("compact")
        result = benchmark(compact, size, batch, min_seconds=min_seconds / 2)
        for name, stats in result["backends"].items():
            rows.append({"arch": f"{sine_layers}x{width}", "size": f"{size}x{size}", "batch": batch,
                         "backend": name, "config": "compact", "prune": COMPACT_PRUNE, **stats})
        del compact
        print(f"  {sine_layers}x{width} @ {size}^2: " + ", ".join(
            f"{r['backend']}/{r['config']} {r.get('img_per_s', float('nan')):,.0f} img/s"
            for r in rows if r["arch"] == f"{sine_layers}x{width}" and r["size"] == f"{size}x{size}")
              + f" ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        del bank
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def write_synthetic_inr(path, sine_layers, width, n, prune, seed=0):
    """Random int8 SIREN weights with `prune` of the hidden weights masked out, written in chunks."""
    arch = Architecture(sine_layers=sine_layers, width=width)
    rng = np.random.default_rng(seed)
    h, total = arch.hidden_layers, arch.hidden_layers * width * width
    with InrWriter(path, arch, hidden_dtype="int8", has_masks=prune > 0, chunk_images=1024) as writer:
        for start in range(0, n, 2048):
            m = min(2048, n - start)
            p = siren.init_params(arch, m, generator=torch.Generator().manual_seed(seed + start))
            hidden = p.hidden_w.numpy()
            mask = rng.random(hidden.shape) >= prune if prune > 0 else None
            if mask is not None:
                hidden = hidden * mask
            scale = np.abs(hidden).max(axis=(-2, -1)) / 127.0
            scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
            q = np.clip(np.round(hidden / scale[:, :, None, None]), -127, 127).astype(np.int8)
            wb = WeightBatch(first_w=p.first_w.numpy(), first_b=p.first_b.numpy(), hidden_w=q, hidden_scale=scale,
                             hidden_b=p.hidden_b.numpy(), last_w=p.last_w.numpy(), last_b=p.last_b.numpy(),
                             mask=mask)
            ratio = 1 - mask.reshape(m, -1).sum(1) / total if mask is not None else np.zeros(m)
            writer.add(wb, labels=rng.integers(0, 1000, m), heights=np.full(m, 224), widths=np.full(m, 224),
                       psnr=np.full(m, 30.0), prune_ratio=ratio)


def load_case(device, sine_layers, width, n, prune, workdir):
    """Write a synthetic file and load it: the default path (layout auto), then each layout explicitly."""
    from inrfmt.bank import auto_layout

    path = os.path.join(workdir, f"bench_{sine_layers}x{width}_{n}.inr")
    t0 = time.perf_counter()
    write_synthetic_inr(path, sine_layers, width, n, prune)
    write_seconds = time.perf_counter() - t0
    rows = []
    with InrFile(path) as f:
        file_bytes = f.file_bytes
        auto = auto_layout(f)
        TensorBank.from_file(f, device)  # warm-up: page cache, CUDA context, allocator
        paths = [("default", dict()), ("dense", dict(layout="dense")), ("compact", dict(layout="compact"))]
        for name, kwargs in paths:
            bank = TensorBank.from_file(f, device, **kwargs)
            rows.append({"arch": f"{sine_layers}x{width}", "images": n, "prune": prune, "path": name,
                         "layout": bank.layout, "auto_layout": auto,
                         "file_bytes": file_bytes, "bank_bytes": bank.nbytes, "load_seconds": bank.load_seconds,
                         "load_gb_per_s": file_bytes / bank.load_seconds / 1e9,
                         "bank_over_file_bytes": bank.nbytes / file_bytes, "write_seconds": write_seconds,
                         "note": "file in page cache (just written); random int8 weights"})
            print(f"  load {sine_layers}x{width} x{n} p={prune} ({name}, {bank.layout}): "
                  f"{rows[-1]['load_gb_per_s']:.2f} GB/s, bank/file {rows[-1]['bank_over_file_bytes']:.3f}",
                  file=sys.stderr)
            del bank
    os.remove(path)
    return rows


# Decode targets (img/s, triton backend on a GPU) by (net, output size), and the other bounds.
DECODE_TARGETS = {("10x28", "224x224"): 150e3, ("10x32", "224x224"): 150e3, ("10x40", "224x224"): 60e3,
                  ("3x15", "32x32"): 10e6}
MAX_ABS_ERR = 5e-4  # max abs pixel error of a float32 decode against the fp32 torch path
LOAD_GB_PER_S = 2.0
MAX_BANK_OVER_FILE = 1.1


def render(result: dict) -> str:
    """Markdown tables of a bench_decode JSON: every decode and load row, with the targets it is held to."""
    def met(ok):
        return "met" if ok else "NOT met"

    lines = [f"Measured {result['date']} on {result['device']} (torch {result['torch']}, triton "
             f"{result.get('triton')}){' - quick sizes' if result.get('quick') else ''}; `tools/bench_decode.py`.",
             ""]
    if result["decode"]:
        lines += ["| net | size | batch | backend | config | img/s | max abs err vs torch | target |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in result["decode"]:
            config = r["config"] if r["config"] != "sweep" else "sweep " + ", ".join(
                f"{k}={v}" for k, v in r.get("variant", {}).items())
            if "img_per_s" not in r:
                lines.append(f"| {r['arch']} | {r['size']} | {r['batch']} | {r['backend']} | {config} | "
                             f"failed: {r.get('error', '?')} | | |")
                continue
            target = DECODE_TARGETS.get((r["arch"], r["size"]))
            verdict = []
            if target and r["backend"] == "triton" and r["config"] in ("default", "compact"):
                verdict.append(f"≥ {target:,.0f}: {met(r['img_per_s'] >= target)}")
            tolerance = result.get("max_abs_err", MAX_ABS_ERR)
            verdict.append(f"err ≤ {tolerance:g}: {met(r['max_abs_err_vs_torch'] <= tolerance)}")
            lines.append(f"| {r['arch']} | {r['size']} | {r['batch']} | {r['backend']} | {config} | "
                         f"{r['img_per_s']:,.0f} | {r['max_abs_err_vs_torch']:.1e} | {'; '.join(verdict)} |")
        lines.append("")
    if result["load"]:
        lines += ["| net | pruned | images | path | layout | file B/img | bank / file | load GB/s | target |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in result["load"]:
            verdict = ""
            if r["path"] == "default":
                verdict = f"bank ≤ {MAX_BANK_OVER_FILE}× file: {met(r['bank_over_file_bytes'] <= MAX_BANK_OVER_FILE)}"
                if result.get("capability"):  # a GPU run
                    verdict += f"; ≥ {LOAD_GB_PER_S} GB/s: {met(r['load_gb_per_s'] >= LOAD_GB_PER_S)}"
            lines.append(f"| {r['arch']} | {100 * r['prune']:.1f} % | {r['images']} | {r['path']} | {r['layout']} | "
                         f"{r['file_bytes'] / r['images']:,.0f} | {r['bank_over_file_bytes']:.3f} | "
                         f"{r['load_gb_per_s']:.2f} | {verdict} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke run)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--out", default=None, help="write the JSON here (default: stdout)")
    ap.add_argument("--seconds", type=float, default=None, help="timing window per measurement")
    ap.add_argument("--no-sweep", action="store_true", help="only the default triton config")
    ap.add_argument("--load-images", type=int, default=None, help="images in the synthetic load-test file")
    ap.add_argument("--only", choices=("decode", "load"), default=None, help="run only the decode or the load cases")
    ap.add_argument("--max-abs-err", type=float, default=MAX_ABS_ERR,
                    help=f"error tolerance against the fp32 torch path (default {MAX_ABS_ERR:g}); exit 1 past it")
    ap.add_argument("--render", metavar="JSON", default=None,
                    help="print Markdown tables of an earlier run's JSON against the targets, and exit")
    args = ap.parse_args(argv)
    if args.render:
        with open(args.render) as fh:
            print(render(json.load(fh)))
        return None

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    quick = args.quick
    if quick and device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are first wrapped
    min_seconds = args.seconds if args.seconds is not None else (0.1 if quick else 0.5)
    result = {
        "tool": "tools/bench_decode.py",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": describe(device),
        "host": platform.node(),
        "torch": torch.__version__,
        "quick": quick,
        "max_abs_err": args.max_abs_err,
        "decode": [],
        "load": [],
    }
    try:
        import triton
        result["triton"] = triton.__version__
    except ImportError:
        result["triton"] = None
    if device.type == "cuda":
        result["cuda"] = torch.version.cuda
        result["capability"] = list(torch.cuda.get_device_capability(device))
    print(f"bench_decode on {result['device']}", file=sys.stderr)
    def save():  # after every case, so a run stopped from outside keeps what it measured
        if args.out:
            tmp = args.out + ".tmp"
            with open(tmp, "w") as fh:
                fh.write(json.dumps(result, indent=2) + "\n")
            os.replace(tmp, args.out)

    if args.only != "load":
        for case in QUICK_CASES if quick else FULL_CASES:
            result["decode"].extend(decode_cases(device, [case], min_seconds, sweep=not args.no_sweep))
            save()
    n_load = args.load_images or (300 if quick else 20000)
    with tempfile.TemporaryDirectory(prefix="inrfmt-bench-") as workdir:
        # The paper's mean prune ratios: CIFAR-10 15.6%, Flowers-102 24.2% (10x32), Mini-ImageNet 25.5% (10x40).
        if args.only == "decode":
            cases = []
        elif not quick:
            cases = [(10, 28, 0.156), (10, 32, 0.242), (10, 40, 0.255), (10, 40, 0.4), (3, 15, 0.156)]
        else:
            cases = [(10, 28, 0.2), (10, 40, 0.255)]
        for sine_layers, width, prune in cases:
            result["load"].extend(load_case(device, sine_layers, width, n_load, prune, workdir))
            save()
    if args.out:
        save()
    else:
        print(json.dumps(result, indent=2))
    return result


def accuracy_failures(result: dict, max_abs_err: float = MAX_ABS_ERR) -> list[str]:
    """Decode rows whose error against the fp32 torch path exceeds max_abs_err, or that failed to run."""
    failures = []
    for r in result["decode"]:
        name = f"{r['arch']} {r['size']} {r['backend']}/{r['config']} {r.get('variant', '')}".rstrip()
        if "error" in r:
            failures.append(f"{name}: failed: {r['error']}")
        elif r["max_abs_err_vs_torch"] > max_abs_err:
            failures.append(f"{name}: max abs err {r['max_abs_err_vs_torch']:.2e} > {max_abs_err:g}")
    return failures


def cli(argv=None) -> int:
    """main(), then exit status 1 when a decode case exceeds the error tolerance or failed to run."""
    result = main(argv)
    if result is None:  # --render
        return 0
    failures = accuracy_failures(result, result["max_abs_err"])
    for failure in failures:
        print(f"bench_decode: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(cli())
