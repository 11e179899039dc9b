"""`convert`: encode every image of a source into one .inr file, batch by batch, resumably.

Finished batches are written as small part files into a work directory beside OUT (`workdir.WorkDir`);
OUT is made from them by `writer.merge_files` (temp + fsync + rename) and the work directory is then
removed. `resume=True` reuses valid parts written with the same settings (`saved_options(out)` gives the
arguments of the interrupted run). Ctrl-C (or SIGTERM under the CLI) raises `InrInterrupted`, whose
message says how many batches are saved and the command that resumes. A bad source item is skipped with a
warning naming it and listed in the metadata key "skipped" (JSON list of {"key", "reason"}), or with
on_error="fail" stops the run with an InrUsageError naming it. Files of SRC that no source reads are named
in a warning and in the metadata key "unread" (same form). Every image's source key is stored in the file
(format 1.1 `keys` section). Shards and torchrun: `shards`.

Every image is fitted from a random start or from a learned prior (`prior=`): the preset's built-in one,
one learned first on a sample of SRC (kept in the work directory, so a resume does not learn it again), or
a prior file. The prior is stored in OUT (format 1.1 `prior` section).

The coded presets (`small`, `large`; `Preset.coded`) write format 2.0: every batch is fitted with
quantization-aware training on the preset's code grid (`bits=` overrides code widths) and its integer codes
go into the part file; the final merge fits one probability table per parameter group over all images.
They do not prune. `preset="auto"` picks `small` or `large` from the longest side of a sample of SRC
(`auto_preset`).

Metadata (all strings): encoder, preset, steps (round 1), schedule, seed, source, source_kind, device,
batch_size, max_side, pixel_fraction, jitter, tf32, prune, prune_rule, quant (format 1) or code_bits
(format 2, JSON {class: width}), prior (unless none), torch_version, skipped, unread (unread_count when more
files than it names); and unless `reproducible`: created, device_name, img_steps, img_steps_per_s,
encode_seconds, prior_seconds (learning a prior).
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from . import device as devices
from .checks import check_choice, check_fraction, check_int
from .errors import InrFormatError, InrInterrupted, InrUsageError
from .fit import cap_size, fit_images, per_image_loss
from .grid import CodeGrid
from .prior import Prior
from .presets import ADAM_BETA2, AUTO_LARGE, AUTO_SMALL, AUTO_SMALL_SIDE, PRESETS, Preset, Round, get_preset
from .progress import ProgressLine, duration
from .quantize import HIDDEN_DTYPE_OF_BITS
from .shards import (distributed_rank, file_summary, merge, parse_shard, part_path, reuse_shard_file, shard_items,
                     wait_for_parts)
from .spec import FLOAT_DTYPES
from .workdir import WorkDir, check_out, json_text, read_settings, settings_hash
from .writer import InrWriter, merge_files

# Fitting images above this many pixels (without --max-side) gets a one-time hint.
LARGE_FIT_PIXELS = 1024 * 1024
# `--prior learn` learns on a seeded random sample of at most this many images of SRC, within this share of
# the conversion's fitting work (image-steps).
LEARN_SAMPLE_IMAGES = 1024
LEARN_SHARE = 0.1
PRIOR_CHOICES = ("auto", "builtin", "learn", "none")
# `preset="auto"` looks at the sizes of this many readable images of SRC (a seeded random sample, the same
# every run), trying at most AUTO_TRIES items.
AUTO_SAMPLE = 16
AUTO_TRIES = 256
# Settings that may differ between the machines of one sharded run without changing its output.
_PER_MACHINE_SETTINGS = ("shard", "source", "device", "tf32", "torch_compile")


class LoadedItem(NamedTuple):
    """One readable source item: `original` pixels (the index PSNR is measured on them) and `fit_image`
    (the same image capped to max_side, what the network is fitted to)."""

    index: int
    key: str
    label: int
    original: np.ndarray
    fit_image: np.ndarray


class BadItem(NamedTuple):
    index: int
    key: str
    reason: str


@dataclass(frozen=True)
class Settings:
    """Everything that decides what a convert writes, resolved and validated (see `convert`)."""

    preset: Preset
    schedule: tuple[Round, ...]
    batch_size: int
    seed: int
    device: torch.device
    max_side: int | None
    pixel_fraction: float
    jitter: float
    tf32: bool
    quant: int | None  # format 1: bits of the hidden weights; None for a coded preset
    prune: bool
    float_dtype: str | None  # format 1: storage of the first/last layers and biases; None for a coded preset
    torch_compile: bool
    shard: tuple[int, int] | None
    h5_images: str | None = None
    h5_labels: str | None = None
    reproducible: bool = False
    prior_choice: str = "none"  # "none", "builtin", "learn", or the path of a prior file
    prior: Prior | None = None  # the prior itself (for "learn": once learned)
    code_bits: dict | None = None  # a coded preset's code width per class (its own, or as `bits` set them)

    @property
    def grid(self) -> CodeGrid | None:
        """The code grid of a coded preset's file (format 2); None for format 1."""
        return None if self.code_bits is None else self.preset.grid(self.code_bits)

    @property
    def hidden_dtype(self) -> str:
        return HIDDEN_DTYPE_OF_BITS[self.quant]

    @property
    def has_masks(self) -> bool:
        return self.prune and any(r.prune != "none" for r in self.schedule)

    def record(self, src, source) -> dict:
        """The JSON record kept in the work directory; a resume must match it exactly."""
        n = len(source)
        record = {
            "settings_version": 1,
            "source": os.path.abspath(os.fspath(src)) if not isinstance(src, (list, tuple))
            else [os.path.abspath(os.fspath(p)) for p in src],
            "source_kind": getattr(source, "kind", type(source).__name__),
            "source_items": n,
            "source_first_key": source.key(0) if n else None,
            "source_last_key": source.key(n - 1) if n else None,
            "classes": list(source.classes),
            "preset": self.preset.name,
            "arch": asdict(self.preset.arch),
            "schedule": schedule_json(self.schedule),
            "prune_rule": asdict(self.preset.prune_rule) if self.preset.prune_rule else None,
            "prune": self.prune,
            "quant": self.quant,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "device": self.device.type,
            "max_side": self.max_side,
            "pixel_fraction": self.pixel_fraction,
            "jitter": self.jitter,
            "tf32": self.tf32,
            "shard": None if self.shard is None else f"{self.shard[0]}/{self.shard[1]}",
            "torch_compile": self.torch_compile,
            "float_dtype": self.float_dtype,
            "h5_images": self.h5_images,
            "h5_labels": self.h5_labels,
            "reproducible": self.reproducible,
            "prior": self.prior_choice,
            "prior_sha256": None if self.prior is None else hashlib.sha256(self.prior.to_bytes()).hexdigest(),
        }
        if self.code_bits is not None:  # format 1 records keep their keys (and hashes): older work dirs resume
            record["code_bits"] = dict(self.code_bits)
            record["code_ranges"] = dict(self.preset.code_ranges)
        return record


