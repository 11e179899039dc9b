#!/usr/bin/env python3
"""Rate-distortion of inrfmt against JPEG, WebP and AVIF on a folder of images (the paper's Fig. 3/6).

    python tools/rd_curve.py IMAGES_DIR [--out DIR] [--presets fast rapid-inr-cifar10 small ...] [--steps N]
        [--max-images N] [--square S [--crops K]] [--variants prune-int8 noprune-int8 prune-fp16 noprune-fp16]
        [--bits 3 4 5 hidden_w=4,last_w=6 ...]

For every format-1 preset and variant (pruning on/off via convert's `prune`, hidden weights int8 or fp16
via `quant`), and for every coded preset (small, large: format 2) and code-width setting of --bits (each
as convert's `bits`; none given: the preset's own widths), the images are encoded into one .inr file; for
every codec and quality each image is encoded alone with Pillow. Each point is (mean bytes per image, mean
PSNR):

* bytes per image — ours: the whole .inr file's bytes / images, header, index and class names included;
  codecs: the whole encoded file (headers and tables included, as a folder of .jpg files stores them).
* PSNR — on 0..255 RGB per image (every pixel and channel), then averaged over images. Our images are
  decoded at their original size and rounded to uint8, exactly what `inrfmt export` would write.

All methods see the same pixels: the images are read once through inrfmt's source reader (optionally
centre-cropped and resized to --square S), written as lossless PNG, and that PNG tree is what convert
encodes and what every codec and PSNR is measured against. Writes rd.json and rd.png into --out. The
JSON also gives, for each of our points, JPEG's PSNR at equal bytes per image (interpolated on the JPEG
quality sweep), so "higher PSNR than JPEG at equal size" is read off directly, and for each codec the
bytes it needs for our PSNR (interpolated on its sweep) and our bytes over them ("bytes_ratio_vs_webp" < 1:
smaller than WebP at equal PSNR).
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's inrfmt, not an installed one

import numpy as np  # noqa: E402

from inrfmt.spec import param_groups  # noqa: E402

from plot_util import (REPO, ToolError, environment, load_samples, psnr_uint8, pyplot, resolve_device,  # noqa: E402
                       run_main, save_figure, summarize, write_image_folder, write_json)

VARIANTS = {  # name -> convert(prune=..., quant=..., float_dtype=...); None: convert's default
    "prune-int8": (True, 8, None),
    "noprune-int8": (False, 8, None),
    "prune-fp16": (True, 16, None),
    "noprune-fp16": (False, 16, None),
    # first/last layers, biases and scales in float16 too: only where convert has a float_dtype option
    "prune-int8-f16": (True, 8, "float16"),
}
DEFAULT_VARIANTS = ("prune-int8", "noprune-int8", "prune-fp16", "noprune-fp16")
DEFAULT_JPEG_QUALITIES = (1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 98, 100)
DEFAULT_WEBP_QUALITIES = (1, 10, 30, 50, 70, 90)
DEFAULT_AVIF_QUALITIES = (10, 30, 50, 70, 90)


# ---------------------------------------------------------------------------------------------- codecs
def codec_available(codec: str) -> tuple[bool, str]:
    from PIL import features
    if codec == "jpeg":
        return True, f"libjpeg {features.version('jpg')}"
    name = {"webp": "webp", "avif": "avif"}[codec]
    try:
        ok = bool(features.check(name))
    except ValueError:  # a Pillow too old to know the feature
        ok = False
    if not ok:
        return False, f"Pillow on this machine has no {codec.upper()} support"
    return True, f"lib{codec} {features.version(name)}"


def codec_point(samples, codec: str, quality: int) -> dict:
    """Encode every image alone with Pillow at `quality`; mean whole-file bytes and PSNR."""
    from PIL import Image
    fmt = {"jpeg": "JPEG", "webp": "WEBP", "avif": "AVIF"}[codec]
    sizes, psnrs, pixels = [], [], 0
    t0 = time.perf_counter()
    for _, image, _ in samples:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format=fmt, quality=quality)
        sizes.append(buf.tell())
        buf.seek(0)
        with Image.open(buf) as im:
            decoded = np.asarray(im.convert("RGB"))
        psnrs.append(psnr_uint8(decoded, image))
        pixels += image.shape[0] * image.shape[1]
    seconds = time.perf_counter() - t0
    stats = summarize(psnrs)
    return {"method": codec, "quality": quality, "bytes_per_image": float(np.mean(sizes)),
            "bits_per_pixel": 8.0 * sum(sizes) / pixels, "psnr_mean": stats["mean"], "psnr_p10": stats["p10"],
            "psnr_min": stats["min"], "images": len(samples), "seconds": seconds}


def random_crops(samples, per_image: int, side: int, seed: int):
    """`per_image` random square crops of each image (side uniform in [side, min(h, w)], Lanczos-resized
    to side x side): many small natural images from a few photos, as CIFAR-like test material."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    crops = []
    for key, image, label in samples:
        h, w = image.shape[:2]
        if min(h, w) < side:
            raise ToolError(f"{key}: {w}x{h} is smaller than --square {side}")
        for k in range(per_image):
            s = int(rng.integers(side, min(h, w) + 1))
            top, left = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
            crop = Image.fromarray(image[top:top + s, left:left + s])
            if s != side:
                crop = crop.resize((side, side), Image.LANCZOS)
            crops.append((f"{key}#crop{k}", np.asarray(crop), label))
    return crops


