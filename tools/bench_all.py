#!/usr/bin/env python3
"""Run the paper's three experiments at one scale and regenerate the tables of BENCHMARKS.md.

    python tools/bench_all.py --cpu                 # `make bench`: CPU-sized, a few minutes on 2 cores
    python tools/bench_all.py --gpu                 # GPU-sized (tools/gpu_check.sh); needs CUDA
    python tools/bench_all.py --render bench_results/gpu/bench_all.json    # tables + plots from a bundle

Each experiment runs its own tool (tools/rd_curve.py, tools/accuracy.py, tools/bench_train.py) as a
subprocess, exactly as the command recorded in the results. Outputs go to --results (default
bench_results/cpu or bench_results/gpu): rd.json + rd.png, accuracy.json, train.jsonl + train.png, and
bench_all.json — one bundle holding every result and command, from which --render rebuilds the plots
and the BENCHMARKS.md tables (so a GPU machine only needs to return that one file). The tables are
rewritten between the markers `<!-- BEGIN <plan>-<experiment> -->` and `<!-- END <plan>-<experiment> -->`
of BENCHMARKS.md; the rest of the file is left as it is. --only picks experiments (rd, accuracy, train).
A tool that fails is reported, the others still run, and the exit status is 1.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's inrfmt, not an installed one

from plot_util import REPO, ToolError, environment, read_json, run_main, write_json  # noqa: E402

EXPERIMENTS = ("rd", "accuracy", "train")
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


# ------------------------------------------------------------------------------------------------ plans
def train_runs(common: list[str], pipelines: list[tuple[str, int | None]]) -> list[list[str]]:
    runs = []
    for pipeline, workers in pipelines:
        args = ["--pipeline", pipeline] + common
        if workers is not None:
            args += ["--workers", str(workers)]
        runs.append(args)
    return runs


def plan(name: str, results: Path) -> dict:
    """The commands of one plan: {experiment: [argv after the tool path, ...]} (paths relative to the repo)."""
    work = "bench_out/" + name
    res = os.path.relpath(results, REPO)
    if name == "cpu":
        # 256 images (the 200 of the sample, cycled) at 32x32: one JPEG tree and one .inr file for every run;
        # the .inr is encoded with few steps, since decode cost does not depend on how well it was fitted
        base = ["--data", "data/sample", "--min-images", "256", "--size", "32", "--model", "resnet18",
                "--device", "cpu", "--encode-steps", "50", "--work", f"{work}/train", "--out", f"{res}/train.jsonl"]
        train_common = base + ["--batch-size", "32", "--steps", "4", "--warmup", "1"]
        data_only = base + ["--data-only", "--batch-size", "64", "--steps", "30", "--warmup", "2"]
        return {
            "device": "cpu",
            "rd": [["data/photos", "--square", "32", "--crops", "10", "--presets", "fast", "--variants",
                    "prune-int8", "noprune-int8", "prune-fp16", "noprune-fp16", "prune-int8-f16", "--device", "cpu",
                    "--out", res, "--work", f"{work}/rd"]],
            "accuracy": [["--data", "data/sample", "--model", "small", "--epochs", "15", "--repeats", "2",
                          "--device", "cpu", "--work", f"{work}/accuracy", "--out", f"{res}/accuracy.json"]],
            "train": train_runs(train_common, [("gpu-raw", None), ("inr", None), ("torch", 1), ("torch", 2),
                                               ("nvjpeg", None), ("dali", 1)])
            + train_runs(data_only, [("gpu-raw", None), ("inr", None), ("torch", 1), ("torch", 2), ("dali", 1),
                                     ("dali", 2)]),
        }
    if name == "cpu-extended":
        if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
            raise ToolError(f"--cpu-extended needs Fashion-MNIST in {FASHION_MNIST} "
                            f"(apt-get install dataset-fashion-mnist)")
        return {
            "device": "cpu", "train": [],
            "rd": [["data/photos", "--square", "32", "--crops", "20", "--presets", "fast", "rapid-inr-cifar10:1000",
                    "--variants", "prune-int8", "noprune-int8", "prune-int8-f16", "--device", "cpu", "--out", res,
                    "--work", f"{work}/rd"]],
            "accuracy": [["--fashion-mnist", str(FASHION_MNIST), "--max-train", "2000", "--max-test", "1000",
                          "--model", "small", "--epochs", "10", "--repeats", "2", "--device", "cpu",
                          "--work", f"{work}/accuracy", "--out", f"{res}/accuracy.json"]],
        }
    if name == "gpu":
        if (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
            acc_data = ["--fashion-mnist", str(FASHION_MNIST), "--max-train", "10000", "--max-test", "2000",
                        "--model", "resnet18", "--epochs", "10", "--batch-size", "256", "--lr", "0.1"]
        else:  # the bundled 200 images only: a small model, more epochs, several seeds
            acc_data = ["--data", "data/sample", "--model", "small", "--epochs", "30", "--batch-size", "32",
                        "--repeats", "5"]
        t32 = ["--data", "data/sample", "--size", "32", "--model", "resnet18", "--batch-size", "512",
               "--steps", "30", "--warmup", "5", "--precision", "bf16", "--channels-last", "--device", "cuda",
               "--preset", "rapid-inr-cifar10", "--encode-steps", "50", "--work", f"{work}/train",
               "--out", f"{res}/train.jsonl"]
        t224 = ["--data", "data/photos", "--size", "224", "--model", "resnet18", "--batch-size", "128",
                "--min-images", "1024", "--steps", "15", "--warmup", "3", "--precision", "bf16", "--channels-last",
                "--device", "cuda", "--preset", "rapid-inr-flowers102", "--encode-steps", "10",
                "--work", f"{work}/train", "--out", f"{res}/train.jsonl"]
        pipes = [("gpu-raw", None), ("inr", None), ("torch", 1), ("torch", 8), ("nvjpeg", None), ("dali", 1)]
        return {
            "device": "cuda",
            "rd": [["data/photos", "--square", "32", "--crops", "100", "--presets", "rapid-inr-cifar10", "fast",
                    "--variants", "prune-int8", "noprune-int8", "prune-fp16", "noprune-fp16", "prune-int8-f16",
                    "--device", "cuda", "--out", res, "--work", f"{work}/rd"]],
            "accuracy": [acc_data + ["--preset", "rapid-inr-cifar10", "--steps", "1000", "--device", "cuda",
                                     "--work", f"{work}/accuracy", "--out", f"{res}/accuracy.json"]],
            "train": train_runs(t32, pipes) + train_runs(t224, pipes),
        }
    raise ToolError(f"unknown plan {name!r}")


TOOLS = {"rd": "tools/rd_curve.py", "accuracy": "tools/accuracy.py", "train": "tools/bench_train.py"}


def command_text(experiment: str, argv: list[str]) -> str:
    return "python " + " ".join(shlex.quote(a) for a in [TOOLS[experiment]] + argv)


# -------------------------------------------------------------------------------------------------- run
def collect(bundle: dict, results: Path, only) -> dict:
    """Add the JSON the experiments in `only` have written so far under `results` to `bundle`."""
    if (results / "rd.json").exists() and "rd" in only:
        bundle["rd"] = read_json(results / "rd.json")
    if (results / "accuracy.json").exists() and "accuracy" in only:
        bundle["accuracy"] = read_json(results / "accuracy.json")
    train_jsonl = results / "train.jsonl"
    if train_jsonl.exists() and "train" in only:
        bundle["train"] = [json.loads(line) for line in train_jsonl.read_text().splitlines() if line.strip()]
    return bundle


def pipeline_spec(argv: list[str]) -> str:
    """"name" or "name:workers" of a train run's arguments (what --pipelines selects)."""
    name = argv[argv.index("--pipeline") + 1]
    return f"{name}:{argv[argv.index('--workers') + 1]}" if "--workers" in argv else name


