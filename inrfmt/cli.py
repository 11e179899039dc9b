"""The `inrfmt` command line: convert, info, verify, merge, export, preview, bench.

User mistakes end in one line on stderr (`inrfmt: error: ...`) and exit code 2; a malformed file exits 1.
Heavy modules (torch, the encoder) are imported inside the commands so `--help` stays fast.
"""
from __future__ import annotations

import json
import sys

import click

from .errors import InrFormatError, InrInterrupted, InrUsageError
from .presets import PRESETS

EXIT_USAGE = 2
EXIT_BAD_FILE = 1


def _fail(message: str, code: int, prefix: str = "inrfmt: error: ") -> None:
    click.echo(f"{prefix}{message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="inrfmt", prog_name="inrfmt")
def cli() -> None:
    """inrfmt: image datasets stored as one tiny SIREN per image, decoded on the GPU for training."""


# ----------------------------------------------------------------------------------------------- convert
# convert's options as `inrfmt.convert` names them, with how a command-line value becomes that argument:
# used to take an interrupted run's settings for options not given and to name the ones that conflict.
_CONVERT_OPTIONS = {
    "preset": str, "steps": int, "batch_size": int, "device": str, "seed": int, "max_side": int, "shard": str,
    "no_prune": lambda v: not v, "quant": int, "float_dtype": str, "reproducible": bool, "h5_images": str,
    "h5_labels": str, "pixel_fraction": float, "jitter": float, "tf32": bool, "torch_compile": bool,
    "prior": str, "bits": str,
}


def _saved_convert_options(ctx: click.Context, paths: tuple[str, ...], given: dict) -> dict:
    """convert's arguments for `--resume OUT` (SRC optional): the interrupted run's saved settings, checked
    against every option given explicitly on the command line."""
    import os

    from .conversion import saved_options
    from .shards import parse_shard
    from .workdir import work_dir_for

    out = paths[-1]
    saved = saved_options(out)
    where = work_dir_for(out) / "settings.json"
    if len(paths) == 2:
        src = saved["src"]
        given_src = os.path.abspath(paths[0])
        if (src if isinstance(src, str) else None) != given_src:
            raise InrUsageError(f"SRC {paths[0]} is not the source of the interrupted run ({src}, saved in {where}); "
                                f"leave SRC out to resume it")
    for name, value in given.items():
        if ctx.get_parameter_source(name) not in (click.core.ParameterSource.COMMANDLINE,
                                                  click.core.ParameterSource.ENVIRONMENT):
            continue
        key = "prune" if name == "no_prune" else name
        wanted = _CONVERT_OPTIONS[name](value)
        have = saved[key]
        if key == "device":
            same = _device_type(wanted) == have
        elif key == "preset" and wanted == "auto":  # what auto picks for the saved source
            from .conversion import auto_preset
            from .sources import open_source

            source = open_source(saved["src"], h5_images=saved["h5_images"], h5_labels=saved["h5_labels"])
            same = auto_preset(source, saved["max_side"])[0] == have
        elif key == "bits":
            same = PRESETS[saved["preset"]].code_widths(wanted) == have
        elif key == "shard":
            same = parse_shard(wanted) == parse_shard(have)
        elif key == "prior":
            from .conversion import PRIOR_CHOICES

            choice = PRESETS[saved["preset"]].prior if wanted == "auto" else wanted
            same = (choice if choice in PRIOR_CHOICES else os.path.abspath(choice)) == have
        else:
            same = wanted == have
        if not same:
            param = next(p for p in ctx.command.params if p.name == name)  # the flag as the user typed it
            flag = param.opts[0] if value or not param.secondary_opts else param.secondary_opts[0]
            shown = "" if param.is_flag else f" {value}"
            raise InrUsageError(f"{flag}{shown} conflicts with the interrupted run's setting ({key} = {have!r}, saved "
                                f"in {where}); leave {flag} out to resume, or use --overwrite to start over")
    return saved


@cli.command()
@click.argument("paths", nargs=-1, required=True, metavar="[SRC] OUT")
@click.option("--preset", default="auto", show_default=True, metavar="NAME",
              help="Network, schedule and storage: small (images up to 64x64) or large (bigger ones), which code "
                   "every parameter (format 2); fast, rapid-inr-cifar10, rapid-inr-flowers102, "
                   "rapid-inr-mini-imagenet (format 1). auto: small or large by the longest side of a sample of SRC.")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Steps of the first fitting round; later rounds scale by the same factor.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Images fitted at once.")
@click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda|cuda:N",
              help="Where to fit (auto: cuda if available, else cpu).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT (and a stale work directory) if it exists.")
