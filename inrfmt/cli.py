"""The `inrfmt` command line: convert, info, verify, merge, export, bench.

User mistakes end in one line on stderr (`inrfmt: error: ...`) and exit code 2; a malformed file exits 1.
Heavy modules (torch, the encoder) are imported inside the commands so `--help` stays fast.
"""
from __future__ import annotations

import json
import sys

import click

from .errors import InrFormatError, InrUsageError

EXIT_USAGE = 2
EXIT_BAD_FILE = 1


def _fail(message: str, code: int) -> None:
    click.echo(f"inrfmt: error: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="inrfmt", prog_name="inrfmt")
def cli() -> None:
    """inrfmt: image datasets stored as one tiny SIREN per image, decoded on the GPU for training."""


# ----------------------------------------------------------------------------------------------- convert
@cli.command()
@click.argument("src", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(dir_okay=False, path_type=str))
@click.option("--preset", default="fast", show_default=True,
              help="Network and schedule: fast, rapid-inr-cifar10, rapid-inr-flowers102, rapid-inr-mini-imagenet.")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Steps of the first fitting round; later rounds scale by the same factor.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Images fitted at once.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT (and a stale work directory) if it exists.")
@click.option("--resume", is_flag=True, help="Finish an interrupted run from its work directory OUT.work/.")
@click.option("--max-side", type=click.IntRange(min=1), default=None,
              help="Fit at most this many pixels on the long side (antialiased downscale); the index keeps the original size.")
@click.option("--on-error", type=click.Choice(["skip", "fail"]), default="skip", show_default=True,
              help="A corrupt or unreadable image: skip it (listed in the file's metadata) or stop.")
@click.option("--shard", default=None, metavar="K/N",
              help="Encode only shard K of N (K counts from 0) into OUT as a part file; join parts with `inrfmt merge`.")
@click.option("--no-prune", is_flag=True, help="Skip the pruning rounds.")
@click.option("--quant", type=click.Choice(["8", "16", "32"]), default="8", show_default=True,
              help="Bits of the hidden-layer weights: 8 = int8 with a per-image per-layer scale, 16/32 = float.")
@click.option("--float-dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="Storage of the first/last layers and biases: float32 (the paper's full precision) or float16 "
                   "(smaller files; the recorded PSNR is that of the stored model).")
@click.option("--reproducible", is_flag=True,
              help="Leave timing and host details out of the metadata, so reruns are byte-identical.")
@click.option("--h5-images", default=None, metavar="KEY", help="HDF5 source: dataset holding the images.")
@click.option("--h5-labels", default=None, metavar="KEY", help="HDF5 source: dataset holding the labels.")
@click.option("--pixel-fraction", type=click.FloatRange(min=0, min_open=True, max=1), default=None,
              help="Fit each step on this fraction of each image's pixels (default: the preset's).")
@click.option("--jitter", type=click.FloatRange(min=0, max=1), default=None,
              help="Fraction of fitting samples moved each step to a random point of their pixel cell (target: "
                   "the bilinearly interpolated image), so the image is clean between pixel centres; "
                   "0 fits pixel centres only (default: the preset's, 0.5).")
@click.option("--tf32/--no-tf32", default=None, help="TF32 matmuls on CUDA (default: the preset's).")
@click.option("--compile", "torch_compile", is_flag=True, help="torch.compile the training step.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def convert(src, out, preset, steps, batch_size, device, seed, overwrite, resume, max_side, on_error,
            shard, no_prune, quant, float_dtype, reproducible, h5_images, h5_labels, pixel_fraction, jitter, tf32,
            torch_compile, quiet):
    """Encode the images in SRC (ImageFolder tree, CIFAR pickle batches, HDF5, .npy/.npz) into OUT.inr.

    Under torchrun each rank encodes its own shard and rank 0 merges them into OUT.
    """
    from .conversion import convert as run_convert

    summary = run_convert(src, out, preset=preset, steps=steps, batch_size=batch_size, device=device,
                          seed=seed, overwrite=overwrite, resume=resume, max_side=max_side,
                          on_error=on_error, shard=shard, prune=not no_prune, quant=int(quant), float_dtype=float_dtype,
                          reproducible=reproducible, progress=not quiet, h5_images=h5_images,
                          h5_labels=h5_labels, pixel_fraction=pixel_fraction, jitter=jitter, tf32=tf32,
                          torch_compile=torch_compile)
    if summary and summary.get("out") and summary.get("rank") in (None, 0):
        click.echo(
            f"wrote {summary['out']}: {summary.get('num_images', '?')} images, "
            f"mean PSNR {summary.get('psnr_mean', float('nan')):.2f} dB, "
            f"{summary.get('skipped', 0)} skipped", err=True)


# -------------------------------------------------------------------------------------------------- info
def _percentile(values, q):
    import numpy as np

    return float(np.percentile(values, q)) if len(values) else float("nan")


def describe(inr, per_image: bool = False) -> dict:
    """The `info --json` document of an open InrFile."""
    import numpy as np

    index = inr.index
    n = int(inr.num_images)
    psnr = np.asarray(index["psnr"], dtype=np.float64)
    ratio = np.asarray(index["prune_ratio"], dtype=np.float64)
    hist, edges = np.histogram(ratio, bins=[0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 1.0001])
    metadata = dict(inr.metadata)
    try:
        skipped = json.loads(metadata.get("skipped", "[]"))
    except ValueError:
        skipped = []
    arch = inr.arch
    doc = {
        "path": str(inr.path),
        "format_version": f"{inr.version[0]}.{inr.version[1]}",
        "num_images": n,
        "classes": list(inr.classes),
        "architecture": {"sine_layers": arch.sine_layers, "width": arch.width, "w0": arch.w0,
                         "first_w0": arch.first_w0, "params_per_image": arch.params_per_image},
        "file_bytes": int(inr.file_bytes),
        "bytes_per_image": inr.file_bytes / n if n else float("nan"),
        "psnr": {"mean": float(psnr.mean()) if n else float("nan"), "p10": _percentile(psnr, 10),
                 "min": float(psnr.min()) if n else float("nan"),
                 "max": float(psnr.max()) if n else float("nan")},
        "prune_ratio": {"mean": float(ratio.mean()) if n else 0.0,
                        "histogram": [{"from": float(a), "to": float(min(b, 1.0)), "count": int(c)}
                                      for a, b, c in zip(edges[:-1], edges[1:], hist)]},
        "quantization": {"hidden_dtype": inr.hidden_dtype, "float_dtype": inr.float_dtype,
                         "pruning_masks": bool(inr.has_masks)},
        "skipped": skipped,
        "metadata": metadata,
    }
    if per_image:
        doc["images"] = [{"index": i, "label": int(r["label"]), "height": int(r["height"]),
                          "width": int(r["width"]), "psnr": float(r["psnr"]),
                          "prune_ratio": float(r["prune_ratio"])} for i, r in enumerate(index)]
    return doc


def _print_info(doc: dict) -> None:
    a, p, q = doc["architecture"], doc["psnr"], doc["quantization"]
    n = doc["num_images"]
    classes = doc["classes"]
    rows = [
        ("file", doc["path"]),
        ("format version", doc["format_version"]),
        ("images", str(n)),
        ("classes", f"{len(classes)}: " + ", ".join(classes[:8]) + (" ..." if len(classes) > 8 else "")
         if classes else "none (unlabelled)"),
        ("network", f"{a['sine_layers']} sine layers x {a['width']} + linear output, w0 {a['w0']:g} "
                    f"(first {a['first_w0']:g}), {a['params_per_image']} params/image"),
        ("hidden weights", f"{q['hidden_dtype']}" + (", pruned (bitmaps)" if q["pruning_masks"] else "")
         + f"; first/last layers and biases {q['float_dtype']}"),
        ("file size", f"{doc['file_bytes']:,} bytes, {doc['bytes_per_image']:,.1f} bytes/image"),
        ("PSNR (dB)", f"mean {p['mean']:.2f}, p10 {p['p10']:.2f}, min {p['min']:.2f}, max {p['max']:.2f}"),
        ("prune ratio", f"mean {doc['prune_ratio']['mean']:.3f}"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")
    hist = [h for h in doc["prune_ratio"]["histogram"] if h["count"]]
    if q["pruning_masks"] and hist:
        click.echo("prune ratios:")
        most = max(h["count"] for h in hist)
        for h in hist:
            bar = "#" * max(1, round(30 * h["count"] / most))
            click.echo(f"  {h['from']:.2f}-{h['to']:.2f}  {h['count']:>7}  {bar}")
    if doc["skipped"]:
        click.echo(f"skipped at convert: {len(doc['skipped'])}")
        for s in doc["skipped"][:20]:
            click.echo(f"  {s.get('key', s) if isinstance(s, dict) else s}"
                       + (f": {s.get('reason')}" if isinstance(s, dict) and s.get("reason") else ""))
    if "load" in doc:
        ld = doc["load"]
        click.echo(f"bank: {ld['bank_bytes']:,} bytes ({ld['bank_layout']}, "
                   f"{ld['bank_bytes'] / max(ld['file_bytes'], 1):.2f}x the file) on {ld['device']}, "
                   f"loaded in {ld['load_seconds']:.3f} s")
    meta = {k: v for k, v in doc["metadata"].items() if k != "skipped"}
    if meta:
        click.echo("metadata:")
        for k in sorted(meta):
            v = meta[k]
            click.echo(f"  {k}: {v if len(v) <= 80 else v[:77] + '...'}")
    if "images" in doc:
        click.echo(f"{'index':>7} {'label':>6} {'height':>6} {'width':>6} {'psnr':>7} {'prune':>6}")
        for r in doc["images"]:
            click.echo(f"{r['index']:>7} {r['label']:>6} {r['height']:>6} {r['width']:>6} "
                       f"{r['psnr']:>7.2f} {r['prune_ratio']:>6.3f}")


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document instead of a table.")
@click.option("--per-image", is_flag=True, help="Add one row per image.")
@click.option("--load", is_flag=True, help="Also load the file into a tensor bank and report its size and load time.")
@click.option("--device", default=None, help="Device for --load (default: cuda if available, else cpu).")
@click.option("--bank-layout", type=click.Choice(["auto", "dense", "compact"]), default="auto", show_default=True,
              help="Hidden-weight layout of the bank for --load (see inrfmt.open).")
def info(file, as_json, per_image, load, device, bank_layout):
    """Describe an .inr file: images, classes, network, size, PSNR, pruning."""
    with _open_file(file) as inr:
        doc = describe(inr, per_image=per_image)
    if load:
        from .data import open as open_dataset

        with open_dataset(file, device=device, bank_layout=bank_layout) as ds:
            doc["load"] = ds.stats()
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        _print_info(doc)


def _open_file(path):
    import os

    from .reader import InrFile

    if not os.path.exists(path):
        raise InrUsageError(f"{path}: no such file")
    return InrFile(path)


# ------------------------------------------------------------------------------------------------ verify
@cli.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=str))
@click.option("--sample", type=click.IntRange(min=0), default=16, show_default=True,
              help="How many images to decode as a check.")
def verify(file, sample):
    """Check every checksum of FILE and decode a sample. Exit 0 when sound, 1 with the reason when not."""
    import torch

    from .data import open as open_dataset

    with _open_file(file) as inr:
        inr.verify()
        n = inr.num_images
    with open_dataset(file, device="cpu") as ds:
        count = min(sample, n)
        if count:
            picks = torch.linspace(0, n - 1, count).round().long().unique()
            images = ds.decode(picks, size=(16, 16))
            if not torch.isfinite(images).all() or images.min() < 0 or images.max() > 1:
                raise InrFormatError(f"{file}: decoded sample has values outside [0, 1]")
    click.echo(f"{file}: OK ({n} images, all checksums match, {count} decoded)")


# ------------------------------------------------------------------------------------------------- merge
@cli.command()
@click.argument("out", type=click.Path(dir_okay=False, path_type=str))
@click.argument("parts", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=str))
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def merge(out, parts, overwrite):
    """Join part files (from `convert --shard K/N`) into OUT.

    Parts of one sharded run are put in shard order and must be complete; other .inr files keep the order given.
    """
    from .shards import merge as run_merge

    run_merge(out, list(parts), overwrite=overwrite)
    click.echo(f"wrote {out} from {len(parts)} parts", err=True)


# ------------------------------------------------------------------------------------------------ export
@cli.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=str))
@click.argument("outdir", type=click.Path(file_okay=False, path_type=str))
@click.option("--format", "fmt", type=click.Choice(["png", "jpeg", "h5"]), default="png", show_default=True)
@click.option("--size", type=click.IntRange(min=1), default=None,
              help="Decode at SIZE x SIZE instead of each image's original size.")
