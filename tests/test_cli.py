"""The command line as a user meets it: real subprocesses, exit codes, one-line errors, `info --json`."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from inrfmt.reader import InrFile

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "spec"
GOLDEN = SPEC / "int8_masks.inr"


def run(*args, check_rc=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "inrfmt", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    if check_rc is not None:
        assert proc.returncode == check_rc, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def assert_one_line_error(proc, code, *needles):
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("inrfmt: error: ")
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_info_json_has_the_promised_fields():
    doc = json.loads(run("info", GOLDEN, "--json", check_rc=0).stdout)
    for key in ("format_version", "num_images", "classes", "architecture", "file_bytes", "bytes_per_image",
                "psnr", "prune_ratio", "quantization"):
        assert key in doc
    with InrFile(GOLDEN) as inr:
        index = inr.index
        assert doc["num_images"] == inr.num_images == 3
        assert doc["classes"] == list(inr.classes)
        assert doc["file_bytes"] == GOLDEN.stat().st_size
        assert doc["bytes_per_image"] == pytest.approx(GOLDEN.stat().st_size / 3)
        assert doc["psnr"]["mean"] == pytest.approx(float(np.mean(index["psnr"].astype(np.float64))))
        assert doc["psnr"]["min"] == pytest.approx(float(index["psnr"].min()))
        assert doc["prune_ratio"]["mean"] == pytest.approx(float(np.mean(index["prune_ratio"].astype(np.float64))))
        assert doc["architecture"]["sine_layers"] == inr.arch.sine_layers
        assert doc["architecture"]["width"] == inr.arch.width
        assert doc["architecture"]["w0"] == inr.arch.w0
    assert doc["format_version"] == "1.0"
    assert doc["quantization"]["hidden_dtype"] == "int8"
    assert sum(h["count"] for h in doc["prune_ratio"]["histogram"]) == 3
    assert "images" not in doc


def test_info_per_image_rows_match_the_index():
    doc = json.loads(run("info", GOLDEN, "--json", "--per-image", check_rc=0).stdout)
    with InrFile(GOLDEN) as inr:
        rows = inr.index
        assert [r["index"] for r in doc["images"]] == list(range(inr.num_images))
        assert [r["height"] for r in doc["images"]] == rows["height"].tolist()
        assert [r["width"] for r in doc["images"]] == rows["width"].tolist()
        assert [r["label"] for r in doc["images"]] == rows["label"].tolist()
    table = run("info", GOLDEN, "--per-image", check_rc=0).stdout
    assert "prune ratio" in table and "PSNR" in table
    assert len([line for line in table.splitlines() if line.strip().split()[:1] == ["2"]]) == 1


def test_info_load_reports_bank_stats():
    doc = json.loads(run("info", GOLDEN, "--json", "--load", "--device", "cpu", check_rc=0).stdout)
    assert doc["load"]["file_bytes"] == GOLDEN.stat().st_size
    assert doc["load"]["bank_bytes"] > 0
    assert doc["load"]["load_seconds"] >= 0
    assert doc["load"]["bank_layout"] in ("dense", "compact")
    doc = json.loads(run("info", GOLDEN, "--json", "--load", "--device", "cpu", "--bank-layout", "compact",
                         check_rc=0).stdout)
    assert doc["load"]["bank_layout"] == "compact"
    table = run("info", GOLDEN, "--load", "--device", "cpu", "--bank-layout", "dense", check_rc=0).stdout
    assert "(dense, " in table and "x the file)" in table
    proc = run("info", GOLDEN, "--load", "--bank-layout", "sparse", check_rc=2)
    assert "sparse" in proc.stderr and "Traceback" not in proc.stderr


def test_verify_sound_file_exits_0():
    proc = run("verify", GOLDEN, check_rc=0)
    assert "OK" in proc.stdout


def test_verify_damaged_file_exits_1_with_reason(tmp_path):
    damaged = tmp_path / "damaged.inr"
    data = bytearray(GOLDEN.read_bytes())
    with InrFile(GOLDEN) as inr:
        blobs = inr.sections["blobs"]
        offset = int(blobs["offset"])
    data[offset + 5] ^= 0xFF  # inside the first compressed chunk: only its checksum can notice
    damaged.write_bytes(bytes(data))
    assert_one_line_error(run("verify", damaged), 1, str(damaged))
    assert_one_line_error(run("info", tmp_path / "missing.inr"), 2, "missing.inr")
    truncated = tmp_path / "truncated.inr"
    truncated.write_bytes(GOLDEN.read_bytes()[:100])
    assert_one_line_error(run("info", truncated), 1, "truncated")


def test_convert_user_mistakes_are_one_line_exit_2(tmp_path):
    sample = tmp_path / "src"
    shutil.copytree(ROOT / "data" / "sample" / "bag", sample / "bag")
    assert_one_line_error(run("convert", tmp_path / "nope", tmp_path / "o.inr"), 2, "nope")
    assert_one_line_error(run("convert", sample, tmp_path / "o.inr", "--preset", "bogus"), 2, "bogus")
    existing = tmp_path / "exists.inr"
    existing.write_bytes(b"keep me")
    assert_one_line_error(run("convert", sample, existing), 2, "exists.inr")
    assert existing.read_bytes() == b"keep me"
    assert_one_line_error(run("convert", sample, tmp_path / "o.inr", "--steps", "0"), 2)
    assert_one_line_error(run("convert", sample, tmp_path / "o.inr", "--jitter", "1.5"), 2, "1.5")
    assert_one_line_error(run("convert", sample, tmp_path / "o.inr", "--float-dtype", "bf16"), 2, "bf16")
    assert_one_line_error(run("info"), 2)
    assert not (tmp_path / "o.inr").exists()


def test_help_lists_every_command():
    out = run("--help", check_rc=0).stdout
    for command in ("convert", "info", "verify", "merge", "export", "bench"):
        assert command in out
    convert_help = run("convert", "--help", check_rc=0).stdout
    for option in ("--preset", "--steps", "--batch-size", "--device", "--seed", "--overwrite", "--resume",
                   "--max-side", "--on-error", "--shard", "--no-prune", "--quant", "--float-dtype", "--jitter",
                   "--pixel-fraction", "--reproducible", "--bits"):
        assert option in convert_help


def test_convert_cli_options_reach_the_file(tmp_path):
    sample = tmp_path / "src"
    shutil.copytree(ROOT / "data" / "sample" / "bag", sample / "bag")
    out = tmp_path / "small.inr"
    run("convert", sample, out, "--preset", "fast", "--steps", "5", "--float-dtype", "float16", "--quant", "16",
        "--jitter", "0", "--no-prune", "--reproducible", "--quiet", check_rc=0)
    with InrFile(out) as inr:
        assert (inr.float_dtype, inr.hidden_dtype, inr.has_masks) == ("float16", "float16", False)
        assert inr.num_images == len(list((sample / "bag").iterdir()))
        assert float(inr.metadata["jitter"]) == 0.0
        assert "encode_seconds" not in inr.metadata


def test_convert_defaults_to_a_coded_preset_picked_from_the_image_sizes(tmp_path):
    sample = tmp_path / "src"
    shutil.copytree(ROOT / "data" / "sample" / "bag", sample / "bag")
    out = tmp_path / "auto.inr"
    proc = run("convert", sample, out, "--steps", "4", "--bits", "hidden_w=5,first_w=9", "--device", "cpu",
               check_rc=0)
    said = [line for line in proc.stderr.splitlines() if line.startswith("inrfmt: --preset auto")]
    assert said == ["inrfmt: --preset auto: small, the longest side in a sample of 16 of "
                    f"{len(list((sample / 'bag').iterdir()))} images is 28 px (<= 64)"], proc.stderr
    assert f"wrote {out} (preset small): " in proc.stderr
    with InrFile(out) as inr:
        assert inr.version == (2, 0) and inr.coded and inr.metadata["preset"] == "small"
        bits = {g["name"]: g["bits"] for g in json.loads(run("info", out, "--json", check_rc=0).stdout)
                ["quantization"]["groups"]}
        assert bits["first_w"] == 9 and bits["hidden_w.0"] == 5 and bits["last_w"] == 8
    assert "code bits first_w 9, first_b 7, hidden_w 5" in run("info", out, check_rc=0).stdout
    # --max-side decides what is fitted, so it decides the preset too; --quiet says nothing but the result
    proc = run("convert", sample, tmp_path / "q.inr", "--steps", "1", "--quiet", "--device", "cpu", check_rc=0)
    assert proc.stderr.startswith(f"wrote {tmp_path / 'q.inr'} (preset small): ") and proc.stderr.count("\n") == 1


def test_coding_options_of_the_other_format_are_one_line_exit_2(tmp_path):
    sample = tmp_path / "src"
    shutil.copytree(ROOT / "data" / "sample" / "bag", sample / "bag")
    out = tmp_path / "o.inr"
    for bits in ("0", "17", "four", "hidden_w=4,bogus=3", "hidden_w=4,hidden_w=5", "first_w=99"):
        assert_one_line_error(run("convert", sample, out, "--bits", bits), 2, "bad bits")
    assert_one_line_error(run("convert", sample, out, "--preset", "fast", "--bits", "5"), 2,
                          "preset fast writes format 1")
    assert_one_line_error(run("convert", sample, out, "--preset", "small", "--quant", "16"), 2,
                          "quant 16 applies to format-1 presets")
    assert_one_line_error(run("convert", sample, out, "--float-dtype", "float16"), 2,
                          "float_dtype float16", "picked by --preset auto")
    assert not out.exists() and not (tmp_path / "o.inr.work").exists()


# --------------------------------------------------------------------------- what a new user runs into
def test_info_checks_every_checksum_and_exits_1_on_a_damaged_file(tmp_path):
    # A flipped byte inside a compressed chunk: opening the file does not read chunks, `info` must notice.
    damaged = tmp_path / "flipped.inr"
    data = bytearray(GOLDEN.read_bytes())
    with InrFile(GOLDEN) as inr:
        data[int(inr.sections["blobs"]["offset"]) + 7] ^= 0x01
    damaged.write_bytes(bytes(data))
    assert_one_line_error(run("info", damaged), 1, str(damaged), "blobs", "checksum mismatch")
    assert_one_line_error(run("info", damaged, "--json"), 1, "checksum mismatch")


def test_info_shows_keys_and_a_histogram_that_ends_at_the_cap():
    keyed = SPEC / "keys_1_1.inr"
    table = run("info", keyed, "--per-image", check_rc=0).stdout
    assert "a/x.jpg" in table and "b/sous-dossier/é.png" in table
    # prune ratios 0.125, 0.1875, 0.25: the image at 0.25 belongs to the 0.20-0.25 bin, and no bin goes above
    assert "0.20-0.25        1" in table and "0.25-0.30" not in table
    doc = json.loads(run("info", keyed, "--json", "--per-image", check_rc=0).stdout)
    assert [r["key"] for r in doc["images"]] == ["a/x.jpg", "b/sous-dossier/é.png", ""]
    assert doc["prune_ratio"]["histogram"][-1] == {"from": 0.2, "to": 0.25, "count": 1}
    assert doc["format_version"] == "1.1"


def test_a_file_without_images_prints_0_images_and_no_nan(tmp_path):
    sample = tmp_path / "src"
    shutil.copytree(ROOT / "data" / "sample" / "bag", sample / "bag")
    for extra in sorted((sample / "bag").glob("*.png"))[2:]:
        extra.unlink()
    out = tmp_path / "p0.inr"
    proc = run("convert", sample, out, "--shard", "0/4", "--steps", "2", "--quiet", "--device", "cpu", check_rc=0)
    assert "wrote" in proc.stderr and "0 images" in proc.stderr and "nan" not in proc.stderr.lower()
    table = run("info", out, check_rc=0).stdout
    assert "images          0" in table and "nan" not in table.lower()
    doc = json.loads(run("info", out, "--json", check_rc=0).stdout)  # strict JSON: no NaN
    assert doc["num_images"] == 0 and doc["psnr"]["mean"] is None and doc["bytes_per_image"] is None


def test_bare_inrfmt_prints_help_and_exits_0():
    proc = run(check_rc=0)
    assert "Usage: inrfmt" in proc.stdout and "convert" in proc.stdout and proc.stderr == ""


def test_device_accepts_cuda_n(tmp_path):
    sample = ROOT / "data" / "sample" / "bag"
    proc = run("convert", sample, tmp_path / "never.inr", "--device", "cuda:1", "--steps", "1")
    if not __import__("torch").cuda.is_available():
        assert_one_line_error(proc, 2, "cuda:1", "CUDA is not available")
    else:  # one GPU: a one-line error naming cuda:1; two or more: it converts
        assert proc.returncode == 0 or ("cuda:1" in proc.stderr and proc.stderr.count("\n") == 1), proc.stderr
    assert_one_line_error(run("convert", sample, tmp_path / "never.inr", "--device", "tpu"), 2, "tpu")


def test_bench_times_each_common_size_of_a_mixed_file():
    doc = json.loads(run("bench", GOLDEN, "--json", "--batch-size", "2", "--backend", "torch", check_rc=0).stdout)
    assert doc["native_sizes"] == 3 and sorted(s["size"] for s in doc["sizes"]) == [[4, 4], [5, 7], [8, 3]]
    assert sorted(row["size"] for row in doc["results"]) == ["4x4", "5x7", "8x3"]
    assert "--size" in run("bench", "--help", check_rc=0).stdout


def test_preview_draws_the_lowest_psnr_images_first(tmp_path):
    from PIL import Image

    out = tmp_path / "sheet.png"
    proc = run("preview", SPEC / "keys_1_1.inr", out, "--worst", "2", "--random", "1", "--size", "32", check_rc=0)
    assert "2 lowest-PSNR and 1 random" in proc.stderr
    from inrfmt.preview import preview

    result = preview(SPEC / "keys_1_1.inr", tmp_path / "again.png", worst=2, random=1, size=32, device="cpu")
    with InrFile(SPEC / "keys_1_1.inr") as inr:
        order = np.argsort(inr.index["psnr"])
    assert result["worst"] == order[:2].tolist() and result["random"] == order[2:].tolist()
    with Image.open(out) as sheet:
        assert sheet.size == (result["width"], result["height"]) and sheet.mode == "RGB"
    assert_one_line_error(run("preview", SPEC / "keys_1_1.inr", tmp_path / "no" / "x.png"), 2, "not writable")


def test_export_size_keeps_the_aspect_ratio_and_takes_hxw(tmp_path):
    from PIL import Image

    run("export", GOLDEN, tmp_path / "short", "--size", "10", check_rc=0)  # 5x7, 8x3, 4x4 originals
    with Image.open(next((tmp_path / "short").rglob("00000.png"))) as img:
        assert (img.height, img.width) == (10, 14)
    run("export", GOLDEN, tmp_path / "hw", "--size", "44x40", check_rc=0)
    assert {Image.open(p).size for p in (tmp_path / "hw").rglob("*.png")} == {(40, 44)}
    assert_one_line_error(run("export", GOLDEN, tmp_path / "bad", "--size", "4x"), 2, "4x")
    run("export", GOLDEN, tmp_path / "one.h5", "--format", "h5", "--size", "6x6", check_rc=0)
    assert (tmp_path / "one.h5").is_file()
    run("export", GOLDEN, tmp_path / "named_anything", "--format", "h5", "--size", "6x6", check_rc=0)
    assert (tmp_path / "named_anything").is_file()  # OUT is the file, whatever its name


def test_export_into_an_unwritable_place_is_one_line(tmp_path):
    assert_one_line_error(run("export", GOLDEN, "/proc/inrfmt-export"), 2, "cannot write")
    (tmp_path / "file").write_text("x")
    assert_one_line_error(run("export", GOLDEN, tmp_path / "file" / "ro" / "exp"), 2, "not a folder")


def _synopsis():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("## Command line", 1)[1].split("```", 2)[1]
    return [line.split() for line in block.splitlines() if line.startswith("inrfmt ")]


def test_readme_synopsis_matches_the_commands():
    # Every option the synopsis shows outside brackets would be required: none is; every option it shows
    # exists; every command is there.
    import click

    from inrfmt.cli import cli

    lines = _synopsis()
    assert {words[1] for words in lines} >= set(cli.commands)
    for words in lines:
        command = cli.commands[words[1]]
        options = {opt for p in command.params for opt in getattr(p, "opts", []) if opt.startswith("--")}
        depth, bare = 0, []
        for word in words[2:]:
            depth += word.count("[")
            flag = word.strip("[]|").split("=")[0]
            if flag.startswith("--"):
                assert flag in options, (words[1], flag)
                if depth == 0:
                    bare.append(flag)
            depth -= word.count("]")
        required = [p for p in command.params if isinstance(p, click.Option) and p.required]
        assert bare == [] and required == [], (words[1], bare)


def test_readme_documents_source_keys_and_error_classes():
    from inrfmt import sources
    from inrfmt.archive_sources import DEFAULT_IMAGE_COLUMNS, DEFAULT_LABEL_COLUMNS

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in ("InrUsageError", "InrFormatError", "InrInterrupted", "exit code 2", "exit code 1"):
        assert name in text, name
    for names in (sources.DEFAULT_IMAGE_NAMES, sources.DEFAULT_LABEL_NAMES, sources.DEFAULT_CLASS_NAMES,
                  DEFAULT_IMAGE_COLUMNS, DEFAULT_LABEL_COLUMNS):
        assert " ".join(f"`{n}`" for n in names) in text, names
    for key in ("cat/sub/x.jpg", "data_batch_1#123", "data.h5#17", "train-000000.tar/000123.jpg",
                "train-00000-of-00004.parquet#17"):
        assert key in text, key
