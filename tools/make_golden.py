"""Write the golden .inr files of spec/ and, for each, the JSON of what a reader must return.

    python tools/make_golden.py [--out spec]

Format 1: weights are seeded random SIREN-initialised networks (not fitted: the point is the bytes, not the
pictures). Format 2.0 (`coded_*`, CODED_CASES): seeded random codes within each group's width on a
hand-made grid, with or without a random prior. Expected pixels come from the NumPy reference forward
below (float64), applied to the weights as the file stores them (float16 rounding included; for 2.0 the
codes dequantized here by FORMAT.md rule 84), so they are independent of the library's decoders.
Run it only when the format changes on purpose (a new version); tests/test_spec.py checks the files that
are committed, so that a change that breaks existing files fails CI.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from inrfmt.grid import CodeGrid  # noqa: E402
from inrfmt.prior import Prior  # noqa: E402
from inrfmt.reader import InrFile  # noqa: E402
from inrfmt.spec import Architecture, WeightBatch  # noqa: E402
from inrfmt.writer import InrWriter  # noqa: E402

PIXEL_ATOL = 1e-4  # float32 reader + float32/float16-accumulating decoders vs the float64 reference


def random_weights(arch: Architecture, n: int, hidden_dtype: str, rng: np.random.Generator, *,
                   prune: float = 0.0, float_dtype: str = "float32") -> WeightBatch:
    """n SIREN-initialised networks as a writer takes them: int8 hidden weights get a per-image per-layer
    symmetric scale (max|w| / 127); prune > 0 removes about that fraction of each image's hidden weights
    (smallest magnitudes first; image i prunes prune * (0.5 + i / n) so images differ) and returns the mask. Floats are rounded to float_dtype already, so the
    batch equals what a reader returns."""
    w, h = arch.width, arch.hidden_layers
    bound = math.sqrt(6.0 / w) / arch.w0

    def u(shape, b):
        values = rng.uniform(-b, b, size=shape).astype(np.float32)
        return values.astype(float_dtype).astype(np.float32)

    hidden = rng.uniform(-bound, bound, size=(n, h, w, w)).astype(np.float32)
    mask = None
    if prune > 0:
        flat = np.abs(hidden).reshape(n, -1)
        order = np.argsort(flat, axis=1, kind="stable")
        keep = np.ones_like(flat, dtype=bool)
        for i in range(n):
            k = min(flat.shape[1], int(round(prune * (0.5 + i / n) * flat.shape[1])))
            keep[i, order[i, :k]] = False
        mask = keep.reshape(n, h, w, w)
        hidden = np.where(mask, hidden, 0.0).astype(np.float32)
    if hidden_dtype == "int8":
        scale = (np.abs(hidden).max(axis=(2, 3)) / 127.0).astype(np.float32) if h else np.zeros((n, 0), np.float32)
        safe = np.where(scale > 0, scale, 1.0)[:, :, None, None]
        q = np.clip(np.round(hidden / safe), -127, 127).astype(np.int8)
    else:
        scale = np.ones((n, h), np.float32)
        q = hidden.astype(hidden_dtype)
    return WeightBatch(
        first_w=u((n, w, 2), 1.0 / 2), first_b=u((n, w), 1.0 / math.sqrt(2)), hidden_w=q, hidden_scale=scale,
        hidden_b=u((n, h, w), 1.0 / math.sqrt(w)), last_w=u((n, 3, w), bound), last_b=u((n, 3), 1.0 / math.sqrt(w)),
        mask=mask)


def pixel_coords(height: int, width: int, rows, cols) -> np.ndarray:
    """(x, y) of pixel centres (i, j) for an output of size (height, width): FORMAT.md rule of coordinates."""
    rows, cols = np.asarray(rows, np.float64), np.asarray(cols, np.float64)
    return np.stack([-1.0 + (2.0 * cols + 1.0) / width, -1.0 + (2.0 * rows + 1.0) / height], axis=-1)


def reference_pixels(wb: WeightBatch, i: int, arch: Architecture, coords: np.ndarray) -> np.ndarray:
    """RGB in [0, 1] of image i at coords [P, 2], float64, straight from the FORMAT.md network definition."""
    f64 = np.float64
    h = np.sin(arch.first_w0 * (coords @ wb.first_w[i].astype(f64).T + wb.first_b[i].astype(f64)))
    for layer in range(arch.hidden_layers):
        weight = wb.hidden_w[i, layer].astype(f64) * f64(wb.hidden_scale[i, layer])
        h = np.sin(arch.w0 * (h @ weight.T + wb.hidden_b[i, layer].astype(f64)))
    out = h @ wb.last_w[i].astype(f64).T + wb.last_b[i].astype(f64)
    return np.clip(0.5 * out + 0.5, 0.0, 1.0)


def sample_positions(height: int, width: int) -> list[tuple[int, int]]:
    """Corners and centre: enough to catch a transposed or flipped coordinate convention."""
    return sorted({(0, 0), (0, width - 1), (height - 1, 0), (height - 1, width - 1), (height // 2, width // 2)})


def expected_pixels(wb: WeightBatch, arch: Architecture, sizes) -> list[dict]:
    """The reference decoder's pixels at sample_positions of every image (i, (h, w) in sizes)."""
    out = []
    for i, (h, w) in enumerate(sizes):
        pos = sample_positions(h, w)
        rgb = reference_pixels(wb, i, arch, pixel_coords(h, w, [p[0] for p in pos], [p[1] for p in pos]))
        out += [{"image": i, "row": r, "col": c, "size": [h, w], "rgb": [round(float(v), 7) for v in value]}
                for (r, c), value in zip(pos, rgb)]
    return out