def schedule_json(rounds) -> list[dict]:
    """The rounds as JSON objects (settings record, metadata): `qat`, `continues` and `beta2` only where they
    differ from their defaults, so the paper schedules are written as they always were."""
    out = []
    for r in rounds:
        d = asdict(r)
        for key, default in (("qat", False), ("continues", False), ("beta2", ADAM_BETA2)):
            if d[key] == default:
                del d[key]
        out.append(d)
    return out


def saved_options(out) -> dict:
    """The `convert` arguments of the interrupted run whose work directory is OUT.work/ (src and out
    included), from its settings record: `convert(**saved_options(out), resume=True)` finishes it."""
    record, where = read_settings(Path(os.fspath(out)))
    try:
        schedule = record["schedule"]
        preset = record["preset"]
        if record["prior"] == "given":
            raise InrUsageError(f"cannot resume from {where}: it was fitted from a Prior object; call inrfmt.convert "
                                f"with the same prior and resume=True")
        if preset not in PRESETS:
            raise InrUsageError(f"cannot resume from {where}: preset {preset!r} is not a built-in preset; call "
                                f"inrfmt.convert with the same Preset and resume=True")
        options = {
            "src": record["source"], "out": os.fspath(out), "preset": preset,
            "steps": schedule[0]["steps"], "batch_size": record["batch_size"], "device": record["device"],
            "seed": record["seed"], "max_side": record["max_side"], "shard": record["shard"],
            "prune": record["prune"], "quant": record["quant"], "float_dtype": record["float_dtype"],
            "pixel_fraction": record["pixel_fraction"], "jitter": record["jitter"], "tf32": record["tf32"],
            "torch_compile": record["torch_compile"], "h5_images": record["h5_images"],
            "h5_labels": record["h5_labels"], "reproducible": record["reproducible"], "prior": record["prior"],
            "bits": record.get("code_bits"),
        }
    except (KeyError, IndexError, TypeError):
        raise InrUsageError(f"cannot resume from {where}: it was written by another version of inrfmt; rerun "
                            f"the convert command with all its options and --resume") from None
    return options


