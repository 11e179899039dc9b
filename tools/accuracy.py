#!/usr/bin/env python3
"""Test accuracy of a classifier trained on the original images vs on images decoded from .inr (Fig. 7).

    python tools/accuracy.py [--data SRC | --train SRC --test SRC | --fashion-mnist [DIR] | --cifar10 DIR]
        [--max-train N] [--max-test N] [--preset P] [--steps N] [--bits B] [--model small|resnet18] [--epochs E]
        [--batch-size B] [--repeats R] [--out result.json]

One classifier, one recipe, two training sets: (a) the original training images, (b) the same images
encoded into one .inr file by `inrfmt.convert` and decoded back. Both models are evaluated on the same
*original* test images, so the drop measures what training on the compressed dataset costs. Everything
else is held equal: initialisation, batch order and augmentation draws come from the same seeds, and the
same normalisation (mean/std of the original training images) is applied to both. Augmentation: random
crop with zero padding of size/8 and horizontal flip (--no-augment turns it off).

Data (labelled; the split is deterministic):
  --data SRC            one source (ImageFolder, CIFAR pickle, .npz, ...), split by --test-fraction
  --train SRC --test SRC
  --fashion-mnist [DIR] the IDX files of Fashion-MNIST (Debian package dataset-fashion-mnist installs them
                        in /usr/share/datasets/fashion-mnist): 60k train / 10k test
  --cifar10 DIR         cifar-10-batches-py: data_batch_* train, test_batch test
--max-train / --max-test take a seeded random subset. Default: the bundled sample (data/sample).
The training images go to the encoder as an .npz in --work, exactly the pixels the original run sees.
Prints and writes (--out) one JSON document.
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's inrfmt, not an installed one

import numpy as np  # noqa: E402

from plot_util import (REPO, ToolError, center_square, environment, load_samples, psnr_uint8,  # noqa: E402
                       random_crop_flip, resolve_device, run_main, summarize, write_json)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]


# ------------------------------------------------------------------------------------------------ data
class Split:
    """Images (uint8 [N,H,W,3]), labels (int64 [N]) and class names of one side of the experiment."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: list[str], origin: str):
        self.images, self.labels, self.classes, self.origin = images, labels, classes, origin

    def __len__(self):
        return len(self.labels)

    def subset(self, idx) -> "Split":
        return Split(self.images[idx], self.labels[idx], self.classes, self.origin)


def read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX file (gzip or plain) of uint8 data; its dimensions from the header."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or struct.unpack(">I", head)[0] != magic:
                raise ToolError(f"{path}: not an IDX file with magic {magic} (got {head.hex() or 'nothing'})")
            ndim = magic & 0xFF
            dims = struct.unpack(f">{ndim}I", f.read(4 * ndim))
            data = np.frombuffer(f.read(), dtype=np.uint8)
    except (OSError, EOFError, struct.error) as exc:
        raise ToolError(f"{path}: cannot read IDX data ({exc})") from None
    if data.size != int(np.prod(dims)):
        raise ToolError(f"{path}: header says {dims} = {int(np.prod(dims))} values, file holds {data.size}")
    return data.reshape(dims)


def fashion_mnist(folder: Path) -> tuple[Split, Split]:
    def find(stem):
        for name in (f"{stem}.gz", stem):
            if (folder / name).is_file():
                return folder / name
        raise ToolError(f"{folder}: no {stem}[.gz] (install the Debian package dataset-fashion-mnist, "
                        f"or pass the folder holding the IDX files)")

    splits = []
    for prefix in ("train", "t10k"):
        images = read_idx(find(f"{prefix}-images-idx3-ubyte"), 2051)
        labels = read_idx(find(f"{prefix}-labels-idx1-ubyte"), 2049).astype(np.int64)
        if len(images) != len(labels):
            raise ToolError(f"{folder}: {prefix} has {len(images)} images but {len(labels)} labels")
        rgb = np.repeat(images[..., None], 3, axis=3)
        splits.append(Split(rgb, labels, FASHION_MNIST_CLASSES, f"fashion-mnist:{prefix}"))
    return splits[0], splits[1]


