#!/usr/bin/env python
"""The coded bank (format 2) against today's dense int8 bank: decode speed and load speed, as JSON.

Decode: the same images (SIREN-initialised nets, quantized on a format-2 grid: hidden weights at 4 bits,
everything else at 8, ranges fitted to the weights) held as a coded bank and as a dense int8 bank
(TensorBank.from_params of the coded bank's decoded parameters), decoded by `decode_torch` with the same
batch and size. Repeats interleave the two banks (alternating which goes first); the figure is the median
over repeats of each back-to-back pair's coded / dense seconds (robust to a shared machine's load changing
between repeats), target <= 1.10: the coded bank within 10% of the dense one. The batch's unpacking
(bank.params) is also timed alone, since at small output sizes it is what differs.

Load: a coded file written with InrWriter(grid=...) is loaded with TensorBank.from_file (file bytes per
second of load_seconds; the file is in the page cache, just written); also InrFile.read_codes alone over
all chunks on one thread (the rANS decode), and the bank / file bytes.

    python tools/bench_coded.py [--quick] [--threads 1] [--out bench_results/coded/cpu_DATE.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from inrfmt import siren  # noqa: E402
from inrfmt.bank import TensorBank  # noqa: E402
from inrfmt.decode import decode_torch  # noqa: E402
from inrfmt.device import describe  # noqa: E402
from inrfmt.grid import CodeGrid  # noqa: E402
from inrfmt.reader import InrFile  # noqa: E402
from inrfmt.spec import PARAM_CLASSES, Architecture, flatten_params, unflatten_params  # noqa: E402
from inrfmt.writer import InrWriter  # noqa: E402

BITS = {"first_w": 8, "first_b": 8, "hidden_w": 4, "hidden_b": 8, "last_w": 8, "last_b": 8}
MAX_SLOWDOWN = 1.10  # coded decode seconds / dense int8 decode seconds
DECODE_CASES = [  # (sine_layers, width, output size, batch)
    (3, 15, 32, 256),   # CIFAR preset, native size
    (10, 28, 32, 64),   # the paper's net at CIFAR size
    (10, 28, 64, 16),
    (3, 15, 8, 256),    # a tiny output: the batch's unpacking is a visible share
]
QUICK_DECODE_CASES = [(3, 15, 16, 64), (10, 28, 16, 16)]
LOAD_CASES = [(3, 15, 40000), (10, 28, 6000)]  # (sine_layers, width, images)
QUICK_LOAD_CASES = [(3, 15, 4000)]


def coded_images(arch: Architecture, n: int, seed: int = 0):
    """(grid, codes int16 [n, P]): SIREN-initialised nets on a grid whose ranges are the weights' extent
    (per class max |w|), so the codes fill their ranges as a fitted grid's do."""
    params = siren.init_params(arch, n, generator=torch.Generator().manual_seed(seed))
    flat = flatten_params(params, arch)
    ranges = {cls: float(getattr(params, cls).abs().max()) for cls in PARAM_CLASSES}
    grid = CodeGrid.from_widths(arch, bits=BITS, ranges=ranges)
    return grid, grid.codes(flat)