def convert(src, out, *, preset="fast", steps=None, batch_size=None, device="auto", seed=0,
            overwrite=False, resume=False, max_side=None, on_error="skip", shard=None,
            prune=True, quant=None, reproducible=False, progress=True, h5_images=None, h5_labels=None,
            pixel_fraction=None, jitter=None, tf32=None, torch_compile=False, float_dtype=None,
            prior="auto", bits=None) -> dict:
    """Encode every image of SRC (see `sources.open_source`) into the .inr file OUT.

    preset: a preset name or `presets.Preset`; "auto" (the command line's default) picks `small` or `large`
    from SRC's image sizes (`auto_preset`). steps: round-1 steps (later rounds scale by the same
    factor); batch_size: images fitted at once (None: the preset's for the device); shard: "K/N" to
    encode only that share into a part file; prune=False leaves out the pruning rounds (the coded presets
    never prune); quant: bits of the hidden weights of a format-1 preset (8, the default, = int8 with
    per-image per-layer scales, 16/32 = float); bits: code widths of a coded preset: an int (hidden_w's),
    "CLASS=N,..." or {class: N} over the preset's (`Preset.code_widths`); pixel_fraction: fraction of each
    image's pixels fitted per step; jitter: fraction of the samples moved to a random point of their
    pixel cell (None: the preset's); tf32: TF32 matmuls on CUDA (None: the preset's); torch_compile:
    compile the loss; float_dtype: storage of the first/last layers and biases of a format-1 preset
    ("float32", the default, or "float16");
    reproducible: leave timing and host keys out of the metadata. prior: where every fit starts: "none"
    (a random SIREN initialisation), "builtin" (the preset's shipped prior), "learn" (a prior learned first
    on a sample of SRC, within LEARN_SHARE of the conversion's fitting work), a prior file's path or a
    `Prior`; "auto" is the preset's choice (`Preset.prior`). From a prior the preset's prior schedule runs.

    Returns a summary dict: out, preset (its name; with "auto", preset_reason says why), num_images,
    skipped, skipped_items, psnr_mean, prune_ratio_mean, img_steps_per_s, fit_seconds, seconds, batches,
    batches_encoded, batches_reused, shard, rank, prior, prior_seconds (learning the prior; 0 otherwise)."""
    t_start = time.perf_counter()
    auto = isinstance(preset, str) and preset == "auto"
    preset_obj = None if auto else get_preset(preset) if isinstance(preset, str) else preset
    if not auto and not isinstance(preset_obj, Preset):
        raise InrUsageError(f"unknown preset {preset!r} (choose from: auto, {', '.join(PRESETS)})")
    steps = None if steps is None else check_int("steps", steps, 1)
    batch_size = None if batch_size is None else check_int("batch_size", batch_size, 1)
    max_side = None if max_side is None else check_int("max_side", max_side, 1)
    seed = check_int("seed", seed)
    check_choice("on_error", on_error, ("skip", "fail"))
    if quant is not None and quant not in HIDDEN_DTYPE_OF_BITS:
        raise InrUsageError(f"quant must be one of {', '.join(map(str, HIDDEN_DTYPE_OF_BITS))}, got {quant!r}")
    if float_dtype is not None:
        check_choice("float_dtype", float_dtype, FLOAT_DTYPES)
    if pixel_fraction is not None:
        pixel_fraction = check_fraction("pixel_fraction", pixel_fraction, zero_ok=False)
    if jitter is not None:
        jitter = check_fraction("jitter", jitter, what="the fraction of fitting samples jittered")
    if not auto:  # mistakes in the options are reported before SRC is read
        code_bits = _check_coding_options(preset_obj, quant, float_dtype, bits)
        prior_choice, prior_obj = resolve_prior(prior, preset_obj)
    shard_kn = parse_shard(shard)
    dist_info = None if shard_kn is not None else distributed_rank()
    dev = devices.resolve(device, local_rank=dist_info[2] if dist_info else None)
    if dist_info is not None and dev.type == "cuda":
        torch.cuda.set_device(dev)  # one GPU per rank; also the default for any tensor made without a device

    out_path = Path(os.fspath(out))
    check_out(out_path, overwrite)
    if src is None:
        raise InrUsageError("SRC not given")
    from .sources import open_source

    source = open_source(src, h5_images=h5_images, h5_labels=h5_labels)
    reason = None
    if auto:
        name, reason = auto_preset(source, max_side)
        preset_obj = get_preset(name)
        code_bits = _check_coding_options(preset_obj, quant, float_dtype, bits, f" (picked by --preset auto: {reason})")
        prior_choice, prior_obj = resolve_prior(prior, preset_obj)
        if progress and (dist_info is None or dist_info[0] == 0):
            print(f"inrfmt: --preset auto: {name}, {reason}", file=sys.stderr)
    coded = code_bits is not None

    rank = None
    target = out_path  # the file this process writes
    if dist_info is not None:
        rank, world, _ = dist_info
        shard_kn = (rank, world)
        target = Path(part_path(out_path, rank, world))
        check_out(target, overwrite or resume, "part file")
    settings = Settings(
        preset=preset_obj, schedule=preset_obj.schedule(steps, prune=prune, prior=prior_choice != "none"),
        batch_size=batch_size or preset_obj.batch_size(dev.type), seed=seed, device=dev, max_side=max_side,
        pixel_fraction=float(pixel_fraction or preset_obj.pixel_fraction(dev.type)),
        jitter=float(preset_obj.jitter if jitter is None else jitter),
        tf32=(preset_obj.tf32 if tf32 is None else bool(tf32)) and dev.type == "cuda",
        quant=None if coded else int(quant or 8), prune=bool(prune) and not coded,
        float_dtype=None if coded else float_dtype or "float32", torch_compile=bool(torch_compile),
        shard=shard_kn, h5_images=h5_images, h5_labels=h5_labels, reproducible=bool(reproducible),
        prior_choice=prior_choice, prior=prior_obj, code_bits=code_bits)
    learn_plan = _check_learnable(settings, len(source)) if prior_choice == "learn" else None
    record = settings.record(src, source)
    run_hash = settings_hash({k: v for k, v in record.items() if k not in _PER_MACHINE_SETTINGS})
    metadata = _base_metadata(settings, record, src, reproducible)
    if shard_kn is not None:
        metadata.update(shard=f"{shard_kn[0]}/{shard_kn[1]}", settings_hash=run_hash)

    # A finished part of a torchrun rank (resume after rank 0 died in the merge) is not redone.
    summary = None
    if dist_info is not None and resume and target.exists():
        summary = reuse_shard_file(target, run_hash, shard_kn)
    if summary is None:
        work = WorkDir.open(target, record, overwrite=overwrite, resume=resume)
        prior_seconds = 0.0
        if learn_plan is not None:
            settings, prior_seconds = _learned_prior(settings, source, work, progress, *learn_plan)
        resume_command = (f"inrfmt convert --resume {shlex.quote(os.fspath(out))}" if dist_info is None
                          else "the same torchrun command with --resume")
        summary = _Encoder(settings, source, target, work, record, metadata, on_error=on_error, resume=resume,
                           reproducible=reproducible, progress=progress, resume_command=resume_command,
                           prior_seconds=prior_seconds).run()
    summary["rank"] = rank
    summary["preset"] = preset_obj.name
    if reason is not None:
        summary["preset_reason"] = reason
    if dist_info is not None and rank == 0:
        world = dist_info[1]
        parts = [part_path(out_path, r, world) for r in range(world)]
        wait_for_parts(parts, run_hash, world, progress)
        merge(out_path, parts, overwrite=overwrite, reproducible=reproducible)
        for p in parts:
            os.unlink(p)
        summary.update(file_summary(out_path))
        summary["out"] = str(out_path)
    summary["seconds"] = time.perf_counter() - t_start
    return summary