def from_source(src, size: int | None) -> Split:
    samples, classes, skipped = load_samples(src, square=size)
    if skipped:
        print(f"accuracy.py: {src}: skipped {skipped} unreadable images", file=sys.stderr)
    shapes = {img.shape for _, img, _ in samples}
    if len(shapes) != 1:
        raise ToolError(f"{src}: images of {len(shapes)} different sizes; pass --size S to bring them to SxS")
    labels = np.array([lab for _, _, lab in samples], dtype=np.int64)
    if (labels < 0).any():
        raise ToolError(f"{src}: {int((labels < 0).sum())} images have no label (needs class folders or labels)")
    return Split(np.stack([img for _, img, _ in samples]), labels, classes, str(src))


def stratified_split(data: Split, test_fraction: float, seed: int) -> tuple[Split, Split]:
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for label in np.unique(data.labels):
        idx = np.flatnonzero(data.labels == label)
        rng.shuffle(idx)
        k = int(round(len(idx) * test_fraction))
        test_idx.extend(idx[:k])
        train_idx.extend(idx[k:])
    return data.subset(np.sort(train_idx)), data.subset(np.sort(test_idx))


def limit(split: Split, n: int | None, seed: int) -> Split:
    if n is None or n >= len(split):
        return split
    idx = np.sort(np.random.default_rng(seed).permutation(len(split))[:n])
    return split.subset(idx)


def resize_split(split: Split, size: int | None) -> Split:
    if size is None or split.images.shape[1:3] == (size, size):
        return split
    return Split(np.stack([center_square(img, size) for img in split.images]), split.labels, split.classes,
                 split.origin)


def load_data(args) -> tuple[Split, Split, str]:
    if args.fashion_mnist is not None:
        train, test = fashion_mnist(Path(args.fashion_mnist))
        name = "fashion-mnist"
    elif args.cifar10:
        folder = Path(args.cifar10)
        if not (folder / "test_batch").is_file():
            raise ToolError(f"--cifar10 {folder}: no test_batch file (expected the cifar-10-batches-py folder)")
        train, test = from_source(folder, args.size), from_source([folder / "test_batch"], args.size)
        name = "cifar10"
    elif args.train or args.test:
        if not (args.train and args.test):
            raise ToolError("--train and --test go together")
        train, test = from_source(args.train, args.size), from_source(args.test, args.size)
        name = f"{Path(args.train).name}/{Path(args.test).name}"
    else:
        data = from_source(args.data, args.size)
        train, test = stratified_split(data, args.test_fraction, args.seed)
        name = f"{Path(args.data).name} (split {1 - args.test_fraction:.0%}/{args.test_fraction:.0%})"
    train = resize_split(limit(train, args.max_train, args.seed), args.size)
    test = resize_split(limit(test, args.max_test, args.seed + 1), args.size)
    if train.images.shape[1:] != test.images.shape[1:]:
        raise ToolError(f"train images are {train.images.shape[1:3]}, test images {test.images.shape[1:3]}: "
                        f"pass --size S")
    if len(train) < 2 or len(test) < 1:
        raise ToolError(f"need at least 2 training and 1 test image, got {len(train)} and {len(test)}")
    return train, test, name


# --------------------------------------------------------------------------------------------- encoding
def encode_train(train: Split, args, work: Path) -> tuple[Path, dict, float]:
    """train -> .npz (exact pixels) -> convert -> .inr. Returns (path, convert summary, seconds)."""
    import inrfmt
    if args.inr:
        path = Path(args.inr)
        if not path.is_file():
            raise ToolError(f"--inr {path}: no such file")
        return path, {}, 0.0
    work.mkdir(parents=True, exist_ok=True)
    npz = work / "train.npz"
    arrays = {"images": train.images, "labels": train.labels}
    if train.classes:
        arrays["classes"] = np.array(train.classes, dtype=str)
    np.savez(npz, **arrays)
    out = work / "train.inr"
    t0 = time.perf_counter()
    from inrfmt.presets import get_preset
    if get_preset(args.preset).code_bits is not None:  # format 2: code widths instead of pruning and int8
        options = {} if args.bits is None else {"bits": args.bits}
    else:
        options = {"prune": args.prune, "quant": args.quant}
    summary = inrfmt.convert(str(npz), str(out), preset=args.preset, steps=args.steps, device=args.device_resolved,
                             seed=args.seed, overwrite=True, progress=False, **options)
    return out, summary, time.perf_counter() - t0