def run_plan(name: str, results: Path, only, timeout: float | None, dali_site: str | None = None,
             checkpoint=None, pipelines=None) -> dict:
    """Run the plan's commands for the experiments in `only` (the train runs of `pipelines` only, when
    given); `checkpoint(bundle)`, if given, is called after every command with the results so far (so a run
    stopped from outside still leaves its bundle)."""
    steps = plan(name, results)
    results.mkdir(parents=True, exist_ok=True)
    train_jsonl = results / "train.jsonl"
    if "train" in only and train_jsonl.exists():
        train_jsonl.unlink()  # this run's lines only
    bundle = {"tool": "bench_all", "plan": name, "env": environment(steps["device"]), "commands": {},
              "failures": [], "seconds": {}}
    for experiment in EXPERIMENTS:
        if experiment not in only:
            continue
        bundle["commands"][experiment] = []
        t0 = time.perf_counter()
        for argv in steps[experiment]:
            if experiment == "train" and pipelines and pipeline_spec(argv) not in pipelines:
                continue
            cmd = [sys.executable, str(REPO / TOOLS[experiment])] + argv
            text = command_text(experiment, argv)
            bundle["commands"][experiment].append(text)
            print(f"bench_all: {text}", file=sys.stderr, flush=True)
            env = None
            if dali_site and experiment == "train" and "dali" in argv:
                env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                    [dali_site] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
            try:
                proc = subprocess.run(cmd, cwd=REPO, timeout=timeout, stdout=subprocess.DEVNULL
                                      if experiment != "train" else subprocess.PIPE, text=True, env=env)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            if rc != 0:
                bundle["failures"].append({"command": text, "exit": rc})
                print(f"bench_all: FAILED ({rc}): {text}", file=sys.stderr)
            bundle["seconds"][experiment] = time.perf_counter() - t0
            if checkpoint is not None:
                checkpoint(collect(bundle, results, only))
        bundle["seconds"][experiment] = time.perf_counter() - t0
    return collect(bundle, results, only)