CASES = [
    # name, arch, hidden_dtype, float_dtype, prune, sizes (h, w), labels, classes, chunk_images
    dict(name="int8_masks", arch=Architecture(3, 8), hidden_dtype="int8", float_dtype="float32", prune=0.3,
         sizes=[(5, 7), (8, 3), (4, 4)], labels=[1, 0, 1], classes=["cat", "dog"], chunk_images=2, seed=1),
    dict(name="float16_dense", arch=Architecture(2, 6, w0=25.0, first_w0=20.0), hidden_dtype="float16",
         float_dtype="float16", prune=0.0, sizes=[(6, 2), (3, 9)], labels=[-1, -1], classes=[], chunk_images=8,
         seed=2),
    dict(name="no_hidden_single", arch=Architecture(1, 4), hidden_dtype="int8", float_dtype="float32", prune=0.0,
         sizes=[(1, 9)], labels=[0], classes=["only"], chunk_images=1, seed=3, has_masks=True),
    # Format 1.1: the optional `keys` section (an empty key, a non-ASCII one, an archive member).
    dict(name="keys_1_1", arch=Architecture(2, 4), hidden_dtype="int8", float_dtype="float32", prune=0.2,
         sizes=[(3, 4), (4, 3), (2, 2)], labels=[0, 1, 0], classes=["a", "b"], chunk_images=2, seed=4,
         keys=["a/x.jpg", "b/sous-dossier/é.png", ""]),
]


def write_case(case: dict, out_dir: str) -> dict:
    arch, n = case["arch"], len(case["sizes"])
    rng = np.random.default_rng(case["seed"])
    wb = random_weights(arch, n, case["hidden_dtype"], rng, prune=case["prune"], float_dtype=case["float_dtype"])
    has_masks = case.get("has_masks", case["prune"] > 0)
    total = arch.hidden_layers * arch.width ** 2
    nnz = wb.mask.reshape(n, -1).sum(axis=1) if wb.mask is not None else np.full(n, total)
    prune_ratio = 1.0 - nnz / total if total else np.zeros(n)
    psnr = np.round(rng.uniform(20, 40, size=n), 2)
    heights, widths = [s[0] for s in case["sizes"]], [s[1] for s in case["sizes"]]
    metadata = {"created_by": "tools/make_golden.py", "golden_case": case["name"]}
    path = os.path.join(out_dir, case["name"] + ".inr")
    with InrWriter(path, arch, hidden_dtype=case["hidden_dtype"], float_dtype=case["float_dtype"],
                   has_masks=has_masks, classes=case["classes"], metadata=metadata,
                   chunk_images=case["chunk_images"]) as writer:
        writer.add(wb, case["labels"], heights, widths, psnr, prune_ratio, keys=case.get("keys"))
    with InrFile(path) as f:
        index = [{k: (float(row[k]) if isinstance(row[k], np.floating) else int(row[k]))
                  for k in f.index.dtype.names} for row in f.index]
        expected = {
            **common_expectations(f, case),
            "hidden_dtype": f.hidden_dtype, "float_dtype": f.float_dtype, "has_masks": f.has_masks,
            "index": index,
            "scales": f.scales.tolist(),
            "pixel_atol": PIXEL_ATOL,
            "pixels": [],
        }
        if f.keys is not None:
            expected["keys"] = f.keys
    expected["pixels"] += expected_pixels(wb, arch, case["sizes"])
    # A kept-weights checksum of the decoded weights: catches a wrong mask order that pixels might miss.
    expected["hidden_nonzero_sum"] = [float(np.abs(wb.dequantized_hidden()[i].astype(np.float64)).sum())
                                      for i in range(n)]
    with open(os.path.join(out_dir, case["name"] + ".json"), "w") as fh:
        json.dump(expected, fh, indent=1, sort_keys=True)
        fh.write("\n")
    return expected