def decode_case(sine_layers, width, size, batch, repeats):
    arch = Architecture(sine_layers=sine_layers, width=width)
    n = max(1024, batch)
    grid, codes = coded_images(arch, n)
    coded = TensorBank.from_codes(arch, grid, codes)
    values = siren.SirenParams(**unflatten_params(grid.values(codes), arch))
    dense = TensorBank.from_params(values, arch, hidden_dtype="int8")  # today's bank of the same images
    idx = torch.randint(0, n, (batch,), generator=torch.Generator().manual_seed(1))
    out = torch.empty(batch, 3, size, size)
    banks = {"coded": coded, "dense_int8": dense}
    for bank in banks.values():  # warm-up
        decode_torch(bank, idx, size, out=out)
    times = {name: [] for name in banks}
    unpack = {name: [] for name in banks}
    for r in range(repeats):
        order = list(banks) if r % 2 == 0 else list(banks)[::-1]
        for name in order:
            start = time.perf_counter()
            decode_torch(banks[name], idx, size, out=out)
            times[name].append(time.perf_counter() - start)
            start = time.perf_counter()
            banks[name].params(idx)
            unpack[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    # The median of each repeat's pair (timed back to back): robust to load that changes between repeats.
    ratio = statistics.median(c / d for c, d in zip(times["coded"], times["dense_int8"]))
    row = {"arch": f"{sine_layers}x{width}", "size": f"{size}x{size}", "batch": batch, "repeats": repeats,
           "coded_img_per_s": batch / med["coded"], "dense_int8_img_per_s": batch / med["dense_int8"],
           "coded_over_dense_seconds": ratio, "ratio_of_medians": med["coded"] / med["dense_int8"],
           "target_max": MAX_SLOWDOWN, "met": ratio <= MAX_SLOWDOWN,
           "params_ms": {name: 1e3 * statistics.median(t) for name, t in unpack.items()},
           "bank_bytes_per_image": {name: bank.nbytes / n for name, bank in banks.items()}}
    print(f"  decode {row['arch']} @ {row['size']} x{batch}: coded {row['coded_img_per_s']:,.0f} img/s, dense int8 "
          f"{row['dense_int8_img_per_s']:,.0f} img/s, ratio {ratio:.3f} (params {row['params_ms']['coded']:.2f} vs "
          f"{row['params_ms']['dense_int8']:.2f} ms)", file=sys.stderr)
    return row


def load_case(sine_layers, width, n, repeats, workdir):
    arch = Architecture(sine_layers=sine_layers, width=width)
    path = os.path.join(workdir, f"coded_{sine_layers}x{width}_{n}.inr")
    start = time.perf_counter()
    with InrWriter(path, arch, grid=coded_images(arch, 1)[0], chunk_images=1024) as writer:
        grid = writer.grid
        for first in range(0, n, 4096):
            m = min(4096, n - first)
            params = siren.init_params(arch, m, generator=torch.Generator().manual_seed(first))
            writer.add_codes(grid.codes(flatten_params(params, arch)).numpy(), np.zeros(m, np.int64),
                             np.full(m, 32), np.full(m, 32), np.full(m, 30.0))
    write_seconds = time.perf_counter() - start
    rows = []
    with InrFile(path) as f:
        file_bytes = f.file_bytes
        for k in range(f.num_chunks):  # warm-up: page cache, numba's compiled decoder
            f.read_codes(k)
        reads = []
        for _ in range(repeats):
            start = time.perf_counter()
            for k in range(f.num_chunks):
                f.read_codes(k)
            reads.append(time.perf_counter() - start)
        read = statistics.median(reads)
        for workers in (None, 1):
            loads = [TensorBank.from_file(f, "cpu", workers=workers) for _ in range(repeats)]
            seconds = statistics.median(b.load_seconds for b in loads)
            bank_bytes = loads[0].nbytes
            row = {"arch": f"{sine_layers}x{width}", "images": n, "workers": workers or min(8, os.cpu_count()),
                   "file_bytes": file_bytes, "file_bytes_per_image": file_bytes / n,
                   "bank_bytes_per_image": bank_bytes / n, "bank_over_file_bytes": bank_bytes / file_bytes,
                   "load_seconds": seconds, "load_mb_per_s": file_bytes / seconds / 1e6,
                   "read_codes_one_thread_mb_per_s": file_bytes / read / 1e6, "write_seconds": write_seconds,
                   "note": "file in page cache (just written); SIREN-init codes on the grid of image 0"}
            rows.append(row)
            print(f"  load {row['arch']} x{n} ({row['workers']} workers): {row['load_mb_per_s']:.1f} MB/s of file "
                  f"(read_codes alone {row['read_codes_one_thread_mb_per_s']:.1f} MB/s), bank/file "
                  f"{row['bank_over_file_bytes']:.3f}", file=sys.stderr)
            del loads
    os.remove(path)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small cases (a smoke run)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a shared box)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per bank (default 15, quick 3)")
    parser.add_argument("--out", default=None, help="JSON path (default bench_results/coded/cpu_<date>.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 15)
    date = datetime.date.today().isoformat()
    result = {"date": date, "device": describe("cpu"), "torch_threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
              "quick": args.quick, "bits": BITS, "decode": [], "load": []}
    for case in QUICK_DECODE_CASES if args.quick else DECODE_CASES:
        result["decode"].append(decode_case(*case, repeats))
    with tempfile.TemporaryDirectory() as workdir:
        for case in QUICK_LOAD_CASES if args.quick else LOAD_CASES:
            result["load"] += load_case(*case, repeats=max(3, repeats // 3), workdir=workdir)
    out = args.out or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench_results",
                                   "coded", f"cpu{'_quick' if args.quick else ''}_{date}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
        fh.write("\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0 if all(row["met"] for row in result["decode"]) else 1


if __name__ == "__main__":
    sys.exit(main())