@click.option("--resume", is_flag=True,
              help="Finish an interrupted run from its work directory OUT.work/; SRC and the options may be left "
                   "out (they are saved there).")
@click.option("--max-side", type=click.IntRange(min=1), default=None,
              help="Fit at most this many pixels on the long side (antialiased downscale); the index keeps the original size.")
@click.option("--on-error", type=click.Choice(["skip", "fail"]), default="skip", show_default=True,
              help="A corrupt or unreadable image: skip it (listed in the file's metadata) or stop.")
@click.option("--shard", default=None, metavar="K/N",
              help="Encode only shard K of N (K counts from 0; an equal share of the images) into OUT as a part "
                   "file; join parts with `inrfmt merge`.")
@click.option("--no-prune", is_flag=True, help="Skip the pruning rounds.")
@click.option("--quant", type=click.Choice(["8", "16", "32"]), default=None,
              help="Format-1 presets: bits of the hidden-layer weights: 8 (default) = int8 with a per-image "
                   "per-layer scale, 16/32 = float.")
@click.option("--float-dtype", type=click.Choice(["float32", "float16"]), default=None,
              help="Format-1 presets: storage of the first/last layers and biases: float32 (default, the paper's "
                   "full precision) or float16 (smaller files; the recorded PSNR is that of the stored model).")
@click.option("--bits", default=None, metavar="N|CLASS=N,...",
              help="Coded presets (small, large): code widths. N sets the hidden weights' (each extra bit halves "
                   "their step: better quality, bigger file); CLASS=N,... sets those of first_w, first_b, "
                   "hidden_w, hidden_b, last_w, last_b. Default: the preset's.")
@click.option("--reproducible", is_flag=True,
              help="Leave timing and host details out of the metadata, so reruns are byte-identical.")
@click.option("--h5-images", default=None, metavar="KEY",
              help="The images array (HDF5, .npz) or column (Parquet), when not found by its usual name.")
@click.option("--h5-labels", default=None, metavar="KEY",
              help="The labels array (HDF5, .npz) or column (Parquet), when not found by its usual name.")
@click.option("--pixel-fraction", type=click.FloatRange(min=0, min_open=True, max=1), default=None,
              help="Fit each step on this fraction of each image's pixels (default: the preset's).")
@click.option("--jitter", type=click.FloatRange(min=0, max=1), default=None,
              help="Fraction of fitting samples moved each step to a random point of their pixel cell (target: "
                   "the bilinearly interpolated image), so the image is clean between pixel centres; "
                   "0 fits pixel centres only (default: the preset's: 0 for small, else 0.5).")
@click.option("--tf32/--no-tf32", default=None, help="TF32 matmuls on CUDA (default: the preset's).")
@click.option("--compile", "torch_compile", is_flag=True, help="torch.compile the training step.")
@click.option("--prior", default="auto", show_default=True, metavar="auto|builtin|learn|none|PATH",
              help="Start every fit from a learned prior: the preset's built-in one, one learned first on a sample "
                   "of SRC (at most 10% of the conversion's fitting work), or a prior file; none starts from a "
                   "random initialisation. auto: builtin, except none for the rapid-inr-* presets (paper-faithful).")