# -- format 2.0 ---------------------------------------------------------------------------------------------
# Each group (FORMAT.md rule 82 order): (bits, step or "wrapped", codes), codes one of
#   ("laplace", scale)  rounded Laplace noise, clamped to the width;  ("uniform",)  every code equally likely;
#   ("span", lo, hi)    uniform in [lo, hi];  ("const", q)  always q;
# "extremes" after the kind sets the group's first two codes to the lowest and the highest code of its width,
# "top" its last code to the highest.
CODED_CASES = [
    # 3x16 with a prior (so rule 84's float32 sum matters), keys, two chunks, widths 1 to 16, wrapped biases
    # of both period factors, a plain sine-layer bias, and a 16-bit group whose symbols end at 2^16 - 1.
    dict(name="coded_small", arch=Architecture(3, 16, w0=25.0, first_w0=35.0), prior=True, seed=11,
         groups=[(8, 0.0071, ("laplace", 30.0)), (6, "wrapped", ("uniform",)),
                 (4, 0.0061, ("laplace", 2.0), "extremes"), (5, "wrapped", ("uniform",)),
                 (1, 0.013, ("uniform",)), (7, 0.0097, ("laplace", 10.0)),
                 (12, 0.00031, ("laplace", 20.0)), (16, 1.5e-5, ("span", 32700, 32767), "top")],
         sizes=[(5, 7), (8, 3), (4, 4), (1, 6), (9, 2)], labels=[1, 0, -1, 1, 0], classes=["cat", "dog"],
         chunk_images=3, keys=["cat/1.png", "", "chien/é.jpg", "x.tar/000001.jpg", "dog/2.png"]),
    # No hidden layer, no prior, one chunk: a plain first_b, a constant group at the top of its width (its
    # table is the two symbols below and at it, one count 0), and 2- and 3-bit groups.
    dict(name="coded_no_hidden", arch=Architecture(1, 4), prior=False, seed=12,
         groups=[(3, 0.3, ("laplace", 1.0), "extremes"), (10, 0.004, ("laplace", 40.0)), (2, 0.05, ("const", 1)),
                 (9, 0.002, ("laplace", 5.0))],
         sizes=[(1, 9), (4, 1), (2, 3)], labels=[-1, -1, -1], classes=[], chunk_images=8, keys=None),
]


def coded_grid(arch: Architecture, groups) -> CodeGrid:
    """The grid of a coded case: wrapped steps are float32(2*pi / (w0 * 2^b)) with the group's period factor."""
    periods = [None, arch.first_w0] + [None, arch.w0] * arch.hidden_layers + [None, None]
    steps = [np.float32(2 * math.pi / (period * 2 ** b)) if step == "wrapped" else np.float32(step)
             for (b, step, *_), period in zip(groups, periods)]
    return CodeGrid(arch, np.array(steps, np.float32), np.array([g[0] for g in groups], np.uint8),
                    np.array([g[1] == "wrapped" for g in groups]))


def common_expectations(f: InrFile, case: dict) -> dict:
    """What a reader must return for any golden file, both majors: version, sizes, network, chunking,
    class names and metadata."""
    arch = f.arch
    return {
        "file": case["name"] + ".inr",
        "version": list(f.version),
        "file_bytes": f.file_bytes,
        "architecture": {"sine_layers": arch.sine_layers, "width": arch.width, "w0": arch.w0,
                         "first_w0": arch.first_w0},
        "num_images": f.num_images, "num_chunks": f.num_chunks,
        "chunk_ranges": [list(f.chunk_range(k)) for k in range(f.num_chunks)],
        "classes": f.classes, "metadata": f.metadata,
    }