def decode_all(path: Path, n: int, size: tuple[int, int], device: str):
    """Every image of the file decoded at `size`: float32 [N,3,h,w] in [0,1] on the CPU."""
    import torch

    import inrfmt
    ds = inrfmt.open(str(path), device=device)
    if len(ds) != n:
        raise ToolError(f"{path}: {len(ds)} images, expected {n} (the encoder skipped some)")
    out = torch.empty((n, 3) + tuple(size), dtype=torch.float32)
    batch = max(1, 2_000_000 // (size[0] * size[1]))
    with torch.no_grad():
        for start in range(0, n, batch):
            idx = list(range(start, min(n, start + batch)))
            out[start:start + len(idx)] = ds.decode(idx, size=size).float().cpu()
    labels = ds.labels.cpu().numpy()
    return out, labels


# --------------------------------------------------------------------------------------------- training
def to_float(images_uint8: np.ndarray):
    import torch
    return torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float().div_(255.0)


def train_and_test(train_x, train_y, test_x, test_y, mean, std, num_classes: int, args, seed: int) -> dict:
    """One run of the recipe: the same seed gives the same init, batch order and augmentation draws."""
    import torch

    from resnet import build_model
    device = args.device_resolved
    torch.manual_seed(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    model = build_model(args.model, num_classes, train_x.shape[-1]).to(device)
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    x_all, y_all = train_x.to(device), torch.as_tensor(train_y, device=device)
    n = len(y_all)
    batch = min(args.batch_size, n)
    steps_per_epoch = max(1, n // batch)
    total = steps_per_epoch * args.epochs
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total, pct_start=0.15)
    loss_fn = torch.nn.CrossEntropyLoss()
    pad = max(1, train_x.shape[-1] // 8)
    t0 = time.perf_counter()
    model.train()
    loss = None
    for _ in range(args.epochs):
        perm = torch.randperm(n, device=device, generator=gen)
        for s in range(steps_per_epoch):
            idx = perm[s * batch:(s + 1) * batch]
            x = x_all[idx]
            if args.augment:
                x = random_crop_flip(x, pad, gen)
            loss = loss_fn(model((x - mean_t) / std_t), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    train_seconds = time.perf_counter() - t0
    final_loss = float(loss.item())
    if not math.isfinite(final_loss):
        raise ToolError(f"training diverged (loss {final_loss}); lower --lr")
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(test_y), 512):
            x = test_x[start:start + 512].to(device)
            pred = model((x - mean_t) / std_t).argmax(1).cpu()
            correct += int((pred == torch.as_tensor(test_y[start:start + 512])).sum())
    return {"test_accuracy": correct / len(test_y), "final_train_loss": final_loss, "train_seconds": train_seconds}


def aggregate(runs: list[dict]) -> dict:
    accs = [r["test_accuracy"] for r in runs]
    return {"test_accuracy": float(np.mean(accs)),
            "test_accuracy_std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
            "runs": runs}


# ------------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="accuracy.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("data")
    src.add_argument("--data", default=str(REPO / "data" / "sample"))
    src.add_argument("--train")
    src.add_argument("--test")
    src.add_argument("--fashion-mnist", nargs="?", const=str(FASHION_MNIST_DIR), default=None, metavar="DIR")
    src.add_argument("--cifar10", metavar="DIR")
    src.add_argument("--test-fraction", type=float, default=0.25)
    src.add_argument("--max-train", type=int)
    src.add_argument("--max-test", type=int)
    src.add_argument("--size", type=int, help="centre-crop and resize every image to SxS")
    enc = p.add_argument_group("encoding")
    enc.add_argument("--preset", default="fast")
    enc.add_argument("--steps", type=int, help="convert --steps (default: the preset's)")
    enc.add_argument("--no-prune", dest="prune", action="store_false")
    enc.add_argument("--quant", type=int, choices=(8, 16, 32), default=8, help="format-1 presets: hidden bits")
    enc.add_argument("--bits", type=int, help="coded presets (small, large): hidden_w's code width")
    enc.add_argument("--inr", help="use this .inr file of the training images instead of encoding them")
    rec = p.add_argument_group("recipe")
    rec.add_argument("--model", choices=("small", "resnet18"), default="small")
    rec.add_argument("--epochs", type=int, default=10)
    rec.add_argument("--batch-size", type=int, default=64)
    rec.add_argument("--lr", type=float, default=0.05)
    rec.add_argument("--no-augment", dest="augment", action="store_false")
    rec.add_argument("--repeats", type=int, default=1, help="train R times per side (seeds seed..seed+R-1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--work", default=str(REPO / "bench_out" / "accuracy"))
    p.add_argument("--out", help="write the JSON here too")
    args = p.parse_args(argv)
    if not 0.0 < args.test_fraction < 1.0:
        raise ToolError(f"--test-fraction must be in (0, 1), got {args.test_fraction}")
    for name in ("epochs", "batch_size", "repeats"):
        if getattr(args, name) < 1:
            raise ToolError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("max_train", "max_test", "steps", "size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ToolError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not args.lr > 0:
        raise ToolError(f"--lr must be > 0, got {args.lr}")
    if args.size is not None and args.size < 8:
        raise ToolError(f"--size must be >= 8, got {args.size}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.device_resolved = resolve_device(args.device)
    train, test, name = load_data(args)
    num_classes = max(len(train.classes), int(train.labels.max()) + 1, int(test.labels.max()) + 1)
    h, w = train.images.shape[1:3]
    print(f"accuracy.py: {name}: {len(train)} train / {len(test)} test images of {w}x{h}, {num_classes} classes",
          file=sys.stderr)

    inr_path, summary, encode_seconds = encode_train(train, args, Path(args.work))
    inr_x, inr_labels = decode_all(inr_path, len(train), (h, w), args.device_resolved)
    if not np.array_equal(inr_labels, train.labels):
        raise ToolError(f"{inr_path}: labels differ from the training images' (not an encoding of this split)")
    orig_x = to_float(train.images)
    test_x = to_float(test.images)
    import torch
    inr_uint8 = (inr_x.clamp(0, 1) * 255.0).round().to(torch.uint8)  # what an exported image would hold
    psnrs = [psnr_uint8(inr_uint8[i].permute(1, 2, 0).numpy(), train.images[i]) for i in range(len(train))]
    mean = orig_x.mean(dim=(0, 2, 3)).tolist()
    std = orig_x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()

    runs = {"original": [], "inr": []}
    for r in range(args.repeats):
        for side, x in (("original", orig_x), ("inr", inr_x)):
            result = train_and_test(x, train.labels, test_x, test.labels, mean, std, num_classes, args,
                                    seed=args.seed + r)
            runs[side].append(result)
            print(f"accuracy.py: run {r + 1}/{args.repeats} {side}: test accuracy {result['test_accuracy']:.4f} "
                  f"({result['train_seconds']:.1f} s)", file=sys.stderr)

    from inrfmt.reader import InrFile
    with InrFile(str(inr_path)) as f:
        file_bytes = f.file_bytes
        index_psnr = summarize(np.asarray(f.index["psnr"], dtype=np.float64))
        prune_ratio = float(np.mean(f.index["prune_ratio"]))
        arch = f"{f.arch.sine_layers}x{f.arch.width}"
        hidden_dtype = f.hidden_dtype
    # grayscale data (e.g. Fashion-MNIST) stored as RGB: its raw size is h*w, which the report must say
    rgb = train.images
    gray = bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
    original = aggregate(runs["original"])
    inr = aggregate(runs["inr"])
    psnr = summarize(psnrs)
    from inrfmt.presets import get_preset
    coded = not args.inr and get_preset(args.preset).code_bits is not None  # format 2: widths, not prune/quant
    result = {
        "tool": "accuracy", "dataset": name, "train_images": len(train), "test_images": len(test),
        "image_size": [int(h), int(w)], "num_classes": num_classes,
        "recipe": {"model": args.model, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                   "optimizer": "SGD nesterov 0.9, wd 5e-4, one-cycle", "augment": args.augment,
                   "repeats": args.repeats, "seed": args.seed, "test_images": "original"},
        "original": original, "inr": inr,
        "accuracy_drop_points": 100.0 * (original["test_accuracy"] - inr["test_accuracy"]),
        "inr_file": {"path": str(inr_path), "preset": args.preset if not args.inr else None, "steps": args.steps,
                     **({"bits": args.bits} if coded else {"prune": args.prune, "quant": args.quant}),
                     "arch": arch, "hidden_dtype": str(hidden_dtype),
                     "file_bytes": int(file_bytes), "bytes_per_image": file_bytes / len(train),
                     "psnr_mean": psnr["mean"], "psnr_p10": psnr["p10"], "psnr_min": psnr["min"],
                     "psnr_index_mean": index_psnr["mean"], "prune_ratio_mean": prune_ratio,
                     "encode_seconds": encode_seconds, "img_steps_per_s": summary.get("img_steps_per_s")},
        "raw_bytes_per_image": int(h * w * 3),
        "grayscale": gray, "raw_gray_bytes_per_image": int(h * w) if gray else None,
        "device": args.device_resolved, "env": environment(args.device_resolved),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    run_main(main, "accuracy.py")