# ------------------------------------------------------------------------------------------------ ours
def decoded_psnrs(inr_path: Path, samples, device: str) -> list[float]:
    """PSNR of each image decoded at its original size and rounded to uint8, against its source pixels."""
    import torch

    import inrfmt
    ds = inrfmt.open(str(inr_path), device=device)
    if len(ds) != len(samples):
        raise ToolError(f"{inr_path}: {len(ds)} images, expected {len(samples)} (convert skipped some)")
    heights = np.asarray(ds.file.index["height"])
    widths = np.asarray(ds.file.index["width"])
    psnrs = [0.0] * len(samples)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, (h, w) in enumerate(zip(heights.tolist(), widths.tolist())):
        by_size.setdefault((h, w), []).append(i)
    for (h, w), idx in by_size.items():
        batch = max(1, min(len(idx), 4_000_000 // (h * w)))  # bound the decode's activations
        for start in range(0, len(idx), batch):
            part = idx[start:start + batch]
            with torch.no_grad():
                out = ds.decode(part, size=(h, w))
            pixels = (out.float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            for k, i in enumerate(part):
                psnrs[i] = psnr_uint8(pixels[k], samples[i][1])
    return psnrs


def parse_bits(text: str):
    """--bits value -> convert's bits: "5" -> 5 (hidden_w's width), "hidden_w=4,last_w=6" -> a dict."""
    if text.isdigit():
        return int(text)
    bits = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if not value.isdigit():
            raise ToolError(f"--bits {text}: expected N or CLASS=N,... (e.g. hidden_w=4,last_w=6)")
        bits[name.strip()] = int(value)
    return bits


def inr_point(png_tree: Path, samples, preset: str, steps: int | None, variant: str, args, work: Path) -> dict:
    """One of our points: a format-1 `variant` (VARIANTS) or, for a coded preset, variant "bits=SPEC"."""
    import inrfmt
    if variant.startswith("bits="):
        spec = variant[len("bits="):]
        prune = quant = float_dtype = None
        options = {} if spec == "preset" else {"bits": parse_bits(spec)}
    else:
        prune, quant, float_dtype = VARIANTS[variant]
        options = {"prune": prune, "quant": quant, **({"float_dtype": float_dtype} if float_dtype else {})}
    safe = variant.replace("=", "").replace(",", "_")
    out = work / f"{preset}-{safe}-s{steps}.inr"
    t0 = time.perf_counter()
    summary = inrfmt.convert(str(png_tree), str(out), preset=preset, steps=steps, device=args.device_resolved,
                             seed=args.seed, overwrite=True, progress=False, **options)
    seconds = time.perf_counter() - t0
    psnrs = decoded_psnrs(out, samples, args.device_resolved)
    file_bytes = out.stat().st_size
    pixels = sum(img.shape[0] * img.shape[1] for _, img, _ in samples)
    from inrfmt.reader import InrFile
    with InrFile(str(out)) as f:
        prune_ratio = float(np.mean(f.index["prune_ratio"])) if f.num_images else 0.0
        arch = f"{f.arch.sine_layers}x{f.arch.width}"
        params = f.arch.params_per_image
        index_psnr = float(np.mean(f.index["psnr"]))
        dtypes = {"hidden_dtype": str(f.hidden_dtype), "float_dtype": str(f.float_dtype),
                  "version": f"{f.version[0]}.{f.version[1]}"}
        if f.coded:
            dtypes["code_bits"] = {g.name: int(b) for g, b in zip(param_groups(f.arch), f.grid.bits)}
            dtypes["section_bytes"] = f.section_sizes
    stats = summarize(psnrs)
    return {"method": "inrfmt", "preset": preset, "variant": variant, "prune": prune, "quant": quant,
            "steps": steps, "arch": arch, "params_per_image": params,
            "bytes_per_image": file_bytes / len(samples), "bits_per_pixel": 8.0 * file_bytes / pixels,
            "file_bytes": file_bytes, "psnr_mean": stats["mean"], "psnr_p10": stats["p10"], "psnr_min": stats["min"],
            "psnr_index_mean": index_psnr, "prune_ratio_mean": prune_ratio, "images": len(samples),
            "encode_seconds": seconds, "img_steps_per_s": summary.get("img_steps_per_s"), **dtypes}


def jpeg_psnr_at(bytes_per_image: float, jpeg_points: list[dict]) -> float | None:
    """JPEG's mean PSNR at this mean size, linear in log(bytes) between sweep points; None outside the sweep."""
    pts = sorted((p["bytes_per_image"], p["psnr_mean"]) for p in jpeg_points)
    xs = np.log([b for b, _ in pts])
    ys = [p for _, p in pts]
    x = np.log(bytes_per_image)
    if x < xs[0] or x > xs[-1]:
        return None
    return float(np.interp(x, xs, ys))


def codec_bytes_at(psnr: float, codec_points: list[dict]) -> float | None:
    """The codec's mean bytes per image at this mean PSNR (log-bytes interpolated between its sweep points,
    taken in order of PSNR); None outside its sweep."""
    pts = sorted((p["psnr_mean"], np.log(p["bytes_per_image"])) for p in codec_points)
    if not pts or not pts[0][0] <= psnr <= pts[-1][0]:
        return None
    return float(np.exp(np.interp(psnr, [a for a, _ in pts], [b for _, b in pts])))


def compare_at_equal_psnr(points: list[dict]) -> None:
    """For each of our points and each codec: the codec's bytes at our PSNR and our bytes over them."""
    for codec in ("jpeg", "webp", "avif"):
        ref = [p for p in points if p["method"] == codec]
        for p in points:
            if p["method"] == "inrfmt" and ref:
                at = codec_bytes_at(p["psnr_mean"], ref)
                p[f"{codec}_bytes_at_equal_psnr"] = at
                p[f"bytes_ratio_vs_{codec}"] = None if at is None else p["bytes_per_image"] / at


def compare_with_jpeg(points: list[dict]) -> None:
    jpeg = [p for p in points if p["method"] == "jpeg"]
    if not jpeg:
        return
    smallest = min(p["bytes_per_image"] for p in jpeg)
    for p in points:
        if p["method"] != "inrfmt":
            continue
        ref = jpeg_psnr_at(p["bytes_per_image"], jpeg)
        p["jpeg_psnr_at_equal_bytes"] = ref
        if ref is not None:
            p["psnr_gain_vs_jpeg_db"] = p["psnr_mean"] - ref
            p["beats_jpeg"] = p["psnr_mean"] > ref
        else:
            # below JPEG's smallest file no quality reaches this size: we win if we are smaller
            p["psnr_gain_vs_jpeg_db"] = None
            p["beats_jpeg"] = bool(p["bytes_per_image"] < smallest)


# ------------------------------------------------------------------------------------------------ plot
def plot(result: dict, png: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    styles = {"jpeg": ("tab:blue", "o"), "webp": ("tab:green", "s"), "avif": ("tab:purple", "^")}
    for codec, (color, marker) in styles.items():
        pts = sorted((p for p in result["points"] if p["method"] == codec), key=lambda p: p["bytes_per_image"])
        if pts:
            ax.plot([p["bytes_per_image"] for p in pts], [p["psnr_mean"] for p in pts], marker=marker, ms=4,
                    color=color, label=f"{codec.upper()} (Pillow)")
    ours = [p for p in result["points"] if p["method"] == "inrfmt"]
    presets = sorted({(p["preset"], p.get("steps") or 0) for p in ours})
    colors = ["tab:red", "tab:orange", "tab:brown", "tab:pink", "black"]
    for k, (preset, steps) in enumerate(presets):
        mine = [q for q in ours if (q["preset"], q.get("steps") or 0) == (preset, steps)]
        coded = sorted((q for q in mine if q["variant"].startswith("bits=")), key=lambda q: q["bytes_per_image"])
        if coded:  # format 2: one curve over the code widths
            ax.plot([q["bytes_per_image"] for q in coded], [q["psnr_mean"] for q in coded], marker="o", ms=6,
                    color=colors[k % len(colors)], lw=2, zorder=3,
                    label=f"inrfmt {preset}{f':{steps}' if steps else ''} ({coded[0]['arch']}, format 2; "
                          + ", ".join(q["variant"] for q in coded) + ")")
            for q in coded:
                ax.annotate(q["variant"][len("bits="):], (q["bytes_per_image"], q["psnr_mean"]), fontsize=6,
                            xytext=(3, -8), textcoords="offset points")
        for p in (q for q in mine if not q["variant"].startswith("bits=")):
            filled = p["prune"]
            marker = "*" if p.get("float_dtype") == "float16" else "D" if p["quant"] == 8 else \
                "P" if p["quant"] == 16 else "X"
            ax.scatter([p["bytes_per_image"]], [p["psnr_mean"]], s=60, marker=marker,
                       facecolors=colors[k % len(colors)] if filled else "none",
                       edgecolors=colors[k % len(colors)],
                       label=f"inrfmt {preset}{f':{steps}' if steps else ''} {p['variant']} ({p['arch']})",
                       zorder=3)
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter
    plain = FuncFormatter(lambda v, _: f"{v:,.0f}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if str(int(round(v)))[0] in "25" else ""))
    ax.set_xlabel("bytes per image (mean; inrfmt: .inr file bytes / images, header included)")
    ax.set_ylabel("mean PSNR (dB, 0..255 RGB)")
    sz = result["image_sizes"]
    kind = "crops" if result.get("crops_per_image") else "images"
    what = f"{result['images']} {kind} ({sz}) from {Path(result['src']).name}"
    ax.set_title(f"{what}; {result['env']['date_utc']} UTC, {result['device']}",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return save_figure(fig, png)


# ------------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="rd_curve.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images_dir", help="images to measure (any source inrfmt convert reads)")
    p.add_argument("--out", default=str(REPO / "bench_out" / "rd"), help="where rd.json and rd.png go")
    p.add_argument("--work", default=None, help="scratch for the PNG tree and .inr files (default: OUT/work)")
    p.add_argument("--presets", nargs="*", default=["fast"],
                   help="NAME or NAME:STEPS (convert --steps for that preset); no NAME: codecs only")
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS),
                   help="format-1 presets: pruning and hidden dtypes to measure")
    p.add_argument("--bits", nargs="+", default=None, metavar="SPEC",
                   help="coded presets (small, large): code widths to measure, each N (hidden_w's width) or "
                        "CLASS=N,...; default: the preset's own")
    p.add_argument("--steps", type=int, default=None,
                   help="convert --steps for presets given without :STEPS (default: the preset's own)")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--square", type=int, default=None, help="centre-crop and resize every image to SxS first")
    p.add_argument("--crops", type=int, default=0,
                   help="instead: K random square crops per image, resized to --square (needs --square)")
    p.add_argument("--jpeg-qualities", type=int, nargs="*", default=list(DEFAULT_JPEG_QUALITIES))
    p.add_argument("--webp-qualities", type=int, nargs="*", default=list(DEFAULT_WEBP_QUALITIES))
    p.add_argument("--avif-qualities", type=int, nargs="*", default=list(DEFAULT_AVIF_QUALITIES))
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if not Path(args.images_dir).exists():
        raise ToolError(f"IMAGES_DIR {args.images_dir}: no such file or directory")
    if args.crops < 0 or (args.crops and args.square is None):
        raise ToolError("--crops K needs K >= 1 and --square S")
    if args.steps is not None and args.steps < 1:
        raise ToolError(f"--steps must be >= 1, got {args.steps}")
    if args.max_images is not None and args.max_images < 1:
        raise ToolError(f"--max-images must be >= 1, got {args.max_images}")
    if args.square is not None and args.square < 4:
        raise ToolError(f"--square must be >= 4, got {args.square}")
    for name in ("jpeg_qualities", "webp_qualities", "avif_qualities"):
        bad = [q for q in getattr(args, name) if not 0 <= q <= 100]
        if bad:
            raise ToolError(f"--{name.replace('_', '-')}: qualities must be in 0..100, got {bad}")
    for spec in args.bits or ():
        parse_bits(spec)
    from inrfmt.presets import PRESETS
    specs = []
    for spec in args.presets:  # NAME or NAME:STEPS
        name, _, steps_text = spec.partition(":")
        if name not in PRESETS:
            raise ToolError(f"unknown preset {name!r} (choose from: {', '.join(PRESETS)})")
        if steps_text and not (steps_text.isdigit() and int(steps_text) >= 1):
            raise ToolError(f"--presets {spec}: STEPS must be an integer >= 1")
        specs.append((name, int(steps_text) if steps_text else args.steps))
    args.presets = specs
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.device_resolved = resolve_device(args.device)
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "work"
    work.mkdir(parents=True, exist_ok=True)

    if args.crops:
        photos, classes, skipped = load_samples(args.images_dir, max_images=args.max_images)
        loaded = random_crops(photos, args.crops, args.square, args.seed)
    else:
        loaded, classes, skipped = load_samples(args.images_dir, max_images=args.max_images, square=args.square)
    png_tree = work / "images"
    if png_tree.exists():
        import shutil
        shutil.rmtree(png_tree)
    write_image_folder(loaded, classes, png_tree, fmt="png")
    samples, _, _ = load_samples(png_tree)  # convert's order and exact pixels
    sizes = sorted({(img.shape[1], img.shape[0]) for _, img, _ in samples})
    (w0, h0), (w1, h1) = sizes[0], sizes[-1]
    size_text = f"{w0}x{h0}" if len(sizes) == 1 else f"{len(sizes)} sizes, {w0}x{h0}..{w1}x{h1}"

    points, notes = [], []
    for codec, qualities in (("jpeg", args.jpeg_qualities), ("webp", args.webp_qualities),
                             ("avif", args.avif_qualities)):
        if not qualities:
            continue
        ok, why = codec_available(codec)
        if not ok:
            notes.append(f"{codec.upper()} skipped: {why}")
            continue
        for q in qualities:
            point = codec_point(samples, codec, q)
            point["library"] = why
            points.append(point)
            print(f"{codec} q{q}: {point['bytes_per_image']:.0f} B/image, {point['psnr_mean']:.2f} dB", file=sys.stderr)
    import inspect

    import inrfmt
    convert_params = inspect.signature(inrfmt.convert).parameters
    from inrfmt.presets import PRESETS
    for preset, steps in args.presets:
        coded = PRESETS[preset].code_bits is not None
        variants = [f"bits={b}" for b in (args.bits or ["preset"])] if coded else args.variants
        for variant in variants:
            if not coded and VARIANTS[variant][2] and "float_dtype" not in convert_params:
                note = f"inrfmt {variant} skipped: this inrfmt's convert() has no float_dtype option"
                if note not in notes:
                    notes.append(note)
                continue
            point = inr_point(png_tree, samples, preset, steps, variant, args, work)
            points.append(point)
            print(f"inrfmt {preset} {variant}: {point['bytes_per_image']:.0f} B/image, {point['psnr_mean']:.2f} dB "
                  f"(prune {point['prune_ratio_mean']:.1%}, encode {point['encode_seconds']:.1f} s)", file=sys.stderr)
    compare_with_jpeg(points)
    compare_at_equal_psnr(points)
    result = {"tool": "rd_curve", "src": str(args.images_dir), "images": len(samples), "skipped": skipped,
              "image_sizes": size_text, "square": args.square, "crops_per_image": args.crops or None,
              "steps": args.steps, "device": args.device_resolved,
              "env": environment(args.device_resolved), "notes": notes, "points": points}
    write_json(out / "rd.json", result)
    if not args.no_plot:
        plot(result, out / "rd.png")
    print(f"wrote {out / 'rd.json'}" + ("" if args.no_plot else f" and {out / 'rd.png'}"), file=sys.stderr)
    return result


if __name__ == "__main__":
    run_main(main, "rd_curve.py")