# ----------------------------------------------------------------------------------------------- render
def fmt(value, spec=".1f", none="—"):
    return none if value is None else format(value, spec)


def machine_line(env: dict) -> str:
    dev = env.get("gpu") or env.get("device", "?")
    return (f"{env.get('cpu', '?')}, {env.get('cpu_cores', '?')} cores, device `{dev}`; torch {env.get('torch', '?')} "
            f"({env.get('torch_threads', '?')} threads), Pillow {env.get('pillow', '?')}; "
            f"{env.get('date_utc', '?')} UTC")


def rd_markdown(rd: dict, commands: list[str], png: str) -> str:
    lines = [f"Command: `{commands[0]}`" if commands else "", "",
             f"Machine: {machine_line(rd['env'])}.", "",
             f"Images: {rd['images']} {'random crops' if rd.get('crops_per_image') else 'images'} "
             f"({rd['image_sizes']}) from `{rd['src']}`. Steps = convert's `steps` (round 1; the pruning rounds "
             f"scale with it), so a `noprune` row also trained for fewer steps in all than its `prune` row.", "",
             "| method | setting | bytes/image | bits/pixel | mean PSNR (dB) | p10 PSNR | JPEG at equal bytes "
             "| vs JPEG |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for p in rd["points"]:
        if p["method"] == "inrfmt":
            steps = p.get("steps") or "preset's"
            setting = f"{p['preset']} {p['arch']}, {steps} steps, {p['variant']} (pruned {p['prune_ratio_mean']:.1%})"
            ref = p.get("jpeg_psnr_at_equal_bytes")
            if ref is not None:
                verdict = f"{p['psnr_gain_vs_jpeg_db']:+.2f} dB"
            elif p.get("beats_jpeg"):
                verdict = "smaller than any JPEG"
            else:
                verdict = "beyond the JPEG sweep"
            row = ["**inrfmt**", setting, fmt(p["bytes_per_image"], ".0f"), fmt(p["bits_per_pixel"], ".2f"),
                   fmt(p["psnr_mean"], ".2f"), fmt(p["psnr_p10"], ".2f"), fmt(ref, ".2f"), verdict]
        else:
            row = [p["method"].upper(), f"q{p['quality']}", fmt(p["bytes_per_image"], ".0f"),
                   fmt(p["bits_per_pixel"], ".2f"), fmt(p["psnr_mean"], ".2f"), fmt(p["psnr_p10"], ".2f"), "", ""]
        lines.append("| " + " | ".join(row) + " |")
    for note in rd.get("notes", []):
        lines += ["", f"Note: {note}"]
    lines += ["", f"![rate-distortion]({png})"]
    return "\n".join(lines)


def accuracy_markdown(acc: dict, commands: list[str]) -> str:
    r, f = acc["recipe"], acc["inr_file"]
    o, i = acc["original"], acc["inr"]

    def acc_text(side):
        text = f"{100 * side['test_accuracy']:.2f} %"
        if r["repeats"] > 1:
            text += f" ± {100 * side['test_accuracy_std']:.2f}"
        return text

    lines = [f"Command: `{commands[0]}`" if commands else "", "",
             f"Machine: {machine_line(acc['env'])}.", "",
             f"Data: {acc['dataset']}, {acc['train_images']} training / {acc['test_images']} test images of "
             f"{acc['image_size'][1]}x{acc['image_size'][0]}, {acc['num_classes']} classes. Recipe: {r['model']}, "
             f"{r['epochs']} epochs, batch {r['batch_size']}, lr {r['lr']}, {r['optimizer']}, "
             f"augmentation {'crop+flip' if r['augment'] else 'none'}, {r['repeats']} run(s) per side "
             f"(mean ± std); both tested on the original test images.", "",
             "| training images | test accuracy | bytes/image | mean PSNR (dB) | p10 PSNR |",
             "|---|---:|---:|---:|---:|",
             f"| original (uint8 RGB) | {acc_text(o)} | {acc['raw_bytes_per_image']} (raw RGB"
             + (f"; {acc['raw_gray_bytes_per_image']} as raw grayscale" if acc.get("grayscale") else "")
             + ") | — | — |",
             f"| decoded from .inr ({f['preset'] or 'given file'} {f['arch']}, {f['hidden_dtype']}, "
             f"pruned {f['prune_ratio_mean']:.1%}) | {acc_text(i)} | {f['bytes_per_image']:.0f} | "
             f"{f['psnr_mean']:.2f} | {f['psnr_p10']:.2f} |",
             "", f"Accuracy drop: **{acc['accuracy_drop_points']:+.2f} points** (target: within 2 points)."]
    return "\n".join(lines)


def train_markdown(rows: list[dict], commands: list[str], png: str) -> str:
    if not rows:
        return "No runs."
    lines = [f"Machine: {machine_line(rows[0]['env'])}.", "", "Commands (one per row, in order):", "", "```"]
    lines += [c.replace("python tools/", "tools/") for c in commands] + ["```", ""]
    groups: dict = {}
    for r in rows:
        key = (r["model"], r["size"], r["batch_size"], r["precision"], r.get("mode", "train"))
        groups.setdefault(key, []).append(r)
    for (model, size, batch, precision, mode), sel in groups.items():
        ok = {run_key(r): r for r in sel if r.get("status") == "ok"}
        raw = ok.get("gpu-raw")
        torch1 = ok.get("torch (1 worker)")
        if mode == "train":
            title = f"{model} training step (model + data), {size}x{size}, batch {batch}, {precision}"
        else:
            title = f"input pipeline alone (--data-only, no model), {size}x{size}, batch {batch}"
        lines += [f"**{title}**", "",
                  "| pipeline | img/s | epoch (s) | × gpu-raw | × torch (1 worker) | notes |",
                  "|---|---:|---:|---:|---:|---|"]
        for r in sel:
            if r.get("status") != "ok":
                lines.append(f"| {run_key(r)} | — | — | — | — | unavailable: {r.get('reason', '')} |")
                continue
            note = ""
            if r["pipeline"] == "inr" and r.get("inr_bytes_per_image"):
                note = f"{r['inr_bytes_per_image']:.0f} B/image .inr"
            elif r.get("jpeg_bytes_per_image"):
                note = f"JPEG q{r.get('jpeg_quality')}, {r['jpeg_bytes_per_image']:.0f} B/image"
                if r.get("dali_version"):
                    note += f"; DALI {r['dali_version']}, CPU operators" if r["env"].get("device") == "cpu" \
                        else f"; DALI {r['dali_version']}"
            lines.append(f"| {run_key(r)} | {r['img_per_s']:,.0f} | {r['epoch_seconds']:.2f} ({r['images']} img) | "
                         f"{fmt(r['img_per_s'] / raw['img_per_s'] if raw else None, '.2f')} | "
                         f"{fmt(r['img_per_s'] / torch1['img_per_s'] if torch1 else None, '.2f')} | {note} |")
        inr = ok.get("inr")
        if inr and mode == "train":
            checks = []
            if raw:
                ratio = inr["img_per_s"] / raw["img_per_s"]
                checks.append(f"inr / gpu-raw = {ratio:.2f} (target ≥ 0.9: {'met' if ratio >= 0.9 else 'NOT met'})")
            if torch1:
                ratio = inr["img_per_s"] / torch1["img_per_s"]
                verdict = "met" if ratio >= 6 else "NOT met"
                checks.append(f"inr / torch 1 worker = {ratio:.2f} (target ≥ 6: {verdict})")
            if checks:
                lines += ["", "Targets: " + "; ".join(checks) + "."]
        lines.append("")
    lines.append(f"![training throughput]({png})")
    return "\n".join(lines)


def run_key(r: dict) -> str:
    if r["pipeline"] in ("torch", "dali") and r.get("workers") is not None:
        unit = "worker" if r["pipeline"] == "torch" else "thread"
        return f"{r['pipeline']} ({r['workers']} {unit}{'s' if r['workers'] != 1 else ''})"
    return r["pipeline"]


def summary_markdown(bundle: dict) -> str:
    """The headline of each experiment against its target, one bullet each; shortfalls stated as such."""
    env = bundle["env"]
    lines = [f"Measured {env.get('date_utc', '?')} UTC on {machine_line(env).split(';')[0]}; "
             f"bench_all took {bundle['seconds'].get('total', 0):.0f} s. Against the targets:", ""]
    rd = bundle.get("rd")
    if rd:
        ours = [p for p in rd["points"] if p["method"] == "inrfmt"]
        for p in ours:
            gain = p.get("psnr_gain_vs_jpeg_db")
            if gain is not None:
                verdict = f"{gain:+.2f} dB vs JPEG at equal bytes ({'met' if gain > 0 else 'NOT met'})"
            else:
                verdict = ("smaller than JPEG's smallest file (met)" if p.get("beats_jpeg")
                           else "larger than the JPEG sweep reaches: no comparison")
            lines.append(f"- Rate-distortion, {p['preset']} {p['variant']}: {p['bytes_per_image']:.0f} B/image, "
                         f"{p['psnr_mean']:.2f} dB — {verdict}.")
    acc = bundle.get("accuracy")
    if acc:
        drop = acc["accuracy_drop_points"]
        spread = ""
        if acc["recipe"]["repeats"] > 1:
            spread = (f"; run-to-run std {100 * acc['original']['test_accuracy_std']:.1f} / "
                      f"{100 * acc['inr']['test_accuracy_std']:.1f} points over {acc['recipe']['repeats']} runs each")
        lines.append(f"- Accuracy ({acc['dataset']}, {acc['train_images']} training / {acc['test_images']} test "
                     f"images): original {100 * acc['original']['test_accuracy']:.1f} %, decoded .inr "
                     f"{100 * acc['inr']['test_accuracy']:.1f} % at {acc['inr_file']['bytes_per_image']:.0f} B/image "
                     f"and {acc['inr_file']['psnr_mean']:.1f} dB — drop {drop:+.1f} points "
                     f"({'met' if drop <= 2 else 'NOT met'}: target ≤ 2{spread}).")
    rows = [r for r in bundle.get("train", []) if r.get("status") == "ok"]
    for key in sorted({(r["size"], r["model"], r.get("mode", "train")) for r in rows},
                      key=lambda k: (k[0], k[1], k[2] != "train")):
        size, model, mode = key
        ok = {run_key(r): r for r in rows if (r["size"], r["model"], r.get("mode", "train")) == key}
        inr, raw, t1 = ok.get("inr"), ok.get("gpu-raw"), ok.get("torch (1 worker)")
        if inr and raw and t1:
            a, b = inr["img_per_s"] / raw["img_per_s"], inr["img_per_s"] / t1["img_per_s"]
            dev = inr["env"].get("gpu") or inr["env"].get("device")
            what = f"{model} training" if mode == "train" else "input pipeline alone"
            line = (f"- Training speed, {what} ({size}x{size}, {dev}): inr {inr['img_per_s']:,.0f} img/s = "
                    f"{a:.2f} × gpu-raw, {b:.2f} × torch with 1 worker")
            if mode == "train":
                line += (f" (targets ≥ 0.9 × gpu-raw: {'met' if a >= 0.9 else 'NOT met'}; ≥ 6 × torch 1 worker: "
                         f"{'met' if b >= 6 else 'NOT met'})")
            lines.append(line + ".")
            if mode == "train" and dev == "cpu":
                lines.append("  On CPU the training step is bound by ResNet-18 itself (tens of img/s), so every "
                             "pipeline trains at the same rate up to the noise of this shared machine; the "
                             "targets are GPU targets, and the input-pipeline-alone rows compare the pipelines.")
    if bundle.get("failures"):
        lines.append(f"- {len(bundle['failures'])} tool run(s) failed: "
                     + "; ".join(f"`{f['command']}` (exit {f['exit']})" for f in bundle["failures"]) + ".")
    return "\n".join(lines)


def replace_block(text: str, tag: str, body: str, md: Path) -> str:
    begin, end = f"<!-- BEGIN {tag} -->", f"<!-- END {tag} -->"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise ToolError(f"{md}: no '{begin}' ... '{end}' markers to put the {tag} table between")
    return pattern.sub(lambda _: f"{begin}\n{body}\n{end}", text, count=1)


def render(bundle: dict, results: Path, md: Path | None) -> list[str]:
    """Plots from the bundle's results, and the plan's tables into `md`. Returns the tags rewritten."""
    import bench_train
    import rd_curve
    name = bundle["plan"]
    rel = os.path.relpath(results, md.parent if md else REPO)
    blocks = {}
    if "rd" in bundle:
        rd_curve.plot(bundle["rd"], results / "rd.png")
        blocks[f"{name}-rd"] = rd_markdown(bundle["rd"], bundle["commands"].get("rd", []), f"{rel}/rd.png")
    if "accuracy" in bundle:
        blocks[f"{name}-accuracy"] = accuracy_markdown(bundle["accuracy"], bundle["commands"].get("accuracy", []))
    if bundle.get("train"):
        bench_train.plot(bundle["train"], results / "train.png")
        blocks[f"{name}-train"] = train_markdown(bundle["train"], bundle["commands"].get("train", []),
                                                 f"{rel}/train.png")
    blocks[f"{name}-summary"] = summary_markdown(bundle)
    if md is not None and blocks:
        text = md.read_text()
        for tag, body in blocks.items():
            text = replace_block(text, tag, body, md)
        md.write_text(text)
    return list(blocks)


# ------------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="bench_all.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--cpu", action="store_true", help="the CPU-sized plan (make bench)")
    mode.add_argument("--cpu-extended", action="store_true",
                      help="longer CPU runs: the paper's CIFAR net in the R-D plot, accuracy on 2000/1000 "
                           "Fashion-MNIST images (~20 min on 1 core)")
    mode.add_argument("--gpu", action="store_true", help="the GPU-sized plan (needs CUDA)")
    mode.add_argument("--render", metavar="BUNDLE", help="rebuild plots and tables from a bench_all.json")
    p.add_argument("--results", help="output folder (default bench_results/<plan>)")
    p.add_argument("--md", default=str(REPO / "BENCHMARKS.md"), help="markdown file whose tables are rewritten")
    p.add_argument("--no-md", action="store_true", help="leave BENCHMARKS.md alone")
    p.add_argument("--only", default=",".join(EXPERIMENTS), help="comma-separated subset of rd,accuracy,train")
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed per tool run")
    p.add_argument("--pipelines", default=None,
                   help="comma-separated train runs to keep, as name or name:workers (e.g. gpu-raw,inr,torch:1)")
    p.add_argument("--dali-site", metavar="DIR",
                   help="a folder holding NVIDIA DALI (pip install --target DIR nvidia-dali-cuda120), put on "
                        "PYTHONPATH for the dali runs only")
    args = p.parse_args(argv)
    args.only = [x.strip() for x in args.only.split(",") if x.strip()]
    args.pipelines = [x.strip() for x in args.pipelines.split(",") if x.strip()] if args.pipelines else None
    bad = [x for x in args.only if x not in EXPERIMENTS]
    if bad or not args.only:
        raise ToolError(f"--only {','.join(bad) or '(empty)'}: choose from {', '.join(EXPERIMENTS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    md = None if args.no_md else Path(args.md)
    if md is not None and not md.is_file():
        raise ToolError(f"--md {md}: no such file")
    if args.render:
        bundle = read_json(args.render)
        if not isinstance(bundle, dict) or bundle.get("tool") != "bench_all":
            raise ToolError(f"{args.render}: not a bench_all.json bundle")
        results = Path(args.results).resolve() if args.results else Path(args.render).resolve().parent
        if results != Path(args.render).resolve().parent:  # keep the bundle beside the plots made from it
            write_json(results / "bench_all.json", bundle)
        tags = render(bundle, results, md)
        print(f"bench_all: rendered {', '.join(tags) or 'nothing'}", file=sys.stderr)
        return 0
    name = "cpu" if args.cpu else "cpu-extended" if args.cpu_extended else "gpu"
    if name == "gpu":
        import torch
        if not torch.cuda.is_available():
            raise ToolError("--gpu needs a CUDA device (torch.cuda.is_available() is False)")
    results = Path(args.results).resolve() if args.results else REPO / "bench_results" / name
    t0 = time.perf_counter()
    if args.dali_site and not Path(args.dali_site, "nvidia", "dali").is_dir():
        raise ToolError(f"--dali-site {args.dali_site}: no nvidia/dali package in it")
    previous = results / "bench_all.json"
    # Keep the experiments this run does not redo.
    old = read_json(previous) if previous.exists() and set(args.only) != set(EXPERIMENTS) else {}

    def save(bundle):
        for key in EXPERIMENTS:
            if key not in args.only and key in old:
                bundle[key] = old[key]
                bundle["commands"][key] = old.get("commands", {}).get(key, [])
        bundle["seconds"]["total"] = time.perf_counter() - t0
        write_json(previous, bundle)

    bundle = run_plan(name, results, args.only, args.timeout, args.dali_site, checkpoint=save,
                      pipelines=args.pipelines)
    save(bundle)
    tags = render(bundle, results, md)
    print(f"bench_all: {len(bundle['failures'])} failure(s); results in {results}; "
          f"rewrote {', '.join(tags) or 'no tables'} in {md or '(no markdown)'} "
          f"({bundle['seconds']['total']:.0f} s)", file=sys.stderr)
    return 1 if bundle["failures"] else 0


if __name__ == "__main__":
    run_main(lambda: sys.exit(main()), "bench_all.py")