def group_sizes(arch: Architecture) -> list[int]:
    """Parameters per image of each group, in FORMAT.md rule 82 order."""
    w = arch.width
    return [2 * w, w] + [w * w, w] * arch.hidden_layers + [3 * w, 3]


def random_codes(case: dict, n: int, rng: np.random.Generator) -> np.ndarray:
    """int64 [n, P]: each group's codes drawn as its case says, within its width."""
    parts = []
    for (b, _, kind, *extra), size in zip(case["groups"], group_sizes(case["arch"])):
        lo, hi = -2 ** (b - 1), 2 ** (b - 1) - 1
        if kind[0] == "laplace":
            q = np.clip(np.round(rng.laplace(0.0, kind[1], size=(n, size))), lo, hi)
        elif kind[0] == "uniform":
            q = rng.integers(lo, hi + 1, size=(n, size))
        elif kind[0] == "span":
            q = rng.integers(kind[1], kind[2] + 1, size=(n, size))
        else:
            q = np.full((n, size), kind[1])
        q = q.astype(np.int64)
        if "extremes" in extra:
            q.reshape(-1)[:2] = lo, hi
        if "top" in extra:
            q.reshape(-1)[-1] = hi
        parts.append(q)
    return np.concatenate(parts, axis=1)


def random_prior(arch: Architecture, rng: np.random.Generator) -> Prior:
    """A prior with SIREN-initialisation-sized random values (float32)."""
    one = random_weights(arch, 1, "float32", rng)
    theta0 = {name: getattr(one, name)[0] for name in arch.shapes()}
    return Prior(arch, theta0, name="golden")


def flat_theta0(arch: Architecture, prior: Prior | None) -> np.ndarray:
    """The prior's values as one float32 vector [P] in FORMAT.md rule 82 group order (zeros without one)."""
    if prior is None:
        return np.zeros(sum(group_sizes(arch)), np.float32)
    t = prior.theta0
    parts = [t["first_w"], t["first_b"]]
    for layer in range(arch.hidden_layers):
        parts += [t["hidden_w"][layer], t["hidden_b"][layer]]
    parts += [t["last_w"], t["last_b"]]
    return np.concatenate([np.asarray(p, np.float32).reshape(-1) for p in parts])


def dequantize(codes: np.ndarray, grid: CodeGrid, theta0: np.ndarray) -> np.ndarray:
    """FORMAT.md rule 84: float32(theta0 + float32(step * float32(q)))."""
    step = np.repeat(grid.steps.astype(np.float32), group_sizes(grid.arch))
    product = (step * codes.astype(np.float32)).astype(np.float32)
    return (theta0.astype(np.float32) + product).astype(np.float32)


def flat_to_weights(flat: np.ndarray, arch: Architecture) -> WeightBatch:
    """Flat parameters float32 [n, P] (rule 82 order) -> the WeightBatch that reference_pixels takes."""
    n, w, h = len(flat), arch.width, arch.hidden_layers
    pos = 0

    def take(*shape):
        nonlocal pos
        size = int(np.prod(shape))
        part = flat[:, pos:pos + size].reshape(n, *shape)
        pos += size
        return part

    first_w, first_b = take(w, 2), take(w)
    hidden_w, hidden_b = np.zeros((n, h, w, w), np.float32), np.zeros((n, h, w), np.float32)
    for layer in range(h):
        hidden_w[:, layer], hidden_b[:, layer] = take(w, w), take(w)
    last_w, last_b = take(3, w), take(3)
    assert pos == flat.shape[1]
    return WeightBatch(first_w=first_w, first_b=first_b, hidden_w=hidden_w, hidden_scale=np.ones((n, h), np.float32),
                       hidden_b=hidden_b, last_w=last_w, last_b=last_b)


def params_sha256(params: np.ndarray) -> str:
    """SHA-256 of float32 parameters [n, P] as little-endian bytes (C order)."""
    return hashlib.sha256(np.ascontiguousarray(params, "<f4").tobytes()).hexdigest()


def group_names(arch: Architecture) -> list[str]:
    names = ["first_w", "first_b"]
    for layer in range(arch.hidden_layers):
        names += [f"hidden_w.{layer}", f"hidden_b.{layer}"]
    return names + ["last_w", "last_b"]


