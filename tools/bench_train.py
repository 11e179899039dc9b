#!/usr/bin/env python3
"""Training throughput of one classifier fed by different input pipelines (the paper's Fig. 8).

    python tools/bench_train.py --pipeline inr|gpu-raw|torch|nvjpeg|dali [--data SRC] [--inr FILE]
        [--workers N] [--steps N] [--warmup N] [--batch-size B] [--size S] [--model resnet18|small]
        [--device auto|cpu|cuda] [--precision fp32|bf16] [--channels-last] [--out RESULTS.jsonl]
    python tools/bench_train.py --plot RESULTS.jsonl [...] --png OUT.png

Every pipeline feeds the same model with the same batch size, precision and augmentation — a random
crop of the image zero-padded by size/8 on each side (the CIFAR recipe), a horizontal flip with p=0.5, and
normalisation to [-1, 1] — so the only difference between runs is where and how images are decoded:

  inr      the .inr file in one device-resident bank, batches decoded by `ds.loader` with the crop and
           flip applied as coordinate transforms (inrfmt.augment) — no resample of a decoded image
  gpu-raw  all images as uint8 tensors already on the device: the upper bound for any pipeline
  torch    JPEG files (q90) decoded by Pillow in torch DataLoader workers (--workers), crop and flip in
           the workers, uint8 batches copied to the device (pinned memory on CUDA)
  nvjpeg   the JPEG bytes held in host memory, decoded in batches by torchvision.io.decode_jpeg on CUDA
  dali     an NVIDIA DALI pipeline reading the JPEG files (--workers = DALI threads); CPU-only operators
           (device_id=None) where there is no GPU, the "mixed" decoder on CUDA

Images are first brought to --size x --size (centre square crop, Lanczos) so every pipeline sees the same
pixels; the JPEG tree and the .inr file (when --inr is not given) are built once in --work and reused.
Throughput = images per second over --steps steps after --warmup steps, with the device synchronised at
both ends, measured in --repeats such windows and the best one reported (the median and every window are
in the JSON too); the epoch time is the images per epoch divided by that rate. One JSON line per run on stdout
(and appended to --out). A pipeline that cannot run here (no CUDA, torchvision or DALI missing) prints a
line with "status": "unavailable" and the reason, and exits 0.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's inrfmt, not an installed one

import numpy as np  # noqa: E402

from plot_util import (REPO, ToolError, environment, load_samples, pyplot, random_crop_flip,  # noqa: E402
                       resolve_device, run_main, save_figure, write_image_folder)

PIPELINES = ("inr", "gpu-raw", "torch", "nvjpeg", "dali")
MEAN, STD = 0.5, 0.5  # normalisation to [-1, 1], identical for every pipeline
JPEG_QUALITY = 90


class Unavailable(Exception):
    """This pipeline cannot run on this machine (reason in the message)."""


# --------------------------------------------------------------------------------------- augmentation
def to_model_input(uint8_batch, memory_format):
    """uint8 [B,3,H,W] -> normalised float32 on the same device."""
    x = uint8_batch.float().div_(255.0).sub_(MEAN).div_(STD)
    return x.contiguous(memory_format=memory_format)


# ------------------------------------------------------------------------------------------ pipelines
def gpu_raw_batches(samples, args, device):
    import torch
    data = torch.from_numpy(np.stack([img for _, img, _ in samples])).permute(0, 3, 1, 2).contiguous().to(device)
    labels = torch.tensor([max(lab, 0) for _, _, lab in samples], dtype=torch.int64, device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    pad = args.size // 8
    n = len(samples)
    while True:
        perm = torch.randperm(n, device=device, generator=gen)
        for start in range(0, n - args.batch_size + 1, args.batch_size):
            idx = perm[start:start + args.batch_size]
            yield random_crop_flip(data[idx], pad, gen), labels[idx]


class JpegFolderDataset:
    """JPEG files decoded by Pillow; random pad-and-crop + flip per image (in the DataLoader worker, drawn
    from torch's per-worker random stream)."""

    def __init__(self, paths, labels, size: int):
        self.paths, self.labels, self.size, self.pad = paths, labels, size, size // 8

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        import torch
        from PIL import Image
        with Image.open(self.paths[i]) as im:
            img = np.asarray(im.convert("RGB"))
        p, s = self.pad, self.size
        padded = np.zeros((s + 2 * p, s + 2 * p, 3), np.uint8)
        padded[p:p + img.shape[0], p:p + img.shape[1]] = img[:s, :s]
        oy, ox = torch.randint(0, 2 * p + 1, (2,)).tolist()
        flip = bool(torch.rand(()) < 0.5)
        crop = padded[oy:oy + s, ox:ox + s]
        if flip:
            crop = crop[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1))), self.labels[i]


