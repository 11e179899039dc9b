"""Write the golden .inr files of spec/ and, for each, the JSON of what a reader must return.

    python tools/make_golden.py [--out spec]

Weights are seeded random SIREN-initialised networks (not fitted: the point is the bytes, not the pictures).
Expected pixels come from the NumPy reference forward below (float64), applied to the weights as the
file stores them (float16 rounding included), so they are independent of the library's decoders.
Run it only when the format changes on purpose (a new version); tests/test_spec.py checks the files that
are committed, so that a change that breaks existing files fails CI.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
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
            "file": case["name"] + ".inr",
            "version": list(f.version),
            "file_bytes": f.file_bytes,
            "architecture": {"sine_layers": arch.sine_layers, "width": arch.width, "w0": arch.w0,
                             "first_w0": arch.first_w0},
            "hidden_dtype": f.hidden_dtype, "float_dtype": f.float_dtype, "has_masks": f.has_masks,
            "num_images": f.num_images, "num_chunks": f.num_chunks,
            "chunk_ranges": [list(f.chunk_range(k)) for k in range(f.num_chunks)],
            "classes": f.classes, "metadata": f.metadata,
            "index": index,
            "scales": f.scales.tolist(),
            "pixel_atol": PIXEL_ATOL,
            "pixels": [],
        }
        if f.keys is not None:
            expected["keys"] = f.keys
    for i, (h, w) in enumerate(case["sizes"]):
        pos = sample_positions(h, w)
        rgb = reference_pixels(wb, i, arch, pixel_coords(h, w, [p[0] for p in pos], [p[1] for p in pos]))
        for (r, c), value in zip(pos, rgb):
            expected["pixels"].append({"image": i, "row": r, "col": c, "size": [h, w],
                                       "rgb": [round(float(v), 7) for v in value]})
    # A kept-weights checksum of the decoded weights: catches a wrong mask order that pixels might miss.
    expected["hidden_nonzero_sum"] = [float(np.abs(wb.dequantized_hidden()[i].astype(np.float64)).sum())
                                      for i in range(n)]
    with open(os.path.join(out_dir, case["name"] + ".json"), "w") as fh:
        json.dump(expected, fh, indent=1, sort_keys=True)
        fh.write("\n")
    return expected


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "spec"))
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for case in CASES:
        expected = write_case(case, args.out)
        print(f"{case['name']}.inr: {expected['file_bytes']} bytes, {expected['num_images']} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