@click.option("--quiet", is_flag=True, help="No progress line.")
@click.pass_context
def convert(ctx, paths, overwrite, resume, on_error, quiet, **options):
    """Encode the images in SRC into OUT.inr.

    SRC: an ImageFolder tree, CIFAR pickle batches, HDF5, .npy/.npz, WebDataset .tar shards (a file or a
    pattern such as 'train-{000000..000099}.tar') or .parquet files. `inrfmt convert --resume OUT` finishes an
    interrupted run with its saved settings. Under torchrun each rank encodes its own shard and rank 0 merges
    them into OUT.
    """
    import shlex
    import signal

    from .conversion import convert as run_convert

    if len(paths) > 2 or (len(paths) == 1 and not resume):
        raise InrUsageError(f"convert takes SRC and OUT (or OUT alone with --resume), got {len(paths)} path(s)")
    if resume and (len(paths) == 1 or _work_dir_exists(paths[-1])):
        arguments = _saved_convert_options(ctx, paths, options)
    else:
        arguments = {key: _CONVERT_OPTIONS[key](value) if value is not None and key == "quant" else value
                     for key, value in options.items() if key != "no_prune"}
        arguments.update(src=paths[0], out=paths[1], prune=not options["no_prune"])
    received = []

    def terminate(signum, frame):  # SIGTERM (a scheduler stopping the job) ends like Ctrl-C
        received.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        summary = run_convert(**arguments, overwrite=overwrite, resume=resume, on_error=on_error, progress=not quiet)
    except KeyboardInterrupt as exc:
        message = str(exc) if isinstance(exc, InrInterrupted) else (
            f"interrupted; finished batches, if any, are kept in {paths[-1]}.work: resume with: "
            f"inrfmt convert --resume {shlex.quote(paths[-1])}")
        _fail(message, 128 + (received[0] if received else signal.SIGINT), prefix="inrfmt: ")
    finally:
        signal.signal(signal.SIGTERM, previous)
    if summary and summary.get("out") and summary.get("rank") in (None, 0):
        n = summary.get("num_images", 0)
        psnr = f", mean PSNR {summary['psnr_mean']:.2f} dB" if n else ""
        learned = (f"; learning the prior took {summary['prior_seconds']:.1f} s"
                   if summary.get("prior_seconds") else "")
        preset = f" (preset {summary['preset']})" if summary.get("preset") else ""
        click.echo(f"wrote {summary['out']}{preset}: {n} image{'s' if n != 1 else ''}{psnr}, "
                   f"{summary.get('skipped', 0)} skipped{learned}", err=True)


def _device_type(name: str) -> str:
    """"cpu" or "cuda" for a --device value (what a settings record keeps)."""
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name.split(":")[0]


def _work_dir_exists(out: str) -> bool:
    from .workdir import work_dir_for

    return work_dir_for(out).exists()


# -------------------------------------------------------------------------------------------------- info
# Width of a prune-ratio histogram bin; the last bin ends at the largest ratio rounded up to a bin edge.
PRUNE_BIN = 0.05


def prune_histogram(ratios) -> list[dict]:
    """Bins of PRUNE_BIN from 0 up to the largest ratio: each bin holds [from, to), the last [from, to], so
    images at a rule's cap (e.g. 0.25) fall in the bin that ends there (0.20-0.25), not in a bin above it."""
    import math

    import numpy as np

    ratios = np.asarray(ratios, dtype=np.float64)
    top = max(1, math.ceil(round(float(ratios.max()) / PRUNE_BIN, 9))) if len(ratios) else 1
    edges = np.round(np.arange(top + 1) * PRUNE_BIN, 10)
    counts, _ = np.histogram(np.clip(ratios, 0.0, edges[-1]), bins=edges)
    return [{"from": float(a), "to": float(b), "count": int(c)} for a, b, c in zip(edges[:-1], edges[1:], counts)]


def _json_list(metadata: dict, key: str) -> list:
    try:
        value = json.loads(metadata.get(key, "[]"))
    except ValueError:
        return []
    return value if isinstance(value, list) else []