def torch_batches(jpeg_paths, jpeg_labels, args, device):
    import torch
    ds = JpegFolderDataset(jpeg_paths, jpeg_labels, args.size)
    gen = torch.Generator().manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=args.workers,
        pin_memory=device.startswith("cuda"), persistent_workers=args.workers > 0, generator=gen,
        prefetch_factor=4 if args.workers > 0 else None)
    while True:
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def nvjpeg_batches(jpeg_paths, jpeg_labels, args, device):
    if not device.startswith("cuda"):
        raise Unavailable("nvjpeg needs a CUDA device (torchvision.io.decode_jpeg on cuda)")
    try:
        import torchvision.io  # only here: torchvision is not importable beside the CPU torch wheel
    except Exception as exc:  # ImportError, or a RuntimeError from a torch/torchvision version mismatch
        raise Unavailable(f"torchvision is not importable ({type(exc).__name__}: {exc})") from None
    import torch
    # the files' bytes in host memory (as the page cache would hold them); decoding is what is timed
    blobs = [torchvision.io.read_file(str(p)) for p in jpeg_paths]
    labels = torch.tensor(jpeg_labels, dtype=torch.int64, device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    cpu_gen = torch.Generator().manual_seed(args.seed)
    pad, n = args.size // 8, len(blobs)
    # torchvision's CUDA decode allocates its outputs on the current stream but writes them from its own
    # stream without waiting (pytorch/vision PR #9606): on the training stream it can be handed, and
    # overwrite, memory the queued training step still reads. Decoding on a side stream keeps its
    # allocations apart; record_stream keeps them from being reused while the training stream uses them.
    side = torch.cuda.Stream(device=device)
    main = torch.cuda.current_stream(device)

    def decode(idx):
        with torch.cuda.stream(side):
            images = torchvision.io.decode_jpeg([blobs[i] for i in idx], mode=torchvision.io.ImageReadMode.RGB,
                                                device=device)
        main.wait_stream(side)
        for image in images:
            image.record_stream(main)
        return images

    try:
        decode([0])  # nvJPEG initialisation fails here on a GPU it does not support: report, don't crash
    except RuntimeError as exc:
        raise Unavailable(f"nvjpeg: torchvision.io.decode_jpeg on {device} failed ({exc})") from None
    while True:
        perm = torch.randperm(n, generator=cpu_gen).tolist()
        for start in range(0, n - args.batch_size + 1, args.batch_size):
            idx = perm[start:start + args.batch_size]
            yield random_crop_flip(torch.stack(decode(idx)), pad, gen), labels[idx]


def dali_batches(jpeg_paths, jpeg_labels, args, device):
    try:
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator
    except Exception as exc:
        raise Unavailable(f"NVIDIA DALI is not installed (pip install nvidia-dali-cuda120): "
                          f"{type(exc).__name__}: {exc}") from None
    import torch
    on_gpu = device.startswith("cuda")
    s, pad = args.size, args.size // 8

    @pipeline_def(batch_size=args.batch_size, num_threads=max(args.workers, 1),
                  device_id=(torch.device(device).index or 0) if on_gpu else None, seed=args.seed)
    def pipe():
        jpegs, labels = fn.readers.file(files=[str(p) for p in jpeg_paths], labels=list(jpeg_labels),
                                        random_shuffle=True, name="Reader")
        images = fn.decoders.image(jpegs, device="mixed" if on_gpu else "cpu", output_type=types.RGB)
        # zero-pad by `pad` on every side (a centred window larger than the image), then a random crop
        images = fn.crop(images, crop=(s + 2 * pad, s + 2 * pad), crop_pos_x=0.5, crop_pos_y=0.5,
                         out_of_bounds_policy="pad", fill_values=0)
        images = fn.crop_mirror_normalize(
            images, crop=(s, s), crop_pos_x=fn.random.uniform(range=(0.0, 1.0)),
            crop_pos_y=fn.random.uniform(range=(0.0, 1.0)), mirror=fn.random.coin_flip(probability=0.5),
            dtype=types.FLOAT, output_layout="CHW", mean=[255 * MEAN] * 3, std=[255 * STD] * 3)
        return images, labels

    p = pipe()
    p.build()
    it = DALIGenericIterator([p], ["data", "label"], reader_name="Reader", auto_reset=True, last_batch_padded=False)
    while True:
        for out in it:
            x = out[0]["data"].to(device, non_blocking=True)
            y = out[0]["label"].reshape(-1).long().to(device, non_blocking=True)
            yield x, y


def inr_batches(ds, args):
    import torch

    from inrfmt import augment as A
    # Resize first: a coordinate map, the identity when the file holds size x size images (a --inr file
    # of another size is brought to the same input as the other pipelines)
    aug = A.Compose([A.Resize((args.size, args.size)), A.RandomCrop(args.size, padding=args.size // 8),
                     A.RandomHorizontalFlip(0.5), A.Normalize([MEAN] * 3, [STD] * 3)])
    if len(ds) < args.batch_size:
        raise ToolError(f"{ds.file.path}: {len(ds)} images, fewer than --batch-size {args.batch_size}")
    extra = {"reuse_buffer": True} if args.reuse_buffer else {}
    loader = ds.loader(args.batch_size, shuffle=True, drop_last=True, seed=args.seed, augment=aug,
                       dtype=torch.float32, channels_last=args.channels_last, **extra)
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        for x, y in loader:
            yield x, y
        epoch += 1


# ------------------------------------------------------------------------------------------- data prep
def prepare_samples(args):
    """The benchmark's images at --size; a source smaller than --min-images is cycled (exact copies: the
    cost of decoding an image does not depend on which image it is) so that an epoch holds several batches."""
    samples, classes, skipped = load_samples(args.data, max_images=args.max_images, square=args.size)
    unique = len(samples)
    want = args.min_images if args.min_images is not None else 4 * args.batch_size
    if len(samples) < want:
        samples = [samples[i % unique] for i in range(want)]
    return samples, classes, unique


def cache_tag(args, samples) -> str:
    """Names the cached JPEG tree / .inr file after what they hold: source, image count and size."""
    import hashlib
    what = f"{Path(args.data).resolve()}|{args.max_images}|{len(samples)}|{args.size}"
    return f"{args.size}px-{len(samples)}-{hashlib.sha1(what.encode()).hexdigest()[:10]}"


def jpeg_tree(samples, classes, args) -> tuple[list[Path], list[int]]:
    """The images as JPEG q90 files (ImageFolder) in the work dir, built once and reused."""
    root = Path(args.work) / f"jpeg-q{JPEG_QUALITY}-{cache_tag(args, samples)}"
    done = root / ".complete"
    if not done.exists():
        write_image_folder(samples, classes, root, fmt="jpeg", quality=JPEG_QUALITY)
        done.write_text("ok\n")
    paths = sorted(p for p in root.rglob("*.jpg"))
    labels = []
    names = sorted(d.name for d in root.iterdir() if d.is_dir())
    for p in paths:
        labels.append(names.index(p.parent.name) if p.parent != root else 0)
    return paths, labels


def inr_file(samples, classes, args) -> Path:
    """The images encoded once into the work dir (preset --preset, --encode-steps), unless --inr is given."""
    if args.inr:
        if not Path(args.inr).is_file():
            raise ToolError(f"--inr {args.inr}: no such file")
        return Path(args.inr)
    import inrfmt
    root = Path(args.work)
    tag = cache_tag(args, samples)
    out = root / f"{args.preset}-s{args.encode_steps}-{tag}.inr"
    if not out.exists():
        png = root / f"png-{tag}"
        if not (png / ".complete").exists():
            write_image_folder(samples, classes, png, fmt="png")
            (png / ".complete").write_text("ok\n")
        inrfmt.convert(str(png), str(out), preset=args.preset, steps=args.encode_steps, device=args.device_resolved,
                       progress=False, overwrite=True)
    return out


# ------------------------------------------------------------------------------------------------ run
def run(args) -> dict:
    import torch

    from resnet import build_model
    device = args.device_resolved = resolve_device(args.device)
    torch.manual_seed(args.seed)
    result = {"tool": "bench_train", "pipeline": args.pipeline, "model": args.model, "size": args.size,
              "reuse_buffer": args.reuse_buffer if args.pipeline == "inr" else None,
              "batch_size": args.batch_size, "precision": args.precision, "channels_last": args.channels_last,
              "workers": args.workers if args.pipeline in ("torch", "dali") else None,
              "steps": args.steps, "repeats": args.repeats, "warmup": args.warmup,
              "mode": "data-only" if args.data_only else "train",
              "data": str(args.inr if args.pipeline == "inr" and args.inr else args.data),
              "env": environment(device)}
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.pipeline == "inr" and args.inr:  # the file is the dataset: nothing to read from --data
        samples, classes, unique = [], [], None
    else:
        samples, classes, unique = prepare_samples(args)
    n_images = len(samples)
    try:
        if args.pipeline == "gpu-raw":
            batches = gpu_raw_batches(samples, args, device)
        elif args.pipeline == "inr":
            import inrfmt
            path = inr_file(samples, classes, args)
            ds = inrfmt.open(str(path), device=device)
            n_images = len(ds)  # with --inr, an epoch is the file's images
            unique = unique or len(ds)
            if not samples:  # class count from the file: its names, or its largest label
                classes = [str(k) for k in range(max(len(ds.classes), int(ds.labels.max()) + 1 if len(ds) else 0))]
            result["inr_file"] = str(path)
            result["inr_bytes_per_image"] = path.stat().st_size / n_images
            result["inr_load_seconds"] = ds.stats().get("load_seconds")
            batches = inr_batches(ds, args)
        else:
            paths, labels = jpeg_tree(samples, classes, args)
            result["jpeg_quality"] = JPEG_QUALITY
            result["jpeg_bytes_per_image"] = sum(p.stat().st_size for p in paths) / len(paths)
            if args.pipeline == "dali":
                try:
                    import nvidia.dali
                    result["dali_version"] = nvidia.dali.__version__
                except ImportError:
                    pass  # reported as unavailable just below
            make = {"torch": torch_batches, "nvjpeg": nvjpeg_batches, "dali": dali_batches}[args.pipeline]
            batches = make(paths, labels, args, device)
        first = next(batches)  # builds the pipeline (workers, DALI, bank upload): not timed
    except Unavailable as exc:
        result.update(status="unavailable", reason=str(exc))
        return result

    result["unique_images"] = unique
    max_label = max((lab for _, _, lab in samples), default=len(classes) - 1)
    num_classes = max(len(classes), max_label + 1, 2)
    model = build_model(args.model, num_classes, args.size).to(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    autocast_dtype = torch.bfloat16 if args.precision == "bf16" else None
    dev_type = torch.device(device).type

    def sync():
        if dev_type == "cuda":
            torch.cuda.synchronize(device)

    def step(x, y):
        y = y.clamp_min(0)  # unlabelled images (-1) train as class 0: only the speed is measured
        if x.dtype == torch.uint8:
            x = to_model_input(x, memory_format)
        elif args.channels_last:
            x = x.contiguous(memory_format=memory_format)
        with torch.autocast(dev_type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext():
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    def data_only(x, y):
        if x.dtype == torch.uint8:
            x = to_model_input(x, memory_format)
        return x

    work = data_only if args.data_only else step
    if not args.data_only:
        model.train()
    batch = first
    # The torch DataLoader's workers hold workers x prefetch_factor (4) batches ready: use those up before
    # timing, or the timed windows measure that stock instead of what the workers sustain.
    warmup = args.warmup + (args.workers * 4 if args.pipeline == "torch" else 0)
    result["warmup"] = warmup
    for _ in range(warmup):
        work(*batch)
        batch = next(batches)
    # --repeats timing windows of --steps steps each; the best window is reported (as timeit does), since
    # on a shared machine other load only ever slows a window down
    windows, loss = [], None
    for _ in range(args.repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            out = work(*batch)
            if not args.data_only:
                loss = out
            batch = next(batches)
        sync()
        windows.append(time.perf_counter() - t0)
    rates = [args.steps * args.batch_size / w for w in windows]
    img_per_s = max(rates)
    final_loss = float(loss.item()) if loss is not None else None
    if final_loss is not None and not math.isfinite(final_loss):
        raise ToolError(f"training loss became {final_loss} (lower --lr)")
    result.update(status="ok", images=n_images, seconds=min(windows), img_per_s=img_per_s,
                  img_per_s_median=float(np.median(rates)), img_per_s_windows=rates,
                  epoch_seconds=n_images / img_per_s, final_loss=final_loss)
    return result


# ------------------------------------------------------------------------------------------------ plot
def read_lines(paths) -> list[dict]:
    rows = []
    for path in paths:
        for k, line in enumerate(Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise ToolError(f"{path}:{k}: not a JSON line") from None
            if not isinstance(row, dict) or row.get("tool") != "bench_train":
                raise ToolError(f"{path}:{k}: not a bench_train result line")
            rows.append(row)
    return rows


def run_label(row: dict) -> str:
    label = row["pipeline"]
    if row.get("workers") is not None:
        unit = "worker" if row["pipeline"] == "torch" else "thread"
        label += f" ({row['workers']} {unit}{'s' * (row['workers'] != 1)})"
    return label


def plot(rows: list[dict], png: Path) -> Path:
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        raise ToolError("no successful runs to plot")
    plt = pyplot()
    groups = sorted({(r["model"], r["size"], r["batch_size"], r.get("mode", "train"), r["env"].get("gpu") or
                      r["env"].get("device")) for r in ok})
    fig, axes = plt.subplots(len(groups), 1, figsize=(7, 1.2 + 0.45 * max(len(ok), 2)), squeeze=False)
    for ax, (model, size, bs, mode, dev) in zip(axes[:, 0], groups):
        sel = [r for r in ok if (r["model"], r["size"], r["batch_size"], r.get("mode", "train"),
                                 r["env"].get("gpu") or r["env"].get("device")) == (model, size, bs, mode, dev)]
        labels = [run_label(r) for r in sel]
        values = [r["img_per_s"] for r in sel]
        palette = {"inr": "tab:red", "gpu-raw": "tab:gray", "torch": "tab:blue", "nvjpeg": "tab:green",
                   "dali": "tab:olive"}
        colors = [palette.get(r["pipeline"], "tab:blue") for r in sel]
        bars = ax.barh(labels, values, color=colors)
        ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], padding=3, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("images / s")
        what = f"{model} training step" if mode == "train" else "input pipeline alone (no model)"
        ax.set_title(f"{what}, {size}x{size}, batch {bs}, on {dev}", fontsize=9)
        ax.set_xlim(0, max(values) * 1.25)
    missing = sorted({f"{r['pipeline']}: {r.get('reason', 'unavailable')}" for r in rows if r.get("status") != "ok"})
    if missing:
        fig.text(0.01, 0.0, "not measured here — " + "; ".join(missing), fontsize=6, va="top", wrap=True)
    fig.tight_layout()
    return save_figure(fig, png)


# ------------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="bench_train.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", choices=PIPELINES)
    p.add_argument("--data", default=str(REPO / "data" / "sample"),
                   help="image source (any kind inrfmt convert reads; default: the bundled sample)")
    p.add_argument("--inr", help="an .inr file of the same images for --pipeline inr (default: encode --data)")
    p.add_argument("--work", default=str(REPO / "bench_out" / "train"), help="cache for the JPEG tree and .inr file")
    p.add_argument("--max-images", type=int, default=None, help="read at most N images of --data")
    p.add_argument("--min-images", type=int, default=None,
                   help="cycle the images up to N (default 4 x batch size) when --data holds fewer")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers (torch) / DALI threads (dali)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="timing windows of --steps steps; the best is reported")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--model", choices=("resnet18", "small"), default="resnet18")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reuse-buffer", action="store_true",
                   help="inr: decode every batch into one preallocated buffer (InrLoader reuse_buffer=True)")
    p.add_argument("--data-only", action="store_true", help="time the pipeline alone (no model): its own ceiling")
    p.add_argument("--preset", default="fast", help="preset used to encode --data when --inr is not given")
    p.add_argument("--encode-steps", type=int, default=None, help="convert --steps for that encode")
    p.add_argument("--out", help="append the JSON line to this file")
    p.add_argument("--plot", nargs="+", metavar="JSONL", help="plot the lines of these files instead of running")
    p.add_argument("--png", help="output PNG for --plot")
    args = p.parse_args(argv)
    if args.plot:
        if not args.png:
            raise ToolError("--plot needs --png OUT.png")
        return args
    if not args.pipeline:
        raise ToolError("--pipeline is required (one of: " + ", ".join(PIPELINES) + ")")
    for name in ("steps", "batch_size", "size", "repeats"):
        if getattr(args, name) < 1:
            raise ToolError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or args.workers < 0:
        raise ToolError("--warmup and --workers must be >= 0")
    if args.size < 8:
        raise ToolError(f"--size must be >= 8, got {args.size}")
    if args.min_images is not None and args.min_images < args.batch_size:
        raise ToolError(f"--min-images {args.min_images} must be >= --batch-size {args.batch_size}")
    if args.max_images is not None and args.max_images < 1:
        raise ToolError(f"--max-images must be >= 1, got {args.max_images}")
    if not Path(args.data).exists():
        raise ToolError(f"--data {args.data}: no such file or directory")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.plot:
        png = plot(read_lines(args.plot), Path(args.png))
        print(f"wrote {png}")
        return
    result = run(args)
    line = json.dumps(result)
    print(line, flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    run_main(main, "bench_train.py")
