#!/usr/bin/env python
"""Static report of the fused decode kernel, without a GPU: compile, read the SASS, bound the throughput.

Every shipped configuration (each preset's net, plus the 10x28 net of the decode targets, with and without a
coordinate transform, reading a format-1 bank's int8 hidden weights or a coded bank's float32 batch) is
compiled with the installed triton for sm_90 and sm_80 exactly as decode_triton launches it
(tools/kernel_compile.py, triton's bundled ptxas), and its SASS is read with triton's bundled nvdisasm.
For each configuration and output size (32x32 at batch 4096, 224x224 at batch 256) it reports

  - registers per thread, spilled bytes, shared memory per program, programs per SM;
  - the layer loop: SASS instructions per activation element of one hidden layer (one tile's instructions
    with H hidden layers minus those with none, divided by H and by the activations a thread computes per
    layer, padded units included), with the MUFU (sine) and conversion (I2F/F2I/F2F/I2I/FRND) counts and
    the barriers per layer;
  - throughput bounds from the device model: the sine unit (MUFU.SIN at 16 results/clk/SM), the SFU
    including conversions (same pipe, same rate), and instruction issue (4 warp-instructions/clk/SM),
    from the dynamic instruction counts of one image (its programs' code outside the tile loop plus its
    tiles' loop bodies, all warps).

These are static estimates from instruction counts and peak rates, not measurements: latency, occupancy
stalls, memory and clock throttling are not modelled, so a GPU runs below every bound. The report is the
regression check for kernel changes: `--check` exits 1 when a configuration misses a static target.

    python tools/kernel_report.py                   # table, sm_90 and sm_80
    python tools/kernel_report.py --json out.json   # also the JSON
    python tools/kernel_report.py --check --capability 90
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns unless set; keep today's default
# A fresh triton cache, so that compile_seconds are cold compiles (what a fresh GPU machine pays).
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="inrfmt-kernel-report-"))

import triton  # noqa: E402

from kernel_compile import compile_for_target  # noqa: E402
from inrfmt.kernels import siren_decode  # noqa: E402
from inrfmt.presets import PRESETS  # noqa: E402


@dataclass(frozen=True)
class DeviceModel:
    """Peak rates of one GPU (max boost clock; sustained clocks under load are lower)."""

    name: str
    capability: int
    sms: int
    clock_ghz: float
    issue_per_clk_sm: int = 4  # warp-instructions: 4 schedulers per SM
    sfu_per_clk_sm: int = 16  # MUFU / conversion results per clock per SM (compute capability 8.0 and 9.0)
    regs_per_sm: int = 65536
    smem_per_sm: int = 228 * 1024
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32


DEVICES = {
    90: [DeviceModel("H100 SXM", 90, 132, 1.98), DeviceModel("H200", 90, 132, 1.98)],
    80: [DeviceModel("A100 SXM", 80, 108, 1.41, smem_per_sm=164 * 1024)],
}
SMEM_RESERVED_PER_BLOCK = 1024  # the driver's per-block shared-memory reservation (sm_80 and later)

# (sine_layers, width) of every preset, plus the 10x28 net of the decode targets.
# What the kernel reads, by bank: a format-1 bank's int8 hidden weights, or a coded (format 2) bank's batch
# dequantized into a float32 scratch (the same kernel, specialised for float32 hidden weights).
BANKS = {"int8": "int8", "coded": "float32"}
NETS = sorted({(p.arch.sine_layers, p.arch.width) for p in PRESETS.values()} | {(10, 28)})
SIZES = ((32, 4096), (224, 256))  # (output side, batch): the decode benchmark's cases

# Static targets on sm_90 (H200 model): (net, size) -> (max instructions per activation element, min
# issue-bound img/s).
TARGETS = {("10x28", 224): (5.0, 250e3), ("10x32", 224): (5.0, 250e3), ("10x40", 224): (None, 120e3),
           ("3x15", 32): (None, 30e6)}

_INSTR = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z0-9_]+)([.A-Z0-9_]*)\s*(.*?);")
_LABEL = re.compile(r"^(\.L_x_\d+):")
CONVERSIONS = ("I2F", "F2I", "F2F", "I2I", "FRND")  # on the MUFU/XU pipe (F2FP and I2FP are not)


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def read_cubin(cubin: bytes) -> tuple[str, dict]:
    """(SASS text, resource usage {REG, SHARED, LOCAL, ...}) of a cubin, with triton's bundled tools."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([_tool("nvdisasm"), "-c", f.name], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    resources = {k: int(v) for k, v in re.findall(r"(REG|SHARED|LOCAL|STACK):(\d+)", usage)}
    return sass, resources


