#!/usr/bin/env python
"""Host cost of one decode call, measured without a GPU: inrfmt's Python, then triton's launch path.

1. inrfmt's dispatch: `decode(..., backend="triton")`, `decode_triton(...)` and `expand_hidden(...)` with the
   kernel launches replaced by a stand-in that does nothing, on a bank on torch's `meta` device (tensors
   without storage: the argument handling is the CUDA path's - indices and theta already on the bank's
   device are trusted, nothing is copied - minus the CUDA caching allocator and device guard). Host-side
   indices (a list) take the range check and the copy to the device, which on CUDA is also a synchronizing
   pageable copy (not measured here).
2. triton's launch path: `JITFunction.run` of the decode kernel compiled for sm_90 (argument binding,
   specialization key, cache lookup, grid) under a stand-in driver whose launcher does nothing; the C
   launcher and cuLaunchKernel itself are not included.

Each figure is the median over --repeats windows of --calls calls, in microseconds per call.

    python tools/host_overhead.py [--calls 2000] [--repeats 5] [--json out.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # decode_triton accepts a non-CUDA bank; the launch is a stand-in anyway
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import triton  # noqa: E402

from inrfmt import siren  # noqa: E402
from inrfmt.bank import TensorBank  # noqa: E402
from inrfmt.decode import decode  # noqa: E402
from inrfmt.device import cpu_name  # noqa: E402
from inrfmt.kernels import siren_decode  # noqa: E402
from inrfmt.spec import Architecture  # noqa: E402
from kernel_compile import StandInDriver  # noqa: E402


def per_call_us(fn, calls: int, repeats: int) -> float:
    fn()  # warm caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def dispatch_cases(calls: int, repeats: int) -> list[dict]:
    """inrfmt's own per-call cost, the launches replaced by a no-op."""
    arch = Architecture(sine_layers=10, width=28)
    batch, size, bank_images = 256, 224, 64
    cpu = TensorBank.from_params(siren.init_params(arch, bank_images, generator=torch.Generator().manual_seed(0)),
                                 arch)
    banks = {"dense": cpu.to("meta"), "compact": cpu.to_layout("compact").to("meta")}
    idx = torch.arange(batch, device="meta")
    theta = torch.empty(batch, 2, 3, device="meta")
    out = torch.empty(batch, 3, size, size, device="meta")
    host_idx = [i % bank_images for i in range(batch)]
    rows = []
    real_launch = siren_decode._Plan.launch
    siren_decode._Plan.launch = lambda self, grid, args: None
    try:
        for layout, bank in banks.items():
            cases = {
                "decode_triton, device indices + theta, out given": lambda: siren_decode.decode_triton(
                    bank, idx, size, theta, out=out),
                "decode_triton, device indices, no theta, out given": lambda: siren_decode.decode_triton(
                    bank, idx, size, out=out),
                "decode_triton, device indices + theta, out allocated": lambda: siren_decode.decode_triton(
                    bank, idx, size, theta),
                "decode(backend='triton'), device indices + theta, out given": lambda: decode(
                    bank, idx, size, theta, backend="triton", out=out),
                "decode_triton, host list of indices + theta, out given": lambda: siren_decode.decode_triton(
                    bank, host_idx, size, theta, out=out),
            }
            if layout == "compact":
                cases["expand_hidden alone"] = lambda: siren_decode.expand_hidden(bank, idx)
            for name, fn in cases.items():
                rows.append({"part": "inrfmt dispatch", "layout": layout, "case": name,
                             "us_per_call": per_call_us(fn, calls, repeats)})
                print(f"  {layout:8s} {name}: {rows[-1]['us_per_call']:.1f} us", file=sys.stderr)
    finally:
        siren_decode._Plan.launch = real_launch
    return rows


def triton_launch_cases(calls: int, repeats: int) -> list[dict]:
    """triton's own per-launch cost for the decode kernel (compiled for sm_90 once, then launched), through
    JITFunction.run and through the compiled kernel directly."""
    from triton.runtime import driver

    arch = Architecture(sine_layers=10, width=28)
    bank = TensorBank.from_params(siren.init_params(arch, 8, generator=torch.Generator().manual_seed(0)), arch)
    os.environ["TRITON_INTERPRET"] = "0"  # triton.jit wraps for compilation now
    try:
        kernel = triton.jit(siren_decode._siren_decode_kernel, do_not_specialize=siren_decode.DECODE_RUNTIME_INTS,
                        do_not_specialize_on_alignment=siren_decode.DECODE_POINTERS)
        helpers = dict(SINE=triton.jit(siren_decode._sine), STAGE=triton.jit(siren_decode._stage_hidden_layer))
    finally:
        os.environ["TRITON_INTERPRET"] = "1"
    config = siren_decode.kernel_config(28, 9, has_theta=True)
    constexprs = dict(config.constexprs, **helpers)
    idx, theta, out = torch.arange(4), torch.zeros(4, 2, 3), torch.empty(4, 3, 224, 224)
    args = (idx, theta, out, bank.first_w, bank.first_b, bank.hidden_w, bank.hidden_scale, bank.hidden_b,
            bank.last_w, bank.last_b, bank.num_images, 224 * 224, 224, 392, 9, 44, *out.stride()[:2], 1,
            1 / 224, 1 / 224, 30.0, 30.0, float("nan"))
    previous = driver._active
    driver.set_active(StandInDriver())
    rows = []
    compiled = None
    try:
        def jit_launch():
            return kernel[(36, 1, 1)](*args, **constexprs, num_warps=config.num_warps, maxnreg=config.maxnreg)

        start = time.perf_counter()
        compiled = jit_launch()  # compiles
        compile_seconds = time.perf_counter() - start
        trailing = tuple(constexprs.values())
        cases = {"JITFunction.run (binding, specialization, cache lookup)": jit_launch,
                 "CompiledKernel launched directly (decode_triton after its first call)":
                     lambda: compiled[(36, 1, 1)](*args, *trailing)}
        for name, fn in cases.items():
            rows.append({"part": "triton launch path", "layout": "dense", "case": name,
                         "us_per_call": per_call_us(fn, calls, repeats), "compile_seconds": compile_seconds})
            print(f"  triton: {name}: {rows[-1]['us_per_call']:.1f} us", file=sys.stderr)
    finally:
        if compiled is not None:
            StandInDriver.forget(compiled)
        driver.set_active(previous)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000, help="calls per timing window")
    ap.add_argument("--repeats", type=int, default=5, help="windows; the median is reported")
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = ap.parse_args(argv)
    rows = dispatch_cases(args.calls, args.repeats) + triton_launch_cases(args.calls, args.repeats)
    result = {"tool": "tools/host_overhead.py",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "cpu": cpu_name(), "python": platform.python_version(), "torch": torch.__version__,
              "triton": triton.__version__, "load_average": os.getloadavg()[0], "rows": rows}
    print("| part | layout | case | µs per call |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['part']} | {r['layout']} | {r['case']} | {r['us_per_call']:.1f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