def auto_preset(source, max_side: int | None = None) -> tuple[str, str]:
    """(preset name, why) for `preset="auto"`: AUTO_SMALL when the longest fitting side (capped to
    max_side) among AUTO_SAMPLE readable images of `source` is at most AUTO_SMALL_SIDE, else AUTO_LARGE. The
    images are the first readable ones of a seeded random order of the items (at most AUTO_TRIES tried), the
    same every run, so a resume picks the same preset. InrUsageError when none of them is readable."""
    n = len(source)
    order = np.random.default_rng([0, n]).permutation(n)[:AUTO_TRIES]
    sides, tried = [], 0
    for i in order:
        tried += 1
        good, _ = _load_batch(source, int(i), int(i) + 1, max_side)
        sides += [max(g.fit_image.shape[:2]) for g in good]
        if len(sides) == AUTO_SAMPLE:
            break
    if not sides:
        raise InrUsageError(f"--preset auto: none of the {tried} item(s) of SRC tried is a readable image; "
                            f"choose a preset with --preset ({', '.join(PRESETS)})")
    longest = max(sides)
    name = AUTO_SMALL if longest <= AUTO_SMALL_SIDE else AUTO_LARGE
    capped = f" after --max-side {max_side}" if max_side is not None else ""
    why = (f"the longest side{capped} in a sample of {len(sides)} of {n} images is {longest} px "
           f"({'<=' if name == AUTO_SMALL else '>'} {AUTO_SMALL_SIDE})")
    return name, why


def _check_coding_options(preset: Preset, quant, float_dtype, bits, why: str = "") -> dict | None:
    """The code widths of a coded preset (its own, overridden by `bits`), None for a format-1 preset; an
    InrUsageError for an option of the other format (`why` says how the preset was chosen)."""
    if not preset.coded:
        if bits is not None:
            preset.code_widths(bits, why)  # the one error for code widths given to a format-1 preset
        return None
    for name, value in (("quant", quant), ("float_dtype", float_dtype)):
        if value is not None:
            raise InrUsageError(f"{name} {value} applies to format-1 presets: preset {preset.name}{why} codes "
                                f"every parameter (set its code widths with bits, e.g. --bits 5)")
    return preset.code_widths(bits, why)