def parse_sass(sass: str) -> tuple[list[tuple[str, str]], list[tuple[int, int]]]:
    """Instructions [(opcode, modifiers)] and loops [(first, last)] (a backward branch to a label)."""
    instrs, labels, branches = [], {}, []
    for line in sass.splitlines():
        m = _LABEL.match(line)
        if m:
            labels[m.group(1)] = len(instrs)
            continue
        m = _INSTR.match(line)
        if m:
            instrs.append((m.group(2), m.group(3)))
            if m.group(2) == "BRA":
                target = re.search(r"\.L_x_\d+", m.group(4))
                if target:
                    branches.append((len(instrs) - 1, target.group(0)))
    loops = [(labels[t], i) for i, t in branches if t in labels and labels[t] <= i]
    return instrs, loops


def _counts(instrs) -> dict:
    ops = collections.Counter(op for op, _ in instrs)
    sin = sum(1 for op, mod in instrs if op == "MUFU" and mod.startswith(".SIN"))
    cvt = sum(ops[c] for c in CONVERSIONS)
    return {"instructions": len(instrs), "mufu_sin": sin, "mufu": ops["MUFU"], "conversions": cvt,
            "barriers": ops["BAR"], "spill_ops": ops["STL"] + ops["LDL"], "opcodes": dict(ops.most_common(12))}


def tile_loop_counts(sass: str) -> dict:
    """Counts of the whole kernel, its tile loop's body (the outermost loop holding the sines) and the code
    outside it (run once per program)."""
    instrs, loops = parse_sass(sass)
    sine_loops = [(a, b) for a, b in loops
                  if any(op == "MUFU" and mod.startswith(".SIN") for op, mod in instrs[a:b + 1])]
    if not sine_loops:
        raise RuntimeError("no loop with MUFU.SIN in the SASS: is this the decode kernel with fast_sin?")
    a, b = max(sine_loops, key=lambda ab: ab[1] - ab[0])
    body = instrs[a:b + 1]
    nested = any(a <= x and y <= b and (x, y) != (a, b) for x, y in sine_loops)
    return {"total": _counts(instrs), "tile": _counts(body), "outside": _counts(instrs[:a] + instrs[b + 1:]),
            "nested_sine_loop": nested}