def describe(inr, per_image: bool = False) -> dict:
    """The `info --json` document of an open InrFile (statistics of a file without images are null)."""
    import numpy as np

    index = inr.index
    n = int(inr.num_images)
    psnr = np.asarray(index["psnr"], dtype=np.float64)
    ratio = np.asarray(index["prune_ratio"], dtype=np.float64)
    metadata = dict(inr.metadata)
    skipped = _json_list(metadata, "skipped")
    unread = _json_list(metadata, "unread")
    arch = inr.arch

    def stat(fn, values):
        return float(fn(values)) if n else None
    doc = {
        "path": str(inr.path),
        "format_version": f"{inr.version[0]}.{inr.version[1]}",
        "num_images": n,
        "classes": list(inr.classes),
        "architecture": {"sine_layers": arch.sine_layers, "width": arch.width, "w0": arch.w0,
                         "first_w0": arch.first_w0, "params_per_image": arch.params_per_image},
        "file_bytes": int(inr.file_bytes),
        "bytes_per_image": inr.file_bytes / n if n else None,
        "psnr": {"mean": stat(np.mean, psnr), "p10": stat(lambda v: np.percentile(v, 10), psnr),
                 "min": stat(np.min, psnr), "max": stat(np.max, psnr)},
        "prune_ratio": {"mean": stat(np.mean, ratio), "histogram": prune_histogram(ratio)},
        "quantization": {"hidden_dtype": inr.hidden_dtype, "float_dtype": inr.float_dtype,
                         "pruning_masks": bool(inr.has_masks), "coded": bool(getattr(inr, "coded", False))},
        "prior": None if inr.prior is None else {"name": inr.prior.name, "bytes": len(inr.prior.to_bytes()),
                                                  "lr_scale": inr.prior.lr_scale is not None},
        "skipped": skipped,
        "unread": unread,
        "metadata": metadata,
    }
    if doc["quantization"]["coded"]:  # format 2: every parameter a code on the file's grid
        from .spec import param_groups

        grid = inr.grid
        doc["quantization"]["groups"] = [{"name": g.name, "bits": int(b), "step": float(st), "wrapped": bool(wr)}
                                         for g, b, st, wr in zip(param_groups(arch), grid.bits, grid.steps,
                                                                 grid.wrapped)]
    if per_image:
        keys = inr.keys or [""] * n
        doc["images"] = [{"index": i, "label": int(r["label"]), "height": int(r["height"]),
                          "width": int(r["width"]), "psnr": float(r["psnr"]),
                          "prune_ratio": float(r["prune_ratio"]), "key": keys[i]} for i, r in enumerate(index)]
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
        ("weights", "every parameter an entropy-coded integer; code bits " + ", ".join(
            dict.fromkeys(f"{g['name'].split('.')[0]} {g['bits']}" for g in q["groups"])))
        if q["coded"] else
        ("hidden weights", f"{q['hidden_dtype']}" + (", pruned (bitmaps)" if q["pruning_masks"] else "")
         + f"; first/last layers and biases {q['float_dtype']}"),
        ("file size", f"{doc['file_bytes']:,} bytes" + (f", {doc['bytes_per_image']:,.1f} bytes/image" if n else "")),
        ("fitted from", "a random initialisation" if doc["prior"] is None else
         f"prior {doc['prior']['name']!r} (stored in the file, {doc['prior']['bytes']:,} bytes"
         + (", with learned step sizes)" if doc["prior"]["lr_scale"] else ")")),
    ]
    if n:
        rows += [("PSNR (dB)", f"mean {p['mean']:.2f}, p10 {p['p10']:.2f}, min {p['min']:.2f}, max {p['max']:.2f}"),
                 ("prune ratio", f"mean {doc['prune_ratio']['mean']:.3f}")]
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
    for key, title in (("skipped", "skipped at convert (unreadable images)"),
                       ("unread", "not read at convert (not images of a supported kind)")):
        items = doc[key]
        if items:
            click.echo(f"{title}: {len(items)}")
            for item in items[:20]:
                click.echo(f"  {item.get('key', item) if isinstance(item, dict) else item}"
                           + (f": {item.get('reason')}" if isinstance(item, dict) and item.get("reason") else ""))
    if "load" in doc:
        ld = doc["load"]
        click.echo(f"bank: {ld['bank_bytes']:,} bytes ({ld['bank_layout']}, "
                   f"{ld['bank_bytes'] / max(ld['file_bytes'], 1):.2f}x the file) on {ld['device']}, "
                   f"loaded in {ld['load_seconds']:.3f} s")
    meta = {k: v for k, v in doc["metadata"].items() if k not in ("skipped", "unread")}
    if meta:
        click.echo("metadata:")
        for k in sorted(meta):
            v = meta[k]
            click.echo(f"  {k}: {v if len(v) <= 80 else v[:77] + '...'}")
    if "images" in doc:
        click.echo(f"{'index':>7} {'label':>6} {'height':>6} {'width':>6} {'psnr':>7} {'prune':>6}  key")
        for r in doc["images"]:
            click.echo(f"{r['index']:>7} {r['label']:>6} {r['height']:>6} {r['width']:>6} "
                       f"{r['psnr']:>7.2f} {r['prune_ratio']:>6.3f}  {r['key']}")


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document instead of a table.")
@click.option("--per-image", is_flag=True, help="Add one row per image.")
@click.option("--load", is_flag=True, help="Also load the file into a tensor bank and report its size and load time.")
@click.option("--device", default=None, help="Device for --load (default: cuda if available, else cpu).")
@click.option("--bank-layout", type=click.Choice(["auto", "dense", "compact", "coded"]), default="auto",
              show_default=True,
              help="Weight layout of the bank for --load (see inrfmt.open; coded: format 2's packed codes).")
