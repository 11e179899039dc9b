"""Scale-out: shards of a convert, torchrun ranks, and the shard-aware `merge`.

`--shard K/N` encodes a contiguous share of the images into a part file (metadata "shard" and
"settings_hash"): shard K of N gets images [K*M//N, (K+1)*M//N) of the M source items, so shares differ by
at most one image. `merge` checks that parts form one complete run and joins them in shard order. An
image's fit depends only on the run's settings and the image itself (inrfmt.fit), and the merged file is
chunked as one writer would chunk it, so merged shards are byte-identical to a single-process run, whatever
the number of shards (on one device and torch build). Under torchrun (RANK / WORLD_SIZE set, or an
initialised process group) each rank encodes shard RANK/WORLD_SIZE into OUT.part-RANK-of-WORLD, and rank
0 waits for every part and merges them.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from .errors import InrFormatError, InrUsageError
from .reader import InrFile
from .workdir import check_out, json_text
from .writer import merge_files


def parse_shard(shard) -> tuple[int, int] | None:
    """"K/N" (0-based K < N) -> (K, N); None -> None. InrUsageError for anything else."""
    if shard is None:
        return None
    if isinstance(shard, tuple) and len(shard) == 2:
        k, n = shard
    else:
        text = str(shard).strip()
        parts = text.split("/")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise InrUsageError(f"bad shard {shard!r}: expected K/N with 0 <= K < N, e.g. 0/4")
        k, n = int(parts[0]), int(parts[1])
    if not (isinstance(k, int) and isinstance(n, int)) or n < 1 or not 0 <= k < n:
        raise InrUsageError(f"bad shard {shard!r}: expected K/N with 0 <= K < N (K is 0-based), e.g. 0/4")
    return k, n

def distributed_rank() -> tuple[int, int, int | None] | None:
    """(rank, world_size, local_rank) under torchrun / an initialised process group with > 1 processes."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            local = os.environ.get("LOCAL_RANK")
            return dist.get_rank(), dist.get_world_size(), int(local) if local is not None else None
    except Exception:
        pass
    rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    if rank is None or world is None:
        return None
    try:
        rank_i, world_i = int(rank), int(world)
        local = os.environ.get("LOCAL_RANK")
        local_i = int(local) if local is not None else None
    except ValueError:
        raise InrUsageError(f"bad torchrun environment: RANK={rank!r} WORLD_SIZE={world!r}") from None
    if world_i <= 1:
        return None
    if not 0 <= rank_i < world_i:
        raise InrUsageError(f"bad torchrun environment: RANK={rank_i} not in [0, WORLD_SIZE={world_i})")
    return rank_i, world_i, local_i

# Metadata keys only a part file has: a merge of a complete set leaves them out, so it equals a single run.
SHARD_METADATA = ("shard", "settings_hash", "shard_items", "source_items")