def resolve_prior(prior, preset: Preset) -> tuple[str, Prior | None]:
    """(choice, Prior or None) for convert's `prior` argument: choice is "none", "builtin", "learn" or the
    prior file's absolute path (what the settings record keeps)."""
    if isinstance(prior, Prior):
        choice, value = "given", prior
    elif isinstance(prior, (str, os.PathLike)):
        name = os.fspath(prior)
        if name == "auto":
            name = preset.prior
        if name in ("none", "learn"):
            return name, None
        if name == "builtin":
            choice, value = "builtin", Prior.builtin(preset.name)
        else:
            if not os.path.isfile(name):
                raise InrUsageError(f"prior must be one of {', '.join(PRIOR_CHOICES)} or a prior file, got {name!r} "
                                    f"(no such file)")
            choice, value = os.path.abspath(name), Prior.load(name)
    else:
        raise InrUsageError(f"prior must be one of {', '.join(PRIOR_CHOICES)}, a prior file or a Prior, got {prior!r}")
    value.check_arch(preset.arch, f"prior {choice}", f"preset {preset.name}")
    return choice, value


def _learn_steps(settings: Settings, num_images: int) -> tuple[int, int]:
    """(outer steps of `--prior learn` within LEARN_SHARE of fitting num_images, the fewest images that
    afford one outer step)."""
    from .metalearn import META_BATCH, MIN_IMAGES, learn_budget_steps

    per_image = sum(r.steps for r in settings.schedule)
    inner = settings.schedule[0].steps  # each outer step runs the first round of this very schedule
    fewest = max(MIN_IMAGES, math.ceil(META_BATCH * inner / (LEARN_SHARE * per_image)))
    return learn_budget_steps(settings.preset, num_images, per_image, inner, LEARN_SHARE, META_BATCH), fewest


def _check_learnable(settings: Settings, num_images: int) -> tuple[int, int]:
    """_learn_steps, or an InrUsageError when SRC is too small to pay for one meta-learning step."""
    steps, fewest = _learn_steps(settings, num_images)
    if steps == 0:
        raise InrUsageError(f"--prior learn: SRC has {num_images} images; learning a prior within "
                            f"{LEARN_SHARE:.0%} of the conversion needs at least {fewest} for preset "
                            f"{settings.preset.name} (use --prior builtin or none)")
    return steps, fewest


def _learned_prior(settings: Settings, source, work: WorkDir, progress: bool, steps: int,
                   fewest: int) -> tuple[Settings, float]:
    """Settings with the prior of `--prior learn`: the one saved in the work directory (a resumed run), or
    one learned now (`steps` outer steps) on a seeded sample of SRC, which must hold `fewest` readable
    images, and saved there. Returns it with the seconds spent."""
    from dataclasses import replace

    from .metalearn import learn_prior

    saved = work.prior_file
    if saved.exists():
        try:
            return replace(settings, prior=Prior.load(saved)), 0.0
        except InrFormatError:  # cut off or damaged: learn it again
            saved.unlink()
    t0 = time.perf_counter()
    images = sample_images(source, LEARN_SAMPLE_IMAGES, settings.seed, settings.max_side)
    if len(images) < fewest:
        if not work.holds_work():  # a fresh run leaves nothing behind
            work.remove()
        raise InrUsageError(f"--prior learn: only {len(images)} readable images in the sample of SRC; a prior "
                            f"needs at least {fewest}")
    prior = learn_prior(images, settings.preset, steps=steps, inner=settings.schedule[0],
                        seed=settings.seed, device=settings.device, progress=progress,
                        name=f"learned on {len(images)} images of SRC")
    prior.save(saved)
    return replace(settings, prior=prior), time.perf_counter() - t0