def write_coded_case(case: dict, out_dir: str) -> dict:
    """Write a format 2.0 case and its JSON: header fields, the chunk table, the grid, the tables, the index,
    every code, the dequantized parameters (a SHA-256 of all, some values exactly) and pixels."""
    arch, n = case["arch"], len(case["sizes"])
    rng = np.random.default_rng(case["seed"])
    grid = coded_grid(arch, case["groups"])
    prior = random_prior(arch, rng) if case["prior"] else None
    codes = random_codes(case, n, rng)
    psnr = np.round(rng.uniform(20, 40, size=n), 2)
    heights, widths = [s[0] for s in case["sizes"]], [s[1] for s in case["sizes"]]
    metadata = {"created_by": "tools/make_golden.py", "golden_case": case["name"]}
    path = os.path.join(out_dir, case["name"] + ".inr")
    with InrWriter(path, arch, classes=case["classes"], metadata=metadata, chunk_images=case["chunk_images"],
                   prior=prior, grid=grid) as writer:
        writer.add_codes(codes, case["labels"], heights, widths, psnr, keys=case["keys"])
    theta0 = flat_theta0(arch, prior)
    params = dequantize(codes, grid, theta0)
    names, sizes = group_names(arch), group_sizes(arch)
    with InrFile(path) as f:
        expected = {
            **common_expectations(f, case),
            "weight_coding": f.header["weight_coding"],
            "chunks": [{"compressed_length": int(c["compressed_length"]), "raw_length": int(c["raw_length"]),
                        "crc32": int(c["crc32"])} for c in f.chunks],
            "keys": f.keys,
            "prior": None if prior is None else {"name": prior.name, "theta0_sha256": params_sha256(theta0[None])},
            "quant": [{"group": name, "step": float(grid.steps[g]), "bits": int(grid.bits[g]),
                       "wrapped": bool(grid.wrapped[g])} for g, name in enumerate(names)],
            "tables": [{"first": t.first, "counts": [int(c) for c in t.counts]} for t in f.tables],
            "index": [{k: (float(row[k]) if isinstance(row[k], np.floating) else int(row[k]))
                       for k in f.index.dtype.names} for row in f.index],
            "codes": codes.tolist(),
            "params_sha256": params_sha256(params),
            "param_samples": [],
            "pixel_atol": PIXEL_ATOL,
            "pixels": [],
        }
    # Some dequantized values, exactly (a float32 prints and parses back to itself): the first, a middle
    # and the last parameter of every group, in the first and the last image.
    start = 0
    for name, size in zip(names, sizes):
        for i in sorted({0, n - 1}):
            for e in sorted({0, size // 2, size - 1}):
                expected["param_samples"].append({"image": i, "group": name, "element": e,
                                                  "code": int(codes[i, start + e]),
                                                  "theta0": float(theta0[start + e]),
                                                  "value": float(params[i, start + e])})
        start += size
    expected["pixels"] += expected_pixels(flat_to_weights(params, arch), arch, case["sizes"])
    with open(os.path.join(out_dir, case["name"] + ".json"), "w") as fh:
        fh.write(compact_json(expected) + "\n")
    return expected


def compact_json(obj, indent: int = 0) -> str:
    """Sorted-key JSON, one line per key, but lists of numbers and short objects on one line (the coded
    cases' code lists would otherwise take a line per code)."""
    pad = " " * (indent + 1)
    if isinstance(obj, list) and obj and all(isinstance(v, (list, dict)) for v in obj):
        return "[\n" + ",\n".join(pad + compact_json(v, indent + 1) for v in obj) + "\n" + " " * indent + "]"
    line = json.dumps(obj, sort_keys=True, ensure_ascii=False)
    if isinstance(obj, dict) and obj and (indent == 0 or len(line) > 120):
        return "{\n" + ",\n".join(f"{pad}{json.dumps(k, ensure_ascii=False)}: {compact_json(obj[k], indent + 1)}"
                                     for k in sorted(obj)) + "\n" + " " * indent + "}"
    return line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "spec"))
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for case in CASES:
        expected = write_case(case, args.out)
        print(f"{case['name']}.inr: {expected['file_bytes']} bytes, {expected['num_images']} images")
    for case in CODED_CASES:
        expected = write_coded_case(case, args.out)
        print(f"{case['name']}.inr: {expected['file_bytes']} bytes, {expected['num_images']} images (format 2.0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