def blocks_per_sm(device: DeviceModel, regs: int, smem: int, warps: int) -> dict:
    """Resident programs per SM and what limits them."""
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256  # registers are allocated per warp in units of 256
    limits = {"registers": device.regs_per_sm // (regs_per_warp * warps),
              "shared memory": device.smem_per_sm // (smem + SMEM_RESERVED_PER_BLOCK),
              "warps": device.max_warps_per_sm // warps, "blocks": device.max_blocks_per_sm}
    limiter = min(limits, key=limits.get)
    return {"blocks": limits[limiter], "limited_by": limiter}


def bounds(device: DeviceModel, counts: dict, warps: int, size: int, batch: int, block: int) -> dict:
    """Throughput bounds (img/s) of one image of `size`^2 decoded in a batch of `batch`."""
    tiles = -(-size * size // block)
    per_program = siren_decode.program_tiles(tiles, batch, device.sms)
    programs = -(-tiles // per_program)

    def per_image(key):  # warp-instructions of one image
        return warps * (programs * counts["outside"][key] + tiles * counts["tile"][key])

    clocks = device.sms * device.clock_ghz * 1e9
    return {"tiles_per_image": tiles, "programs_per_image": programs,
            "warp_instructions_per_image": per_image("instructions"),
            "issue_img_s": clocks * device.issue_per_clk_sm / per_image("instructions"),
            "sine_img_s": clocks * device.sfu_per_clk_sm / (32 * per_image("mufu_sin")),
            "sfu_img_s": clocks * device.sfu_per_clk_sm / (32 * (per_image("mufu") + per_image("conversions")))}


def analyse(sine_layers: int, width: int, has_theta: bool, capability: int, bank: str = "int8",
            **overrides) -> dict:
    """Compile one configuration (and its no-hidden-layer twin for the per-layer difference) and report it.
    `bank`: what the kernel reads, a format-1 bank's int8 hidden weights or a coded bank's batch (BANKS).
    `overrides`: kernel_config's block_pixels / num_warps, to compare tile shapes."""
    hidden = sine_layers - 1
    hidden_dtype = BANKS[bank]
    config = siren_decode.kernel_config(width, hidden, has_theta=has_theta, **overrides)
    start = time.perf_counter()
    compiled = compile_for_target(width, hidden, capability=capability, config=config, hidden_dtype=hidden_dtype)
    compile_seconds = time.perf_counter() - start
    sass, resources = read_cubin(compiled.asm["cubin"])
    counts = tile_loop_counts(sass)
    c = config.constexprs
    warps, block, held = config.num_warps, c["BLOCK_P"], c["WP"]
    smem = int(compiled.metadata.shared) + resources.get("SHARED", 0)
    row = {"net": f"{sine_layers}x{width}", "theta": has_theta, "capability": capability, "bank": bank,
           "held_width": held, "block_pixels": block, "num_warps": warps, "maxnreg": config.maxnreg,
           "staged": c["STAGED"], "one_units": c["ONES"], "live_units": c["LIVE"],
           "registers": resources["REG"], "spilled_bytes": resources.get("LOCAL", 0),
           "spill_instructions": counts["total"]["spill_ops"], "shared_bytes": smem,
           "compile_seconds": round(compile_seconds, 2), "tile_loop": counts["tile"],
           "outside_loop": counts["outside"], "nested_sine_loop": counts["nested_sine_loop"]}
    if hidden:
        base = siren_decode.kernel_config(width, 0, has_theta=has_theta, block_pixels=block, num_warps=warps)
        base = base._replace(maxnreg=config.maxnreg)
        base_counts = tile_loop_counts(read_cubin(compile_for_target(
            width, 0, capability=capability, config=base, hidden_dtype=hidden_dtype).asm["cubin"])[0])["tile"]
        elements = block * held / (32 * warps)  # activations per thread per layer per tile
        layer = {k: (counts["tile"][k] - base_counts[k]) / hidden
                 for k in ("instructions", "mufu_sin", "conversions", "barriers")}
        row["layer_loop"] = {"instructions_per_layer": layer["instructions"], "elements_per_thread": elements,
                             "instructions_per_element": layer["instructions"] / elements,
                             "mufu_sin_per_element": layer["mufu_sin"] / elements,
                             "conversions_per_element": layer["conversions"] / elements,
                             "barriers_per_layer": layer["barriers"]}
    row["devices"] = {}
    for device in DEVICES[capability]:
        occupancy = blocks_per_sm(device, resources["REG"], smem, warps)
        row["devices"][device.name] = {
            "programs_per_sm": occupancy["blocks"], "limited_by": occupancy["limited_by"],
            "sizes": {str(size): bounds(device, counts, warps, size, batch, block) for size, batch in SIZES}}
    return row


def check(rows: list[dict]) -> list[str]:
    """The static targets each sm_90 row misses on the H200 model (an empty list when all are met)."""
    missed = []
    for row in rows:
        if row["capability"] != 90:
            continue
        for (net, size), (max_per_element, min_issue) in TARGETS.items():
            if row["net"] != net:
                continue
            label = f"{net} at {size}^2 ({'theta' if row['theta'] else 'no theta'}, {row['bank']} bank)"
            per_element = row.get("layer_loop", {}).get("instructions_per_element")
            if max_per_element is not None and per_element > max_per_element:
                missed.append(f"{label}: {per_element:.2f} instructions per activation element > {max_per_element}")
            issue = row["devices"]["H200"]["sizes"][str(size)]["issue_img_s"]
            if issue < min_issue:
                missed.append(f"{label}: issue bound {issue:,.0f} img/s < {min_issue:,.0f}")
    return missed


def _rate(v: float) -> str:
    return f"{v / 1e6:.1f}M" if v >= 1e6 else f"{v / 1e3:.0f}k"


def render(report: dict) -> str:
    """Markdown table of a report (one row per configuration, capability and output size)."""
    lines = [f"Static estimates, {report['date']}, triton {report['triton']} (`tools/kernel_report.py`); bounds "
             "at max boost clock: " + "; ".join(
                 f"{d['name']} {d['sms']} SMs at {d['clock_ghz']} GHz" for d in report["device_models"]) + ".",
             "",
             "| sm | net | bank | θ | size | regs | spill | smem KB | progs/SM | instr/elem | MUFU/elem | cvt/elem | "
             "tile instr | device | sine-bound | SFU-bound | issue-bound |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        layer = row.get("layer_loop")
        per = (f"{layer['instructions_per_element']:.2f} | {layer['mufu_sin_per_element']:.2f} | "
               f"{layer['conversions_per_element']:.2f}") if layer else "— | — | —"
        for name, dev in row["devices"].items():
            for size, b in dev["sizes"].items():
                lines.append(
                    f"| {row['capability']} | {row['net']} | {row['bank']} | {'yes' if row['theta'] else 'no'} | "
                    f"{size}² | "
                    f"{row['registers']} | {row['spilled_bytes']} | {row['shared_bytes'] / 1024:.1f} | "
                    f"{dev['programs_per_sm']} ({dev['limited_by']}) | {per} | {row['tile_loop']['instructions']} | "
                    f"{name} | {_rate(b['sine_img_s'])} | {_rate(b['sfu_img_s'])} | {_rate(b['issue_img_s'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--capability", type=int, action="append", choices=sorted(DEVICES),
                    help="compile for this compute capability only (repeatable; default: all)")
    ap.add_argument("--net", action="append", metavar="SxW", help="only this net, e.g. 10x28 (repeatable)")
    ap.add_argument("--theta", choices=("both", "yes", "no"), default="both", help="with a coordinate transform")
    ap.add_argument("--bank", choices=("both", *BANKS), default="both",
                    help="what the kernel reads: a format-1 bank's int8 hidden weights, a coded bank's dequantized "
                         "batch (float32), or both")
    ap.add_argument("--block-pixels", type=int, help="pixels per tile instead of the default (to compare)")
    ap.add_argument("--num-warps", type=int, help="warps per program instead of the default (to compare)")
    ap.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    ap.add_argument("--check", action="store_true", help="exit 1 when an sm_90 configuration misses a target")
    args = ap.parse_args(argv)
    nets = NETS
    if args.net:
        try:
            nets = [tuple(int(v) for v in n.lower().split("x")) for n in args.net]
        except ValueError:
            ap.error(f"--net must look like 10x28, got {args.net}")
    thetas = {"both": (False, True), "yes": (True,), "no": (False,)}[args.theta]
    capabilities = args.capability or sorted(DEVICES, reverse=True)
    banks = tuple(BANKS) if args.bank == "both" else (args.bank,)
    rows = []
    for capability in capabilities:
        for sine_layers, width in nets:
            for bank in banks:
                for has_theta in thetas:
                    rows.append(analyse(sine_layers, width, has_theta, capability, bank,
                                        block_pixels=args.block_pixels, num_warps=args.num_warps))
                    print(f"  compiled {sine_layers}x{width} {bank} theta={has_theta} sm_{capability} "
                          f"({rows[-1]['compile_seconds']} s)", file=sys.stderr)
    report = {"tool": "tools/kernel_report.py", "triton": triton.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
              "device_models": [asdict(d) for c in capabilities for d in DEVICES[c]],
              "targets": {f"{net} {size}": list(t) for (net, size), t in TARGETS.items()}, "rows": rows}
    print(render(report))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    if args.check:
        missed = check(rows)
        for m in missed:
            print(f"target missed: {m}", file=sys.stderr)
        return 1 if missed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