class _Encoder:
    """One process's share of a convert: its batches, fitted into the work directory, then merged."""

    def __init__(self, settings: Settings, source, target: Path, work: WorkDir, record: dict, metadata: dict, *,
                 on_error: str, resume: bool, reproducible: bool, progress: bool, resume_command: str,
                 prior_seconds: float = 0.0):
        self.prior_seconds = prior_seconds
        self.settings, self.source, self.target, self.work = settings, source, target, work
        self.record, self.metadata = record, metadata
        self.on_error, self.resume, self.reproducible, self.show_progress = on_error, resume, reproducible, progress
        self.resume_command = resume_command
        self.grid = settings.grid
        self.part_hash = settings_hash(record)
        self.num_items = len(source)
        self.items = shard_items(self.num_items, settings.shard)
        size = settings.batch_size
        self.batches = range(-(-len(self.items) // size))
        self.ranges = {b: (self.items.start + b * size, min(self.items.stop, self.items.start + (b + 1) * size))
                       for b in self.batches}

    def run(self) -> dict:
        s = self.settings
        infos: dict[int, dict] = {}
        todo = []
        for b in self.batches:
            info = self.work.valid_part(b, self.part_hash, *self.ranges[b]) if self.resume else None
            if info is not None:
                infos[b] = info
            else:
                todo.append(b)
        progress = _Progress(self, infos)
        unread = list(getattr(self.source, "unread", []))
        unread_count = getattr(self.source, "unread_count", len(unread))
        if unread:
            shown = ", ".join(item["key"] for item in unread[:5]) + (", ..." if unread_count > 5 else "")
            progress.write(f"inrfmt: warning: {unread_count} file(s) of SRC are not read ({shown}): not images of "
                           f"a supported kind; listed in the file's metadata key 'unread'")
        prev_precision = torch.get_float32_matmul_precision()
        if s.tf32:
            torch.set_float32_matmul_precision("high")
        compiled_loss = torch.compile(per_image_loss) if s.torch_compile else None
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="inrfmt-load")
        try:
            futures = {}

            def submit(pos):
                if pos < len(todo) and todo[pos] not in futures:
                    futures[todo[pos]] = pool.submit(_load_batch, self.source, *self.ranges[todo[pos]], s.max_side)

            submit(0)
            for pos, b in enumerate(todo):
                good, bad = futures.pop(b).result()
                submit(pos + 1)  # the next batch loads while this one fits
                self._report_bad(bad, infos, progress)
                progress.batch_started(b, len(good))
                infos[b] = self._encode_batch(b, good, bad, progress, compiled_loss)
                progress.batch_done(infos[b], *self.ranges[b])
        except KeyboardInterrupt:
            progress.close()
            # A batch stopped right after its part file was renamed into place is saved too.
            saved = sum(1 for b in self.batches if b in infos or (
                b in todo and self.work.valid_part(b, self.part_hash, *self.ranges[b]) is not None))
            raise InrInterrupted(f"interrupted: {saved} of {len(self.batches)} batches are saved in {self.work.path}; "
                                 f"resume with: {self.resume_command}") from None
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            torch.set_float32_matmul_precision(prev_precision)
            progress.close()
        return self._finish(infos, encoded=len(todo), unread=unread, unread_count=unread_count)

    def _report_bad(self, bad: list[BadItem], infos: dict, progress: "_Progress") -> None:
        for item in bad:
            if self.on_error == "fail":
                where = self.record["source"] if isinstance(self.record["source"], str) else "SRC"
                if infos:  # keep finished work for --resume; nothing else is left behind
                    kept = f"finished batches are kept in {self.work.path}: rerun with --resume after fixing it"
                else:
                    self.work.remove()
                    kept = "no output written"
                raise InrUsageError(f"bad image {item.key} in {where}: {item.reason} (stopped by --on-error fail; "
                                    f"{kept}; --on-error skip skips such files)")
            progress.write(f"inrfmt: warning: skipping {item.key}: {item.reason}")

    def _encode_batch(self, b: int, good: list[LoadedItem], bad: list[BadItem], progress: "_Progress",
                      compiled_loss) -> dict:
        """Fit batch b's readable images and write its part file and info; returns the info."""
        s = self.settings
        progress.warn_large(good)
        start, stop = self.ranges[b]
        t0 = time.perf_counter()
        result = None
        if good:
            dtypes = {} if self.grid is not None else dict(hidden_dtype=s.hidden_dtype, float_dtype=s.float_dtype)
            result = fit_images([g.fit_image for g in good], s.preset.arch, s.schedule,
                                prune_rule=s.preset.prune_rule, seed=s.seed,
                                image_ids=[g.index for g in good], device=s.device, pixel_fraction=s.pixel_fraction,
                                jitter=s.jitter, originals=[g.original for g in good],
                                on_step=progress.step, compiled_loss=compiled_loss,
                                prior=s.prior, grid=self.grid, **dtypes)
        info = {
            "batch": b, "start": start, "stop": stop, "settings_hash": self.part_hash,
            "num_images": len(good),
            "skipped": [{"key": item.key, "reason": item.reason} for item in bad],
            "psnr_sum": float(np.sum(result.psnr.astype(np.float64))) if result else 0.0,
            "img_steps": int(result.img_steps) if result else 0,
            "seconds": time.perf_counter() - t0,
        }
        self.work.write_info(b, info)
        with self._writer(self.work.part_file(b), metadata={}) as writer:
            if result is not None and self.grid is not None:
                writer.add_codes(result.codes, labels=[g.label for g in good],
                                 heights=[g.original.shape[0] for g in good],
                                 widths=[g.original.shape[1] for g in good],
                                 psnr=np.nan_to_num(result.psnr, nan=0.0, posinf=99.0, neginf=0.0),
                                 keys=[g.key for g in good])
            elif result is not None:
                weights = result.weights
                if not s.has_masks:
                    weights.mask = None
                writer.add(weights, labels=[g.label for g in good],
                           heights=[g.original.shape[0] for g in good], widths=[g.original.shape[1] for g in good],
                           psnr=np.nan_to_num(result.psnr, nan=0.0, posinf=99.0, neginf=0.0),
                           prune_ratio=result.prune_ratio if s.has_masks else np.zeros(len(good)),
                           keys=[g.key for g in good])
        return info

    def _writer(self, path, metadata: dict) -> InrWriter:
        s = self.settings
        if self.grid is not None:
            return InrWriter(path, s.preset.arch, grid=self.grid, classes=self.source.classes, metadata=metadata,
                             prior=s.prior)
        return InrWriter(path, s.preset.arch, hidden_dtype=s.hidden_dtype, float_dtype=s.float_dtype,
                         has_masks=s.has_masks, classes=self.source.classes, metadata=metadata, prior=s.prior)

    def _finish(self, infos: dict, encoded: int, unread: list, unread_count: int) -> dict:
        """Merge the parts into the target file; the summary of the run."""
        s = self.settings
        ordered = [infos[b] for b in self.batches]
        skipped = [item for info in ordered for item in info["skipped"]]
        num_images = sum(info["num_images"] for info in ordered)
        if num_images == 0 and s.shard is None:
            self.work.remove()
            raise InrUsageError(f"no readable images in SRC {self.record['source']} ({len(skipped)} skipped)")
        total_seconds = sum(info["seconds"] for info in ordered)
        total_img_steps = sum(info["img_steps"] for info in ordered)
        rate = total_img_steps / total_seconds if total_seconds > 0 else 0.0
        meta = dict(self.metadata)
        meta["skipped"] = json_text(skipped)
        meta["unread"] = json_text(unread)
        if unread_count > len(unread):  # the list names the first ones only
            meta["unread_count"] = str(unread_count)
        if s.shard is not None:
            meta["shard_items"] = f"{self.items.start}:{self.items.stop}"
            meta["source_items"] = str(self.num_items)
        if not self.reproducible:
            meta["img_steps_per_s"] = f"{rate:.1f}"
            meta["encode_seconds"] = f"{total_seconds:.3f}"
            meta["img_steps"] = str(total_img_steps)
            if self.prior_seconds:
                meta["prior_seconds"] = f"{self.prior_seconds:.3f}"
        if len(self.batches):
            merge_files([self.work.part_file(b) for b in self.batches], self.target, metadata=meta)
        else:  # an empty shard (more shards than batches) still gets its part file
            with self._writer(self.target, metadata=meta):
                pass
        self.work.remove()
        summary = file_summary(self.target)
        summary.update(out=str(self.target), batches=len(self.batches), batches_encoded=encoded,
                       batches_reused=len(self.batches) - encoded, img_steps_per_s=rate, fit_seconds=total_seconds,
                       shard=None if s.shard is None else f"{s.shard[0]}/{s.shard[1]}",
                       prior=s.prior_choice, prior_seconds=self.prior_seconds)
        return summary


class _Progress:
    """Progress of a convert on stderr (a `progress.ProgressLine`): images done of the total, and steps
    of the batch being fitted."""

    def __init__(self, encoder: _Encoder, reused: dict):
        s = encoder.settings
        self.out = ProgressLine(encoder.show_progress)
        self.name = f"convert {s.preset.name}" + (f" shard {s.shard[0]}/{s.shard[1]}" if s.shard else "")
        self.steps_per_image = sum(r.steps for r in s.schedule)
        self.total_images = len(encoder.items)
        self.total_batches = len(encoder.batches)
        self.done_images = sum(encoder.ranges[b][1] - encoder.ranges[b][0] for b in reused)
        self.psnr_sum = sum(i["psnr_sum"] for i in reused.values())
        self.psnr_count = sum(i["num_images"] for i in reused.values())
        self.fit_seconds = 0.0
        self.fit_img_steps = 0
        self.batch_images = 0  # images of the batch being fitted, and its steps done
        self.batch_steps = 0
        self.batch_number = 0
        self.batch_start = time.perf_counter()
        self.warned_large = False

    # -- events ---------------------------------------------------------------------------------------
    def batch_started(self, b: int, images: int) -> None:
        self.batch_number, self.batch_images, self.batch_steps = b + 1, images, 0
        self.batch_start = time.perf_counter()
        self._show()

    def step(self, k: int) -> None:
        """on_step for fit_images: k steps of the current batch are done."""
        self.batch_steps = k
        self._show()

    def batch_done(self, info: dict, start: int, stop: int) -> None:
        self.fit_seconds += info["seconds"]
        self.fit_img_steps += info["img_steps"]
        self.psnr_sum += info["psnr_sum"]
        self.psnr_count += info["num_images"]
        self.done_images += stop - start
        self.batch_images = self.batch_steps = 0
        self._show(force=self.out.terminal)

    def write(self, line: str) -> None:
        """A message line (warnings), kept apart from the progress line."""
        self.out.write(line)

    def warn_large(self, good: list[LoadedItem]) -> None:
        big = [g for g in good if g.fit_image.shape[0] * g.fit_image.shape[1] > LARGE_FIT_PIXELS]
        if big and not self.warned_large:
            h, w = big[0].fit_image.shape[:2]
            self.write(f"inrfmt: warning: {big[0].key} is fitted at {w}x{h}; large images fit slowly and need "
                       f"much memory: consider --max-side (e.g. 256)")
            self.warned_large = True

    def close(self) -> None:
        self.out.close()

    # -- the line -------------------------------------------------------------------------------------
    def rate(self) -> float | None:
        """img·steps/s so far (finished batches plus the current one), None before any step."""
        seconds = self.fit_seconds + (time.perf_counter() - self.batch_start if self.batch_steps else 0.0)
        work = self.fit_img_steps + self.batch_images * self.batch_steps
        return work / seconds if work and seconds > 0 else None

    def line(self) -> str:
        parts = [f"{self.name}: {self.done_images}/{self.total_images} images"]
        if self.batch_images:
            parts.append(f"batch {self.batch_number}/{self.total_batches} ({self.batch_images} images): "
                         f"step {self.batch_steps}/{self.steps_per_image}")
        rate = self.rate()
        if rate:
            parts.append(f"{rate:,.0f} {rate_unit()}")
        if self.psnr_count:
            parts.append(f"PSNR {self.psnr_sum / self.psnr_count:.2f} dB")
        if rate:
            left = (self.total_images - self.done_images) * self.steps_per_image - self.batch_images * self.batch_steps
            parts.append(f"ETA {duration(max(0.0, left) / rate)}")
        return ", ".join(parts)

    def _show(self, force: bool = False) -> None:
        if force or self.out.due():
            self.out.show(self.line(), force=True)


def rate_unit() -> str:
    try:  # "img·steps/s" where stderr can show it (a C-locale terminal may not)
        "·".encode(getattr(sys.stderr, "encoding", None) or "ascii")
        return "img·steps/s"
    except (UnicodeEncodeError, LookupError):
        return "img-steps/s"


def sample_images(source, count: int, seed: int, max_side: int | None) -> list[np.ndarray]:
    """The readable images among a seeded random sample of `count` items of `source` (all of them when it
    has fewer), in source order, capped to max_side."""
    n = len(source)
    pick = np.sort(np.random.default_rng([seed, n]).choice(n, size=min(n, count), replace=False))
    images = []
    for i in pick:
        good, _ = _load_batch(source, int(i), int(i) + 1, max_side)
        images += [g.fit_image for g in good]
    return images


def _load_batch(source, start: int, stop: int, max_side: int | None) -> tuple[list[LoadedItem], list[BadItem]]:
    """Items [start, stop) of `source`, read (and capped to max_side) by the prefetch thread."""
    from .sources import SourceItemError

    good, bad = [], []
    for i in range(start, stop):
        try:
            sample = source.load(i)
            image = np.ascontiguousarray(sample.image)
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape:
                raise SourceItemError(sample.key, f"source gave an array of shape {image.shape} {image.dtype}")
            good.append(LoadedItem(i, sample.key, int(sample.label), image, cap_size(image, max_side)))
        except SourceItemError as e:
            bad.append(BadItem(i, e.key, e.reason))
    return good, bad


def _base_metadata(settings: Settings, record: dict, src, reproducible: bool) -> dict:
    from . import __version__

    dev = settings.device
    meta = {
        "encoder": f"inrfmt {__version__}",
        "preset": settings.preset.name,
        "steps": str(record["schedule"][0]["steps"]),
        "schedule": json_text(record["schedule"]),
        "seed": str(settings.seed),
        "source": os.fspath(src) if not isinstance(src, (list, tuple)) else json_text([os.fspath(p) for p in src]),
        "source_kind": record["source_kind"],
        "device": dev.type,
        "batch_size": str(settings.batch_size),
        "max_side": "none" if settings.max_side is None else str(settings.max_side),
        "pixel_fraction": repr(settings.pixel_fraction),
        "jitter": repr(settings.jitter),
        "tf32": "yes" if settings.tf32 else "no",
        "prune": "yes" if settings.prune else "no",
        "torch_version": torch.__version__,
    }
    if settings.code_bits is None:
        meta["quant"] = str(settings.quant)
    else:
        meta["code_bits"] = json_text(settings.code_bits)
    if settings.prior_choice != "none":  # absent otherwise: --prior none writes the bytes it always wrote
        meta["prior"] = settings.prior_choice if settings.prior_choice != "given" else f"given ({settings.prior.name})"
    if settings.torch_compile:
        meta["torch_compile"] = "yes"
    if record["prune_rule"] and settings.prune:
        meta["prune_rule"] = json_text(record["prune_rule"])
    if not reproducible:
        import datetime

        meta["created"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        meta["device_name"] = devices.model_name(dev)
    return meta