def info(file, as_json, per_image, load, device, bank_layout):
    """Describe an .inr file: images, classes, network, size, PSNR, pruning. Every checksum is checked
    first (one pass over the file, no decompression): a damaged file exits 1 with the reason."""
    with _open_file(file) as inr:
        inr.verify_checksums()
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


# ------------------------------------------------------------------------------------------------- prior
@cli.command()
@click.argument("src")
@click.argument("out", type=click.Path(dir_okay=False, path_type=str))
@click.option("--preset", default="fast", show_default=True, metavar="NAME", help="The network the prior is for.")
@click.option("--images", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Learn on a random sample of this many images of SRC.")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Meta-learning (outer) steps; each fits 16 images for the first round of the preset's prior "
                   "schedule (default: the preset's: "
                   + ", ".join(f"{p.prior_steps} for {name}" for name, p in PRESETS.items()) + ").")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda|cuda:N")
@click.option("--max-side", type=click.IntRange(min=1), default=None,
              help="Learn on images downscaled to at most this many pixels on the long side.")
@click.option("--step-sizes", is_flag=True,
              help="Also learn a step-size multiplier for every weight (Meta-SGD, first order); it doubles the "
                   "prior's size.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--quiet", is_flag=True, help="No progress line.")
def prior(src, out, preset, images, steps, seed, device, max_side, step_sizes, overwrite, quiet):
    """Learn a prior for PRESET from the images of SRC into OUT (a prior file for `convert --prior OUT`).

    SRC: any source `convert` reads. The prior is the starting point of every image's fit, meta-learned
    (Reptile) so that the preset's short prior schedule fits images well.
    """
    import os
    from pathlib import Path

    from .metalearn import learn_prior
    from .workdir import check_out

    check_out(Path(out), overwrite)  # before the learning, not after it
    source_name = os.path.basename(os.path.abspath(src))
    learned = learn_prior(src, preset, images=images, steps=steps, seed=seed, device=device, max_side=max_side,
                          step_sizes=step_sizes, progress=not quiet, name=f"{preset} prior learned on {source_name}")
    try:
        learned.save(out)
    except OSError as e:
        raise InrUsageError(f"cannot write {out}: {e.strerror or e}") from None
    click.echo(f"wrote {out}: prior for {preset} ({len(learned.to_bytes()):,} bytes)", err=True)


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
def _size_option(ctx, param, value):
    """--size S (shorter side S, aspect ratio kept) or HxW (both) -> int or (h, w)."""
    if value is None:
        return None
    text = value.strip().lower()
    parts = text.split("x")
    if len(parts) in (1, 2) and all(p.isdigit() and int(p) > 0 for p in parts):
        return int(parts[0]) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    raise click.BadParameter(f"{value!r} is not S or HxW (positive integers, e.g. 64 or 44x40)")


SIZE_HELP = "S: shorter side S, aspect ratio kept (torchvision Resize); HxW: exactly H rows by W columns."


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option("--format", "fmt", type=click.Choice(["png", "jpeg", "h5"]), default="png", show_default=True,
              help="png/jpeg: OUT is a folder (an ImageFolder tree); h5: OUT is the HDF5 file to write.")
@click.option("--size", default=None, metavar="S|HxW", callback=_size_option,
              help=f"Decode at another size than each image's original. {SIZE_HELP}")
@click.option("--limit", type=click.IntRange(min=0), default=None, help="Export only the first N images.")
@click.option("--device", default=None, help="Decode on this device (default: cuda if available, else cpu).")
@click.option("--overwrite", is_flag=True, help="Write into a non-empty OUT folder, or replace the OUT file.")
def export(file, out, fmt, size, limit, device, overwrite):
    """Decode FILE back into an ImageFolder tree (class names and source file names kept) or one HDF5 file."""
    from .export import export as run_export

    _open_file(file).close()
    result = run_export(file, out, format=fmt, size=size, limit=limit, device=device, overwrite=overwrite)
    click.echo(f"exported {result['images']} images to {result['output']}", err=True)