@click.option("--limit", type=click.IntRange(min=0), default=None, help="Export only the first N images.")
@click.option("--device", default=None, help="Decode on this device (default: cuda if available, else cpu).")
@click.option("--overwrite", is_flag=True, help="Write into a non-empty OUTDIR.")
def export(file, outdir, fmt, size, limit, device, overwrite):
    """Decode FILE back into an ImageFolder tree (class names kept) or one HDF5 file."""
    from .export import export as run_export

    _open_file(file).close()
    result = run_export(file, outdir, format=fmt, size=size, limit=limit, device=device, overwrite=overwrite)
    click.echo(f"exported {result['images']} images to {result['output']}", err=True)


# ------------------------------------------------------------------------------------------------- bench
@cli.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=str))
@click.option("--size", type=click.IntRange(min=1), default=None, help="Decode at SIZE x SIZE (default: native).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--backend", "backends", multiple=True, type=click.Choice(["torch", "triton"]),
              help="Backend(s) to time (default: every one available here).")
@click.option("--device", default=None, help="Default: cuda if available, else cpu.")
@click.option("--bank-layout", type=click.Choice(["auto", "dense", "compact"]), default="auto", show_default=True,
              help="Hidden-weight layout of the bank (see inrfmt.open).")
@click.option("--json", "as_json", is_flag=True)
def bench(file, size, batch_size, backends, device, bank_layout, as_json):
    """Decode throughput (img/s) of each available backend on this machine, and load time."""
    from .data import open as open_dataset
    from .bench import benchmark

    _open_file(file).close()
    with open_dataset(file, device=device, bank_layout=bank_layout) as ds:
        result = benchmark(ds.bank, size=size, batch_size=batch_size, backends=list(backends) or None)
        result["load"] = ds.stats()
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    for row in result.get("results", []):
        click.echo(f"{row['backend']:>7}: {row['img_per_s']:>12,.0f} img/s  ({row.get('size')}, batch {batch_size})"
                   if "img_per_s" in row else f"{row['backend']:>7}: {row.get('error', 'unavailable')}")
    ld = result["load"]
    click.echo(f"   load: {ld['load_seconds']:.3f} s for {ld['file_bytes']:,} file bytes on {ld['device']} "
               f"(bank {ld['bank_layout']}, {ld['bank_bytes']:,} bytes)")


def main(argv=None) -> None:
    """Console entry point: every user mistake becomes one line and exit code 2."""
    try:
        cli.main(args=argv, prog_name="inrfmt", standalone_mode=False)
    except click.exceptions.Abort:
        _fail("aborted", 130)
    except getattr(click.exceptions, "NoArgsIsHelpError", ()) as exc:  # click >= 8.2: bare `inrfmt`
        click.echo(exc.ctx.get_help() if exc.ctx else str(exc))
        sys.exit(EXIT_USAGE)
    except click.ClickException as exc:
        _fail(exc.format_message().replace("\n", " "), EXIT_USAGE)
    except InrUsageError as exc:
        _fail(str(exc), EXIT_USAGE)
    except InrFormatError as exc:
        _fail(str(exc), EXIT_BAD_FILE)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    sys.exit(0)


if __name__ == "__main__":
    main()