def shard_items(num_items: int, shard: tuple[int, int] | None) -> range:
    """Source items of shard K of N: [K*M//N, (K+1)*M//N), floor(M/N) or ceil(M/N) of the M items."""
    if shard is None:
        return range(num_items)
    k, n = shard
    return range(k * num_items // n, (k + 1) * num_items // n)

def part_path(out, rank: int, world: int) -> str:
    """Where rank `rank` of a torchrun convert writes its shard."""
    return f"{os.fspath(out)}.part-{rank}-of-{world}"

def file_summary(path: Path) -> dict:
    with InrFile(path) as f:
        psnr = np.asarray(f.index["psnr"], np.float64)
        ratio = np.asarray(f.index["prune_ratio"], np.float64)
        n = int(f.num_images)
        try:
            skipped = json.loads(f.metadata.get("skipped", "[]"))
        except ValueError:
            skipped = []
    return {"num_images": n, "psnr_mean": float(psnr.mean()) if n else float("nan"),
            "prune_ratio_mean": float(ratio.mean()) if n else 0.0, "skipped": len(skipped),
            "skipped_items": skipped}

def reuse_shard_file(target: Path, settings_hash: str, shard_kn) -> dict | None:
    try:
        with InrFile(target) as f:
            f.verify()
            ok = (f.metadata.get("settings_hash") == settings_hash
                  and f.metadata.get("shard") == f"{shard_kn[0]}/{shard_kn[1]}")
    except InrFormatError:
        return None
    if not ok:
        return None
    summary = file_summary(target)
    summary.update(out=str(target), batches=0, batches_encoded=0, batches_reused=0, img_steps_per_s=float("nan"),
                   shard=f"{shard_kn[0]}/{shard_kn[1]}")
    return summary

def wait_for_parts(parts: list[str], settings_hash: str, world: int, progress: bool) -> None:
    """Rank 0: wait until every rank's part file exists and belongs to this run (polling: ranks can
    finish hours apart, longer than a process-group barrier's timeout; torchrun stops us if a rank dies)."""
    told = False
    while True:
        missing = []
        for r, p in enumerate(parts):
            ok = False
            if os.path.exists(p):
                try:
                    with InrFile(p) as f:
                        ok = (f.metadata.get("settings_hash") == settings_hash
                              and f.metadata.get("shard") == f"{r}/{world}")
                except InrFormatError:
                    ok = False
            if not ok:
                missing.append(p)
        if not missing:
            return
        if not told and progress:
            print(f"inrfmt: rank 0 waiting for {len(missing)} part file(s), e.g. {missing[0]}", file=sys.stderr)
            told = True
        time.sleep(0.5)

def merge(out, parts, overwrite: bool = False, reproducible: bool = False) -> None:
    """Join part files into OUT. Parts of one sharded convert (metadata "shard" = "K/N") are put in
    shard order and must be complete (every K of N once, same settings); other .inr files are joined
    in the order given. Skipped-image lists are combined; timing keys are summed (unless reproducible)."""
    out_path = Path(os.fspath(out))
    paths = [Path(os.fspath(p)) for p in parts]
    if not paths:
        raise InrUsageError("merge: no part files given")
    for p in paths:
        if not p.is_file():
            raise InrUsageError(f"merge: part file not found: {p}")
        if p.resolve() == out_path.resolve():
            raise InrUsageError(f"merge: OUT {out_path} is also one of the parts")
    check_out(out_path, overwrite)
    metas = []
    for p in paths:
        with InrFile(p) as f:
            metas.append(dict(f.metadata))
    sharded = ["shard" in m for m in metas]
    if any(sharded) and not all(sharded):
        plain = paths[sharded.index(False)]
        raise InrUsageError(f"merge: {plain} is not a shard part file but other parts are (from convert --shard)")
    meta: dict[str, str] = {}
    if all(sharded):
        keyed = []
        for p, m in zip(paths, metas):
            try:
                k, n = parse_shard(m["shard"])
            except InrUsageError:
                raise InrUsageError(f"merge: {p}: bad shard metadata {m['shard']!r}") from None
            keyed.append((k, n, p, m))
        ns = {n for _, n, _, _ in keyed}
        if len(ns) != 1:
            raise InrUsageError(f"merge: parts come from splits of different sizes (N = {sorted(ns)})")
        n = ns.pop()
        hashes = {m.get("settings_hash") for _, _, _, m in keyed}
        if len(hashes) != 1:
            a, b = keyed[0], next(x for x in keyed if x[3].get("settings_hash") != keyed[0][3].get("settings_hash"))
            differ = [k for k in ("preset", "steps", "seed", "prior", "quant", "code_bits", "prune")
                      if a[3].get(k) != b[3].get(k)]
            shown = ", ".join(f"{k}: {a[3].get(k, 'none')} vs {b[3].get(k, 'none')}" for k in differ)  # none: no prior
            raise InrUsageError(f"merge: {a[2]} and {b[2]} were encoded with different settings"
                                + (f" ({shown}); parts must share one prior and one schedule" if differ else ""))
        keyed.sort(key=lambda x: x[0])
        ks = [k for k, _, _, _ in keyed]
        if ks != list(range(n)):
            missing = sorted(set(range(n)) - set(ks))
            dup = sorted({k for k in ks if ks.count(k) > 1})
            what = (f"missing shard(s) {', '.join(f'{k}/{n}' for k in missing)}" if missing
                    else f"shard(s) given twice: {', '.join(f'{k}/{n}' for k in dup)}")
            raise InrUsageError(f"merge: incomplete set of parts: {what}")
        paths = [p for _, _, p, _ in keyed]
        metas = [m for _, _, _, m in keyed]
    for m in metas:
        meta.update(m)
    if all(sharded):
        for key in SHARD_METADATA:  # the merged file is what one process would have written
            meta.pop(key, None)
    skipped = []
    for p, m in zip(paths, metas):
        try:
            skipped.extend(json.loads(m.get("skipped", "[]")))
        except ValueError:
            raise InrUsageError(f"merge: {p}: metadata 'skipped' is not a JSON list") from None
    meta["skipped"] = json_text(skipped)
    if not reproducible and all("encode_seconds" in m and "img_steps" in m for m in metas):
        try:
            seconds = sum(float(m["encode_seconds"]) for m in metas)
            img_steps = sum(int(m["img_steps"]) for m in metas)
            meta["encode_seconds"] = f"{seconds:.3f}"
            meta["img_steps"] = str(img_steps)
            # Shards run in parallel: the aggregate rate is total work over the slowest shard's time.
            slowest = max(float(m["encode_seconds"]) for m in metas)
            meta["img_steps_per_s"] = f"{img_steps / slowest:.1f}" if slowest > 0 else "nan"
        except ValueError:
            pass
    merge_files(paths, out_path, metadata=meta, inherit_metadata=False)
