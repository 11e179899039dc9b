"""Reference conversions whose bytes are pinned in tests/data/: a refactor of the encoder or the writer must
not change them. Regenerate (only when the file format or the encoder changes on purpose) with
`python tests/reference_convert.py`."""
from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
SAMPLE = ROOT / "data" / "sample"

# name -> convert options; every case runs on the CPU, single-threaded, with --reproducible.
CASES = {
    "fast_int8_masks": dict(preset="fast", steps=20, batch_size=5, seed=3, prior="none"),
    "fast_f16_noprune_mixed": dict(preset="fast", steps=15, batch_size=4, seed=1, prune=False, quant=16,
                                   float_dtype="float16", max_side=12, prior="none"),
}


def source_folder(root: Path) -> Path:
    """11 real images (bundled Fashion-MNIST sample) in two class folders, two sizes (one non-square)."""
    files = sorted(SAMPLE.glob("*/*.png"))[::17][:11]
    for i, f in enumerate(files):
        cls = root / ("a" if i % 2 else "b")
        cls.mkdir(parents=True, exist_ok=True)
        size = (14, 14) if i % 3 else (16, 12)
        Image.open(f).convert("RGB").resize(size, Image.Resampling.LANCZOS).save(cls / f"{i:03d}.png")
    return root


def environment() -> dict:
    """What the pinned bytes depend on beyond the code: float results differ across torch builds and CPUs."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"torch": torch.__version__, "cpu": cpu, "capability": torch.backends.cpu.get_cpu_capability()}


def convert_case(name: str, src: Path, out: Path) -> Path:
    """Convert `src` as case `name` into `out`. SRC is passed relative to its parent (the metadata keeps it
    as given), so the bytes do not depend on where the temporary folder is."""
    import os

    import inrfmt

    before, cwd = torch.get_num_threads(), os.getcwd()
    torch.set_num_threads(1)
    os.chdir(src.parent)
    try:
        inrfmt.convert(src.name, out.resolve(), device="cpu", reproducible=True, progress=False, overwrite=True,
                       **CASES[name])
    finally:
        os.chdir(cwd)
        torch.set_num_threads(before)
    return out


if __name__ == "__main__":
    import tempfile

    sys.path.insert(0, str(ROOT))
    DATA.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = source_folder(Path(tmp) / "src")
        for case in CASES:
            convert_case(case, src, DATA / f"{case}.inr")
    (DATA / "reference_environment.json").write_text(json.dumps(environment(), indent=1) + "\n")
    print("wrote", *sorted(p.name for p in DATA.iterdir()))