# ------------------------------------------------------------------------------------------------- bench
# ----------------------------------------------------------------------------------------------- preview
@cli.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=str))
@click.argument("out", type=click.Path(dir_okay=False, path_type=str), metavar="OUT.png")
@click.option("--worst", type=click.IntRange(min=0), default=8, show_default=True,
              help="Show the N images with the lowest PSNR first.")
@click.option("--random", "random_", type=click.IntRange(min=0), default=8, show_default=True,
              help="Then N other images drawn at random.")
@click.option("--size", type=click.IntRange(min=8, max=4096), default=96, show_default=True,
              help="Longer side of each decoded tile, in pixels (aspect ratio kept).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random pick.")
@click.option("--device", default=None, help="Decode on this device (default: cuda if available, else cpu).")
def preview(file, out, worst, random_, size, seed, device):
    """Draw a grid of decoded images into OUT.png, the lowest-PSNR images first, each labelled with its
    index, class, source key and PSNR: a look at what the encoder did to the hardest images."""
    from .preview import preview as run_preview

    _open_file(file).close()
    result = run_preview(file, out, worst=worst, random=random_, size=size, seed=seed, device=device)
    click.echo(f"wrote {result['output']}: {len(result['worst'])} lowest-PSNR and {len(result['random'])} random "
               f"images ({result['width']}x{result['height']} pixels)", err=True)


# Sizes `bench` times on a file of mixed sizes when no --size is given (the most common first).
BENCH_SIZES = 4


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=str))
@click.option("--size", default=None, metavar="S|HxW", callback=_size_option,
              help="Decode at S x S or H x W (default: each of the file's most common native sizes).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--backend", "backends", multiple=True, type=click.Choice(["torch", "triton"]),
              help="Backend(s) to time (default: every one available here).")
@click.option("--device", default=None, help="Default: cuda if available, else cpu.")
@click.option("--bank-layout", type=click.Choice(["auto", "dense", "compact", "coded"]), default="auto",
              show_default=True,
              help="Weight layout of the bank (see inrfmt.open; coded: format 2's packed codes).")
@click.option("--json", "as_json", is_flag=True)
def bench(file, size, batch_size, backends, device, bank_layout, as_json):
    """Decode throughput (img/s) of each available backend on this machine, and load time. A file of mixed
    sizes is timed at each of its most common native sizes."""
    from .bench import benchmark, common_sizes
    from .data import open as open_dataset

    _open_file(file).close()
    with open_dataset(file, device=device, bank_layout=bank_layout) as ds:
        if size is None:
            sizes = common_sizes(ds.sizes, BENCH_SIZES)
            distinct = len(common_sizes(ds.sizes, len(ds)))
        else:
            sizes, distinct = [((size, size) if isinstance(size, int) else size) + (None,)], None
        runs = [(benchmark(ds.bank, size=(h, w), batch_size=batch_size, backends=list(backends) or None), count)
                for h, w, count in sizes]
        result = {k: v for k, v in runs[0][0].items() if k not in ("size", "results", "backends")}
        result["sizes"] = [{"size": r["size"], "images": count} for r, count in runs]
        result["native_sizes"] = distinct
        result["results"] = [dict(row, images=count) for r, count in runs for row in r["results"]]
        result["load"] = ds.stats()
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    if distinct and distinct > 1:
        click.echo(f"{distinct} native sizes; timing the {len(sizes)} most common (images of that size in brackets)")
    for row in result["results"]:
        where = f"({row.get('size')}, batch {batch_size})" + (f" [{row['images']} images]" if distinct and distinct > 1
                                                                else "")
        click.echo(f"{row['backend']:>7}: {row['img_per_s']:>12,.0f} img/s  {where}" if "img_per_s" in row
                   else f"{row['backend']:>7}: {row.get('error', 'unavailable')} {where}")
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
        sys.exit(0 if exc.ctx is not None and exc.ctx.parent is None else EXIT_USAGE)
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
